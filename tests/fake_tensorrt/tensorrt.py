"""A stand-in for the `tensorrt` package: the slice of the TensorRT Python API that evit-deploy
uses, with the real names, recording the calls, so builds and loads are tested without a GPU.

Names and behaviour follow NVIDIA/TensorRT's Python bindings (python/src/infer/pyCore.cpp,
pyGraph.cpp, python/src/parsers/pyOnnx.cpp) and include/NvInfer.h, release/10.16 for 10.x and main
(11.1) for 11.x:
- NetworkDefinitionCreationFlag: 10.x EXPLICIT_BATCH = 0 (deprecated), STRONGLY_TYPED = 1;
  11.x STRONGLY_TYPED = 0 (deprecated: strong typing is always on).
- BuilderFlag: 10.x still has FP16, OBEY_PRECISION_CONSTRAINTS, PREFER_PRECISION_CONSTRAINTS
  (deprecated in 10.12, "Superseded by strong typing"); 11.x has none of them. Both have TF32.
- ILayer.precision and set_output_type: 10.x has them, and a strongly typed network rejects them;
  11.x has neither.
- The ONNX parser's network has one layer per ONNX node, named after it; in a strongly typed
  network every tensor has the type the ONNX graph gives it.
- ILogger.log and the IProgressMonitor callbacks run inside noexcept wrappers: an exception
  raised there is printed ("[ERROR] Exception caught in log()") and swallowed; one raised in
  step_complete cancels the build (PyProgressMonitor returns False).

Imported as `tensorrt` (put this folder first on the path) it reads, from the environment:
  FAKE_TENSORRT_VERSION    default 10.16.0
  FAKE_CUDA_GPU            "NAME;MAJOR.MINOR": also make torch report that one CUDA GPU, so a
                           command gets past the GPU check on a machine without one
  FAKE_TENSORRT_STEPS, FAKE_TENSORRT_STEP_SECONDS   build length (default 4 steps, no wait)
  FAKE_TENSORRT_STARTED    a file created when the build's first phase starts
In-process tests load fresh copies with tests/test_engines.py's `load_fake_tensorrt`.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

__version__ = os.environ.get("FAKE_TENSORRT_VERSION", "10.16.0")
MAJOR = int(__version__.split(".")[0])
calls: list[tuple] = []  # what evit-deploy asked for, in order
builders: list = []
step_hooks: dict[int, object] = {}  # build step -> callable run when the step completes
fail_parse = False
PLAN = b"SERIALIZED-PLAN"


class _Enum:
    def __init__(self, name: str, value: int):
        self.name, self.value = name, value

    def __int__(self):
        return self.value

    def __index__(self):
        return self.value

    def __repr__(self):
        return self.name

    def __eq__(self, other):
        return isinstance(other, _Enum) and (self.name, self.value) == (other.name, other.value)

    def __hash__(self):
        return hash((self.name, self.value))


def _enum(name: str, members: dict[str, int]):
    return types.SimpleNamespace(**{key: _Enum(key, value) for key, value in members.items()}, __name__=name)


DataType = _enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "BF16": 7, "INT64": 8})
if MAJOR >= 11:
    NetworkDefinitionCreationFlag = _enum(
        "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}
    )
    BuilderFlag = _enum("BuilderFlag", {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6})
else:
    NetworkDefinitionCreationFlag = _enum(
        "NetworkDefinitionCreationFlag",
        {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3},
    )
    BuilderFlag = _enum(
        "BuilderFlag",
        {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
         "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10},
    )
MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0})
ProfilingVerbosity = _enum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})


class ILogger:
    Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

    def __init__(self):
        pass


_pending_interrupt = False


def _native(call) -> None:
    """Work TensorRT does in C++ with the GIL released: Python signal handlers cannot run there.
    A KeyboardInterrupt that Python's default handler raises in the meantime surfaces only when
    TensorRT next calls into Python (a callback), so here it is held until then."""
    global _pending_interrupt
    try:
        call()
    except KeyboardInterrupt:
        _pending_interrupt = True


def _noexcept(label: str, call, default=None):
    """How pybind11's trampolines call Python from TensorRT: exceptions are printed, not raised;
    an interrupt that arrived during native work is raised (and swallowed) here."""
    global _pending_interrupt
    try:
        if _pending_interrupt:
            _pending_interrupt = False
            raise KeyboardInterrupt
        return call()
    except BaseException as exc:  # noqa: BLE001 - faithful to the C++ catch (...)
        calls.append(("swallowed", label, type(exc).__name__))
        print(f"[ERROR] Exception caught in {label}()" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return default


class IProgressMonitor:
    def __init__(self):
        pass


class ITensor:
    def __init__(self, name: str, dtype: _Enum):
        self.name = name
        self._dtype = dtype
        self.is_shape_tensor = False

    @property
    def dtype(self):  # read-only in 11.x; setting it in a strongly typed network fails in 10.x
        return self._dtype


_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8"}


class ILayer:
    def __init__(self, node, types_by_name: dict[str, int], strongly_typed: bool):
        self.name = node.name
        self.type = _Enum(node.op_type.upper(), 0)
        self._strongly_typed = strongly_typed
        tensor = lambda name: ITensor(name, getattr(DataType, _ONNX_TYPES.get(types_by_name.get(name), "FLOAT")))  # noqa: E731
        self._inputs = [tensor(name) if name else None for name in node.input]
        self._outputs = [tensor(name) for name in node.output]
        self.num_inputs, self.num_outputs = len(self._inputs), len(self._outputs)

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]

    def get_output_type(self, index):
        return self._outputs[index].dtype

    if MAJOR < 11:  # removed in 11.x

        @property
        def precision(self):
            return DataType.FLOAT

        @precision.setter
        def precision(self, value):
            calls.append(("layer.precision", self.name, value))
            if self._strongly_typed:
                raise RuntimeError("Strongly-typed networks reject calls to method setPrecision")

        def set_output_type(self, index, dtype):
            calls.append(("layer.set_output_type", self.name, index, dtype))
            if self._strongly_typed:
                raise RuntimeError("Strongly-typed networks reject calls to method setOutputType")


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self.layers: list[ILayer] = []

    @property
    def strongly_typed(self) -> bool:
        return bool(self.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, index):
        return self.layers[index]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.logger = network, logger
        self.num_errors = 0

    def parse(self, model, path=None):
        calls.append(("parse", len(model), path))
        return self._load(bytes(model))

    def parse_from_file(self, model):
        calls.append(("parse_from_file", model))
        return self._load(Path(model).read_bytes())

    def _load(self, data: bytes) -> bool:
        import onnx

        if fail_parse:
            self.num_errors = 2
            return False
        proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
        graph = proto.graph
        types_by_name = {i.name: i.data_type for i in graph.initializer}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            types_by_name[value.name] = value.type.tensor_type.elem_type
        strongly = self.network.strongly_typed
        self.network.layers = [ILayer(node, types_by_name, strongly) for node in graph.node]
        return True

    def get_error(self, index):
        return f"In node {index} (importFoo):\n  UNSUPPORTED_NODE: no importer for Foo{index}"


class IOptimizationProfile:
    def set_shape(self, input, min, opt, max):  # noqa: A002 - the binding's argument names
        calls.append(("set_shape", input, min, opt, max))


class ITimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return memoryview(b"cache:" + self.data)


class IBuilderConfig:
    def __init__(self):
        self.flags: set[str] = set()
        self.cache = None
        self.progress_monitor = None
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY

    def set_memory_pool_limit(self, pool, pool_size):
        calls.append(("set_memory_pool_limit", pool.name, pool_size))

    def add_optimization_profile(self, profile):
        calls.append(("add_optimization_profile",))
        return 0

    def set_flag(self, flag):
        calls.append(("set_flag", flag.name))
        self.flags.add(flag.name)

    def clear_flag(self, flag):
        calls.append(("clear_flag", flag.name))
        self.flags.discard(flag.name)

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data.startswith(b"damaged"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        self.logger = logger
        builders.append(self)

    def create_network(self, flags=0):
        calls.append(("create_network", flags))
        self.network = INetworkDefinition(flags)
        return self.network

    def create_builder_config(self):
        self.config = IBuilderConfig()
        return self.config

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        steps = int(os.environ.get("FAKE_TENSORRT_STEPS", "4"))
        pause = float(os.environ.get("FAKE_TENSORRT_STEP_SECONDS", "0"))
        calls.append(("build_serialized_network", sorted(config.flags), network.flags))
        severity = ILogger.Severity
        _noexcept("log", lambda: self.logger.log(severity.WARNING, "weights\nconverted to FP16"))
        monitor = config.progress_monitor
        phase = "Building engine"
        if monitor is not None:
            _noexcept("phase_start", lambda: monitor.phase_start(phase, None, steps))
        started = os.environ.get("FAKE_TENSORRT_STARTED")
        if started:
            Path(started).touch()
        completed = 0
        for step in range(steps):
            _native(lambda: time.sleep(pause))
            if step in step_hooks:
                _native(step_hooks[step])
            _noexcept("log", lambda: self.logger.log(severity.VERBOSE, f"step {step}"))
            if monitor is not None and not _noexcept("step_complete", lambda: monitor.step_complete(phase, step), False):
                calls.append(("cancelled", step))
                break
            completed += 1
        if monitor is not None:
            _noexcept("phase_finish", lambda: monitor.phase_finish(phase))
        if completed < steps:
            _noexcept("log", lambda: self.logger.log(severity.ERROR, "Build was cancelled"))
            return None
        return memoryview(PLAN)


class Runtime:
    def __init__(self, logger):
        self.logger = logger
        calls.append(("Runtime",))

    def deserialize_cuda_engine(self, serialized_engine):
        calls.append(("deserialize_cuda_engine", len(serialized_engine)))
        self.logger.log(ILogger.Severity.ERROR, "fake TensorRT runs no engines")
        return None


def _pretend_cuda_gpu(spec: str) -> None:
    """torch sees one CUDA GPU called NAME with compute capability MAJOR.MINOR."""
    import contextlib

    import torch

    name, capability = spec.rsplit(";", 1)
    major, minor = (int(part) for part in capability.split("."))
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda index=None: (major, minor)
    torch.cuda.get_device_name = lambda index=None: name
    torch.cuda.device = lambda index: contextlib.nullcontext()


if os.environ.get("FAKE_CUDA_GPU"):
    _pretend_cuda_gpu(os.environ["FAKE_CUDA_GPU"])
