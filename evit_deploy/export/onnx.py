"""PyTorch EViT -> ONNX with a dynamic batch axis, constant-K TopK and evit-deploy metadata.

One function per step, as in Ultralytics' exporter: trace, simplify, check, stamp, validate, write.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.validate import ValidationReport, validate_onnx
from evit_deploy.fileio import check_can_write, write_bytes_atomic
from evit_deploy.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata
from evit_deploy.metadata import load_onnx, onnx_metadata  # noqa: F401 - engines.precheck's import
from evit_deploy.model.vit import EViT

MIN_OPSET = 17  # LayerNormalization is a single node from 17 on (TensorRT FP16 needs that)
MAX_OPSET = 23  # the newest this torch exports (torch.onnx._constants.ONNX_MAX_OPSET)
DEFAULT_OPSET = 17
TRACE_BATCH = 2  # validation runs another batch size, proving the batch axis is really dynamic


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


def trace_to_onnx(model: EViT, opset: int, with_token_indices: bool) -> onnx.ModelProto:
    """TorchScript-trace export: K of every TopK is a Python int, so it lands as a constant."""
    meta = ArtifactMetadata.from_config(model.config, with_token_indices=with_token_indices)
    module = _WithTokenIndices(model) if with_token_indices else model
    output_names = [OUTPUT_NAME, *meta.token_index_outputs]
    dummy = torch.zeros(TRACE_BATCH, 3, model.config.img_size, model.config.img_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected here
        torch.onnx.export(
            module.eval(),
            (dummy,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and fuse with onnxslim (shape arithmetic on the static token axis folds
    away); the dynamic batch axis is kept."""
    try:
        import onnxslim
    except ImportError:
        warnings.warn("onnxslim is not installed: the graph is exported without simplification")
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnxslim.slim(model)


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


def stamp_metadata(model: onnx.ModelProto, metadata: ArtifactMetadata) -> None:
    del model.metadata_props[:]
    for key, value in metadata.to_props().items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name = "evit-deploy"
    model.producer_version = metadata.evit_deploy_version


def check_opset(opset: int) -> None:
    """Refuse an opset the exporter or TensorRT cannot use, before any model is built."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(
            f"opset must be >= {MIN_OPSET} (single-node LayerNorm) and <= {MAX_OPSET} (the "
            f"newest this PyTorch exports), got {opset}"
        )


def export_onnx(
    model: EViT,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    with_token_indices: bool = False,
    on_step: Callable[[str], None] = lambda step: None,
) -> ExportResult:
    """Export, validate against `model` and only then write `output` atomically.

    A file that fails validation is never written, so a path that exists is always a checked
    export.
    """
    check_opset(opset)
    output = check_can_write(output, force)
    model = model.eval()
    on_step("tracing")
    proto = trace_to_onnx(model, opset, with_token_indices)
    on_step("simplifying")
    proto = simplify(proto)
    ks = topk_constant_ks(proto)
    metadata = ArtifactMetadata.from_config(
        model.config, model.checkpoint, model.weights, with_token_indices
    )
    if ks != metadata.topk_k:
        raise EvitDeployError(f"exported TopK K values {ks} differ from the plan {metadata.topk_k}")
    stamp_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    on_step("validating")
    report = validate_onnx(model, data)
    if not report.passed:
        raise EvitDeployError(f"export failed validation, nothing written: {report.failure_summary()}")
    on_step("writing")
    write_bytes_atomic(output, data, force)
    return ExportResult(output, metadata, report, len(data), opset)
