"""`evit-deploy triton-repo`: a Triton model repository whose config.pbtxt parses with Triton's
own model-config schema (tritonclient's model_config_pb2), checked field by field."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, config_for, run_cli
from evit_deploy.engines.header import EngineHeader, write_engine
from evit_deploy.engines.settings import BatchProfile, BuildSettings
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.serve.triton_repo import write_triton_repo

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve extra)"
)
from google.protobuf import text_format  # noqa: E402 - protobuf comes with tritonclient


def parse_config(path) -> "model_config_pb2.ModelConfig":
    """Parse with Triton's schema: an unknown field or a bad enum value raises ParseError."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def onnx_artifact(onnx_export):
    return onnx_export(config_for()).path


def fake_engine(path, profile=BatchProfile(1, 16, 32), with_token_indices=False) -> bytes:
    """An evit-deploy engine file whose plan is placeholder bytes (no TensorRT needed)."""
    meta = ArtifactMetadata.from_config(config_for(), with_token_indices=with_token_indices)
    header = EngineHeader(
        metadata=meta, tensorrt_version="10.9.0", gpu_name="NVIDIA H100", compute_capability="9.0",
        precision="fp16", settings=BuildSettings(profile=profile), input_shape=[3, 224, 224],
    )
    plan = b"PLAN" + bytes(range(256)) * 8
    write_engine(path, header, plan)
    return plan


def test_onnx_repository_parses_with_tritons_schema(onnx_artifact, tmp_path):
    result = write_triton_repo(
        onnx_artifact, tmp_path / "repo", instances=2, max_batch=64, preferred_batch="16,32",
        max_queue_delay_us=100, max_queue=512,
    )
    model_dir = tmp_path / "repo" / "evit"
    assert result.model_dir == model_dir
    config = parse_config(model_dir / "config.pbtxt")
    types = model_config_pb2.DataType
    assert config.name == "evit" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("images", types.Value("TYPE_FP32"), [3, 224, 224])
    assert image.format == model_config_pb2.ModelInput.Format.Value("FORMAT_NCHW")
    (logits,) = config.output
    assert (logits.name, logits.data_type, list(logits.dims)) == ("logits", types.Value("TYPE_FP32"), [1000])
    assert logits.label_filename == "labels.txt"
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [16, 32]
    assert batching.max_queue_delay_microseconds == 100
    assert batching.default_queue_policy.max_queue_size == 512
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_AUTO")
    # the model, the labels for the classification extension, the metadata for clients
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_artifact.read_bytes()
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[999] == "toilet tissue"
    meta = json.loads((model_dir / "evit_metadata.json").read_text())
    assert meta["img_size"] == 224 and meta["input_name"] == "images"  # typed JSON
    assert meta["keep_rate"] == 0.7 and meta["drop_loc"] == [3, 6, 9] and meta["fuse_token"] is True
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["evit"]  # no temp folders left


def test_token_index_outputs_are_declared_with_their_types(onnx_export, tmp_path):
    artifact = onnx_export(config_for(), with_token_indices=True).path
    write_triton_repo(artifact, tmp_path, model_name="evit_tokens", kind="cpu")
    config = parse_config(tmp_path / "evit_tokens" / "config.pbtxt")
    meta = ArtifactMetadata.from_config(config_for(), with_token_indices=True)
    outputs = {o.name: o for o in config.output}
    assert list(outputs) == ["logits", *meta.token_index_outputs]
    for name, k in zip(meta.token_index_outputs, meta.topk_k):
        assert outputs[name].data_type == model_config_pb2.DataType.Value("TYPE_INT64")
        assert list(outputs[name].dims) == [k]
        assert outputs[name].label_filename == ""
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    assert not config.dynamic_batching.preferred_batch_size


def test_engine_repository_holds_the_bare_plan(tmp_path):
    engine = tmp_path / "tiny.plan"
    plan = fake_engine(engine, BatchProfile(1, 16, 32))
    result = write_triton_repo(engine, tmp_path / "repo", max_batch=64, preferred_batch="16,32")
    config = parse_config(result.config_path)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 32  # capped at the engine's profile
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    assert (result.model_dir / "1" / "model.plan").read_bytes() == plan  # header stripped
    assert any("max_batch_size lowered" in n for n in result.notes)
    assert any("TensorRT 10.9.0" in n for n in result.notes)


def test_engine_that_cannot_take_batch_1_is_refused(tmp_path):
    engine = tmp_path / "tiny.engine"
    fake_engine(engine, BatchProfile(4, 16, 32))
    with pytest.raises(EvitDeployError, match="--min-batch 1"):
        write_triton_repo(engine, tmp_path / "repo")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preferred_batch": "16,128"}, "preferred-batch sizes must be in 1..64"),
        ({"preferred_batch": "16,x"}, "comma-separated integers"),
        ({"instances": 0}, "--instances must be positive"),
        ({"max_batch": 0}, "--max-batch must be positive"),
        ({"kind": "tpu"}, "--kind must be one of"),
        ({"model_name": "../evil"}, "model name"),
        ({"model_name": ".."}, "not only dots"),
        ({"model_name": "."}, "not only dots"),
    ],
)
def test_bad_options_are_refused_before_writing(onnx_artifact, tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        write_triton_repo(onnx_artifact, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_existing_model_is_replaced_only_with_force(onnx_artifact, tmp_path):
    write_triton_repo(onnx_artifact, tmp_path, max_batch=8)
    with pytest.raises(UsageError, match="--force"):
        write_triton_repo(onnx_artifact, tmp_path, max_batch=16)
    assert parse_config(tmp_path / "evit" / "config.pbtxt").max_batch_size == 8
    write_triton_repo(onnx_artifact, tmp_path, max_batch=16, force=True)
    assert parse_config(tmp_path / "evit" / "config.pbtxt").max_batch_size == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evit"]


@pytest.mark.parametrize("entry", ["file", "symlink", "dangling symlink"])
def test_force_replaces_a_file_or_a_link_where_the_model_folder_goes(onnx_artifact, tmp_path, entry):
    target = tmp_path / "elsewhere"
    target.mkdir()
    if entry == "file":
        (tmp_path / "evit").write_text("not a model folder")
    else:
        (tmp_path / "evit").symlink_to(target if entry == "symlink" else tmp_path / "missing")
    with pytest.raises(UsageError, match="--force"):
        write_triton_repo(onnx_artifact, tmp_path, max_batch=8)
    write_triton_repo(onnx_artifact, tmp_path, max_batch=8, force=True)
    assert (tmp_path / "evit").is_dir() and not (tmp_path / "evit").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "evit"]  # no .evit.old-* left
    assert target.is_dir()  # a link's target is never followed into


def test_a_name_the_file_system_refuses_is_the_one_cannot_write_line(onnx_artifact, tmp_path):
    name = "m" * 300  # a valid model name, too long for a file name
    with pytest.raises(EvitDeployError, match=rf"^cannot write {tmp_path}/m+: File name too long$"):
        write_triton_repo(onnx_artifact, tmp_path, model_name=name)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_repository_and_reports_errors_in_one_line(onnx_artifact, tmp_path):
    proc = run_cli(
        "triton-repo", onnx_artifact, "--output", tmp_path / "repo", "--model-name", "deit",
        "--instances", "3", "--preferred-batch", "16,32", "--max-queue-delay-us", "250",
    )
    assert proc.returncode == 0, proc.stderr
    config = parse_config(tmp_path / "repo" / "deit" / "config.pbtxt")
    assert config.name == "deit" and config.instance_group[0].count == 3
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert "tritonserver --model-repository" in proc.stdout
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"")
    assert_one_line_error(run_cli("triton-repo", checkpoint, "-o", tmp_path / "r2"), 2, "evit-deploy export")


def test_openvino_repository_for_a_cpu_fleet(onnx_artifact, tmp_path):
    """Triton's OpenVINO backend: `backend: "openvino"` (no platform), the ONNX itself in FP32."""
    result = write_triton_repo(onnx_artifact, tmp_path, platform="openvino", instances=2, threads=4)
    config = parse_config(result.config_path)
    assert config.backend == "openvino" and config.platform == ""
    assert config.default_model_filename == "model.onnx"
    assert (tmp_path / "evit" / "1" / "model.onnx").read_bytes() == onnx_artifact.read_bytes()
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "4"}
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    (image,) = config.input
    assert list(image.dims) == [3, 224, 224] and config.max_batch_size == 64
    for kwargs, fragment in (
        (dict(platform="openvino", kind="gpu"), "on the CPU"),
        (dict(platform="onnxruntime", precision="bf16"), "--platform openvino"),
        (dict(platform="openvino", threads=0), "--threads must be positive"),
        (dict(platform="triton"), "--platform must be one of"),
    ):
        with pytest.raises(UsageError, match=fragment):
            write_triton_repo(onnx_artifact, tmp_path / "bad", **kwargs)


def test_openvino_bf16_repository_is_ir_with_the_score_path_pinned(onnx_artifact, tmp_path):
    pytest.importorskip("openvino", reason="needs OpenVINO (the openvino extra)")
    from evit_deploy.runtime.cpu_features import probe_cpu

    if not probe_cpu().bf16:
        pytest.skip("this CPU has no native BF16")
    from evit_deploy.runtime import load_backend

    result = write_triton_repo(onnx_artifact, tmp_path, platform="openvino", precision="bf16")
    config = parse_config(result.config_path)
    assert config.backend == "openvino" and config.default_model_filename == ""  # model.xml: the default
    assert config.parameters["HINT_BF16"].string_value == "YES"
    xml = tmp_path / "evit" / "1" / "model.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert xml.read_text().count('name="DisablePrecisionConversion"') >= 15  # 3 drop blocks' score paths
    # the IR carries the metadata; the openvino backend loads it by its suffix
    backend = load_backend(xml, precision="bf16")
    assert backend.name == "openvino" and backend.metadata.keep_rate == 0.7
    assert set(backend.score_path_precisions().values()) == {"f32"}


def test_fp16_onnx_is_served_as_it_is_with_the_graphs_io_types(onnx_export, tmp_path):
    """An FP16 ONNX (float32 I/O kept by the conversion) gets FP32/INT64 I/O in config.pbtxt and
    is copied byte for byte: Triton's ONNX Runtime backend runs the graph as exported. The types
    come from the graph: a graph whose I/O itself is FP16 is declared TYPE_FP16."""
    import onnx
    from onnxruntime.transformers import float16

    from evit_deploy.export.precision import convert_to_fp16

    source = onnx_export(config_for(), with_token_indices=True).path
    fp16 = tmp_path / "tiny_fp16.onnx"
    onnx.save(convert_to_fp16(onnx.load(str(source))).model, str(fp16))
    result = write_triton_repo(fp16, tmp_path / "repo")
    config = parse_config(result.config_path)
    types = model_config_pb2.DataType
    assert [(t.name, t.data_type) for t in config.input] == [("images", types.Value("TYPE_FP32"))]
    assert [t.data_type for t in config.output] == [types.Value("TYPE_FP32")] + [types.Value("TYPE_INT64")] * 3
    assert result.model_path.read_bytes() == fp16.read_bytes()
    half_io = tmp_path / "half_io.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=False), str(half_io))
    config = parse_config(write_triton_repo(half_io, tmp_path / "repo2").config_path)
    assert config.input[0].data_type == config.output[0].data_type == types.Value("TYPE_FP16")
