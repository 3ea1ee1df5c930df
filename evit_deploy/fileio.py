"""Atomic outputs: a file appears complete under its name or not at all.

Everything is written to a hidden temp file in the destination folder (same file system, so the
final os.replace is atomic), flushed to disk, then renamed. Any exception, Ctrl-C included (and
SIGTERM, which the CLI turns into KeyboardInterrupt), removes the temp file and leaves whatever
was there before untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evit_deploy.errors import UsageError


def check_can_write(path: str | Path, force: bool) -> Path:
    """Refuse early (before any expensive work) to replace an existing file without --force."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to replace it")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file path")
    return path


@contextmanager
def atomic_output(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path` atomically."""
    path = check_can_write(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if path.exists() and not force:  # appeared while we worked
            raise UsageError(f"{path} already exists; pass --force to replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes, force: bool = False) -> Path:
    with atomic_output(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)
