"""`evit-deploy quantize`: INT8 with the TopK score path left in float, validated against the FP32
file by export's machinery; a precision that misses a gate is one line and no file.

Random weights: top-1 agreement means little here, so the gate LOGIC is tested with a deliberately
broken quantization (the score path quantized too, activation ranges calibrated on black images)
that must fail the real INT8 gates, and a correct one whose numbers are reported under gates
loose enough to pass.
"""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import TINY, assert_one_line_error, config_for, fresh_model, run_cli
from evit_deploy.data.shapes import CLASSES, write_dataset
from evit_deploy.errors import UsageError
from evit_deploy.export import export_onnx
from evit_deploy.metadata import read_onnx_metadata
from evit_deploy.model.config import Preprocessing
from evit_deploy.export.quantize import calibration_set, quantize_onnx
from evit_deploy.export.validate import ValidationFailed
from evit_deploy.export.score_path import fused_token_nodes, score_path_nodes
from evit_deploy.export.validate import GATES, Gates
from evit_deploy.runtime import Predictor

# every number measured and reported, nothing gated
REPORTED = Gates("int8", min_top1_agreement=0.0, max_accuracy_drop=100.0, min_first_overlap=0.0, min_overlap=0.0,
                 max_recall_drop=100.0)


@pytest.fixture(scope="module")
def shapes_onnx(tmp_path_factory):
    """An 8-class deit_tiny EViT named with the shapes classes (so held-out accuracy is known),
    taking the images uncropped as the shapes model does (so object recall is measured)."""
    model = fresh_model(config_for(TINY, num_classes=len(CLASSES)), seed=5)
    model.classes = list(CLASSES)
    model.preprocessing = Preprocessing(crop_pct=1.0)
    path = tmp_path_factory.mktemp("int8") / "shapes_tiny.onnx"
    export_onnx(model, path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_data")
    write_dataset(root / "calibration", 8, seed=1)
    write_dataset(root / "held_out", 16, seed=2)
    black = root / "black"
    black.mkdir()
    for i in range(4):
        Image.new("RGB", (224, 224)).save(black / f"black{i}.png")
    return root


def test_score_path_found_by_structure_not_names(shapes_onnx):
    model = onnx.load(str(shapes_onnx))
    nodes = {node.name: node.op_type for node in model.graph.node}
    found = score_path_nodes(model)
    kinds = sorted(nodes[name] for name in found)
    assert kinds.count("TopK") == 3 and kinds.count("Softmax") == 3 and kinds.count("MatMul") == 3
    assert kinds.count("ReduceMean") == 3
    # renamed (and unnamed) nodes: the same nodes, by position
    renamed = onnx.load(str(shapes_onnx))
    order = {node.name: i for i, node in enumerate(renamed.graph.node)}
    for node in renamed.graph.node:
        node.name = "" if random.Random(node.name).random() < 0.3 else f"n{random.Random(node.name).random()}"
    again = score_path_nodes(renamed)
    assert sorted(order[name] for name in found) == sorted(
        i for i, node in enumerate(renamed.graph.node) if node.name in set(again)
    )
    assert all(node.name for node in renamed.graph.node)  # unnamed nodes got names


def test_fused_token_found_by_structure(shapes_onnx, onnx_export):
    """The fused token's MatMul reads the scores TopK ranks (through the scatter that zeroes the
    kept ones); without token fusion there is none."""
    model = onnx.load(str(shapes_onnx))
    nodes = {node.name: node for node in model.graph.node}
    found = fused_token_nodes(model)
    assert len(found) == 3 and all(nodes[name].op_type == "MatMul" for name in found)
    assert not set(found) & set(score_path_nodes(model))
    unfused = onnx.load(str(onnx_export(config_for(fuse_token=False)).path))
    assert fused_token_nodes(unfused) == [] and len(score_path_nodes(unfused)) >= 15


def test_nncf_leaves_scores_and_fused_token_in_float(shapes_onnx, folders, tmp_path):
    """NNCF's transformer preset would put Quantize/Dequantize pairs in front of the fused token's
    MatMul (rounding the scores and the dropped tokens to 8 bits), which OpenVINO runs in float
    anyway."""
    pytest.importorskip("nncf")
    out = tmp_path / "nncf.int8.onnx"
    result = quantize_onnx(
        shapes_onnx, out, method="nncf", calibration_dir=folders / "calibration",
        validate_dir=folders / "held_out", gates=REPORTED,
    )
    graph = onnx.load(str(out)).graph
    producers = {output: node for node in graph.node for output in node.output}
    nodes = {node.name: node for node in graph.node}
    fused_token = fused_token_nodes(onnx.load(str(shapes_onnx)))
    for name in fused_token:
        sources = [producers.get(i) for i in nodes[name].input]
        assert not any(s is not None and s.op_type == "DequantizeLinear" for s in sources), name
    assert set(fused_token) <= set(result.excluded)
    # the multiplies with weights are quantized
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) >= 48


def test_correct_int8_is_written_with_its_numbers_and_provenance(shapes_onnx, folders, tmp_path):
    out = tmp_path / "dynamic.int8.onnx"
    result = quantize_onnx(
        shapes_onnx, out, method="dynamic", validate_dir=folders / "held_out", gates=REPORTED
    )
    assert out.is_file() and result.report.passed
    held_out = result.report.cases[-1]
    assert held_out.name.startswith("held_out/") and held_out.batch == 16 and held_out.gated
    assert len(held_out.kept_identical) == 3 and held_out.accuracy is not None
    assert held_out.reference_accuracy is not None
    meta = read_onnx_metadata(out)
    assert meta.precision == "int8" and meta.classes == list(CLASSES)
    q = meta.quantization
    assert q["method"] == "dynamic" and q["calibration"] is None and q["weights"] == "int8 per channel"
    source = onnx.load(str(shapes_onnx))
    score_path, fused_token = score_path_nodes(source), fused_token_nodes(source)
    assert q["fp32_nodes"] == {"topk_score_path": len(score_path), "fused_token": 3} and len(score_path) >= 15
    assert result.excluded == score_path + fused_token
    assert meta.validation["passed"] and not meta.validation["accepted_failed_gates"]
    assert meta.validation["gates"] == REPORTED.to_dict() and meta.validation["held_out"]["images"] == 16
    # held-out shapes images list their objects: object recall is measured for both models
    assert len(held_out.object_recall) == 3 and len(held_out.reference_object_recall) == 3
    # the score path is still float: its nodes are there, none reads an INT8 tensor
    graph = onnx.load(str(out)).graph
    names = {node.name: node.op_type for node in graph.node}
    assert all(name in names for name in result.excluded)
    assert any(op in ("MatMulInteger", "DynamicQuantizeLinear") for op in names.values())
    # both CPU backends run it and report it as INT8
    predictor = Predictor(out, "onnxruntime", "cpu")
    assert predictor.backend.precision == "int8"
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    logits = predictor.logits(images)
    pytest.importorskip("openvino")
    on_openvino = Predictor(out, "openvino")
    assert on_openvino.backend.precision == "int8"
    assert on_openvino.logits(images).shape == logits.shape


def test_broken_int8_misses_the_gates_and_writes_nothing(shapes_onnx, folders, tmp_path):
    out = tmp_path / "broken.int8.onnx"
    with pytest.raises(ValidationFailed) as info:
        quantize_onnx(
            shapes_onnx, out, method="static", calibration_dir=folders / "black",
            validate_dir=folders / "held_out", exclude_score_path=False,
        )
    message = str(info.value)
    assert "\n" not in message and "nothing written" in message and "--accept-failed-gates" in message
    assert "kept-token overlap" in message or "top-1 agreement" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []
    held_out = info.value.report.cases[-1]
    assert not held_out.passed and held_out.gates == GATES["int8"]
    # written when the user explicitly accepts, and the metadata says so
    accepted = quantize_onnx(
        shapes_onnx, out, method="static", calibration_dir=folders / "black",
        validate_dir=folders / "held_out", exclude_score_path=False, accept_failed_gates=True,
    )
    meta = read_onnx_metadata(out)
    assert not accepted.report.passed and meta.validation["accepted_failed_gates"]
    assert meta.validation["missed"] and not meta.validation["passed"] and meta.gates_missed
    calibration = meta.quantization["calibration"]
    assert calibration["images"] == 4 and calibration["folder"].endswith("black")
    assert calibration["files_sha256"] == calibration_set(folders / "black").digest
    assert meta.quantization["fp32_nodes"] == {"topk_score_path": 0, "fused_token": 0}


def test_cli_one_line_when_a_gate_is_missed(shapes_onnx, folders, tmp_path):
    out = tmp_path / "cli.int8.onnx"
    proc = run_cli(
        "quantize", shapes_onnx, "--method", "dynamic", "--validate-dir", folders / "held_out", "-o", out,
        timeout=600,
    )
    if proc.returncode == 0:  # random weights passed the real gates: then its table was printed
        assert "pass" in proc.stdout and out.is_file()
        return
    line = assert_one_line_error(proc, 1, "int8 (dynamic) missed the precision gates, nothing written", after_stages=True)
    assert "--accept-failed-gates" in line
    assert "Validation: INT8 (dynamic) vs FP32" in proc.stdout and "FAIL" in proc.stdout
    assert not out.exists()


def test_usage_errors_before_any_work(shapes_onnx, folders, tmp_path):
    held_out = folders / "held_out"
    with pytest.raises(UsageError, match="--validate-dir"):
        quantize_onnx(shapes_onnx, tmp_path / "a.onnx", method="dynamic")
    with pytest.raises(UsageError, match="--calibration DIR"):
        quantize_onnx(shapes_onnx, tmp_path / "a.onnx", method="static", validate_dir=held_out)
    with pytest.raises(UsageError, match="--method must be one of"):
        quantize_onnx(shapes_onnx, tmp_path / "a.onnx", method="fp4", validate_dir=held_out)
    proc = run_cli("quantize", shapes_onnx, "--method", "static", "--validate-dir", held_out, "-o", tmp_path / "b.onnx")
    assert_one_line_error(proc, 2, "--calibration DIR")
    assert list(tmp_path.iterdir()) == []


def test_calibration_set_is_spread_and_digested(folders):
    full = calibration_set(folders / "held_out", None)
    part = calibration_set(folders / "held_out", 4)
    assert len(full.files) == 16 and len(part.files) == 4 and set(part.files) <= set(full.files)
    assert part.digest != full.digest and part.digest == calibration_set(folders / "held_out", 4).digest
    assert json.dumps(part.to_dict())


def with_external_weights(source, folder, location: str):
    """A copy of `source` whose largest initializer is stored in the file `location`, relative to
    the copy's folder."""
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(source))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / location).resolve().write_bytes(tensor.raw_data)
    set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_external_weights_beside_the_model_work_and_outside_its_folder_are_refused(shapes_onnx, folders, tmp_path):
    """Weights stored outside the model's folder (`../x.bin`) would read any file as weights: every
    loader refuses them in one line. Beside the model they load and quantize as inline ones do."""
    beside = with_external_weights(shapes_onnx, tmp_path / "beside", "weights.bin")
    images = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    np.testing.assert_allclose(Predictor(beside).logits(images), Predictor(shapes_onnx).logits(images), atol=1e-5)
    quantize_onnx(beside, tmp_path / "beside.int8.onnx", validate_dir=folders / "held_out", gates=REPORTED)
    outside = with_external_weights(shapes_onnx, tmp_path / "model", "../outside.bin")
    image = next((folders / "held_out").rglob("*.png"))
    commands = [["predict", outside, image], ["quantize", outside, "--validate-dir", folders / "held_out"]]
    if importlib.util.find_spec("openvino"):
        commands.append(["predict", outside, image, "--backend", "openvino"])
    for command in commands:
        assert_one_line_error(run_cli(*command), 1, "stored outside its folder (../outside.bin)")
    assert not (tmp_path / "model" / "model.int8.onnx").exists()
