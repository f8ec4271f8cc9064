"""Errors a user can cause (bad flags, missing files) and how the scripts report them."""
import functools
import os
import sys


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def reports_user_errors(main):
    """Wraps a script's main: a UserError becomes one line on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f'{os.path.basename(sys.argv[0])}: error: {e}', file=sys.stderr)
            sys.exit(2)
    return wrapper
