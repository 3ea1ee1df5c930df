"""Where the time goes: per-operator-type times of the EViT and the plain run from the runtime's
own profiler, and what EViT's drop machinery costs.

The drop machinery is told apart by the module scopes the exporter records with every ONNX node
(model/vit.py): `blocks.N.attn.class_attention` computes the class-attention scores that TopK
ranks, `blocks.N.reorganize` keeps the top-K tokens and fuses the rest (TopK, the token gather,
the fused token's weights and sum). A runtime node counts as drop machinery when every ONNX node
it computes is; runtime-added nodes (layout reorders) and fused kernels that also cover other
work count as the model's.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evit_deploy.export.precision import module_scopes
from evit_deploy.metadata import load_onnx
from evit_deploy.runtime.base import Backend, NodeTime

DROP_PARTS = {"class_attention": "scores", "reorganize": "reorganize"}
DEFAULT_PROFILE_RUNS = 10


@dataclass
class Profile:
    """One model's profile at one batch size; times in ms per inference."""

    keep_rate: float
    backend: str
    precision: str
    batch: int
    runs: int
    total_ms: float
    by_type: dict[str, float]  # the runtime's op/kernel type -> ms, largest first
    drop_ms: dict[str, float] = field(default_factory=dict)  # 'scores', 'reorganize' -> ms

    @property
    def drop_share(self) -> float:
        return sum(self.drop_ms.values()) / self.total_ms if self.total_ms else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "drop_share": self.drop_share}


def drop_parts(onnx_path: str | Path) -> dict[str, str]:
    """Every ONNX node's part: 'scores' or 'reorganize' for EViT's drop machinery, '' for the
    rest of the model."""
    return {node.name: _drop_part(module_scopes(node)) for node in load_onnx(onnx_path).graph.node}


def _drop_part(text: str | None) -> str:
    try:
        scopes = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return ""
    for scope in scopes if isinstance(scopes, list) else ():
        part = DROP_PARTS.get(str(scope).rsplit(".", 1)[-1])
        if part:
            return part
    return ""


def summarize_profile(
    nodes: Sequence[NodeTime], parts: dict[str, str], keep_rate: float, backend: Backend,
    batch: int, runs: int,
) -> Profile:
    by_type: dict[str, float] = {}
    drop: dict[str, float] = {}
    for node in nodes:
        by_type[node.op_type] = by_type.get(node.op_type, 0.0) + node.ms
        kinds = {parts[source] for source in node.sources if source in parts}
        if len(kinds) == 1 and "" not in kinds:  # all of its ONNX nodes are drop machinery
            kind = kinds.pop()
            drop[kind] = drop.get(kind, 0.0) + node.ms
    ordered = dict(sorted(by_type.items(), key=lambda item: -item[1]))
    return Profile(
        keep_rate, backend.name, backend.precision, batch, runs, sum(ordered.values()), ordered,
        drop,
    )


def profile_variants(
    variants: Sequence[Backend],
    files: Sequence[str | Path],
    batch: int,
    runs: int = DEFAULT_PROFILE_RUNS,
    seed: int = 0,
) -> list[Profile]:
    """A profile of each variant on the same random batch (the reference too, if timed)."""
    profiles = []
    for backend, path in zip(variants, files):
        size = backend.metadata.img_size
        inputs = np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)
        parts = drop_parts(path) if Path(path).suffix.lower() == ".onnx" else {}
        nodes = backend.profile(inputs, runs)
        profiles.append(
            summarize_profile(nodes, parts, backend.metadata.keep_rate, backend, batch, runs)
        )
    return profiles
