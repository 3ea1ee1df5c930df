"""The nodes that compute what each TopK ranks: EViT's token scores.

Found by structure, not by name (the torch.export-based exporter generates node names): from each
TopK back to the nearest Softmax, and from that Softmax back to the Q.K^T MatMul. A reduced
precision keeps these nodes in FP32: the FP16 conversion makes them an FP32 island
(export/precision.py, which walks the ONNX graph with its tensor types), INT8 quantization
excludes them, OpenVINO BF16 pins them. OpenVINO rewrites the graph into its own ops, so the walk
here works on a plain description of any graph (LayerInfo).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

MAX_SCORE_DEPTH = 12  # layers between a TopK and its softmax (reshapes, slices, reduces)
MAX_LOGIT_DEPTH = 4  # layers between the softmax and the Q.K^T multiply (the scale)


@dataclass(frozen=True)
class LayerInfo:
    """A graph node: name, kind ('TOPK', 'SOFTMAX', 'MATRIX_MULTIPLY', 'CONSTANT' or the
    runtime's own op name), the tensors it reads (None for an absent optional input) and writes."""

    name: str
    kind: str
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]


def topk_score_layers(layers: Sequence[LayerInfo]) -> list[str]:
    """Names of the layers that compute what every TopK ranks: each TopK, the layers between it
    and the nearest softmax upstream, that softmax, and the layers back to the matrix multiply
    that feeds it. A TopK without a softmax upstream adds nothing."""
    producers = {out: layer for layer in layers for out in layer.outputs}
    chosen: dict[str, None] = {}
    for topk in (layer for layer in layers if layer.kind == "TOPK"):
        to_softmax = _path_to(topk, "SOFTMAX", producers, MAX_SCORE_DEPTH)
        if to_softmax is None:
            continue
        to_logits = _path_to(to_softmax[-1], "MATRIX_MULTIPLY", producers, MAX_LOGIT_DEPTH) or []
        for layer in [*to_softmax, *to_logits]:
            chosen[layer.name] = None
    return list(chosen)


def _path_to(
    start: LayerInfo, kind: str, producers: dict[str, LayerInfo], max_depth: int
) -> list[LayerInfo] | None:
    """Shortest chain start, ..., X with X of `kind`, walking from layers to the producers of
    their inputs (constants excluded), at most `max_depth` steps; None when there is none."""
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
            queue.append((source, depth + 1))
    return None


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


def score_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the ONNX nodes on every TopK's score path (the FP16 conversion's `topk_scores`
    island). Unnamed nodes are named first (in place)."""
    from evit_deploy.export.precision import topk_score_nodes

    name_nodes(model)
    return topk_score_nodes(model)
