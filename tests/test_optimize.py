"""`evit-deploy optimize`: every candidate this machine runs, judged by the gates and timed; the
fastest that passes is written as a deployment folder that every loader accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import evit_deploy
from conftest import assert_one_line_error, run_cli
from evit_deploy.bench import optimize as optimize_module
from evit_deploy.bench.optimize import NothingPassed, optimize, plan_candidates
from evit_deploy.data.shapes import write_dataset
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.validate import GATES, Gates
from evit_deploy.metadata import read_onnx_metadata
from evit_deploy.runtime import Predictor
from evit_deploy.runtime.cpu_features import probe_cpu
from evit_deploy.runtime.deployment import DEPLOYMENT_FILE, read_deployment, resolve_artifact

SHIPPED = Path(evit_deploy.__file__).parent / "assets" / "shapes" / "shapes_evit_tiny.safetensors"
IMPOSSIBLE = Gates("any", min_top1_agreement=1.01)


def test_candidates_say_why_this_machine_skips_them():
    everything = plan_candidates(calibration=True, bf16_problem=None, openvino=True, nncf=True, cuda=True)
    assert [c.skipped for c in everything] == [""] * len(everything)
    names = [c.name for c in everything]
    assert names[:3] == ["ONNX Runtime FP32", "OpenVINO FP32", "OpenVINO BF16"]
    assert {"ONNX Runtime INT8 (static)", "OpenVINO INT8 (nncf)", "ONNX Runtime CUDA FP16"} <= set(names)
    # the calibrated INT8 files also with their float parts in BF16 (the dynamic one's multiplies
    # run in FP32 on OpenVINO, so it gains nothing there)
    mixed = {c.name: c for c in everything if c.precision == "int8+bf16"}
    assert sorted(mixed) == ["OpenVINO INT8 (nncf) + BF16", "OpenVINO INT8 (static) + BF16"]
    assert all(c.backend == "openvino" and c.options == {"precision": "bf16"} and c.method for c in mixed.values())
    bare = {c.name: c.skipped for c in plan_candidates(False, "no AVX-512 BF16 or AMX", False, False, False)}
    assert bare["ONNX Runtime FP32"] == "" and bare["ONNX Runtime INT8 (dynamic)"] == ""
    assert "OpenVINO is not installed" in bare["OpenVINO FP32"]
    assert "--calibration" in bare["ONNX Runtime INT8 (static)"] and "--calibration" in bare["OpenVINO INT8 (nncf)"]
    assert "no CUDA GPU" in bare["ONNX Runtime CUDA FP32"]
    no_bf16 = {c.name: c.skipped for c in plan_candidates(False, "no AVX-512 BF16 or AMX", True, True, False)}
    assert no_bf16["OpenVINO BF16"] == "no AVX-512 BF16 or AMX" and no_bf16["OpenVINO FP32"] == ""
    assert no_bf16["OpenVINO INT8 (dynamic)"] == "" and "--calibration" in no_bf16["OpenVINO INT8 (nncf) + BF16"]
    calibrated = {c.name: c.skipped for c in plan_candidates(True, "no AVX-512 BF16 or AMX", True, True, False)}
    assert calibrated["OpenVINO INT8 (nncf)"] == "" and calibrated["OpenVINO INT8 (nncf) + BF16"] == "no AVX-512 BF16 or AMX"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("optimize") / "held_out", 64, seed=31)


@pytest.fixture(scope="module")
def shipped_onnx(tmp_path_factory):
    """The shipped model's FP32 export, for the tests that need not export it again (`deployed`
    starts from the checkpoint itself)."""
    from evit_deploy.export import export_onnx
    from evit_deploy.model import load_model

    return export_onnx(load_model(SHIPPED), tmp_path_factory.mktemp("fp32") / "shapes.onnx").path


@pytest.fixture(scope="module")
def deployed(held_out, tmp_path_factory):
    """The shipped model optimized on this machine (short timing: the choice, not the speed, is
    tested here)."""
    output = tmp_path_factory.mktemp("deployed") / "deployment"
    steps = []
    result = optimize(SHIPPED, held_out, output, min_seconds=0.05, on_step=lambda text, total=None: steps.append((text, total)))
    return result, output, steps


def test_the_fastest_passing_candidate_is_written_with_its_record(deployed):
    result, output, steps = deployed
    chosen = result.chosen
    tried = [c for c in result.candidates if not c.skipped]
    assert chosen.passed and chosen.evit_ms == min(c.evit_ms for c in tried if c.passed)
    assert all(c.evit_ms and c.plain_ms and c.report for c in tried)
    assert result.reference_ms > 0
    assert any(text.startswith("judging") and total == 64 for text, total in steps)  # counted: the held-out images
    assert sorted(p.name for p in output.iterdir()) == sorted([DEPLOYMENT_FILE, chosen.artifact.name])
    record = json.loads((output / DEPLOYMENT_FILE).read_text())
    assert record["backend"] == chosen.backend and record["precision"] == chosen.precision
    assert record["gates"]["min_first_overlap"] == 0.99 and record["machine"] == result.machine
    assert record["measured"]["passed"] and record["measured"]["p50_ms"] == chosen.evit_ms
    meta = read_onnx_metadata(chosen.artifact)
    assert meta.validation["passed"] and meta.validation["precision"] == chosen.precision
    # the INT8 dynamic quantization passes the new gates on the shipped model
    dynamic = next(c for c in tried if c.name == "ONNX Runtime INT8 (dynamic)")
    assert dynamic.passed, dynamic.report.failure_summary()


def test_every_loader_runs_the_folder_as_recorded(deployed, held_out, tmp_path):
    result, output, _ = deployed
    chosen = result.chosen
    with Predictor(output) as predictor:
        assert predictor.backend.name == chosen.backend and predictor.backend.precision == chosen.precision
        top = predictor.predict(sorted(held_out.rglob("*.png"))[:2], topk=1)
        assert len(top) == 2
    path, backend, options = resolve_artifact(output, "auto", {})
    assert path == output / chosen.artifact.name and backend == chosen.backend and options == chosen.options
    # options given explicitly win; another backend drops the recorded ones
    assert resolve_artifact(output, "onnxruntime", {"threads": 1})[1:] == ("onnxruntime", {"threads": 1})
    proc = run_cli("predict", output, sorted(held_out.rglob("*.png"))[0], "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("eval", output, held_out, "--limit", 16, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout), proc.stderr
    proc = run_cli("bench", output, "--batch", 2, "--iters", 3, "--warmup", 1, "--json")
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)["runs"]
    assert runs[0]["backend"] == chosen.backend and runs[0]["precision"] == chosen.precision
    proc = run_cli("triton-repo", output, "-o", tmp_path / "repo")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "repo" / "evit" / "config.pbtxt").is_file()


def test_serve_runs_the_folder_as_recorded(deployed, held_out):
    """serve on a deployment folder: the recorded backend and precision behind Triton, answering
    as the Predictor on the same folder does."""
    pytest.importorskip("pytriton")
    from test_serve import SERVER_TIMEOUT, connect, port_options

    from evit_deploy.serve import EvitServer

    result, output, _ = deployed
    image = sorted(held_out.rglob("*.png"))[0]
    server = EvitServer(output, port_options(max_batch=8))
    server.start(ready_timeout_s=SERVER_TIMEOUT)
    try:
        backend = server.predictors[0].backend
        assert backend.name == result.chosen.backend and backend.precision == result.chosen.precision
        served = connect(server).predict_image(image, topk=1)
    finally:
        server.stop()
    with Predictor(output) as predictor:
        local = predictor.predict([image], topk=1)[0]
    assert served["class_ids"] == local.class_ids


@pytest.mark.skipif(not probe_cpu().bf16, reason="this CPU has no native BF16")
def test_int8_with_bf16_float_parts_is_judged_and_deployed_as_it_runs(shipped_onnx, held_out, tmp_path, monkeypatch):
    """The INT8 (nncf) file run with its float parts in BF16: judged by the INT8 gates' numbers
    as OpenVINO runs it (score path FP32), and deployed with the option that makes it so."""
    pytest.importorskip("nncf")
    plan = [c for c in plan_candidates(True, None, True, True, False) if c.name == "OpenVINO INT8 (nncf) + BF16"]
    monkeypatch.setattr(optimize_module, "this_machine_candidates", lambda calibration: plan)
    calibration = write_dataset(tmp_path / "calibration", 16, seed=7)
    result = optimize(shipped_onnx, held_out, tmp_path / "out", calibration=calibration, min_seconds=0.05)
    chosen = result.chosen
    assert chosen is plan[0] and chosen.passed, chosen.report.failure_summary()
    record = json.loads((tmp_path / "out" / DEPLOYMENT_FILE).read_text())
    assert record["precision"] == "int8+bf16" and record["options"] == {"precision": "bf16"}
    assert record["gates"] == {**GATES["int8"].to_dict(), "precision": "int8+bf16"}
    assert read_onnx_metadata(chosen.artifact).precision == "int8"
    with Predictor(tmp_path / "out") as predictor:
        assert predictor.backend.precision == "int8+bf16"
        assert set(predictor.backend.score_path_precisions().values()) == {"f32"}


def test_nothing_is_written_when_no_candidate_passes(shipped_onnx, held_out, tmp_path, monkeypatch):
    monkeypatch.setattr(optimize_module, "gates_for", lambda precision: IMPOSSIBLE)
    monkeypatch.setattr(optimize_module, "this_machine_candidates",
                        lambda calibration: plan_candidates(False, "off", False, False, False)[:1])
    with pytest.raises(NothingPassed, match="no candidate passed the precision gates") as info:
        optimize(shipped_onnx, held_out, tmp_path / "out", min_seconds=0.05)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert [c.passed for c in info.value.result.candidates] == [False]


def test_usage_errors_before_any_work(held_out, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists; pass --force"):
        optimize(SHIPPED, held_out, tmp_path / "taken")
    with pytest.raises(EvitDeployError, match="image folder not found"):
        optimize(SHIPPED, tmp_path / "missing", tmp_path / "out")
    proc = run_cli("optimize", SHIPPED, "--validate-dir", tmp_path / "missing", "-o", tmp_path / "out")
    assert_one_line_error(proc, 1, "image folder not found")


def test_a_damaged_or_foreign_deployment_is_one_clear_error(deployed, tmp_path):
    _, output, _ = deployed
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / DEPLOYMENT_FILE).write_text("{not json")
    with pytest.raises(EvitDeployError, match="cannot read .*deployment.json"):
        Predictor(broken)
    record = json.loads((output / DEPLOYMENT_FILE).read_text())
    (broken / DEPLOYMENT_FILE).write_text(json.dumps({**record, "artifact": "../elsewhere.onnx"}))
    with pytest.raises(EvitDeployError, match="a file name inside the folder"):
        read_deployment(broken)
    (broken / DEPLOYMENT_FILE).write_text(json.dumps({**record, "machine": {"name": "Other CPU", "features": []}}))
    (broken / record["artifact"]).write_bytes((output / record["artifact"]).read_bytes())
    with pytest.warns(UserWarning, match="optimized on another CPU"):
        resolve_artifact(broken, "auto", {})
    images = np.zeros((1, 3, 224, 224), dtype=np.float32)
    with pytest.warns(UserWarning):
        assert Predictor(broken).logits(images).shape == (1, 8)
