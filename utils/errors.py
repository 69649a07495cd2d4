"""One-line user errors for every command-line entry point.

Anything the user can fix (bad file, wrong checkpoint, missing weights) raises `UserError` with a message
that names the file and the problem. Entry points wrap their body in `exit_on_user_error`, which sets up
logging (`utils.logs.setup_logging`: INFO lines on stderr from rank zero) and turns a `UserError` into
`error: <message>` on one line and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import functools
import sys

from utils.logs import setup_logging


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def exit_on_user_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            message = " ".join(str(err).split())  # force one line
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
