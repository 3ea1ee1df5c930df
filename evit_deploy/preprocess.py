"""DeiT evaluation preprocessing: resize the short side to floor(img_size / crop_pct) (bicubic),
center-crop img_size, scale to [0, 1], normalise with ImageNet mean/std. Same arithmetic as
torchvision's Resize + CenterCrop on PIL images, without depending on torchvision."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from evit_deploy.errors import EvitDeployError
from evit_deploy.model.config import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD

ASSETS = Path(__file__).parent / "assets"
SAMPLE_IMAGE = ASSETS / "grace_hopper.jpg"  # public-domain photograph (US Navy), as in matplotlib
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard (load_image checks it): about 8000 x 8000
# Longer side over shorter side. The center crop of a thinner image keeps under 1/20 of it, and a
# 1 x 200000 PNG is a few hundred bytes: refused as a user error rather than classified.
MAX_ASPECT_RATIO = 20
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_image(image) -> Image.Image:
    """A path, a PIL image or an HWC uint8 array (RGB, or gray HW) as an RGB PIL image."""
    if isinstance(image, (str, Path)):
        picture = _decode(Path(image))
    elif isinstance(image, Image.Image):
        picture = to_rgb(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[2] not in (1, 3, 4)
        ):
            raise EvitDeployError(
                f"image arrays must be HWC (or HW) uint8 with 1, 3 or 4 channels, got "
                f"{image.dtype} {image.shape}"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        picture = to_rgb(Image.fromarray(image))
    else:
        raise EvitDeployError(
            f"unsupported image type {type(image).__name__}: give a path, a PIL image or an HWC "
            "uint8 array"
        )
    if 0 in picture.size:
        raise EvitDeployError(f"image {_name(image)} has no pixels ({picture.width}x{picture.height})")
    check_aspect_ratio(picture.width, picture.height, _name(image))
    return picture


def check_aspect_ratio(width: int, height: int, name: str) -> None:
    """Refuse images thinner than MAX_ASPECT_RATIO : 1 (ImageTooLarge: the REST front's 413)."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageTooLarge(
            f"image {name + ' ' if name else ''}is {width}x{height}, more than "
            f"{MAX_ASPECT_RATIO}:1; crop it to the object first"
        )


def _decode(path: Path) -> Image.Image:
    """Decode a file, refusing images over MAX_IMAGE_PIXELS before their pixels are read."""
    if not path.exists():
        raise EvitDeployError(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _too_large(path, f" ({width}x{height})")
            if min(width, height) > 0:  # checked before the pixels are decoded
                check_aspect_ratio(width, height, str(path))
            return to_rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(path, "") from None
    except EvitDeployError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... on bad bytes
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvitDeployError(f"cannot decode image {path}: {reason}") from None


class ImageTooLarge(EvitDeployError):
    """An image refused for its size or shape before it costs memory (the REST front's 413)."""


def _too_large(path: Path, size: str) -> EvitDeployError:
    return ImageTooLarge(
        f"image {path} is over the {MAX_IMAGE_PIXELS:,}-pixel limit{size}; downscale it"
    )


def _name(image) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"({type(image).__name__})"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB: alpha is composited on white; 16-bit/float gray is rescaled."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image)
        if not np.isfinite(array).all():  # checked before the cast: a signalling NaN warns there
            raise EvitDeployError("image has NaN or Inf pixel values")
        array = array.astype(np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(array.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(
    image: Image.Image, img_size: int, crop_pct: float = CROP_PCT, interpolation: str = "bicubic"
) -> Image.Image:
    """torchvision's Resize(floor(img_size / crop_pct)) + CenterCrop(img_size), computed as one
    resize of the source region that the crop keeps (equal to within 1/255 where float rounding
    moves a tap), so the cost is bounded by the output, never by the resized image: a 1 x 8000
    image would otherwise become 224 x 1.8 million pixels before the crop."""
    return image.resize(
        (img_size, img_size), _RESAMPLE[interpolation],
        box=crop_box(image.width, image.height, img_size, crop_pct),
    )


def crop_box(
    width: int, height: int, img_size: int, crop_pct: float
) -> tuple[float, float, float, float]:
    """The source region (left, top, right, bottom) that resizing the short side to
    floor(img_size / crop_pct) and center-cropping img_size keeps, in source pixels."""
    short_target = math.floor(img_size / crop_pct)
    if width <= height:
        size = (short_target, int(short_target * height / width))
    else:
        size = (int(short_target * width / height), short_target)
    left = int(round((size[0] - img_size) / 2.0))
    top = int(round((size[1] - img_size) / 2.0))
    scale_x, scale_y = width / size[0], height / size[1]
    return (
        left * scale_x, top * scale_y, (left + img_size) * scale_x, (top + img_size) * scale_y
    )


def normalised(
    picture: Image.Image,
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = CROP_PCT,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """A decoded RGB image, resized, center-cropped and normalised: [3, img_size, img_size]."""
    cropped = resize_and_crop(picture, img_size, crop_pct, interpolation)
    chw = np.asarray(cropped, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (chw - mean_arr) / std_arr


def preprocess(
    images: Sequence,
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = CROP_PCT,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Images (paths, PIL images or HWC uint8 arrays) -> normalised NCHW float32 batch."""
    batch = np.empty((len(images), 3, img_size, img_size), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = normalised(load_image(image), img_size, mean, std, crop_pct, interpolation)
    return batch
