"""`evit-deploy triton-repo`: a Triton Inference Server model repository for an artifact.

    DIR/<model>/config.pbtxt             platform, I/O names, dims and types, batching, instances
    DIR/<model>/labels.txt               class names, for Triton's classification extension
    DIR/<model>/evit_metadata.json       preprocessing and token plan (for clients; Triton ignores it)
    DIR/<model>/1/model.onnx             ONNX artifact        (platform onnxruntime_onnx)
    DIR/<model>/1/model.plan             raw TensorRT plan    (platform tensorrt_plan)
    DIR/<model>/1/model.onnx             ONNX artifact        (backend openvino, --platform openvino)
    DIR/<model>/1/model.xml, model.bin   OpenVINO IR          (backend openvino, --precision bf16)

Triton's OpenVINO backend (CPU) reads IR by default and ONNX when default_model_filename says so.
FP32 serves the ONNX artifact itself. BF16 (parameter HINT_BF16) is served from IR written here,
because only IR carries the runtime attributes that keep each TopK score path in FP32 (see
evit_deploy.runtime.openvino_backend).

An evit-deploy engine is a JSON header followed by the TensorRT plan; Triton's TensorRT backend
wants the bare plan, so the header is stripped (its metadata goes to evit_metadata.json). The
plan runs only under the TensorRT version that built it: use the Triton release that ships it.

The repository is built in a temp folder next to DIR/<model> and renamed into place, so a
half-written model never appears in a repository Triton may be polling.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.fileio import atomic_folder, occupied
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.runtime.deployment import is_deployment, read_deployment
from evit_deploy.data.labels import class_names

ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}
KINDS = ("auto", "gpu", "cpu")
PLATFORMS = ("auto", "onnxruntime", "tensorrt", "openvino")
LABELS_FILE = "labels.txt"
METADATA_FILE = "evit_metadata.json"


@dataclass
class TensorSpec:
    name: str
    data_type: str  # TYPE_FP32, ...
    dims: list[int]  # without the batch axis
    label_filename: str = ""


@dataclass
class TritonModelSpec:
    name: str
    platform: str  # onnxruntime_onnx | tensorrt_plan | openvino (a backend, not a platform)
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    instances: int = 1
    kind: str = "KIND_AUTO"
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_delay_us: int = 100
    max_queue_size: int = 0  # 0: unbounded (Triton's default)
    default_model_filename: str = ""
    parameters: dict[str, str] = field(default_factory=dict)  # the backend's own settings

    @property
    def backend(self) -> str:
        """Backends named without a platform (Triton's OpenVINO backend has none)."""
        return "openvino" if self.platform == "openvino" else ""

    def to_pbtxt(self) -> str:
        """Triton's model configuration (protobuf text format of inference.ModelConfig)."""
        lines = [
            f'name: "{self.name}"',
            f'backend: "{self.backend}"' if self.backend else f'platform: "{self.platform}"',
            f"max_batch_size: {self.max_batch_size}",
            "input [",
            ",\n".join(_tensor(t, is_input=True) for t in self.inputs),
            "]",
            "output [",
            ",\n".join(_tensor(t, is_input=False) for t in self.outputs),
            "]",
            "dynamic_batching {",
        ]
        if self.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, self.preferred_batch_sizes))} ]")
        lines.append(f"  max_queue_delay_microseconds: {self.max_queue_delay_us}")
        if self.max_queue_size:
            lines += [
                "  default_queue_policy {",
                f"    max_queue_size: {self.max_queue_size}",
                "  }",
            ]
        lines += [
            "}",
            "instance_group [",
            "  {",
            f"    count: {self.instances}",
            f"    kind: {self.kind}",
            "  }",
            "]",
        ]
        if self.default_model_filename:
            lines.append(f'default_model_filename: "{self.default_model_filename}"')
        for key, value in self.parameters.items():
            lines += ["parameters {", f'  key: "{key}"', f'  value: {{ string_value: "{value}" }}', "}"]
        return "\n".join(lines) + "\n"


def _tensor(spec: TensorSpec, is_input: bool) -> str:
    body = [f'    name: "{spec.name}"', f"    data_type: {spec.data_type}"]
    if is_input and len(spec.dims) == 3:
        body.append("    format: FORMAT_NCHW")
    body.append(f"    dims: [ {', '.join(map(str, spec.dims))} ]")
    if spec.label_filename:
        body.append(f'    label_filename: "{spec.label_filename}"')
    return "  {\n" + "\n".join(body) + "\n  }"


@dataclass
class TritonRepoResult:
    model_dir: Path
    config_path: Path
    model_path: Path
    spec: TritonModelSpec
    notes: list[str]


def _onnx_spec(path: Path) -> tuple[ArtifactMetadata, list[TensorSpec], list[TensorSpec]]:
    import onnx

    from evit_deploy.metadata import read_onnx_metadata

    meta = read_onnx_metadata(path)
    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        if tensor.elem_type not in ONNX_TYPES:
            raise EvitDeployError(f"{path.name}: tensor '{value.name}' has ONNX type {tensor.elem_type}, which Triton cannot take")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not dims or any(d < 0 for d in dims[1:]):
            raise EvitDeployError(
                f"{path.name}: tensor '{value.name}' has shape {dims}; expected a dynamic batch axis "
                "followed by fixed dims (re-export with `evit-deploy export`)"
            )
        return TensorSpec(value.name, ONNX_TYPES[tensor.elem_type], dims[1:])

    initializers = {init.name for init in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return meta, inputs, outputs


def _plan_spec(path: Path) -> tuple[ArtifactMetadata, list[TensorSpec], list[TensorSpec], object]:
    from evit_deploy.engines.header import read_engine_header

    header = read_engine_header(path)
    meta = header.metadata
    inputs = [TensorSpec(meta.input_name, "TYPE_FP32", list(header.input_shape))]
    outputs = [TensorSpec(meta.output_name, "TYPE_FP32", [meta.num_classes])]
    return meta, inputs, outputs, header


def _parse_sizes(text: str | list[int] | None) -> list[int]:
    if text is None or text == "":
        return []
    if isinstance(text, list):
        return text
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--preferred-batch takes comma-separated integers, got '{text}'") from None
    return sizes


def check_model_name(name: str) -> str:
    """A Triton model name is a folder of the repository and a path segment of its URLs: letters,
    digits, '.', '_' and '-', and not only dots ('..' would be accepted and then unreachable)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or set(name) == {"."}:
        raise UsageError(
            f"model name may contain only letters, digits, '.', '_' and '-' (not only dots), got '{name}'"
        )
    return name


def write_triton_repo(
    artifact: str | Path,
    output: str | Path,
    *,
    model_name: str = "evit",
    instances: int = 1,
    max_batch: int = 64,
    preferred_batch: str | list[int] | None = None,
    max_queue_delay_us: int = 100,
    max_queue: int = 0,
    kind: str = "auto",
    force: bool = False,
    platform: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
) -> TritonRepoResult:
    """Write OUTPUT/<model_name>/ for `artifact` (.onnx, or an evit-deploy .plan/.engine).
    platform openvino (an .onnx): Triton's OpenVINO backend on the CPU, at `precision` (fp32,
    bf16), with `threads` inference threads per instance (default: all). A deployment folder
    (`evit-deploy optimize`) is served as it records: its artifact, on OpenVINO at its precision
    where it chose OpenVINO (unless a platform is given)."""
    artifact = Path(artifact)
    output = Path(output)
    if is_deployment(artifact):
        deployment = read_deployment(artifact)
        artifact = deployment.artifact
        if platform == "auto" and deployment.backend == "openvino":
            platform, precision = "openvino", deployment.options.get("precision", precision)
    check_model_name(model_name)
    if instances <= 0:
        raise UsageError(f"--instances must be positive, got {instances}")
    if max_batch <= 0:
        raise UsageError(f"--max-batch must be positive, got {max_batch}")
    if max_queue_delay_us < 0 or max_queue < 0:
        raise UsageError("--max-queue-delay-us and --max-queue must be >= 0")
    if kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got '{kind}'")
    if platform not in PLATFORMS:
        raise UsageError(f"--platform must be one of {', '.join(PLATFORMS)}, got '{platform}'")
    openvino = platform == "openvino"
    if threads is not None and threads <= 0:
        raise UsageError(f"--threads must be positive, got {threads}")
    if not openvino and precision != "fp32":
        raise UsageError(f"--precision {precision} is for --platform openvino (other platforms serve the artifact's own precision)")
    if openvino and (artifact.suffix.lower() != ".onnx" or kind == "gpu"):
        raise UsageError("--platform openvino serves an .onnx artifact on the CPU (--kind cpu or auto)")
    if openvino and precision != "fp32":
        from evit_deploy.runtime.openvino_backend import check_inference_precision

        check_inference_precision(precision)
    if not artifact.exists():
        raise EvitDeployError(f"artifact not found: {artifact}")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a directory")
    model_dir = output / model_name
    if occupied(model_dir) and not force:
        raise UsageError(f"{model_dir} already exists; pass --force to replace it")

    notes: list[str] = []
    suffix = artifact.suffix.lower()
    if suffix == ".onnx":
        meta, inputs, outputs = _onnx_spec(artifact)
        platform, model_file = ("openvino" if openvino else "onnxruntime_onnx"), "model.onnx"
        triton_kind = "KIND_CPU" if openvino else {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}[kind]
        if openvino and precision == "bf16":
            model_file = "model.xml"
    elif suffix in (".plan", ".engine"):
        if platform == "onnxruntime":
            raise UsageError("--platform onnxruntime needs the .onnx artifact, not an engine")
        meta, inputs, outputs, header = _plan_spec(artifact)
        platform, model_file = "tensorrt_plan", "model.plan"
        if kind == "cpu":
            raise UsageError("a TensorRT plan runs on a GPU only; --kind cpu needs the ONNX artifact")
        triton_kind = "KIND_GPU"
        profile = header.profile
        if profile.min > 1:
            raise EvitDeployError(
                f"{artifact.name} takes batches from {profile.min}, but Triton's batcher sends any "
                "size from 1: rebuild it with --min-batch 1"
            )
        if max_batch > profile.max:
            notes.append(f"max_batch_size lowered from {max_batch} to the engine's profile maximum {profile.max}")
            max_batch = profile.max
        if meta.token_index_outputs:
            notes.append(
                "the engine also outputs kept-token indices; only 'logits' is declared (add the "
                "others to config.pbtxt if you need them)"
            )
        notes.append(
            f"the plan was built with TensorRT {header.tensorrt_version} for {header.gpu_name} "
            f"(compute capability {header.compute_capability}): run it under the Triton release "
            "that ships that TensorRT version, on the same GPU generation"
        )
    elif suffix in (".pt", ".pth", ".safetensors"):
        raise UsageError("Triton needs an ONNX file or a TensorRT engine; run `evit-deploy export` first")
    else:
        raise UsageError(f"cannot tell the artifact type of '{artifact.name}': give a .onnx, .plan or .engine file")

    preferred = _parse_sizes(preferred_batch)
    bad = [size for size in preferred if not 0 < size <= max_batch]
    if bad:
        raise UsageError(f"--preferred-batch sizes must be in 1..{max_batch} (max_batch_size), got {bad}")
    names = [t.name for t in inputs]
    if names != [meta.input_name]:
        raise EvitDeployError(f"{artifact.name} has inputs {names}, expected ['{meta.input_name}']")
    for tensor in outputs:
        if tensor.name == meta.output_name:
            if tensor.dims != [meta.num_classes]:
                raise EvitDeployError(f"{artifact.name}: output '{tensor.name}' has dims {tensor.dims}, expected [{meta.num_classes}]")
            tensor.label_filename = LABELS_FILE

    parameters = {}
    if openvino:
        parameters = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}  # one stream per instance
        if threads:
            parameters["INFERENCE_NUM_THREADS"] = str(threads)
        if precision == "bf16":
            parameters["HINT_BF16"] = "YES"
    spec = TritonModelSpec(
        name=model_name,
        platform=platform,
        max_batch_size=max_batch,
        inputs=inputs,
        outputs=outputs,
        instances=instances,
        kind=triton_kind,
        preferred_batch_sizes=sorted(set(preferred)),
        max_queue_delay_us=max_queue_delay_us,
        max_queue_size=max_queue,
        default_model_filename="model.onnx" if model_file == "model.onnx" and openvino else "",
        parameters=parameters,
    )

    with atomic_folder(model_dir, force) as tmp:
        (tmp / "1").mkdir()
        (tmp / "config.pbtxt").write_text(spec.to_pbtxt(), encoding="utf-8")
        (tmp / LABELS_FILE).write_text("\n".join(class_names(meta)) + "\n", encoding="utf-8")
        (tmp / METADATA_FILE).write_text(
            json.dumps({**meta.to_dict(), "source": artifact.name}, indent=2) + "\n", encoding="utf-8"
        )
        if platform == "tensorrt_plan":
            from evit_deploy.engines.header import read_engine

            _, plan = read_engine(artifact)
            (tmp / "1" / model_file).write_bytes(plan)
        elif model_file == "model.xml":
            from evit_deploy.runtime.openvino_backend import pin_score_path, read_model, save_ir

            ir, _ = read_model(artifact)
            pin_score_path(ir)
            save_ir(ir, meta, tmp / "1" / model_file)
        else:
            shutil.copyfile(artifact, tmp / "1" / model_file)
    return TritonRepoResult(
        model_dir=model_dir,
        config_path=model_dir / "config.pbtxt",
        model_path=model_dir / "1" / model_file,
        spec=spec,
        notes=notes,
    )
