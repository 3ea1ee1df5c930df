"""The EViT paper's two claims on the trained shapes models (issue 23), and `plan` checked against them.

Claim 1 (DeiT-S, keep 0.7): +50% speed at -0.3 points top-1 against the same ViT trained without
token reduction. Here: the shipped EViT against plain deit_tiny trained with the same recipe, data,
steps and seeds (benchmarks/train_paper_claims.sh).
Claim 2: at the same cost, +1 point top-1 by running EViT at a higher resolution. Here: the 256 px
EViT at keep 0.78 (`plan --budget-gmacs 1.254`) against plain deit_tiny at 224 px, both fine-tuned
900 more steps from the models of claim 1.

For each model: GMACs (plan's count, and torch's FLOP counter on the real forward pass), top-1 and
top-5 on 2,000 held-out images of seed 3 at its own resolution, object recall per drop block, img/s
on ONNX Runtime FP32 and on the fastest path that passes the precision gates (`evit-deploy
optimize` on the first 500 of those images, calibrated on 256 of seed 4), the four models timed
interleaved in the same rounds at batch 8, medians. Writes JSON (build/results_paper_claims.json
unless --output, records.py) and prints the Markdown table.

    PYTHONPATH=. .venv/bin/python benchmarks/paper_claims.py [--models build/paper_claims]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from evit_deploy.analysis.evaluate import evaluate
from evit_deploy.analysis.object_recall import object_recall
from evit_deploy.bench.bench import interleaved_latencies
from evit_deploy.bench.optimize import optimize
from evit_deploy.data.samples import find_samples
from evit_deploy.data.shapes import write_dataset
from evit_deploy.export import export_onnx
from evit_deploy.model import load_model
from evit_deploy.model.flops import count_macs
from evit_deploy.runtime import Predictor
from evit_deploy.runtime.backends import load_backend
from evit_deploy.runtime.cpu_features import probe_cpu
from records import check_output, output_options, warn_if_busy, write_record

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "evit_deploy" / "assets"
HELDOUT_SEED, HELDOUT_COUNT, OPTIMIZE_COUNT = 3, 2000, 500
CALIBRATION_SEED, CALIBRATION_COUNT = 4, 256  # as for benchmarks/results_optimize.json
PAPER = {"claim1": {"top1_delta": -0.3, "speedup": 1.5}, "claim2": {"top1_delta": 1.0, "gmacs_ratio": 1.0}}


def models(trained: Path) -> dict[str, Path]:
    """Name -> checkpoint: the shipped ones, else those the training script wrote."""
    def find(name: str, folder: str) -> Path:
        shipped = ASSETS / name / f"{name}.safetensors"
        return shipped if shipped.is_file() else trained / folder / f"{name}.safetensors"

    return {
        "evit": ASSETS / "shapes" / "shapes_evit_tiny.safetensors",
        "plain": find("shapes_plain_tiny", "plain_tiny"),
        "evit_256": find("shapes_evit_tiny_256", "evit_tiny_256"),
        "plain_ft": find("shapes_plain_tiny_ft", "plain_tiny_ft"),
    }


def counted_gmacs(model) -> float:
    """Multiply-adds of one image through the real forward pass, by torch's FLOP counter.
    Attention runs its math path: the counter has no formula for the CPU's fused attention kernel
    and would leave the attention matmuls of every block without a drop out (8-12% of the total)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.img_size
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 2 / 1e9


def measure(name: str, checkpoint: Path, data: Path, work: Path) -> dict:
    """Everything but the timing: cost, accuracy, object recall; and the ONNX to time."""
    model = load_model(checkpoint)
    config = model.config
    onnx_path = work / f"{name}.onnx"
    export_onnx(model, onnx_path, force=True)
    with Predictor(onnx_path) as predictor:
        samples = find_samples(data, config.num_classes, None, model.classes)
        result = evaluate(predictor, samples, batch_size=50)
    recall = None
    if config.is_evit:
        with load_backend(checkpoint, "pytorch", "cpu") as source:
            recall = [round(b.object_recall, 4) for b in object_recall(source, data).blocks]
    return {
        "checkpoint": str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint),
        "img_size": config.img_size,
        "keep_rate": config.keep_rate,
        "gmacs_plan": count_macs(config) / 1e9,
        "gmacs_counted": counted_gmacs(model),
        "images": result.images,
        "top1": result.top1,
        "top5": result.top5,
        "object_recall": recall,
        "onnx": str(onnx_path),
    }


def time_together(models: list[dict], key: str, backend: str, batch: int, min_seconds: float) -> list[float]:
    """img/s of every model's artifact (`key`: the ONNX, or the deployment folder `optimize` chose),
    all timed interleaved in the same rounds, each at its own input size: figures of one call
    compare across models, and across claims."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((batch, 3, m["img_size"], m["img_size"]), dtype=np.float32) for m in models]
    with contextlib.ExitStack() as loaded:
        backends = [loaded.enter_context(load_backend(m[key], backend, "cpu")) for m in models]
        seconds = interleaved_latencies(backends, inputs, min_seconds=min_seconds)
    return [batch / float(np.median(s)) for s in seconds]


def fastest_gated(checkpoint: Path, data: Path, calibration: Path, work: Path, batch: int, min_seconds: float) -> dict:
    folder = work / f"deploy_{checkpoint.stem}"
    result = optimize(checkpoint, data, folder, calibration=calibration, batch=batch, min_seconds=min_seconds, force=True)
    chosen = result.chosen.to_dict(result.reference_ms, batch)
    return {"path": result.chosen.name, "speedup_over_reference": chosen["speedup_over_reference"], "folder": str(folder)}


def markdown(result: dict) -> str:
    rows = result["models"]
    label = {"evit": "EViT (shipped)", "plain": "plain ViT, same recipe", "evit_256": "EViT at 256 px (+900 steps)",
             "plain_ft": "plain ViT (+900 steps)"}
    lines = [
        "| model | resolution | keep rate | GMACs | img/s ORT FP32 | fastest gated path, img/s | top-1 | top-5 | object recall (3 / 6 / 9) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        gated = m.get("fastest_gated") or {}
        recall = " / ".join(f"{r:.1%}" for r in m["object_recall"]) if m["object_recall"] else "-"
        lines.append(
            f"| {label[name]} | {m['img_size']} | {m['keep_rate']} | {m['gmacs_plan']:.2f} | {m['images_per_s']:.0f} | "
            f"{gated.get('path', '-')}, {gated.get('images_per_s', 0):.0f} | {m['top1']:.2%} | {m['top5']:.2%} | {recall} |"
        )
    c1, c2 = result["claim1"], result["claim2"]
    lines += [
        "",
        "| claim | paper (DeiT-S, ImageNet) | here (deit_tiny, shapes) |",
        "|---|---|---|",
        f"| 1: EViT 0.7 against the plain ViT | {PAPER['claim1']['top1_delta']:+.1f} pt top-1, {PAPER['claim1']['speedup']:.2f}x speed "
        f"| {c1['top1_delta']:+.2f} pt top-1, {c1['speedup_ort_fp32']:.2f}x speed (ORT FP32), {c1['speedup_gated']:.2f}x (fastest gated paths) |",
        f"| 2: EViT at higher resolution, same GMACs | {PAPER['claim2']['top1_delta']:+.1f} pt top-1 "
        f"| {c2['top1_delta']:+.2f} pt top-1 at {c2['gmacs_ratio']:.2f}x the GMACs, {c2['speedup_ort_fp32']:.2f}x speed (ORT FP32), "
        f"{c2['speedup_gated']:.2f}x (fastest gated paths) |",
    ]
    lines += [
        "",
        "| `plan` checked | EViT | plain | speed-up plan implies (GMACs ratio) | measured (ORT FP32) |",
        "|---|---|---|---|---|",
    ]
    for claim, (evit, plain) in (("claim1", ("evit", "plain")), ("claim2", ("evit_256", "plain_ft"))):
        e, q = rows[evit], rows[plain]
        lines.append(
            f"| {label[evit]} vs {label[plain]}: GMACs plan / counted | {e['gmacs_plan']:.3f} / {e['gmacs_counted']:.3f} "
            f"| {q['gmacs_plan']:.3f} / {q['gmacs_counted']:.3f} | {result[claim]['plan_speedup']:.2f}x | {result[claim]['speedup_ort_fp32']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "build" / "paper_claims", help="where train_paper_claims.sh wrote")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=8.0)
    parser.add_argument("--count", type=int, default=HELDOUT_COUNT)
    output_options(parser, "results_paper_claims.json")
    args = parser.parse_args()
    check_output(args)
    warnings.simplefilter("ignore")
    checkpoints = models(args.models)
    missing = [str(p) for p in checkpoints.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing checkpoints (run benchmarks/train_paper_claims.sh): {', '.join(missing)}")
    warn_if_busy()  # before the script's own work raises the load
    rows = {}
    with tempfile.TemporaryDirectory(prefix="paper-claims-") as tmp:
        work = Path(tmp)
        data = {}
        for name, checkpoint in checkpoints.items():
            size = load_model(checkpoint).config.img_size
            if size not in data:
                print(f"[{time.strftime('%H:%M:%S')}] held-out images at {size} px", flush=True)
                data[size] = (write_dataset(work / f"heldout_{size}", args.count, HELDOUT_SEED, size),
                              write_dataset(work / f"optimize_{size}", min(OPTIMIZE_COUNT, args.count), HELDOUT_SEED, size),
                              write_dataset(work / f"calibration_{size}", CALIBRATION_COUNT, CALIBRATION_SEED, size))
            print(f"[{time.strftime('%H:%M:%S')}] {name}: accuracy, object recall, GMACs", flush=True)
            rows[name] = measure(name, checkpoint, data[size][0], work)
        for name, checkpoint in checkpoints.items():
            print(f"[{time.strftime('%H:%M:%S')}] {name}: evit-deploy optimize", flush=True)
            rows[name]["fastest_gated"] = fastest_gated(
                checkpoint, *data[rows[name]["img_size"]][1:], work, args.batch, max(2.0, args.min_seconds / 4)
            )
        print(f"[{time.strftime('%H:%M:%S')}] timing the four ONNX on ONNX Runtime FP32, interleaved", flush=True)
        for row, ips in zip(rows.values(), time_together(list(rows.values()), "onnx", "onnxruntime", args.batch, args.min_seconds)):
            row["images_per_s"] = ips
        print(f"[{time.strftime('%H:%M:%S')}] timing the four fastest gated paths, interleaved", flush=True)
        gated = [{**row, **row["fastest_gated"]} for row in rows.values()]
        for row, ips in zip(rows.values(), time_together(gated, "folder", "auto", args.batch, args.min_seconds)):
            row["fastest_gated"]["images_per_s"] = ips
    for row in rows.values():
        row.pop("onnx")
        row["fastest_gated"].pop("folder")
    result = {
        "cpu": probe_cpu().to_dict(),
        "date": time.strftime("%Y-%m-%d"),
        "heldout": {"seed": HELDOUT_SEED, "count": args.count, "optimize_count": min(OPTIMIZE_COUNT, args.count)},
        "calibration": {"seed": CALIBRATION_SEED, "count": CALIBRATION_COUNT},
        "batch": args.batch,
        "models": rows,
        "paper": PAPER,
        "claim1": {
            "top1_delta": 100 * (rows["evit"]["top1"] - rows["plain"]["top1"]),
            "speedup_ort_fp32": rows["evit"]["images_per_s"] / rows["plain"]["images_per_s"],
            "speedup_gated": rows["evit"]["fastest_gated"]["images_per_s"] / rows["plain"]["fastest_gated"]["images_per_s"],
            "plan_speedup": rows["plain"]["gmacs_plan"] / rows["evit"]["gmacs_plan"],
        },
        "claim2": {
            "top1_delta": 100 * (rows["evit_256"]["top1"] - rows["plain_ft"]["top1"]),
            "gmacs_ratio": rows["evit_256"]["gmacs_plan"] / rows["plain_ft"]["gmacs_plan"],
            "speedup_ort_fp32": rows["evit_256"]["images_per_s"] / rows["plain_ft"]["images_per_s"],
            "speedup_gated": rows["evit_256"]["fastest_gated"]["images_per_s"] / rows["plain_ft"]["fastest_gated"]["images_per_s"],
            "plan_speedup": rows["plain_ft"]["gmacs_plan"] / rows["evit_256"]["gmacs_plan"],
        },
    }
    write_record(args, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
