"""EViT vs plain DeiT, and ONNX Runtime vs PyTorch eager, on this machine's CPU.

For deit_small keep 0.7 at batch 1, 8 and 64, four variants are timed interleaved (round-robin,
one run each per round) with the same thread count: ONNX Runtime EViT, ONNX Runtime plain,
PyTorch eager EViT, PyTorch eager plain. Reported: median latencies and the ratios
EViT/plain throughput (target >= 0.9 x the FLOPs ratio at batch 8 and 64) and ONNX Runtime /
PyTorch throughput (target >= 1). Writes build/results_cpu.json (records.py) and prints a
Markdown table.

    .venv/bin/python benchmarks/cpu_speedup.py [--batches 1,8,64] [--min-seconds 20] [--threads N]
        [--output benchmarks/results_cpu.json --force]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from records import check_output, output_options, warn_if_busy, write_record

from evit_deploy.export import export_onnx
from evit_deploy.model import EvitConfig, EvitOverrides, build_model
from evit_deploy.model.flops import count_macs
from evit_deploy.runtime.base import cpu_name
from evit_deploy.bench.bench import interleaved_latencies, parse_batches
from evit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from evit_deploy.runtime.torch_backend import TorchBackend

MODEL = "deit_small_patch16_224"
KEEP_RATE = 0.7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="per variant and batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    output_options(parser, "results_cpu.json")
    args = parser.parse_args()
    check_output(args)
    warn_if_busy()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    evit_cfg = EvitConfig(MODEL, KEEP_RATE)
    plain_cfg = EvitConfig(MODEL, 1.0)
    flops_ratio = count_macs(plain_cfg) / count_macs(evit_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        for tag, config in (("evit", evit_cfg), ("plain", plain_cfg)):
            path = Path(tmp) / f"{tag}.onnx"
            print(f"exporting {MODEL} keep {config.keep_rate:g} ...", flush=True)
            export_onnx(build_model(config), path)
            variants[f"onnxruntime {tag}"] = OnnxRuntimeBackend(path, "cpu", threads=args.threads)
        variants["pytorch evit"] = TorchBackend(None, "cpu", EvitOverrides(MODEL, KEEP_RATE))
        variants["pytorch plain"] = TorchBackend(None, "cpu", EvitOverrides(MODEL, 1.0))

        rows = []
        rng = np.random.default_rng(0)
        for batch in parse_batches(args.batches):
            inputs = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
            print(f"timing batch {batch}: {len(variants)} variants interleaved, >= {args.min_seconds:g} s each ...", flush=True)
            start = time.perf_counter()
            seconds = interleaved_latencies(
                list(variants.values()), inputs, warmup=2, min_seconds=args.min_seconds
            )
            p50 = {name: float(np.median(s)) for name, s in zip(variants, seconds)}
            runs = {name: len(s) for name, s in zip(variants, seconds)}
            evit_speedup = p50["onnxruntime plain"] / p50["onnxruntime evit"]
            rows.append(
                {
                    "batch": batch,
                    "p50_ms": {k: v * 1e3 for k, v in p50.items()},
                    "runs": runs,
                    "evit_vs_plain_onnxruntime": evit_speedup,
                    "evit_vs_plain_pytorch": p50["pytorch plain"] / p50["pytorch evit"],
                    "fraction_of_flops_ratio": evit_speedup / flops_ratio,
                    "onnxruntime_vs_pytorch_evit": p50["pytorch evit"] / p50["onnxruntime evit"],
                    "onnxruntime_vs_pytorch_plain": p50["pytorch plain"] / p50["onnxruntime plain"],
                    "wall_s": time.perf_counter() - start,
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    result = {
        "model": MODEL,
        "keep_rate": KEEP_RATE,
        "flops_ratio": flops_ratio,
        "threads": args.threads,
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    write_record(args, result)
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"deit_small keep {result['keep_rate']} on {result['cpu']}, {result['threads']} threads, "
        f"FLOPs ratio {result['flops_ratio']:.2f}x ({result['date']})",
        "",
        "| batch | ORT EViT p50 ms | ORT plain p50 ms | EViT/plain (ORT) | of FLOPs ratio | "
        "EViT/plain (PyTorch) | ORT/PyTorch (EViT) | ORT/PyTorch (plain) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        p50 = row["p50_ms"]
        lines.append(
            f"| {row['batch']} | {p50['onnxruntime evit']:.1f} | {p50['onnxruntime plain']:.1f} | "
            f"{row['evit_vs_plain_onnxruntime']:.2f}x | {row['fraction_of_flops_ratio']:.0%} | "
            f"{row['evit_vs_plain_pytorch']:.2f}x | {row['onnxruntime_vs_pytorch_evit']:.2f}x | "
            f"{row['onnxruntime_vs_pytorch_plain']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
