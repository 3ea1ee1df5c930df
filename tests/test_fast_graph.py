"""The exported graph is fusion-friendly (issue 21): drop blocks run fused attention like every
other block and compute only the class row of the attention for their scores, and the kept
tokens are gathered without an index broadcast to [B, K, C]. The same function as the reference
EViT is proven by test_model.py (PyTorch) and every export's validation (ONNX Runtime)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY, config_for, fresh_model

from evit_deploy.bench.profile import drop_parts, profile_variants
from evit_deploy.export.precision import module_scopes
from evit_deploy.export.score_path import score_path_nodes
from evit_deploy.runtime import load_backend

CONFIG = config_for(TINY, keep_rate=0.7, img_size=96)  # 36 patches, drops at 3, 6, 9
PLAIN = config_for(TINY, keep_rate=1.0, img_size=96)


def shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {
        value.name: [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        for value in [*inferred.graph.value_info, *inferred.graph.output]
    }


@pytest.fixture(scope="module")
def graphs(onnx_export):
    return {name: onnx_export(config) for name, config in (("evit", CONFIG), ("plain", PLAIN))}


def test_no_drop_block_materialises_the_n_by_n_attention_map(graphs):
    model = onnx.load(str(graphs["evit"].path))
    dims = shapes(model)
    tokens = [plan.tokens_in + 1 for plan in CONFIG.token_plan if plan.keep is not None]
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    scopes = [module_scopes(n) or "" for n in softmaxes]
    class_rows = [n for n, s in zip(softmaxes, scopes) if "class_attention" in s]
    fused = [n for n, s in zip(softmaxes, scopes) if "scaled_dot_product_attention" in s]
    assert len(class_rows) == 3 and len(fused) == CONFIG.arch.depth
    assert len(class_rows) + len(fused) == len(softmaxes)  # no other softmax anywhere
    for node, count in zip(class_rows, tokens):  # [B, heads, 1, tokens]: the class row alone
        assert dims[node.output[0]][1:] == [CONFIG.arch.num_heads, 1, count], node.name


def test_the_score_path_is_the_class_row_and_the_gather_takes_no_broadcast_index(graphs):
    model = onnx.load(str(graphs["evit"].path))
    ops = {n.name: n.op_type for n in model.graph.node}
    path = score_path_nodes(model)
    assert [ops[name] for name in path[:7]] == ["MatMul", "Mul", "Softmax", "Gather", "Slice", "ReduceMean", "TopK"]
    assert all("class_attention" in (module_scopes(n) or "") or n.op_type == "TopK"
               for n in model.graph.node if n.name in path)
    counts = collections.Counter(ops.values())
    assert counts["GatherElements"] == 0 and counts["TopK"] == 3
    parts = drop_parts(graphs["evit"].path)
    # per drop block: 8 score nodes (two slices to q_cls, K^T, MatMul, scale, softmax, the class
    # row, the head mean);
    # the rest of the drop step (TopK, gather, fused-token weights and sum, concat)
    assert collections.Counter(p for p in parts.values() if p) == {"scores": 24, "reorganize": 47}


def test_openvino_fuses_the_drop_blocks_attention_like_the_others(graphs):
    """On any CPU: the EViT graph compiles to as many fused attention subgraphs as the plain
    ViT (whatever number this CPU's plugin fuses), and to no GatherElements."""
    ov = pytest.importorskip("openvino")
    core = ov.Core()

    def layer_types(path):
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return collections.Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())

    evit, plain = layer_types(graphs["evit"].path), layer_types(graphs["plain"].path)
    assert evit["Subgraph"] == plain["Subgraph"]
    assert evit["GatherElements"] == 0


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_a_profile_names_op_types_and_the_drop_machinerys_share(graphs, kind):
    if kind == "openvino":
        pytest.importorskip("openvino")
    files = [graphs["evit"].path, graphs["plain"].path]
    backends = [load_backend(f, kind, "cpu", threads=1) for f in files]
    evit, plain = profile_variants(backends, files, batch=2, runs=2)
    assert (evit.keep_rate, plain.keep_rate, evit.batch, evit.runs) == (0.7, 1.0, 2, 2)
    assert evit.total_ms == pytest.approx(sum(evit.by_type.values()))
    assert list(evit.by_type.values()) == sorted(evit.by_type.values(), reverse=True)
    assert set(evit.drop_ms) == {"scores", "reorganize"} and all(ms > 0 for ms in evit.drop_ms.values())
    assert 0 < evit.drop_share < 0.5
    assert plain.drop_ms == {} and plain.drop_share == 0
    assert evit.to_dict()["drop_share"] == evit.drop_share


def test_bench_profile_on_the_cli_prints_the_table_and_writes_it_to_json(graphs, tmp_path, cli):
    out = tmp_path / "bench.json"
    result = cli("bench", str(graphs["evit"].path), "--batch", "2", "--iters", "2", "--warmup", "0",
                 "--profile", "--json-out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Profile at batch 2" in result.stdout and "the drop machinery" in result.stdout
    import json

    profiles = json.loads(out.read_text())["profiles"]
    assert [(p["keep_rate"], p["batch"]) for p in profiles] == [(0.7, 2), (1.0, 2)]
    assert profiles[0]["drop_share"] > 0 and np.isclose(profiles[0]["total_ms"], sum(profiles[0]["by_type"].values()))


def test_profile_is_refused_for_a_sweep_and_on_pytorch_before_any_timing(graphs, cli, tmp_path):
    result = cli("bench", str(graphs["evit"].path), "--keep-rates", "0.5,1.0", "--profile", cwd=tmp_path)
    assert result.returncode == 2 and "--profile goes with one model" in result.stderr
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": fresh_model(CONFIG).state_dict()}, checkpoint)
    result = cli("bench", str(checkpoint), "--img-size", "96", "--profile", "--iters", "1000", cwd=tmp_path)
    assert result.returncode == 2 and "--profile works on onnxruntime and openvino, not on pytorch" in result.stderr
