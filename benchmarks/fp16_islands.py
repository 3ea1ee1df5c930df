"""Which FP32 islands an FP16 EViT needs, measured on the trained shapes model.

The FP32 ONNX of a checkpoint is converted to FP16 three ways: everything FP16, FP16 with the
TopK score path in FP32 (`topk_scores`), and that plus every LayerNorm (`topk_scores+layernorm`).
Each runs on ONNX Runtime's CPU provider against the FP32 PyTorch model on random inputs, the
photograph and a held-out folder: the export validation with the FP16 gates (top-1 agreement
>= 99.5 %, the first drop block's kept tokens identical for >= 99 % of held-out images). Prints a
Markdown table and writes build/results_fp16_islands.json (records.py).

    .venv/bin/python benchmarks/fp16_islands.py --checkpoint evit_deploy/assets/shapes/shapes_evit_tiny.safetensors \
        --validate-dir build/heldout
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from records import check_output, output_options, write_record

from evit_deploy.export.onnx import DEFAULT_OPSET, export_graph, simplify
from evit_deploy.export.precision import convert_to_fp16
from evit_deploy.export.validate import GATES, onnx_runner, torch_runner, validate
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.model import EvitConfig, build_model
from evit_deploy.model.checkpoint import infer_model_name, read_state_dict

VARIANTS = {
    "all FP16": (),
    "FP32 TopK scores": ("topk_scores",),
    "FP32 TopK scores + LayerNorm": ("topk_scores", "layernorm"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--validate-dir", type=Path, required=True)
    parser.add_argument("--keep-rate", type=float, default=0.7)
    output_options(parser, "results_fp16_islands.json")
    args = parser.parse_args()
    check_output(args)
    warnings.simplefilter("ignore")
    name = infer_model_name(read_state_dict(args.checkpoint), args.checkpoint)
    model = build_model(EvitConfig(name, args.keep_rate), args.checkpoint)
    meta = ArtifactMetadata.from_model(model)
    fp32 = simplify(export_graph(model, DEFAULT_OPSET, False))
    reference = torch_runner(model)
    results = {}
    for variant, islands in VARIANTS.items():
        conversion = convert_to_fp16(fp32, islands)
        report = validate(
            reference, onnx_runner(conversion.model), meta, validate_dir=args.validate_dir,
            gates=GATES["fp16"],
        )
        results[variant] = {
            "islands": list(islands),
            "fp32_nodes": len(conversion.fp32_nodes),
            "passed": report.passed,
            "rows": report.to_dict()["cases"],
        }
    print("| conversion | inputs | images | max abs logit diff | top-1 agreement | kept tokens identical (per drop block) | kept-token overlap | accuracy FP32 -> FP16 | gates |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, result in results.items():
        for row in result["rows"]:
            kept = " / ".join(f"{v:.1%}" for v in row["kept_identical"])
            overlap = " / ".join(f"{v:.2%}" for v in row["kept_overlap"])
            accuracy = (
                f"{row['reference_accuracy']:.2%} -> {row['accuracy']:.2%}"
                if row["accuracy"] is not None else "-"
            )
            verdict = ("pass" if row["passed"] else "FAIL: " + "; ".join(row["missed"])) if row["gated"] else "reported"
            print(
                f"| {variant} | {row['name']} | {row['batch']} | {row['max_abs_diff']:.3g} | "
                f"{row['top1_agreement']:.2%} | {kept} | {overlap} | {accuracy} | {verdict} |"
            )
    write_record(args, {"checkpoint": str(args.checkpoint), "keep_rate": args.keep_rate, "results": results})


if __name__ == "__main__":
    main()
