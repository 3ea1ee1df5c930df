"""Which precision a built engine really runs its FP32 islands in, read back with TensorRT's engine
inspector (engines built with `build-engine --detailed-profile`, ProfilingVerbosity.DETAILED).

The inspector describes each engine layer as JSON: "Name", "LayerType", and "Inputs"/"Outputs"
with each tensor's "Name" and its type: TensorRT 10.x writes one "Format/Datatype" field (e.g.
"Row major linear FP32", "Half"; the field Polygraphy reads, tools/Polygraphy/polygraphy/backend/
trt/util.py in NVIDIA/TensorRT); TensorRT 11 split it into "Format" and "Datatype" (its migration
guide lists "the split of the Format/DataType field"; "Datatype" and "Format" are the tensor keys
NVIDIA's 11.1 trt-perf-analysis tool reads, .agents/skills/trt-perf-analysis on NVIDIA/TensorRT
main). Both forms are read, the keys in any case ("DataType" is how the 11.x guide spells the
I/O tensors' field).
Tensors of an ONNX-parsed network keep their ONNX names, so the outputs of the graph's FP32 nodes
can be found in it. Inside a fused region (a Myelin "ForeignNode") only the region's boundary
tensors are visible; an island tensor that is not visible is reported as such, not guessed, and
when none is visible the verdict is "no evidence", not a pass. The checking is pure (tested
without a GPU); `engine_layers` needs TensorRT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

import onnx

FP32_WORDS = ("FP32", "FLOAT")
NARROWER_WORDS = ("FP16", "HALF", "BF16", "BFLOAT", "FP8", "INT8")  # "BFloat16" contains FLOAT


class Verdict(str, Enum):
    PASS = "pass"  # every visible island tensor is FP32, and at least one is visible
    FAIL = "fail"  # a visible island tensor is not FP32
    NO_EVIDENCE = "no evidence"  # no island tensor is visible: nothing was checked


@dataclass
class IslandPrecisions:
    """Island tensors seen in the engine, by precision; those not visible (fused away)."""

    fp32: dict[str, str] = field(default_factory=dict)  # tensor -> its type as the inspector wrote it
    not_fp32: dict[str, str] = field(default_factory=dict)
    not_visible: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        if self.not_fp32:
            return Verdict.FAIL
        return Verdict.PASS if self.fp32 else Verdict.NO_EVIDENCE

    def summary(self) -> str:
        if self.verdict is Verdict.NO_EVIDENCE:
            return f"no evidence: none of the {len(self.not_visible)} island tensor(s) is visible in the engine"
        parts = [f"{len(self.fp32)} island tensor(s) FP32"]
        if self.not_fp32:
            shown = ", ".join(f"{name} ({kind})" for name, kind in list(self.not_fp32.items())[:5])
            parts.append(f"{len(self.not_fp32)} NOT FP32: {shown}")
        if self.not_visible:
            parts.append(f"{len(self.not_visible)} inside fused layers (precision not visible)")
        return "; ".join(parts)


def island_tensors(model: onnx.ModelProto, fp32_nodes: list[str]) -> dict[str, str]:
    """Float outputs of the graph's FP32 nodes (tensor -> node): what must be FP32 in the engine.
    `model` is the graph TensorRT built (the converted one for an FP32 ONNX)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    wanted = set(fp32_nodes)
    return {
        output: node.name
        for node in graph.node
        if node.name in wanted
        for output in node.output
        if types.get(output) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }


def check_island_precisions(layers: list[dict], tensors: dict[str, str]) -> IslandPrecisions:
    """Compare the inspector's layer descriptions with the island tensors."""
    result = IslandPrecisions()
    for layer in layers:
        for tensor in [*layer.get("Inputs", []), *layer.get("Outputs", [])]:
            name = tensor.get("Name")
            if name not in tensors or name in result.fp32 or name in result.not_fp32:
                continue
            kind = tensor_type(tensor)
            (result.fp32 if is_fp32(kind) else result.not_fp32)[name] = kind
    seen = set(result.fp32) | set(result.not_fp32)
    result.not_visible = [name for name in tensors if name not in seen]
    return result


def tensor_type(tensor: dict) -> str:
    """A tensor's type as the inspector wrote it: 11.x's "Datatype" field, or 10.x's combined
    "Format/Datatype" (or a lone "Format", which names the type too)."""
    fields = {str(key).lower(): value for key, value in tensor.items()}
    for key in ("datatype", "format/datatype", "format"):
        if key in fields:
            return str(fields[key])
    return ""


def is_fp32(kind: str) -> bool:
    upper = kind.upper()
    return any(word in upper for word in FP32_WORDS) and not any(word in upper for word in NARROWER_WORDS)


def engine_layers(trt, engine) -> list[dict]:
    """Every layer's description from TensorRT's engine inspector, as dicts (DETAILED engines;
    otherwise only names are available and the check sees no tensors)."""
    inspector = engine.create_engine_inspector()
    information = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = information.get("Layers", []) if isinstance(information, dict) else []
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]
