"""The openvino backend: chosen where a backend is chosen, the same logits as ONNX Runtime in FP32,
BF16 only where the CPU has it, and the TopK score path kept in FP32 inside a BF16 model (an INT8
model's float parts in BF16 too)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_one_line_error, config_for, natural_images, random_images, run_cli
from evit_deploy.errors import UsageError
from evit_deploy.export.score_path import score_path_nodes
from evit_deploy.runtime.openvino_backend import openvino_runner
from evit_deploy.runtime import Predictor, load_backend
from evit_deploy.runtime.cpu_features import FEATURES, CpuFeatures, probe_cpu

ov = pytest.importorskip("openvino", reason="needs OpenVINO (the openvino extra)")
from evit_deploy.runtime.openvino_backend import OpenVINOBackend  # noqa: E402

HAS_BF16 = probe_cpu().bf16
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native BF16")


@pytest.fixture(scope="module")
def onnx_file(onnx_export):
    return onnx_export(config_for()).path


@pytest.fixture(scope="module")
def batch():
    return np.concatenate([random_images(2, seed=4), natural_images(2)])


def test_backend_selection(onnx_file, tmp_path):
    assert load_backend(onnx_file).name == "onnxruntime"  # auto: .onnx stays on ONNX Runtime
    backend = load_backend(onnx_file, "openvino", "cpu", threads=1)
    assert isinstance(backend, OpenVINOBackend) and backend.precision == "fp32"
    assert backend.describe()["backend"] == "openvino"
    # fp32 is every backend's own precision: accepted and dropped for the others
    assert load_backend(onnx_file, "onnxruntime", precision="fp32").name == "onnxruntime"
    errors = [
        (dict(backend="onnxruntime", precision="bf16"), "OpenVINO setting"),
        (dict(backend="openvino", precision="fp16"), "OpenVINO takes precision fp32 or bf16, got .fp16."),
        (dict(backend="openvino", device="cuda"), "runs on the CPU"),
        (dict(backend="openvino", providers=["cpu"]), "does not take providers"),
        (dict(backend="openvino", threads=0), "threads must be positive"),
        (dict(backend="openvinox"), "unknown backend"),
    ]
    for kwargs, fragment in errors:
        with pytest.raises(UsageError, match=fragment):
            load_backend(onnx_file, **kwargs)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"runs \.onnx or OpenVINO IR"):
        load_backend(plan, "openvino")


def test_fp32_logits_match_onnx_runtime(onnx_file, batch):
    reference = Predictor(onnx_file, "onnxruntime", "cpu").logits(batch)
    got = Predictor(onnx_file, "openvino", threads=2).logits(batch)
    assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()
    assert (got.argmax(1) == reference.argmax(1)).all()


def test_bf16_refused_without_native_support(onnx_file, monkeypatch):
    old = CpuFeatures("Intel Xeon Gold 6148", {**dict.fromkeys(FEATURES, False), "AVX2": True, "AVX-512F": True}, ["FP32", "INT8"])
    monkeypatch.setattr("evit_deploy.runtime.cpu_features.probe_cpu", lambda **kwargs: old)
    with pytest.raises(UsageError) as info:
        load_backend(onnx_file, "openvino", precision="bf16")
    message = str(info.value)
    assert "\n" not in message and "Gold 6148" in message and "--precision fp32" in message


@needs_bf16
def test_bf16_keeps_the_score_path_in_fp32(onnx_file):
    import onnx

    nodes = set(score_path_nodes(onnx.load(str(onnx_file), load_external_data=False)))
    pinned = OpenVINOBackend(onnx_file, precision="bf16")
    precisions = pinned.score_path_precisions()
    # every TopK, softmax and Q.K^T MatMul of the drop blocks ran in FP32
    topk = [n for n in nodes if "topk" in n]
    assert len(topk) == 3 and all(precisions[n] == "f32" for n in topk)
    assert set(precisions.values()) == {"f32"}, precisions
    assert sum("softmax" in n for n in precisions) == 3 and sum("matmul" in n for n in precisions) == 3
    plain = OpenVINOBackend(onnx_file, precision="bf16", fp32_topk_scores=False)
    assert "bf16" in set(plain.score_path_precisions().values())
    assert pinned.describe()["fp32_topk_scores"] and not plain.describe()["fp32_topk_scores"]


@needs_bf16
@pytest.mark.parametrize("fp32_topk_scores", [True, False])
def test_validation_runner_runs_what_the_backend_runs(onnx_file, batch, fp32_topk_scores):
    """Exposing the TopK indices as outputs must not change any node's precision (the CPU plugin
    keeps nodes that feed an output in FP32), or BF16 would be judged on another model."""
    runner = openvino_runner(onnx_file, "bf16", fp32_topk_scores)
    deployed = OpenVINOBackend(onnx_file, precision="bf16", fp32_topk_scores=fp32_topk_scores).run(batch)
    outputs = runner(batch)
    assert np.array_equal(outputs.logits, deployed)
    k = Predictor(onnx_file).metadata.topk_k
    assert [i.shape for i in outputs.indices] == [(4, size) for size in k]


@pytest.fixture(scope="module")
def int8_file(onnx_file, tmp_path_factory):
    """The test model quantized statically (QDQ, ranges from seeded noise: only the structure is
    judged here), its score path and fused token left in float as quantize leaves them."""
    from dataclasses import replace

    import onnx

    from evit_deploy.export.quantize import quantize_graph
    from evit_deploy.export.score_path import fused_token_nodes
    from evit_deploy.metadata import onnx_metadata, stamp_metadata

    model = onnx.load(str(onnx_file))
    meta = onnx_metadata(model, onnx_file)
    exclude = score_path_nodes(model) + fused_token_nodes(model)
    quantized, _ = quantize_graph(model, "static", meta, lambda: iter([random_images(2, seed=9)]), exclude)
    stamp_metadata(quantized, replace(meta, precision="int8"))
    path = tmp_path_factory.mktemp("int8") / "static.int8.onnx"
    onnx.save(quantized, str(path))
    return path


def layer_precisions(backend: OpenVINOBackend) -> dict[str, set[str]]:
    """Compiled layer type -> the precisions its nodes run in."""
    found: dict[str, set[str]] = {}
    for op in backend.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        found.setdefault(info["layerType"].astype(str), set()).add(info["runtimePrecision"].astype(str))
    return found


@needs_bf16
def test_int8_float_parts_run_in_bf16_when_asked(int8_file):
    """An INT8 file's multiplies run in INT8 under either hint; the hint decides the float parts
    (layer norms above all): FP32 by default, BF16 with --precision bf16, the score path still
    pinned to FP32."""
    default = OpenVINOBackend(int8_file)
    mixed = OpenVINOBackend(int8_file, precision="bf16")
    assert default.precision == "int8" and mixed.precision == "int8+bf16"
    for backend in (default, mixed):
        assert layer_precisions(backend)["FullyConnected"] <= {"u8", "i8"}
    assert layer_precisions(default)["MVN"] == {"f32"} and layer_precisions(mixed)["MVN"] == {"bf16"}
    assert mixed.fp32_topk_scores and set(mixed.score_path_precisions().values()) == {"f32"}


def test_cli_predict_and_errors(onnx_file):
    from conftest import SAMPLE_IMAGE

    ort = run_cli("predict", onnx_file, SAMPLE_IMAGE, "--topk", "1", "--json")
    ovino = run_cli("predict", onnx_file, SAMPLE_IMAGE, "--topk", "1", "--json", "--backend", "openvino")
    assert ort.returncode == 0 and ovino.returncode == 0, ovino.stderr
    import json

    assert json.loads(ort.stdout)[0]["class_ids"] == json.loads(ovino.stdout)[0]["class_ids"]
    wrong = run_cli("predict", onnx_file, SAMPLE_IMAGE, "--precision", "bf16")
    assert_one_line_error(wrong, 2, "--precision bf16 is an OpenVINO setting")


def test_bench_shows_precision_and_both_speedups(onnx_file):
    from evit_deploy.cli.render import bench_table
    from evit_deploy.bench.bench import REFERENCE, bench_artifact

    report = bench_artifact(onnx_file, [1], backend="openvino", iterations=1, warmup=0, threads=2)
    runs = [(r.keep_rate, r.backend, r.precision) for r in report.runs]
    # EViT and plain on OpenVINO, then the reference: plain FP32 on ONNX Runtime, interleaved
    assert runs == [(0.7, "openvino", "fp32"), (1.0, "openvino", "fp32"), (1.0, "onnxruntime", "fp32")]
    assert set(report.speedup) == {0.7} and set(report.speedup[0.7]) == {1}
    assert set(report.reference_speedup) == {0.7} and set(report.reference_speedup[0.7]) == {1}
    data = report.to_dict()
    assert data["reference"] == REFERENCE and data["reference_speedup"].keys() == {"0.7"}
    table = bench_table(report)
    assert [c.header for c in table.columns][2:4] == ["backend", "precision"]
    assert list(table.columns[1].cells) == ["0.7", "1.0", "1.0"]  # keep rates as the JSON writes them
