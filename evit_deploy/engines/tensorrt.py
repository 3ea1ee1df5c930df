"""ONNX -> TensorRT engine with the TensorRT 10 Python API.

One optimization profile over the batch axis, a workspace limit, FP16 where the GPU has fast FP16
(with the TopK scores and any named layers pinned to FP32), a timing cache saved and reused across
builds, and a header carrying the model metadata in front of the plan. TensorRT is imported only
when a build or a load starts, so everything else works without it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evit_deploy.engines.header import EngineHeader, read_engine_header, write_engine
from evit_deploy.engines.precheck import precheck_onnx
from evit_deploy.engines.precision import LayerInfo, select_fp32_layers
from evit_deploy.engines.settings import BuildSettings
from evit_deploy.engines.support import (
    MIN_TENSORRT_MAJOR,
    TENSORRT_INSTALL,
    TORCH_CUDA_INSTALL,
    has_fast_fp16,
    tensorrt_major,
)
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.fileio import check_can_write, write_bytes_atomic


@dataclass(frozen=True)
class CudaGpu:
    index: int
    name: str
    compute_capability: str  # "9.0"


@dataclass
class BuildResult:
    path: Path
    header: EngineHeader
    size_bytes: int
    seconds: float
    timing_cache: Path
    tensorrt_warnings: list[str]


def default_engine_path(onnx_path: str | Path, precision: str) -> Path:
    """model_keep0.7.onnx -> model_keep0.7.fp16.plan (next to the ONNX)."""
    return Path(onnx_path).with_suffix(f".{precision}.plan")


def default_timing_cache(tensorrt_version: str, gpu: CudaGpu) -> Path:
    """One cache per TensorRT version and compute capability: timings are only valid there."""
    from evit_deploy.runtime.baseline import cache_dir

    return cache_dir() / "tensorrt" / f"timing-trt{tensorrt_version}-sm{gpu.compute_capability}.cache"


def torch_dtype_name(tensorrt_dtype: str) -> str:
    """The torch dtype name for a TensorRT DataType name (engine I/O buffers)."""
    names = {
        "FLOAT": "float32",
        "HALF": "float16",
        "BF16": "bfloat16",
        "INT8": "int8",
        "UINT8": "uint8",
        "INT32": "int32",
        "INT64": "int64",
        "BOOL": "bool",
    }
    try:
        return names[tensorrt_dtype]
    except KeyError:
        raise EvitDeployError(f"engine I/O type {tensorrt_dtype} is not supported by evit-deploy") from None


def require_tensorrt_gpu(device: str | None, purpose: str):
    """(tensorrt module, CudaGpu), or one EvitDeployError naming everything missing and how to
    install it."""
    missing = []
    trt = None
    try:
        trt = import_tensorrt()
    except EvitDeployError as exc:
        missing.append(str(exc))
    gpu = None
    try:
        gpu = cuda_gpu(device)
    except EvitDeployError as exc:
        missing.append(str(exc))
    if missing:
        raise EvitDeployError(f"{purpose} needs TensorRT {MIN_TENSORRT_MAJOR}+ and an NVIDIA GPU: " + "; ".join(missing))
    return trt, gpu


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EvitDeployError(f"TensorRT is not installed ({TENSORRT_INSTALL})") from None
    except Exception as exc:  # installed, but its CUDA libraries do not load
        raise EvitDeployError(f"TensorRT is installed but does not load ({_first_line(exc)})") from None
    if tensorrt_major(trt.__version__) < MIN_TENSORRT_MAJOR:
        raise EvitDeployError(f"TensorRT {trt.__version__} is too old ({TENSORRT_INSTALL})")
    return trt


def cuda_gpu(device: str | None) -> CudaGpu:
    import torch

    if device not in (None, "auto") and not str(device).startswith("cuda"):
        raise UsageError(f"TensorRT runs on a CUDA GPU; device '{device}' is not one (use cuda or cuda:N)")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise EvitDeployError(f"PyTorch {torch.__version__} ({build}) sees no CUDA GPU; install {TORCH_CUDA_INSTALL}")
    try:
        index = torch.device(device if device not in (None, "auto") else "cuda").index
    except RuntimeError:
        raise UsageError(f"unknown device '{device}'; use cuda or cuda:N") from None
    index = torch.cuda.current_device() if index is None else index
    if index >= torch.cuda.device_count():
        raise UsageError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s) here)")
    major, minor = torch.cuda.get_device_capability(index)
    return CudaGpu(index, torch.cuda.get_device_name(index), f"{major}.{minor}")


def collecting_logger(trt):
    """A TensorRT logger that keeps errors (for the one-line message) and warnings (shown after a
    build) instead of printing TensorRT's chatter."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(_one_line(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(_one_line(msg))

    return CollectingLogger()


def build_engine(
    onnx_path: str | Path,
    output: str | Path | None = None,
    settings: BuildSettings = BuildSettings(),
    force: bool = False,
    device: str | None = None,
    require_layer_matches: bool = True,
    on_step: Callable[[str], None] = lambda step: None,
) -> BuildResult:
    """Check the ONNX, build a serialized engine and write header + plan atomically."""
    onnx_path = Path(onnx_path)
    output = check_can_write(output or default_engine_path(onnx_path, settings.precision), force)
    on_step("checking the ONNX for TensorRT")
    check = precheck_onnx(onnx_path)
    shapes = settings.profile.shapes(check.input_dims)
    trt, gpu = require_tensorrt_gpu(device, "build-engine")
    precision = settings.precision
    if precision == "fp16" and not has_fast_fp16(gpu.compute_capability):
        warnings.warn(f"{gpu.name} has no fast FP16; building FP32", stacklevel=2)
        precision = "fp32"
    if precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
        raise EvitDeployError(
            f"TensorRT {trt.__version__} has no weakly-typed FP16 builds; install TensorRT 10.x "
            "(pip install 'tensorrt>=10,<11') or build with --fp32"
        )
    cache_path = Path(settings.timing_cache) if settings.timing_cache else default_timing_cache(trt.__version__, gpu)
    import torch

    started = time.perf_counter()
    with torch.cuda.device(gpu.index):
        logger = collecting_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        on_step("parsing the ONNX")
        if not parser.parse_from_file(str(onnx_path)):
            errors = [_one_line(str(parser.get_error(i))) for i in range(parser.num_errors)]
            raise EvitDeployError(
                f"TensorRT {trt.__version__} cannot parse {onnx_path.name} ({len(errors)} "
                f"error(s)): " + " | ".join(errors or logger.errors or ["no details"])
            )
        config = builder.create_builder_config()
        if settings.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        profile = builder.create_optimization_profile()
        profile.set_shape(check.input_name, *shapes)
        config.add_optimization_profile(profile)
        # TF32 would round FP32 matrix multiplies to FP16's 10-bit mantissa: FP32 layers stay FP32.
        config.clear_flag(trt.BuilderFlag.TF32)
        pinned: list[str] = []
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            pinned = pin_fp32_layers(trt, network, settings, require_layer_matches)
            if pinned:
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        cache = _load_timing_cache(config, cache_path, logger)
        on_step(f"building the {precision} engine (minutes; the timing cache speeds up rebuilds)")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EvitDeployError(
                f"TensorRT could not build {onnx_path.name}: "
                + (" | ".join(logger.errors[-5:]) or "no details (out of GPU memory? try --workspace)")
            )
        if cache is not None:
            write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()), force=True)
    header = EngineHeader(
        metadata=check.metadata,
        tensorrt_version=trt.__version__,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=precision,
        settings=settings,
        input_shape=list(shapes[0][1:]),
        fp32_layers=pinned,
        onnx=onnx_path.name,
    )
    on_step("writing")
    write_engine(output, header, bytes(plan), force)
    return BuildResult(
        path=output,
        header=header,
        size_bytes=output.stat().st_size,
        seconds=time.perf_counter() - started,
        timing_cache=cache_path,
        tensorrt_warnings=list(dict.fromkeys(logger.warnings)),
    )


def pin_fp32_layers(trt, network, settings: BuildSettings, require_matches: bool) -> list[str]:
    """Set FP32 compute and FP32 outputs on the selected layers that compute floats; returns
    their names. Shape arithmetic and index outputs (TopK's second) are left alone."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    chosen = set(
        select_fp32_layers(
            [_describe(layer) for layer in layers],
            settings.fp32_layers,
            settings.fp32_topk_scores,
            require_matches,
        )
    )
    float_types = (trt.DataType.FLOAT, trt.DataType.HALF)
    pinned = []
    for layer in layers:
        if layer.name not in chosen:
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        floats = [i for i, t in enumerate(outputs) if t.dtype in float_types and not t.is_shape_tensor]
        if not floats:
            continue
        layer.precision = trt.DataType.FLOAT
        for index in floats:
            layer.set_output_type(index, trt.DataType.FLOAT)
        pinned.append(layer.name)
    return pinned


def build_baseline_engine(engine_path: str | Path, device: str | None = None) -> Path:
    """The plain-ViT (keep_rate 1.0) engine of the same weights, built with the same settings as
    `engine_path`, cached next to the cached baseline ONNX and reused while TensorRT, the GPU and
    the settings stay the same."""
    from evit_deploy.runtime.baseline import baseline_onnx

    header = read_engine_header(engine_path)
    trt, gpu = require_tensorrt_gpu(device, "the TensorRT baseline")
    onnx_path = baseline_onnx(header.metadata)
    key = json.dumps([header.settings.to_dict(), trt.__version__, gpu.compute_capability, gpu.name])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = onnx_path.with_name(f"{onnx_path.stem}_{digest}.plan")
    if not target.exists():  # written atomically: an existing file is a complete engine
        build_engine(
            onnx_path, target, header.settings, force=True, device=device, require_layer_matches=False
        )
    return target


def _describe(layer) -> LayerInfo:
    inputs = []
    for index in range(layer.num_inputs):
        tensor = layer.get_input(index)
        inputs.append(tensor.name if tensor is not None else None)
    outputs = tuple(layer.get_output(index).name for index in range(layer.num_outputs))
    return LayerInfo(layer.name, layer.type.name, tuple(inputs), outputs)


def _load_timing_cache(config, path: Path, logger):
    """Reuse the cache file if TensorRT accepts it, else start an empty one (saved after the
    build either way); None when no cache can be set at all."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, False):
        if data:
            logger.warnings.append(f"timing cache {path} is damaged or from another GPU/TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            return None
    return cache


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
