"""The scripts in benchmarks/ (benchmarks/records.py): a record goes under build/ unless --output
names another file, an existing one is replaced only with --force, and a script that times warns
when the machine is busy."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import pytest

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
