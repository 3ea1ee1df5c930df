"""FP32 ONNX -> mixed-precision ONNX: FP16 weights and compute, FP32 islands where EViT needs them.

Precision is decided in the graph itself (Cast nodes), so every runtime that reads the graph honours
it: ONNX Runtime on CPU (where the FP16 numerics can be checked without a GPU), and TensorRT built
as a strongly typed network, where per-layer FP32 pins no longer exist (TensorRT 11) and were
reported ignored inside fused attention before that (NVIDIA/TensorRT#4505, #3889).

The conversion itself is ONNX Runtime's float16 converter (onnxruntime.transformers.float16, a
maintained fork of onnxconverter-common's, shipped inside the onnxruntime wheel this project already
depends on), with `keep_io_types=True` and the island nodes in its `node_block_list`. Two things
it leaves to the caller are done here, both small and checked at the end:

- island nodes get their own FP32 copy of a float constant they share with FP16 nodes (the
  converter would otherwise round it to FP16 and cast it back);
- FP32 -> FP16 -> FP32 Cast round trips that the converter puts between two neighbouring island
  nodes are removed (otherwise every edge inside an island would be rounded to FP16: the softmax
  output read by the class-row slice, the head mean read by TopK).

Islands are found structurally, never by node name, so graphs from both PyTorch exporters
(TorchScript `dynamo=False` and torch.export `dynamo=True`), simplified or not, give the same
islands:

- `topk_scores`: walking back from each TopK's scores input to the nearest Softmax (the head mean,
  the class-row slice/gather, reshapes), then from that Softmax back to the MatMul that feeds it
  (the scale Mul/Div): the class attention that TopK ranks, and the TopK itself;
- `layernorm`: every LayerNormalization node.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper

from evit_deploy.errors import EvitDeployError, UsageError, first_line
from evit_deploy.export.score_path import topk_score_nodes, value_types

NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata the torch.export exporter writes

ISLANDS = ("topk_scores", "layernorm")
DEFAULT_ISLANDS = ("topk_scores",)
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 5.96e-08


@dataclass
class Fp16Conversion:
    """A converted model and what stayed FP32, by the names of the source graph's nodes."""

    model: onnx.ModelProto
    islands: tuple[str, ...]  # the island kinds asked for
    island_nodes: dict[str, list[str]]  # island kind (or 'named') -> its nodes, graph order
    fp32_nodes: list[str]  # every node computing in FP32 (islands, converter defaults), graph order
    converter_fp32_ops: list[str] = field(default_factory=list)  # op types the converter keeps FP32


# ---------------------------------------------------------------------------------------------
# Finding the islands


def layernorm_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]


def island_nodes(
    model: onnx.ModelProto,
    islands: Sequence[str] = DEFAULT_ISLANDS,
    patterns: Sequence[str] = (),
    require_matches: bool = True,
) -> dict[str, list[str]]:
    """Island kind -> node names, plus 'named' for nodes matched by name `patterns` (glob, or
    plain text contained in the name). A pattern matching no node is a usage error unless
    `require_matches` is off (the plain-ViT baseline reuses the EViT engine's patterns)."""
    unknown = [name for name in islands if name not in ISLANDS]
    if unknown:
        raise UsageError(f"unknown FP32 island(s) {', '.join(unknown)}; choose from {', '.join(ISLANDS)}")
    found = {}
    if "topk_scores" in islands:
        found["topk_scores"] = topk_score_nodes(model)
    if "layernorm" in islands:
        found["layernorm"] = layernorm_nodes(model)
    if patterns:
        names = {qualified_name(n): n.name for n in model.graph.node if n.op_type != "Constant"}
        matched, unmatched = match_names(names, patterns)
        matched = [names[name] for name in matched]
        if unmatched and require_matches:
            example = next((qualified_name(n) for n in model.graph.node if n.op_type == "Softmax"), None)
            hint = f"; node names look like '{example}'" if example else ""
            raise UsageError(f"--fp32-layers {', '.join(map(repr, unmatched))} matched no ONNX node{hint}")
        found["named"] = matched
    return found


def qualified_name(node: onnx.NodeProto) -> str:
    """The module scopes the torch.export exporter records with a node, then its name
    ('blocks.0/blocks.0.attn/node_Softmax_62'): its generated names alone ('node_Softmax_62')
    say nothing a user could write in --fp32-layers."""
    return "/".join([*(s for s in ast.literal_eval(module_scopes(node) or "[]") if s), node.name])


def module_scopes(node: onnx.NodeProto) -> str | None:
    """The node's NAME_SCOPES metadata as written (a Python list literal), or None."""
    return next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)


def match_names(names: Iterable[str], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names matched by any pattern, patterns that matched nothing). A pattern with glob
    characters (* ? [) must match the whole name; a plain pattern matches any name containing it."""
    import fnmatch

    names = list(names)
    matched: dict[str, None] = {}
    unmatched = []
    for pattern in patterns:
        if set("*?[") & set(pattern):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        else:
            hits = [n for n in names if pattern in n]
        matched.update(dict.fromkeys(hits))
        if not hits:
            unmatched.append(pattern)
    return list(matched), unmatched


# ---------------------------------------------------------------------------------------------
# Converting


def convert_to_fp16(
    model: onnx.ModelProto,
    islands: Sequence[str] = DEFAULT_ISLANDS,
    fp32_patterns: Sequence[str] = (),
    require_matches: bool = True,
) -> Fp16Conversion:
    """FP16 weights and compute with FP32 `islands` (see ISLANDS) and nodes named by
    `fp32_patterns`; float32 graph inputs and outputs stay float32 (casts inside the graph), index
    outputs (TopK's) are untouched. `model` is not modified. Raises EvitDeployError when `model`
    is already FP16 or the result breaks an island (a converter regression)."""
    from onnxruntime.transformers import float16

    if is_fp16_model(model):
        raise EvitDeployError("the ONNX is already FP16 (converted at export); convert the FP32 export instead")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _name_unnamed_nodes(work.graph)
    _drop_initializer_value_info(work.graph)
    work = onnx.shape_inference.infer_shapes(work)
    found = island_nodes(work, islands, fp32_patterns, require_matches)
    types = value_types(work)
    # ops the converter keeps FP32 where they compute with floats (an int64 Range, say, does not)
    kept = {
        n.name for n in work.graph.node
        if n.op_type in float16.DEFAULT_OP_BLOCK_LIST
        and any(types.get(name) == FLOAT for name in [*n.input, *n.output] if name)
    }
    default_ops = set(float16.DEFAULT_OP_BLOCK_LIST)
    blocked = dict.fromkeys(name for names in found.values() for name in names)
    # compute nodes kept FP32, in graph order: the islands and ops the converter keeps FP32
    fp32_nodes = [n.name for n in work.graph.node if n.name in blocked or n.name in kept]
    converter_fp32_ops = sorted({n.op_type for n in work.graph.node if n.name in kept and n.name not in blocked})
    # constants only islands read join them (their values stay exact); they are not listed
    blocked.update(dict.fromkeys(_private_constants(work.graph, blocked)))
    source_casts = {n.name for n in work.graph.node if n.op_type == "Cast"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-value notes on weights below FP16's smallest subnormal
        converted = float16.convert_float_to_float16(
            work,
            min_positive_val=FP16_MIN_SUBNORMAL,
            max_finite_val=FP16_MAX,
            keep_io_types=True,
            disable_shape_infer=True,
            op_block_list=sorted(default_ops),
            node_block_list=list(blocked),
        )
    _fold_cast_round_trips(converted.graph, source_casts)
    _sort_topologically(converted.graph)
    _check_conversion(converted, [*blocked, *fp32_nodes], model)
    return Fp16Conversion(
        model=converted,
        islands=tuple(islands),
        island_nodes=found,
        fp32_nodes=fp32_nodes,
        converter_fp32_ops=converter_fp32_ops,
    )


# ---------------------------------------------------------------------------------------------
# Reading a graph's precision


def is_fp16_model(model: onnx.ModelProto) -> bool:
    """Whether the graph already computes in FP16: FP16 weights or casts to FP16."""
    graph = model.graph
    return any(init.data_type == FLOAT16 for init in graph.initializer) or any(
        node.op_type == "Cast" and _attribute(node, "to") == FLOAT16 for node in graph.node
    )


def model_precision(model: onnx.ModelProto) -> str:
    return "fp16" if is_fp16_model(model) else "fp32"


def fp32_compute_nodes(model: onnx.ModelProto) -> list[str]:
    """In a mixed-precision graph: the nodes (Casts and Constants aside) that read or write a
    float32 tensor, i.e. compute in FP32."""
    types = value_types(model)
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in ("Cast", "Constant")
        and any(types.get(name) == FLOAT for name in [*node.input, *node.output] if name)
    ]


def fp32_islands_of(model: onnx.ModelProto) -> list[str]:
    """Which island kinds a converted graph keeps entirely in FP32 (an island kind with no node in
    the graph, e.g. topk_scores of a plain ViT, is not listed)."""
    fp32 = set(fp32_compute_nodes(model))
    kinds = island_nodes(model, ISLANDS)
    return [kind for kind, names in kinds.items() if names and set(names) <= fp32]


# ---------------------------------------------------------------------------------------------
# Helpers


def _name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    """The converter blocks nodes by name: give unnamed (or duplicate-named) nodes a unique one."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{index}"
        seen.add(node.name)


def _drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    """The torch.export exporter also lists initializers in value_info; the converter would turn
    those entries to FP16 while it keeps an FP32 island's initializer FP32. The initializer's own
    type is the one that counts."""
    initializers = {init.name for init in graph.initializer}
    kept = [v for v in graph.value_info if v.name not in initializers]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _private_constants(graph: onnx.GraphProto, blocked: dict[str, None]) -> list[str]:
    """Give blocked (FP32) nodes their own float constants: an initializer or Constant node
    also read by FP16 nodes is copied for the blocked readers. Returns the Constant nodes that
    now feed blocked nodes only (they join the island, so their values stay exact)."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    joined = []
    for name, nodes in readers.items():
        fp32_readers = [n for n in nodes if n.name in blocked]
        if not fp32_readers:
            continue
        shared = len(fp32_readers) < len(nodes)
        if name in initializers and initializers[name].data_type == FLOAT and shared:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[name])
            copy.name = _fresh(f"{name}_fp32", readers, initializers)
            graph.initializer.append(copy)
            _rename_input(fp32_readers, name, copy.name)
        elif name in constants and _constant_is_float(constants[name]):
            if shared:
                copy = onnx.NodeProto()
                copy.CopyFrom(constants[name])
                copy.name = _fresh(f"{constants[name].name}_fp32", readers, initializers)
                copy.output[0] = _fresh(f"{name}_fp32", readers, initializers)
                graph.node.append(copy)
                _rename_input(fp32_readers, name, copy.output[0])
                joined.append(copy.name)
            else:
                joined.append(constants[name].name)
    if joined:
        _sort_topologically(graph)  # copies were appended at the end
    return joined


def _constant_is_float(node) -> bool:
    value = next((a for a in node.attribute if a.name == "value"), None)
    return value is not None and value.t.data_type == FLOAT


def _fresh(name: str, *taken: dict) -> str:
    candidate, index = name, 0
    while any(candidate in names for names in taken):
        index += 1
        candidate = f"{name}_{index}"
    return candidate


def _rename_input(nodes, old: str, new: str) -> None:
    for node in nodes:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _fold_cast_round_trips(graph: onnx.GraphProto, source_casts: set[str]) -> None:
    """Remove FLOAT -> FLOAT16 -> FLOAT pairs of converter-made Casts (casts already in the
    source graph are left alone): readers of the second Cast read the FP32 tensor itself; the
    first Cast goes too once nothing reads it."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    types.update({init.name: init.data_type for init in graph.initializer})
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    removed: set[str] = set()
    for node in list(graph.node):
        if node.op_type != "Cast" or node.name in source_casts or _attribute(node, "to") != FLOAT:
            continue
        first = producers.get(node.input[0])
        if (
            first is None
            or first.op_type != "Cast"
            or first.name in source_casts
            or _attribute(first, "to") != FLOAT16
            or node.output[0] in outputs
            or _source_type(first.input[0], types, producers) != FLOAT
        ):
            continue
        for reader in graph.node:
            _rename_input([reader], node.output[0], first.input[0])
        removed.add(node.name)
    readers = {name for n in graph.node if n.name not in removed for name in n.input}
    for node in graph.node:
        if node.name in removed or node.op_type != "Cast" or node.name in source_casts:
            continue
        if _attribute(node, "to") == FLOAT16 and node.output[0] not in readers and node.output[0] not in outputs:
            removed.add(node.name)
    dead_outputs = {out for n in graph.node if n.name in removed for out in n.output}
    kept = [n for n in graph.node if n.name not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    kept_info = [v for v in graph.value_info if v.name not in dead_outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


def _source_type(name: str, types: dict[str, int], producers: dict) -> int | None:
    if name in types:
        return types[name]
    node = producers.get(name)
    if node is not None and node.op_type == "Cast":
        return _attribute(node, "to")
    return None


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (the converter appends its
    Casts at the end; the ONNX checker and TensorRT's parser want a sorted graph). Stable: nodes
    keep their relative order where the data flow allows it."""
    import heapq

    nodes = list(graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        sources = {producer[name] for name in node.input if name in producer}
        waiting[index] = len(sources)
        for source in sources:
            readers.setdefault(source, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        raise EvitDeployError("the ONNX graph has a cycle; re-export it")
    del graph.node[:]
    graph.node.extend(nodes[index] for index in order)


def _check_conversion(converted: onnx.ModelProto, fp32_nodes: list[str], source: onnx.ModelProto) -> None:
    """The converted graph type-checks, its I/O types are the source's, and every FP32 node reads
    and writes float32 tensors only (no FP16 edge inside an island)."""
    try:
        onnx.checker.check_model(converted)
        inferred = onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
    except Exception as exc:
        raise EvitDeployError(f"the FP16 conversion produced an invalid graph ({first_line(exc)})") from None
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]  # noqa: E731
    if io(converted) != io(source):
        raise EvitDeployError(f"the FP16 conversion changed the graph's I/O types: {io(source)} -> {io(converted)}")
    types = value_types(inferred)
    wanted = set(fp32_nodes)
    leaks = [
        f"{node.name} ({name})"
        for node in inferred.graph.node
        if node.name in wanted
        for name in [*node.input, *node.output]
        if name and types.get(name) == FLOAT16
    ]
    if leaks:
        raise EvitDeployError(f"the FP16 conversion left FP16 tensors on FP32 nodes: {', '.join(leaks[:5])}")


def _attribute(node, name: str):
    attribute = next((a for a in node.attribute if a.name == name), None)
    return None if attribute is None else helper.get_attribute_value(attribute)

