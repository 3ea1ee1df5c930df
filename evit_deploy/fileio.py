"""Atomic outputs: a file appears complete under its name or not at all.

Everything is written to a hidden temp file in the destination folder (same file system, so the
final os.replace is atomic), flushed to disk, then renamed. Any exception, Ctrl-C included (and
SIGTERM, which the CLI turns into KeyboardInterrupt), removes the temp file and leaves whatever
was there before untouched, also when a library swallowed the KeyboardInterrupt (interrupt.py).
A process killed outright (SIGKILL, power loss) cannot clean up: its temp file is removed by the
next write to the same path.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evit_deploy import interrupt
from evit_deploy.errors import EvitDeployError, UsageError


def check_can_write(path: str | Path, force: bool) -> Path:
    """Refuse early (before any expensive work) to replace an existing file without --force."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to replace it")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file path")
    folder = next(p for p in path.absolute().parents if p.exists())  # created on writing
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: {folder} is not a writable folder")
    return path


@contextmanager
def atomic_output(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path` atomically."""
    path = check_can_write(path, force)
    tmp = temp_path(path, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temps(path)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if path.exists() and not force:  # appeared while we worked
            raise UsageError(f"{path} already exists; pass --force to replace it")
        interrupt.check()  # a stop requested while we worked, even if a library swallowed it
        os.replace(tmp, path)
    except OSError as exc:  # read-only or full disk, permissions: nothing was replaced
        raise EvitDeployError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces `path` (what is there, a folder, a
    file or a link, only with `force`) by two renames, so `path` is never half-written."""
    path = Path(path)
    if occupied(path) and not force:
        raise UsageError(f"{path} already exists; pass --force to replace it")
    tmp = temp_path(path, os.getpid())
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_entry(tmp)
        tmp.mkdir()
        yield tmp
        interrupt.check()  # a stop requested while we worked, even if a library swallowed it
        if occupied(path):
            if not force:  # appeared while we worked
                raise UsageError(f"{path} already exists; pass --force to replace it")
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:  # read-only or full disk, a name too long: nothing was replaced
        raise EvitDeployError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        remove_entry(tmp)
        remove_entry(old)


def occupied(path: Path) -> bool:
    """Whether anything is at `path`: a folder, a file or a link, a dangling one too. A path the
    file system refuses (a name too long) is the one "cannot write" error."""
    try:
        path.lstat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise EvitDeployError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return True


def remove_entry(path: Path) -> None:
    """Remove what is at `path`, whatever it is: a folder, a file or a link (never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_path(path: Path, pid: int) -> Path:
    """Where process `pid` writes `path` before renaming it: hidden, in the same folder."""
    return path.with_name(f".{path.name}.tmp-{pid}")


def remove_orphaned_temps(path: Path) -> None:
    """Delete temp files for `path` left by processes that no longer run (killed outright)."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def write_bytes_atomic(path: str | Path, data: bytes, force: bool = False) -> Path:
    with atomic_output(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def cache_dir() -> Path:
    """$EVIT_DEPLOY_CACHE, else ~/.cache/evit-deploy (XDG_CACHE_HOME respected)."""
    root = os.environ.get("EVIT_DEPLOY_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "evit-deploy"
