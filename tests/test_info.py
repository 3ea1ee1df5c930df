"""info and plan: token counts and GMACs against a hand count, the paper's figures, budgets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from dataclasses import replace

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from evit_deploy.cli import app
from evit_deploy.engines.header import EngineHeader, encode_header
from evit_deploy.engines.settings import BuildSettings
from evit_deploy.errors import EvitDeployError
from evit_deploy.metadata import ArtifactMetadata, onnx_metadata, read_onnx_metadata, stamp_metadata
from evit_deploy.model import EvitConfig, build_model

runner = CliRunner()

# embed dim and MLP hidden size; all have 12 blocks and 16 px patches
ARCHS = {
    "deit_tiny_patch16_224": (192, 768),
    "deit_small_patch16_224": (384, 1536),
    "deit_base_patch16_224": (768, 3072),
}


def hand_count(model: str, keep_rate: float, img_size: int = 224) -> tuple[list[int], int]:
    """Tokens entering each of the 12 blocks and the MACs, counted from the paper's description:
    drops after the attention of blocks 3, 6 and 9 keep ceil(keep_rate * n) image tokens plus one
    fused token; a block's attention sees the tokens entering it, its MLP those leaving it."""
    dim, hidden = ARCHS[model]
    n = (img_size // 16) ** 2
    tokens_in, macs = [], n * 3 * 16 * 16 * dim  # patch embedding
    for block in range(12):
        tokens_in.append(n)
        n_out = n
        if block in (3, 6, 9) and math.ceil(keep_rate * n) < n:
            n_out = math.ceil(keep_rate * n) + 1
        a, m = n + 1, n_out + 1  # class token
        macs += a * dim * 3 * dim  # qkv
        macs += a * a * dim * 2  # q @ k^T and attn @ v
        macs += a * dim * dim  # proj
        macs += m * dim * hidden * 2  # fc1 and fc2
        n = n_out
    return tokens_in, macs + dim * 1000  # head


def info_json(*args: str) -> dict:
    result = runner.invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("model", list(ARCHS))
@pytest.mark.parametrize("keep_rate", [1.0, 0.9, 0.7, 0.5])
def test_gmacs_match_a_hand_count(model, keep_rate):
    tokens, macs = hand_count(model, keep_rate)
    got = info_json(model, "--keep-rate", str(keep_rate))
    assert got["tokens_per_block"] == tokens
    assert got["macs"] == macs
    assert got["gmacs"] == pytest.approx(macs / 1e9, abs=1e-4)


def test_token_counts_and_higher_resolution_by_hand():
    assert info_json("deit_small_patch16_224", "--keep-rate", "0.7")["tokens_per_block"] == (
        [196] * 4 + [139] * 3 + [99] * 3 + [71] * 2
    )
    tokens, macs = hand_count("deit_small_patch16_224", 0.6, img_size=288)
    got = info_json("deit_small_patch16_224", "--keep-rate", "0.6", "--img-size", "288")
    assert (got["tokens_per_block"], got["macs"]) == (tokens, macs)


@pytest.mark.parametrize(
    "keep_rate, paper", [(1.0, 4.6), (0.9, 4.0), (0.8, 3.5), (0.7, 3.0), (0.6, 2.6), (0.5, 2.3)]
)
def test_deit_small_matches_the_paper_to_one_decimal(keep_rate, paper):
    got = info_json("deit_small_patch16_224", "--keep-rate", str(keep_rate))
    assert round(got["gmacs"], 1) == paper and got["published_gmacs"] == paper
    text = runner.invoke(
        app, ["info", "deit_small_patch16_224", "--keep-rate", str(keep_rate)]
    ).output
    assert f"paper {paper}" in text and f"GMACs           {paper}" in text


def test_params_match_the_built_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(EvitConfig("deit_tiny_patch16_224"))
    assert info_json("deit_tiny_patch16_224")["params"] == sum(
        p.numel() for p in model.parameters()
    )
    assert info_json("deit_small_patch16_224")["params"] == 22_050_664  # the paper: 22.1 M


def test_reads_checkpoints_and_onnx_metadata(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(EvitConfig("deit_tiny_patch16_224", num_classes=10))
    checkpoint = tmp_path / "tiny10.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    got = info_json(str(checkpoint), "--keep-rate", "0.5")
    assert (got["model"], got["num_classes"], got["keep_rate"]) == (
        "deit_tiny_patch16_224",
        10,
        0.5,
    )

    path = stub_export(tmp_path / "base.onnx", EvitConfig("deit_base_patch16_224", 0.6, img_size=256))
    got = info_json(str(path))
    assert (got["model"], got["keep_rate"], got["img_size"]) == ("deit_base_patch16_224", 0.6, 256)
    assert got["macs"] == hand_count("deit_base_patch16_224", 0.6, 256)[1]
    refused = runner.invoke(app, ["info", str(path), "--keep-rate", "0.7"])
    assert refused.exit_code == 2 and "keep_rate 0.6" in refused.output


def stub_export(path, config: EvitConfig, **metadata):
    """A one-node graph stamped like an export (`metadata`: other fields, e.g. an INT8 file's):
    info reads only the metadata."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])],
        "stub",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])],
    )
    stub = helper.make_model(graph)
    stamp_metadata(stub, replace(ArtifactMetadata.from_config(config), **metadata))
    onnx.save(stub, str(path))
    return path


def stub_engine(path, config: EvitConfig):
    """An evit-deploy engine file: the header info reads, then bytes no TensorRT would load. Built
    in FP16 from an FP32 ONNX."""
    header = EngineHeader(
        ArtifactMetadata.from_config(config), "10.9.0", "NVIDIA H100", "9.0", "fp16",
        BuildSettings(), [3, config.img_size, config.img_size], fp32_islands=["topk_scores"],
    )
    path.write_bytes(encode_header(header) + b"not a plan")
    return path


def test_info_says_what_an_exported_file_computes_in(tmp_path):
    config = EvitConfig("deit_tiny_patch16_224", 0.7)
    int8 = stub_export(tmp_path / "tiny.int8.onnx", config, precision="int8", quantization={"method": "static"})
    fp16 = stub_export(tmp_path / "tiny.fp16.onnx", config, precision="fp16", fp32_islands=["topk_scores"])
    engine = stub_engine(tmp_path / "tiny.plan", config)
    for path, line in (
        (int8, "precision       int8 (static quantization)"),
        (fp16, "precision       fp16 (FP32 islands: topk_scores)"),
        (engine, "precision       fp16 (FP32 islands: topk_scores)"),
        (stub_export(tmp_path / "tiny.onnx", config), "precision       fp32"),
    ):
        result = runner.invoke(app, ["info", str(path)])
        assert result.exit_code == 0 and line in result.output.splitlines(), result.output
    assert info_json(str(int8))["precision"] == "int8" and info_json("deit_tiny_patch16_224")["precision"] is None


def test_onnx_metadata_is_read_without_the_graph(tmp_path):
    """A scan of the file's top-level fields gives what onnx.load would, and refuses a cut file."""
    path = stub_export(tmp_path / "tiny.onnx", EvitConfig("deit_tiny_patch16_224", 0.5), precision="int8")
    assert read_onnx_metadata(path) == onnx_metadata(onnx.load(str(path)), path)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(EvitDeployError, match=r"cannot read ONNX file .*cut.onnx \(truncated or corrupted\?\)"):
        read_onnx_metadata(cut)


def test_info_reads_onnx_and_engines_without_torch_or_onnxruntime(tmp_path):
    """The metadata is all info needs: in a fresh interpreter, neither torch nor onnxruntime
    gets imported (they take seconds), and for an ONNX not even onnx (a tenth of a second, and a
    parse of the whole graph)."""
    onnx_file = stub_export(tmp_path / "tiny.onnx", EvitConfig("deit_tiny_patch16_224", 0.5))
    engine = stub_engine(tmp_path / "tiny.plan", EvitConfig("deit_tiny_patch16_224", 0.6))
    code = f"""
import json, sys
from evit_deploy.cli import app
for path, keep_rate, heavy in (
    ({str(onnx_file)!r}, 0.5, {{"torch", "onnxruntime", "tensorrt", "onnx"}}),
    ({str(engine)!r}, 0.6, {{"torch", "onnxruntime", "tensorrt"}}),
):
    app(["info", path, "--json-out", path + ".json"], standalone_mode=False)
    assert json.load(open(path + ".json"))["keep_rate"] == keep_rate
    assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deit_tiny_patch16_224, keep rate 0.6" in proc.stdout


def test_info_json_and_json_out(tmp_path):
    out = tmp_path / "info.json"
    result = runner.invoke(app, ["info", "deit_tiny_patch16_224", "--json-out", str(out)])
    assert result.exit_code == 0 and "params" in result.output and "wrote" in result.output
    assert json.loads(out.read_text())["model"] == "deit_tiny_patch16_224"
    again = runner.invoke(app, ["info", "deit_tiny_patch16_224", "--json-out", str(out)])
    assert again.exit_code == 2 and "pass --force" in again.output
    both = runner.invoke(app, ["info", "deit_tiny_patch16_224", "--json", "--json-out", str(out), "--force"])
    assert both.exit_code == 0 and json.loads(both.output) == json.loads(out.read_text())


def test_a_file_that_is_no_model_says_what_it_is_not(tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    result = runner.invoke(app, ["info", str(junk)])
    assert result.exit_code == 1
    assert "is not an ONNX model (.onnx), an evit-deploy engine (.plan/.engine) or a checkpoint" in result.output
    assert "unknown model" not in result.output


def test_unknown_model_suggests_a_name():
    result = runner.invoke(app, ["info", "deit_smal_patch16_224"])
    assert result.exit_code == 2 and "deit_small_patch16_224" in result.output


def test_plan_keeps_the_most_tokens_within_the_budget():
    result = runner.invoke(
        app, ["plan", "deit_small_patch16_224", "--budget-gmacs", "4.6", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert all(row["gmacs"] <= 4.6 for row in rows)
    by_size = {row["img_size"]: row["keep_rate"] for row in rows}
    assert by_size[224] == 1.0
    assert by_size[256] < 1.0 and by_size[288] < by_size[256]
    for row in rows:  # the next keep rate up would not fit
        higher = round(row["keep_rate"] + 0.05, 2)
        if higher <= 1.0:
            assert hand_count("deit_small_patch16_224", higher, row["img_size"])[1] > 4.6e9
    assert all(len(row["tokens_per_block"]) == 12 for row in rows)


def test_plan_takes_a_model_file(tmp_path):
    """The architecture and head come from the file; sizes and keep rates are what plan varies."""
    path = stub_export(tmp_path / "base.onnx", EvitConfig("deit_base_patch16_224", 0.6, img_size=256))
    result = runner.invoke(app, ["plan", str(path), "--budget-gmacs", "12", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {row["model"] for row in rows} == {"deit_base_patch16_224"} and len(rows) > 1
    assert all(row["gmacs"] <= 12 for row in rows)
    refused = runner.invoke(app, ["plan", str(path), "--budget-gmacs", "12", "--drop-loc", "2,5,8"])
    assert refused.exit_code == 2 and "drop_loc (3, 6, 9)" in refused.output


def test_plan_says_what_is_cheapest_when_nothing_fits():
    result = runner.invoke(
        app, ["plan", "deit_small_patch16_224", "--budget-gmacs", "0.5"]
    )
    assert result.exit_code == 2
    assert "nothing fits 0.5 GMACs" in result.output and "224 px at keep rate 0.4" in result.output
