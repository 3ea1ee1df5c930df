"""FP32 ONNX -> mixed-precision ONNX (evit_deploy.export.precision): the FP32 islands are found by
the graph's structure in exports from both PyTorch exporters, they really compute in FP32 (no FP16
edge inside them), everything else computes in FP16, the graph's I/O stays float32, and ONNX
Runtime's CPU provider runs the result with logits close to FP32's."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY, config_for, export_torchscript, fresh_model
from onnx import TensorProto, helper, numpy_helper

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.onnx import export_graph, simplify
from evit_deploy.export.precision import (
    DEFAULT_ISLANDS,
    convert_to_fp16,
    fp32_compute_nodes,
    fp32_islands_of,
    is_fp16_model,
    island_nodes,
    layernorm_nodes,
    model_precision,
)
from evit_deploy.export.score_path import topk_score_nodes
from evit_deploy.metadata import ArtifactMetadata

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
CONFIG = config_for(TINY, keep_rate=0.7, img_size=96)  # 36 patches: 3 drops, seconds to export
SCORE_PATH = ["MatMul", "Mul", "Softmax", "Gather", "Slice", "ReduceMean", "TopK"]


@pytest.fixture(scope="module")
def model():
    return fresh_model(CONFIG)


@pytest.fixture(scope="module")
def graphs(model) -> dict[str, onnx.ModelProto]:
    """The same model from both PyTorch exporters, as exported and as simplified by onnxslim."""
    traced = export_torchscript(model)
    dynamo = export_graph(model, 18, with_token_indices=True)
    return {
        "torchscript": traced,
        "torchscript-slim": simplify(traced),
        "dynamo": dynamo,
        "dynamo-slim": simplify(dynamo),
    }


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 3, 96, 96), dtype=np.float32)


def run(proto: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


def types_of(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        types[value.name] = value.type.tensor_type.elem_type
    return types


def float_types(node, types) -> set[int]:
    return {types[name] for name in [*node.input, *node.output] if name and types.get(name) in (FLOAT, FLOAT16)}


EXPORTS = ["torchscript", "torchscript-slim", "dynamo", "dynamo-slim"]


# ---------------------------------------------------------------------------------------------
# Finding the islands


@pytest.mark.parametrize("export", EXPORTS)
def test_score_paths_are_found_by_structure(graphs, export):
    proto = graphs[export]
    kinds = {n.name: n.op_type for n in proto.graph.node}
    chosen = topk_score_nodes(proto)
    assert len(chosen) == len(SCORE_PATH) * len(CONFIG.drop_loc)
    topks = [n.name for n in proto.graph.node if n.op_type == "TopK"]
    for number, topk in enumerate(topks):  # one path per TopK, in graph order
        path = chosen[number * len(SCORE_PATH) : (number + 1) * len(SCORE_PATH)]
        assert [kinds[name] for name in path] == SCORE_PATH and path[-1] == topk
    producers = {out: n for n in proto.graph.node for out in n.output}
    for matmul in (n for n in proto.graph.node if n.name in chosen and n.op_type == "MatMul"):
        # Q.K^T: both operands computed at run time (not the attention x V product, whose
        # first operand is the softmax, nor a projection with a weight)
        sources = [producers[name].op_type for name in matmul.input]
        assert "Softmax" not in sources and all(name in producers for name in matmul.input)
    # the same nodes whatever they are called: the walk never reads a name
    renamed = onnx.ModelProto()
    renamed.CopyFrom(proto)
    for index, node in enumerate(renamed.graph.node):
        node.name = f"n{len(renamed.graph.node) - index}"
    new_names = {old.name: new.name for old, new in zip(proto.graph.node, renamed.graph.node)}
    assert topk_score_nodes(renamed) == [new_names[name] for name in chosen]


def test_both_exporters_give_the_same_islands(graphs):
    def shape(proto):
        kinds = {n.name: n.op_type for n in proto.graph.node}
        return [kinds[name] for name in topk_score_nodes(proto)], len(layernorm_nodes(proto))

    shapes = {export: shape(graphs[export]) for export in EXPORTS}
    assert len(set(map(str, shapes.values()))) == 1, shapes
    assert shapes["dynamo"][1] == 2 * 12 + 1  # norm1 and norm2 of 12 blocks, the final norm


def test_no_softmax_no_island_and_unknown_islands():
    scores = helper.make_node("MatMul", ["x", "w"], ["s"], name="scores")
    topk = helper.make_node("TopK", ["s", "k"], ["v", "i"], name="topk")
    graph = helper.make_graph(
        [scores, topk], "g", [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
        [helper.make_tensor_value_info("v", FLOAT, [1, 2]), helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2])],
        [numpy_helper.from_array(np.ones((4, 8), np.float32), "w"), numpy_helper.from_array(np.array([2], np.int64), "k")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert topk_score_nodes(proto) == []
    with pytest.raises(UsageError, match="unknown FP32 island"):
        island_nodes(proto, ("softmax",))


def test_named_nodes_become_islands(graphs):
    """--fp32-layers names nodes by the module scopes the exporter records (kept through onnxslim),
    since the node names themselves are generated ('node_Softmax_62')."""
    proto = graphs["dynamo-slim"]
    found = island_nodes(proto, (), ["blocks.0.mlp.fc1", "*/blocks.11.norm2/*"])
    kinds = {n.name: n.op_type for n in proto.graph.node}
    assert [kinds[name] for name in found["named"]] == ["MatMul", "LayerNormalization"]
    assert all(name.startswith("node_") for name in found["named"])
    with pytest.raises(UsageError, match=r"'Nope' matched no ONNX node; node names look like 'blocks\.0/blocks\.0\.attn/.*Softmax"):
        island_nodes(proto, (), ["Nope"])
    assert island_nodes(proto, (), ["Nope"], require_matches=False) == {"named": []}
    # a foreign ONNX without scopes is matched by its node names
    names = island_nodes(graphs["torchscript-slim"], (), ["/blocks.11/norm2/"])["named"]
    assert names == ["/model/blocks.11/norm2/LayerNormalization"]


# ---------------------------------------------------------------------------------------------
# Converting


@pytest.mark.parametrize("export", EXPORTS)
def test_islands_compute_in_fp32_and_the_rest_in_fp16(graphs, export):
    source = graphs[export]
    result = convert_to_fp16(source, ("topk_scores", "layernorm"))
    converted = result.model
    island = {name for names in result.island_nodes.values() for name in names}
    assert result.fp32_nodes == [n.name for n in source.graph.node if n.name in island]
    assert len(result.island_nodes["layernorm"]) == 25 and result.converter_fp32_ops == []
    types = types_of(converted)
    by_name = {n.name: n for n in converted.graph.node}
    for name in island:  # every float tensor an island node reads or writes is float32
        assert float_types(by_name[name], types) == {FLOAT}, name
    # everything else that computes with floats does it in FP16
    others = [n for n in converted.graph.node if n.name not in island and n.op_type not in ("Cast", "Constant")]
    fp32_elsewhere = [n.name for n in others if FLOAT in float_types(n, types)]
    assert fp32_elsewhere == [] and sum(FLOAT16 in float_types(n, types) for n in others) > 100
    # no FP32 -> FP16 -> FP32 round trip left anywhere (it would round an island's edge)
    producers = {out: n for n in converted.graph.node for out in n.output}
    for node in converted.graph.node:
        if node.op_type == "Cast" and node.attribute[0].i == FLOAT:
            before = producers.get(node.input[0])
            assert not (before is not None and before.op_type == "Cast" and before.attribute[0].i == FLOAT16), node.name
    # weights: FP16 except the islands' own
    island_inputs = {name for n in converted.graph.node if n.name in island for name in n.input}
    float_weights = [i for i in converted.graph.initializer if i.data_type in (FLOAT, FLOAT16)]
    assert all((i.data_type == FLOAT) == (i.name in island_inputs) for i in float_weights)
    # I/O exactly as before: float32 images in, float32 logits and int64 token indices out
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]  # noqa: E731
    assert io(converted) == io(source)
    assert [t for _, t in io(converted)] == [FLOAT, FLOAT] + [TensorProto.INT64] * 3
    assert source.graph.node[0].op_type != "Cast"  # the source was not touched


def test_default_islands_are_the_topk_scores(graphs):
    result = convert_to_fp16(graphs["dynamo"])
    assert DEFAULT_ISLANDS == ("topk_scores",) and result.islands == DEFAULT_ISLANDS
    assert list(result.island_nodes) == ["topk_scores"] and len(result.fp32_nodes) == 21
    types = types_of(result.model)
    for node in result.model.graph.node:
        if node.op_type == "LayerNormalization":
            assert float_types(node, types) == {FLOAT16}


@pytest.mark.parametrize("export", ["torchscript", "dynamo-slim"])
def test_onnxruntime_cpu_runs_it_close_to_fp32(graphs, images, export):
    source = graphs[export]
    reference = run(source, images)
    mixed = run(convert_to_fp16(source).model, images)
    plain = run(convert_to_fp16(source, islands=()).model, images)
    for outputs in (mixed, plain):
        assert [o.dtype for o in outputs] == [np.float32] + [np.int64] * 3
        assert [o.shape for o in outputs] == [o.shape for o in reference]
    scale = np.abs(reference[0]).max()
    # The random weights' class attention has near-ties, and where FP16 noise swaps a kept token
    # the logits move with it (the drop blocks' attention is FP16 since it is fused attention:
    # only the class row that TopK ranks is an island). Where every drop block keeps FP32's
    # tokens the mixed graph is FP32's function up to FP16 rounding: within 1%.
    same_tokens = np.all([(np.sort(m, 1) == np.sort(r, 1)).all(1) for m, r in zip(mixed[1:], reference[1:])], 0)
    assert same_tokens.sum() >= 4
    error = np.abs(mixed[0] - reference[0]).max(1)
    assert error[same_tokens].max() <= 0.01 * scale, (error, scale)
    assert error.max() <= 0.1 * scale and np.abs(plain[0] - reference[0]).max() <= 0.1 * scale
    assert (mixed[0].argmax(1) == reference[0].argmax(1)).mean() >= 0.75


def test_everything_fp16_keeps_only_the_converters_fp32_ops(graphs):
    result = convert_to_fp16(graphs["torchscript-slim"], islands=())
    assert result.islands == () and result.island_nodes == {}
    assert result.converter_fp32_ops == ["TopK"] and len(result.fp32_nodes) == 3
    types = types_of(result.model)
    for node in result.model.graph.node:
        if node.op_type in ("Softmax", "ReduceMean", "LayerNormalization"):
            assert float_types(node, types) == {FLOAT16}, node.name
    assert fp32_islands_of(result.model) == []


def test_a_converted_graph_reports_its_precision_and_islands(graphs):
    source = graphs["torchscript-slim"]
    assert not is_fp16_model(source) and model_precision(source) == "fp32"
    result = convert_to_fp16(source, ("topk_scores", "layernorm"))
    assert is_fp16_model(result.model) and model_precision(result.model) == "fp16"
    assert fp32_islands_of(result.model) == ["topk_scores", "layernorm"]
    assert set(fp32_compute_nodes(result.model)) == set(result.fp32_nodes)
    assert fp32_islands_of(convert_to_fp16(source).model) == ["topk_scores"]
    with pytest.raises(EvitDeployError, match="already FP16"):
        convert_to_fp16(result.model)


def shared_constant_graph(constant_node: bool) -> onnx.ModelProto:
    """x -> MatMul(q, k) -> Mul(scale) -> Softmax -> ReduceMean -> TopK, and the same `scale`
    also multiplies x elsewhere (an FP16 node): a constant shared by an island and the rest."""
    scale = np.array(0.1443375673, np.float32)  # 1/sqrt(48): not exact in FP16
    nodes = [
        helper.make_node("MatMul", ["x", "xt"], ["qk"], name="qk"),
        helper.make_node("Mul", ["qk", "scale"], ["logits"], name="scale_mul"),
        helper.make_node("Softmax", ["logits"], ["attn"], name="softmax", axis=-1),
        helper.make_node("ReduceMean", ["attn"], ["scores"], name="mean", axes=[1], keepdims=0),
        helper.make_node("TopK", ["scores", "k"], ["values", "idx"], name="topk"),
        helper.make_node("Transpose", ["x"], ["xt"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="other_mul"),
        helper.make_node("ReduceSum", ["scaled", "axes"], ["logits_out"], name="sum", keepdims=0),
    ]
    initializers = [numpy_helper.from_array(np.array([2], np.int64), name) for name in ("k", "axes")]
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["scale"], name="scale_const", value=numpy_helper.from_array(scale)))
    else:
        initializers.append(numpy_helper.from_array(scale, "scale"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, ["b", 4, 4])],
        [helper.make_tensor_value_info("logits_out", FLOAT, ["b", 4]), helper.make_tensor_value_info("idx", TensorProto.INT64, ["b", 2])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("constant_node", [False, True], ids=["initializer", "constant-node"])
def test_a_constant_shared_with_fp16_nodes_is_copied_for_the_island(constant_node):
    source = shared_constant_graph(constant_node)
    result = convert_to_fp16(source)
    assert result.island_nodes["topk_scores"][:5] == ["qk", "scale_mul", "softmax", "mean", "topk"]
    types = types_of(result.model)
    by_name = {n.name: n for n in result.model.graph.node}
    scale_in_island = by_name["scale_mul"].input[1]
    assert types[scale_in_island] == FLOAT and types[by_name["other_mul"].input[1]] == FLOAT16
    x = np.random.default_rng(1).standard_normal((3, 4, 4), dtype=np.float32)
    got, want = run(result.model, x), run(source, x)
    np.testing.assert_array_equal(got[1], want[1])


def test_unnamed_nodes_can_be_islands():
    source = shared_constant_graph(False)
    for node in source.graph.node:
        node.name = ""
    result = convert_to_fp16(source)
    assert len(result.fp32_nodes) == 5 and all(result.fp32_nodes)
    run(result.model, np.zeros((1, 4, 4), np.float32))


def test_the_onnxruntime_backend_takes_the_fp16_onnx_as_it_is(graphs, images, tmp_path, monkeypatch):
    """The backend reports the graph's precision (its I/O is float32 either way) and hands every
    provider, TensorRT and CUDA included, the file itself with no FP16 option: the graph's types
    are the precision. Runs here on the CPU provider."""
    from evit_deploy.metadata import stamp_metadata
    from evit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    proto = convert_to_fp16(graphs["torchscript-slim"]).model
    stamp_metadata(proto, ArtifactMetadata.from_config(CONFIG, with_token_indices=True))
    path = tmp_path / "tiny_fp16.onnx"
    onnx.save(proto, str(path))
    sessions = []
    real_session = ort.InferenceSession

    def recording_session(model, options=None, providers=None, **kwargs):
        sessions.append((model, providers, kwargs))
        return real_session(model, options, providers=["CPUExecutionProvider"])

    gpu_providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu_providers)
    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    backend = OnnxRuntimeBackend(path)
    assert sessions == [(str(path), gpu_providers, {})]  # names only: no provider options
    assert backend.precision == "fp16"
    logits = backend.run(images)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, run(proto, images)[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# export --precision fp16


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from evit_deploy.data.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("held") / "shapes", 16, seed=3, img_size=96)


@pytest.mark.parametrize("gate", ["passed", "missed", "missed-accepted"])
def test_fp16_export_is_gated_on_held_out_images(model, held_out, tmp_path, monkeypatch, gate):
    """The FP16 file is written only when the FP16 gates pass on --validate-dir, or with
    accept_failed_gates, which its metadata records; the gates are made to pass or miss here."""
    import evit_deploy.export.onnx as onnx_export_module
    from evit_deploy.export import export_onnx
    from evit_deploy.export.validate import Gates, ValidationFailed
    from evit_deploy.metadata import read_onnx_metadata

    strictness = 0.0 if gate == "passed" else 1.01  # 101% top-1 agreement: never met
    loose = dict(max_accuracy_drop=100.0, min_first_overlap=0.0, min_overlap=0.0, max_recall_drop=100.0)
    monkeypatch.setitem(onnx_export_module.GATES, "fp16", Gates("fp16", strictness, **loose))
    path = tmp_path / "m.fp16.onnx"
    export = lambda: export_onnx(  # noqa: E731
        model, path, precision="fp16", validate_dir=held_out, accept_failed_gates=gate == "missed-accepted"
    )
    if gate == "missed":
        with pytest.raises(ValidationFailed, match=r"fp16 export failed validation, nothing written \(--accept-failed-gates"):
            export()
        assert list(tmp_path.iterdir()) == []
        return
    result = export()
    meta = read_onnx_metadata(path)
    assert meta.precision == "fp16" and meta.fp32_islands == ["topk_scores"] and model_precision(onnx.load(str(path))) == "fp16"
    held = result.report.cases[-1]
    assert held.name.startswith("shapes/") and held.batch == 16 and len(held.kept_overlap) == 3
    assert all(0.0 <= v <= 1.0 for v in held.kept_overlap)
    if gate == "passed":
        assert result.report.passed and meta.gates_missed == [] and meta.validation["passed"]
        assert meta.validation["gates"]["min_top1_agreement"] == 0.0
    else:
        assert not result.report.passed and meta.gates_missed
        assert all("top-1 agreement" in m for m in meta.gates_missed)


def test_fp16_export_needs_held_out_images(tmp_path):
    from conftest import assert_one_line_error, run_cli

    proc = run_cli("export", "--model", TINY, "--img-size", "96", "--precision", "fp16", "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(proc, 2, "fp16 is judged on held-out images: pass --validate-dir DIR")
    assert list(tmp_path.iterdir()) == []
