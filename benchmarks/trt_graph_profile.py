"""TensorRT EViT engines against their plain ViT (issue 21, item 4): interleaved times (medians of
wall and GPU compute ms) and a per-layer profile (TensorRT's IProfiler; layer types from the engine
inspector, so build with --detailed-profile), summed per layer type and for the drop machinery.

    PYTHONPATH=. python benchmarks/trt_graph_profile.py new=evit.fp16.plan:evit.onnx \\
        old=old_evit.fp16.plan:old_evit.onnx [--batches 1,64] [--min-seconds 2] [--json out.json]

Each NAME=ENGINE[:ONNX] is an EViT engine; ONNX, the file it was built from, tells the drop
machinery's layers apart (a layer counts when every ONNX node its name lists is one; fused layers
that name only their first and last node are counted by those). The plain ViT engine is built
with the first engine's settings (or taken from the cache), as bench does; a plain ViT has no
drop block, so it is the same for the old and the new EViT graph.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from evit_deploy.bench.baseline import baseline_engine, baseline_onnx
from evit_deploy.bench.bench import interleaved_latencies
from evit_deploy.bench.profile import drop_parts
from evit_deploy.engines.layer_precisions import engine_layers
from evit_deploy.runtime.tensorrt_backend import TensorRTBackend
from records import warn_if_busy

SEPARATORS = re.compile(r" \+ |\.\.\.|\{ForeignNode\[|\]\}")  # in TensorRT's fused layer names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="+", metavar="NAME=ENGINE[:ONNX]")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--profile-runs", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warn_if_busy()  # the GPU's launches wait on a busy host CPU too
    engines, onnx_files = {}, {}
    for item in args.engines:
        name, _, paths = item.partition("=")
        engine, _, onnx_path = paths.partition(":")
        engines[name] = Path(engine)
        if onnx_path:
            onnx_files[name] = Path(onnx_path)
    first = next(iter(engines.values()))
    print(f"plain ViT engine with {first.name}'s settings (built once, then cached)", flush=True)
    engines["plain"] = baseline_engine(first)
    backends = {name: TensorRTBackend(path) for name, path in engines.items()}
    onnx_files["plain"] = baseline_onnx(backends["plain"].metadata)
    parts = {name: drop_parts(path) for name, path in onnx_files.items()}
    result = {"engines": {k: str(v) for k, v in engines.items()}, "gpu": backends["plain"].device_name, "rows": []}
    size = backends["plain"].metadata.img_size
    batches = [int(b) for b in args.batches.split(",")]
    inputs = {b: np.random.default_rng(0).standard_normal((b, 3, size, size), dtype=np.float32) for b in batches}
    for batch in batches:  # every timing before the first profile: the profiler stays attached
        print(f"timing batch {batch}: {', '.join(backends)} interleaved", flush=True)
        seconds = interleaved_latencies(list(backends.values()), inputs[batch], min_seconds=args.min_seconds)
        gpu = {name: float(np.median(b.take_gpu_compute_ms())) for name, b in backends.items()}
        wall = {name: float(np.median(s)) * 1e3 for name, s in zip(backends, seconds)}
        result["rows"].append({
            "batch": batch, "wall_ms": wall, "gpu_ms": gpu,
            "over_plain_gpu": {n: gpu["plain"] / gpu[n] for n in backends if n != "plain"},
        })
        print("  " + json.dumps(result["rows"][-1]), flush=True)
    save(result, args.json)  # the times, even if profiling fails
    profilers = {name: attach_profiler(b) for name, b in backends.items()}
    for row in result["rows"]:
        print(f"profiling batch {row['batch']} ({args.profile_runs} runs each)", flush=True)
        row["profiles"] = {
            name: layer_profile(b, profilers[name], inputs[row["batch"]], args.profile_runs, parts.get(name, {}))
            for name, b in backends.items()
        }
        print(summary(row), flush=True)
    save(result, args.json)


def save(result: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", flush=True)


def attach_profiler(backend: TensorRTBackend):
    """A TensorRT IProfiler on the backend's execution context, adding up ms per layer name."""
    import tensorrt as trt

    class LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.ms: dict[str, float] = {}

        def report_layer_time(self, layer_name, ms):
            self.ms[layer_name] = self.ms.get(layer_name, 0.0) + ms

    profiler = LayerTimes()
    backend.context.profiler = profiler
    return profiler


def layer_profile(backend: TensorRTBackend, profiler, inputs: np.ndarray, runs: int, parts: dict[str, str]) -> dict:
    """ms per inference per layer (after one warm-up run), summed per layer type and for the drop
    machinery ('scores', 'reorganize')."""
    import tensorrt as trt

    prepared = backend.prepare(inputs)
    backend.run_prepared(prepared)
    profiler.ms.clear()
    for _ in range(runs):
        backend.run_prepared(prepared)
    backend.take_gpu_compute_ms()
    kinds = {layer.get("Name"): layer.get("LayerType", "?") for layer in engine_layers(trt, backend.engine)}
    layers = {name: ms / runs for name, ms in profiler.ms.items()}
    by_type: dict[str, float] = {}
    drop: dict[str, float] = {}
    for name, ms in layers.items():
        kind = kinds.get(name, "?")
        by_type[kind] = by_type.get(kind, 0.0) + ms
        part = drop_part(name, parts)
        if part:
            drop[part] = drop.get(part, 0.0) + ms
    return {
        "total_ms": sum(layers.values()),
        "by_type": dict(sorted(by_type.items(), key=lambda item: -item[1])),
        "drop_ms": drop,
        "layers": dict(sorted(layers.items(), key=lambda item: -item[1])),
    }


def drop_part(layer_name: str, parts: dict[str, str]) -> str:
    """'scores' or 'reorganize' when every ONNX node the layer's name lists is that part of the
    drop machinery ("a + b" for fused layers, "{ForeignNode[first...last]}" for Myelin regions),
    else ''."""
    known = {parts[n] for n in SEPARATORS.split(layer_name) if n in parts}
    return known.pop() if len(known) == 1 else ""


def summary(row: dict) -> str:
    lines = [f"batch {row['batch']}: GPU compute ms (median), EViT over plain"]
    for name, ms in row["gpu_ms"].items():
        ratio = row["over_plain_gpu"].get(name)
        lines.append(f"  {name:8s} {ms:8.3f} ms" + (f"   {ratio:.2f}x" if ratio else ""))
    for name, profile in row["profiles"].items():
        top = ", ".join(f"{k} {v:.3f}" for k, v in list(profile["by_type"].items())[:6])
        drop = ", ".join(f"{k} {v:.3f}" for k, v in profile["drop_ms"].items()) or "-"
        lines.append(f"  profile {name}: {profile['total_ms']:.3f} ms; by type: {top}; drop machinery: {drop}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
