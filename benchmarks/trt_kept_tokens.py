"""TensorRT engines against FP32 ONNX Runtime: top-1 agreement and, per drop block, the share of
images keeping the same patches. The engines must come from an ONNX exported with
--with-token-indices, which is also the reference.

    PYTHONPATH=. python benchmarks/trt_kept_tokens.py evit.onnx evit.fp16.plan evit.fp16-scores.plan
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime as ort

from evit_deploy.metadata import read_onnx_metadata
from evit_deploy.model.vit import kept_patch_ids
from evit_deploy.runtime.tensorrt_backend import TensorRTBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("engines", nargs="+")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args()
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

    reference_kept = kept(reference)
    results = {}
    for path in args.engines:
        backend = TensorRTBackend(path)
        outputs = {}
        for start in range(0, len(images), backend.max_batch):
            for name, value in backend.run_all(images[start : start + backend.max_batch]).items():
                outputs.setdefault(name, []).append(value)
        outputs = {name: np.concatenate(parts) for name, parts in outputs.items()}
        results[path] = {
            "precision": backend.precision,
            "fp32_layers": len(backend.header.fp32_layers),
            "top1_agreement": float((outputs[meta.output_name].argmax(1) == reference[meta.output_name].argmax(1)).mean()),
            "kept_same": [
                float(np.mean([set(a) == set(b) for a, b in zip(r, c)]))
                for r, c in zip(reference_kept, kept(outputs))
            ],
        }
        row = results[path]
        print(
            f"{path}: {row['precision']}, {row['fp32_layers']} FP32 layers; top-1 = FP32 "
            f"{row['top1_agreement']:.1%}; kept patches = FP32 per drop block "
            + " ".join(f"{v:.1%}" for v in row["kept_same"])
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
