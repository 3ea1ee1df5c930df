"""The interface every runtime implements: an NCHW float32 batch in, [B, num_classes] float32
logits out. For benchmarking it also separates putting an input on the device (`prepare`) from
running on it (`run_prepared`), so timings cover the model alone."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evit_deploy.errors import UsageError
from evit_deploy.metadata import ArtifactMetadata


@dataclass(frozen=True)
class NodeTime:
    """One node of the runtime's executed graph in a profile: its name and kernel type as the
    runtime reports them, its time per inference, and the ONNX nodes it computes (several where the
    runtime fused them; none for nodes the runtime added, such as layout reorders)."""

    name: str
    op_type: str
    ms: float
    sources: tuple[str, ...] = ()


class Backend(ABC):
    """A loaded artifact, ready to run."""

    name: str  # onnxruntime | tensorrt | pytorch
    metadata: ArtifactMetadata
    provider: str = "cpu"  # execution provider / device string
    precision: str = "fp32"
    device_name: str = "cpu"
    min_batch: int = 1
    max_batch: int | None = None  # None: any batch size
    thread_safe: bool = True  # False: the Predictor serialises calls
    options: tuple[str, ...] = ()  # the keyword options its constructor takes beside path, device
    profiles: bool = False  # whether profile() reads the runtime's own profiler

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch whose size is within [min_batch, max_batch]."""

    def prepare(self, batch: np.ndarray) -> object:
        """Put an input where `run_prepared` wants it (device memory, dtype)."""
        return batch

    def run_prepared(self, prepared: object) -> None:
        """Run on a prepared input and wait until the result is ready (what bench times)."""
        self.run(prepared)

    def take_gpu_compute_ms(self) -> list[float]:
        """GPU compute times (ms) of the runs since the last call, where the backend measures
        them with device events (TensorRT); empty elsewhere."""
        return []

    def profile(self, batch: np.ndarray, runs: int) -> list[NodeTime]:
        """Per-node times, averaged over `runs` inferences of `batch`, from the runtime's own
        profiler (ONNX Runtime's, OpenVINO's performance counters)."""
        raise UsageError(f"--profile works on onnxruntime and openvino, not on {self.name}")

    def close(self) -> None:
        """Release what the runtime holds (compiled models, device memory, sessions) now rather
        than at garbage collection: bench holds two backends at once, serve replaces them."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "provider": self.provider,
            "precision": self.precision,
            "device": self.device_name,
        }


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() is often empty on Linux)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
