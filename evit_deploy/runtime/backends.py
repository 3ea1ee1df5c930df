"""One interface over every runtime, and the AutoBackend-style loader that picks one from the file.

A backend turns an NCHW float32 batch into [B, num_classes] float32 logits. For benchmarking it
also separates putting an input on the device (`prepare`) from running on it (`run_prepared`),
so timings cover the model alone.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.metadata import ArtifactMetadata

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "pytorch")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
SUFFIX_BACKEND = {
    ".onnx": "onnxruntime",
    ".xml": "openvino",  # OpenVINO IR written by `export --format openvino`
    ".plan": "tensorrt",
    ".engine": "tensorrt",
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".safetensors": "pytorch",
}


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

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "provider": self.provider,
            "precision": self.precision,
            "device": self.device_name,
        }


def backend_for(path: Path, backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        return SUFFIX_BACKEND[path.suffix.lower()]
    except KeyError:
        raise UsageError(
            f"cannot tell the backend from '{path.name}': expected one of "
            f"{', '.join(SUFFIX_BACKEND)} (or pass --backend)"
        ) from None


def load_backend(path: str | Path, backend: str = "auto", device: str | None = None, **options) -> Backend:
    """Load `path` on the backend its suffix implies (or the one named).

    options: onnxruntime: providers, threads; openvino: precision (fp32, bf16), threads,
    fp32_topk_scores; pytorch: model, keep_rate, drop_loc, fuse_token, img_size, fp16, compile,
    threads; tensorrt: none.
    """
    path = Path(path)
    if not path.exists():
        raise EvitDeployError(f"artifact not found: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a model file")
    kind = backend_for(path, backend)
    if device not in (None, "auto") and not DEVICE.fullmatch(device):
        raise UsageError(f"unknown device '{device}'; use cpu, cuda or cuda:N")
    threads = options.get("threads")
    if threads is not None and threads <= 0:
        raise UsageError(f"threads must be positive, got {threads}")
    precision = options.get("precision")
    if precision not in (None, "fp32") and kind != "openvino":
        raise UsageError(
            f"--precision {precision} is an OpenVINO setting (--backend openvino); the {kind} "
            "backend runs the precision the artifact was built in"
        )
    if kind != "openvino":
        options.pop("precision", None)
    if kind == "openvino" and path.suffix.lower() not in (".onnx", ".xml"):
        raise UsageError(f"the openvino backend runs .onnx or OpenVINO IR .xml files, not {path.suffix or path.name}")
    if kind == "onnxruntime":
        from evit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend as backend_class
    elif kind == "openvino":
        from evit_deploy.runtime.openvino_backend import OpenVINOBackend as backend_class
    elif kind == "pytorch":
        from evit_deploy.runtime.torch_backend import TorchBackend as backend_class
    else:
        from evit_deploy.runtime.tensorrt_backend import TensorRTBackend as backend_class
    accepted = set(inspect.signature(backend_class).parameters) - {"path", "device"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UsageError(
            f"the {kind} backend does not take {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(accepted)) or 'no options'}"
        )
    return backend_class(path, device=device, **options)


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
