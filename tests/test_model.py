"""The EViT model against the paper's rules and an independent reference implementation:
token counts, kept tokens, logits, configuration checks, MAC and parameter counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import (
    BASE,
    PUBLISHED_DROP_LOC,
    SMALL,
    TINY,
    config_for,
    natural_images,
    random_images,
    random_model,
)
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model import ALIASES, ARCHS, EViT, EvitConfig, resolve_arch
from evit_deploy.model.config import parse_drop_loc
from evit_deploy.model.flops import count_macs, count_params
from evit_deploy.model.vit import kept_patch_ids, reorganize_tokens
from reference_evit import complement_idx, reference_forward

KEEP_RATES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ALL_BUT_FIRST = tuple(range(1, 12))
DROP_LOCS = ((), (0,), PUBLISHED_DROP_LOC, ALL_BUT_FIRST)
HEADS = {TINY: 3, SMALL: 6, BASE: 12}


def expected_tokens(num_patches, keep_rate, drop_loc, fuse_token, depth=12):
    """The paper's rule, written out here: image tokens (fused included) entering each block,
    and the count leaving the last one."""
    entering, n = [], num_patches
    for block in range(depth):
        entering.append(n)
        if block in drop_loc and keep_rate < 1:
            left = math.ceil(keep_rate * n)
            if left < n:
                n = left + (1 if fuse_token else 0)
    return entering, n


def run_with_counts(model: EViT, images: torch.Tensor):
    """Run the model, recording the image tokens entering and leaving every block."""
    entering, leaving = [], []

    def record(_module, inp, out):  # returns None: the output is left as it is
        entering.append(inp[0].shape[1] - 1)
        leaving.append(out[0].shape[1] - 1)

    hooks = [block.register_forward_hook(record) for block in model.blocks]
    try:
        with torch.no_grad():
            logits, indices = model(images, return_token_indices=True)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, indices, entering, leaving


def model_with(config: EvitConfig, seed: int = 0) -> EViT:
    """The shared seed-`seed` weights (they do not depend on keep rate or drop_loc) in a model
    built for `config`."""
    donor = random_model(config.model, 0.7, PUBLISHED_DROP_LOC, True, config.img_size, seed=seed)
    with torch.device("meta"):  # no init work: the donor's tensors are shared, read-only
        model = EViT(config)
    model.load_state_dict(donor.state_dict(), assign=True)
    return model.eval()


def reference(model: EViT, images: torch.Tensor):
    c = model.config
    return reference_forward(
        model.state_dict(), images, num_heads=HEADS[c.model], keep_rate=c.keep_rate,
        drop_loc=c.drop_loc, fuse_token=c.fuse_token,
    )


def sample_images(img_size: int) -> torch.Tensor:
    """One random and two natural images."""
    return torch.from_numpy(np.concatenate([random_images(1, img_size), natural_images(2, img_size)]))


def tie_report(ref, block: int, got: torch.Tensor, want: torch.Tensor) -> str:
    """Why kept indices differ: the reference's class-attention gap at the first difference."""
    lines = []
    for i in range(want.shape[0]):
        if torch.equal(got[i], want[i]):
            continue
        p = int(torch.nonzero(got[i] != want[i])[0])
        a, b = ref.cls_attn[block][i][want[i][p]], ref.cls_attn[block][i][got[i][p]]
        lines.append(f"image {i}, drop {block}, rank {p}: scores {a:.8g} vs {b:.8g} "
                     f"(relative gap {abs(a - b) / a:.2g}; below ~1e-6 it is an fp32 tie)")
    return "; ".join(lines)


# --------------------------------------------------------------------------------------------
# Token counts


@pytest.mark.parametrize("fuse_token", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("drop_loc", DROP_LOCS, ids=["none", "0", "3-6-9", "1..11"])
@pytest.mark.parametrize("keep_rate", KEEP_RATES)
def test_token_counts_follow_the_formula(keep_rate, drop_loc, fuse_token):
    config = config_for(TINY, keep_rate, drop_loc, fuse_token)
    want_in, want_last = expected_tokens(196, keep_rate, drop_loc, fuse_token)
    want_out = want_in[1:] + [want_last]

    plan = config.token_plan
    assert [b.tokens_in for b in plan] == want_in
    assert [b.tokens_out for b in plan] == want_out
    dropping = [i for i in range(12) if i in drop_loc and keep_rate < 1
                and math.ceil(keep_rate * want_in[i]) < want_in[i]]
    assert [b.block for b in plan if b.keep is not None] == dropping
    assert [b.keep for b in plan if b.keep is not None] == [
        math.ceil(keep_rate * want_in[i]) for i in dropping
    ]
    assert config.is_evit == bool(dropping)

    model = model_with(config)
    images = torch.from_numpy(natural_images(1))
    _, indices, entering, leaving = run_with_counts(model, images)
    assert entering == want_in and leaving == want_out
    assert [tuple(i.shape) for i in indices] == [(1, b.keep) for b in plan if b.keep is not None]


def _distinct(counts):
    return [c for i, c in enumerate(counts) if i == 0 or c != counts[i - 1]]


@pytest.mark.parametrize(
    "keep_rate, fuse_token, published",
    [
        (0.7, True, [196, 139, 99, 71]),
        (0.7, False, [196, 138, 97, 68]),
        (0.5, True, [196, 99, 51, 27]),
    ],
)
def test_published_token_counts(keep_rate, fuse_token, published):
    config = config_for(TINY, keep_rate, PUBLISHED_DROP_LOC, fuse_token)
    plan = config.token_plan
    counts = [b.tokens_in for b in plan] + [plan[-1].tokens_out]
    assert _distinct(counts) == published
    # Changes happen exactly after blocks 3, 6 and 9.
    assert [b.tokens_in for b in plan] == [published[0]] * 4 + [published[1]] * 3 + [
        published[2]
    ] * 3 + [published[3]] * 2
    _, _, entering, leaving = run_with_counts(model_with(config), torch.from_numpy(natural_images(1)))
    assert _distinct(entering + leaving[-1:]) == published


def test_drop_blocks_can_reach_a_fixed_point():
    """Dropping in every block from 1 at keep 0.5 fused: 3 tokens keep 2 and fuse 1 forever,
    so later blocks still run TopK without changing the count."""
    config = config_for(TINY, 0.5, ALL_BUT_FIRST, True)
    assert [b.tokens_in for b in config.token_plan] == [196, 196, 99, 51, 27, 15, 9, 6, 4, 3, 3, 3]
    assert [b.keep for b in config.token_plan] == [None, 98, 50, 26, 14, 8, 5, 3, 2, 2, 2, 2]
    unfused = config_for(TINY, 0.5, ALL_BUT_FIRST, False)
    assert [b.tokens_in for b in unfused.token_plan] == [196, 196, 98, 49, 25, 13, 7, 4, 2, 1, 1, 1]
    assert [b.keep for b in unfused.token_plan] == [None, 98, 49, 25, 13, 7, 4, 2, 1, None, None, None]


# --------------------------------------------------------------------------------------------
# Agreement with the reference implementation


REFERENCE_CASES = [
    # keep_rate, drop_loc, fuse_token, img_size
    (0.5, PUBLISHED_DROP_LOC, True, 224),
    (0.5, PUBLISHED_DROP_LOC, False, 224),
    (0.6, PUBLISHED_DROP_LOC, True, 224),
    (0.7, PUBLISHED_DROP_LOC, True, 224),
    (0.7, PUBLISHED_DROP_LOC, False, 224),
    (0.8, PUBLISHED_DROP_LOC, True, 224),
    (0.9, PUBLISHED_DROP_LOC, True, 224),
    (0.9, PUBLISHED_DROP_LOC, False, 224),
    (1.0, PUBLISHED_DROP_LOC, True, 224),
    (0.7, (0,), True, 224),
    (0.5, ALL_BUT_FIRST, True, 224),
    (0.5, ALL_BUT_FIRST, False, 224),
    (0.7, PUBLISHED_DROP_LOC, True, 160),
    (0.5, PUBLISHED_DROP_LOC, False, 160),
    (0.7, PUBLISHED_DROP_LOC, True, 288),
    (0.6, PUBLISHED_DROP_LOC, False, 288),
]


@pytest.mark.parametrize(
    "keep_rate, drop_loc, fuse_token, img_size",
    REFERENCE_CASES,
    ids=[f"keep{k}-{'-'.join(map(str, d)) or 'none'}-{'fused' if f else 'unfused'}-{s}px"
         for k, d, f, s in REFERENCE_CASES],
)
def test_matches_reference_implementation(keep_rate, drop_loc, fuse_token, img_size):
    config = config_for(TINY, keep_rate, drop_loc, fuse_token, img_size)
    model = random_model(TINY, keep_rate, drop_loc, fuse_token, img_size)
    images = sample_images(img_size)
    with torch.no_grad():
        logits, indices = model(images, return_token_indices=True)
    ref = reference(model, images)

    assert len(indices) == len(ref.indices) == len([b for b in config.token_plan if b.keep])
    for block, (got, want) in enumerate(zip(indices, ref.indices)):
        assert got.dtype == torch.int64
        # same tokens, same (descending score) order
        assert torch.equal(got, want), tie_report(ref, block, got, want)
    scale = ref.logits.abs().max().item()
    assert scale > 0
    assert (logits - ref.logits).abs().max().item() <= 1e-4 * scale
    assert torch.equal(logits.argmax(1), ref.logits.argmax(1))


def test_fusion_changes_the_result():
    """Guards the reference comparison: fused and unfused models really differ."""
    images = sample_images(224)
    with torch.no_grad():
        fused = random_model(TINY, 0.7, PUBLISHED_DROP_LOC, True)(images)
        unfused = random_model(TINY, 0.7, PUBLISHED_DROP_LOC, False)(images)
    assert (fused - unfused).abs().max() > 1e-3 * fused.abs().max()


@pytest.mark.parametrize("drop_loc", [PUBLISHED_DROP_LOC, ALL_BUT_FIRST])
def test_keep_rate_one_is_plain_deit(drop_loc):
    model_name = TINY
    images = torch.from_numpy(np.concatenate([random_images(1), natural_images(1)]))
    evit = model_with(config_for(model_name, 1.0, drop_loc, True))
    plain = model_with(config_for(model_name, 0.7, (), True))
    assert not evit.config.is_evit and not plain.config.is_evit
    assert all(b.keep is None for b in evit.blocks)
    with torch.no_grad():
        logits, indices = evit(images, return_token_indices=True)
        plain_logits = plain(images)
    assert indices == ()
    assert torch.equal(logits, plain_logits)
    ref = reference_forward(plain.state_dict(), images, num_heads=HEADS[model_name],
                            keep_rate=1.0, drop_loc=(), fuse_token=False)
    assert ref.indices == []
    assert (logits - ref.logits).abs().max() <= 1e-4 * ref.logits.abs().max()


def test_keep_rate_close_to_one_drops_nothing():
    """ceil(0.999 * 196) = 196: no block drops, so the model is plain DeiT."""
    config = config_for(TINY, 0.999)
    assert not config.is_evit
    assert all(b.keep is None for b in config.token_plan)


@pytest.mark.parametrize("fuse_token", [True, False])
def test_return_token_indices(fuse_token):
    model = random_model(TINY, 0.7, PUBLISHED_DROP_LOC, fuse_token)
    images = sample_images(224)
    batch = images.shape[0]
    scores = []

    def record(_module, _inp, out):
        scores.append(out[1])

    hooks = [b.attn.register_forward_hook(record) for b in model.blocks if b.keep is not None]
    try:
        with torch.no_grad():
            logits, indices = model(images, return_token_indices=True)
            plain_logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(logits, plain_logits)
    assert logits.shape == (batch, 1000)
    tokens_in = [196, 139, 99] if fuse_token else [196, 138, 97]
    keeps = [138, 98, 70] if fuse_token else [138, 97, 68]
    assert [tuple(i.shape) for i in indices] == [(batch, k) for k in keeps]
    for idx, score, n in zip(indices, scores[len(scores) // 2:], tokens_in):
        assert idx.dtype == torch.int64
        assert score.shape == (batch, n)
        for row, s in zip(idx, score):
            assert len(set(row.tolist())) == len(row)
            assert 0 <= row.min() and row.max() < n
            picked = s[row]
            assert torch.all(picked[:-1] >= picked[1:])  # descending score order
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[row] = False
            assert picked[-1] >= s[dropped].max()  # the top of the scores


# --------------------------------------------------------------------------------------------
# Pieces


def test_reorganize_tokens_by_hand():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0]]])
    cls_attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    fused, idx = reorganize_tokens(x, cls_attn, 2, fuse_token=True)
    assert idx.tolist() == [[1, 3]]
    # class, then tokens 1 and 3 by score, then 0.1 * token0 + 0.2 * token2
    expected = torch.tensor([[[9.0, 9.0], [0.0, 1.0], [3.0, -1.0], [0.1 + 0.4, 0.4]]])
    assert torch.allclose(fused, expected)
    unfused, idx2 = reorganize_tokens(x, cls_attn, 2, fuse_token=False)
    assert torch.equal(idx2, idx)
    assert torch.equal(unfused, expected[:, :3])


def test_reference_complement_idx():
    idx = torch.tensor([[3, 0, 5], [1, 2, 4]])
    assert complement_idx(idx, 6).tolist() == [[1, 2, 4], [0, 3, 5]]


def test_kept_patch_ids_by_hand():
    # 4 patches. Block A keeps positions [2, 0] -> patches [2, 0], then tokens are [2, 0, fused4].
    # Block B keeps positions [2, 0] of those -> [fused4, 2].
    first = np.array([[2, 0]])
    second = np.array([[2, 0]])
    fused = kept_patch_ids([first, second], 4, fuse_token=True)
    assert [f.tolist() for f in fused] == [[[2, 0]], [[4, 2]]]
    # Unfused tokens after A are [2, 0]; position 1 is patch 0.
    unfused = kept_patch_ids([first, np.array([[1]])], 4, fuse_token=False)
    assert [u.tolist() for u in unfused] == [[[2, 0]], [[0]]]
    assert kept_patch_ids([], 4, fuse_token=True) == []


@pytest.mark.parametrize("fuse_token", [True, False])
@pytest.mark.parametrize("drop_loc", [PUBLISHED_DROP_LOC, ALL_BUT_FIRST])
def test_kept_patch_ids_match_the_reference_tracking(fuse_token, drop_loc):
    model = random_model(TINY, 0.5, drop_loc, fuse_token)
    images = sample_images(224)
    with torch.no_grad():
        _, indices = model(images, return_token_indices=True)
    ref = reference(model, images)
    from_tensors = kept_patch_ids(list(indices), 196, fuse_token)
    from_arrays = kept_patch_ids([i.numpy() for i in indices], 196, fuse_token)
    assert len(from_tensors) == len(ref.patch_ids)
    for got, got_np, want in zip(from_tensors, from_arrays, ref.patch_ids):
        assert np.array_equal(got, want.numpy())
        assert np.array_equal(got_np, want.numpy())
    if fuse_token:  # with 11 drops, fused tokens are kept and numbered 196 + j
        assert any((ids >= 196).any() for ids in from_tensors[1:])
    else:
        assert all((ids < 196).all() for ids in from_tensors)


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("keep_rate", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), "0.7"])
def test_keep_rate_outside_range_is_refused(keep_rate):
    with pytest.raises(UsageError, match="keep rate must be in"):
        EvitConfig(TINY, keep_rate)


@pytest.mark.parametrize(
    "drop_loc, message",
    [
        ((12,), "outside 0..11"),
        ((-1,), "outside 0..11"),
        ((3, 6, 12), "outside 0..11"),
        ((6, 3), "increasing without repeats"),
        ((3, 3), "increasing without repeats"),
        ((3, 6, 6, 9), "increasing without repeats"),
    ],
)
def test_bad_drop_loc_is_refused(drop_loc, message):
    with pytest.raises(UsageError, match=message):
        EvitConfig(TINY, 0.7, drop_loc)


@pytest.mark.parametrize("img_size", [100, 0, -16, 8, 230])
def test_img_size_must_be_a_multiple_of_the_patch(img_size):
    with pytest.raises(UsageError, match="multiple of the patch size 16"):
        EvitConfig(TINY, 0.7, img_size=img_size)


@pytest.mark.parametrize("img_size", [16, 160, 240, 384])
def test_any_multiple_of_16_is_accepted(img_size):
    config = EvitConfig(TINY, 0.7, img_size=img_size)
    assert config.grid_size == img_size // 16 and config.num_patches == (img_size // 16) ** 2


def test_num_classes_must_be_positive():
    with pytest.raises(UsageError, match="num_classes"):
        EvitConfig(TINY, num_classes=0)


def test_unknown_model_suggests_the_closest():
    with pytest.raises(UsageError) as info:
        EvitConfig("deit_tiny_patch16_22")
    message = str(info.value)
    assert "unknown model 'deit_tiny_patch16_22'" in message
    assert "Did you mean 'deit_tiny_patch16_224'?" in message
    assert all(name in message for name in [*ARCHS, *ALIASES])
    with pytest.raises(UsageError, match="Did you mean 'deit_small_patch16_shrink_base'"):
        resolve_arch("deit_smal_patch16_shrink_base")
    with pytest.raises(UsageError, match="unknown model 'resnet50'"):
        EvitConfig("resnet50")


def test_usage_errors_are_exit_code_2():
    assert UsageError.exit_code == 2 and EvitDeployError.exit_code == 1
    assert issubclass(UsageError, EvitDeployError)


@pytest.mark.parametrize(
    "alias, canonical, dim, heads",
    [
        ("deit_tiny_patch16_shrink_base", TINY, 192, 3),
        ("deit_small_patch16_shrink_base", SMALL, 384, 6),
        ("deit_base_patch16_shrink_base", BASE, 768, 12),
    ],
)
def test_official_names_are_aliases(alias, canonical, dim, heads):
    config = EvitConfig(alias, 0.7)
    assert config.model == canonical
    assert (config.arch.embed_dim, config.arch.num_heads, config.arch.depth) == (dim, heads, 12)
    assert config == EvitConfig(canonical, 0.7)


@pytest.mark.parametrize(
    "text, expected",
    [("3,6,9", (3, 6, 9)), ("", ()), (" 3, 6 ", (3, 6)), ("0", (0,)), ("3,6,", (3, 6))],
)
def test_parse_drop_loc(text, expected):
    assert parse_drop_loc(text) == expected


@pytest.mark.parametrize("text", ["a", "3;6", "3.5"])
def test_parse_drop_loc_refuses_junk(text):
    with pytest.raises(UsageError, match="comma-separated"):
        parse_drop_loc(text)


# --------------------------------------------------------------------------------------------
# MACs and parameters


def test_deit_small_macs_match_the_paper():
    published = {1.0: 4.6, 0.9: 4.0, 0.8: 3.5, 0.7: 3.0, 0.6: 2.6, 0.5: 2.3}
    got = {k: round(count_macs(EvitConfig(SMALL, k)) / 1e9, 1) for k in published}
    assert got == published


def hand_macs(dim, keep_rate, drop_loc=PUBLISHED_DROP_LOC, fuse_token=True, img_size=224,
              num_classes=1000):
    """Matmul MACs written out: patch conv, per block qkv, q@k^T, attn@v, proj (on the tokens
    entering) and the two MLP layers (on the tokens leaving), and the head."""
    grid = img_size // 16
    entering, last = expected_tokens(grid * grid, keep_rate, drop_loc, fuse_token)
    leaving = entering[1:] + [last]
    total = grid * grid * (3 * 16 * 16) * dim
    for n_in, n_out in zip(entering, leaving):
        n, m = n_in + 1, n_out + 1  # class token included
        total += n * dim * (3 * dim)  # qkv
        total += n * n * dim  # q @ k^T over all heads
        total += n * n * dim  # attn @ v
        total += n * dim * dim  # proj
        total += m * dim * (4 * dim) + m * (4 * dim) * dim  # fc1, fc2
    return total + dim * num_classes


@pytest.mark.parametrize("model_name, dim", [(TINY, 192), (BASE, 768)])
@pytest.mark.parametrize("keep_rate", KEEP_RATES)
def test_macs_hand_count(model_name, dim, keep_rate):
    assert count_macs(EvitConfig(model_name, keep_rate)) == hand_macs(dim, keep_rate)
    unfused = EvitConfig(model_name, keep_rate, (2, 5, 8), fuse_token=False, img_size=288)
    assert count_macs(unfused) == hand_macs(dim, keep_rate, (2, 5, 8), False, 288)


def measured_macs(model: EViT, img_size: int) -> int:
    """MACs the model actually executes for one image, counted from the layers' input shapes."""
    total = 0

    def linear(module, inp, _out):
        nonlocal total
        rows = inp[0].numel() // module.in_features
        total += rows * module.in_features * module.out_features

    def conv(module, _inp, out):
        nonlocal total
        kh, kw = module.kernel_size
        total += out.numel() * module.in_channels * kh * kw

    def attention(_module, inp, _out):
        nonlocal total
        _, n, c = inp[0].shape
        total += 2 * n * n * c  # q @ k^T and attn @ v

    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif type(module).__name__ == "Attention":
            hooks.append(module.register_forward_hook(attention))
    try:
        with torch.no_grad():
            model(torch.from_numpy(natural_images(1, img_size)))
    finally:
        for hook in hooks:
            hook.remove()
    return total


@pytest.mark.parametrize(
    "keep_rate, drop_loc, fuse_token, img_size",
    [(0.7, PUBLISHED_DROP_LOC, True, 224), (0.5, PUBLISHED_DROP_LOC, False, 224),
     (1.0, PUBLISHED_DROP_LOC, True, 224), (0.6, (0,), True, 160), (0.5, ALL_BUT_FIRST, True, 224)],
)
def test_macs_equal_what_the_model_executes(keep_rate, drop_loc, fuse_token, img_size):
    config = config_for(TINY, keep_rate, drop_loc, fuse_token, img_size)
    assert count_macs(config) == measured_macs(model_with(config), img_size)


@pytest.mark.parametrize(
    "model_name, img_size, num_classes",
    [(TINY, 224, 1000), (SMALL, 224, 1000), (BASE, 224, 1000), (TINY, 288, 10), (SMALL, 160, 37)],
)
def test_count_params_equals_the_built_model(model_name, img_size, num_classes):
    config = config_for(model_name, 0.7, PUBLISHED_DROP_LOC, True, img_size, num_classes)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = EViT(config)
    assert count_params(config) == sum(p.numel() for p in model.parameters())
    # keep rate and fusion add no parameters
    assert count_params(config_for(model_name, 1.0, (), False, img_size, num_classes)) == count_params(config)


def test_deit_small_has_the_published_parameter_count():
    assert round(count_params(EvitConfig(SMALL)) / 1e6, 1) == 22.1
