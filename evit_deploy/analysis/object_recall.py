"""Does EViT keep the object? Kept tokens against the object masks of a labelled dataset.

A dataset written by `evit-deploy dataset shapes` lists, in objects.json, the patches each image's
object covers. For every drop block this counts the share of those patches that are still kept
(object recall) and the share of the other patches still kept (background kept). A model whose
class attention finds the object keeps nearly all of it in the first drop block while the
background is thinned, and still favours it after the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evit_deploy.data.samples import spread_subset
from evit_deploy.data.objects import patch_recall, read_objects, square_side
from evit_deploy.data.shapes import OBJECTS_FILE
from evit_deploy.errors import EvitDeployError
from evit_deploy.model.vit import kept_patch_ids
from evit_deploy.preprocess import preprocess
from evit_deploy.runtime.base import Backend

CHUNK = 50


@dataclass(frozen=True)
class BlockRecall:
    block: int
    keep: int  # TopK's K in this block
    object_recall: float  # mean over images of |kept & object| / |object|
    background_kept: float  # mean over images of |kept & background| / |background|


@dataclass(frozen=True)
class RecallReport:
    images: int
    object_share: float  # mean share of the patches that are object
    blocks: list[BlockRecall]

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "object_share": self.object_share,
            "blocks": [b.__dict__ for b in self.blocks],
        }


def object_recall(source: Backend, data_dir: str | Path, limit: int | None = None) -> RecallReport:
    """Object recall per drop block of a token source (analysis.visualize.load_token_source) on
    the images listed in data_dir/objects.json (`limit` of them spread over the list, as eval
    picks them)."""
    from evit_deploy.analysis.visualize import kept_token_indices

    meta = source.metadata
    config = meta.to_config()
    objects = spread_subset(read_objects(data_dir), limit)
    if not objects:
        raise EvitDeployError(f"{Path(data_dir) / OBJECTS_FILE} lists no images")
    if meta.crop_pct != 1.0:
        raise EvitDeployError(
            f"object recall needs the images to reach the model unchanged, so that the patches "
            f"in {OBJECTS_FILE} are the model's patches; this model crops (crop_pct "
            f"{meta.crop_pct:g})"
        )
    recalls, backgrounds = [], []
    for start in range(0, len(objects), CHUNK):
        chunk = objects[start : start + CHUNK]
        paths = [Path(data_dir) / o["file"] for o in chunk]
        batch = preprocess(paths, meta.img_size, meta.mean, meta.std, meta.crop_pct, meta.interpolation)
        sizes = {square_side(p) for p in paths}
        if sizes != {meta.img_size}:
            raise EvitDeployError(
                f"object recall needs {meta.img_size} px images (the model's input size); "
                f"{data_dir} has {sorted(sizes)}"
            )
        kept = kept_patch_ids(kept_token_indices(source, batch), config.num_patches, config.fuse_token)
        recall, background = patch_recall(kept, [o["patches"] for o in chunk], config.num_patches)
        recalls.append(recall)
        backgrounds.append(background)
    recall, background = np.concatenate(recalls), np.concatenate(backgrounds)
    object_share = float(np.mean([len(o["patches"]) for o in objects]) / config.num_patches)
    drops = [b for b in config.token_plan if b.keep is not None]
    return RecallReport(
        images=len(objects),
        object_share=object_share,
        blocks=[
            BlockRecall(b.block, b.keep, float(np.nanmean(recall[:, j])), float(background[:, j].mean()))
            for j, b in enumerate(drops)
        ],
    )
