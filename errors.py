"""Errors a user can cause (bad flags, missing files), runs that stop early, and how the scripts
report them: one line on stderr, no traceback."""
import functools
import os
import sys
import time

RANK_0_REPORTS_S = 5  # how long the other ranks wait for rank 0 to report an error


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it.
    Exit code 2."""


class RunStopped(Exception):
    """A run that stopped before its last epoch (signal, divergence); the message says what was
    kept and how to go on."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class LostProcess(RunStopped):
    """Another process of the torchrun job died mid-collective. Rank 0 may be the one that died,
    so every surviving rank reports, at once."""


def reports_user_errors(main):
    """Wraps a script's main: UserError and RunStopped become one line on stderr (from rank 0
    only under torchrun) and their exit code."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, RunStopped) as e:
            import distributed  # here, so scripts that never train do not pay for importing torch
            if distributed.is_main() or isinstance(e, LostProcess):
                print(f'{os.path.basename(sys.argv[0])}: {"error: " if isinstance(e, UserError) else ""}{e}',
                      file=sys.stderr, flush=True)
            else:
                # torchrun stops every process as soon as one fails: had this rank left first,
                # rank 0 could be killed before its line is out. Every rank meets the same error
                # at about the same point: rank 0 needs moments, and the wait is generous.
                time.sleep(RANK_0_REPORTS_S)
            if not isinstance(e, LostProcess):  # tearing down a group with a dead member could wait on it
                distributed.shutdown()
            sys.exit(e.exit_code if isinstance(e, RunStopped) else 2)
        finally:
            # Whatever ended the command (an error of any kind, a finished run), its run folders
            # are free again; a process killed outright leaves a lock file the next one takes over.
            from run_lock import release_run_dirs
            release_run_dirs()
    return wrapper
