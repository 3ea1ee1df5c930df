"""Errors a user can cause. The CLI prints them as one line and exits non-zero, no traceback."""

from __future__ import annotations


class EvitDeployError(Exception):
    """A runtime failure the user can act on (bad file, failed validation): exit code 1."""

    exit_code = 1


class UsageError(EvitDeployError):
    """A bad argument or option value: exit code 2, like a CLI usage error."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type where it has none): libraries' messages
    run to tracebacks and dumps, a user gets one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
