"""info and plan: token counts and GMACs against a hand count, the paper's figures, budgets."""

from __future__ import annotations

import json
import math
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from evit_deploy.cli import app
from evit_deploy.export.onnx import stamp_metadata
from evit_deploy.metadata import ArtifactMetadata
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

    # info reads only the metadata, so a one-node graph stamped like an export stands in for one.
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])],
        "stub",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])],
    )
    stub = helper.make_model(graph)
    stamp_metadata(
        stub, ArtifactMetadata.from_config(EvitConfig("deit_base_patch16_224", 0.6, img_size=256))
    )
    path = tmp_path / "base.onnx"
    onnx.save(stub, str(path))
    got = info_json(str(path))
    assert (got["model"], got["keep_rate"], got["img_size"]) == ("deit_base_patch16_224", 0.6, 256)
    assert got["macs"] == hand_count("deit_base_patch16_224", 0.6, 256)[1]
    refused = runner.invoke(app, ["info", str(path), "--keep-rate", "0.7"])
    assert refused.exit_code == 2 and "keep_rate 0.6" in refused.output


def test_unknown_model_suggests_a_name():
    result = runner.invoke(app, ["info", "deit_smal_patch16_224"])
    assert result.exit_code == 2 and "deit_small_patch16_224" in result.output


def test_plan_keeps_the_most_tokens_within_the_budget():
    result = runner.invoke(
        app, ["plan", "--budget-gmacs", "4.6", "--model", "deit_small_patch16_224", "--json"]
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


def test_plan_says_what_is_cheapest_when_nothing_fits():
    result = runner.invoke(
        app, ["plan", "--budget-gmacs", "0.5", "--model", "deit_small_patch16_224"]
    )
    assert result.exit_code == 2
    assert "nothing fits 0.5 GMACs" in result.output and "224 px at keep rate 0.4" in result.output
