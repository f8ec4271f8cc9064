"""Why a run stops early, and how it stops without losing anything: on SIGTERM/SIGINT it
finishes the current step, writes a checkpoint and exits; on a non-finite loss it exits
before writing one, so the last good checkpoint stays."""
import signal

import torch

import distributed
from errors import RunStopped


class SignalStop:
    """Within `with`, SIGTERM and SIGINT only set a flag that the loop reads after each step.
    A second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            self.__exit__()
            signal.raise_signal(signum)
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
        kept = f'the last good checkpoint is {last_checkpoint}' if last_checkpoint else 'no checkpoint was written yet'
        raise RunStopped(f'training diverged at epoch {epoch}, step {step}: loss term '
                         f'{", ".join(bad)} is not finite; {kept}; lower --lr (or the loss weights) '
                         f'and resume from it', exit_code=1)
