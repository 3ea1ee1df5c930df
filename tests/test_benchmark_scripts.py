"""The scripts in benchmarks/ (benchmarks/records.py): a record goes under build/ unless --output
names another file, an existing one is replaced only with --force, and a script that times warns
when the machine is busy."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def records_module():
    spec = importlib.util.spec_from_file_location("records", BENCHMARKS / "records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda path: path.name)
def test_every_script_records_and_times_the_shared_way(script):
    text = script.read_text(encoding="utf-8")
    if "results_" in text:  # it keeps a record (benchmarks/results_*.json)
        assert "output_options(parser" in text and "write_record(args" in text
    if "interleaved" in text:  # it times
        assert "warn_if_busy()" in text


def test_a_record_goes_under_build_and_replaces_one_only_with_force(tmp_path, capsys, monkeypatch):
    records = records_module()
    parser = argparse.ArgumentParser()
    records.output_options(parser, "results_cpu.json")
    assert parser.parse_args([]).output == Path("build/results_cpu.json")
    existing = tmp_path / "results_cpu.json"
    existing.write_text("{}\n")
    with pytest.raises(SystemExit, match=f"error: {existing} already exists; pass --force"):
        records.check_output(parser.parse_args(["--output", str(existing)]))
    replace = parser.parse_args(["--output", str(existing), "--force"])
    records.check_output(replace)
    records.write_record(replace, {"rows": []})
    assert existing.read_text() == '{\n  "rows": []\n}\n'

    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
    records.warn_if_busy()
    assert "warning: the machine is busy" in capsys.readouterr().out


def test_training_cut_off_and_resumed_ends_where_an_unbroken_run_does(tmp_path):
    """benchmarks/train_shapes.py survives a restart: a run stopped after 4 of 6 steps (with a log
    line the cut-off run wrote after its last checkpoint) and resumed gives the same weights, bit
    for bit, and the same log as a run that was never stopped."""
    from safetensors.torch import load_file

    recipe = ["--phases", "48:6", "--batch", "4", "--warmup-steps", "2", "--keep-warmup-steps", "0",
              "--keep-shrink-steps", "0", "--threads", "1", "--name", "tiny"]

    def train(folder: Path, *extra: str) -> str:
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / "train_shapes.py"), "--output", str(folder), *recipe, *extra],
            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def steps(folder: Path) -> list[int]:
        return [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]

    train(tmp_path / "unbroken")
    assert "stopped at step 4 of 6" in train(tmp_path / "cut", "--stop-after", "4")
    assert not (tmp_path / "cut" / "tiny.safetensors").exists()
    with (tmp_path / "cut" / "log.jsonl").open("a") as log:
        log.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    train(tmp_path / "cut", "--resume")

    assert steps(tmp_path / "cut") == steps(tmp_path / "unbroken") == [6]
    unbroken, resumed = (load_file(tmp_path / name / "tiny.safetensors") for name in ("unbroken", "cut"))
    assert unbroken.keys() == resumed.keys()
    assert all(torch.equal(unbroken[key], resumed[key]) for key in unbroken)
