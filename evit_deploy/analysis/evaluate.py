"""Top-1 / top-5 accuracy on an ImageNet-style image folder, on any backend.

Layout: DATA_DIR/<class folder>/<images> as ImageNet val is usually unpacked. Classes come from,
in this order: a labels file (image path or class folder -> class index or WordNet id); folder
names that are the model's own class names (from its metadata); folder names that are ImageNet
WordNet ids (their index in the ImageNet class list, so a subset of the 1000 folders still gets
the right labels); otherwise the sorted folder order, as torchvision's ImageFolder does, when the
folder count equals the model's class count.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.preprocess import find_images, preprocess
from evit_deploy.runtime.labels import imagenet_classes
from evit_deploy.runtime.predictor import Predictor

WNID = re.compile(r"n\d{8}")
TOPK = 5


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int


@dataclass(frozen=True)
class EvalResult:
    images: int
    top1_correct: int
    top5_correct: int
    seconds: float  # wall time, decoding included
    model_seconds: float  # time inside the backend
    backend: dict

    @property
    def top1(self) -> float:
        return self.top1_correct / self.images

    @property
    def top5(self) -> float:
        return self.top5_correct / self.images

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("inf")

    @property
    def model_images_per_s(self) -> float:
        return self.images / self.model_seconds if self.model_seconds else float("inf")

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "top1": self.top1,
            "top5": self.top5,
            "top1_correct": self.top1_correct,
            "top5_correct": self.top5_correct,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "model_images_per_s": self.model_images_per_s,
            **self.backend,
        }


def imagenet_wnid_index() -> dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def read_labels_file(path: Path) -> dict[str, int]:
    """`name class` per line (tab, comma or space separated): name is an image path relative to
    the data folder (with or without its suffix) or a class folder; class is an index or an
    ImageNet WordNet id. Blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvitDeployError(f"cannot read labels file {path}: {exc}") from None
    wnids = imagenet_wnid_index()
    labels = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        separator = "\t" if "\t" in line else "," if "," in line else None
        parts = [p.strip() for p in line.split(separator, 1)]
        value = parts[1].split()[0] if len(parts) > 1 and parts[1].strip() else ""
        if value.isdigit():
            labels[parts[0]] = int(value)
        elif value in wnids:
            labels[parts[0]] = wnids[value]
        else:
            raise EvitDeployError(
                f"{path}:{number}: expected 'name class' with a class index or ImageNet WordNet "
                f"id, got '{line}'"
            )
    if not labels:
        raise EvitDeployError(f"labels file {path} has no entries")
    return labels


def find_samples(
    data_dir: str | Path,
    num_classes: int,
    labels_file: str | Path | None = None,
    class_names: Sequence[str] = (),
) -> list[Sample]:
    """Every image under data_dir with its class index, in sorted path order. class_names: the
    model's own names, which folders may be named after."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvitDeployError(f"data folder not found: {data_dir}")
    images = find_images(data_dir)
    if labels_file is not None:
        samples = _samples_from_labels(data_dir, images, read_labels_file(Path(labels_file)))
    else:
        samples = _samples_from_folders(data_dir, images, num_classes, class_names)
    if not samples:
        raise EvitDeployError(f"no images in the class folders of {data_dir}")
    bad = [s for s in samples if not 0 <= s.target < num_classes]
    if bad:
        raise EvitDeployError(
            f"{len(bad)} image(s) have a class outside the model's 0..{num_classes - 1}, e.g. "
            f"{bad[0].path} -> {bad[0].target}"
        )
    return samples


def _samples_from_labels(
    data_dir: Path, images: list[Path], labels: dict[str, int]
) -> list[Sample]:
    samples, unlabelled = [], []
    for path in images:
        relative = path.relative_to(data_dir)
        keys = (relative.as_posix(), relative.with_suffix("").as_posix(), relative.parts[0])
        target = next((labels[k] for k in keys if k in labels), None)
        if target is None:
            unlabelled.append(relative)
        else:
            samples.append(Sample(path, target))
    if unlabelled:
        raise EvitDeployError(
            f"the labels file gives no class for {len(unlabelled)} image(s), e.g. {unlabelled[0]}"
        )
    return samples


def _samples_from_folders(
    data_dir: Path, images: list[Path], num_classes: int, class_names: Sequence[str]
) -> list[Sample]:
    in_folders = [p for p in images if len(p.relative_to(data_dir).parts) > 1]
    folders = sorted({p.relative_to(data_dir).parts[0] for p in in_folders})
    if images and not folders:
        raise UsageError(
            f"{data_dir} has images but no class folders: lay it out as DATA_DIR/<wnid>/<images> "
            "or pass --labels FILE"
        )
    wnids = imagenet_wnid_index()
    if class_names and folders and all(f in class_names for f in folders):
        index = {f: list(class_names).index(f) for f in folders}
    elif num_classes == len(wnids) and folders and all(f in wnids for f in folders):
        index = {f: wnids[f] for f in folders}
    elif len(folders) == num_classes:
        index = {f: i for i, f in enumerate(folders)}
    else:
        raise UsageError(
            f"cannot tell the classes of {data_dir}: its {len(folders)} folders (e.g. "
            f"'{folders[0] if folders else ''}') are not ImageNet WordNet ids, nor one per class "
            f"of the model's {num_classes}; pass --labels FILE"
        )
    return [Sample(p, index[p.relative_to(data_dir).parts[0]]) for p in in_folders]


def spread_subset(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """`limit` samples evenly spread over the sorted list, so every class folder is represented
    (the first N of ImageNet val would all be tench)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit <= 0:
        raise UsageError(f"--limit must be positive, got {limit}")
    return [samples[i * len(samples) // limit] for i in range(limit)]


def evaluate(
    predictor: Predictor,
    samples: Sequence[Sample],
    batch_size: int = 64,
    on_batch: Callable[[int], None] = lambda done: None,
    workers: int | None = None,
) -> EvalResult:
    """Accuracy of `predictor` over `samples`. Images are decoded in worker threads a few batches
    ahead (PIL releases the GIL), so the backend is not left waiting for the decoder."""
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    if not samples:
        raise EvitDeployError("no images to evaluate")
    meta = predictor.metadata
    workers = workers or min(8, os.cpu_count() or 1)
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]

    def load(batch: Sequence[Sample]) -> np.ndarray:
        paths = [s.path for s in batch]
        return preprocess(
            paths, meta.img_size, meta.mean, meta.std, meta.crop_pct, meta.interpolation
        )

    top1 = top5 = done = 0
    model_seconds = 0.0
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(load, b) for b in batches[: workers + 1])
        try:
            for i, batch in enumerate(batches):
                inputs = pending.popleft().result()
                if i + workers + 1 < len(batches):
                    pending.append(pool.submit(load, batches[i + workers + 1]))
                tick = time.perf_counter()
                logits = predictor.logits(inputs)
                model_seconds += time.perf_counter() - tick
                targets = np.array([s.target for s in batch])
                k = min(TOPK, logits.shape[1])
                best = np.argpartition(-logits, k - 1, axis=1)[:, :k]
                top1 += int((logits.argmax(axis=1) == targets).sum())
                top5 += int((best == targets[:, None]).any(axis=1).sum())
                done += len(batch)
                on_batch(done)
        finally:
            for future in pending:  # an error or Ctrl-C: stop decoding ahead
                future.cancel()
    seconds = time.perf_counter() - start
    return EvalResult(done, top1, top5, seconds, model_seconds, predictor.backend.describe())
