"""What TensorRT's ONNX parser would reject, found before a (minutes-long) build starts.

TensorRT's TopK returns sorted output and takes K up to 3840 (ITopKLayer in include/NvInfer.h:
"Currently only values up to 3840 are supported"). K may be a constant or, since TensorRT 10, a
tensor computed at run time ("This layer can accept both static and dynamic k"); a run-time K
cannot be checked against the limit here, so it is a warning, not an error (evit-deploy export
writes constant K). Some ONNX operators have no TensorRT implementation at all (sequences, strings,
integer-quantized linear algebra, training losses; from the ONNX-TensorRT operator support
matrix); ops from custom domains need plugins. Every problem is collected and reported in one line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from evit_deploy.errors import EvitDeployError
from evit_deploy.metadata import load_onnx, onnx_metadata
from evit_deploy.metadata import ArtifactMetadata

TOPK_MAX_K = 3840
MIN_FP16_OPSET = 17  # below it LayerNorm is decomposed into primitives that overflow in FP16
STANDARD_DOMAINS = ("", "ai.onnx")
UNSUPPORTED_OPS = frozenset(
    {
        "BitShift", "Compress", "ConcatFromSequence", "ConvInteger", "Det",
        "DynamicQuantizeLinear", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "Multinomial",
        "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement",
        "QLinearConv", "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct",
        "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
        "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
        "StringSplit", "TfIdfVectorizer", "Unique",
    }
)


@dataclass(frozen=True)
class OnnxPrecheck:
    metadata: ArtifactMetadata
    input_name: str
    input_dims: list[int | None]  # None: dynamic
    opset: int


def precheck_onnx(path: str | Path) -> OnnxPrecheck:
    """Read the graph (not the weights) and raise one EvitDeployError naming every problem."""
    path = Path(path)
    model = load_onnx(path)
    metadata = onnx_metadata(model, path)
    problems = tensorrt_problems(model.graph)
    if problems:
        raise EvitDeployError(f"TensorRT cannot build {path.name}: " + "; ".join(problems))
    runtime_k = [n.name or n.output[0] for n in _topk_nodes(model.graph) if _constant_k(n, model.graph) is None]
    if runtime_k:
        warnings.warn(
            f"{path.name}: TopK node(s) {', '.join(runtime_k)} take K from a tensor computed at run "
            f"time; TensorRT 10+ accepts that, but fails at run time if K exceeds {TOPK_MAX_K} "
            "(evit-deploy export writes constant K)",
            stacklevel=2,
        )
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    if opset < MIN_FP16_OPSET:
        warnings.warn(
            f"{path.name} uses opset {opset}: LayerNorm is decomposed and may overflow in FP16; "
            f"re-export with --opset {MIN_FP16_OPSET} or later",
            stacklevel=2,
        )
    graph_inputs = _graph_inputs(model.graph)
    by_name = {i.name: i for i in graph_inputs}
    if metadata.input_name not in by_name:
        raise EvitDeployError(
            f"{path.name} has no input '{metadata.input_name}' (inputs: "
            f"{', '.join(by_name) or 'none'}); was it edited after export?"
        )
    outputs = [o.name for o in model.graph.output]
    if metadata.output_name not in outputs:
        raise EvitDeployError(
            f"{path.name} has no output '{metadata.output_name}' (outputs: {', '.join(outputs)})"
        )
    return OnnxPrecheck(
        metadata=metadata,
        input_name=metadata.input_name,
        input_dims=_dims(by_name[metadata.input_name]),
        opset=opset,
    )


def tensorrt_problems(graph: onnx.GraphProto) -> list[str]:
    """One short sentence per node TensorRT's parser would reject."""
    problems = []
    for node in graph.node:
        label = f"{node.op_type} node '{node.name or node.output[0]}'"
        if node.domain not in STANDARD_DOMAINS:
            problems.append(f"{label} is from custom domain '{node.domain}' (needs a TensorRT plugin)")
        elif node.op_type in UNSUPPORTED_OPS:
            problems.append(f"{label} is not supported by TensorRT")
    for node in _topk_nodes(graph):
        label = f"TopK node '{node.name or node.output[0]}'"
        k = _constant_k(node, graph)
        if k is not None and k > TOPK_MAX_K:
            problems.append(f"{label} has K={k}, above TensorRT's TopK limit of {TOPK_MAX_K}")
        if _int_attribute(node, "sorted", 1) == 0:
            problems.append(f"{label} has sorted=0 (TensorRT's TopK always sorts)")
    return problems


def topk_ks(graph: onnx.GraphProto) -> list[int | None]:
    """K of every TopK, in graph order (None where K is computed at run time)."""
    return [_constant_k(node, graph) for node in _topk_nodes(graph)]


def _topk_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "TopK" and n.domain in STANDARD_DOMAINS]


def _constant_k(node: onnx.NodeProto, graph: onnx.GraphProto) -> int | None:
    """K of a TopK when it is an initializer or a Constant node's output, else None."""
    if len(node.input) < 2:  # opset < 10: K is an attribute
        return _int_attribute(node, "k", None)
    name = node.input[1]
    for init in graph.initializer:
        if init.name == name:
            return _first_int(numpy_helper.to_array(init))
    for other in graph.node:
        if other.op_type == "Constant" and other.output and other.output[0] == name:
            value = next((a for a in other.attribute if a.name == "value"), None)
            if value is not None:
                return _first_int(numpy_helper.to_array(onnx.helper.get_attribute_value(value)))
    return None


def _first_int(array: np.ndarray) -> int:
    return int(np.asarray(array).reshape(-1)[0])


def _int_attribute(node: onnx.NodeProto, name: str, default: int | None) -> int | None:
    attribute = next((a for a in node.attribute if a.name == name), None)
    return default if attribute is None else int(attribute.i)


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: older exporters also list initializers as graph inputs."""
    initializers = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
