"""Errors a user can cause. The CLI prints them as one line and exits non-zero, no traceback."""

from __future__ import annotations


class EvitDeployError(Exception):
    """A runtime failure the user can act on (bad file, failed validation): exit code 1."""

    exit_code = 1


class UsageError(EvitDeployError):
    """A bad argument or option value: exit code 2, like a CLI usage error."""

    exit_code = 2
