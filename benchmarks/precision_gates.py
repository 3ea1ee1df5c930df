"""Every CPU precision of one EViT against its FP32 ONNX, on held-out images, by the precision gates.

Candidates: OpenVINO FP32 (a sanity row), OpenVINO BF16 with the TopK score path in FP32 (the
default) and without it, and INT8 by each quantization method (ONNX Runtime static and dynamic,
NNCF where installed), each INT8 file run on ONNX Runtime (and the QDQ ones on OpenVINO too). Each is compared with the FP32 file on
ONNX Runtime by evit_deploy.export.validate (the machinery export and quantize use) under
GATES['bf16'] / GATES['int8']; reported per candidate: top-1 agreement, the share of images keeping
the same tokens at each drop block, accuracy FP32 -> candidate, and the gates missed. Writes JSON and
prints a Markdown table. This is how the INT8 method is chosen on the trained model:

    evit-deploy dataset shapes -o build/shapes_val --count 2000 --seed 3
    evit-deploy dataset shapes -o build/shapes_cal --count 256 --seed 4
    PYTHONPATH=. .venv/bin/python benchmarks/precision_gates.py \\
        --checkpoint evit_deploy/assets/shapes/shapes_evit_tiny.safetensors \\
        --validate-dir build/shapes_val --calibration build/shapes_cal

Without --checkpoint it runs on a random-weight deit_tiny with 8 shapes classes (numbers then only
show that the machinery works).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import onnx
from records import check_output, output_options, write_record

from evit_deploy.export import export_onnx
from evit_deploy.export.quantize import METHODS, quantize_onnx
from evit_deploy.export.validate import GATES, onnx_runner, validate
from evit_deploy.runtime.openvino_backend import openvino_runner
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.model import EvitConfig, build_model
from evit_deploy.runtime.cpu_features import probe_cpu


def export_fp32(checkpoint: Path | None, folder: Path, keep_rate: float = 0.7) -> Path:
    """The FP32 ONNX of the checkpoint (or of a random 8-class deit_tiny), validated by export."""
    from evit_deploy.data.shapes import CLASSES

    if checkpoint is not None:
        model = build_model(EvitConfig("deit_tiny_patch16_224", keep_rate), checkpoint)
    else:
        model = build_model(EvitConfig("deit_tiny_patch16_224", keep_rate, num_classes=len(CLASSES)), seed=0)
        model.classes = list(CLASSES)
    path = folder / "fp32.onnx"
    export_onnx(model, path, force=True)
    return path


def row(name: str, report, seconds: float, extra: dict | None = None) -> dict:
    held_out = next(case for case in report.cases if case.gated and case.gates is not None)
    return {
        "candidate": name,
        "precision": report.precision,
        "passed": report.passed,
        "top1_agreement": held_out.top1_agreement,
        "kept_identical": list(held_out.kept_identical),
        "kept_overlap": list(held_out.kept_overlap),
        "reference_accuracy": held_out.reference_accuracy,
        "accuracy": held_out.accuracy,
        "accuracy_drop": held_out.accuracy_drop,
        "missed": held_out.missed_gates(),
        "images": held_out.batch,
        "seconds": seconds,
        **(extra or {}),
    }


def fidelity(
    fp32: Path,
    validate_dir: Path,
    calibration: Path | None,
    methods: list[str],
    workdir: Path,
    on_row=lambda r: None,
) -> list[dict]:
    """Gate numbers of every candidate precision against the FP32 file on ONNX Runtime."""
    proto = onnx.load(str(fp32))
    meta = ArtifactMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    reference = onnx_runner(proto)
    rows = []

    def add(name: str, candidate, gates, extra=None):
        start = time.perf_counter()
        report = validate(reference, candidate, meta, validate_dir=validate_dir, gates=gates)
        rows.append(row(name, report, time.perf_counter() - start, extra))
        on_row(rows[-1])

    try:
        import openvino  # noqa: F401

        has_openvino = True
    except ImportError:
        has_openvino = False
    if has_openvino:
        add("openvino fp32", openvino_runner(fp32, "fp32"), GATES["bf16"])
        if probe_cpu().bf16:
            add("openvino bf16, TopK scores fp32", openvino_runner(fp32, "bf16", True), GATES["bf16"])
            add("openvino bf16, TopK scores bf16", openvino_runner(fp32, "bf16", False), GATES["bf16"])
    for method in methods:
        if method == "nncf":
            try:
                import nncf  # noqa: F401
            except ImportError:
                continue
        if method != "dynamic" and calibration is None:
            continue
        out = workdir / f"int8_{method}.onnx"
        start = time.perf_counter()
        result = quantize_onnx(
            fp32, out, method=method, calibration_dir=calibration, validate_dir=validate_dir,
            accept_failed_gates=True, force=True,
        )
        rows.append(row(f"int8 {method} (onnxruntime)", result.report, time.perf_counter() - start, {"path": str(out)}))
        on_row(rows[-1])
        if has_openvino and method != "dynamic":  # the QDQ file on OpenVINO's INT8 kernels
            add(f"int8 {method} (openvino)", openvino_runner(out, "fp32"), GATES["int8"])
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| candidate | top-1 agreement | same kept tokens (drop blocks) | kept-token overlap | accuracy FP32 -> candidate | gates |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = " / ".join(f"{k:.1%}" for k in r["kept_identical"])
        overlap = " / ".join(f"{k:.2%}" for k in r["kept_overlap"])
        accuracy = "-"
        if r["accuracy"] is not None:
            accuracy = f"{r['reference_accuracy']:.1%} -> {r['accuracy']:.1%} ({r['accuracy_drop']:+.2f} pt)"
        gates = "pass" if r["passed"] else "missed: " + "; ".join(r["missed"])
        lines.append(f"| {r['candidate']} | {r['top1_agreement']:.2%} | {kept} | {overlap} | {accuracy} | {gates} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="the trained model (default: random weights)")
    parser.add_argument("--onnx", type=Path, help="an FP32 export to use instead of exporting")
    parser.add_argument("--validate-dir", type=Path, required=True, help="held-out images, class folders")
    parser.add_argument("--calibration", type=Path, help="calibration images (static, nncf)")
    parser.add_argument("--methods", default=",".join(METHODS))
    output_options(parser, "results_precision_gates.json")
    args = parser.parse_args()
    check_output(args)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = args.onnx or export_fp32(args.checkpoint, Path(tmp))
        rows = fidelity(
            fp32, args.validate_dir, args.calibration, args.methods.split(","), Path(tmp),
            on_row=lambda r: print(json.dumps(r), flush=True),
        )
    result = {
        "model": str(args.checkpoint or args.onnx or "random deit_tiny, 8 classes"),
        "validate_dir": str(args.validate_dir),
        "calibration": str(args.calibration) if args.calibration else None,
        "cpu": probe_cpu().name,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    write_record(args, result)
    print(markdown(rows))


if __name__ == "__main__":
    main()
