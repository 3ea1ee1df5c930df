"""Property-based tests over keep_rate / drop_loc / img_size: the configuration accepts exactly the
valid settings, the model runs exactly the token counts of the EViT formula, and an export either
succeeds and validates or refuses before anything is written.

The formula is written out here again, independently of model/config.py: every drop block keeps
K = ceil(keep_rate * N) of its N image tokens (nothing is dropped when K == N) and adds one fused
token when fuse_token is on.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TINY, fresh_model, random_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from evit_deploy.cli import app
from evit_deploy.errors import UsageError
from evit_deploy.export import export_onnx, read_onnx_metadata
from evit_deploy.export.onnx import MAX_OPSET, MIN_OPSET, check_opset
from evit_deploy.model.config import ARCHS, MAX_IMG_SIZE, EvitConfig
from evit_deploy.model.vit import EViT

PATCH = 16
DEPTH = 12  # every known architecture has 12 blocks


def formula_tokens(img_size: int, keep_rate: float, drop_loc, fuse_token: bool) -> list[int]:
    """Image tokens entering each block (fused token included, class token excluded)."""
    tokens, n = [], (img_size // PATCH) ** 2
    for block in range(DEPTH):
        tokens.append(n)
        if block in drop_loc:
            keep = math.ceil(keep_rate * n)
            if keep < n:
                n = keep + int(fuse_token)
    return tokens


def invalid_settings(keep_rate: float, drop_loc: list[int], img_size: int) -> set[str]:
    """The names the error message may use for each setting that is out of range."""
    invalid = set()
    if not 0 < keep_rate <= 1:  # False for NaN as well
        invalid.add("keep rate")
    if any(not 0 <= b < DEPTH for b in drop_loc) or drop_loc != sorted(set(drop_loc)):
        invalid.add("drop_loc")
    if img_size <= 0 or img_size % PATCH or img_size > MAX_IMG_SIZE:
        invalid.add("img_size")
    return invalid


keep_rates = st.one_of(
    st.floats(min_value=0.01, max_value=1.0),
    st.sampled_from([1.0, 0.0, -0.5, 1.0000001, 2.0, math.nan, math.inf]),
)
valid_drop_locs = st.sets(st.integers(0, DEPTH - 1), max_size=6).map(sorted)
drop_locs = st.one_of(valid_drop_locs, st.lists(st.integers(-2, DEPTH + 1), max_size=5))
img_sizes = st.one_of(
    st.integers(1, MAX_IMG_SIZE // PATCH).map(lambda k: k * PATCH),
    st.integers(-PATCH, MAX_IMG_SIZE + 4 * PATCH),
)


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(sorted(ARCHS)),
    keep_rate=keep_rates,
    drop_loc=drop_locs,
    fuse_token=st.booleans(),
    img_size=img_sizes,
)
def test_config_accepts_exactly_the_valid_settings(model, keep_rate, drop_loc, fuse_token, img_size):
    invalid = invalid_settings(keep_rate, drop_loc, img_size)
    if invalid:
        with pytest.raises(UsageError) as caught:
            EvitConfig(model, keep_rate, tuple(drop_loc), fuse_token, img_size)
        message = str(caught.value)
        assert "\n" not in message and any(name in message for name in invalid), message
        return
    config = EvitConfig(model, keep_rate, tuple(drop_loc), fuse_token, img_size)
    expected = formula_tokens(img_size, keep_rate, drop_loc, fuse_token)
    assert [b.tokens_in for b in config.token_plan] == expected


@settings(max_examples=20, deadline=None)
@given(
    keep_rate=st.floats(min_value=0.01, max_value=1.0),
    drop_loc=valid_drop_locs,
    fuse_token=st.booleans(),
    img_size=st.integers(1, 8).map(lambda k: k * PATCH),
)
def test_model_runs_the_formula_token_counts(keep_rate, drop_loc, fuse_token, img_size):
    """Count the tokens that enter each block of the model's forward pass. Token counts are
    shapes, so the model runs on the meta device: every op, no arithmetic."""
    with torch.device("meta"):
        model = EViT(EvitConfig(TINY, keep_rate, tuple(drop_loc), fuse_token, img_size)).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1] - 1))
    with torch.no_grad():
        logits = model(torch.empty(2, 3, img_size, img_size, device="meta"))
    assert logits.shape == (2, 1000)
    assert seen == formula_tokens(img_size, keep_rate, drop_loc, fuse_token)


@given(opset=st.integers(0, 40))
def test_opset_accepted_exactly_in_range(opset):
    if MIN_OPSET <= opset <= MAX_OPSET:
        check_opset(opset)
    else:
        with pytest.raises(UsageError, match="opset must be"):
            check_opset(opset)


def test_max_opset_is_what_this_torch_exports():
    """MAX_OPSET is written out; a torch upgrade that changes it must update it."""
    from torch.onnx import _constants

    assert MAX_OPSET == _constants.ONNX_MAX_OPSET


def test_export_refuses_a_bad_opset_before_writing(tmp_path):
    for opset in (MIN_OPSET - 1, MAX_OPSET + 1):
        with pytest.raises(UsageError, match="opset must be"):
            export_onnx(random_model(TINY), tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


@settings(
    max_examples=2,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    keep_rate=keep_rates,
    drop_loc=drop_locs,
    fuse_token=st.booleans(),
    img_size=st.sampled_from([32, 48, 64, 40]),
)
@example(keep_rate=0.5, drop_loc=[1, 4, 8], fuse_token=True, img_size=64)
@example(keep_rate=0.0, drop_loc=[3, 6, 9], fuse_token=True, img_size=64)
@example(keep_rate=math.nan, drop_loc=[3, 12], fuse_token=False, img_size=40)
def test_export_validates_or_refuses_cleanly(tmp_path_factory, keep_rate, drop_loc, fuse_token, img_size):
    """Each example exports deit_tiny (seconds each), so only a few run. Invalid settings go to
    the export command, the one entry that takes settings rather than a built model (run in this
    process: no interpreter start)."""
    folder = tmp_path_factory.mktemp("property-export")
    output = folder / "model.onnx"
    invalid = invalid_settings(keep_rate, drop_loc, img_size)
    if invalid:
        result = CliRunner().invoke(app, [
            "export", "--model", TINY, f"--keep-rate={keep_rate!r}",
            f"--drop-loc={','.join(map(str, drop_loc))}",
            "--fuse-token" if fuse_token else "--no-fuse-token", f"--img-size={img_size}",
            "--output", str(output),
        ])
        lines = result.stderr.splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert any(name in lines[0] for name in invalid), lines[0]
        assert list(folder.iterdir()) == []
        return
    config = EvitConfig(TINY, keep_rate, tuple(drop_loc), fuse_token, img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_onnx(fresh_model(config), output)
    assert result.report.passed and [p.name for p in folder.iterdir()] == ["model.onnx"]
    expected = formula_tokens(img_size, keep_rate, drop_loc, fuse_token)
    assert read_onnx_metadata(output).tokens_per_block == expected
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((3, 3, img_size, img_size), dtype=np.float32)
    (logits,) = session.run(["logits"], {"images": images})
    assert logits.shape == (3, 1000) and np.isfinite(logits).all()
