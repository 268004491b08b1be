"""User mistakes end as one ``error: ...`` paragraph and exit status 2; bugs keep their traceback.

A *user error* is anything the user can fix: :class:`UserError`, or a ``ValueError`` / ``OSError``
(missing file, no permission, ...) raised by this project's own code, whose messages name the
file or option and the fix. The same exception types raised inside a library, and every other
exception, are internal errors and show their traceback. ``CSS_DEBUG=1`` shows the traceback of
everything.

    if __name__ == "__main__":
        sys.exit(run_cli(main))
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake the user can fix; the message says what, where and how."""


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every command line here: an argument error prints the short usage line and
    the message (exit status 2), not the whole usage block."""

    def error(self, message):
        prog = self.prog
        self.exit(EXIT_USER_ERROR, f"usage: {prog} [options]   (--help lists them)\n{prog}: error: {message}\n")


def _raised_by_project(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return True
    path = os.path.abspath(frames[-1].filename)
    return path.startswith(REPO_ROOT + os.sep) and os.sep + ".venv" + os.sep not in path


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, UserError):
        return True
    if isinstance(error, (ValueError, OSError)):
        return _raised_by_project(error)
    return False


def distributed_timeout_message(error: BaseException):
    """The ``error:`` text of a collective that timed out or lost a peer, or None."""
    text = str(error)
    markers = ("timed out", "Timed out", "timeout", "Connection closed by peer", "Connection reset by peer")
    if not any(m in text for m in markers):
        return None
    from utils import distributed as dist_utils

    if dist_utils.get_world_size() <= 1 and "RANK" not in os.environ:
        return None
    rank = os.environ.get("RANK", "?")
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"rank {rank}: another process did not answer a collective operation within "
            f"CSS_DIST_TIMEOUT={os.environ.get('CSS_DIST_TIMEOUT', '600')} s ({first_line}). One rank "
            f"stopped or crashed: read its own output above; raise CSS_DIST_TIMEOUT (seconds) if a rank "
            f"legitimately needs longer (e.g. a long first data scan)")


def report(error: BaseException, stream=None) -> int:
    """Print ``error: <message>`` for a user error (returns 2); re-raise anything else."""
    stream = stream or sys.stderr
    message = None
    if os.environ.get("CSS_DEBUG") != "1":
        if is_user_error(error):
            message = str(error) or type(error).__name__
            if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
                message = f"{message}: {error.filename}"
        elif isinstance(error, RuntimeError):
            message = distributed_timeout_message(error)
    if message is None:
        raise error
    print(f"error: {message}", file=stream, flush=True)
    return EXIT_USER_ERROR


def run_cli(main, *args, **kwargs) -> int:
    """Call ``main``; a user error becomes ``error: ...`` and exit status 2."""
    try:
        main(*args, **kwargs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - report() re-raises what is not the user's
        return report(error)
    return 0
