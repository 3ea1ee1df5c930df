"""Known answers for DeiT preprocessing, worked out by hand, not taken from evit_deploy.preprocess.

The images are stripes: red switches between 0 and 255 every 20 columns, green every 20 rows, blue
is constant. Resizing moves an edge between stripes from input position x to x * resized / input;
the center crop then moves it left by the crop offset. Bicubic resampling is symmetric, so the
edge is where the profile crosses the middle level, to about 0.1 pixel. The plateaus keep their
exact values, so 0, 255 and the blue constant give the normalisation exactly.

The resize target and crop box follow timm's DeiT eval transform (torchvision Resize + CenterCrop):
the short side becomes floor(img_size / crop_pct), the long side int(short * long / short_in), and
the crop offset is int(round((resized - img_size) / 2)), where Python's round takes .5 to even.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from PIL import Image

from evit_deploy.errors import EvitDeployError
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.model import EvitConfig
from evit_deploy.preprocess import (
    SAMPLE_IMAGE, ImageTooLarge, load_image, preprocess, resize_and_crop,
)
from evit_deploy.runtime import Predictor
from evit_deploy.runtime.base import Backend
from evit_deploy.serve.rest import RequestError, decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / STD, written out
IMAGENET_STD = (0.229, 0.224, 0.225)
PERIOD = 20  # stripe width in input pixels
BLUE = 64
EDGE_TOLERANCE = 0.25  # pixels; a wrong offset or resize target moves edges by 1 or more

# (width, height, img_size, crop_pct) -> (resized width, height), (crop left, top), by hand:
KNOWN = {
    # floor(224 / 0.875) = 256; 256 * 400 / 300 = 341.3 -> 341; (341 - 224) / 2 = 58.5 -> 58
    (300, 400, 224, 0.875): ((256, 341), (16, 58)),
    (400, 300, 224, 0.875): ((341, 256), (58, 16)),
    (320, 320, 224, 0.875): ((256, 256), (16, 16)),
    # no margin: 224 * 400 / 300 = 298.7 -> 298; (298 - 224) / 2 = 37
    (300, 400, 224, 1.0): ((224, 298), (0, 37)),
    (400, 300, 224, 1.0): ((298, 224), (37, 0)),
    (320, 320, 224, 1.0): ((224, 224), (0, 0)),
    # floor(160 / 0.875) = floor(182.86) = 182; 182 * 400 / 300 = 242.7 -> 242; (242 - 160) / 2 = 41
    (300, 400, 160, 0.875): ((182, 242), (11, 41)),
    # 160 * 400 / 300 = 213.3 -> 213; (213 - 160) / 2 = 26.5 -> 26
    (400, 300, 160, 1.0): ((213, 160), (26, 0)),
}


def stripes(width: int, height: int) -> np.ndarray:
    x, y = np.arange(width), np.arange(height)
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = np.where(x // PERIOD % 2, 255, 0)[None, :]
    image[..., 1] = np.where(y // PERIOD % 2, 255, 0)[:, None]
    image[..., 2] = BLUE
    return image


def crossings(profile: np.ndarray, level: float) -> np.ndarray:
    """Where a 1-D profile crosses `level`, linearly interpolated between pixel centers."""
    found = []
    for k in range(len(profile) - 1):
        a, b = float(profile[k]), float(profile[k + 1])
        if (a - level) * (b - level) < 0:
            found.append(k + 0.5 + (level - a) / (b - a))
    return np.array(found)


def check_stripes(chw: np.ndarray, width: int, height: int, img_size: int, crop_pct: float, mean, std) -> None:
    """`chw` is the preprocessed stripes(width, height): edges where the hand-worked resize and
    crop put them, plateaus and blue normalised with `mean` and `std`."""
    (resized_w, resized_h), (left, top) = KNOWN[(width, height, img_size, crop_pct)]
    assert chw.shape == (3, img_size, img_size) and chw.dtype == np.float32
    low = [(0.0 - m) / s for m, s in zip(mean, std)]
    high = [(1.0 - m) / s for m, s in zip(mean, std)]
    middle = [(0.5 - m) / s for m, s in zip(mean, std)]
    for c in (0, 1):
        assert chw[c].min() == pytest.approx(low[c], abs=1e-5), f"channel {c}: black is not {low[c]:.5f}"
        assert chw[c].max() == pytest.approx(high[c], abs=1e-5), f"channel {c}: white is not {high[c]:.5f}"
    assert np.allclose(chw[2], (BLUE / 255 - mean[2]) / std[2], atol=1e-5), "blue is not normalised as expected"
    for c, size_in, resized, offset, profile in (
        (0, width, resized_w, left, chw[0, img_size // 2, :]),
        (1, height, resized_h, top, chw[1, :, img_size // 2]),
    ):
        expected = np.arange(PERIOD, size_in, PERIOD) * resized / size_in - offset
        found = crossings(profile, middle[c])
        inside = lambda p: (p > 2) & (p < img_size - 2)  # noqa: E731 - edges cut by the crop border
        axis = "x" if c == 0 else "y"
        for e in expected[inside(expected)]:
            assert np.abs(found - e).min() <= EDGE_TOLERANCE, f"{axis}: no edge near {e:.2f}; found {np.round(found, 2)}"
        for f in found[inside(found)]:
            assert np.abs(expected - f).min() <= EDGE_TOLERANCE, f"{axis}: edge at {f:.2f} where none belongs; expected {np.round(expected, 2)}"


@pytest.mark.parametrize("width, height, img_size, crop_pct", [k for k in KNOWN if k[2] == 224], ids=str)
def test_deit_defaults_resize_crop_and_normalise_as_worked_out(width, height, img_size, crop_pct):
    if crop_pct == 0.875:
        batch = preprocess([stripes(width, height)])  # DeiT's defaults
    else:
        batch = preprocess([stripes(width, height)], img_size, crop_pct=crop_pct)
    check_stripes(batch[0], width, height, img_size, crop_pct, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("width, height, img_size, crop_pct", list(KNOWN), ids=str)
def test_explicit_settings_are_used(width, height, img_size, crop_pct):
    """Another model's mean/std (here Inception's 0.5/0.5 and an uneven one), crop and size."""
    for mean, std in (((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.2, 0.4, 0.6), (0.3, 0.2, 0.1))):
        batch = preprocess([stripes(width, height)], img_size, mean, std, crop_pct, "bicubic")
        check_stripes(batch[0], width, height, img_size, crop_pct, mean, std)


class CapturingBackend(Backend):
    """Records the tensors it is given; answers zeros."""

    name = "capturing"

    def __init__(self, metadata: ArtifactMetadata):
        self.metadata = metadata
        self.inputs: list[np.ndarray] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.inputs.append(batch.copy())
        return np.zeros((len(batch), self.metadata.num_classes), np.float32)


def test_predict_preprocesses_with_the_artifacts_own_settings():
    """A model that carries crop_pct 1.0, its own mean/std and a 160 px input in its metadata."""
    mean, std = (0.5, 0.45, 0.4), (0.25, 0.3, 0.35)
    metadata = dataclasses.replace(
        ArtifactMetadata.from_config(EvitConfig("deit_tiny_patch16_224", 0.7, img_size=160)),
        mean=list(mean), std=list(std), crop_pct=1.0,
    )
    backend = CapturingBackend(metadata)
    Predictor(backend).predict([stripes(400, 300)])
    (batch,) = backend.inputs
    check_stripes(batch[0], 400, 300, 160, 1.0, mean, std)


# -- cost bounded by the output (issue 19): thin images and damaged crop settings


def _resize_then_crop(image, img_size, crop_pct):
    """torchvision's order, worked out separately: resize the short side, then center-crop."""
    short = math.floor(img_size / crop_pct)
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = round((size[0] - img_size) / 2), round((size[1] - img_size) / 2)
    return image.resize(size, Image.BICUBIC).crop((left, top, left + img_size, top + img_size))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_cropping_before_resizing_matches_resize_then_crop_on_a_photograph(transpose, crop_pct):
    photo = Image.open(SAMPLE_IMAGE).convert("RGB")
    if transpose:
        photo = photo.transpose(Image.TRANSPOSE)
    expected = np.asarray(_resize_then_crop(photo, 224, crop_pct), np.int16)
    got = np.asarray(resize_and_crop(photo, 224, crop_pct), np.int16)
    assert got.shape == expected.shape == (224, 224, 3)
    assert np.abs(got - expected).max() <= 1
    assert (got != expected).mean() < 0.01


def test_a_thin_image_costs_no_more_memory_than_the_output():
    """1 x 20000 pixels once peaked at 5.3 GB (resized to 224 x 4.5 million before the crop).
    resize_and_crop runs here without load_image's aspect-ratio check, under a 1 GiB address-space
    limit, in a child process that imports only PIL and numpy."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        "from PIL import Image\n"
        "from evit_deploy.preprocess import resize_and_crop\n"
        "for size in [(1, 20000), (20000, 1), (3, 200000)]:\n"
        "    out = resize_and_crop(Image.new('RGB', size, (9, 99, 199)), 224, 0.875)\n"
        "    assert out.size == (224, 224) and out.getpixel((100, 100)) == (9, 99, 199), out\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("size", [(1, 8000), (8000, 1), (20, 401)])
def test_images_thinner_than_20_to_1_are_refused_before_decoding(tmp_path, size):
    path = tmp_path / "thin.png"
    Image.new("RGB", size).save(path)
    with pytest.raises(ImageTooLarge, match=r"more than 20:1; crop it"):
        load_image(path)
    with pytest.raises(ImageTooLarge, match=r"more than 20:1"):
        load_image(np.zeros((size[1], size[0], 3), np.uint8))


def test_an_image_of_exactly_20_to_1_is_accepted():
    assert preprocess([np.zeros((20, 400, 3), np.uint8)]).shape == (1, 3, 224, 224)


@pytest.mark.parametrize("crop_pct", [1e-9, 0.001, 0.2, 1.5])
def test_artifacts_with_a_crop_pct_out_of_range_are_refused_as_damaged(crop_pct):
    meta = ArtifactMetadata.from_config(EvitConfig("deit_tiny_patch16_224"), crop_pct=crop_pct)
    with pytest.raises(EvitDeployError, match=r"damaged evit-deploy metadata \(crop_pct must be"):
        ArtifactMetadata.from_props(meta.to_props(), "model.onnx")


def test_rest_front_answers_413_for_thin_and_oversized_images():
    buffer = io.BytesIO()
    Image.new("RGB", (1, 8000)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 200  # a few bytes on the wire
    with pytest.raises(RequestError) as thin:
        decode_image(buffer.getvalue(), 40_000_000)
    assert thin.value.status == 413 and "more than 20:1" in thin.value.message
    with pytest.raises(RequestError) as huge:  # over PIL's own bomb guard: was a 400
        decode_image(_png_declaring(20_000, 20_000), 40_000_000)
    assert huge.value.status == 413


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
