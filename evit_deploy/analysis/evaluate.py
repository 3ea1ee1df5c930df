"""Top-1 / top-5 accuracy on an ImageNet-style image folder, on any backend (the folder's
classes: evit_deploy/data/samples.py)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from evit_deploy.data.samples import Sample
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.preprocess import preprocess
from evit_deploy.runtime.predictor import Predictor

TOPK = 5


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
