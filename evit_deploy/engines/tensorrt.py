"""ONNX -> TensorRT engine with the TensorRT 10.12+ / 11.x Python API.

Every build is a strongly typed network (NetworkDefinitionCreationFlag.STRONGLY_TYPED): TensorRT
runs each tensor in the type the ONNX graph gives it, so precision is decided in the graph. An FP16
build of an FP32 ONNX first converts the graph to mixed precision (evit_deploy.export.precision,
the same code `export --precision fp16` uses: FP16 weights and compute, FP32 islands, float32 I/O);
an ONNX that is already FP16 builds as it is. No builder-flag precision is used anywhere
(BuilderFlag.FP16, OBEY_PRECISION_CONSTRAINTS, ILayer.precision and set_output_type were deprecated
in TensorRT 10.12, "Superseded by strong typing", and are gone from TensorRT 11).

Also: one optimization profile over the batch axis, a workspace limit, TF32 off, a timing cache
reused across builds (best effort: written after the engine), a build that Ctrl-C or SIGTERM
cancels through IProgressMonitor, one TensorRT logger for the whole process, and a header carrying
the model metadata in front of the plan. TensorRT is imported only when a build or a load starts,
so everything else works without it.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from evit_deploy import interrupt
from evit_deploy.engines.header import EngineHeader, write_engine
from evit_deploy.engines.precheck import precheck_onnx
from evit_deploy.engines.settings import BuildSettings
from evit_deploy.engines.support import MIN_TENSORRT_TEXT, has_fast_fp16, tensorrt_too_old
from evit_deploy.errors import EvitDeployError, UsageError, first_line
from evit_deploy.fileio import cache_dir, check_can_write, write_bytes_atomic
from evit_deploy.install import TENSORRT_INSTALL, TORCH_CUDA_INSTALL

# TensorRT 10.x: NetworkDefinitionCreationFlag.kSTRONGLY_TYPED = 1 (kEXPLICIT_BATCH = 0 is
# deprecated); TensorRT 11: kSTRONGLY_TYPED = 0, deprecated because strong typing is always on,
# "retained for API compatibility but ignored" (include/NvInfer.h of NVIDIA/TensorRT release/10.16
# and main, enum NetworkDefinitionCreationFlag). The Python name is the same in both
# (python/src/infer/pyCore.cpp), so `1 << int(flag)` is right for both.
STRONGLY_TYPED = "STRONGLY_TYPED"


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
    timing_cache_saved: bool = True
    converted: bool = False  # the FP16 graph was made here from an FP32 ONNX


@dataclass
class EngineGraph:
    """The graph TensorRT parses: the ONNX file as it is, or its mixed-precision conversion."""

    precision: str  # fp16 or fp32: what the strongly typed network computes in
    data: bytes | None = None  # the converted graph; None: parse the file itself
    fp32_nodes: list[str] = field(default_factory=list)  # FP16 graphs: nodes computing in FP32
    fp32_islands: list[str] = field(default_factory=list)  # island kinds (and 'named') among them

    @property
    def converted(self) -> bool:
        return self.data is not None


def default_engine_path(onnx_path: str | Path, precision: str) -> Path:
    """model_keep0.7.onnx -> model_keep0.7.fp16.plan (next to the ONNX)."""
    return Path(onnx_path).with_suffix(f".{precision}.plan")


def default_timing_cache(tensorrt_version: str, gpu: CudaGpu) -> Path:
    """One cache per TensorRT version and compute capability: timings are only valid there."""

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
        raise EvitDeployError(f"{purpose} needs TensorRT {MIN_TENSORRT_TEXT}+ and an NVIDIA GPU: " + "; ".join(missing))
    return trt, gpu


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EvitDeployError(f"TensorRT is not installed ({TENSORRT_INSTALL})") from None
    except Exception as exc:  # installed, but its CUDA libraries do not load
        raise EvitDeployError(f"TensorRT is installed but does not load ({first_line(exc)})") from None
    if tensorrt_too_old(trt.__version__):
        raise EvitDeployError(
            f"TensorRT {trt.__version__} is too old: strongly typed builds need {MIN_TENSORRT_TEXT}+ ({TENSORRT_INSTALL})"
        )
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


# ---------------------------------------------------------------------------------------------
# One TensorRT logger for the process


class TensorRTOperation:
    """Where one operation's messages start in the process-wide TensorRT log."""

    def __init__(self, logger, label: str, start: int):
        self.logger, self.label, self.start = logger, label, start

    @property
    def errors(self) -> list[str]:
        return self.logger.messages_since(self.start, ("INTERNAL_ERROR", "ERROR"))

    @property
    def warnings(self) -> list[str]:
        return self.logger.messages_since(self.start, ("WARNING",))

    @property
    def message_count(self) -> int:
        """Every message TensorRT logged since the operation started, kept or only counted."""
        return self.logger.message_count - self.start

    def raise_if_interrupted(self) -> None:
        """Ctrl-C that arrived while TensorRT was calling log() (where raising is swallowed)."""
        if self.logger.take_interrupt():
            raise KeyboardInterrupt


_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def tensorrt_logger(trt):
    """The process's TensorRT logger. TensorRT keeps a single logger pointer: a second logger
    passed to another Builder or Runtime is ignored while the first one's objects live ("TensorRT
    maintains only a single logger pointer at any given time", NVIDIA/TensorRT#1475), so messages
    would land in a logger nobody reads. Every operation uses this one and marks where its
    messages start (`start`)."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None or _LOGGER.trt is not trt:  # a second module only in tests (fakes)
            _LOGGER = _make_logger(trt)
        return _LOGGER


KEPT_SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING")


def _make_logger(trt):
    class ProcessLogger(trt.ILogger):
        """Keeps TensorRT's errors and warnings (for the one-line reports) and only counts its
        INFO and VERBOSE chatter, thousands of lines a build, which would otherwise push the
        early warnings out. log() runs inside TensorRT's noexcept wrapper, which would swallow an
        exception as "[ERROR] Exception caught in log()" (python/src/infer/pyCore.cpp,
        PyLogger): it never raises, and a KeyboardInterrupt caught there is handed back to the
        operation (TensorRTOperation.raise_if_interrupted)."""

        MAX_KEPT = 100_000  # far more than builds log; only so a long-running server stays bounded

        def __init__(self):
            trt.ILogger.__init__(self)
            self.trt = trt
            self._lock = threading.Lock()
            self._kept: deque[tuple[int, str, str]] = deque(maxlen=self.MAX_KEPT)  # (number, severity, text)
            self._count = 0  # every message's number, kept or not
            self._interrupted = False

        def log(self, severity, msg):
            try:
                name = getattr(severity, "name", str(severity)).split(".")[-1]
                text = _one_line(msg) if name in KEPT_SEVERITIES else None
                with self._lock:
                    if text is not None:
                        self._kept.append((self._count, name, text))
                    self._count += 1
            except KeyboardInterrupt:
                self._interrupted = True
            except BaseException:  # noqa: BLE001 - nothing may escape into TensorRT
                pass

        @property
        def message_count(self) -> int:
            return self._count

        def start(self, label: str) -> TensorRTOperation:
            with self._lock:
                return TensorRTOperation(self, label, self._count)

        def messages_since(self, start: int, severities: tuple[str, ...]) -> list[str]:
            with self._lock:
                return [text for number, kind, text in self._kept if number >= start and kind in severities]

        @property
        def interrupt_pending(self) -> bool:
            return self._interrupted

        def take_interrupt(self) -> bool:
            interrupted, self._interrupted = self._interrupted, False
            return interrupted

    return ProcessLogger()


# ---------------------------------------------------------------------------------------------
# Cancelling a build


def _progress_monitor(trt, on_step: Callable[[str], None], logger):
    """A trt.IProgressMonitor that shows the build's top-level phases and cancels the build once
    interrupted: step_complete returning False asks TensorRT to stop (NvInfer.h, IProgressMonitor;
    Python: config.progress_monitor, python/src/infer/pyCore.cpp). TensorRT may call it "from
    multiple internal threads" (NvInfer.h), where no Python signal handler runs and no
    KeyboardInterrupt arrives, so every step checks flags instead (stop_requested). A
    KeyboardInterrupt that is raised in a callback (here, or in the logger's log()) is caught
    (TensorRT's wrapper would swallow it) and turned into a cancel too."""

    class BuildMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.interrupted: int | None = None  # the signal that asked to stop
            self.wakeup: int | None = None  # read end of the signal wakeup pipe (_signal_wakeup)

        def request_stop(self, signum, frame=None) -> None:
            self.interrupted = signum

        def stop_requested(self) -> bool:
            """From any thread: our handler ran (request_stop), the CLI's handler recorded a stop
            (a build off the main thread keeps it), a Ctrl-C was caught in log(), or a signal
            reached the wakeup pipe (its byte is written as the signal arrives, while the main
            thread is inside TensorRT and cannot run a Python handler)."""
            if self.interrupted is None:
                signum = _stop_signal(self.wakeup)
                if signum is None and (interrupt.requested() or logger.interrupt_pending):
                    signum = signal.SIGINT
                self.interrupted = signum
            return self.interrupted is not None

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                if parent_phase is None:
                    on_step(f"building: {phase_name}")
            except KeyboardInterrupt:
                self.interrupted = signal.SIGINT
            except BaseException:  # noqa: BLE001 - a display problem must not stop the build
                pass

        def step_complete(self, phase_name, step):
            try:
                return not self.stop_requested()
            except KeyboardInterrupt:
                self.interrupted = signal.SIGINT
                return False

        def phase_finish(self, phase_name):
            pass

    return BuildMonitor()


@contextmanager
def _stop_requests_to(monitor) -> Iterator[None]:
    """While TensorRT builds, Ctrl-C and SIGTERM only ask the monitor to stop (the build then
    ends at its next step and the interrupt is raised after it returns). Signals that were
    ignored stay ignored; off the main thread nothing changes (the monitor still sees a stop the
    CLI's handler records)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler in (signal.SIG_IGN, None):
                continue
            previous[signum] = handler
            signal.signal(signum, monitor.request_stop)
    try:
        with _signal_wakeup(monitor) if previous else nullcontext():
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _signal_wakeup(monitor) -> Iterator[None]:
    """A pipe for signal.set_wakeup_fd, read by the monitor: CPython's C-level handler writes
    each signal's number to it at once, whichever thread the signal lands on, while the Python
    handler waits for the main thread, which sits in build_serialized_network (the binding
    releases the GIL) for as long as TensorRT calls back only from its own threads. A wakeup fd
    someone else set (an asyncio loop's) is left in place."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    try:
        other = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if other != -1:
            signal.set_wakeup_fd(other)
            yield
            return
        monitor.wakeup = read
        try:
            yield
        finally:
            signal.set_wakeup_fd(-1)
            monitor.wakeup = None
    finally:
        os.close(read)
        os.close(write)


def _stop_signal(wakeup: int | None) -> int | None:
    """SIGINT or SIGTERM if the wakeup pipe holds one (other signals' bytes are dropped)."""
    if wakeup is None:
        return None
    try:
        received = os.read(wakeup, 512)
    except OSError:  # empty (non-blocking), or closed once the build returned
        return None
    stops = [signum for signum in received if signum in (signal.SIGINT, signal.SIGTERM)]
    return stops[0] if stops else None


# ---------------------------------------------------------------------------------------------
# Building


def strongly_typed_flags(trt) -> int:
    """create_network() flags for a strongly typed network, on TensorRT 10.x and 11.x."""
    return 1 << int(getattr(trt.NetworkDefinitionCreationFlag, STRONGLY_TYPED))


def engine_graph(
    onnx_path: Path, settings: BuildSettings, gpu: CudaGpu, require_layer_matches: bool = True
) -> EngineGraph:
    """What TensorRT parses for these settings: an FP32 build, an FP16 ONNX as it is, or an FP32
    ONNX converted to mixed precision here (FP32 islands from the settings)."""
    from evit_deploy.metadata import load_onnx
    from evit_deploy.export.precision import convert_to_fp16, fp32_compute_nodes, fp32_islands_of, is_fp16_model

    model = load_onnx(onnx_path)  # graph and initializer types; weights only if converting
    fast_fp16 = has_fast_fp16(gpu.compute_capability)
    if is_fp16_model(model):
        if settings.precision == "fp32":
            raise UsageError(
                f"{onnx_path.name} is an FP16 ONNX: a strongly typed build computes in the graph's "
                "types, so --fp32 needs the FP32 export"
            )
        islands = fp32_islands_of(model)
        if settings.fp32_layers:
            raise UsageError(
                f"{onnx_path.name} is already FP16 (its FP32 islands were chosen at export: "
                f"{', '.join(islands) or 'none'}); --fp32-layers applies when build-engine converts "
                "an FP32 ONNX"
            )
        if not fast_fp16:
            warnings.warn(f"{gpu.name} has no fast FP16; the FP16 graph builds but runs slowly (use the FP32 export)", stacklevel=3)
        return EngineGraph("fp16", None, fp32_compute_nodes(model), islands)
    if settings.precision == "fp32":
        return EngineGraph("fp32")
    if not fast_fp16:
        warnings.warn(f"{gpu.name} has no fast FP16; building FP32", stacklevel=3)
        return EngineGraph("fp32")
    import onnx

    full = onnx.load(str(onnx_path))  # with its weights, external ones included
    conversion = convert_to_fp16(full, settings.fp32_islands, settings.fp32_layers, require_layer_matches)
    islands = [kind for kind, names in conversion.island_nodes.items() if names]
    return EngineGraph("fp16", conversion.model.SerializeToString(), conversion.fp32_nodes, islands)


def build_engine(
    onnx_path: str | Path,
    output: str | Path | None = None,
    settings: BuildSettings = BuildSettings(),
    force: bool = False,
    device: str | None = None,
    require_layer_matches: bool = True,
    on_step: Callable[[str], None] = lambda step: None,
) -> BuildResult:
    """Check the ONNX, build a strongly typed serialized engine and write header + plan
    atomically; then, best effort, the timing cache."""
    onnx_path = Path(onnx_path)
    output = check_can_write(output or default_engine_path(onnx_path, settings.precision), force)
    check = precheck_onnx(onnx_path)
    shapes = settings.profile.shapes(check.input_dims)
    trt, gpu = require_tensorrt_gpu(device, "build-engine")
    on_step("preparing the graph")
    graph = engine_graph(onnx_path, settings, gpu, require_layer_matches)
    if graph.converted:
        on_step(f"converted to FP16 with FP32 islands ({', '.join(graph.fp32_islands) or 'none'})")
    cache_path = Path(settings.timing_cache) if settings.timing_cache else default_timing_cache(trt.__version__, gpu)
    import torch

    started = time.perf_counter()
    logger = tensorrt_logger(trt)
    operation = logger.start(f"build-engine {onnx_path.name} ({graph.precision})")
    with torch.cuda.device(gpu.index):
        builder = trt.Builder(logger)
        network = builder.create_network(strongly_typed_flags(trt))
        parser = trt.OnnxParser(network, logger)
        on_step("parsing the ONNX")
        parsed = parser.parse(graph.data, str(onnx_path)) if graph.converted else parser.parse_from_file(str(onnx_path))
        if not parsed:
            errors = [_one_line(str(parser.get_error(i))) for i in range(parser.num_errors)]
            raise EvitDeployError(
                f"TensorRT {trt.__version__} cannot parse {onnx_path.name} ({len(errors)} "
                f"error(s)): " + " | ".join(errors or operation.errors or ["no details"])
            )
        config = builder.create_builder_config()
        if settings.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        profile = builder.create_optimization_profile()
        profile.set_shape(check.input_name, *shapes)
        config.add_optimization_profile(profile)
        # TF32 would round FP32 matrix multiplies to FP16's 10-bit mantissa, FP32 islands
        # included: off. (BuilderFlag.TF32 exists in TensorRT 10 and 11, "enabled by default".)
        config.clear_flag(trt.BuilderFlag.TF32)
        if settings.detailed_profile:  # ProfilingVerbosity.DETAILED: TensorRT 10 and 11
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        cache = _load_timing_cache(config, cache_path, logger)
        monitor = _progress_monitor(trt, on_step, logger)
        config.progress_monitor = monitor
        on_step(f"building the {graph.precision} engine (minutes; Ctrl-C cancels; the timing cache speeds up rebuilds)")
        building = logger.start(f"build {onnx_path.name}")  # its errors, not the timing cache's
        with _stop_requests_to(monitor):
            plan = builder.build_serialized_network(network, config)
        if monitor.interrupted is not None:
            logger.take_interrupt()
            raise KeyboardInterrupt
        operation.raise_if_interrupted()
        if plan is None:
            raise EvitDeployError(
                f"TensorRT could not build {onnx_path.name}: "
                + (" | ".join(building.errors[-5:]) or f"no error among its {building.message_count} messages (out of GPU memory? try --workspace)")
            )
        cache_data = _serialize_timing_cache(config) if cache is not None else None
    header = EngineHeader(
        metadata=check.metadata,
        tensorrt_version=trt.__version__,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=graph.precision,
        settings=settings,
        input_shape=list(shapes[0][1:]),
        fp32_layers=graph.fp32_nodes,
        onnx=onnx_path.name,
        fp32_islands=graph.fp32_islands,
    )
    on_step("writing")
    write_engine(output, header, bytes(plan), force)  # the engine first: the cache is optional
    saved = _save_timing_cache(cache_path, cache_data)
    return BuildResult(
        path=output,
        header=header,
        size_bytes=output.stat().st_size,
        seconds=time.perf_counter() - started,
        timing_cache=cache_path,
        tensorrt_warnings=list(dict.fromkeys(operation.warnings)),
        timing_cache_saved=saved,
        converted=graph.converted,
    )


def _load_timing_cache(config, path: Path, logger):
    """Reuse the cache file if TensorRT takes it, else start an empty one; None when no cache
    can be set at all. A cache that cannot be read or is refused costs a warning, never the
    build."""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        warnings.warn(f"timing cache {path} cannot be read ({exc.strerror or exc}); starting a new one", stacklevel=3)
        data = b""
    if data:
        cache, problem = _set_timing_cache(config, data, logger)
        if cache is not None:
            return cache
        warnings.warn(f"timing cache {path} is damaged or from another GPU/TensorRT ({problem}); starting a new one", stacklevel=3)
    return _set_timing_cache(config, b"", logger)[0]


def _set_timing_cache(config, data: bytes, logger):
    """(the cache, None) once TensorRT has taken `data` as the config's timing cache, else (None,
    why not). TensorRT refuses a damaged cache by logging errors, not by failing the call
    ("Serialization assertion magicTagRead == kMAGIC_TAG failed", then "The timing cache will not
    be used!": NVIDIA/TensorRT#3566), one from another GPU by an error and set_timing_cache
    returning False ("Timing cache header mismatch"); the binding may also raise or return None."""
    reading = logger.start("timing cache")
    try:
        cache = config.create_timing_cache(data)
        taken = cache is not None and config.set_timing_cache(cache, False)
    except Exception as exc:  # noqa: BLE001 - whatever the binding raises, the build goes on
        return None, first_line(exc)
    if reading.errors:
        return None, reading.errors[-1]
    return (cache, None) if taken else (None, "TensorRT did not take it")


def _serialize_timing_cache(config) -> bytes | None:
    try:
        return bytes(config.get_timing_cache().serialize())
    except Exception as exc:  # noqa: BLE001 - the cache is best effort
        warnings.warn(f"the timing cache could not be serialized ({first_line(exc)}); the engine is not affected", stacklevel=3)
        return None


def _save_timing_cache(path: Path, data: bytes | None) -> bool:
    """Write the cache after the engine; a failure is a warning (the next build is just slower)."""
    if data is None:
        return False
    try:
        write_bytes_atomic(path, data, force=True)
    except (EvitDeployError, OSError) as exc:
        warnings.warn(f"timing cache not saved ({exc}); the engine was written, the next build will be slower", stacklevel=3)
        return False
    return True


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()

