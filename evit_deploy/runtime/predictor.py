"""Predictor: one API over every backend, from raw tensors or from images to top-k classes.

Thread safety: a Predictor may be shared by threads. Preprocessing runs in the calling thread;
backend calls run concurrently where the backend allows it (ONNX Runtime sessions and PyTorch
modules in inference mode do) and are serialised by a lock where it does not (a TensorRT execution
context holds per-call state). Each call gets exactly the outputs of its own inputs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model.config import EvitOverrides
from evit_deploy.preprocess import preprocess
from evit_deploy.runtime.backends import load_backend
from evit_deploy.runtime.base import Backend
from evit_deploy.data.labels import class_names


@dataclass(frozen=True)
class Prediction:
    class_ids: list[int]
    labels: list[str]
    probs: list[float]

    def to_dict(self) -> dict:
        return {"class_ids": self.class_ids, "labels": self.labels, "probs": self.probs}


class Predictor:
    """Load an artifact (.onnx, .plan/.engine, .pt/.pth/.safetensors) and run it in batches.

    Settings (input size, normalisation, classes) come from the artifact's metadata; for a
    PyTorch checkpoint, EViT settings come as `evit` (EvitOverrides(keep_rate=0.5, ...)).
    `path` may also be a Backend already loaded (a custom runtime), used as it is.
    """

    def __init__(
        self,
        path: str | Path | Backend,
        backend: str = "auto",
        device: str | None = None,
        max_batch: int | None = None,
        evit: EvitOverrides | None = None,
        **options,
    ):
        if isinstance(path, Backend):
            if backend != "auto" or device is not None or evit or options:
                raise UsageError("a loaded Backend takes no backend, device or options")
            self.backend: Backend = path
        else:
            self.backend = load_backend(path, backend, device, evit, **options)
        self.metadata = self.backend.metadata
        if max_batch is not None and max_batch <= 0:
            raise EvitDeployError(f"max_batch must be positive, got {max_batch}")
        self.max_batch = min(filter(None, (max_batch, self.backend.max_batch)), default=None)
        self._lock = contextlib.nullcontext() if self.backend.thread_safe else threading.Lock()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.metadata.img_size
        return (3, size, size)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] float32 (normalised) -> [B, num_classes] float32 logits.

        Batches beyond the backend's max are split; a chunk below its min is zero-padded.
        """
        batch = self.check_input(batch)
        step = self.max_batch or len(batch)
        chunks = [self._run_chunk(batch[i : i + step]) for i in range(0, len(batch), step)]
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def predict(self, images, topk: int = 5) -> list[Prediction]:
        """Top-k classes for one image or a list: file paths, PIL images, HWC uint8 arrays."""
        return self.classify(self.logits(self.preprocess(images)), topk)

    def preprocess(self, images) -> np.ndarray:
        """Images (paths, PIL images, HWC uint8 arrays) -> the normalised batch `logits` takes,
        with the artifact's own transform (input size, crop, mean/std, interpolation)."""
        if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            raise EvitDeployError("no images given")
        meta = self.metadata
        return preprocess(
            images, meta.img_size, meta.mean, meta.std, meta.crop_pct, meta.interpolation
        )

    def close(self) -> None:
        """Release the backend's runtime resources now (see Backend.close)."""
        self.backend.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def classify(self, logits: np.ndarray, topk: int = 5) -> list[Prediction]:
        """Softmax top-k of logits, with class names."""
        if topk <= 0:
            raise EvitDeployError(f"topk must be positive, got {topk}")
        topk = min(topk, logits.shape[1])
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
        names = class_names(self.metadata)
        return [
            Prediction(
                class_ids=[int(c) for c in row],
                labels=[names[c] for c in row],
                probs=[float(probs[i, c]) for c in row],
            )
            for i, row in enumerate(order)
        ]

    def warmup(self, batch_size: int = 1, iterations: int = 2) -> None:
        """Run a few zero batches so first-call costs (allocation, autotuning) are paid now."""
        dummy = np.zeros((batch_size, *self.input_shape), dtype=np.float32)
        for _ in range(iterations):
            self.logits(dummy)

    def check_input(self, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise EvitDeployError(f"logits() takes a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise EvitDeployError(f"input must be float32, got {batch.dtype}")
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape or batch.shape[0] == 0:
            raise EvitDeployError(
                f"input must have shape [B>0, {', '.join(map(str, self.input_shape))}], got "
                f"{list(batch.shape)}"
            )
        if not np.isfinite(batch).all():
            raise EvitDeployError("input contains NaN or Inf values")
        return np.ascontiguousarray(batch)

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        count = len(chunk)
        if count < self.backend.min_batch:
            pad = np.zeros((self.backend.min_batch - count, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        with self._lock:
            out = self.backend.run(chunk)
        return np.asarray(out[:count], dtype=np.float32)
