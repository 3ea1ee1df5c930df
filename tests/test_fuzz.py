"""Fuzz the two paths that read untrusted bytes: image decoding and checkpoint loading.

Random bytes, truncations, flipped bytes and inserted junk, derived from valid files of every
format the paths accept: a fixed number of cases from a fixed seed, so every run tries the same
files however busy the machine. The only exception allowed out is EvitDeployError (one clear
line); a crash, another exception type or executed code fails.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from evit_deploy.errors import EvitDeployError
from evit_deploy.model.checkpoint import read_state_dict
from evit_deploy.preprocess import load_image

CASES = 600  # per path: about 2 s each on a busy 2-core machine


def image_seeds() -> dict[str, bytes]:
    """Small valid images in every format and mode the decoder is likely to meet."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    variants = {
        "png": (rgb, "PNG"),
        "jpeg": (rgb, "JPEG"),
        "gif": (rgb, "GIF"),
        "bmp": (rgb, "BMP"),
        "webp": (rgb, "WEBP"),
        "tiff": (rgb, "TIFF"),
        "ico": (rgb, "ICO"),
        "ppm": (rgb, "PPM"),
        "rgba.png": (rgb.convert("RGBA"), "PNG"),
        "gray16.png": (Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)), "PNG"),
        "float.tiff": (Image.fromarray(rng.standard_normal((24, 32)).astype(np.float32)), "TIFF"),
    }
    seeds = {}
    for name, (image, fmt) in variants.items():
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        seeds[name] = buffer.getvalue()
    return seeds


def checkpoint_seeds() -> dict[str, bytes]:
    """A state dict as torch zip, legacy torch pickle, wrapped training checkpoint, safetensors."""
    state = {"patch_embed.proj.weight": torch.randn(4, 3, 2, 2), "head.bias": torch.zeros(5)}
    seeds = {}
    for name, obj, zipped in (
        ("zip.pth", state, True),
        ("legacy.pth", state, False),
        ("wrapped.pth", {"model": state, "epoch": 3, "args": {"lr": 0.1}}, True),
    ):
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=zipped)
        seeds[name] = buffer.getvalue()
    seeds["st.safetensors"] = safetensors_bytes(state)
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # truncated download
        return data[: rng.randrange(len(data))]
    if kind == 1:  # bit rot
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        return bytes(damaged)
    if kind == 2:  # junk inserted
        at = rng.randrange(len(data))
        return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]
    if kind == 3:  # the right magic, then garbage
        return data[:16] + rng.randbytes(rng.randint(0, 512))
    return rng.randbytes(rng.randint(0, 512))


def fuzz(read: Callable[[Path], object], seeds: dict[str, bytes], folder: Path, seed: int) -> None:
    """Feed CASES mutated files to `read`; fail on anything but EvitDeployError."""
    rng = random.Random(seed)
    for _ in range(CASES):
        name = rng.choice(sorted(seeds))
        data = mutate(seeds[name], rng)
        path = folder / f"case{Path(name).suffix or '.' + name}"
        path.write_bytes(data)
        try:
            read(path)
        except EvitDeployError as exc:
            assert str(exc) and "\n" not in str(exc), str(exc)
        except Exception as exc:  # the bytes that caused it, for a regression test
            (folder / f"crash-{name}").write_bytes(data)
            raise AssertionError(
                f"{type(exc).__name__} escaped for a mutated {name} (saved as crash-{name}): {exc}"
            ) from exc


def test_seeds_are_valid(tmp_path):
    for name, data in image_seeds().items():
        (tmp_path / name).write_bytes(data)
        assert load_image(tmp_path / name).mode == "RGB"
    for name, data in checkpoint_seeds().items():
        (tmp_path / name).write_bytes(data)
        assert "head.bias" in read_state_dict(tmp_path / name)


# The mutated files make the libraries warn before they fail (the EvitDeployError is what is
# checked); these are the warnings of exactly those inputs, silenced here and nowhere else.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning:PIL.TiffImagePlugin")
@pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning:PIL.TiffImagePlugin")
def test_image_decoding_fuzz(tmp_path):
    fuzz(load_image, image_seeds(), tmp_path, seed=1)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning:torch._weights_only_unpickler")
def test_checkpoint_loading_fuzz(tmp_path):
    fuzz(read_state_dict, checkpoint_seeds(), tmp_path, seed=2)
