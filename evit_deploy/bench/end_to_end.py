"""Where the time goes from image files to top-k classes: `bench --end-to-end DIR`.

Token pruning speeds up the model only; a user waits for decoding and preprocessing too. Each
batch runs four stages one after another, each timed on its own: decode (file -> RGB pixels),
preprocess (resize, center-crop, normalise), inference (Predictor.logits) and top-k (softmax,
top-k, class names). Decoding and preprocessing run in a thread pool (PIL releases the GIL);
the pool is idle while the model runs, so it never competes with the inference threads, and the
stage times add up to the whole.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evit_deploy.errors import EvitDeployError
from evit_deploy.preprocess import load_image, normalised
from evit_deploy.runtime.base import Backend
from evit_deploy.runtime.predictor import Predictor

STAGES = ("decode", "preprocess", "inference", "topk")
STAGE_NAMES = {
    "decode": "decode",
    "preprocess": "resize, crop, normalise",
    "inference": "inference",
    "topk": "softmax, top-k",
}
TOPK = 5
MIN_BATCHES = 3


@dataclass
class EndToEndResult:
    model: str
    keep_rate: float
    backend: str
    precision: str
    batch: int
    batches: int  # timed batches
    images: int  # distinct files (cycled through when fewer than the images timed)
    preprocess_threads: int
    stage_ms: dict[str, float]  # per image: the median batch's stage time / batch size

    @property
    def total_ms(self) -> float:
        return sum(self.stage_ms.values())

    @property
    def throughput_ips(self) -> float:
        return 1000.0 / self.total_ms

    @property
    def share(self) -> dict[str, float]:
        return {stage: ms / self.total_ms for stage, ms in self.stage_ms.items()}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "keep_rate": self.keep_rate,
            "batch": self.batch,
            "batches": self.batches,
            "images": self.images,
            "preprocess_threads": self.preprocess_threads,
            "ms_per_image": self.stage_ms | {"total": self.total_ms},
            "share": self.share,
            "throughput_ips": self.throughput_ips,
        }


def preprocess_threads(threads: int | None) -> int:
    """The pool decoding and preprocessing images: as many threads as the model may use."""
    return threads or os.cpu_count() or 1


def time_end_to_end(
    backends: Sequence[Backend],
    images: Sequence[Path],
    batch: int,
    threads: int | None = None,
    iterations: int | None = None,
    min_seconds: float = 3.0,
) -> list[EndToEndResult]:
    """Files -> top-k for each backend at one batch size, interleaved batch by batch (after one
    untimed batch each), until each has `iterations` batches, or else at least `min_seconds`
    and MIN_BATCHES batches. Batches take the files in turn, cycling when they run out."""
    if not images:
        raise EvitDeployError("no image files for --end-to-end")
    predictors = [Predictor(backend) for backend in backends]
    workers = preprocess_threads(threads)
    times: list[list[dict[str, float]]] = [[] for _ in backends]
    turns = itertools.count()

    def next_files() -> list[Path]:
        start = next(turns) * batch
        return [images[(start + i) % len(images)] for i in range(batch)]

    def finished() -> bool:
        if iterations is not None:
            return all(len(t) >= iterations for t in times)
        return all(
            len(t) >= MIN_BATCHES and sum(sum(b.values()) for b in t) >= min_seconds for t in times
        )

    with ThreadPoolExecutor(workers, thread_name_prefix="evit-preprocess") as pool:
        for predictor in predictors:  # untimed: first-call costs
            _run_batch(predictor, next_files(), pool)
        while not finished():
            for predictor, record in zip(predictors, times):
                record.append(_run_batch(predictor, next_files(), pool))
    return [
        EndToEndResult(
            model=backend.metadata.model,
            keep_rate=backend.metadata.keep_rate,
            backend=backend.name,
            precision=backend.precision,
            batch=batch,
            batches=len(record),
            images=len(images),
            preprocess_threads=workers,
            stage_ms={s: float(np.median([b[s] for b in record])) * 1e3 / batch for s in STAGES},
        )
        for backend, record in zip(backends, times)
    ]


def _run_batch(predictor: Predictor, files: list[Path], pool: ThreadPoolExecutor) -> dict[str, float]:
    """Seconds per stage for one batch of files."""
    meta = predictor.metadata
    start = time.perf_counter()
    pictures = list(pool.map(load_image, files))
    decoded = time.perf_counter()
    arrays = pool.map(
        lambda picture: normalised(
            picture, meta.img_size, meta.mean, meta.std, meta.crop_pct, meta.interpolation
        ),
        pictures,
    )
    batch = np.stack(list(arrays))
    preprocessed = time.perf_counter()
    logits = predictor.logits(batch)
    inferred = time.perf_counter()
    predictor.classify(logits, TOPK)
    done = time.perf_counter()
    return {
        "decode": decoded - start,
        "preprocess": preprocessed - decoded,
        "inference": inferred - preprocessed,
        "topk": done - inferred,
    }
