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
