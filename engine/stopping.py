"""Why a run stops early, and how it stops without losing anything: on SIGTERM/SIGINT it
finishes the current step, writes a checkpoint and exits; on a non-finite loss it exits
before writing one, so the last good checkpoint stays; when the disk refuses a checkpoint or log
line it exits naming what is intact. Each way ends with one line that says how to resume, and
every script reports a user's error and a stopped run the same way (reports_user_errors)."""
import functools
import os
import signal
import sys
import time

import torch

from engine import distributed
from engine.errors import Interrupted, LostProcess, RunStopped, UserError, main_running, training_began
from engine.run_lock import release_run_dirs

RANK_0_REPORTS_S = 5  # how long the other ranks wait for rank 0 to report an error


def reports_user_errors(main):
    """Wraps a script's main: UserError and RunStopped become one line on stderr (from rank 0
    only under torchrun) and their exit code."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        main_running(True)
        by_signal = False
        try:
            return main(*args, **kwargs)
        except (UserError, RunStopped) as e:
            by_signal = isinstance(e, RunStopped) and e.exit_code > 128
            if isinstance(e, Interrupted):
                pass  # its line is out already
            elif distributed.is_main() or isinstance(e, LostProcess):
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
            release_run_dirs()
            main_running(False)
            if by_signal:
                # Tearing the interpreter down takes a second with torch loaded, and it sets the
                # signals back to their default action first: a second Ctrl-C then would kill the
                # process instead of leaving with the code of the line already printed.
                for s in SignalStop.SIGNALS:
                    signal.signal(s, signal.SIG_IGN)
    return wrapper


class SignalStop:
    """Within `with`, SIGTERM and SIGINT only set a flag that the loop reads after each step.
    A second signal stops at once: the step (or checkpoint write) under way is abandoned, and
    the line it ends with names what `standing()` says is left to resume from."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, standing):
        self.standing = standing

    def __enter__(self):
        training_began()
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            self.__exit__()
            # An exception, not the default action: the unwinding removes a half-written
            # checkpoint's temporary file and releases the run folder's lock.
            raise RunStopped(f'stopped at once by {signal.Signals(signum).name}, a second signal: the '
                             f'current step was abandoned; {self.standing()}', exit_code=128 + signum)
        self.signum = signum

    def requested(self, step=None):
        """Whether to stop after this step. Under torchrun every rank must stop after the same
        step, so they agree on it; that costs a host sync, so only every 10th step asks."""
        if not distributed.active():
            return self.signum is not None
        return (step is None or step % 10 == 0) and distributed.any_rank(self.signum is not None)

    def name(self):
        return signal.Signals(self.signum).name if self.signum else 'a signal on another rank'

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFiniteWatch:
    """Remembers, on the device, the first step at which a loss term was not finite and which
    terms those were; reading it back (`check`) is the only host sync."""

    def __init__(self, device):
        self.first = torch.tensor(-1, device=device)
        self.finite, self.names = None, []

    def update(self, step, terms):
        finite = torch.stack([t.detach().isfinite().all() for t in terms.values()])
        if self.finite is None:
            self.names, self.finite = list(terms), torch.ones_like(finite)
        new = (self.first < 0) & ~finite.all()
        self.first = torch.where(new, step, self.first)
        self.finite = torch.where(new, finite, self.finite)

    def check(self, epoch_length, last_checkpoint):
        if self.finite is None:
            return
        # Under torchrun every process must stop at the same point, or the others would wait in
        # their next collective until it times out.
        first, finite = distributed.first_failure(self.first, self.finite)
        first = int(first)
        if first < 0:
            return
        bad = [n for n, ok in zip(self.names, finite.tolist()) if not ok]
        epoch, step = (first - 1) // epoch_length + 1, (first - 1) % epoch_length + 1
        go_on = (f'the last good checkpoint is {last_checkpoint}; lower --lr (or the loss weights) and resume from it'
                 if last_checkpoint else 'no checkpoint was written yet; lower --lr (or the loss weights) and start '
                                         'the run again')
        raise RunStopped(f'training diverged at epoch {epoch}, step {step}: loss term '
                         f'{", ".join(bad)} is not finite; {go_on}', exit_code=1)


WRITE_FAILED = 74  # EX_IOERR of sysexits.h: a checkpoint or log line could not be written


def resume_flags(opt):
    """How to go on: the run's (or cohort's) folder holds every option it trains with."""
    return f'--resume {opt.save}'


def standing_checkpoints(opt, members):
    """What a run stopped at once can go on from, for the one line it ends with."""
    if opt.cohort:
        return f'each member\'s last written checkpoint stands: resume with {resume_flags(opt)}'
    m = members[0]
    if m.saved is None:
        return f'no checkpoint was written to {m.opt.save}: start the run again'
    return f'the last checkpoint, {m.checkpoint} ({m.saved}), stands: resume with {resume_flags(opt)}'


def write_failure(error, m, opt):
    """The line a run ends with when its disk refuses a checkpoint or log line."""
    if m.saved is None:
        kept = f'no checkpoint was written to {m.opt.save} yet; free space and start the run again'
    elif error.path == m.checkpoint:
        kept = (f'the last good checkpoint {m.checkpoint} ({m.saved}) and its log line are intact; free '
                f'space and resume with {resume_flags(opt)}')
    else:
        kept = (f'the checkpoint {m.checkpoint} ({m.saved}) holds this epoch\'s line and resuming '
                f'writes it; free space and resume with {resume_flags(opt)}')
    return f'{m.name}: {error}; {kept}' if opt.cohort else f'{error}; {kept}'
