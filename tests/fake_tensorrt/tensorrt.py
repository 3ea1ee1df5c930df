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
- A build logs what onnx-tensorrt's parser logs per node and initializer (VERBOSE: "Parsing
  node: NAME [OP]", its inputs and outputs; parsers/onnx ModelImporter.cpp) and a few INFO lines:
  some thousand messages for the test ViT, as a real verbose build has.
- The plan is this module's own (PLAN_MAGIC + a JSON description of the engine); Runtime.
  deserialize_cuda_engine returns an ICudaEngine for it (None and an ERROR for a foreign plan or
  one of another version, as the real runtime logs "Magic tag does not match" / "Version tag
  does not match"). The engine has the name-based I/O API (num_io_tensors, get_tensor_name/mode/
  dtype/shape, get_tensor_profile_shape) and create_execution_context; no GPU work is done:
  execute_async_v3 checks that shapes and addresses are set and computes nothing.
- IExecutionContext.set_input_shape returns False and logs an ERROR for a shape that does not
  match the network's fixed dimensions or lies outside the profile (NvInferRuntime.h, 11.1:
  "false if the provided name does not map to an input tensor, or if some other error
  occurred"; the message wording is approximate).
- The engine inspector (create_engine_inspector, get_engine_information/get_layer_information
  with LayerInformationFormat.JSON; python/src/infer/pyCore.cpp) describes every layer only for
  ProfilingVerbosity.DETAILED engines, and names them for LAYER_NAMES_ONLY. A tensor's precision
  is 10.x's one "Format/Datatype" field ("Row major linear FP32", "Row major linear FP16
  format": the strings trt-engine-explorer maps, tools/experimental/trt-engine-explorer/trex/
  activations.py, release/10.16) and 11.x's split "Format" and "Datatype" fields (the keys that
  NVIDIA's 11.1 trt-perf-analysis tool reads, .agents/skills/trt-perf-analysis/scripts/trt_perf/
  data.py and report_template/app.js on main; the values "Float"/"Half" as there and in the
  11.x inspector migration guide, which also replaced "Bindings" by "I/O Tensors").
  fuse_into_foreign_node = True makes the engine one Myelin region that shows only the graph's
  inputs and outputs, as TensorRT builds a ViT.
- IProfiler (subclassed in Python, its __init__ called, as pyCore.cpp's trampoline asks): set as
  an execution context's `profiler`, it is told each engine layer's time (report_layer_time(
  layer_name, ms), LAYER_MS each here) after every execute_async_v3.

Imported as `tensorrt` (put this folder first on the path) it reads, from the environment:
  FAKE_TENSORRT_VERSION    default 10.16.0
  FAKE_CUDA_GPU            "NAME;MAJOR.MINOR": also make torch report that one CUDA GPU, so a
                           command gets past the GPU check on a machine without one
  FAKE_TENSORRT_STEPS, FAKE_TENSORRT_STEP_SECONDS   build length (default 4 steps, no wait)
  FAKE_TENSORRT_STARTED    a file created when the build's first phase starts
In-process tests load fresh copies with tests/test_engines.py's `load_fake_tensorrt`.
"""

from __future__ import annotations

import json
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
fuse_into_foreign_node = False  # the engine is one Myelin region: only graph inputs/outputs visible
damaged_timing_cache = "logs"  # what create_timing_cache does with damaged bytes: "logs", "none", "raises"
PLAN_MAGIC = b"FAKE-TENSORRT-PLAN\n"  # followed by the engine's description as JSON
LAYER_MS = 0.01  # every layer's time, as an IProfiler is told it


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
LayerInformationFormat = _enum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})


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


def _log(logger, severity: str, text: str) -> None:
    """TensorRT calling the application's logger (a C++ -> Python call)."""
    _noexcept("log", lambda: logger.log(getattr(ILogger.Severity, severity), text))


class IProgressMonitor:
    def __init__(self):
        pass


class ITensor:
    def __init__(self, name: str, dtype: _Enum, shape: tuple[int, ...] = ()):
        self.name = name
        self._dtype = dtype
        self.shape = shape  # -1: known only at run time
        self.is_shape_tensor = False

    @property
    def dtype(self):  # read-only in 11.x; setting it in a strongly typed network fails in 10.x
        return self._dtype


_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8"}


def _tensor(name: str, types_by_name: dict[str, int], shapes_by_name: dict[str, tuple]) -> ITensor:
    return ITensor(name, getattr(DataType, _ONNX_TYPES.get(types_by_name.get(name), "FLOAT")), shapes_by_name.get(name, ()))


class ILayer:
    def __init__(self, node, types_by_name: dict[str, int], shapes_by_name: dict[str, tuple], strongly_typed: bool):
        self.name = node.name
        self.type = _Enum(node.op_type.upper(), 0)
        self._strongly_typed = strongly_typed
        tensor = lambda name: _tensor(name, types_by_name, shapes_by_name)  # noqa: E731
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
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []

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
        shapes_by_name = {i.name: tuple(i.dims) for i in graph.initializer}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            types_by_name[value.name] = value.type.tensor_type.elem_type
            dims = value.type.tensor_type.shape.dim
            shapes_by_name[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        for initializer in graph.initializer:
            _log(self.logger, "VERBOSE", f"Importing initializer: {initializer.name}")
        network = self.network
        weights = {i.name for i in graph.initializer}
        network.inputs = [_tensor(v.name, types_by_name, shapes_by_name) for v in graph.input if v.name not in weights]
        network.outputs = [_tensor(v.name, types_by_name, shapes_by_name) for v in graph.output]
        network.layers = []
        for node in graph.node:  # what onnx-tensorrt's parseNode logs (ModelImporter.cpp)
            label = f"{node.name} [{node.op_type}]"
            _log(self.logger, "VERBOSE", f"Static check for parsing node: {label}")
            _log(self.logger, "VERBOSE", f"Parsing node: {label}")
            _log(self.logger, "VERBOSE", f"{label} inputs: " + ", ".join(f"[{name}]" for name in node.input))
            network.layers.append(ILayer(node, types_by_name, shapes_by_name, network.strongly_typed))
            _log(self.logger, "VERBOSE", f"{label} outputs: " + ", ".join(f"[{name}]" for name in node.output))
        return True

    def get_error(self, index):
        return f"In node {index} (importFoo):\n  UNSUPPORTED_NODE: no importer for Foo{index}"


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, list[tuple]] = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 - the binding's argument names
        calls.append(("set_shape", input, min, opt, max))
        self.shapes[input] = [tuple(min), tuple(opt), tuple(max)]


class ITimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return memoryview(b"cache:" + self.data)


class IBuilderConfig:
    def __init__(self, logger):
        self.logger = logger
        self.flags: set[str] = set()
        self.cache = None
        self.progress_monitor = None
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.profiles: list[IOptimizationProfile] = []

    def set_memory_pool_limit(self, pool, pool_size):
        calls.append(("set_memory_pool_limit", pool.name, pool_size))

    def add_optimization_profile(self, profile):
        calls.append(("add_optimization_profile",))
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_flag(self, flag):
        calls.append(("set_flag", flag.name))
        self.flags.add(flag.name)

    def clear_flag(self, flag):
        calls.append(("clear_flag", flag.name))
        self.flags.discard(flag.name)

    def create_timing_cache(self, serialized_timing_cache):
        """Damaged bytes (here: starting with b"damaged"): TensorRT logs two errors and the build
        goes on without the cache (NVIDIA/TensorRT#3566, 8.6); whether the binding then returns an
        empty cache, None or raises is not documented, so `damaged_timing_cache` picks one."""
        data = bytes(serialized_timing_cache)
        if not data.startswith(b"damaged"):
            return ITimingCache(data)
        if damaged_timing_cache == "raises":
            raise RuntimeError("Failed to create timing cache")
        _log(self.logger, "ERROR", "1: [stdArchiveReader.cpp::StdArchiveReaderInitCommon::36] Error Code 1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
        _log(self.logger, "ERROR", "4: The timing cache will not be used!")
        return ITimingCache(b"") if damaged_timing_cache == "logs" else None

    def set_timing_cache(self, cache, ignore_mismatch):
        """A cache from another GPU (here: starting with b"other-gpu") is refused with an error
        and False (NvInfer.h: "true if set successfully, false otherwise")."""
        if cache.data.startswith(b"other-gpu") and not ignore_mismatch:
            _log(self.logger, "ERROR", "[timingCache.cpp::validate::905] Error Code 4: API Usage Error (Timing cache header mismatch: Incoming ITimingCache: UUID = GPU-0000, Runtime device: UUID = GPU-1111. The incoming cache will not be used!)")
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
        self.config = IBuilderConfig(self.logger)
        return self.config

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        steps = int(os.environ.get("FAKE_TENSORRT_STEPS", "4"))
        pause = float(os.environ.get("FAKE_TENSORRT_STEP_SECONDS", "0"))
        calls.append(("build_serialized_network", sorted(config.flags), network.flags))
        severity = ILogger.Severity
        _log(self.logger, "INFO", "[MemUsageChange] Init builder kernel library: CPU +1454, GPU +266, now: CPU 2050, GPU 1340 (MiB)")
        _noexcept("log", lambda: self.logger.log(severity.WARNING, "weights\nconverted to FP16"))
        _log(self.logger, "INFO", "Global timing cache in use. Profiling results in this builder pass will be stored.")
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
        _log(self.logger, "INFO", f"Detected {len(network.inputs)} inputs and {len(network.outputs)} output network tensors.")
        _log(self.logger, "INFO", "Engine generation completed in 1.234 seconds.")
        return memoryview(PLAN_MAGIC + json.dumps(_engine_description(network, config)).encode())


_FORMATS = {  # DataType -> (10.x "Format/Datatype", 11.x "Format", 11.x "Datatype")
    "FLOAT": ("Row major linear FP32", "Row major linear FP32 format (kLINEAR)", "Float"),
    "HALF": ("Row major linear FP16 format", "Row major linear FP16 format (kLINEAR)", "Half"),
    "BF16": ("Row major linear BFloat16 format", "Row major linear BFloat16 format (kLINEAR)", "BFloat16"),
    "INT32": ("Row major linear Int32", "Row major linear Int32 format (kLINEAR)", "Int32"),
    "INT64": ("Row major linear Int64 format", "Row major linear Int64 format (kLINEAR)", "Int64"),
    "BOOL": ("Row major linear BOOL", "Row major linear BOOL format (kLINEAR)", "Bool"),
    "INT8": ("Row major Int8 format", "Row major linear Int8 format (kLINEAR)", "Int8"),
    "UINT8": ("Row major linear UInt8 format", "Row major linear UInt8 format (kLINEAR)", "UInt8"),
}


def _tensor_information(tensor: ITensor) -> dict:
    """One tensor as the engine inspector describes it (DETAILED)."""
    combined, layout, data_type = _FORMATS[tensor.dtype.name]
    described = {"Name": tensor.name, "Location": "Device", "Dimensions": list(tensor.shape)}
    if MAJOR >= 11:
        described.update({"Format": layout, "Datatype": data_type})
    else:
        described["Format/Datatype"] = combined
    return described


def _engine_layers(network: INetworkDefinition) -> list[dict]:
    """Engine layers, DETAILED: one per network layer, or (fuse_into_foreign_node) a single Myelin
    region that shows only the graph's inputs and outputs, as TensorRT does for a fused ViT."""
    if fuse_into_foreign_node:
        names = [layer.name for layer in network.layers]
        layers = [(f"{{ForeignNode[{names[0]}...{names[-1]}]}}", "Myelin", network.inputs, network.outputs)]
    else:
        layers = [
            (layer.name, layer.type.name, [t for t in layer._inputs if t is not None], layer._outputs)
            for layer in network.layers
        ]
    return [
        {"Name": name, "LayerType": kind, "Inputs": [_tensor_information(t) for t in inputs],
         "Outputs": [_tensor_information(t) for t in outputs], "TacticValue": "0x0000000000000000"}
        for name, kind, inputs, outputs in layers
    ]


def _engine_description(network: INetworkDefinition, config: IBuilderConfig) -> dict:
    profile = config.profiles[0].shapes if config.profiles else {}
    io = lambda tensor: {"name": tensor.name, "dtype": tensor.dtype.name, "dims": list(tensor.shape)}  # noqa: E731
    return {
        "version": __version__,
        "inputs": [io(t) | {"profile": [list(s) for s in profile.get(t.name, [t.shape] * 3)]} for t in network.inputs],
        "outputs": [io(t) for t in network.outputs],
        "profiling_verbosity": config.profiling_verbosity.name,
        "layers": _engine_layers(network),
    }


class EngineInspector:
    """What IEngineInspector prints: DETAILED engines describe every layer; LAYER_NAMES_ONLY ones
    only name them; NONE prints no layer information."""

    def __init__(self, engine):
        self.engine = engine
        self.execution_context = None

    def _layers(self) -> list:
        verbosity = self.engine.profiling_verbosity
        layers = self.engine._description["layers"]
        if verbosity == ProfilingVerbosity.DETAILED:
            return layers
        return [layer["Name"] for layer in layers] if verbosity == ProfilingVerbosity.LAYER_NAMES_ONLY else []

    def get_layer_information(self, layer_index, format):  # noqa: A002 - the binding's argument names
        return json.dumps(self._layers()[layer_index])

    def get_engine_information(self, format):  # noqa: A002
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if MAJOR >= 11:  # "Bindings" became "I/O Tensors" (TensorRT 11 inspector migration guide)
            io = {"I/O Tensors": [{"Name": n, "IOMode": self.engine.get_tensor_mode(n).name.title()} for n in names]}
        else:
            io = {"Bindings": names}
        return json.dumps({"Layers": self._layers(), **io})


class ICudaEngine:
    def __init__(self, description: dict, logger):
        self._description = description
        self._logger = logger
        self._inputs = {t["name"]: t for t in description["inputs"]}
        self._io = [*description["inputs"], *description["outputs"]]
        self.num_io_tensors = len(self._io)
        self.num_layers = len(description["layers"])
        self.profiling_verbosity = getattr(ProfilingVerbosity, description["profiling_verbosity"])

    def _tensor(self, name) -> dict:
        return next(t for t in self._io if t["name"] == name)

    def get_tensor_name(self, index):
        return self._io[index]["name"]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self._inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return getattr(DataType, self._tensor(name)["dtype"])

    def get_tensor_shape(self, name):
        return tuple(self._tensor(name)["dims"])

    def get_tensor_profile_shape(self, name, profile_index):
        return [tuple(shape) for shape in self._inputs[name]["profile"]]

    def create_execution_context(self):
        return IExecutionContext(self)

    def create_engine_inspector(self):
        return EngineInspector(self)

    def shape_problem(self, name: str, shape: tuple) -> str | None:
        """Why setInputShape refuses `shape` (NvInferRuntime.h: false "if the provided name does
        not map to an input tensor, or if some other error occurred"); None if it is accepted."""
        if name not in self._inputs:
            return f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Parameter check failed, condition: {name} is not an input tensor.)"
        tensor = self._inputs[name]
        dims, (low, _, high) = tensor["dims"], tensor["profile"]
        if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape)):
            return (f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Static dimension mismatch while "
                    f"setting input shape for {name}. Set dimensions are {list(shape)}. Expected dimensions are {dims}.)")
        if any(not lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return (f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Set dimension {list(shape)} for "
                    f"tensor {name} does not satisfy any optimization profiles. Valid range for profile 0: {low}..{high}.)")
        return None


class IProfiler:
    def __init__(self):
        pass

    def report_layer_time(self, layer_name, ms):
        pass


class IExecutionContext:
    """Shapes and addresses as the real context takes them; execute_async_v3 checks that every
    input shape and every I/O address is set, records the call, reports each layer's time to the
    profiler if one is set, and computes nothing."""

    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.input_shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.profiler: IProfiler | None = None

    def set_input_shape(self, name, shape):
        calls.append(("set_input_shape", name, tuple(shape)))
        problem = self.engine.shape_problem(name, tuple(shape))
        if problem:
            _log(self.engine._logger, "ERROR", problem)
            return False
        self.input_shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        """An input's shape as set; an output's with the batch of the input set (its -1 axes)."""
        if name in self.input_shapes:
            return self.input_shapes[name]
        dims = self.engine.get_tensor_shape(name)
        batch = next(iter(self.input_shapes.values()), (-1,))[0]
        return tuple(batch if d == -1 else d for d in dims)

    def set_tensor_address(self, name, memory):
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        calls.append(("execute_async_v3", stream_handle, dict(self.addresses)))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = [n for n in names if n not in self.addresses] + [n for n in self.engine._inputs if n not in self.input_shapes]
        if missing:
            _log(self.engine._logger, "ERROR", f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (tensor {missing[0]} has no address or shape)")
            return False
        for layer in self.engine._description["layers"] if self.profiler else ():
            self.profiler.report_layer_time(layer["Name"], LAYER_MS)
        return True


class Runtime:
    def __init__(self, logger):
        self.logger = logger
        calls.append(("Runtime",))

    def deserialize_cuda_engine(self, serialized_engine):
        """An engine from a plan this module built with the same version; otherwise None and an
        ERROR, as the real runtime does for a foreign or damaged plan."""
        data = bytes(serialized_engine)
        calls.append(("deserialize_cuda_engine", len(data)))
        if not data.startswith(PLAN_MAGIC):
            _log(self.logger, "ERROR", "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        description = json.loads(data[len(PLAN_MAGIC):])
        if description["version"] != __version__:
            _log(self.logger, "ERROR", "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match)")
            return None
        return ICudaEngine(description, self.logger)


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
