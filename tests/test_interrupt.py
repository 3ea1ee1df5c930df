"""Interrupted writes: Ctrl-C or kill during an export, or in the middle of writing a file, leaves
the previous file byte-for-byte as it was and no temp file behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, cli_env

from evit_deploy.fileio import temp_path, write_bytes_atomic

PREVIOUS = b"the previous export, which must survive"
INTERRUPTED = "interrupted: no partial output was left behind"

# Writes the file given as argv[1] through atomic_output, slowly and forever: a write that is
# always in progress when the signal comes.
ENDLESS_WRITER = """
import sys, time
from evit_deploy.fileio import atomic_output
with atomic_output(sys.argv[1], force=True) as tmp, open(tmp, "wb") as handle:
    while True:
        handle.write(b"half-written " * 1000)
        handle.flush()
        time.sleep(0.01)
"""


def default_sigint() -> None:
    """Children of a shell's background job inherit SIGINT ignored (and Python then installs no
    KeyboardInterrupt handler); reset it, as a terminal's Ctrl-C would find it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def interrupt_cli(args: list[str], cwd: Path, started: str, pause: float, signum: int) -> str:
    """Run `evit-deploy ARGS`, send `signum` `pause` s after its first stderr line (which must
    start with `started`), and check it stopped as a stop must: exit 130, the one interrupted line
    last, no traceback. Returns the rest of its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evit_deploy", *args], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )
    try:
        first = proc.stderr.readline()
        assert first.startswith(started), first
        time.sleep(pause)
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in (first + rest).splitlines() if line.strip()]
    assert proc.returncode == 130, (proc.returncode, rest)
    assert lines[-1] == INTERRUPTED and "Traceback" not in rest, rest
    return rest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_export_keeps_the_previous_file(tmp_path, signum):
    previous = tmp_path / "model.onnx"
    previous.write_bytes(PREVIOUS)
    # Random weights: this warning comes once the model is built, as tracing starts; the trace,
    # simplification and validation that follow take seconds.
    rest = interrupt_cli(
        ["export", "--model", TINY, "-o", "model.onnx", "--force"], tmp_path, "warning: no checkpoint given",
        0.5, signum,
    )
    assert previous.read_bytes() == PREVIOUS
    left = [p.name for p in tmp_path.iterdir()]
    assert left == ["model.onnx"], (left, rest)


# Runs `evit-deploy plan ... --json-out plan.json --force` with a library inside it that catches the
# KeyboardInterrupt of a SIGTERM arriving while it works, as torch's lazy imports inside
# torch.export do, then either finishes its work or fails with an unrelated error (what
# torch.export then reported: "module 'torch._dynamo' has no attribute 'exc'").
SWALLOWING_LIBRARY = """
import signal, sys
import evit_deploy.analysis.planning as planning
from evit_deploy.cli import main
then = sys.argv[1]
real_fit_budget = planning.fit_budget
def swallowing_fit_budget(*args, **kwargs):
    try:
        signal.raise_signal(signal.SIGTERM)
    except KeyboardInterrupt:
        pass
    if then == "fails":
        raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")
    return real_fit_budget(*args, **kwargs)
planning.fit_budget = swallowing_fit_budget
sys.argv = ["evit-deploy", "plan", "deit_tiny_patch16_224", "--budget-gmacs", "1.3", "--json-out", "plan.json", "--force"]
main()
"""


@pytest.mark.parametrize("then", ["finishes", "fails"])
def test_a_stop_that_a_library_swallowed_still_stops(tmp_path, then):
    """The request is recorded before the KeyboardInterrupt is raised: whatever the library does
    next, the command exits 130 as interrupted and the previous output is untouched."""
    previous = tmp_path / "plan.json"
    previous.write_bytes(PREVIOUS)
    proc = subprocess.run(
        [sys.executable, "-c", SWALLOWING_LIBRARY, then], cwd=tmp_path, env=cli_env(),
        capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, proc.stderr
    assert lines == [INTERRUPTED], proc.stderr
    assert previous.read_bytes() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_atomic_output_never_renames_after_a_stop_was_requested(tmp_path, monkeypatch):
    """Library use: a recorded stop keeps the previous file even if the KeyboardInterrupt was
    caught inside the `with` block."""
    from evit_deploy import interrupt
    from evit_deploy.fileio import atomic_output

    monkeypatch.setattr(interrupt, "_requested", False)
    target = tmp_path / "model.onnx"
    target.write_bytes(PREVIOUS)
    with pytest.raises(KeyboardInterrupt), atomic_output(target, force=True) as tmp:
        tmp.write_bytes(b"the new export")
        try:
            interrupt.stop(signal.SIGTERM, None)
        except KeyboardInterrupt:
            pass
    assert target.read_bytes() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def start_endless_writer(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", ENDLESS_WRITER, str(path)], stderr=subprocess.DEVNULL,
        preexec_fn=default_sigint,
    )
    tmp = temp_path(path, proc.pid)
    wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0)
    return proc


def test_ctrl_c_mid_write_removes_the_temp_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(PREVIOUS)
    proc = start_endless_writer(target)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) != 0
    assert target.read_bytes() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_kill_mid_write_keeps_the_file_and_the_next_write_cleans_up(tmp_path):
    """SIGKILL allows no clean-up: the temp file stays until the next write to the same path."""
    target = tmp_path / "model.onnx"
    target.write_bytes(PREVIOUS)
    proc = start_endless_writer(target)
    proc.kill()
    proc.wait(timeout=30)
    assert target.read_bytes() == PREVIOUS
    assert temp_path(target, proc.pid).exists()

    write_bytes_atomic(target, b"the next export", force=True)
    assert target.read_bytes() == b"the next export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_quantize_keeps_the_previous_file(tmp_path, onnx_export, signum):
    """Ctrl-C (or kill) while quantize quantizes: exit 130, the previous INT8 file as it was,
    nothing else left in the folder (the quantizers' own temp folders included)."""
    from conftest import config_for

    from evit_deploy.data.shapes import write_dataset

    model = onnx_export(config_for()).path
    held_out = write_dataset(tmp_path / "held_out", 8, seed=2)
    previous = tmp_path / "model.int8.onnx"
    previous.write_bytes(PREVIOUS)
    rest = interrupt_cli(  # once its first stage line says quantizing has begun
        ["quantize", str(model), "--validate-dir", str(held_out), "-o", previous.name, "--force"], tmp_path,
        "quantizing (dynamic)", 0.3, signum,
    )
    assert previous.read_bytes() == PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held_out", "model.int8.onnx"], rest
