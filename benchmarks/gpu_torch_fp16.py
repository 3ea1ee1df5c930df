"""PyTorch on CUDA in FP16: EViT against the plain ViT of the same weights, eager and
torch.compile'd, timed interleaved at one batch size. Also how far FP16 moves the answers from
FP32: top-1 agreement, and for EViT the share of images whose drop blocks keep the same patches.

    PYTHONPATH=. python benchmarks/gpu_torch_fp16.py --batch 64 --json torch_fp16.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from records import warn_if_busy

from evit_deploy.model import EvitOverrides
from evit_deploy.model.vit import kept_patch_ids
from evit_deploy.bench.bench import interleaved_latencies, summarize
from evit_deploy.runtime.torch_backend import TorchBackend


def load(args, keep_rate: float, fp16: bool, compile: bool) -> TorchBackend:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded random weights, the same for every variant
        return TorchBackend(None, args.device, EvitOverrides(args.model, keep_rate), fp16=fp16, compile=compile)


@torch.inference_mode()
def kept_patches(backend: TorchBackend, images: np.ndarray) -> list[np.ndarray]:
    _, indices = backend.model(backend.prepare(images), return_token_indices=True)
    config = backend.metadata.to_config()
    return kept_patch_ids([i.cpu().numpy() for i in indices], config.num_patches, config.fuse_token)


def same_sets(reference: list[np.ndarray], candidate: list[np.ndarray]) -> list[float]:
    return [
        float(np.mean([set(a) == set(b) for a, b in zip(r, c)])) for r, c in zip(reference, candidate)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="eager,compile", help="eager and/or compile")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="Timed seconds per variant.")
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args()
    warn_if_busy()
    started = time.perf_counter()
    images = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    reference = {keep: load(args, keep, fp16=False, compile=False) for keep in (args.keep_rate, 1.0)}
    reference_top1 = {keep: backend.run(images).argmax(1) for keep, backend in reference.items()}
    reference_kept = kept_patches(reference[args.keep_rate], images)
    del reference
    rows = []
    for mode in args.modes.split(","):
        print(f"timing {mode} fp16: EViT and plain interleaved, >= {args.min_seconds:g} s each ...", flush=True)
        evit = load(args, args.keep_rate, fp16=True, compile=mode == "compile")
        plain = load(args, 1.0, fp16=True, compile=mode == "compile")
        seconds = interleaved_latencies([evit, plain], images, min_seconds=args.min_seconds)
        for backend, timing in zip((evit, plain), seconds):
            result = summarize(backend, args.batch, timing).to_dict()
            keep = backend.metadata.keep_rate
            result["mode"] = mode
            result["top1_agreement_vs_fp32"] = float((backend.run(images).argmax(1) == reference_top1[keep]).mean())
            if keep < 1 and mode == "eager":  # the compiled graph returns logits only
                result["kept_same_vs_fp32"] = same_sets(reference_kept, kept_patches(backend, images))
            rows.append(result)
        evit_row, plain_row = rows[-2:]
        evit_row["speedup_vs_plain"] = plain_row["latency_ms"]["p50"] / evit_row["latency_ms"]["p50"]
        del evit, plain
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(args.device)
    print(f"PyTorch {torch.__version__} fp16 on {device}, {args.model}, batch {args.batch}")
    print(f"{'mode':<8} {'keep':>5} {'img/s':>9} {'p50 ms':>8} {'speedup':>8} {'top-1 = fp32':>13}  kept = fp32 per drop block")
    for row in rows:
        speedup = f"{row['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in row else "-"
        kept = " ".join(f"{v:.0%}" for v in row.get("kept_same_vs_fp32", [])) or "-"
        print(
            f"{row['mode']:<8} {row['keep_rate']:>5g} {row['throughput_ips']:>9.0f} "
            f"{row['latency_ms']['p50']:>8.2f} {speedup:>8} {row['top1_agreement_vs_fp32']:>13.1%}  {kept}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": device, "torch": torch.__version__, "runs": rows, "seconds": time.perf_counter() - started},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
