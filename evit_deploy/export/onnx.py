"""PyTorch EViT -> ONNX with a dynamic batch axis, constant-K TopK and evit-deploy metadata.

One function per step, as in Ultralytics' exporter: export, simplify, check, stamp, validate, write.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.precision import DEFAULT_ISLANDS, ISLANDS, NAME_SCOPES, convert_to_fp16, module_scopes
from evit_deploy.export.validate import GATES, ValidationFailed, ValidationReport, validate_onnx
from evit_deploy.fileio import check_can_write, write_bytes_atomic
from evit_deploy.data.samples import find_images
from evit_deploy.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata, stamp_metadata
from evit_deploy.model.vit import EViT
from evit_deploy.precisions import FP16, FP32, check_precision, written_by

# The torch.export-based exporter writes opset 18 and up (its down-conversion to 17 fails on
# EViT's graph); LayerNormalization is one node from 17 on, which TensorRT FP16 needs.
MIN_OPSET = 18
MAX_OPSET = 23  # the newest this torch exports (torch.onnx._constants.ONNX_MAX_OPSET)
DEFAULT_OPSET = 18
TRACE_BATCH = 2  # validation runs another batch size, proving the batch axis is really dynamic
MAX_BATCH = 1 << 20  # the batch axis' upper bound for torch.export (ONNX keeps it symbolic)


class _WithTokenIndices(torch.nn.Module):
    """Flattens (logits, (idx, ...)) into separate outputs for the exporter."""

    def __init__(self, model: EViT):
        super().__init__()
        self.model = model

    def forward(self, images):
        logits, indices = self.model(images, return_token_indices=True)
        return (logits, *indices)


@dataclass
class ExportResult:
    path: Path
    metadata: ArtifactMetadata
    report: ValidationReport
    size_bytes: int
    opset: int


def export_graph(model: EViT, opset: int, with_token_indices: bool) -> onnx.ModelProto:
    """torch.export-based ONNX export (the TorchScript exporter is deprecated). K of every TopK
    is a Python int, so it lands as a constant; only the batch axis is dynamic."""
    meta = ArtifactMetadata.from_config(model.config, with_token_indices=with_token_indices)
    module = _WithTokenIndices(model) if with_token_indices else model
    output_names = [OUTPUT_NAME, *meta.token_index_outputs]
    dummy = torch.zeros(TRACE_BATCH, 3, model.config.img_size, model.config.img_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." notes
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                (dummy,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes={"images": {0: batch}},
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    version = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if version != opset:
        raise EvitDeployError(f"the exporter wrote opset {version}, not the {opset} asked for")
    keep_module_scopes(proto, "model" if with_token_indices else "")
    return proto


def keep_module_scopes(proto: onnx.ModelProto, wrapper: str) -> None:
    """Of the node metadata the exporter writes (stack traces with local paths, FX nodes, ...)
    keep only the module scopes, as the EViT model's own ('blocks.3.attn', not the export
    wrapper's 'model.blocks.3.attn'): --fp32-layers names modules by them."""
    for node in proto.graph.node:
        scopes = module_scopes(node)
        del node.metadata_props[:]
        if scopes is None:
            continue
        if wrapper:
            names = [s for s in ast.literal_eval(scopes) if s != wrapper]
            scopes = repr([s.removeprefix(wrapper + ".") for s in names])
        node.metadata_props.add(key=NAME_SCOPES, value=scopes)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and fuse with onnxslim (shape arithmetic on the static token axis folds
    away); the dynamic batch axis and the nodes' module scopes (for --fp32-layers) are kept."""
    try:
        import onnxslim
    except ImportError:
        warnings.warn("onnxslim is not installed: the graph is exported without simplification")
        return model
    scopes = {node.name: found for node in model.graph.node if (found := module_scopes(node)) is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(model)
    for node in slim.graph.node:  # onnxslim drops node metadata: keep the module scopes
        if node.name in scopes:
            node.metadata_props.add(key=NAME_SCOPES, value=scopes[node.name])
    return slim


def topk_constant_ks(model: onnx.ModelProto) -> list[int]:
    """K of every TopK, in graph order, after turning Constant-node K into initializers (older
    TensorRT parsers accept only an initializer). Fails if any K is computed at run time."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    constants = {
        node.output[0]: node for node in graph.node if node.op_type == "Constant"
    }
    ks = []
    for node in graph.node:
        if node.op_type != "TopK":
            continue
        k_name = node.input[1]
        if k_name in constants:
            value = next(a for a in constants[k_name].attribute if a.name == "value")
            tensor = onnx.helper.get_attribute_value(value)
            tensor.name = k_name
            graph.initializer.append(tensor)
            initializers[k_name] = tensor
            graph.node.remove(constants.pop(k_name))
        if k_name not in initializers:
            raise EvitDeployError(
                f"TopK node '{node.name}' has a K computed at run time; TensorRT needs a constant"
            )
        ks.append(int(np.asarray(numpy_helper.to_array(initializers[k_name])).reshape(-1)[0]))
    return ks


def check_export_precision(precision: str, fp32_islands: Sequence[str], validate_dir: str | Path | None) -> None:
    """Refuse a precision, island or held-out folder that cannot work, before any model is built."""
    check_precision(precision, written_by("export"), "export")
    unknown = sorted(set(fp32_islands) - set(ISLANDS))
    if unknown:
        raise UsageError(f"unknown FP32 island(s) {', '.join(unknown)}; choose from {', '.join(ISLANDS)}")
    if precision != FP32 and validate_dir is None:
        raise UsageError(
            f"{precision} is judged on held-out images: pass --validate-dir DIR (images the model "
            "was not trained on, in class folders to measure accuracy)"
        )
    if validate_dir is not None:
        find_images(validate_dir)  # a missing or empty folder fails now, not after tracing


def check_opset(opset: int) -> None:
    """Refuse an opset the exporter or TensorRT cannot use, before any model is built."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(
            f"opset must be >= {MIN_OPSET} (the oldest the torch.export-based exporter writes) "
            f"and <= {MAX_OPSET} (the newest), got {opset}"
        )


def export_onnx(
    model: EViT,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    with_token_indices: bool = False,
    validate_dir: str | Path | None = None,
    precision: str = FP32,
    fp32_islands: Sequence[str] = DEFAULT_ISLANDS,
    accept_failed_gates: bool = False,
    on_step: Callable[..., None] = lambda text, total=None: None,
    on_progress: Callable[[int], None] = lambda done: None,
) -> ExportResult:
    """Export, validate against `model` (also on the images under validate_dir, if given) and only
    then write `output` atomically.

    precision "fp16": FP16 weights and compute with `fp32_islands` kept in FP32 (precision.py),
    float32 input and logits; judged by the FP16 gates on validate_dir, which it then needs. A
    reduced precision that misses a gate is written only with `accept_failed_gates`, and its
    metadata lists the gates it missed.
    A file that fails validation is never written, so a path that exists is always a checked
    export. on_step(text) names each stage as it starts, on_step(text, images) the held-out
    validation, whose images done go to on_progress.
    """
    check_opset(opset)
    output = check_can_write(output, force)
    check_export_precision(precision, fp32_islands, validate_dir)
    model = model.eval()
    on_step("exporting")
    proto = export_graph(model, opset, with_token_indices)
    on_step("simplifying")
    proto = simplify(proto)
    ks = topk_constant_ks(proto)
    metadata = ArtifactMetadata.from_model(model, with_token_indices)
    if ks != metadata.topk_k:
        raise EvitDeployError(f"exported TopK K values {ks} differ from the plan {metadata.topk_k}")
    if precision == FP16:
        on_step(f"converting to FP16 with FP32 islands ({', '.join(fp32_islands) or 'none'})")
        proto = convert_to_fp16(proto, fp32_islands).model
        metadata = dataclasses.replace(metadata, precision=FP16, fp32_islands=list(fp32_islands))
    stamp_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    on_step("validating")
    report = validate_onnx(
        model, data, validate_dir=validate_dir, gates=GATES.get(precision), on_step=on_step, on_progress=on_progress
    )
    if not report.passed and not (accept_failed_gates and precision != FP32):
        hint = " (--accept-failed-gates writes it anyway, recorded in its metadata)" if precision != FP32 else ""
        raise ValidationFailed(
            f"{precision} export failed validation, nothing written{hint}: {report.failure_summary()}",
            report,
        )
    record = {**report.record(validate_dir), "accepted_failed_gates": not report.passed}
    metadata = dataclasses.replace(metadata, validation=record)
    stamp_metadata(proto, metadata)
    data = proto.SerializeToString()
    on_step("writing")
    write_bytes_atomic(output, data, force)
    return ExportResult(output, metadata, report, len(data), opset)
