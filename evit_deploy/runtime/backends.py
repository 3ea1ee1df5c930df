"""The AutoBackend-style loader: picks the runtime for an artifact from its file (or the name
given) and loads it behind the one Backend interface (base.py)."""

from __future__ import annotations

import re
from pathlib import Path


from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model.config import EvitOverrides
from evit_deploy.runtime.base import Backend
from evit_deploy.runtime.deployment import resolve_artifact

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


def check_overrides(path: Path, backend: str, evit: EvitOverrides | None) -> str:
    """The backend `path` runs on; EViT settings given for anything but a checkpoint are refused
    (an exported artifact carries its own)."""
    kind = backend_for(Path(path), backend)
    if evit and kind != "pytorch":
        raise UsageError(f"settings ({evit.flags()}) are for checkpoints; {Path(path).name} carries its own")
    return kind


def load_backend(
    path: str | Path,
    backend: str = "auto",
    device: str | None = None,
    evit: EvitOverrides | None = None,
    **options,
) -> Backend:
    """Load `path` on the backend its suffix implies (or the one named); a deployment folder
    (`evit-deploy optimize`) with the backend and options it records.

    evit: EViT settings for a checkpoint (an exported artifact carries its own: refused).
    options: onnxruntime: providers, threads; openvino: precision (fp32, bf16), threads,
    fp32_topk_scores; pytorch: fp16, compile, threads; tensorrt: none.
    """
    path, backend, options = resolve_artifact(path, backend, options)
    if not path.exists():
        raise EvitDeployError(f"artifact not found: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a model file (or a folder `evit-deploy optimize` wrote)")
    kind = check_overrides(path, backend, evit)
    if evit:
        options["evit"] = evit
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
    unknown = sorted(set(options) - set(backend_class.options))
    if unknown:
        raise UsageError(
            f"the {kind} backend does not take {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(backend_class.options)) or 'no options'}"
        )
    return backend_class(path, device=device, **options)
