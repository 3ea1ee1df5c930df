"""The shapes dataset: one coloured object on class-free grey clutter, generated on the fly.

No image dataset can be downloaded where evit-deploy is developed, so the project generates one
that has what EViT exploits in real photographs: a single object on a minority of the patches
(typically 3-20 %), the rest background. The class is carried by colour AND shape: two colour
families of four shapes each, so colour alone narrows the class to four and the model has to
read the outline to finish. Colour is learnt in a few hundred steps and pulls the class attention
onto the object; telling four outlines apart needs several object patches over several blocks,
which is what makes accuracy fall when too few tokens are kept. (A first design, four colour
families of two shapes, trained to 99.3 % but was decided by block 3: its class attention there
kept no more of the object than of the background, and accuracy stayed flat down to keep 0.2.)

Everything is drawn from one numpy Generator, so a seed fixes every image; sample i of a seed is
its own Generator (seed, i), so images can be generated in any order or in parallel.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from evit_deploy.errors import EvitDeployError, UsageError

PATCH_SIZE = 16
# A patch counts as object when at least this share of its pixels belongs to the object.
OBJECT_PATCH_SHARE = 0.25
# Object area as a share of the image: what the patch counts in objects.json come out as.
MIN_AREA, MAX_AREA = 0.035, 0.17
# (colour family, hue in degrees) shared by the four shapes listed with it.
FAMILIES = (("red", 0.0), ("blue", 225.0))
SHAPES_BY_FAMILY = (("disk", "square", "triangle", "cross"), ("ring", "star", "bar", "crescent"))
SHAPES_PER_FAMILY = len(SHAPES_BY_FAMILY[0])
CLASSES = tuple(
    f"{family}_{shape}"
    for (family, _), shapes in zip(FAMILIES, SHAPES_BY_FAMILY)
    for shape in shapes
)
LABELS_FILE = "labels.txt"
OBJECTS_FILE = "objects.json"
SUPERSAMPLE = 2  # the object mask is drawn at 2x and averaged: anti-aliased edges


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # HWC uint8 RGB
    label: int
    patches: list[int]  # row-major ids of the patches that are at least a quarter object


def _regular_polygon(sides: int, phase: float = 0.0) -> list[np.ndarray]:
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return [np.stack([np.cos(angles), np.sin(angles)], 1)]


def _star(points: int = 5, inner: float = 0.45) -> list[np.ndarray]:
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return [np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)]


def _cross(arm: float = 0.34) -> list[np.ndarray]:
    a = arm
    return [np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
         (-1, -a), (-a, -a)], dtype=float,
    )]


def _bar() -> list[np.ndarray]:
    return [np.array([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)], dtype=float)]


# Unit outlines (radius ~1, centred); a second polygon is a hole. Area factors make the drawn area
# follow the sampled area whatever the shape.
_CIRCLE = _regular_polygon(64)[0]
OUTLINES = {
    "disk": [_CIRCLE],
    "square": _regular_polygon(4, math.pi / 4),
    "triangle": _regular_polygon(3, -math.pi / 2),
    "star": _star(),
    "ring": [_CIRCLE, 0.55 * _CIRCLE],
    "cross": _cross(),
    "crescent": [_CIRCLE, 0.85 * _CIRCLE + np.array([0.45, 0.0])],
    "bar": _bar(),
}


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _crescent_area() -> float:
    """Area of the unit disk minus the offset disk, by sampling a fine grid once."""
    grid = np.linspace(-1, 1, 801)
    x, y = np.meshgrid(grid, grid)
    inside = (x**2 + y**2 <= 1) & ((x - 0.45) ** 2 + y**2 > 0.85**2)
    return float(inside.mean() * 4)


UNIT_AREA = {
    name: _polygon_area(polys[0]) - sum(_polygon_area(h) for h in polys[1:])
    for name, polys in OUTLINES.items()
}
UNIT_AREA["crescent"] = _crescent_area()


def _clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey background with no class information: smooth noise, random lines, pixel noise."""
    coarse = rng.uniform(40, 215, size=(rng.integers(3, 9),) * 2).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    canvas = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8), mode="L")
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(4, 13)):
        ends = rng.uniform(-0.1, 1.1, size=4) * size
        draw.line(ends.tolist(), fill=int(rng.integers(0, 256)), width=int(rng.integers(1, 4)))
    grey = np.asarray(canvas, dtype=np.float32)
    grey = grey + rng.normal(0, rng.uniform(3, 12), size=grey.shape).astype(np.float32)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _object_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Anti-aliased [size, size] float mask in [0, 1] of one object at a random area, rotation and
    position (wholly inside the image)."""
    area = rng.uniform(MIN_AREA, MAX_AREA) * size * size
    scale = math.sqrt(area / UNIT_AREA[shape])
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygons = [p @ rotation.T * scale for p in OUTLINES[shape]]
    extent = np.abs(polygons[0]).max(0) + 1
    centre = rng.uniform(extent, size - extent)
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for i, polygon in enumerate(polygons):
        points = ((polygon + centre) * SUPERSAMPLE).ravel().tolist()
        draw.polygon(points, fill=255 if i == 0 else 0)
    mask = mask.resize((size, size), Image.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _object_colour(rng: np.random.Generator, hue_degrees: float) -> np.ndarray:
    hue = ((hue_degrees + rng.uniform(-12, 12)) % 360) / 360
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return np.asarray(rgb, dtype=np.float32) * 255


def object_patches(mask: np.ndarray, patch_size: int = PATCH_SIZE) -> list[int]:
    """Row-major ids of the patches whose pixels are at least OBJECT_PATCH_SHARE object."""
    grid = mask.shape[0] // patch_size
    share = mask[: grid * patch_size, : grid * patch_size].reshape(
        grid, patch_size, grid, patch_size
    ).mean(axis=(1, 3))
    return np.flatnonzero(share >= OBJECT_PATCH_SHARE).tolist()


def make_sample(seed: int, index: int, img_size: int = 224, label: int | None = None) -> Sample:
    """Sample `index` of the dataset with this seed (classes cycle, so any N is balanced)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(CLASSES) if label is None else label
    family, shape_index = divmod(label, SHAPES_PER_FAMILY)
    shape = SHAPES_BY_FAMILY[family][shape_index]
    background = _clutter(rng, img_size)
    mask = _object_mask(rng, shape, img_size)
    colour = _object_colour(rng, FAMILIES[family][1])
    shading = rng.normal(0, 6, size=(img_size, img_size, 1)).astype(np.float32)
    alpha = mask[:, :, None]
    image = background * (1 - alpha) + (colour + shading) * alpha
    return Sample(np.clip(image + 0.5, 0, 255).astype(np.uint8), label, object_patches(mask))



def write_dataset(
    output: str | Path,
    count: int,
    seed: int = 0,
    img_size: int = 224,
    force: bool = False,
    on_image: Callable[[int], None] = lambda done: None,
) -> Path:
    """Write `count` samples as an ImageFolder (lossless PNG, one folder per class name),
    labels.txt (class names in class-id order) and objects.json (each image's object patches).

    The folder appears complete or not at all: it is written beside its final name and renamed.
    An existing folder is replaced only with force.
    """
    output = Path(output)
    if count <= 0:
        raise UsageError(f"--count must be positive, got {count}")
    if img_size <= 0 or img_size % PATCH_SIZE:
        raise UsageError(f"--img-size must be a positive multiple of {PATCH_SIZE}, got {img_size}")
    if output.exists() and not force:
        raise UsageError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} is a file; give a folder path")
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=parent))
    try:
        for name in CLASSES:
            (tmp / name).mkdir()
        objects = []
        for index in range(count):
            sample = make_sample(seed, index, img_size)
            relative = f"{CLASSES[sample.label]}/{index:06d}.png"
            Image.fromarray(sample.image).save(tmp / relative, compress_level=1)
            objects.append({"file": relative, "label": CLASSES[sample.label], "patches": sample.patches})
            on_image(index + 1)
        (tmp / LABELS_FILE).write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
        (tmp / OBJECTS_FILE).write_text(json.dumps(objects, separators=(",", ":")), encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except OSError as exc:
        raise EvitDeployError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
