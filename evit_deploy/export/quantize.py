"""`evit-deploy quantize`: an exported FP32 ONNX -> INT8 ONNX, validated against the FP32 file.

Methods (all write an ONNX that ONNX Runtime and OpenVINO both run):
- static: ONNX Runtime's post-training quantization, QDQ format, activations uint8 with ranges
  calibrated on a folder of images (MinMax), weights int8 per channel (U8S8, the x86 choice).
  MatMul (with a weight), Gemm and Conv are quantized.
- dynamic: ONNX Runtime's dynamic quantization: weights int8 per channel, activation ranges taken
  per batch at run time; only MatMul/Gemm with weights (Q.K^T and attention x V stay float). No
  calibration set.
- nncf: NNCF's post-training quantization (ONNX backend, transformer preset: it leaves the
  softmax and layer norms in float), calibrated on the folder like static.

In every method the nodes that compute the TopK scores (each drop block's Q.K^T MatMul, softmax,
class-row slice, head mean and TopK, found by structure: evit_deploy.export.score_path) stay
unquantized: INT8 rounding there would change which tokens are kept. So does the fused token's
MatMul, which weighs the dropped tokens by those scores: NNCF would otherwise round the scores and
tokens to 8 bits in front of it, and OpenVINO still runs that MatMul in float (a [1, N] row).

The result is validated against the FP32 file with export's machinery (validate, GATES['int8'],
judged on the held-out --validate-dir). A file that misses a gate is not written unless the caller
accepts that explicitly, which the metadata then records.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_model

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.score_path import fused_token_nodes, score_path_nodes
from evit_deploy.export.validate import GATES, Gates, ValidationFailed, ValidationReport, onnx_runner, validate
from evit_deploy.fileio import check_can_write, write_bytes_atomic
from evit_deploy.metadata import ArtifactMetadata, load_onnx, onnx_metadata, stamp_metadata
from evit_deploy.data.samples import find_images
from evit_deploy.preprocess import preprocess
from evit_deploy.precisions import FP32, INT8

METHODS = ("static", "dynamic", "nncf")
CALIBRATION_CHUNK = 16  # images preprocessed and run per calibration step
DEFAULT_CALIBRATION_IMAGES = 256
# static: quantize only MatMuls with a weight; attention's activation x activation products (the
# softmax probabilities x V above all, whose small probabilities uint8 rounds to zero) stay float
STATIC_WEIGHT_MATMULS_ONLY = True  # spread over the folder; more rarely moves MinMax ranges


@dataclass(frozen=True)
class CalibrationSet:
    folder: str
    files: tuple[Path, ...]
    digest: str  # sha256 of the sorted relative paths: the same set gives the same digest

    def to_dict(self) -> dict:
        return {"folder": self.folder, "images": len(self.files), "files_sha256": self.digest}


def calibration_set(folder: str | Path, limit: int | None = DEFAULT_CALIBRATION_IMAGES) -> CalibrationSet:
    """The images under `folder` (at most `limit`, spread evenly over the sorted list)."""
    folder = Path(folder)
    files = sorted(find_images(folder))
    if limit is not None:
        if limit <= 0:
            raise UsageError(f"--calibration-images must be positive, got {limit}")
        if len(files) > limit:
            files = [files[int(i * len(files) / limit)] for i in range(limit)]
    names = "\n".join(os.path.relpath(f, folder) for f in files)
    return CalibrationSet(str(folder.resolve()), tuple(files), hashlib.sha256(names.encode()).hexdigest())


def calibration_batches(calibration: CalibrationSet, meta: ArtifactMetadata, chunk: int = CALIBRATION_CHUNK):
    """Preprocessed calibration images in chunks, as the model's input transform prepares them."""
    transform = {k: getattr(meta, k) for k in ("mean", "std", "crop_pct", "interpolation")}
    for start in range(0, len(calibration.files), chunk):
        yield preprocess(list(calibration.files[start : start + chunk]), meta.img_size, **transform)


Batches = Callable[[], Iterator[np.ndarray]]  # calibration inputs, a fresh iterator per call


def _ort_reader(batches: Batches, meta: ArtifactMetadata):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = batches()

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {meta.input_name: batch}

    return Reader()


def quantize_graph(
    model: onnx.ModelProto,
    method: str,
    meta: ArtifactMetadata,
    batches: Batches | None,
    exclude: list[str],
) -> tuple[onnx.ModelProto, dict]:
    """The INT8 graph, and what was done (library, settings) for the metadata. `batches`:
    calibration inputs (static, nncf)."""
    if method == "nncf":
        return _quantize_nncf(model, meta, batches, exclude)
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
    with tempfile.TemporaryDirectory(prefix="evit-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        source = Path(tmp) / "fp32.onnx"  # a path, not a ModelProto: the quantizers then keep
        onnx.save(model, str(source))  # the weights inline instead of in an external file
        if method == "static":
            settings = {
                "format": "QDQ", "activations": "uint8 (asymmetric)", "weights": "int8 per channel",
                "calibration_method": "MinMax", "op_types": ["MatMul", "Gemm", "Conv"],
                "weights_only_matmuls": STATIC_WEIGHT_MATMULS_ONLY,
            }
            skipped = activation_matmuls(model) if STATIC_WEIGHT_MATMULS_ONLY else []
            quantize_static(
                source, out, _ort_reader(batches, meta), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=settings["op_types"], per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted(set(exclude) | set(skipped)),
                calibrate_method=CalibrationMethod.MinMax,
            )
        else:
            settings = {
                "format": "integer operators", "activations": "uint8, ranges per batch at run time",
                "weights": "int8 per channel", "op_types": ["MatMul", "Gemm"], "weights_only_matmuls": True,
            }
            quantize_dynamic(
                source, out, op_types_to_quantize=settings["op_types"], per_channel=True,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                extra_options={"MatMulConstBOnly": True},
            )
        quantized = onnx.load(str(out))
    root.setLevel(level)
    return quantized, {"library": f"onnxruntime {onnxruntime.__version__}", **settings}


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose inputs are both computed (attention's Q.K^T and probabilities x V), not a
    weight (an initializer or a Constant node). ONNX Runtime's MatMulConstBOnly option does not
    apply to QDQ, so they are excluded by name."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [
        node.name for node in model.graph.node
        if node.op_type == "MatMul" and not any(name in constants for name in node.input)
    ]


def _quantize_nncf(model, meta, batches, exclude) -> tuple[onnx.ModelProto, dict]:
    try:
        import nncf
    except ImportError:
        raise UsageError("--method nncf needs NNCF: pip install 'evit-deploy[openvino]'") from None
    # NNCF counts subset_size in dataset items: one image per item
    items = [{meta.input_name: image[None]} for batch in batches() for image in batch]
    nncf.set_log_level(logging.ERROR)  # its per-node notes and progress bars are not the user's
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        quantized = nncf.quantize(
            model,
            nncf.Dataset(items),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(items),
            ignored_scope=nncf.IgnoredScope(names=exclude, validate=False),
        )
    return quantized, {
        "library": f"nncf {nncf.__version__}", "format": "QDQ", "preset": "transformer",
        "weights": "int8 per channel",
    }


def check_score_path_float(quantized: onnx.ModelProto, exclude: list[str]) -> None:
    """Every score-path node is still there, and none reads a dequantized INT8 tensor except
    through the float path (a quantizer that ignored the exclusion would fail here)."""
    nodes = {node.name: node for node in quantized.graph.node}
    missing = [name for name in exclude if name not in nodes]
    if missing:
        raise EvitDeployError(f"the quantizer replaced TopK score nodes it was told to leave: {', '.join(missing)}")
    producers = {out: node for node in quantized.graph.node for out in node.output}
    for name in exclude:
        node = nodes[name]
        if node.op_type in ("TopK", "Softmax", "ReduceMean"):
            sources = [producers.get(i) for i in node.input]
            if any(s is not None and s.op_type == "DequantizeLinear" for s in sources):
                raise EvitDeployError(f"the quantizer put INT8 in front of TopK score node {name}")


@dataclass
class QuantizeResult:
    path: Path
    metadata: ArtifactMetadata
    report: ValidationReport
    size_bytes: int
    excluded: list[str]


def quantize_onnx(
    model_path: str | Path,
    output: str | Path,
    *,
    method: str = "dynamic",
    calibration_dir: str | Path | None = None,
    calibration_images: int | None = DEFAULT_CALIBRATION_IMAGES,
    validate_dir: str | Path | None = None,
    gates: Gates = GATES[INT8],
    accept_failed_gates: bool = False,
    force: bool = False,
    exclude_score_path: bool = True,
    on_step: Callable[..., None] = lambda text, total=None: None,
    on_progress: Callable[[int], None] = lambda done: None,
) -> QuantizeResult:
    """Quantize, validate against the FP32 file on the held-out folder, then write atomically
    (only if the gates pass, or `accept_failed_gates`). exclude_score_path=False quantizes the
    TopK score path too: a deliberately worse model, for showing what the gates catch."""
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    output = check_can_write(output, force)
    if validate_dir is None:
        raise UsageError(
            "INT8 is judged on held-out images: pass --validate-dir DIR (images the model was not "
            "trained on, in class folders named as the model's classes to measure accuracy)"
        )
    find_images(validate_dir)  # a missing or empty folder fails now
    if method != "dynamic" and calibration_dir is None:
        raise UsageError(f"--method {method} calibrates activation ranges: pass --calibration DIR")
    calibration = calibration_set(calibration_dir, calibration_images) if method != "dynamic" and calibration_dir else None
    fp32 = load_onnx(model_path)
    load_external_data_for_model(fp32, str(Path(model_path).parent))  # weights stored beside it
    meta = onnx_metadata(fp32, model_path)
    if meta.precision != FP32:
        raise UsageError(f"{Path(model_path).name} is already {meta.precision}; quantize the FP32 export")
    score_path = score_path_nodes(fp32) if exclude_score_path else []
    if meta.topk_k and exclude_score_path and not score_path:
        raise EvitDeployError("found no TopK score path to keep in float (was the graph edited?)")
    fused_token = fused_token_nodes(fp32) if exclude_score_path else []
    exclude = score_path + fused_token
    on_step(f"quantizing ({method})")
    batches = (lambda: calibration_batches(calibration, meta)) if calibration else None
    quantized, settings = quantize_graph(fp32, method, meta, batches, exclude)
    check_score_path_float(quantized, exclude)
    on_step("validating against FP32")
    report = validate(
        onnx_runner(fp32), onnx_runner(quantized), meta, validate_dir=validate_dir, gates=gates,
        on_step=on_step, on_progress=on_progress,
    )
    if not report.passed and not accept_failed_gates:
        raise ValidationFailed(
            f"int8 ({method}) missed the precision gates, nothing written: {report.failure_summary()} "
            "(--accept-failed-gates writes it anyway, recorded in its metadata)",
            report,
        )
    quantization = {
        "method": method,
        **settings,
        "calibration": calibration.to_dict() if calibration else None,
        "fp32_nodes": {"topk_score_path": len(score_path), "fused_token": len(fused_token)},
        "source": {"file": Path(model_path).name, "weights": meta.weights},
    }
    validation = {**report.record(validate_dir), "accepted_failed_gates": not report.passed}
    metadata = replace(meta, precision=INT8, quantization=quantization, validation=validation)
    stamp_metadata(quantized, metadata)
    data = quantized.SerializeToString()
    on_step("writing")
    write_bytes_atomic(output, data, force)
    return QuantizeResult(output, metadata, report, len(data), exclude)


def default_int8_name(model_path: str | Path) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}.int8.onnx")
