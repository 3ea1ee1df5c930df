"""EViT and plain DeiT at every CPU precision, against plain FP32 on ONNX Runtime (the reference).

Variants, each for EViT (keep 0.7) and plain (keep 1.0) of the same random weights: ONNX Runtime
FP32, OpenVINO FP32, OpenVINO BF16 (TopK score path in FP32) where the CPU has native BF16, and
INT8 (--int8-method, default dynamic: no calibration set needed for speed) on ONNX Runtime, and
on OpenVINO for the QDQ methods (static, nncf). All variants of one batch size are timed interleaved (round-robin, one run each per round,
same thread count) and compared by median latency. Reported per variant and batch: p50 ms, img/s,
the speed-up over the reference and over plain at the same backend and precision.

Speed is measured on deit_small (the paper's model; random weights run at the same speed). With
--checkpoint and --validate-dir the fidelity columns come from the precision gates measured on that
trained model (benchmarks/precision_gates.py) and, with --trained-speed, its own speed-ups are
timed too. Writes build/results_cpu_precision.json (records.py: --output names the tracked
benchmarks/results_cpu_precision.json, with --force) and prints a Markdown table.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_precision.py [--batches 1,8] [--min-seconds 20]
        [--checkpoint evit_deploy/assets/shapes/shapes_evit_tiny.safetensors
         --validate-dir build/shapes_val --calibration build/shapes_cal [--trained-speed]]

Run it on a quiet machine: timings taken while something else runs are worthless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # precision_gates beside this file

from records import check_output, output_options, warn_if_busy, write_record  # noqa: E402

from evit_deploy.export import export_onnx  # noqa: E402
from evit_deploy.metadata import stamp_metadata  # noqa: E402
from evit_deploy.metadata import load_onnx, onnx_metadata  # noqa: E402
from evit_deploy.export.quantize import quantize_graph  # noqa: E402
from evit_deploy.model import EvitConfig, build_model  # noqa: E402
from evit_deploy.model.flops import count_macs  # noqa: E402
from evit_deploy.bench.bench import interleaved_latencies, parse_batches  # noqa: E402
from evit_deploy.runtime.cpu_features import probe_cpu  # noqa: E402
from evit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402

KEEP_RATE = 0.7
REFERENCE = ("onnxruntime", "fp32")


def int8_file(fp32: Path, method: str) -> Path:
    """fp32 quantized by `method` for timing (static ranges calibrated on seeded noise: their
    values do not change the speed)."""
    from dataclasses import replace

    model = load_onnx(fp32)
    meta = onnx_metadata(model, fp32)
    noise = np.random.default_rng(0).standard_normal((4, 3, meta.img_size, meta.img_size), dtype=np.float32)
    from evit_deploy.export.score_path import score_path_nodes

    quantized, settings = quantize_graph(model, method, meta, lambda: iter([noise]), score_path_nodes(model))
    stamp_metadata(quantized, replace(meta, precision="int8", quantization={"method": method, **settings}))
    out = fp32.with_name(f"{fp32.stem}.int8_{method}.onnx")
    onnx.save(quantized, str(out))
    return out


def load_variants(files: dict[str, Path], int8: dict[str, Path], threads: int, bf16: bool, int8_on_openvino: bool) -> dict:
    """(backend, precision, model) -> loaded backend."""
    from evit_deploy.runtime.openvino_backend import OpenVINOBackend

    variants = {}
    for tag in ("evit", "plain"):
        variants[("onnxruntime", "fp32", tag)] = OnnxRuntimeBackend(files[tag], "cpu", threads=threads)
        variants[("openvino", "fp32", tag)] = OpenVINOBackend(files[tag], threads=threads)
        if bf16:
            variants[("openvino", "bf16", tag)] = OpenVINOBackend(files[tag], precision="bf16", threads=threads)
        variants[("onnxruntime", "int8", tag)] = OnnxRuntimeBackend(int8[tag], "cpu", threads=threads)
        if int8_on_openvino:
            variants[("openvino", "int8", tag)] = OpenVINOBackend(int8[tag], threads=threads)
    return variants


def time_variants(variants: dict, batches: list[int], img_size: int, min_seconds: float) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        inputs = rng.standard_normal((batch, 3, img_size, img_size), dtype=np.float32)
        print(f"timing batch {batch}: {len(variants)} variants interleaved, >= {min_seconds:g} s each ...", flush=True)
        start = time.perf_counter()
        seconds = interleaved_latencies(list(variants.values()), inputs, warmup=2, min_seconds=min_seconds)
        p50 = {key: float(np.median(s)) for key, s in zip(variants, seconds)}
        reference = p50[(*REFERENCE, "plain")]
        for (backend, precision, tag), median in p50.items():
            rows.append({
                "batch": batch, "backend": backend, "precision": precision, "model": tag,
                "p50_ms": median * 1e3, "images_per_s": batch / median,
                "runs": len(seconds[list(variants).index((backend, precision, tag))]),
                "speedup_vs_reference": reference / median,
                "speedup_vs_plain_same_precision": p50[(backend, precision, "plain")] / median,
            })
        print(json.dumps({"batch": batch, "wall_s": time.perf_counter() - start}), flush=True)
    return rows


def export_pair(model_name: str, folder: Path, checkpoint: Path | None = None) -> dict[str, Path]:
    files = {}
    for tag, keep in (("evit", KEEP_RATE), ("plain", 1.0)):
        path = folder / f"{model_name}_{tag}.onnx"
        print(f"exporting {model_name} keep {keep:g} ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(build_model(EvitConfig(model_name, keep), checkpoint), path, force=True)
        files[tag] = path
    return files


def speed_table(args, model_name: str, folder: Path, checkpoint: Path | None, bf16: bool) -> list[dict]:
    files = export_pair(model_name, folder, checkpoint)
    int8 = {tag: int8_file(path, args.int8_method) for tag, path in files.items()}
    # ONNX Runtime's dynamic quantization (DynamicQuantizeLinear, MatMulInteger) is slower than
    # FP32 on OpenVINO (measured: 10x slower than on ONNX Runtime): OpenVINO's INT8 is QDQ
    variants = load_variants(files, int8, args.threads, bf16, args.int8_method != "dynamic")
    return time_variants(variants, parse_batches(args.batches), 224, args.min_seconds)


def markdown(result: dict) -> str:
    fidelity = {(r["backend"], r["precision"]): r for r in result.get("fidelity", [])}
    lines = [
        f"{result['model']} on {result['cpu']}, {result['threads']} threads, FLOPs ratio "
        f"{result['flops_ratio']:.2f}x, INT8 = {result['int8_method']} ({result['date']})",
        "",
        "| batch | backend | precision | EViT p50 ms | plain p50 ms | EViT img/s | vs reference | vs plain same precision | fidelity (trained model) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {(r["batch"], r["backend"], r["precision"], r["model"]): r for r in result["rows"]}
    for (batch, backend, precision, tag), r in rows.items():
        if tag != "evit":
            continue
        plain = rows[(batch, backend, precision, "plain")]
        gate = fidelity.get((backend, precision))
        gate_text = "-"
        if gate:
            gate_text = (
                f"top-1 {gate['top1_agreement']:.1%}, kept {gate['kept_identical'][0]:.1%}, "
                f"drop {gate['accuracy_drop']:+.2f} pt, {'pass' if gate['passed'] else 'MISSED'}"
                if gate["accuracy_drop"] is not None else f"top-1 {gate['top1_agreement']:.1%}"
            )
        lines.append(
            f"| {batch} | {backend} | {precision} | {r['p50_ms']:.1f} | {plain['p50_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['speedup_vs_reference']:.2f}x | "
            f"{r['speedup_vs_plain_same_precision']:.2f}x | {gate_text} |"
        )
    return "\n".join(lines)


def fidelity_rows(args, folder: Path) -> list[dict]:
    """Gate numbers on the trained model, keyed like the speed rows."""
    from precision_gates import export_fp32, fidelity

    fp32 = export_fp32(args.checkpoint, folder)
    rows = fidelity(fp32, args.validate_dir, args.calibration, [args.int8_method], folder)
    keys = {
        "openvino fp32": ("openvino", "fp32"),
        "openvino bf16, TopK scores fp32": ("openvino", "bf16"),
        f"int8 {args.int8_method} (onnxruntime)": ("onnxruntime", "int8"),
        f"int8 {args.int8_method} (openvino)": ("openvino", "int8"),
    }
    out = []
    for r in rows:
        if r["candidate"] in keys:
            backend, precision = keys[r["candidate"]]
            out.append({**r, "backend": backend, "precision": precision})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timed architecture (random weights)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="per variant and batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--int8-method", default="dynamic", choices=("static", "dynamic", "nncf"))
    parser.add_argument("--checkpoint", type=Path, help="trained deit_tiny EViT for the fidelity columns")
    parser.add_argument("--validate-dir", type=Path, help="its held-out images (class folders)")
    parser.add_argument("--calibration", type=Path, help="calibration images for static / nncf")
    parser.add_argument("--trained-speed", action="store_true", help="also time the trained model")
    output_options(parser, "results_cpu_precision.json")
    args = parser.parse_args()
    check_output(args)
    warn_if_busy()
    warnings.simplefilter("ignore")
    cpu = probe_cpu()
    flops_ratio = count_macs(EvitConfig(args.model, 1.0)) / count_macs(EvitConfig(args.model, KEEP_RATE))
    result = {
        "model": args.model, "keep_rate": KEEP_RATE, "flops_ratio": flops_ratio, "threads": args.threads,
        "int8_method": args.int8_method, "cpu": cpu.name, "cpu_features": cpu.to_dict(),
        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "onnxruntime": __import__("onnxruntime").__version__, "openvino": __import__("openvino").__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["rows"] = speed_table(args, args.model, Path(tmp), None, cpu.bf16)
        if args.checkpoint and args.validate_dir:
            result["fidelity"] = fidelity_rows(args, Path(tmp))
            if args.trained_speed:
                result["trained_rows"] = speed_table(args, "deit_tiny_patch16_224", Path(tmp), args.checkpoint, cpu.bf16)
    write_record(args, result)
    print(markdown(result))
    if "trained_rows" in result:
        print()
        print(markdown({**result, "model": f"trained {args.checkpoint}", "rows": result["trained_rows"]}))


if __name__ == "__main__":
    main()
