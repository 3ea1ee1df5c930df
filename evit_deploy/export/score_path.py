"""The nodes that compute what each TopK ranks: EViT's token scores. The one walk that finds them.

Found by structure, not by name (the torch.export-based exporter generates node names): from each
TopK back to the nearest Softmax, and from that Softmax back to the Q.K^T MatMul. A reduced
precision keeps these nodes in FP32: the FP16 conversion makes them an FP32 island
(export/precision.py), INT8 quantization excludes them, OpenVINO BF16 pins them, TensorRT's
inspector is asked about them. The fused token weighs the dropped tokens by the same scores, so
INT8 quantization leaves its multiply in float too (`fused_token_nodes`). OpenVINO rewrites the
graph into its own ops, so the walks work on a plain description of any graph (LayerInfo);
`onnx_layers` describes an ONNX graph that way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
ONNX_KINDS = {"TopK": "TOPK", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY", "Constant": "CONSTANT"}
MAX_SCORE_DEPTH = 12  # layers between a TopK and its softmax (reshapes, slices, reduces)
MAX_LOGIT_DEPTH = 4  # layers between the softmax and the Q.K^T multiply (the scale)
MAX_FUSE_DEPTH = 3  # layers between the scores and the fused token's multiply (scatter, unsqueeze)


@dataclass(frozen=True)
class LayerInfo:
    """A graph node: name, kind ('TOPK', 'SOFTMAX', 'MATRIX_MULTIPLY', 'CONSTANT' or the
    runtime's own op name), the tensors it reads (None for an absent optional input) and writes."""

    name: str
    kind: str
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]


def topk_score_layers(layers: Sequence[LayerInfo], free: Sequence[str] = ()) -> list[str]:
    """Names of the layers that compute what every TopK ranks: each TopK, the layers between it
    and the nearest softmax upstream, that softmax, and the layers back to the matrix multiply
    that feeds it; in the order of `layers`. Layers of a `free` kind (casts) are walked through
    without counting as a step. A TopK without a softmax upstream adds nothing."""
    producers = {out: layer for layer in layers for out in layer.outputs}
    chosen: set[str] = set()
    for topk in (layer for layer in layers if layer.kind == "TOPK"):
        to_softmax = _path_to(topk, "SOFTMAX", producers, MAX_SCORE_DEPTH, free)
        if to_softmax is None:
            continue
        to_logits = _path_to(to_softmax[-1], "MATRIX_MULTIPLY", producers, MAX_LOGIT_DEPTH, free)
        chosen.update(layer.name for layer in [*to_softmax, *(to_logits or [])])
    return [layer.name for layer in layers if layer.name in chosen]


def _path_to(
    start: LayerInfo, kind: str, producers: dict[str, LayerInfo], max_depth: int,
    free: Sequence[str],
) -> list[LayerInfo] | None:
    """Shortest chain start, ..., X with X of `kind`, walking from layers to the producers of
    their inputs (constants excluded), at most `max_depth` steps (`free` kinds not counted);
    None when there is none."""
    parent: dict[str, LayerInfo | None] = {start.name: None}
    queue = deque([(start, 0)])
    while queue:
        layer, depth = queue.popleft()
        if layer.kind == kind and layer is not start:
            path = [layer]
            while (previous := parent[path[-1].name]) is not None:
                path.append(previous)
            return path[::-1]
        if depth == max_depth:
            continue
        for name in layer.inputs:
            source = producers.get(name) if name else None
            if source is None or source.kind == "CONSTANT" or source.name in parent:
                continue
            parent[source.name] = layer
            queue.append((source, depth + (source.kind not in free)))
    return None


def fused_token_layers(layers: Sequence[LayerInfo]) -> list[str]:
    """The matrix multiplies that read what a TopK ranks other than through the TopK: the fused
    token, the dropped tokens summed with their scores as weights (at most MAX_FUSE_DEPTH layers
    downstream of the scores), in the order of `layers`."""
    producers = {out: layer for layer in layers for out in layer.outputs}
    readers: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        for name in layer.inputs:
            if name:
                readers.setdefault(name, []).append(layer)
    topks = [layer for layer in layers if layer.kind == "TOPK"]
    scores = [producers[t.inputs[0]] for t in topks if t.inputs[0] in producers]
    seen = {layer.name for layer in [*topks, *scores]}
    frontier = deque((layer, 0) for layer in scores)
    found = set()
    while frontier:
        layer, depth = frontier.popleft()
        for reader in (r for out in layer.outputs for r in readers.get(out, ())):
            if reader.name in seen:
                continue
            seen.add(reader.name)
            if reader.kind == "MATRIX_MULTIPLY":
                found.add(reader.name)
            elif depth + 1 < MAX_FUSE_DEPTH:
                frontier.append((reader, depth + 1))
    return [layer.name for layer in layers if layer.name in found]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (tools that exclude nodes address them by name)."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def onnx_layers(model: onnx.ModelProto) -> list[LayerInfo]:
    """An ONNX graph's nodes as LayerInfo. Only float tensors are followed (shape and index
    arithmetic is never on the score path); Cast keeps its own kind, walked through for free, so
    the islands of an already converted graph are found too."""
    types = value_types(model)
    return [
        LayerInfo(
            node.name,
            ONNX_KINDS.get(node.op_type, node.op_type) if node.domain in ("", "ai.onnx") else node.op_type,
            tuple(name if types.get(name) in FLOAT_TYPES else None for name in node.input),
            tuple(node.output),
        )
        for node in model.graph.node
    ]


def topk_score_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the ONNX nodes computing what each TopK ranks, Casts left out, in graph order.
    Nodes must be named (name_nodes)."""
    layers = onnx_layers(model)
    kinds = {layer.name: layer.kind for layer in layers}
    return [name for name in topk_score_layers(layers, free=("Cast",)) if kinds[name] != "Cast"]


def score_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the ONNX nodes on every TopK's score path (the FP16 conversion's `topk_scores`
    island). Unnamed nodes are named first (in place)."""
    name_nodes(model)
    return topk_score_nodes(model)


def fused_token_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the ONNX MatMul nodes that read the TopK scores as weights (the fused token), in
    graph order; none without token fusion. Unnamed nodes are named first (in place)."""
    name_nodes(model)
    return fused_token_layers(onnx_layers(model))


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the graph names, inferred where the graph does not say."""

    def collect(graph) -> dict[str, int]:
        types = {init.name: init.data_type for init in graph.initializer}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
        return types

    types = collect(model.graph)
    if all(name in types for node in model.graph.node for name in node.output if name):
        return types
    return collect(onnx.shape_inference.infer_shapes(model).graph)
