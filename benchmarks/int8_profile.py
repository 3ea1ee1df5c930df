"""INT8 on OpenVINO against BF16 (issue 21, item 3): which nodes run in INT8, which stay float and
in which precision, what each layer type costs, and the speed, EViT and plain.

deit_small keep 0.7 and its plain ViT with random weights (neither the speed nor the compiled
graph depends on the weight values; random weights fail the precision gates, so nothing is judged
here: `evit-deploy optimize` judges a trained model), each quantized by every method on generated
shapes images; with --shipped, the shipped shapes EViT (deit_tiny) and its plain ViT too. The
variants, all on OpenVINO's CPU plugin:

  bf16            the FP32 file at inference precision BF16, score path FP32 (optimize's "OpenVINO BF16")
  int8 M          the INT8 file of method M, precision hint FP32 ("OpenVINO INT8 (M)")
  int8 M + bf16   the same file, hint BF16: float parts in BF16, score path FP32 ("... + BF16")

For each variant and graph: the compiled graph's executed nodes counted by (layer type, runtime
precision), and those that compute only EViT's drop machinery (class-row scores, TopK, gather,
fused token). Unless --structure-only, at each batch size: every variant of both graphs and the
reference (plain FP32 on ONNX Runtime) timed interleaved (medians), then OpenVINO's PERF_COUNT
per layer type.

    .venv/bin/python benchmarks/int8_profile.py [--batches 1,8] [--min-seconds 2] [--shipped]
        [--methods static,dynamic,nncf] [--structure-only] [--output build/int8_profile.json]

Prints progress, warns when the machine is busy (records.warn_if_busy), names the CPU and its
features. Writes under build/ unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from evit_deploy.bench.bench import interleaved_latencies
from evit_deploy.bench.profile import drop_parts, profile_variants
from evit_deploy.data.shapes import write_dataset
from evit_deploy.export import export_onnx
from evit_deploy.export.quantize import METHODS, quantize_onnx
from evit_deploy.model import EvitConfig, build_model, load_model
from evit_deploy.model.config import EvitOverrides
from evit_deploy.runtime import load_backend
from evit_deploy.runtime.cpu_features import probe_cpu
from evit_deploy.runtime.openvino_backend import compile_model, import_openvino, read_model
from records import warn_if_busy

MODEL = "deit_small_patch16_224"
KEEP_RATE = 0.7
SHIPPED = Path(__file__).resolve().parents[1] / "evit_deploy/assets/shapes/shapes_evit_tiny.safetensors"
HIDDEN = {"Input", "Output", "Const"}  # graph ends and constants: not work done per inference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="random-weight model to export (the issue's: deit_small)")
    parser.add_argument("--shipped", action="store_true", help="also the shipped shapes EViT and its plain ViT")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="interleaved time per model and batch")
    parser.add_argument("--profile-runs", type=int, default=10, help="PERF_COUNT runs per variant and batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--structure-only", action="store_true", help="the compiled graphs only, no timing")
    parser.add_argument("--output", type=Path, default=Path("build/int8_profile.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    cpu = probe_cpu()
    print(f"CPU: {cpu.name}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu.flags.items()), flush=True)
    if not args.structure_only:
        warn_if_busy()
    methods = [m for m in args.methods.split(",") if m]
    variants = [("bf16", None, "bf16")]
    for method in methods:
        variants += [(f"int8 {method}", method, "fp32"), (f"int8 {method} + bf16", method, "bf16")]
    if not cpu.bf16:
        print("skip the bf16 variants: this CPU has no native BF16", flush=True)
        variants = [v for v in variants if v[2] != "bf16"]

    work = args.output.with_suffix("")  # build/int8_profile/: ONNX files and images, not results
    images = {
        "calibration": write_dataset(work / "calibration", args.calibration_images, seed=101, force=True),
        "held_out": write_dataset(work / "held_out", 16, seed=202, force=True),
    }
    models = {args.model: lambda keep: build_model(EvitConfig(args.model, keep))}
    if args.shipped:
        models["shipped"] = lambda keep: load_model(SHIPPED, EvitOverrides(keep_rate=keep))
    ov = import_openvino()
    result = {
        "cpu": cpu.to_dict(), "threads": args.threads, "openvino": ov.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg()[0], "batches": args.batches, "min_seconds": args.min_seconds,
        "variants": [v[0] for v in variants], "models": {},
    }
    for name, build in models.items():
        files, quantization = prepare(name, build, methods, work, images)
        entry = {"files": {f"{g} {m or 'fp32'}": str(v) for (g, m), v in files.items()}, "quantization": quantization}
        entry["structure"] = [
            {"graph": graph, "variant": label, **structure(files[graph, method], files[graph, None], hint, args.threads)}
            for graph in ("evit", "plain") for label, method, hint in variants
        ]
        print(structure_markdown(name, entry["structure"]), flush=True)
        if not args.structure_only:
            entry["timing"], entry["profiles"] = measure(files, variants, args)
            print(timing_markdown(name, entry["timing"]), flush=True)
        result["models"][name] = entry
        args.output.write_text(json.dumps(result, indent=2) + "\n")  # after each model
        print(f"wrote {args.output}", flush=True)


def prepare(name: str, build, methods, work: Path, images: dict) -> tuple[dict, dict]:
    """(graph, method or None) -> ONNX file: the FP32 EViT and plain exports and each one's INT8
    file by every method (gates not judged: accepted as they come), and what each missed."""
    files, quantization = {}, {}
    for graph, keep in (("evit", KEEP_RATE), ("plain", 1.0)):
        path = work / f"{name}_{graph}.onnx"
        print(f"exporting {name} {graph} -> {path}", flush=True)
        export_onnx(build(keep), path, force=True)
        files[graph, None] = path
        for method in methods:
            out = path.with_name(f"{path.stem}.int8.{method}.onnx")
            print(f"quantizing {name} {graph} ({method})", flush=True)
            done = quantize_onnx(
                path, out, method=method, calibration_dir=images["calibration"], validate_dir=images["held_out"],
                accept_failed_gates=True, force=True,
            )
            files[graph, method] = out
            quantization[f"{graph} {method}"] = {
                "fp32_nodes": done.metadata.quantization["fp32_nodes"], "missed_gates": done.report.failure_summary() or None,
            }
    return files, quantization


def structure(path: Path, fp32_path: Path, hint: str, threads: int) -> dict:
    """The executed nodes of `path` compiled at `hint`: counts by layer type and runtime precision,
    of all of them and of the drop machinery's (every ONNX node it computes is one; names from the
    FP32 file, which the quantizers keep)."""
    model, meta = read_model(path)
    compiled = compile_model(model, hint, threads, perf_count=True)
    request = compiled.create_infer_request()
    request.infer({meta.input_name: np.zeros((1, 3, meta.img_size, meta.img_size), np.float32)})
    executed = {i.node_name for i in request.get_profiling_info() if i.status == i.Status.EXECUTED}
    parts = drop_parts(fp32_path)
    nodes: dict[str, dict[str, int]] = {}
    drop: dict[str, dict[str, int]] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if kind in HIDDEN or op.get_friendly_name() not in executed:
            continue
        count(nodes, kind, precision)
        sources = [s for s in info["originalLayersNames"].astype(str).split(",") if s]
        if sources and all(parts.get(s) for s in sources):
            count(drop, kind, precision)
    return {"nodes": nodes, "drop_machinery": drop}


def count(table: dict, kind: str, precision: str) -> None:
    table.setdefault(kind, {})
    table[kind][precision] = table[kind].get(precision, 0) + 1


def measure(files: dict, variants, args) -> tuple[list, list]:
    """At each batch: every variant of both graphs and the reference timed interleaved (medians,
    ms per batch), then PERF_COUNT per layer type of each variant."""
    loaded, labels, paths = [], [], []
    for graph in ("evit", "plain"):
        for label, method, hint in variants:
            print(f"loading {graph} {label}", flush=True)
            path = files[graph, method]
            loaded.append(load_backend(path, "openvino", "cpu", precision=hint, threads=args.threads))
            labels.append((graph, label))
            paths.append(path)
    reference = load_backend(files["plain", None], "onnxruntime", "cpu", threads=args.threads)
    size = loaded[0].metadata.img_size
    timing, profiles = [], []
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
        print(f"timing batch {batch}: {len(loaded) + 1} models interleaved, {args.min_seconds:g} s each at least", flush=True)
        seconds = interleaved_latencies([*loaded, reference], inputs, min_seconds=args.min_seconds)
        ms = [float(np.median(s)) * 1e3 for s in seconds]
        by = dict(zip(labels, ms))
        reference_ms = ms[-1]
        timing.append({
            "batch": batch, "reference_ms": reference_ms, "runs": [len(s) for s in seconds],
            "p50_ms": {f"{g} {v}": t for (g, v), t in by.items()},
            "evit_over_plain": {label: by["plain", label] / by["evit", label] for label, _, _ in variants},
            "over_reference": {f"{g} {v}": reference_ms / t for (g, v), t in by.items()},
        })
        print("  " + json.dumps(timing[-1]), flush=True)
        print(f"PERF_COUNT batch {batch} ({args.profile_runs} runs each)", flush=True)
        for profile, (graph, label) in zip(profile_variants(loaded, paths, batch, args.profile_runs), labels):
            profiles.append({"graph": graph, "variant": label, **profile.to_dict()})
    for backend in [*loaded, reference]:
        backend.close()
    return timing, profiles


def structure_markdown(name: str, rows: list[dict]) -> str:
    """Per layer type, the EViT graph's executed nodes by runtime precision in each variant, and the
    totals for both graphs; then the drop machinery's nodes."""
    evit = [r for r in rows if r["graph"] == "evit"]
    kinds = sorted({k for r in evit for k in r["nodes"]})
    header = "| layer type | " + " | ".join(r["variant"] for r in evit) + " |"
    lines = [f"{name}: executed nodes of the EViT graph by runtime precision", "", header,
             "|---|" + "---|" * len(evit)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(cell(r["nodes"].get(kind, {})) for r in evit) + " |")
    for graph in ("evit", "plain"):
        totals = [sum(sum(p.values()) for p in r["nodes"].values()) for r in rows if r["graph"] == graph]
        lines.append(f"| all ({graph}) | " + " | ".join(str(t) for t in totals) + " |")
    drop = [[n for ps in r["drop_machinery"].values() for n in ps.values()] for r in evit]
    f32 = [sum(ps.get("f32", 0) for ps in r["drop_machinery"].values()) for r in evit]
    lines.append("| drop machinery (evit): all, f32 | " + " | ".join(f"{sum(d)}, {f}" for d, f in zip(drop, f32)) + " |")
    return "\n".join(lines)


def cell(precisions: dict[str, int]) -> str:
    return ", ".join(f"{p} {n}" for p, n in sorted(precisions.items(), key=lambda item: -item[1])) or "-"


def timing_markdown(name: str, timing: list[dict]) -> str:
    lines = [f"{name}: medians, ms per batch (EViT / plain), EViT over plain, EViT over the reference", ""]
    for row in timing:
        lines.append(f"batch {row['batch']} (reference, plain FP32 on ONNX Runtime: {row['reference_ms']:.1f} ms)")
        for variant, ratio in row["evit_over_plain"].items():
            evit, plain = row["p50_ms"][f"evit {variant}"], row["p50_ms"][f"plain {variant}"]
            lines.append(f"  {variant:20s} {evit:8.1f} / {plain:8.1f}   {ratio:.2f}x   {row['over_reference'][f'evit {variant}']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
