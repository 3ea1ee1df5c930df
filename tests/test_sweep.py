"""bench --keep-rates: one backend, every keep rate timed, cached exports, JSON and a plot."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import BENCH_JSON_KEYS, TINY, config_for, random_images, random_model
from PIL import Image
from typer.testing import CliRunner

import evit_deploy.export.onnx
from evit_deploy.cli import app
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.runtime import Predictor
from evit_deploy.data.labels import imagenet_classes
from evit_deploy.bench.sweep import check_plotting, parse_keep_rates

runner = CliRunner()
FAST = ["--iters", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "tiny.pth"
    torch.save({"model": random_model(TINY, 0.7).state_dict()}, path)
    return path


def test_pytorch_sweep_writes_json_and_plot(checkpoint, tmp_path):
    data = tmp_path / "val"
    for wnid, _ in imagenet_classes()[:2]:
        (data / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 30, 30)).save(data / wnid / "a.png")
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    result = runner.invoke(
        app,
        [
            "bench",
            str(checkpoint),
            "--keep-rates",
            "1.0,0.5",
            "--batch",
            "1,2",
            *FAST,
            "--json-out",
            str(out),
            "--plot",
            str(plot),
            "--eval-dir",
            str(data),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == BENCH_JSON_KEYS  # one schema with the single bench's
    assert [v["keep_rate"] for v in report["variants"]] == [0.5, 1.0]
    assert set(report["speedup"]) == set(report["flops_ratio"]) == {"0.5"}
    assert set(report["speedup"]["0.5"]) == {"1", "2"} and report["flops_ratio"]["0.5"] > 1
    gmacs = [v["gmacs"] for v in report["variants"]]
    assert gmacs[0] < gmacs[1]
    assert sorted((r["keep_rate"], r["batch"]) for r in report["runs"]) == [
        (0.5, 1),
        (0.5, 2),
        (1.0, 1),
        (1.0, 2),
    ]
    assert all(r["backend"] == "pytorch" and r["throughput_ips"] > 0 for r in report["runs"])
    assert set(report["accuracy"]) == {"0.5", "1.0"}
    assert report["accuracy"]["0.5"]["images"] == 2
    picture = np.asarray(Image.open(plot).convert("RGB"))
    assert picture.shape == (840, 640, 3)  # three panels: throughput, GMACs, accuracy
    assert (picture < 128).any() and (picture == 255).any()


def test_onnx_sweep_exports_other_keep_rates_once_from_the_same_weights(
    onnx_export, cache_dir, tmp_path, monkeypatch
):
    source = onnx_export(config_for(TINY, 0.7), with_token_indices=True).path
    args = ["bench", str(source), "--keep-rates", "0.5,0.7", "--batch", "1", *FAST, "--json-out"]
    first = runner.invoke(app, [*args, str(tmp_path / "first.json")])
    assert first.exit_code == 0, first.output
    exports = list(cache_dir.rglob("*.onnx"))
    assert len(exports) == 1 and "keep0.5" in exports[0].name  # 0.7 is the source itself
    variants = json.loads((tmp_path / "first.json").read_text())["variants"]
    assert [v["artifact"] for v in variants] == [str(exports[0]), str(source)]
    # the export carries the source's recorded weights (random, seed 0): it matches PyTorch
    images = random_images(2)
    expected = random_model(TINY, 0.5)(torch.from_numpy(images)).numpy()
    got = Predictor(exports[0]).logits(images)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    def no_export(*args, **kwargs):
        raise AssertionError("re-exported instead of reusing the cached export")

    monkeypatch.setattr(evit_deploy.export.onnx, "export_onnx", no_export)
    second = runner.invoke(app, [*args, str(tmp_path / "second.json")])
    assert second.exit_code == 0, second.output
    runs = json.loads((tmp_path / "second.json").read_text())["runs"]
    assert [(r["backend"], r["keep_rate"]) for r in runs] == [
        ("onnxruntime", 0.5),
        ("onnxruntime", 0.7),
    ]


def test_sweep_requests_that_cannot_work(checkpoint, tmp_path):
    cases = [
        (["bench", str(checkpoint), "--plot", str(tmp_path / "p.png")], "go with --keep-rates"),
        (["bench", str(tmp_path / "model.plan"), "--keep-rates", "0.5"], "re-exports the model"),
        (["bench", str(checkpoint), "--keep-rates", "0.5,1.5"], "in (0, 1]"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
    assert not list(tmp_path.iterdir())


def test_keep_rates_parse_sorted_and_distinct():
    assert parse_keep_rates("1.0, 0.5,0.7,0.5") == [0.5, 0.7, 1.0]
    with pytest.raises(UsageError):
        parse_keep_rates("0.5,a")


def test_missing_matplotlib_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(EvitDeployError, match=r"pip install 'evit-deploy\[plot\]'"):
        check_plotting()


def test_sweep_accuracy_reads_folders_named_after_the_models_classes(tmp_path):
    """The shipped shapes EViT on class-named folders (not alphabetical class ids): its accuracy
    at each keep rate is what `eval` measures, far above the 0% a wrong folder mapping gives."""
    from pathlib import Path

    import evit_deploy
    from evit_deploy.data.shapes import write_dataset

    shipped = Path(evit_deploy.__file__).parent / "assets" / "shapes" / "shapes_evit_tiny.safetensors"
    data = write_dataset(tmp_path / "held", 16, seed=6)
    out = tmp_path / "sweep.json"
    result = runner.invoke(
        app, ["bench", str(shipped), "--keep-rates", "0.7,1.0", "--batch", "8", *FAST, "--eval-dir", str(data), "--json-out", str(out)]
    )
    assert result.exit_code == 0, result.output
    accuracy = json.loads(out.read_text())["accuracy"]
    assert set(accuracy) == {"0.7", "1.0"}
    assert all(a["images"] == 16 and a["top1"] >= 0.8 for a in accuracy.values()), accuracy
