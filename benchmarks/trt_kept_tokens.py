"""TensorRT engines against FP32 ONNX Runtime, run at several batch sizes: top-1 agreement and, per
drop block, the share of images keeping the same patches; and each engine against itself across
batch sizes. NVIDIA/TensorRT#2299 (TopK -> Gather with a dynamic batch gave wrong results) showed
only away from the profile's opt batch, hence batch 1, 7 (odd, not a kernel tile), 64 and 128.
The engines must come from an ONNX exported with --with-token-indices, which is also the reference.
Exit 1 when an engine fails a gate (--min-top1 against FP32; --min-consistency: block-3 kept
patches identical to the same engine at the first batch size).

    PYTHONPATH=. python benchmarks/trt_kept_tokens.py evit.onnx evit.fp16.plan evit.fp16-scores.plan
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort

from evit_deploy.metadata import read_onnx_metadata
from evit_deploy.model.vit import kept_patch_ids
from evit_deploy.runtime.tensorrt_backend import TensorRTBackend


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("engines", nargs="+")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batches", default="1,7,64,128", help="Batch sizes to run (comma-separated).")
    parser.add_argument("--min-top1", type=float, default=0.9, help="Gate: top-1 agreement with FP32 at every batch size (random weights: FP16 differs on near ties).")
    parser.add_argument("--min-consistency", type=float, default=0.9, help="Gate: block-3 kept patches equal to the first batch size's (gross errors such as #2299; the figures are printed).")
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    meta = read_onnx_metadata(args.onnx)
    if not meta.token_index_outputs:
        raise SystemExit(f"{args.onnx} has no token-index outputs: export it with --with-token-indices")
    config = meta.to_config()
    images = np.random.default_rng(0).standard_normal((args.images, 3, meta.img_size, meta.img_size), dtype=np.float32)
    session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    names = [meta.output_name, *meta.token_index_outputs]
    reference = dict(zip(names, session.run(names, {meta.input_name: images})))

    def kept(outputs: dict) -> list[np.ndarray]:
        return kept_patch_ids([outputs[n] for n in meta.token_index_outputs], config.num_patches, config.fuse_token)

    def same(a: list, b: list) -> list[float]:
        return [float(np.mean([set(x) == set(y) for x, y in zip(p, q)])) for p, q in zip(a, b)]

    reference_kept = kept(reference)
    results, failed = {}, []
    for path in args.engines:
        backend = TensorRTBackend(path)
        rows, first_kept = {}, None
        for batch in batches:
            if not backend.min_batch <= batch <= backend.max_batch:
                print(f"{path}: batch {batch} is outside the profile [{backend.min_batch}, {backend.max_batch}]; skipped")
                continue
            outputs = {}
            for start in range(0, len(images), batch):
                chunk = images[start : start + batch]
                if len(chunk) < backend.min_batch:
                    break
                for name, value in backend.run_all(chunk).items():
                    outputs.setdefault(name, []).append(value)
            outputs = {name: np.concatenate(parts) for name, parts in outputs.items()}
            count = len(outputs[meta.output_name])
            engine_kept = kept(outputs)
            first_kept = first_kept or engine_kept
            row = {
                "images": count,
                "top1_agreement": float((outputs[meta.output_name].argmax(1) == reference[meta.output_name][:count].argmax(1)).mean()),
                "kept_same_as_fp32": same([r[:count] for r in reference_kept], engine_kept),
                "kept_same_as_first_batch": same([f[:count] for f in first_kept], engine_kept),
            }
            rows[batch] = row
            print(
                f"{path} batch {batch}: {backend.precision}; top-1 = FP32 {row['top1_agreement']:.1%}; kept "
                "patches = FP32 per drop block " + " ".join(f"{v:.1%}" for v in row["kept_same_as_fp32"])
                + f"; = batch {batches[0]} " + " ".join(f"{v:.1%}" for v in row["kept_same_as_first_batch"])
            )
            if row["top1_agreement"] < args.min_top1 or row["kept_same_as_first_batch"][0] < args.min_consistency:
                failed.append(f"{path} at batch {batch}")
        results[path] = {
            "precision": backend.precision,
            "fp32_islands": backend.header.fp32_islands,
            "fp32_nodes": len(backend.header.fp32_layers),
            "batches": rows,
        }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if failed:
        print(f"FAILED gates (top-1 >= {args.min_top1:.0%}, block-3 consistency >= {args.min_consistency:.0%}): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
