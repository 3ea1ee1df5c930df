"""The object patches of a labelled dataset (objects.json, written by `evit-deploy dataset shapes`)
and the share of them a model keeps: what eval's object recall and the precision gates both read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from evit_deploy.data.shapes import OBJECTS_FILE
from evit_deploy.errors import EvitDeployError


def read_objects(data_dir: str | Path) -> list[dict]:
    """[{file, patches}] in the file's order; file is relative to data_dir."""
    path = Path(data_dir) / OBJECTS_FILE
    try:
        objects = json.loads(path.read_text(encoding="utf-8"))
        return [{"file": o["file"], "patches": list(map(int, o["patches"]))} for o in objects]
    except FileNotFoundError:
        raise EvitDeployError(f"{data_dir} has no {OBJECTS_FILE} (write one with `evit-deploy dataset shapes`)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvitDeployError(f"cannot read {path}: {exc}") from None


def object_patches_of(data_dir: str | Path, files: list[Path]) -> list[list[int]] | None:
    """Each file's object patches, or None when data_dir has no objects.json or it misses one of
    the files (then object recall cannot be measured on them)."""
    if not (Path(data_dir) / OBJECTS_FILE).is_file():
        return None
    by_file = {os.path.normpath(o["file"]): o["patches"] for o in read_objects(data_dir)}
    names = [os.path.normpath(os.path.relpath(f, data_dir)) for f in files]
    if any(name not in by_file for name in names):
        return None
    return [by_file[name] for name in names]


def patch_recall(
    kept_ids: list[np.ndarray], object_patches: list[list[int]], num_patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """[images, drops] object recall and background kept, from the original patch ids each drop
    block kept (kept_patch_ids; fused-token ids >= num_patches are neither object nor
    background). An image without object patches has recall NaN."""
    images, drops = len(object_patches), len(kept_ids)
    recall = np.full((images, drops), np.nan)
    background = np.zeros((images, drops))
    for i, patches in enumerate(object_patches):
        is_object = np.zeros(num_patches, dtype=bool)
        is_object[patches] = True
        for j, ids in enumerate(kept_ids):
            kept = np.zeros(num_patches, dtype=bool)
            kept[ids[i][ids[i] < num_patches]] = True
            if is_object.any():
                recall[i, j] = (kept & is_object).sum() / is_object.sum()
            background[i, j] = (kept & ~is_object).sum() / max(1, (~is_object).sum())
    return recall, background


def square_side(path: Path) -> int:
    """The side of a square image file (0 if not square); reads the header only."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return width if width == height else 0
