"""Checkpoint loading: every container format, pos_embed resampling, inferred heads and
architectures, and clear errors (never code execution) for bad files."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import SMALL, TINY, config_for, fresh_model, natural_images, random_images
from evit_deploy.errors import EvitDeployError
from evit_deploy.model import EViT, build_model, read_state_dict
from evit_deploy.model import EvitConfig, EvitOverrides
from evit_deploy.model.checkpoint import CheckpointError, checkpoint_config, infer_model_name

CONFIG = config_for(TINY, 0.7)
SOURCE_SEED = 7


@pytest.fixture(scope="module")
def source():
    """A tiny EViT with seed-7 weights, some images and its logits on them."""
    model = fresh_model(CONFIG, seed=SOURCE_SEED)
    images = torch.from_numpy(np.concatenate([random_images(1), natural_images(1)]))
    with torch.no_grad():
        logits = model(images)
    return model, images, logits


def state_of(model: EViT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits_of(model: EViT, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Formats


def _official(sd, path):
    torch.save({"model": sd}, path)


def _official_training(sd, path):
    """What the official EViT/DeiT main.py writes: optimizer, scheduler, EMA, scaler and the
    argparse Namespace of the run next to the weights."""
    ema = {k: v + 1.0 for k, v in sd.items()}  # different weights: 'model' must win
    args = argparse.Namespace(model="deit_tiny_patch16_shrink_base", base_keep_rate=0.7,
                              drop_loc="(3, 6, 9)", fuse_token=True, lr=5e-4, output_dir="out")
    torch.save(
        {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
            "lr_scheduler": {"decay_rate": 0.1, "t_in_epochs": True},
            "epoch": 299,
            "model_ema": ema,
            "scaler": {"scale": 65536.0, "_growth_tracker": 10},
            "args": args,
        },
        path,
    )


def _ema_only(sd, path):
    torch.save({"model_ema": sd, "epoch": 3}, path)


def _state_dict_key(sd, path):
    torch.save({"state_dict": sd, "epoch": 3}, path)


def _raw(sd, path):
    torch.save(sd, path)


def _module_prefix(sd, path):
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)


def _compiled_prefix(sd, path):
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, path)


def _legacy_format(sd, path):
    torch.save({"model": sd}, path, _use_new_zipfile_serialization=False)


def _safetensors(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


FORMATS = {
    "official.pth": _official,
    "official_training.pth": _official_training,
    "state_dict.pth": _state_dict_key,
    "ema_only.pth": _ema_only,
    "raw.pt": _raw,
    "module_prefix.pth": _module_prefix,
    "compiled_prefix.pth": _compiled_prefix,
    "legacy.pth": _legacy_format,
    "weights.safetensors": _safetensors,
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_loads_the_same_model(name, source, tmp_path):
    model, images, expected = source
    path = tmp_path / name
    FORMATS[name](state_of(model), path)
    loaded = build_model(CONFIG, path)
    assert not loaded.training
    assert loaded.config == CONFIG
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(logits_of(loaded, images), expected)
    assert loaded.checkpoint == str(path.resolve())
    assert loaded.weights == f"sha256:{sha256(path)}"


def test_loaded_weights_are_not_random(source, tmp_path):
    """Guards the test above: another seed gives other logits."""
    model, images, expected = source
    other = fresh_model(CONFIG, seed=SOURCE_SEED + 1)
    assert not torch.allclose(logits_of(other, images), expected)


def test_half_precision_checkpoint_is_upcast(source, tmp_path):
    model, images, _ = source
    path = tmp_path / "half.pth"
    torch.save({"model": {k: v.half() for k, v in state_of(model).items()}}, path)
    loaded = build_model(CONFIG, path)
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == torch.float32
        assert torch.equal(got, value.half().float()), key


def test_read_state_dict_returns_plain_keys(source, tmp_path):
    model, _, _ = source
    path = tmp_path / "m.pth"
    _module_prefix(state_of(model), path)
    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())


# --------------------------------------------------------------------------------------------
# pos_embed resampling and inferred heads


@pytest.mark.parametrize("img_size", [256, 160, 288])
def test_pos_embed_is_resampled_bicubically(source, tmp_path, img_size):
    model, _, _ = source
    path = tmp_path / "m224.pth"
    _official(state_of(model), path)
    loaded = build_model(config_for(TINY, 0.7, img_size=img_size), path)

    grid, dim = img_size // 16, 192
    pos = loaded.pos_embed.detach()
    assert pos.shape == (1, 1 + grid * grid, dim)
    source_pos = model.pos_embed.detach()
    assert torch.equal(pos[:, :1], source_pos[:, :1])  # class position untouched
    old = source_pos[:, 1:].reshape(1, 14, 14, dim).permute(0, 3, 1, 2)
    new = F.interpolate(old, size=(grid, grid), mode="bicubic", align_corners=False)
    expected = new.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    torch.testing.assert_close(pos[:, 1:], expected, rtol=0, atol=1e-6)
    # Everything else is copied as it is, and the model runs at the new size.
    for key, value in model.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(loaded.state_dict()[key], value), key
    logits = logits_of(loaded, torch.from_numpy(natural_images(1, img_size)))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_pos_embed_at_the_same_size_is_untouched(source, tmp_path):
    model, _, _ = source
    path = tmp_path / "m.pth"
    _official(state_of(model), path)
    assert torch.equal(build_model(CONFIG, path).pos_embed, model.pos_embed)


def test_non_square_pos_embed_is_an_error(source, tmp_path):
    model, _, _ = source
    sd = state_of(model)
    sd["pos_embed"] = sd["pos_embed"][:, :-1]  # class + 195 patches
    path = tmp_path / "m.pth"
    _official(sd, path)
    with pytest.raises(CheckpointError, match="square grid"):
        build_model(CONFIG, path)


def test_num_classes_comes_from_the_head(tmp_path):
    ten = fresh_model(config_for(TINY, 0.7, num_classes=10), seed=3)
    path = tmp_path / "ten.pth"
    _official(state_of(ten), path)
    loaded = build_model(CONFIG, path)  # CONFIG says 1000
    assert loaded.config.num_classes == 10
    assert loaded.head.weight.shape == (10, 192)
    images = torch.from_numpy(natural_images(2))
    assert logits_of(loaded, images).shape == (2, 10)
    assert torch.equal(logits_of(loaded, images), logits_of(ten, images))


@pytest.mark.parametrize("name", [TINY, SMALL, "deit_base_patch16_224"])
def test_architecture_is_inferred_from_the_weights(name):
    with torch.device("meta"):
        state = EViT(config_for(name, 0.7)).state_dict()
    assert infer_model_name(state) == name


def test_checkpoint_config_reads_the_architecture_unless_one_is_named(source, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"model": state_of(source[0])}, path)
    config, state = checkpoint_config(path, EvitOverrides(keep_rate=0.5))
    assert (config.model, config.keep_rate) == (TINY, 0.5) and "cls_token" in state
    named, _ = checkpoint_config(path, EvitOverrides(model=SMALL))  # a contradiction fails when the weights load
    assert named.model == SMALL
    with pytest.raises(CheckpointError, match="does not fit deit_small_patch16_224"):
        build_model(named, path)
    assert checkpoint_config(None, EvitOverrides(img_size=160)) == (EvitConfig(img_size=160), None)


def test_unknown_architecture_is_reported():
    with torch.device("meta"):
        state = EViT(config_for(TINY, 0.7)).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    with pytest.raises(CheckpointError, match="matches no known architecture.*11 blocks"):
        infer_model_name(state, "x.pth")


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_keys_are_named(source, tmp_path):
    model, _, _ = source
    sd = state_of(model)
    del sd["blocks.3.mlp.fc1.weight"], sd["norm.bias"]
    path = tmp_path / "missing.pth"
    _official(sd, path)
    with pytest.raises(CheckpointError) as info:
        build_model(CONFIG, path)
    message = str(info.value)
    assert "missing keys: blocks.3.mlp.fc1.weight, norm.bias" in message
    assert str(path) in message and TINY in message
    assert "unexpected" not in message and "shape mismatch" not in message


def test_unexpected_keys_are_named(source, tmp_path):
    model, _, _ = source
    sd = state_of(model)
    sd["head_dist.weight"] = torch.zeros(1000, 192)
    sd["dist_token"] = torch.zeros(1, 1, 192)
    path = tmp_path / "distilled.pth"
    _official(sd, path)
    with pytest.raises(CheckpointError, match="unexpected keys: dist_token, head_dist.weight"):
        build_model(CONFIG, path)


def test_wrong_architecture_reports_shape_mismatches(source, tmp_path):
    model, _, _ = source
    path = tmp_path / "tiny.pth"
    _official(state_of(model), path)
    with pytest.raises(CheckpointError) as info:
        build_model(config_for(SMALL, 0.7), path)
    message = str(info.value)
    assert "shape mismatch: " in message
    assert "cls_token (1, 1, 192) (model: (1, 1, 384))" in message
    assert "more)" in message  # the long list is cut short
    assert SMALL in message and "--model" in message


def test_many_missing_keys_are_summarised(source, tmp_path):
    model, _, _ = source
    sd = {k: v for k, v in state_of(model).items() if not k.startswith("blocks.")}
    path = tmp_path / "headless.pth"
    _official(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys: .*\(\+\d+ more\)"):
        build_model(CONFIG, path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_model(CONFIG, tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path)  # a directory


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        build_model(CONFIG, path)


@pytest.mark.parametrize("name", ["official.pth", "legacy.pth", "weights.safetensors"])
@pytest.mark.parametrize("fraction", [0.5, 0.99])
def test_truncated_file(source, tmp_path, name, fraction):
    model, _, _ = source
    whole = tmp_path / f"whole_{name}"
    FORMATS[name](state_of(model), whole)
    data = whole.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated or corrupted|refused") as info:
        build_model(CONFIG, path)
    assert str(path) in str(info.value)


def _junk(seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 3, 10, 100, 4096])))


JUNK = [
    b"hello world, this is not a checkpoint\n" * 10,
    b"N",
    b"PK\x03\x04not really a zip",
    b"\x80\x02}q\x00.",  # a pickled empty dict: readable, but no state dict inside
    b"\x80\x04K\x01.",  # a pickled int
    *(_junk(seed) for seed in range(60)),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_junk_bytes_are_a_checkpoint_error(tmp_path, suffix):
    """Whatever the bytes, the user gets a CheckpointError (never KeyError, IndexError ...)."""
    for i, data in enumerate(JUNK):
        path = tmp_path / f"junk{i}{suffix}"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
        assert str(path) in str(info.value), (data[:20], info.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(CheckpointError, match=r"holds no state dict.*found keys \['epoch', 'note'\]"):
        read_state_dict(path)
    path2 = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path2)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(path2)


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_the_malicious_payload_really_runs_code(tmp_path):
    """Guards the next test: unpickled without protection, the payload creates its file."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump", "pickle protocol 2"])
def test_pickled_code_is_refused_and_never_run(source, tmp_path, writer):
    model, _, _ = source
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": state_of(model), "extra": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2 if writer.endswith("2") else None)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        build_model(CONFIG, path)
    message = str(info.value)
    assert "refused" in message and "weights_only" in message
    assert str(path) in message
    assert not marker.exists(), "the checkpoint's code ran"


def test_checkpoint_errors_are_user_errors():
    assert issubclass(CheckpointError, EvitDeployError)
    assert CheckpointError.exit_code == 1
