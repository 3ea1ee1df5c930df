"""Triton's processes, and the files a serve run leaves behind (Linux, read from /proc).

serve watches tritonserver and its Python backend stubs (one process per model instance) to see
at once when its backend dies. Each Triton start gets a run folder,
`<temp>/evit-serve-<pid>-<random>`, that holds Triton's workspace and a record (owner.json) of
what Triton creates outside it:

- its shared-memory regions, `/dev/shm/<prefix>*`;
- the copy of the model that Triton loads, `/tmp/folderXXXXXX`, whose config.pbtxt names the run
  folder's workspace (so it is found from the run folder, not recorded);
- the Python backend's `/tmp/python_env_XXXXXX`, which carries no owner: it is recorded when it
  appeared while this Triton started and no other tritonserver could have made it (Triton starts
  take `start_lock`; any tritonserver not recorded by a run folder makes the new folder ambiguous,
  and an ambiguous one is left alone).

`remove_run` deletes a run folder and those files. A run whose serve process is gone (killed with
SIGKILL) is removed by the next start (`remove_stale_runs`), unless its tritonserver still runs
(finishing its shutdown); stubs still running from it have outlived their tritonserver and are
killed. Nothing another live process owns is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TRITON_TMP = Path("/tmp")  # where Triton writes its model copies and python_env folders, whatever TMPDIR says
SHM = Path("/dev/shm")
RUN_PREFIX = "evit-serve-"
RECORD = "owner.json"
TRITON_NAME = "tritonserver"
STUB_NAME = "triton_python_b"  # triton_python_backend_stub, as /proc/<pid>/stat cuts it (15 characters)
_RUN_NAME = re.compile(rf"{RUN_PREFIX}(\d+)-[^/]+")
_PYTHON_ENV = re.compile(r"python_env_\w{6}")
_MODEL_COPY = re.compile(r"folder\w{6}")


@dataclass(frozen=True)
class ProcessStat:
    """The fields of /proc/<pid>/stat that serve uses."""

    name: str
    state: str  # R, S, D, ...; Z: dead but not yet reaped by its parent
    ppid: int
    start_ticks: int  # since boot: with the pid, names one process even when pids are reused
    exit_status: int  # waitpid(2) status, meaningful once the process is dead (Z)

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def process_stat(pid: int) -> ProcessStat | None:
    """None when there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    head, _, tail = text.rpartition(")")  # the name is in parentheses and may hold anything
    fields = tail.split()
    return ProcessStat(
        name=head.partition("(")[2],
        state=fields[0],
        ppid=int(fields[1]),
        start_ticks=int(fields[19]),
        exit_status=int(fields[49]) if len(fields) > 49 else 0,
    )


def running(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` runs (and is the one that started at `start_ticks`, when given)."""
    stat = process_stat(pid)
    return stat is not None and stat.running and start_ticks in (None, stat.start_ticks)


def processes(name: str, parent: int | None = None) -> dict[int, ProcessStat]:
    """Running processes called `name` (children of `parent`, when given)."""
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = process_stat(int(entry.name))
            if stat and stat.running and stat.name == name and parent in (None, stat.ppid):
                found[int(entry.name)] = stat
    return found


def describe_exit(status: int) -> str:
    """'was killed by SIGKILL' or 'exited with status 1', from a waitpid(2) status."""
    number = status & 0x7F
    if not number:
        return f"exited with status {status >> 8}"
    try:
        return f"was killed by {signal.Signals(number).name}"
    except ValueError:
        return f"was killed by signal {number}"


def executable(pid: int) -> Path | None:
    try:
        return Path(os.readlink(PROC / str(pid) / "exe"))
    except OSError:
        return None


# ------------------------------------------------------------------------------------------
# Run folders


@contextlib.contextmanager
def start_lock(folder: Path | None = None) -> Iterator[None]:
    """One Triton start at a time among serve processes of this user, so that a python_env folder
    appearing meanwhile is this start's (released when the process dies, however it dies)."""
    path = Path(folder or tempfile.gettempdir()) / "evit-serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def python_envs(tmp: Path = TRITON_TMP) -> set[str]:
    return {p.name for p in _entries(tmp) if _PYTHON_ENV.fullmatch(p.name)}


class RunFolder:
    """A folder for one Triton start, recording its owner (this process) from the moment it exists."""

    def __init__(self, root: Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=root)).resolve()
        me = process_stat(os.getpid())
        self.record: dict = {"pid": os.getpid(), "start_ticks": me.start_ticks if me else None}
        self.note()

    def note(self, **fields) -> None:
        """Add `fields` to the record, written atomically (a reader sees the old one or the new)."""
        self.record.update(fields)
        tmp = self.path / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path / RECORD)

    def note_triton(self, pid: int | None, shm_prefix: str, envs_before: set[str], tmp: Path = TRITON_TMP) -> None:
        """Record this run's tritonserver (None: it did not start), its shared-memory prefix, and
        the python_env folders that appeared since `envs_before` when no unrecorded tritonserver
        could have made them."""
        stat = process_stat(pid) if pid is not None else None
        new = sorted(python_envs(tmp) - envs_before)
        others = {p: s for p, s in processes(TRITON_NAME).items() if p != pid}
        ambiguous = any(not _recorded_triton(p, s) for p, s in others.items())
        self.note(
            triton=[pid, stat.start_ticks if stat else None],
            shm_prefix=shm_prefix,
            python_envs=[] if ambiguous else new,
        )

    def remove(self, tmp: Path = TRITON_TMP, shm: Path = SHM) -> None:
        remove_run(self.path, self.record, tmp, shm)


def read_record(folder: Path) -> dict:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _recorded_triton(pid: int, stat: ProcessStat) -> bool:
    """A tritonserver that a serve started (from its run folder) and recorded once it was ready."""
    exe = executable(pid)
    run = next((p for p in (exe.parents if exe else []) if _RUN_NAME.fullmatch(p.name)), None)
    return run is not None and read_record(run).get("triton") == [pid, stat.start_ticks]


def remove_run(folder: Path, record: dict, tmp: Path = TRITON_TMP, shm: Path = SHM) -> None:
    """Delete a run folder and what its Triton made outside it."""
    prefix = record.get("shm_prefix")
    if isinstance(prefix, str) and prefix:
        for region in _entries(shm):
            if region.name.startswith(prefix):
                region.unlink(missing_ok=True)
    workspace = f'"{folder / "workspace"}"'
    for copy in _entries(tmp):
        if _MODEL_COPY.fullmatch(copy.name) and _names_workspace(copy, workspace):
            shutil.rmtree(copy, ignore_errors=True)
    for name in record.get("python_envs", []):
        if isinstance(name, str) and _PYTHON_ENV.fullmatch(name):
            shutil.rmtree(tmp / name, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def remove_stale_runs(root: Path | None = None, tmp: Path = TRITON_TMP, shm: Path = SHM) -> list[Path]:
    """Remove the run folders (and their Triton files) of serve processes that no longer run;
    the folders removed."""
    removed = []
    for folder in _entries(Path(root or tempfile.gettempdir())):
        match = _RUN_NAME.fullmatch(folder.name)
        if not match or folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
            continue
        folder = folder.resolve()
        record = read_record(folder)
        if running(int(match[1]), record.get("start_ticks")):
            continue
        inside = running_from(folder)
        if any(stat.name == TRITON_NAME for stat in inside.values()):
            continue  # its tritonserver is still shutting down (SIGTERM when serve died)
        kill(inside)  # stubs that outlived their tritonserver
        remove_run(folder, record, tmp, shm)
        removed.append(folder)
    return removed


def running_from(folder: Path) -> dict[int, ProcessStat]:
    """Running processes whose executable is inside `folder`: a run's tritonserver and stubs."""
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            exe = executable(int(entry.name))
            stat = process_stat(int(entry.name)) if exe is not None and folder in exe.parents else None
            if stat is not None and stat.running:
                found[int(entry.name)] = stat
    return found


def kill(found: dict[int, ProcessStat]) -> None:
    """SIGKILL these processes, each only if it is still the one that was found."""
    for pid, stat in found.items():
        if running(pid, stat.start_ticks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _names_workspace(copy: Path, workspace: str) -> bool:
    try:
        return workspace in (copy / "config.pbtxt").read_text(errors="replace")
    except OSError:
        return False


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []
