"""Errors a user can cause (bad flags, missing files) and runs that stop early; the scripts report
them in one line on stderr, no traceback (stopping.reports_user_errors)."""


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


# ----------------------------------------------------------------------------------------------
# Signals before and after training: one line, not a traceback

class Interrupted(RunStopped):
    """SIGINT or SIGTERM before training began, reported by the handler itself: the unwinding
    releases the run folders this command claimed, and prints nothing more."""


_state = {'main': False, 'stopping': False, 'trained': False}


def stop_quietly_on_signals():
    """From here until a run installs its own handling of SIGINT and SIGTERM (stopping.SignalStop,
    which checkpoints), either signal ends the command in one line: while a script's main runs and
    before training began, through Interrupted, so that every folder it claimed is released on the
    way out; before it (the libraries loading, nothing claimed yet), after training began, or at a
    second signal, at once. This module imports nothing heavy, so a script calls it before its
    other imports."""
    import signal
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)


def on_signal(signum, frame):
    import os
    import signal
    import sys
    if _state['stopping']:  # a second signal: the first one's line is out
        os._exit(128 + signum)
    _state['stopping'] = True
    when = ('' if _state['trained'] else ' before training began; nothing was written' if _state['main']
            else ' while starting; nothing was written')
    if int(os.environ.get('RANK', 0)) == 0:  # under torchrun every process gets it: one of them says so
        print(f'{os.path.basename(sys.argv[0])}: stopped by {signal.Signals(signum).name}{when}', file=sys.stderr,
              flush=True)
    if _state['main'] and not _state['trained']:
        raise Interrupted('', exit_code=128 + signum)
    os._exit(128 + signum)


def main_running(running):
    """Set by stopping.reports_user_errors around a script's main."""
    _state['main'] = running


def training_began():
    """Set by stopping.SignalStop: from then on the loop has written what there is to keep."""
    _state['trained'] = True
