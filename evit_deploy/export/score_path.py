"""The nodes of an ONNX graph that compute what each TopK ranks: EViT's token scores.

Found by structure, not by name (the torch.export-based exporter generates node names): from each
TopK back to the nearest Softmax, and from that Softmax back to the Q.K^T MatMul, the same walk
`build-engine` does on a TensorRT network (evit_deploy.engines.precision). A reduced precision
keeps these nodes in FP32: INT8 quantization excludes them, OpenVINO BF16 pins them.
"""

from __future__ import annotations

import onnx

from evit_deploy.engines.precision import LayerInfo, topk_score_layers

# ONNX op types -> the layer kinds the walk looks for (TensorRT's names); the rest keep their own
ONNX_KINDS = {"TopK": "TOPK", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY", "Constant": "CONSTANT"}


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
    """The graph's nodes as LayerInfo (initializers are not layers, so the walk skips them)."""
    return [
        LayerInfo(
            node.name,
            ONNX_KINDS.get(node.op_type, node.op_type.upper()),
            tuple(name or None for name in node.input),
            tuple(node.output),
        )
        for node in model.graph.node
    ]


def score_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes on every TopK's score path (TopK, reduce, slice, gather, softmax, the
    scale and the Q.K^T MatMul), in walk order. Unnamed nodes are named first (in place)."""
    name_nodes(model)
    return topk_score_layers(onnx_layers(model))
