"""Which layers of an FP16 engine stay in FP32.

EViT ranks image tokens by the class token's attention and keeps the top K. FP16 has 11
significant bits, so scores that are close in FP32 can swap order in FP16 and a different token is
kept (measured on CPU with PyTorch: see benchmarks/RESULTS.md). By default the path that computes
those scores stays in FP32: from the Q.K^T matrix multiply through the softmax, the class-row
slice and the head mean, to the TopK. Users can pin more layers by name pattern.

Works on a plain description of the network (LayerInfo), so it is tested without TensorRT.
"""

from __future__ import annotations

import fnmatch
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from evit_deploy.errors import UsageError

GLOB_CHARACTERS = set("*?[")
MAX_SCORE_DEPTH = 12  # layers between a TopK and its softmax (reshapes, slices, reduces)
MAX_LOGIT_DEPTH = 4  # layers between the softmax and the Q.K^T multiply (the scale)


@dataclass(frozen=True)
class LayerInfo:
    """A network layer as TensorRT describes it: name, type (trt.LayerType name, e.g. 'TOPK'),
    the tensors it reads (None for an absent optional input) and writes."""

    name: str
    kind: str
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]


def match_layers(names: Iterable[str], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(layer names matched by any pattern, patterns that matched nothing).

    A pattern with glob characters (* ? [) must match the whole name; a plain pattern matches
    any name containing it, so 'LayerNormalization' pins every LayerNorm."""
    names = list(names)
    matched: dict[str, None] = {}
    unmatched = []
    for pattern in patterns:
        if GLOB_CHARACTERS & set(pattern):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        else:
            hits = [n for n in names if pattern in n]
        matched.update(dict.fromkeys(hits))
        if not hits:
            unmatched.append(pattern)
    return list(matched), unmatched


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


def select_fp32_layers(
    layers: Sequence[LayerInfo],
    patterns: Sequence[str],
    topk_scores: bool,
    require_matches: bool = True,
) -> list[str]:
    """The layers to pin to FP32: pattern matches plus (optionally) the TopK score paths.
    A pattern matching no layer is a usage error unless `require_matches` is off (the plain-ViT
    baseline, which has no TopK, reuses the EViT engine's patterns)."""
    matched, unmatched = match_layers((layer.name for layer in layers), patterns)
    if unmatched and require_matches:
        example = next((layer.name for layer in layers if layer.kind == "SOFTMAX"), None)
        hint = f"; layer names look like '{example}'" if example else ""
        raise UsageError(f"--fp32-layers {', '.join(map(repr, unmatched))} matched no layer{hint}")
    chosen = dict.fromkeys(matched)
    if topk_scores:
        chosen.update(dict.fromkeys(topk_score_layers(layers)))
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
