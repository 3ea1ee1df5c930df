"""ONNX export: graph structure TensorRT needs, metadata, dynamic batch, token-index outputs,
safe writing, the CLI, and the done-when matrix (every model validated against PyTorch)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from rich.console import Console

import evit_deploy.export.onnx as onnx_export_module
import evit_deploy.export.validate as validate_module
from conftest import (
    BASE,
    PUBLISHED_DROP_LOC,
    SMALL,
    TINY,
    assert_one_line_error,
    config_for,
    fresh_model,
    natural_images,
    random_images,
    random_model,
    run_cli,
)
from evit_deploy import __version__
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export import export_onnx, read_onnx_metadata
from evit_deploy.cli.render import validation_table
from evit_deploy.export.validate import (
    CaseResult,
    ValidationReport,
    is_near_tie,
    torch_runner,
    validate_onnx,
)
from evit_deploy.metadata import ArtifactMetadata

TOLERANCE = 1e-4  # max |onnx - torch| <= TOLERANCE * max |torch logits|
ALL_BUT_FIRST = tuple(range(1, 12))


def expected_tokens(num_patches, keep_rate, drop_loc, fuse_token, depth=12):
    """Image tokens entering each block and the TopK K of each dropping block, by the paper's
    rule written out here."""
    entering, ks, n = [], [], num_patches
    for block in range(depth):
        entering.append(n)
        if block in drop_loc and keep_rate < 1:
            left = math.ceil(keep_rate * n)
            if left < n:
                ks.append(left)
                n = left + (1 if fuse_token else 0)
    return entering, ks


def session(path_or_bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(path_or_bytes) if not isinstance(path_or_bytes, bytes) else path_or_bytes
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def torch_outputs(model, images: np.ndarray):
    with torch.no_grad():
        logits, indices = model(torch.from_numpy(images), return_token_indices=True)
    return logits.numpy(), [i.numpy() for i in indices]


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    scale = float(np.abs(want).max())
    assert scale > 0
    diff = float(np.abs(got - want).max())
    assert diff <= TOLERANCE * scale, f"max abs diff {diff:.3g} > {TOLERANCE} x {scale:.3g}"
    assert np.array_equal(got.argmax(1), want.argmax(1))


def passing_report(*_args, **_kwargs) -> ValidationReport:
    return ValidationReport([CaseResult("fake", 3, 0.0, 1.0, 1.0, 1.0, 1.0)])


# --------------------------------------------------------------------------------------------
# Graph structure and metadata


STRUCTURE_CASES = [
    # keep_rate, drop_loc, fuse_token, img_size
    (0.7, PUBLISHED_DROP_LOC, True, 224),
    (0.5, PUBLISHED_DROP_LOC, False, 224),
    (0.5, ALL_BUT_FIRST, True, 160),
    (1.0, PUBLISHED_DROP_LOC, True, 224),  # plain DeiT: no TopK at all
]


@pytest.mark.parametrize(
    "keep_rate, drop_loc, fuse_token, img_size",
    STRUCTURE_CASES,
    ids=[f"keep{k}-{'-'.join(map(str, d))}-{'fused' if f else 'unfused'}-{s}px"
         for k, d, f, s in STRUCTURE_CASES],
)
def test_exported_graph(onnx_export, keep_rate, drop_loc, fuse_token, img_size):
    config = config_for(TINY, keep_rate, drop_loc, fuse_token, img_size)
    result = onnx_export(config)
    assert result.report.passed, result.report.failure_summary()
    assert result.path.stat().st_size == result.size_bytes
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto)
    graph = proto.graph

    opset = {o.domain: o.version for o in proto.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == result.opset >= 18

    # Input `images` [batch, 3, H, W] with a symbolic batch; output `logits` [batch, classes].
    assert [i.name for i in graph.input] == ["images"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = dims[0].dim_param
    assert batch and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [3, img_size, img_size]
    assert [o.name for o in graph.output] == ["logits"]
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == batch and out_dims[1].dim_value == 1000

    # One LayerNormalization per norm: norm1 and norm2 of 12 blocks, and the final norm.
    ops = [n.op_type for n in graph.node]
    assert ops.count("LayerNormalization") == 25

    # Every TopK: K a constant initializer with the planned value, sorted, largest first.
    entering, ks = expected_tokens((img_size // 16) ** 2, keep_rate, drop_loc, fuse_token)
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    produced = {out for n in graph.node for out in n.output}
    topks = [n for n in graph.node if n.op_type == "TopK"]
    got_ks = []
    for node in topks:
        k_name = node.input[1]
        assert k_name in initializers and k_name not in produced
        got_ks.append(int(initializers[k_name].reshape(-1)[0]))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("sorted", 1) == 1 and attrs.get("largest", 1) == 1
    assert got_ks == ks
    assert all(k < 3840 for k in got_ks)

    # Metadata, read back without the weights.
    meta = read_onnx_metadata(result.path)
    assert meta.model == TINY
    assert meta.keep_rate == keep_rate
    assert meta.drop_loc == list(drop_loc)
    assert meta.fuse_token is fuse_token
    assert meta.img_size == img_size
    assert meta.num_classes == 1000
    assert meta.tokens_per_block == entering
    assert meta.topk_k == ks
    assert meta.mean == [0.485, 0.456, 0.406] and meta.std == [0.229, 0.224, 0.225]
    assert meta.crop_pct == 0.875 and meta.interpolation == "bicubic"
    assert (meta.input_name, meta.output_name) == ("images", "logits")
    assert meta.token_index_outputs == []
    assert meta.evit_deploy_version == __version__
    assert meta.weights == "random:0" and meta.checkpoint == ""
    assert meta.to_config() == config
    assert meta == result.metadata
    assert proto.producer_name == "evit-deploy"


def test_metadata_round_trips_through_strings():
    config = config_for(TINY, 0.55, (0,), False, 288, 10)
    meta = ArtifactMetadata.from_config(config, "/ckpt/x.pth", "sha256:abc", True)
    props = meta.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert ArtifactMetadata.from_props(props) == meta
    assert meta.to_config() == config
    assert meta.token_index_outputs == ["kept_indices_block0"]


def test_read_onnx_metadata_errors(tmp_path):
    with pytest.raises(EvitDeployError, match="not found"):
        read_onnx_metadata(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not onnx at all" * 10)
    with pytest.raises(EvitDeployError, match="cannot read ONNX file"):
        read_onnx_metadata(junk)
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", 1, [1])], [value("y", 1, [1])])
    onnx.save(onnx.helper.make_model(graph), foreign)
    with pytest.raises(EvitDeployError, match="carries no evit-deploy metadata"):
        read_onnx_metadata(foreign)


# --------------------------------------------------------------------------------------------
# Dynamic batch and token-index outputs


@pytest.mark.parametrize("batch", [1, 5, 7])
def test_onnxruntime_matches_pytorch_at_other_batch_sizes(onnx_export, batch):
    config = config_for(TINY, 0.7)
    result = onnx_export(config)
    images = np.concatenate([natural_images(batch - batch // 2), random_images(batch // 2, seed=5)])
    got = session(result.path).run(["logits"], {"images": images})[0]
    want, _ = torch_outputs(random_model(TINY, 0.7), images)
    assert got.shape == (batch, 1000)
    assert_logits_close(got, want)


def test_token_index_outputs(onnx_export):
    config = config_for(TINY, 0.7)
    result = onnx_export(config, with_token_indices=True)
    names = ["kept_indices_block3", "kept_indices_block6", "kept_indices_block9"]
    assert result.metadata.token_index_outputs == names
    assert read_onnx_metadata(result.path).token_index_outputs == names
    graph = onnx.load(str(result.path)).graph
    assert [o.name for o in graph.output] == ["logits", *names]
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for output, k in zip(graph.output[1:], [138, 98, 70]):
        assert output.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = output.type.tensor_type.shape.dim
        assert dims[0].dim_param == batch and dims[1].dim_value == k

    images = np.concatenate([natural_images(3), random_images(2, seed=9)])
    logits, *indices = session(result.path).run(None, {"images": images})
    want_logits, want_indices = torch_outputs(random_model(TINY, 0.7), images)
    assert_logits_close(logits, want_logits)
    assert len(indices) == 3
    for got, want in zip(indices, want_indices):
        assert got.dtype == np.int64
        assert np.array_equal(got, want)


# --------------------------------------------------------------------------------------------
# Writing: never overwrite by accident, never leave a partial or unvalidated file


@pytest.fixture
def skip_tracing(onnx_export, monkeypatch):
    """export_onnx without its slow trace and simplify steps: they return the graph of the
    shared tiny keep-0.7 export (same weights as `random_model(TINY, 0.7)`). Everything after
    them (TopK check, metadata, validation, writing) runs for real unless a test patches it."""
    graph = onnx.load(str(onnx_export(config_for(TINY, 0.7)).path))
    del graph.metadata_props[:]

    def traced(model, _opset, _with_token_indices):
        assert model is random_model(TINY, 0.7), "skip_tracing only fits random_model(TINY, 0.7)"
        copy = onnx.ModelProto()
        copy.CopyFrom(graph)
        return copy

    monkeypatch.setattr(onnx_export_module, "export_graph", traced)
    monkeypatch.setattr(onnx_export_module, "simplify", lambda proto: proto)


def test_existing_output_needs_force(tmp_path, monkeypatch):
    model = random_model(TINY, 0.7)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"precious")

    def must_not_trace(*_a, **_k):
        raise AssertionError("refusal must come before any export work")

    with monkeypatch.context() as patch:
        patch.setattr(onnx_export_module, "export_graph", must_not_trace)
        with pytest.raises(UsageError, match="already exists; pass --force"):
            export_onnx(model, path)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_force_replaces_with_a_validated_export(tmp_path, skip_tracing):
    model = random_model(TINY, 0.7)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"precious")

    result = export_onnx(model, path, force=True)
    assert result.report.passed
    assert path.read_bytes() != b"precious"
    assert read_onnx_metadata(path).topk_k == [138, 98, 70]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files


def test_output_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        export_onnx(random_model(TINY, 0.7), tmp_path, force=True)


def test_failed_validation_writes_nothing(tmp_path, monkeypatch, skip_tracing):
    """Validate against other weights: a real mismatch, caught by the real comparison."""
    other = fresh_model(config_for(TINY, 0.7), seed=1)
    monkeypatch.setattr(
        onnx_export_module, "validate_onnx", lambda _model, data, **kwargs: validate_onnx(other, data, **kwargs)
    )
    path = tmp_path / "model.onnx"
    with pytest.raises(EvitDeployError, match="failed validation, nothing written"):
        export_onnx(random_model(TINY, 0.7), path)
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_keeps_the_existing_file(tmp_path, monkeypatch, skip_tracing):
    def failing(_model, _data, **_kwargs):
        return ValidationReport([CaseResult("random", 3, 1.0, 1.0, 0.0, 0.0, 0.0, unexplained=3)])

    monkeypatch.setattr(onnx_export_module, "validate_onnx", failing)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the last good export")
    with pytest.raises(EvitDeployError, match="failed validation") as info:
        export_onnx(random_model(TINY, 0.7), path, force=True)
    assert "random: max abs diff" in str(info.value)
    assert path.read_bytes() == b"the last good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch, skip_tracing, error):
    import evit_deploy.fileio as fileio

    monkeypatch.setattr(onnx_export_module, "validate_onnx", passing_report)

    def interrupted(_src, _dst):
        raise error("interrupted at the rename")

    monkeypatch.setattr(fileio.os, "replace", interrupted)
    path = tmp_path / "model.onnx"
    # A failed write is a user-facing "cannot write PATH" error; Ctrl-C stays an interrupt.
    expected = EvitDeployError if error is OSError else error
    with pytest.raises(expected):
        export_onnx(random_model(TINY, 0.7), path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Kept-token differences: excused at a real tie at the keep boundary, fatal anywhere else.
# tiny at 64 px (16 patches), one drop block (3). ONNX Runtime is made to choose differently from
# PyTorch by nudging the scores its TopK sees (an Add in front of it), as fp32 noise may do.

TIE_A, TIE_B = 5, 10  # patches made identical (pixels and position) in the first image


def patch_view(images: np.ndarray, index: int) -> np.ndarray:
    row, col = divmod(index, 4)
    return images[:, :, row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16]


def boundary_model(tie: bool):
    """(model, images, first-block class-attention scores): with `tie`, image 0's patches A and B
    are the same token, so they score exactly alike, and K puts the pair at the keep boundary."""
    images = random_images(3, 64, seed=7)
    probe = fresh_model(config_for(TINY, 0.5, (3,), img_size=64))
    if tie:
        patch_view(images, TIE_B)[0] = patch_view(images, TIE_A)[0]
        with torch.no_grad():
            probe.pos_embed[0, 1 + TIE_B] = probe.pos_embed[0, 1 + TIE_A]
    scores = torch_runner(probe)(images).scores[0]
    order = list(np.argsort(-scores[0], kind="stable"))
    ranks = sorted((order.index(TIE_A), order.index(TIE_B)))
    keep = ranks[0] + 1 if tie else 9  # 9: a 2% gap, and no other image near it
    assert not tie or (ranks[1] == ranks[0] + 1 and 0 < keep < 16), ranks
    model = fresh_model(config_for(TINY, keep / 16, (3,), img_size=64))
    model.load_state_dict(probe.state_dict())
    return model, images, scores


def nudge_topk(monkeypatch, images: np.ndarray, nudge: np.ndarray) -> None:
    """Validate on `images` only, and add `nudge` to the scores the exported TopK ranks."""
    crafted = [validate_module.InputSet("crafted", images)]
    monkeypatch.setattr(validate_module, "validation_inputs", lambda *_args, **_kwargs: iter(crafted))
    simplify = onnx_export_module.simplify

    def nudged(proto):
        proto = simplify(proto)
        graph = proto.graph
        (topk,) = [node for node in graph.node if node.op_type == "TopK"]
        graph.initializer.append(numpy_helper.from_array(nudge.astype(np.float32), "nudge"))
        add = onnx.helper.make_node("Add", [topk.input[0], "nudge"], ["nudged_scores"])
        graph.node.insert(list(graph.node).index(topk), add)
        topk.input[0] = "nudged_scores"
        return proto

    monkeypatch.setattr(onnx_export_module, "simplify", nudged)


def test_a_kept_token_difference_at_a_real_tie_is_excused_and_reported(tmp_path, monkeypatch):
    model, images, scores = boundary_model(tie=True)
    keep = model.config.token_plan[3].keep
    assert is_near_tie(scores[0], keep) and not any(is_near_tie(s, keep) for s in scores[1:])
    kept = set(torch_runner(model)(images).indices[0][0].tolist())
    (dropped,) = {TIE_A, TIE_B} - kept  # PyTorch kept one of the pair; ONNX Runtime gets the other
    nudge = np.zeros(16)
    nudge[dropped] = 1e-5 * scores[0, TIE_A]
    nudge_topk(monkeypatch, images, nudge)
    result = export_onnx(model, tmp_path / "tie.onnx")
    (case,) = result.report.cases
    assert (case.near_ties, case.unexplained, case.kept_agreement) == (1, 0, pytest.approx(2 / 3)), case
    assert case.passed and (tmp_path / "tie.onnx").is_file()
    assert result.report.to_dict()["cases"][0]["near_ties"] == 1
    console = Console(record=True, width=160)
    console.print(validation_table(result.report))
    assert "67% (1 near-tie)" in console.export_text()


def test_a_kept_token_difference_without_a_tie_fails_the_export(tmp_path, monkeypatch):
    model, images, scores = boundary_model(tie=False)
    keep = model.config.token_plan[3].keep
    order = np.argsort(-scores[0], kind="stable")
    last_kept, first_dropped = order[keep - 1], order[keep]
    gap = scores[0, last_kept] - scores[0, first_dropped]
    assert not is_near_tie(scores[0], keep), "image 0 must have a clear boundary"
    nudge = np.zeros(16)
    nudge[first_dropped] = 2 * gap  # image 0 now keeps it; images 1 and 2 must not change
    for s in scores[1:]:
        kth = np.sort(s)[::-1][keep - 1]
        assert s[first_dropped] >= kth or s[first_dropped] + 2 * gap < kth
    nudge_topk(monkeypatch, images, nudge)
    with pytest.raises(EvitDeployError, match="failed validation, nothing written") as info:
        export_onnx(model, tmp_path / "no-tie.onnx")
    assert "1 image(s) keep other tokens without a near-tie" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_opset_below_18_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"opset must be >= 18 \(the oldest the torch.export-based exporter writes\)"):
        export_onnx(random_model(TINY, 0.7), tmp_path / "m.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The CLI


def test_cli_export(tmp_path):
    source = random_model(TINY, 0.7, seed=4)
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": source.state_dict()}, checkpoint)
    proc = run_cli(  # no --model: the architecture is read off the weights
        "export", "--checkpoint", checkpoint.name,
        "--keep-rate", "0.5", "--no-fuse-token", "--drop-loc", "3,6,9", "--with-token-indices",
        "-o", "out.onnx", "--json-out", "out.json", cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in out + proc.stderr
    assert "Validation: ONNX Runtime vs PyTorch" in out
    assert "random" in out and "natural" in out
    assert out.count("pass") == 2 and "FAIL" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["TopK"].split(None, 2)[2].strip() == "[98, 49, 25]"
    assert lines["tokens/block"].split(None, 1)[1].strip() == (
        "[196, 196, 196, 196, 98, 98, 98, 49, 49, 49, 25, 25]"
    )
    assert lines["next"].split(None, 1)[1].strip() == "evit-deploy bench out.onnx --batch 64"
    assert "deit_tiny_patch16_224, keep rate 0.5, drop blocks 3,6,9, no fused token" in lines["model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.onnx", "tiny.pth"]
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["metadata"]["keep_rate"] == 0.5 and record["metadata"]["drop_loc"] == [3, 6, 9]
    assert record["metadata"]["fuse_token"] is False and record["validation"]

    meta = read_onnx_metadata(tmp_path / "out.onnx")
    assert (meta.model, meta.keep_rate, meta.drop_loc, meta.fuse_token) == (TINY, 0.5, [3, 6, 9], False)
    assert meta.checkpoint == str(checkpoint.resolve())
    assert meta.weights == "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    names = ["kept_indices_block3", "kept_indices_block6", "kept_indices_block9"]
    assert meta.token_index_outputs == names
    images = natural_images(2)
    got_logits, *got_indices = session(tmp_path / "out.onnx").run(["logits", *names], {"images": images})
    model = fresh_model(config_for(TINY, 0.5, PUBLISHED_DROP_LOC, False), checkpoint=checkpoint)
    want_logits, want_indices = torch_outputs(model, images)
    assert_logits_close(got_logits, want_logits)
    assert [i.shape for i in got_indices] == [(2, 98), (2, 49), (2, 25)]
    for got, want in zip(got_indices, want_indices):
        assert np.array_equal(got, want)


CLI_ERRORS = {
    "unknown model": (["--model", "deit_tiny_patch16_22"], ["unknown model", "Did you mean"]),
    "keep rate 1.5": (["--keep-rate", "1.5"], ["keep rate must be in (0, 1]", "1.5"]),
    "drop_loc 12": (["--drop-loc", "12"], ["drop_loc [12]", "outside 0..11"]),
    "img_size 100": (["--img-size", "100"], ["img_size", "100"]),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_usage_errors_are_one_line(tmp_path, case):
    args, fragments = CLI_ERRORS[case]
    proc = run_cli("export", "--model", TINY, *args, "-o", "out.onnx", cwd=tmp_path)
    assert_one_line_error(proc, 2, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"precious")
    proc = run_cli("export", "--model", TINY, "-o", "out.onnx", cwd=tmp_path)
    assert_one_line_error(proc, 2, "out.onnx already exists", "--force")
    assert (tmp_path / "out.onnx").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


# --------------------------------------------------------------------------------------------
# Done-when matrix: every model and keep rate exports, validates and keeps the same tokens.
# deit_base runs at 0.7 and 1.0 only: each base export takes about a minute on 2 CPU cores.
# Every row stays at 224 px: a row's claim is 196 patches' K values and the same 196-token order
# as PyTorch, which a smaller input would not check; nor would it save much (measured: a base
# export at 64 px took 21 s against 28 s, as its 86M weights, not the patches, make simplify and
# validation slow). Under `make test` (-n 2) the rows run one by one on either worker.

MATRIX = [(m, k) for m in (TINY, SMALL) for k in (0.5, 0.7, 0.9, 1.0)] + [(BASE, 0.7), (BASE, 1.0)]


@pytest.mark.slow
@pytest.mark.parametrize("model_name, keep_rate", MATRIX, ids=[f"{m.split('_')[1]}-{k}" for m, k in MATRIX])
def test_done_when_matrix(onnx_export, model_name, keep_rate):
    config = config_for(model_name, keep_rate)
    result = onnx_export(config)
    report = result.report
    assert report.passed, report.failure_summary()
    assert [c.name for c in report.cases] == ["random", "natural image"]
    assert result.metadata.topk_k == expected_tokens(196, keep_rate, PUBLISHED_DROP_LOC, True)[1]
    for case in report.cases:
        assert case.batch == 3
        assert case.max_abs_diff <= TOLERANCE * case.logit_scale, case
        assert case.top1_agreement == 1.0, case
        # Identical kept tokens, order included. Should this fail with near_ties > 0, the
        # inputs hit a genuine fp32 tie in the class attention (validation excuses those):
        # investigate before changing inputs or seeds, never loosen this silently.
        assert case.order_agreement == 1.0, case
        assert case.kept_agreement == 1.0 and case.near_ties == 0 and case.unexplained == 0, case
