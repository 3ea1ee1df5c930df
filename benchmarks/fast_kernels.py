"""EViT over plain at the same backend and precision, where the kernels are fast (issue 21).

deit_small, keep 0.7, random weights (speed does not depend on the weight values). For each batch
size and each CPU path (ONNX Runtime FP32, OpenVINO FP32, OpenVINO BF16 where the CPU has native
BF16), the EViT graph and the plain ViT are timed interleaved (A, B, A, B, ... one run each per
round) and the medians compared; `--compare OLD.onnx` times an earlier EViT graph of the same
model in the same rounds (the graph before the fusion-friendly export, say). With `--profile`,
the runtime's per-operator profile of each graph at each batch size is written beside.

    .venv/bin/python benchmarks/fast_kernels.py [--batches 1,8,64] [--rounds 9]
        [--compare before=build/old_evit.onnx] [--profile] [--output build/results_fast_kernels.json]

Prints progress, warns when the machine is busy (load above its cores), names the CPU and its
features in every table. Writes under build/ unless --output says otherwise (records.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from records import check_output, output_options, warn_if_busy, write_record

from evit_deploy.bench.profile import profile_variants
from evit_deploy.export import export_onnx
from evit_deploy.model import EvitConfig, build_model
from evit_deploy.model.flops import count_macs
from evit_deploy.runtime import load_backend
from evit_deploy.runtime.cpu_features import probe_cpu

MODEL = "deit_small_patch16_224"
KEEP_RATE = 0.7
PATHS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved runs of each graph")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                        help="another EViT ONNX of the same model, timed in the same rounds")
    parser.add_argument("--profile", action="store_true", help="also the per-operator profiles")
    output_options(parser, "results_fast_kernels.json")
    args = parser.parse_args()
    check_output(args)
    warnings.simplefilter("ignore")
    cpu = probe_cpu()
    print(f"CPU: {cpu.name}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu.flags.items()), flush=True)
    warn_if_busy()

    folder = args.output.parent / "fast_kernels_graphs"
    folder.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for tag, keep in (("evit", KEEP_RATE), ("plain", 1.0)):
        graphs[tag] = folder / f"{MODEL}_keep{keep:g}.onnx"
        print(f"exporting {tag} -> {graphs[tag]}", flush=True)
        export_onnx(build_model(EvitConfig(MODEL, keep)), graphs[tag], force=True)
    for item in args.compare:
        name, _, path = item.partition("=")
        graphs[name] = Path(path)
    flops_ratio = count_macs(EvitConfig(MODEL, 1.0)) / count_macs(EvitConfig(MODEL, KEEP_RATE))

    rows, profiles = [], []
    for backend, precision in PATHS:
        if precision == "bf16" and not cpu.bf16:
            print(f"skip {backend} {precision}: this CPU has no native BF16", flush=True)
            continue
        options = {"threads": args.threads} | ({"precision": precision} if backend == "openvino" else {})
        loaded = {tag: load_backend(path, backend, "cpu", **options) for tag, path in graphs.items()}
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"timing {backend} {precision} batch {batch}: {', '.join(loaded)}", flush=True)
            p50 = interleaved_medians(list(loaded.values()), batch, args.rounds)
            ms = dict(zip(loaded, p50))
            rows.append({
                "backend": backend, "precision": precision, "batch": batch, "p50_ms": ms,
                "over_plain": {tag: ms["plain"] / ms[tag] for tag in ms if tag != "plain"},
            })
            print("  " + json.dumps(rows[-1]), flush=True)
            if args.profile:
                files = list(graphs.values())
                for profile, tag in zip(profile_variants(list(loaded.values()), files, batch), loaded):
                    profiles.append({"graph": tag, **profile.to_dict()})
        for backend_object in loaded.values():
            backend_object.close()
    result = {
        "model": MODEL, "keep_rate": KEEP_RATE, "flops_ratio": flops_ratio, "threads": args.threads,
        "rounds": args.rounds, "cpu": cpu.to_dict(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows, "profiles": profiles,
    }
    write_record(args, result)
    print(markdown(result))


def interleaved_medians(backends, batch: int, rounds: int) -> list[float]:
    """Median ms per run of each backend, timed A, B, ... in `rounds` rounds after a warm-up."""
    size = backends[0].metadata.img_size
    inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    prepared = [b.prepare(inputs) for b in backends]
    for backend, x in zip(backends, prepared):
        backend.run_prepared(x)
    times = [[] for _ in backends]
    for _ in range(rounds):
        for backend, x, record in zip(backends, prepared, times):
            start = time.perf_counter()
            backend.run_prepared(x)
            record.append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


def markdown(result: dict) -> str:
    cpu = result["cpu"]
    features = ", ".join(k for k, v in cpu["flags"].items() if v) or "flags unknown"
    others = [tag for tag in result["rows"][0]["over_plain"] if tag != "evit"]
    lines = [
        f"{result['model']} keep {result['keep_rate']} on {cpu['name']} ({features}), "
        f"{result['threads']} threads, medians of {result['rounds']} interleaved rounds, FLOPs ratio "
        f"{result['flops_ratio']:.2f}x ({result['date']})",
        "",
        "| backend, precision | batch | EViT ms | plain ms | EViT over plain |"
        + "".join(f" {tag} over plain |" for tag in others),
        "|---|---|---|---|---|" + "---|" * len(others),
    ]
    for row in result["rows"]:
        ms, ratio = row["p50_ms"], row["over_plain"]
        lines.append(
            f"| {row['backend']} {row['precision']} | {row['batch']} | {ms['evit']:.1f} | {ms['plain']:.1f} | "
            f"{ratio['evit']:.2f}x |" + "".join(f" {ratio[tag]:.2f}x |" for tag in others)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
