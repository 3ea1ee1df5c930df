"""TensorRT engines: profile shapes, the engine header, the ONNX pre-check, the environment errors,
and the build orchestration (strongly typed FP16 from the mixed-precision graph, the timing cache,
cancelling, the process logger) against a stand-in `tensorrt` module with the real API names of
TensorRT 10.x and 11.x (tests/fake_tensorrt). The tests at the end build and run real engines and
skip without TensorRT and a CUDA GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
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

from conftest import export_torchscript

from evit_deploy.cli import app
from evit_deploy.engines import header as header_module
from evit_deploy.bench.baseline import baseline_engine
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
from evit_deploy.engines.settings import BatchProfile, BuildSettings
from evit_deploy.engines.support import has_fast_fp16
from evit_deploy.engines.tensorrt import CudaGpu, default_engine_path, torch_dtype_name
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.onnx import topk_constant_ks
from evit_deploy.metadata import stamp_metadata
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
        fp32_layers=["/blocks.3/reorganize/TopK", "/blocks.3/attn/class_attention/Softmax"],
        onnx="tiny.onnx",
        fp32_islands=["topk_scores"],
    )
    values.update(changes)
    return EngineHeader(**values)


@pytest.fixture(scope="module")
def traced_onnx(tmp_path_factory) -> Path:
    """A tiny EViT traced to ONNX by the TorchScript exporter, with metadata, dynamic batch,
    constant K (unvalidated and unsimplified: seconds). An ONNX from elsewhere, as a user may
    bring one: its readable node names (/blocks.3/attn/class_attention/Softmax) let these tests
    name nodes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(CONFIG)
    proto = export_torchscript(model, with_token_indices=False)
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
    settings = BuildSettings("fp32", BatchProfile(2, 16, 64), 1.5, ("Softmax", "*/TopK"), ("layernorm",), "/tmp/t.cache")
    assert BuildSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert settings.workspace_bytes == int(1.5 * 2**30)
    assert BuildSettings().workspace_bytes is None and BuildSettings().fp32_islands == ("topk_scores",)
    for bad in (dict(precision="int8"), dict(workspace_gb=0), dict(fp32_layers=(" ",)), dict(fp32_islands=("gelu",))):
        with pytest.raises(UsageError):
            BuildSettings(**bad)


def test_format_1_headers_still_read():
    """Engines built before strongly typed builds: fp32_topk_scores instead of fp32_islands."""
    data = make_header().to_dict()
    data["format_version"] = 1
    del data["fp32_islands"]
    settings = data["settings"]
    del settings["fp32_islands"]
    for old, islands in ((True, ("topk_scores",)), (False, ())):
        settings["fp32_topk_scores"] = old
        header = EngineHeader.from_dict(json.loads(json.dumps(data)))
        assert header.settings.fp32_islands == islands and header.fp32_islands == [] and header.format_version == 1


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
    model = topk_graph("initializer", k=TOPK_MAX_K + 1, sorted_flag=0, extra_nodes=[custom, unique])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(EvitDeployError) as caught:
        precheck_onnx(tmp_path / "bad.onnx")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("TensorRT cannot build bad.onnx: ")
    for fragment in (
        f"K={TOPK_MAX_K + 1}, above TensorRT's TopK limit of {TOPK_MAX_K}",
        "sorted=0",
        "FancyOp node 'fancy' is from custom domain 'com.example'",
        "Unique node 'uniq' is not supported",
    ):
        assert fragment in message


def test_precheck_accepts_a_run_time_k_with_a_warning(tmp_path):
    """TensorRT 10+ takes TopK's K as a tensor (ITopKLayer: "both static and dynamic k"); only
    its limit of 3840 cannot be checked before run time."""
    onnx.save(topk_graph("computed"), str(tmp_path / "dynamic_k.onnx"))
    assert tensorrt_problems(topk_graph("computed").graph) == []
    with pytest.warns(UserWarning, match=f"computed at run time; TensorRT 10\\+ accepts that, but fails at run time if K exceeds {TOPK_MAX_K}"):
        check = precheck_onnx(tmp_path / "dynamic_k.onnx")
    assert check.input_name == "images"


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
    assert message.startswith("build-engine needs TensorRT 10.12+ and an NVIDIA GPU: ")
    assert "TensorRT is not installed (pip install 'evit-deploy[tensorrt]', or in a clone pip install -e '.[tensorrt]')" in message
    assert "sees no CUDA GPU" in message and "download.pytorch.org" in message


def test_old_or_broken_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(EvitDeployError, match="TensorRT 8.6.1 is too old"):
        engines_trt.import_tensorrt()
    # 10.0-10.11 have strongly typed networks, but strong typing is complete from 10.12 on
    monkeypatch.setitem(sys.modules, "tensorrt", load_fake_tensorrt("10.11.0"))
    with pytest.raises(EvitDeployError, match=r"TensorRT 10.11.0 is too old: strongly typed builds need 10.12\+"):
        engines_trt.import_tensorrt()
    for version in ("10.12.0", "11.1.0"):
        monkeypatch.setitem(sys.modules, "tensorrt", load_fake_tensorrt(version))
        assert engines_trt.import_tensorrt().__version__ == version
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
# Build orchestration against a stand-in tensorrt module (tests/fake_tensorrt/tensorrt.py: the
# real API names of TensorRT 10.x and 11.x, recording the calls)

FAKE_TENSORRT = Path(__file__).resolve().parent / "fake_tensorrt"
TENSORRT_VERSIONS = ["10.12.0", "11.1.0"]  # the oldest supported and the newest


def load_fake_tensorrt(version: str = "10.16.0") -> types.ModuleType:
    """A fresh copy of the fake module (its own call log), as TensorRT `version`."""
    spec = importlib.util.spec_from_file_location("tensorrt", FAKE_TENSORRT / "tensorrt.py")
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("FAKE_TENSORRT_VERSION")
    os.environ["FAKE_TENSORRT_VERSION"] = version
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["FAKE_TENSORRT_VERSION"]
        else:
            os.environ["FAKE_TENSORRT_VERSION"] = previous
    return module


@pytest.fixture
def fake_build_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(tmp_path / "cache"))

    def install(version: str = "10.16.0", gpu: CudaGpu = GPU):
        trt = load_fake_tensorrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(engines_trt, "cuda_gpu", lambda device: gpu)
        monkeypatch.setattr(torch.cuda, "device", lambda index: nullcontext())
        return trt

    return install


def network_types(trt) -> dict[str, str]:
    """Layer name -> the type of its first float output, in the network TensorRT parsed."""
    network = trt.builders[-1].network
    kinds = {}
    for layer in network.layers:
        floats = [layer.get_output(i).dtype.name for i in range(layer.num_outputs)]
        floats = [kind for kind in floats if kind in ("FLOAT", "HALF")]
        if floats:
            kinds[layer.name] = floats[0]
    return kinds


def precision_calls(trt) -> list:
    """Any use of builder-flag precision: none may happen (TensorRT 11 has none of it)."""
    banned = {"FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
    return [c for c in trt.calls if c[0] in ("layer.precision", "layer.set_output_type") or (c[0] == "set_flag" and c[1] in banned)]


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_fp16_build_converts_an_fp32_onnx_and_builds_it_strongly_typed(traced_onnx, tmp_path, fake_build_environment, version):
    trt = fake_build_environment(version)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    settings = BuildSettings(
        profile=BatchProfile(2, 16, 32), workspace_gb=1.0, fp32_layers=("/norm/",), timing_cache=str(cache)
    )
    result = engines_trt.build_engine(traced_onnx, tmp_path / "tiny.plan", settings)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert flag == (2 if version.startswith("10.") else 1)  # the enum moved in TensorRT 11
    assert ("create_network", flag) in trt.calls
    assert ("build_serialized_network", [], flag) in trt.calls  # no builder flag at all
    assert precision_calls(trt) == [] and ("clear_flag", "TF32") in trt.calls
    assert ("set_shape", "images", (2, 3, 64, 64), (16, 3, 64, 64), (32, 3, 64, 64)) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 2**30) in trt.calls
    parse = next(c for c in trt.calls if c[0] in ("parse", "parse_from_file"))
    assert parse[0] == "parse" and parse[2] == str(traced_onnx)  # the converted graph, in memory
    # the network computes in the graph's types: FP32 islands, FP16 elsewhere
    kinds = network_types(trt)
    header = result.header
    assert header.precision == "fp16" and header.fp32_islands == ["topk_scores", "named"] and result.converted
    assert len(header.fp32_layers) == 21 + 1 and "/norm/LayerNormalization" in header.fp32_layers
    assert {kinds[name] for name in header.fp32_layers} == {"FLOAT"}
    for block in (3, 6, 9):  # the class row TopK ranks; the drop block's own attention is FP16
        assert kinds[f"/blocks.{block}/attn/class_attention/Softmax"] == "FLOAT"
        assert kinds[f"/blocks.{block}/reorganize/TopK"] == "FLOAT"
        assert kinds[f"/blocks.{block}/attn/Softmax"] == "HALF"
    assert kinds["/blocks.0/attn/Softmax"] == "HALF" and kinds["/blocks.3/norm1/LayerNormalization"] == "HALF"
    half = [name for name, kind in kinds.items() if kind == "HALF"]
    assert len(half) > 200
    read_back, plan = read_engine(result.path)
    assert plan.startswith(trt.PLAN_MAGIC) and read_back == header
    assert (header.tensorrt_version, header.gpu_name, header.compute_capability) == (version, GPU.name, "8.9")
    assert header.settings == settings and header.input_shape == [3, 64, 64] and header.onnx == "tiny.onnx"
    assert result.tensorrt_warnings == ["weights converted to FP16"]
    assert cache.read_bytes() == b"cache:old" and result.timing_cache_saved


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_an_fp16_onnx_builds_as_it_is(traced_onnx, tmp_path, fake_build_environment, version):
    from evit_deploy.export.precision import convert_to_fp16

    converted = convert_to_fp16(onnx.load(str(traced_onnx)), ("topk_scores", "layernorm"))
    fp16_onnx = tmp_path / "tiny_fp16.onnx"
    onnx.save(converted.model, str(fp16_onnx))
    trt = fake_build_environment(version)
    result = engines_trt.build_engine(fp16_onnx, tmp_path / "t.plan")
    assert [c[0] for c in trt.calls if c[0].startswith("parse")] == ["parse_from_file"]  # not converted again
    assert not result.converted and precision_calls(trt) == []
    header = result.header
    assert header.precision == "fp16" and header.fp32_islands == ["topk_scores", "layernorm"]
    assert set(header.fp32_layers) == set(converted.fp32_nodes)
    kinds = network_types(trt)
    assert {kinds[name] for name in header.fp32_layers} == {"FLOAT"}
    # precision was chosen at export: build-engine cannot change it
    with pytest.raises(UsageError, match="is an FP16 ONNX.*--fp32 needs the FP32 export"):
        engines_trt.build_engine(fp16_onnx, tmp_path / "t32.plan", BuildSettings("fp32"))
    with pytest.raises(UsageError, match=r"already FP16 \(its FP32 islands were chosen at export: topk_scores, layernorm\)"):
        engines_trt.build_engine(fp16_onnx, tmp_path / "t2.plan", BuildSettings(fp32_layers=("/norm/",)))


def test_fp32_build_converts_nothing(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    trt = fake_build_environment()
    result = engines_trt.build_engine(traced_onnx, settings=BuildSettings("fp32"), output=tmp_path / "t.plan")
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert ("build_serialized_network", [], flag) in trt.calls and precision_calls(trt) == []
    assert set(network_types(trt).values()) == {"FLOAT"}
    assert result.header.precision == "fp32" and result.header.fp32_layers == [] and not result.converted
    assert result.timing_cache == Path(os.environ["EVIT_DEPLOY_CACHE"]) / "tensorrt" / "timing-trt10.16.0-sm8.9.cache"
    assert result.timing_cache.read_bytes() == b"cache:"


def test_no_fast_fp16_builds_fp32_with_a_warning(traced_onnx, tmp_path, fake_build_environment):
    trt = fake_build_environment(gpu=CudaGpu(0, "GTX 1080", "6.1"))
    with pytest.warns(UserWarning, match="GTX 1080 has no fast FP16"):
        result = engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    assert result.header.precision == "fp32" and set(network_types(trt).values()) == {"FLOAT"}


def test_fp32_layernorm_island(traced_onnx, tmp_path, fake_build_environment):
    trt = fake_build_environment("11.1.0")
    settings = BuildSettings(fp32_islands=("topk_scores", "layernorm"), timing_cache=str(tmp_path / "c"))
    header = engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings).header
    assert header.fp32_islands == ["topk_scores", "layernorm"] and len(header.fp32_layers) == 21 + 25
    kinds = network_types(trt)
    assert all(kinds[n] == "FLOAT" for n in kinds if n.endswith("LayerNormalization"))


def test_parser_errors_are_all_printed_in_one_line(traced_onnx, tmp_path, fake_build_environment):
    trt = fake_build_environment()
    trt.fail_parse = True
    with pytest.raises(EvitDeployError) as caught:
        engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    message = str(caught.value)
    assert "cannot parse tiny.onnx (2 error(s))" in message and "\n" not in message
    assert "no importer for Foo0" in message and "no importer for Foo1" in message
    assert not (tmp_path / "t.plan").exists()


def test_unmatched_node_pattern_is_a_usage_error(traced_onnx, tmp_path, fake_build_environment):
    fake_build_environment()
    settings = BuildSettings(fp32_layers=("NoSuchLayer",), timing_cache=str(tmp_path / "c"))
    with pytest.raises(UsageError, match="'NoSuchLayer' matched no ONNX node"):
        engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings)


def test_detailed_profile_for_the_engine_inspector(traced_onnx, tmp_path, fake_build_environment):
    trt = fake_build_environment("11.1.0")
    settings = BuildSettings(detailed_profile=True, timing_cache=str(tmp_path / "c"))
    engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings)
    assert trt.builders[-1].config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    engines_trt.build_engine(traced_onnx, tmp_path / "u.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    assert trt.builders[-1].config.profiling_verbosity == trt.ProfilingVerbosity.LAYER_NAMES_ONLY


class CpuStream:
    """torch.cuda.Stream and Event as far as TensorRTBackend uses them, for its run path on the
    CPU (no CUDA here)."""

    cuda_stream = 0

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record(self, stream=None):
        pass

    def elapsed_time(self, end):
        return 0.0


@pytest.fixture
def fake_engine(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    """A TensorRTBackend on the fake's FP32 engine (profile 1..8), its buffers on the CPU."""
    from evit_deploy.runtime.tensorrt_backend import TensorRTBackend

    def load(version: str = "10.16.0"):
        trt = fake_build_environment(version)
        for name in ("Stream", "Event"):
            monkeypatch.setattr(torch.cuda, name, CpuStream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: CpuStream())
        settings = BuildSettings("fp32", BatchProfile(1, 4, 8), timing_cache=str(tmp_path / "c"))
        backend = TensorRTBackend(engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings).path)
        backend.device = torch.device("cpu")
        return trt, backend

    return load


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_backend_loads_an_engine_and_runs_it_by_tensor_name(fake_engine, version):
    """I/O names, types and the profile read back from the engine; the input shape set once per
    new shape; every buffer bound by address (the GPU work itself is left to the GPU tests)."""
    trt, backend = fake_engine(version)
    assert (backend.input_name, backend.output_names, backend.min_batch, backend.max_batch) == ("images", ["logits"], 1, 8)
    assert backend._dtypes == {"images": torch.float32, "logits": torch.float32}
    images = np.zeros((5, 3, 64, 64), np.float32)
    for batch in (3, 3, 5):
        assert backend.run(images[:batch]).shape == (batch, METADATA.num_classes)
    shapes = [c[2] for c in trt.calls if c[0] == "set_input_shape"]
    assert shapes == [(3, 3, 64, 64), (5, 3, 64, 64)]
    runs = [c[2] for c in trt.calls if c[0] == "execute_async_v3"]
    assert len(runs) == 3 and runs[-1]["logits"] == backend._buffers["logits"].data_ptr()


def test_backend_reports_what_tensorrt_rejects(fake_engine, tmp_path):
    trt, backend = fake_engine()
    with pytest.raises(EvitDeployError, match=r"rejected input shape \(2, 3, 32, 32\) for t.plan: .*Static dimension mismatch"):
        backend.run_prepared(torch.zeros(2, 3, 32, 32))
    with pytest.raises(EvitDeployError, match=r"batch 9 is outside t.plan's profile \[1, 8\]"):
        backend.run(np.zeros((9, 3, 64, 64), np.float32))
    assert backend.run(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, METADATA.num_classes)
    header, _ = read_engine(tmp_path / "t.plan")
    write_engine(tmp_path / "u.plan", header, b"not a plan")
    from evit_deploy.runtime.tensorrt_backend import TensorRTBackend

    with pytest.raises(EvitDeployError, match=r"TensorRT cannot load u.plan \(.*Magic tag does not match\)\); rebuild it"):
        TensorRTBackend(tmp_path / "u.plan")


def topk_island_tensors(traced_onnx) -> dict[str, str]:
    """The island tensors of the default FP16 conversion (tensor -> node)."""
    from evit_deploy.engines.layer_precisions import island_tensors
    from evit_deploy.export.precision import convert_to_fp16

    conversion = convert_to_fp16(onnx.load(str(traced_onnx)))
    return island_tensors(conversion.model, conversion.fp32_nodes)


def tensor_10x(name: str, fp32: bool) -> dict:
    return {"Name": name, "Dimensions": [-1, 3, 17, 17], "Format/Datatype": "Row major linear FP32" if fp32 else "Row major linear FP16 format"}


def tensor_11x(name: str, fp32: bool) -> dict:
    """TensorRT 11 split "Format/Datatype" into "Format" and "Datatype"."""
    layout = "Row major linear FP32 format (kLINEAR)" if fp32 else "Row major linear FP16 format (kLINEAR)"
    return {"Name": name, "Dimensions": [-1, 3, 17, 17], "Format": layout, "Datatype": "Float" if fp32 else "Half"}


@pytest.mark.parametrize("tensor", [tensor_10x, tensor_11x], ids=["10.x", "11.x"])
def test_island_precisions_read_from_inspector_layers(traced_onnx, tensor):
    """The check gpu_check.sh runs on a real engine, here on inspector JSON written by hand in
    the 10.x format Polygraphy reads (Name, Inputs/Outputs with Name and Format/Datatype) and in
    11.x's, whose type is a field of its own."""
    from evit_deploy.engines.layer_precisions import Verdict, check_island_precisions, tensor_type

    tensors = topk_island_tensors(traced_onnx)
    by_node = {node: tensor for tensor, node in tensors.items()}
    assert len(tensors) == 21  # one float output per island node (TopK's indices are not float)
    softmax, mean, topk = (
        by_node[f"/blocks.3/{n}"] for n in ("attn/class_attention/Softmax", "attn/class_attention/ReduceMean", "reorganize/TopK")
    )
    layers = [
        {"Name": "/blocks.3/attn/class_attention/Softmax", "LayerType": "SoftMax", "Inputs": [tensor("x", False)], "Outputs": [tensor(softmax, True)]},
        {"Name": "/blocks.3/reorganize/TopK", "LayerType": "TopK", "Inputs": [tensor(mean, True)], "Outputs": [tensor(topk, True)]},
    ]
    result = check_island_precisions(layers, tensors)
    assert result.verdict is Verdict.PASS and set(result.fp32) == {softmax, mean, topk} and len(result.not_visible) == 18
    layers[1]["Inputs"] = [tensor(mean, False)]
    result = check_island_precisions(layers, tensors)
    assert result.verdict is Verdict.FAIL and result.not_fp32 == {mean: tensor_type(tensor(mean, False))}
    assert "1 NOT FP32" in result.summary() and "18 inside fused layers" in result.summary()
    # every island inside one fused layer: nothing was checked, which is not a pass
    fused = [{"Name": "{ForeignNode[/patch_embed/proj/Conv.../head/Gemm]}", "LayerType": "Myelin",
              "Inputs": [tensor("images", True)], "Outputs": [tensor("logits", True)]}]
    result = check_island_precisions(fused, tensors)
    assert result.verdict is Verdict.NO_EVIDENCE and len(result.not_visible) == 21
    assert result.summary() == "no evidence: none of the 21 island tensor(s) is visible in the engine"


def test_bfloat16_is_not_fp32():
    from evit_deploy.engines.layer_precisions import is_fp32

    assert is_fp32("Row major linear FP32") and is_fp32("Float") and is_fp32("FLOAT")
    assert not any(is_fp32(kind) for kind in ("Row major linear BFloat16 format", "BFloat16", "Half", "Row major linear FP16 format", ""))


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_island_precisions_of_an_engine_read_back_with_the_inspector(traced_onnx, tmp_path, fake_build_environment, version):
    """An FP16 engine built with --detailed-profile, loaded and read back through the engine
    inspector in the JSON its TensorRT version writes: every island tensor FP32."""
    from evit_deploy.engines.layer_precisions import Verdict, check_island_precisions, engine_layers

    trt = fake_build_environment(version)
    settings = BuildSettings(detailed_profile=True, timing_cache=str(tmp_path / "c"))
    _, plan = read_engine(engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings).path)
    engine = trt.Runtime(engines_trt.tensorrt_logger(trt)).deserialize_cuda_engine(plan)
    layers = engine_layers(trt, engine)
    assert len(layers) > 300 and all(isinstance(layer, dict) for layer in layers)
    result = check_island_precisions(layers, topk_island_tensors(traced_onnx))
    assert result.verdict is Verdict.PASS and len(result.fp32) == 21 and result.not_fp32 == {} and result.not_visible == []


def benchmark_script(name: str) -> types.ModuleType:
    """benchmarks/NAME.py as a module (its main() not run), with benchmarks/ importable as the
    scripts run (their shared records.py)."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_layer_precision_script(*argv: str) -> int:
    """benchmarks/trt_layer_precisions.py's main() with these arguments."""
    module = benchmark_script("trt_layer_precisions")
    argv_before = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        return module.main()
    finally:
        sys.argv = argv_before


@pytest.mark.parametrize(
    "detailed, fused, code, verdict",
    [(True, False, 0, "PASS"), (True, True, 3, "NO EVIDENCE"), (False, False, 3, "NO EVIDENCE")],
    ids=["visible", "all-fused", "not-detailed"],
)
def test_layer_precision_script_tells_no_evidence_from_a_pass(traced_onnx, tmp_path, fake_build_environment, capsys, detailed, fused, code, verdict):
    """gpu_check.sh's island check: exit 0 when the islands are seen in FP32, 3 (not a pass) when
    none is visible, because every island is inside a fused layer or the engine has no details."""
    trt = fake_build_environment("11.1.0")
    trt.fuse_into_foreign_node = fused
    settings = BuildSettings(detailed_profile=detailed, timing_cache=str(tmp_path / "c"))
    engine = engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings).path
    assert run_layer_precision_script(str(traced_onnx), str(engine), "--json", str(tmp_path / "r.json")) == code
    assert f"topk_scores: {verdict}: " in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == verdict.lower()


def test_graph_profile_script_sums_layer_times_by_type_and_drop_part(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    """gpu_check.sh's old-against-new graph profile: TensorRT's IProfiler times per layer per
    inference (the warm-up run not counted), summed by the inspector's layer types and by the drop
    machinery's parts, told by the ONNX node names a layer's name lists."""
    from evit_deploy.runtime.tensorrt_backend import TensorRTBackend

    trt = fake_build_environment("11.1.0")
    for name in ("Stream", "Event"):
        monkeypatch.setattr(torch.cuda, name, CpuStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: CpuStream())
    settings = BuildSettings("fp32", BatchProfile(1, 4, 8), detailed_profile=True, timing_cache=str(tmp_path / "c"))
    backend = TensorRTBackend(engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings).path)
    backend.device = torch.device("cpu")
    nodes = onnx.load(str(traced_onnx)).graph.node
    parts = {n.name: "scores" if "/class_attention/" in n.name else "reorganize" if "/reorganize/" in n.name else "" for n in nodes}
    script = benchmark_script("trt_graph_profile")
    profile = script.layer_profile(backend, script.attach_profiler(backend), np.zeros((2, 3, 64, 64), np.float32), 3, parts)
    assert profile["total_ms"] == pytest.approx(trt.LAYER_MS * len(nodes)) == pytest.approx(sum(profile["by_type"].values()))
    assert profile["by_type"]["SOFTMAX"] == pytest.approx(trt.LAYER_MS * sum(n.op_type == "Softmax" for n in nodes))
    counts = {part: sum(p == part for p in parts.values()) for part in ("scores", "reorganize")}
    assert all(counts.values()) and profile["drop_ms"] == pytest.approx({k: trt.LAYER_MS * v for k, v in counts.items()})
    fused = "/blocks.3/attn/class_attention/Softmax + /blocks.3/mlp/fc1/MatMul"  # one score node, one not
    assert script.drop_part(fused, parts) == "" and script.drop_part("{ForeignNode[/blocks.3/reorganize/TopK...]}", parts) == "reorganize"


def test_baseline_engine_gets_the_islands_of_an_fp16_export(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    """The plain-ViT engine `bench` compares with is converted with the EViT engine's islands,
    also when those came from an FP16 ONNX (here a stand-in for the baseline ONNX: the same file)."""
    from evit_deploy.export.precision import convert_to_fp16
    from evit_deploy.bench import baseline

    fp16_onnx = tmp_path / "tiny_fp16.onnx"
    onnx.save(convert_to_fp16(onnx.load(str(traced_onnx)), ("topk_scores", "layernorm")).model, str(fp16_onnx))
    fake_build_environment()
    engine = engines_trt.build_engine(fp16_onnx, tmp_path / "evit.plan").path
    plain = tmp_path / "cache" / "plain.onnx"
    plain.parent.mkdir(parents=True, exist_ok=True)
    plain.write_bytes(traced_onnx.read_bytes())
    monkeypatch.setattr(baseline, "baseline_onnx", lambda metadata: plain)
    header = read_engine_header(baseline.baseline_engine(engine))
    assert header.fp32_islands == ["topk_scores", "layernorm"] and header.settings.fp32_islands == ("topk_scores", "layernorm")


# Fix 1: the engine first, the timing cache best effort


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_engine(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    trt = fake_build_environment()
    output = tmp_path / "t.plan"
    seen = []

    def failing_cache_write(path, data, force=False):
        seen.append(output.exists())  # the engine is already there
        raise EvitDeployError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(engines_trt, "write_bytes_atomic", failing_cache_write)
    with pytest.warns(UserWarning, match="timing cache not saved .*No space left on device.*the engine was written"):
        result = engines_trt.build_engine(traced_onnx, output, BuildSettings(timing_cache=str(tmp_path / "c")))
    assert seen == [True] and not result.timing_cache_saved
    assert read_engine(output)[1].startswith(trt.PLAN_MAGIC)


def test_an_unreadable_cache_starts_a_new_one(traced_onnx, tmp_path, fake_build_environment):
    trt = fake_build_environment()
    folder_cache = tmp_path / "cache-is-a-folder"
    (folder_cache / "x").mkdir(parents=True)
    with pytest.warns(UserWarning) as caught:
        result = engines_trt.build_engine(traced_onnx, tmp_path / "a.plan", BuildSettings(timing_cache=str(folder_cache)))
    assert any("timing cache not saved" in str(w.message) for w in caught)
    assert read_engine(result.path)[1].startswith(trt.PLAN_MAGIC) and not result.timing_cache_saved


@pytest.mark.parametrize(
    "data, behaviour, reason",
    [
        (b"damaged bytes", "logs", "The timing cache will not be used!"),  # what TensorRT does (#3566)
        (b"damaged bytes", "none", "The timing cache will not be used!"),
        (b"damaged bytes", "raises", "Failed to create timing cache"),
        (b"other-gpu timings", "logs", "Timing cache header mismatch"),
    ],
    ids=["damaged-logs-errors", "damaged-returns-none", "damaged-raises", "other-gpu"],
)
def test_a_refused_timing_cache_is_replaced_by_a_new_one(traced_onnx, tmp_path, fake_build_environment, data, behaviour, reason):
    """However TensorRT refuses a cache file (errors in the log and a useless cache, None, an
    exception, or set_timing_cache False), the build says so, uses a new cache and writes it."""
    trt = fake_build_environment("11.1.0")
    trt.damaged_timing_cache = behaviour
    cache = tmp_path / "timing.cache"
    cache.write_bytes(data)
    with pytest.warns(UserWarning, match=f"timing cache .*timing.cache is damaged or from another GPU/TensorRT \\(.*{reason}.*\\); starting a new one"):
        result = engines_trt.build_engine(traced_onnx, tmp_path / "b.plan", BuildSettings(timing_cache=str(cache)))
    assert cache.read_bytes() == b"cache:" and result.timing_cache_saved
    assert trt.builders[-1].config.cache.data == b""  # the build ran with the new cache


# Fix 2: Ctrl-C and SIGTERM cancel the build through the progress monitor


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_cancels_the_build_and_is_raised_after_it(traced_onnx, tmp_path, fake_build_environment, monkeypatch, signum, request):
    # As in a terminal: a background job (`make test &` from a script) starts with SIGINT ignored,
    # and build_engine rightly leaves ignored signals alone.
    old = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    request.addfinalizer(lambda: signal.signal(signum, old))
    trt = fake_build_environment()
    monkeypatch.setenv("FAKE_TENSORRT_STEPS", "6")
    trt.step_hooks[1] = lambda: os.kill(os.getpid(), signum)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    assert ("cancelled", 1) in trt.calls  # step_complete returned False: TensorRT stopped there
    assert not any(c[0] == "swallowed" for c in trt.calls)  # nothing raised inside TensorRT
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert list(tmp_path.iterdir()) == []  # no engine, no cache


def test_an_interrupt_inside_a_callback_still_cancels(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    """Where a KeyboardInterrupt does get raised inside a TensorRT callback (a handler other than
    ours), the callbacks catch it: log() never raises, the monitor cancels, the build re-raises."""
    trt = fake_build_environment()
    raised = []

    def interrupt_in_log(text):  # TensorRT's warning before the first step
        if text.startswith("weights") and not raised:
            raised.append(text)
            raise KeyboardInterrupt
        return text

    monkeypatch.setattr(engines_trt, "_one_line", interrupt_in_log)
    with pytest.raises(KeyboardInterrupt):
        engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    assert raised and not any(c[0] == "swallowed" for c in trt.calls)
    assert ("cancelled", 0) in trt.calls  # stopped at the next step
    assert not (tmp_path / "t.plan").exists()


def call_in_thread(function, *args):
    """function(*args) on a new thread (as TensorRT's own threads call the monitor)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args)))
    thread.start()
    thread.join(timeout=30)
    return result[0]


def test_a_recorded_stop_cancels_from_any_thread(fake_build_environment, monkeypatch):
    """A stop that the CLI's handler recorded (evit_deploy.interrupt) cancels at the next step,
    also when TensorRT calls step_complete from one of its own threads, where no
    KeyboardInterrupt ever arrives."""
    from evit_deploy import interrupt

    trt = fake_build_environment()
    monitor = engines_trt._progress_monitor(trt, lambda step: None, engines_trt.tensorrt_logger(trt))
    assert call_in_thread(monitor.step_complete, "Building engine", 0) is True
    monkeypatch.setattr(interrupt, "_requested", True)
    assert call_in_thread(monitor.step_complete, "Building engine", 1) is False
    assert monitor.interrupted == signal.SIGINT


def test_a_build_off_the_main_thread_stops_on_a_recorded_stop(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    """build_engine in a worker thread installs no handler; the CLI's handler records the stop and
    the build still ends at its next step, then raises."""
    from evit_deploy import interrupt

    trt = fake_build_environment()
    trt.step_hooks[1] = lambda: monkeypatch.setattr(interrupt, "_requested", True)
    settings = BuildSettings(timing_cache=str(tmp_path / "c"))

    def build():
        try:
            engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", settings)
        except KeyboardInterrupt:
            return "interrupted"
        return "built"

    assert call_in_thread(build) == "interrupted"
    assert ("cancelled", 1) in trt.calls and not (tmp_path / "t.plan").exists()


def test_a_signal_stops_the_build_while_the_main_thread_is_inside_tensorrt(fake_build_environment, request):
    """The Python handler runs only on the main thread, which TensorRT holds for the whole build;
    the signal still reaches a step that TensorRT reports from another thread, through the wakeup
    pipe CPython's C-level handler writes to. Here the signal lands on that other thread, and the
    handler installed for the build only records that it ran, so the pipe alone can stop it."""
    trt = fake_build_environment()
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, old))
    assert signal.set_wakeup_fd(-1) == -1  # nobody else's wakeup fd in this process
    monitor = engines_trt._progress_monitor(trt, lambda step: None, engines_trt.tensorrt_logger(trt))
    handled = []
    monitor.request_stop = lambda signum, frame=None: handled.append(signum)

    def tensorrt_thread():
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while monitor.step_complete("Building engine", 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        return monitor.interrupted

    with engines_trt._stop_requests_to(monitor):
        assert call_in_thread(tensorrt_thread) == signal.SIGTERM
    assert handled in ([], [signal.SIGTERM])  # the handler ran on the main thread, or not yet
    assert signal.set_wakeup_fd(-1) == -1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_cli_ctrl_c_during_a_build(traced_onnx, tmp_path):
    """The real CLI in a child process (fake TensorRT 11 and a pretend GPU): Ctrl-C during the
    build ends it at the next step, exit 130, nothing written."""
    from conftest import cli_env

    started = tmp_path / "build-started"
    env = cli_env(
        PYTHONPATH=os.pathsep.join([str(FAKE_TENSORRT), os.environ.get("PYTHONPATH", "")]),
        FAKE_TENSORRT_VERSION="11.1.0", FAKE_CUDA_GPU="NVIDIA Test GPU;8.9",
        FAKE_TENSORRT_STEPS="600", FAKE_TENSORRT_STEP_SECONDS="0.1", FAKE_TENSORRT_STARTED=str(started),
        EVIT_DEPLOY_CACHE=str(tmp_path / "cache"),
    )
    output = tmp_path / "out" / "t.plan"
    proc = subprocess.Popen(
        [sys.executable, "-m", "evit_deploy", "build-engine", str(traced_onnx), "-o", str(output)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted: no partial output was left behind"
    assert "Exception caught" not in err and "Traceback" not in err
    assert not output.exists() and not (tmp_path / "cache").exists()


# Fix 3: one TensorRT logger for the process


def test_one_logger_for_the_process_with_operation_marks(traced_onnx, tmp_path, fake_build_environment):
    trt = fake_build_environment()
    logger = engines_trt.tensorrt_logger(trt)
    assert engines_trt.tensorrt_logger(trt) is logger
    first = logger.start("first")
    logger.log(trt.ILogger.Severity.ERROR, "an old\nerror")
    logger.log(trt.ILogger.Severity.INFO, "chatter")
    second = logger.start("second")
    logger.log(trt.ILogger.Severity.WARNING, "a new warning")
    assert first.errors == ["an old error"] and first.warnings == ["a new warning"]
    assert second.errors == [] and second.warnings == ["a new warning"]
    for settings in (BuildSettings(timing_cache=str(tmp_path / "c")), BuildSettings("fp32", timing_cache=str(tmp_path / "c"))):
        engines_trt.build_engine(traced_onnx, tmp_path / f"{settings.precision}.plan", settings)
    assert len(trt.builders) == 2 and all(builder.logger is logger for builder in trt.builders)


def test_early_warnings_outlast_a_builds_chatter(traced_onnx, tmp_path, fake_build_environment):
    """A real build logs thousands of INFO and VERBOSE lines (the fake: onnx-tensorrt's per-node
    lines); they are counted, not kept, so a warning from the start of a long build is still
    reported at its end."""
    trt = fake_build_environment()
    logger = engines_trt.tensorrt_logger(trt)
    result = engines_trt.build_engine(traced_onnx, tmp_path / "t.plan", BuildSettings(timing_cache=str(tmp_path / "c")))
    build_messages = logger.message_count
    assert build_messages > 1500 and result.tensorrt_warnings == ["weights converted to FP16"]
    operation = logger.start("a long build")
    logger.log(trt.ILogger.Severity.WARNING, "an early warning")
    for number in range(30_000):
        logger.log(trt.ILogger.Severity.VERBOSE if number % 2 else trt.ILogger.Severity.INFO, f"chatter {number}")
    logger.log(trt.ILogger.Severity.ERROR, "the error")
    assert operation.warnings == ["an early warning"] and operation.errors == ["the error"]
    assert operation.message_count == 30_002 and logger.message_count == build_messages + 30_002
    assert len(logger._kept) == 2 + 1  # this operation's warning and error, the build's warning


def test_log_never_raises(fake_build_environment, monkeypatch):
    trt = fake_build_environment()
    logger = engines_trt.tensorrt_logger(trt)
    operation = logger.start("x")

    class Unprintable:
        def __str__(self):
            raise ValueError("no text")

    logger.log(trt.ILogger.Severity.ERROR, Unprintable())  # dropped, not raised
    monkeypatch.setattr(engines_trt, "_one_line", lambda text: (_ for _ in ()).throw(KeyboardInterrupt))
    logger.log(trt.ILogger.Severity.ERROR, "during Ctrl-C")  # kept for the operation to raise
    with pytest.raises(KeyboardInterrupt):
        operation.raise_if_interrupted()
    operation.raise_if_interrupted()  # raised once


def test_cli_build_engine_reports_the_engine(traced_onnx, tmp_path, fake_build_environment, monkeypatch):
    fake_build_environment()
    # A short relative output path: the report's first line names it, and with a long temp
    # folder (pytest-xdist's adds /popen-gw0) it would wrap at the 120 columns of a non-terminal.
    monkeypatch.chdir(tmp_path)
    output = Path("tiny.fp16.plan")
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "-o", str(output), "--max-batch", "64"])
    assert result.exit_code == 0, result.output
    for fragment in (
        "built", "fp16, strongly typed", "min 1, opt 64, max 64",
        "FP32 islands    topk_scores: 21 nodes (converted here from FP32)", "TensorRT: weights converted to FP16",
    ):
        assert fragment in result.output, result.output
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "-o", str(output), "--force", "--fp32-layernorm", "--fp16-topk-scores", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the stages of the build are on stderr
    assert data["header"]["fp32_islands"] == ["layernorm"] and data["converted_to_fp16"] is True
    result = runner.invoke(app, ["build-engine", str(traced_onnx), "-o", str(output), "--force", "--json", "--fp32", "--max-batch", "64"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["header"]["precision"] == "fp32" and data["path"] == str(output)
    assert read_engine_header(output).precision == "fp32"


# ---------------------------------------------------------------------------------------------
# Real engines (GPU with TensorRT only)

HAS_GPU = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
gpu_tensorrt = pytest.mark.skipif(
    not (HAS_GPU and HAS_TENSORRT),
    reason=f"needs a CUDA GPU and TensorRT 10.12+ (GPU: {'yes' if HAS_GPU else 'no'}, TensorRT: {'yes' if HAS_TENSORRT else 'no'})",
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
    fp32_nodes = fp16.header.fp32_layers  # the 3 TopK score paths, by their ONNX node names
    assert fp16.precision == "fp16" and fp16.header.fp32_islands == ["topk_scores"]
    assert min(sum("TopK" in n for n in fp32_nodes), sum("Softmax" in n for n in fp32_nodes)) >= 3
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
def test_baseline_engine_has_the_same_settings(real_engines):
    path = baseline_engine(real_engines["fp16"])
    baseline, evit = read_engine_header(path), read_engine_header(real_engines["fp16"])
    assert baseline.metadata.keep_rate == 1.0 and baseline.metadata.topk_k == []
    assert baseline.settings == evit.settings and baseline.precision == evit.precision
    assert baseline.fp32_layers == []  # no TopK, nothing to pin
    assert baseline_engine(real_engines["fp16"]) == path  # cached
