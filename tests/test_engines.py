"""TensorRT engines: profile shapes, the engine header, the ONNX pre-check, which layers stay FP32,
the environment errors, and the build orchestration against a stand-in `tensorrt` module. The
tests at the end build and run real engines and skip without TensorRT and a CUDA GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from evit_deploy.cli import app
from evit_deploy.engines import header as header_module
from evit_deploy.engines import tensorrt as engines_trt
from evit_deploy.engines.header import (
    MAGIC,
    EngineHeader,
    check_compatible,
    decode_header,
    encode_header,
    read_engine,
    read_engine_header,
    write_engine,
)
from evit_deploy.engines.precheck import TOPK_MAX_K, precheck_onnx, tensorrt_problems
from evit_deploy.engines.precision import LayerInfo, match_layers, select_fp32_layers, topk_score_layers
from evit_deploy.engines.settings import BatchProfile, BuildSettings
from evit_deploy.engines.support import has_fast_fp16
from evit_deploy.engines.tensorrt import CudaGpu, default_engine_path, torch_dtype_name
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.onnx import stamp_metadata, topk_constant_ks, trace_to_onnx
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.model import EvitConfig, build_model

CONFIG = EvitConfig("deit_tiny_patch16_224", keep_rate=0.5, img_size=64)
METADATA = ArtifactMetadata.from_config(CONFIG)
GPU = CudaGpu(0, "NVIDIA Test GPU", "8.9")
runner = CliRunner()


def make_header(**changes) -> EngineHeader:
    values = dict(
        metadata=METADATA,
        tensorrt_version="10.3.0",
        gpu_name=GPU.name,
        compute_capability=GPU.compute_capability,
        precision="fp16",
        settings=BuildSettings(fp32_layers=("LayerNormalization",), workspace_gb=2.5),
        input_shape=[3, 64, 64],
        fp32_layers=["/blocks.3/TopK", "/blocks.3/attn/Softmax"],
        onnx="tiny.onnx",
    )
    values.update(changes)
    return EngineHeader(**values)


@pytest.fixture(scope="module")
def traced_onnx(tmp_path_factory) -> Path:
    """A tiny EViT traced to ONNX with metadata, dynamic batch, constant K (unvalidated and
    unsimplified: seconds instead of the full export's tens of seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(CONFIG)
    proto = trace_to_onnx(model, 17, with_token_indices=False)
    assert topk_constant_ks(proto) == METADATA.topk_k
    stamp_metadata(proto, METADATA)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(proto, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Profile and settings


def test_profile_shapes_keep_the_image_dims():
    shapes = BatchProfile(1, 8, 32).shapes([None, 3, 64, 64])
    assert shapes == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))


@given(st.integers(1, 512), st.integers(0, 512), st.integers(0, 512))
def test_profile_accepts_exactly_ordered_positive_sizes(low, step_opt, step_max):
    profile = BatchProfile(low, low + step_opt, low + step_opt + step_max)
    mins, opts, maxs = profile.shapes([None, 3, 8, 8])
    assert mins[0] <= opts[0] <= maxs[0]


@pytest.mark.parametrize("sizes", [(0, 1, 1), (-1, 4, 8), (4, 2, 8), (1, 9, 8), (2, 2, 1), (1.5, 2, 4)])
def test_profile_refuses_bad_sizes(sizes):
    with pytest.raises(UsageError):
        BatchProfile(*sizes)


def test_profile_against_static_and_dynamic_inputs():
    assert BatchProfile(4, 4, 4).shapes([4, 3, 8, 8]) == ((4, 3, 8, 8),) * 3
    with pytest.raises(UsageError, match="fixed batch of 4"):
        BatchProfile(1, 4, 8).shapes([4, 3, 8, 8])
    with pytest.raises(EvitDeployError, match=r"only the batch axis.*\[\?, 3, \?, 8\]"):
        BatchProfile().shapes([None, 3, None, 8])
    with pytest.raises(EvitDeployError, match="no shape"):
        BatchProfile().shapes([])


def test_build_settings_validation_and_round_trip():
    settings = BuildSettings("fp32", BatchProfile(2, 16, 64), 1.5, ("Softmax", "*/TopK"), False, "/tmp/t.cache")
    assert BuildSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert settings.workspace_bytes == int(1.5 * 2**30)
    assert BuildSettings().workspace_bytes is None
    for bad in (dict(precision="int8"), dict(workspace_gb=0), dict(fp32_layers=(" ",))):
        with pytest.raises(UsageError):
            BuildSettings(**bad)


# ---------------------------------------------------------------------------------------------
# Engine file and header


def test_engine_file_round_trip(tmp_path):
    header = make_header()
    plan = bytes(range(256)) * 7
    path = write_engine(tmp_path / "m.plan", header, plan)
    assert read_engine(path) == (header, plan)
    assert read_engine_header(path) == header
    assert path.read_bytes().startswith(MAGIC) and path.read_bytes().endswith(plan)
    assert read_engine_header(path).metadata.to_config() == CONFIG
    assert read_engine_header(path).profile == BatchProfile(1, 64, 128)


@given(
    st.text(min_size=1, max_size=40),
    st.sampled_from(["fp16", "fp32"]),
    st.lists(st.text(max_size=30), max_size=5),
)
def test_header_encoding_round_trips_any_text(gpu_name, precision, layers):
    header = make_header(gpu_name=gpu_name, precision=precision, fp32_layers=layers)
    encoded = encode_header(header)
    decoded, offset = decode_header(encoded + b"PLAN")
    assert decoded == header and offset == len(encoded)


def test_engine_writes_are_atomic_and_need_force(tmp_path):
    path = write_engine(tmp_path / "m.plan", make_header(), b"old")
    with pytest.raises(UsageError, match="--force"):
        write_engine(path, make_header(), b"new")
    assert read_engine(path)[1] == b"old"
    write_engine(path, make_header(precision="fp32"), b"new", force=True)
    assert read_engine(path) == (make_header(precision="fp32"), b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["m.plan"]


def test_damaged_engine_files_fail_in_one_line(tmp_path):
    good = encode_header(make_header())
    cases = {
        "raw.plan": (b"\x00\x01ftrt-plan" * 10, "not an evit-deploy engine"),
        "short.plan": (MAGIC + b"\x01", "truncated"),
        "cut.plan": (good[: len(good) // 2], "truncated"),
        "json.plan": (MAGIC + (5).to_bytes(4, "little") + b"{nope", "not valid JSON"),
        "list.plan": (MAGIC + (2).to_bytes(4, "little") + b"[]", "not a JSON object"),
        "noplan.plan": (good, "no TensorRT plan"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EvitDeployError, match=message) as caught:
            read_engine(tmp_path / name)
        assert "\n" not in str(caught.value)
    with pytest.raises(EvitDeployError, match="engine not found"):
        read_engine(tmp_path / "missing.plan")


def test_newer_header_format_asks_for_an_upgrade():
    data = make_header().to_dict() | {"format_version": header_module.FORMAT_VERSION + 1}
    with pytest.raises(EvitDeployError, match="upgrade evit-deploy"):
        EngineHeader.from_dict(data)
    del data["format_version"]
    with pytest.raises(EvitDeployError, match="format None"):
        EngineHeader.from_dict(data)
    broken = make_header().to_dict()
    del broken["gpu_name"]
    with pytest.raises(EvitDeployError, match="damaged engine header"):
        EngineHeader.from_dict(broken)


def test_compatibility_with_this_machine():
    header = make_header()
    assert check_compatible(header, "10.3.0", GPU.name, "8.9", "m.plan") is None
    for version, capability in (("10.4.0", "8.9"), ("10.3.0", "9.0")):
        with pytest.raises(EvitDeployError) as caught:
            check_compatible(header, version, "Other GPU", capability, "m.plan")
        message = str(caught.value)
        assert "rebuild it here with `evit-deploy build-engine tiny.onnx`" in message
        assert "TensorRT 10.3.0" in message and f"TensorRT {version}" in message
    warning = check_compatible(header, "10.3.0", "Other GPU", "8.9", "m.plan")
    assert "Other GPU" in warning and "same compute capability" in warning


# ---------------------------------------------------------------------------------------------
# ONNX pre-check


def topk_graph(k_source: str = "initializer", k: int = 5, sorted_flag: int = 1, extra_nodes=()) -> onnx.ModelProto:
    """scores [B, 196] -> TopK -> values, with K as an initializer, a Constant node, or computed."""
    nodes = list(extra_nodes)
    initializers = []
    if k_source == "initializer":
        initializers.append(numpy_helper.from_array(np.array([k], dtype=np.int64), "k"))
    elif k_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([k], dtype=np.int64))))
    else:
        nodes += [
            helper.make_node("Shape", ["images"], ["shape"]),
            helper.make_node("Slice", ["shape", "one", "two"], ["k"]),
        ]
        initializers += [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "two"),
        ]
    nodes.append(helper.make_node("TopK", ["images", "k"], ["logits", "idx"], name="/blocks.3/TopK", sorted=sorted_flag))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 196])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stamp_metadata(model, METADATA)
    return model


def test_precheck_accepts_constant_k(tmp_path):
    for source in ("initializer", "constant"):
        onnx.save(topk_graph(source), str(tmp_path / f"{source}.onnx"))
        check = precheck_onnx(tmp_path / f"{source}.onnx")
        assert check.input_dims == [None, 196] and check.opset == 17
        assert check.metadata == METADATA


def test_precheck_names_every_problem_in_one_line(tmp_path):
    custom = helper.make_node("FancyOp", ["images"], ["fancy"], name="fancy", domain="com.example")
    unique = helper.make_node("Unique", ["images"], ["u"], name="uniq")
    model = topk_graph("computed", sorted_flag=0, extra_nodes=[custom, unique])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(EvitDeployError) as caught:
        precheck_onnx(tmp_path / "bad.onnx")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("TensorRT cannot build bad.onnx: ")
    for fragment in (
        "K computed at run time",
        "sorted=0",
        "FancyOp node 'fancy' is from custom domain 'com.example'",
        "Unique node 'uniq' is not supported",
    ):
        assert fragment in message


def test_precheck_topk_limit():
    assert tensorrt_problems(topk_graph(k=TOPK_MAX_K).graph) == []
    (problem,) = tensorrt_problems(topk_graph(k=TOPK_MAX_K + 1).graph)
    assert f"K={TOPK_MAX_K + 1}" in problem and str(TOPK_MAX_K) in problem


def test_precheck_needs_metadata_and_a_readable_file(tmp_path):
    model = topk_graph()
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(EvitDeployError, match="evit-deploy export"):
        precheck_onnx(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(EvitDeployError, match="corrupted"):
        precheck_onnx(tmp_path / "junk.onnx")
    with pytest.raises(EvitDeployError, match="not found"):
        precheck_onnx(tmp_path / "missing.onnx")


def test_precheck_warns_below_opset_17(tmp_path):
    model = topk_graph()
    model.opset_import[0].version = 13
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.warns(UserWarning, match="opset 13"):
        precheck_onnx(tmp_path / "old.onnx")


def test_precheck_passes_a_real_export(traced_onnx):
    check = precheck_onnx(traced_onnx)
    assert check.input_name == "images" and check.input_dims == [None, 3, 64, 64]
    assert check.metadata.topk_k == METADATA.topk_k


# ---------------------------------------------------------------------------------------------
# Which layers stay FP32


ONNX_KINDS = {"TopK": "TOPK", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY", "Constant": "CONSTANT"}


def onnx_layers(model: onnx.ModelProto) -> list[LayerInfo]:
    """The ONNX graph described the way the builder describes TensorRT's network."""
    return [
        LayerInfo(n.name, ONNX_KINDS.get(n.op_type, n.op_type.upper()), tuple(n.input), tuple(n.output))
        for n in model.graph.node
    ]


def test_score_paths_of_a_real_export(traced_onnx):
    layers = onnx_layers(onnx.load(str(traced_onnx)))
    kinds = {layer.name: layer.kind for layer in layers}
    chosen = topk_score_layers(layers)
    drop_blocks = [b for b, k in zip(range(12), [p.keep for p in CONFIG.token_plan]) if k is not None]
    assert drop_blocks == [3, 6, 9]
    for block in drop_blocks:
        path = [name for name in chosen if name.startswith(f"/blocks.{block}/")]
        assert [kinds[n] for n in path] == [
            "TOPK", "REDUCEMEAN", "SLICE", "GATHER", "SOFTMAX", "MUL", "MATRIX_MULTIPLY",
        ]
        assert path[-1] == f"/blocks.{block}/attn/MatMul"  # Q.K^T, not the attention x V product
    assert len(chosen) == 7 * len(drop_blocks)


def test_score_path_stops_where_there_is_no_softmax():
    layers = [
        LayerInfo("k", "CONSTANT", (), ("k_out",)),
        LayerInfo("scores", "MATRIX_MULTIPLY", ("x", "w"), ("s",)),
        LayerInfo("topk", "TOPK", ("s", "k_out"), ("v", "i")),
    ]
    assert topk_score_layers(layers) == []
    softmax_only = [
        LayerInfo("sm", "SOFTMAX", ("x",), ("p",)),
        LayerInfo("mean", "REDUCE", ("p",), ("m",)),
        LayerInfo("topk", "TOPK", ("m", None), ("v", "i")),
    ]
    assert topk_score_layers(softmax_only) == ["topk", "mean", "sm"]


def test_layer_patterns():
    names = ["/blocks.0/norm1/LayerNormalization", "/blocks.3/TopK", "/blocks.3/attn/Softmax", "/norm/LayerNormalization"]
    matched, unmatched = match_layers(names, ["LayerNormalization", "/blocks.?/TopK", "*Gelu*"])
    assert matched == [names[0], names[3], names[1]] and unmatched == ["*Gelu*"]
    assert match_layers(names, ["TopK"])[0] == ["/blocks.3/TopK"]
    assert match_layers(names, ["TopK*"])[0] == []  # a glob matches the whole name


def test_select_fp32_layers(traced_onnx):
    layers = onnx_layers(onnx.load(str(traced_onnx)))
    with pytest.raises(UsageError, match=r"'Gelu' matched no layer; layer names look like '/blocks\.0/attn/Softmax'"):
        select_fp32_layers(layers, ["Gelu"], topk_scores=True)
    assert select_fp32_layers(layers, ["Gelu"], topk_scores=False, require_matches=False) == []
    norms = select_fp32_layers(layers, ["LayerNormalization"], topk_scores=False)
    assert len(norms) == 25 and all("LayerNormalization" in n for n in norms)
    both = select_fp32_layers(layers, ["LayerNormalization", "/blocks.3/TopK"], topk_scores=True)
    assert len(both) == 25 + 21 and len(set(both)) == len(both)


# ---------------------------------------------------------------------------------------------
# Small pure helpers


@pytest.mark.parametrize(
    "capability, fast",
    [("5.2", False), ("5.3", True), ("6.0", True), ("6.1", False), ("6.2", True), ("7.0", True), ("7.5", True), ("9.0", True), ("12.0", True)],
)
def test_fast_fp16_follows_tensorrt(capability, fast):
    assert has_fast_fp16(capability) is fast


def test_dtype_mapping_and_default_paths():
    assert {torch_dtype_name(n) for n in ("FLOAT", "HALF", "INT32", "INT64", "BOOL")} == {
        "float32", "float16", "int32", "int64", "bool",
    }
    assert all(hasattr(torch, torch_dtype_name(n)) for n in ("FLOAT", "HALF", "BF16", "INT8", "UINT8"))
    with pytest.raises(EvitDeployError, match="FP8"):
        torch_dtype_name("FP8")
    assert default_engine_path("/m/deit_keep0.7.onnx", "fp16") == Path("/m/deit_keep0.7.fp16.plan")


# ---------------------------------------------------------------------------------------------
# Environment errors


def test_missing_tensorrt_and_gpu_is_one_line_with_install_hints(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EvitDeployError) as caught:
        engines_trt.require_tensorrt_gpu(None, "build-engine")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("build-engine needs TensorRT 10+ and an NVIDIA GPU: ")
    assert "TensorRT is not installed (pip install 'evit-deploy[tensorrt]', or in a clone pip install -e '.[tensorrt]')" in message
    assert "sees no CUDA GPU" in message and "download.pytorch.org" in message


def test_old_or_broken_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(EvitDeployError, match="TensorRT 8.6.1 is too old"):
        engines_trt.import_tensorrt()
    monkeypatch.delitem(sys.modules, "tensorrt")
    (tmp_path / "tensorrt.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EvitDeployError, match="installed but does not load .*libnvinfer"):
        engines_trt.import_tensorrt()


def test_cpu_device_is_refused_for_tensorrt():
    with pytest.raises(UsageError, match="CUDA GPU"):
        engines_trt.cuda_gpu("cpu")


def no_tensorrt_here(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cli_build_engine_fails_cleanly_without_tensorrt(traced_onnx, tmp_path, monkeypatch):
    no_tensorrt_here(monkeypatch)
    output = tmp_path / "tiny.plan"
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "-o", str(output)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: build-engine needs TensorRT"), result.output
    assert "evit-deploy[tensorrt]" in lines[0] and "Traceback" not in result.output
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_cli_build_engine_usage_errors_come_first(traced_onnx, tmp_path, monkeypatch):
    no_tensorrt_here(monkeypatch)
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "--min-batch", "8", "--opt-batch", "4"])
    assert result.exit_code == 2 and "min <= opt <= max" in result.output
    existing = tmp_path / "there.plan"
    existing.write_bytes(b"x")
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "-o", str(existing)])
    assert result.exit_code == 2 and "--force" in result.output
    bad = tmp_path / "bad.onnx"
    onnx.save(topk_graph(k=TOPK_MAX_K + 10), str(bad))
    result = runner.invoke(app, ["build-engine", str(bad)])
    assert result.exit_code == 1 and "above TensorRT's TopK limit" in result.output


# ---------------------------------------------------------------------------------------------
# Build orchestration against a stand-in tensorrt module


class FakeEnum:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def fake_tensorrt(fail_parse: bool = False) -> types.ModuleType:
    """The slice of the TensorRT 10 Python API that build_engine uses, recording the calls.
    Its network is the ONNX graph, one layer per node, as the real parser produces."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0"
    trt.calls = []
    trt.DataType = types.SimpleNamespace(FLOAT=FakeEnum("FLOAT"), HALF=FakeEnum("HALF"), INT64=FakeEnum("INT64"))
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in ("FP16", "TF32", "OBEY_PRECISION_CONSTRAINTS")})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    trt.ILogger = ILogger

    class Tensor:
        def __init__(self, name, dtype):
            self.name, self.dtype = name, dtype
            self.is_shape_tensor = False

    class Layer:
        def __init__(self, node):
            self.name = node.name
            self.type = FakeEnum(ONNX_KINDS.get(node.op_type, node.op_type.upper()))
            self.inputs = [Tensor(i, trt.DataType.FLOAT) if i else None for i in node.input]
            integer = {("TopK", 1), ("Shape", 0)}  # TopK's indices, a tensor's shape
            kinds = [trt.DataType.INT64 if (node.op_type, k) in integer else trt.DataType.FLOAT for k in range(len(node.output))]
            self.outputs = [Tensor(o, kind) for o, kind in zip(node.output, kinds)]
            self.num_inputs, self.num_outputs = len(self.inputs), len(self.outputs)
            self.precision = None
            self.output_types = {}

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

        def set_output_type(self, i, dtype):
            self.output_types[i] = dtype

    class Network:
        layers = []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger = network, logger
            self.num_errors = 0

        def parse_from_file(self, path):
            trt.calls.append(("parse_from_file", path))
            if fail_parse:
                self.num_errors = 2
                return False
            self.network.layers = [Layer(n) for n in onnx.load(path).graph.node]
            trt.network = self.network
            return True

        def get_error(self, i):
            return f"In node {i} (importFoo):\n  UNSUPPORTED_NODE: no importer for Foo{i}"

    class Profile:
        def set_shape(self, name, low, opt, high):
            trt.calls.append(("set_shape", name, low, opt, high))

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return memoryview(b"cache:" + self.data)

    class Config:
        def __init__(self):
            self.flags = set()
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("set_memory_pool_limit", pool, size))

        def add_optimization_profile(self, profile):
            trt.calls.append(("add_optimization_profile",))

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)
            trt.calls.append(("clear_flag", flag))

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            trt.calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build_serialized_network", sorted(config.flags)))
            self.logger.log(ILogger.Severity.WARNING, "weights\nconverted to FP16")
            return memoryview(b"SERIALIZED-PLAN")

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    return trt


@pytest.fixture
def fake_build_environment(monkeypatch):
    def install(**options):
        trt = fake_tensorrt(**options)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(engines_trt, "cuda_gpu", lambda device: GPU)
        monkeypatch.setattr(torch.cuda, "device", lambda index: nullcontext())
        return trt

    return install


def test_build_orchestration(traced_onnx, tmp_path, fake_build_environment):
    trt = fake_build_environment()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    settings = BuildSettings(
        profile=BatchProfile(2, 16, 32),
        workspace_gb=1.0,
        fp32_layers=("/norm/", "/blocks.3/Shape"),  # shape arithmetic matched, but never pinned
        timing_cache=str(cache),
    )
    result = engines_trt.build_engine(traced_onnx, tmp_path / "tiny.plan", settings)
    assert ("create_network", 0) in trt.calls
    assert ("set_shape", "images", (2, 3, 64, 64), (16, 3, 64, 64), (32, 3, 64, 64)) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 2**30) in trt.calls
    assert ("clear_flag", "TF32") in trt.calls
    assert ("build_serialized_network", ["FP16", "OBEY_PRECISION_CONSTRAINTS"]) in trt.calls
    pinned = {layer.name: layer for layer in trt.network.layers if layer.precision is not None}
    assert set(pinned) == set(result.header.fp32_layers)
    assert "/norm/LayerNormalization" in pinned and "/blocks.9/TopK" in pinned and len(pinned) == 22
    topk = pinned["/blocks.9/TopK"]
    assert topk.precision.name == "FLOAT" and list(topk.output_types) == [0]  # not the int indices
    assert cache.read_bytes() == b"cache:old"
    header, plan = read_engine(result.path)
    assert plan == b"SERIALIZED-PLAN" and header == result.header
    assert (header.tensorrt_version, header.gpu_name, header.compute_capability) == ("10.9.0", GPU.name, "8.9")
    assert header.settings == settings and header.input_shape == [3, 64, 64] and header.onnx == "tiny.onnx"
    assert result.tensorrt_warnings == ["weights converted to FP16"]


def test_fp32_build_sets_no_fp16_flag_and_pins_nothing(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    trt = fake_build_environment()
    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(tmp_path / "cache"))
    result = engines_trt.build_engine(traced_onnx, settings=BuildSettings("fp32"), output=tmp_path / "t.plan")
    assert ("build_serialized_network", []) in trt.calls
    assert result.header.precision == "fp32" and result.header.fp32_layers == []
    assert result.timing_cache == tmp_path / "cache" / "tensorrt" / "timing-trt10.9.0-sm8.9.cache"
    assert result.timing_cache.read_bytes() == b"cache:"


def test_no_fast_fp16_builds_fp32_with_a_warning(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    fake_build_environment()
    monkeypatch.setattr(engines_trt, "cuda_gpu", lambda device: CudaGpu(0, "GTX 1080", "6.1"))
    with pytest.warns(UserWarning, match="GTX 1080 has no fast FP16"):
        result = engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    assert result.header.precision == "fp32"


def test_parser_errors_are_all_printed_in_one_line(traced_onnx, tmp_path, fake_build_environment):
    fake_build_environment(fail_parse=True)
    with pytest.raises(EvitDeployError) as caught:
        engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    message = str(caught.value)
    assert "cannot parse tiny.onnx (2 error(s))" in message and "\n" not in message
    assert "no importer for Foo0" in message and "no importer for Foo1" in message
    assert not (tmp_path / "t.plan").exists()


def test_unmatched_layer_pattern_is_a_usage_error(traced_onnx, tmp_path, fake_build_environment):
    fake_build_environment()
    settings = BuildSettings(fp32_layers=("NoSuchLayer",), timing_cache=str(tmp_path / "c"))
    with pytest.raises(UsageError, match="'NoSuchLayer' matched no layer"):
        engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings)


def test_cli_build_engine_reports_the_engine(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    fake_build_environment()
    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "tiny.fp16.plan"
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "-o", str(output), "--max-batch", "64"])
    assert result.exit_code == 0, result.output
    for fragment in ("built", "fp16", "min 1, opt 64, max 64", "FP32 layers     21 (TopK score paths)", "TensorRT: weights converted to FP16"):
        assert fragment in result.output, result.output
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "-o", str(output), "--force", "--json", "--fp32", "--max-batch", "64"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["header"]["precision"] == "fp32" and data["path"] == str(output)
    assert read_engine_header(output).precision == "fp32"


# ---------------------------------------------------------------------------------------------
# Real engines (GPU with TensorRT only)

HAS_GPU = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
gpu_tensorrt = pytest.mark.skipif(
    not (HAS_GPU and HAS_TENSORRT),
    reason=f"needs a CUDA GPU and TensorRT 10+ (GPU: {'yes' if HAS_GPU else 'no'}, TensorRT: {'yes' if HAS_TENSORRT else 'no'})",
)


@pytest.fixture(scope="module")
def real_engines(traced_onnx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    profile = BatchProfile(1, 4, 8)
    engines = {}
    for precision in ("fp32", "fp16"):
        settings = BuildSettings(precision, profile, timing_cache=str(folder / "timing.cache"))
        engines[precision] = engines_trt.build_engine(traced_onnx, folder / f"tiny.{precision}.plan", settings).path
    return engines


@gpu_tensorrt
def test_engines_match_onnxruntime(real_engines, traced_onnx):
    import onnxruntime as ort

    from evit_deploy.runtime.tensorrt_backend import TensorRTBackend

    images = np.random.default_rng(0).standard_normal((6, 3, 64, 64), dtype=np.float32)
    reference = ort.InferenceSession(str(traced_onnx), providers=["CPUExecutionProvider"]).run(["logits"], {"images": images})[0]
    fp32 = TensorRTBackend(real_engines["fp32"])
    assert (fp32.min_batch, fp32.max_batch, fp32.precision) == (1, 8, "fp32")
    got = fp32.run(images)
    assert np.abs(got - reference).max() <= 1e-3 * np.abs(reference).max()
    fp16 = TensorRTBackend(real_engines["fp16"])
    pinned = fp16.header.fp32_layers  # the 3 TopK score paths, named after their ONNX nodes
    assert fp16.precision == "fp16" and min(sum("TopK" in n for n in pinned), sum("Softmax" in n for n in pinned)) >= 3
    correlation = [np.corrcoef(a, b)[0, 1] for a, b in zip(fp16.run(images), reference)]
    assert np.median(correlation) >= 0.95, correlation
    assert len(fp32.take_gpu_compute_ms()) == 1 and fp32.take_gpu_compute_ms() == []


@gpu_tensorrt
def test_engine_batches_resize_and_split(real_engines):
    from evit_deploy.runtime import Predictor
    from evit_deploy.runtime.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend(real_engines["fp32"])
    images = np.random.default_rng(1).standard_normal((8, 3, 64, 64), dtype=np.float32)
    full = backend.run(images)
    tolerance = 1e-3 * np.abs(full).max()  # other batch sizes may pick other kernels
    for size in (2, 8, 1, 5):  # grow, shrink and grow again: buffers are reused
        assert np.abs(backend.run(images[:size]) - full[:size]).max() <= tolerance
    with pytest.raises(EvitDeployError, match=r"outside .* profile \[1, 8\]"):
        backend.run(np.zeros((9, 3, 64, 64), np.float32))
    many = np.concatenate([images, images, images[:3]])
    assert np.abs(Predictor(real_engines["fp32"]).logits(many)[-3:] - full[:3]).max() <= tolerance


@gpu_tensorrt
@pytest.mark.skipif(importlib.util.find_spec("onnxslim") is None, reason="the baseline export needs onnxslim")
def test_baseline_engine_has_the_same_settings(real_engines):
    path = engines_trt.build_baseline_engine(real_engines["fp16"])
    baseline, evit = read_engine_header(path), read_engine_header(real_engines["fp16"])
    assert baseline.metadata.keep_rate == 1.0 and baseline.metadata.topk_k == []
    assert baseline.settings == evit.settings and baseline.precision == evit.precision
    assert baseline.fp32_layers == []  # no TopK, nothing to pin
    assert engines_trt.build_baseline_engine(real_engines["fp16"]) == path  # cached
