"""PyTorch backend: eager on CPU; on CUDA fp16 by default, optionally torch.compile'd.

Runs a checkpoint directly (the reference the exports are validated against); EViT settings come
as EvitOverrides because a checkpoint does not carry them, the architecture is read off its weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evit_deploy.errors import UsageError
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.model.checkpoint import build_model, checkpoint_config
from evit_deploy.model.config import EvitOverrides
from evit_deploy.runtime.base import Backend, cpu_name


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda requested but PyTorch sees no CUDA GPU here")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {device} does not exist ({torch.cuda.device_count()} GPU(s) here)")
    return resolved


class TorchBackend(Backend):
    name = "pytorch"
    options = ("evit", "fp16", "compile", "threads")

    def __init__(
        self,
        path: str | Path | None,
        device: str | None = None,
        evit: EvitOverrides = EvitOverrides(),
        fp16: bool | None = None,
        compile: bool = False,
        threads: int | None = None,
    ):
        self.device = resolve_device(device)
        if fp16 and self.device.type != "cuda":
            raise UsageError("fp16 needs a CUDA device (CPU runs fp32)")
        self.dtype = torch.float16 if (fp16 is not False and self.device.type == "cuda") else torch.float32
        if threads:
            torch.set_num_threads(threads)
        config, state = checkpoint_config(path, evit)
        net = build_model(config, path, state=state)
        self.model = net.to(self.device, self.dtype)
        self.metadata = ArtifactMetadata.from_model(net)
        self.precision = "fp16" if self.dtype == torch.float16 else "fp32"
        self.provider = str(self.device) + (" (torch.compile)" if compile else " (eager)")
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name()
        self.forward = torch.compile(self.model) if compile else self.model

    def close(self) -> None:
        self.model = self.forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prepare(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype)

    def run_prepared(self, prepared: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.forward(prepared)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_prepared(self.prepare(batch)).float().cpu().numpy()
