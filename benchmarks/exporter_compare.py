"""The torch.export-based ONNX exporter (what `export` uses) against the deprecated TorchScript one.

For one model (deit_small keep 0.7 by default, seeded random weights: speed and graph shape do not
depend on the weight values) both exporters write the graph, onnxslim simplifies each as `export`
does, and this reports per exporter: export time, node count (by op type), fidelity against
PyTorch (the export validation: max |logit diff|, top-1, kept tokens), and ONNX Runtime latency at
batch 1 and 8, timed interleaved (one run of each per round), medians.

    .venv/bin/python benchmarks/exporter_compare.py [--model deit_small_patch16_224] [--min-seconds 10]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from records import check_output, output_options, warn_if_busy, write_record

from evit_deploy.export.onnx import TRACE_BATCH, export_graph, simplify, topk_constant_ks
from evit_deploy.metadata import stamp_metadata
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.export.validate import validate_onnx
from evit_deploy.metadata import INPUT_NAME, OUTPUT_NAME
from evit_deploy.model import EvitConfig, build_model
from evit_deploy.bench.bench import interleaved_latencies, parse_batches
from evit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend


def torchscript_graph(model, opset: int = 17) -> onnx.ModelProto:
    """The exporter evit-deploy used before: TorchScript tracing (dynamo=False)."""
    dummy = torch.zeros(TRACE_BATCH, 3, model.config.img_size, model.config.img_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    output_options(parser, "results_exporters.json")
    args = parser.parse_args()
    check_output(args)
    warn_if_busy()
    warnings.simplefilter("ignore")
    model = build_model(EvitConfig(args.model, args.keep_rate))
    exporters = {
        "torch.export (dynamo, opset 18)": lambda: export_graph(model, 18, False),
        "TorchScript (legacy, opset 17)": lambda: torchscript_graph(model, 17),
    }
    results, backends = {}, {}
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "evit_exporter_compare"
    folder.mkdir(exist_ok=True)
    for name, make in exporters.items():
        print(f"exporting with {name} ...", flush=True)
        start = time.perf_counter()
        raw = make()
        exported = time.perf_counter() - start
        slim = simplify(raw)
        total = time.perf_counter() - start
        ks = topk_constant_ks(slim)
        stamp_metadata(slim, ArtifactMetadata.from_model(model))  # what the ONNX Runtime backend reads
        data = slim.SerializeToString()
        report = validate_onnx(model, data)
        path = folder / f"{len(results)}.onnx"
        path.write_bytes(data)
        results[name] = {
            "export_s": round(exported, 1),
            "export_and_simplify_s": round(total, 1),
            "nodes_raw": len(raw.graph.node),
            "nodes": len(slim.graph.node),
            "ops": dict(Counter(n.op_type for n in slim.graph.node).most_common()),
            "topk_k": ks,
            "max_abs_diff": max(c.max_abs_diff for c in report.cases),
            "validation_passed": report.passed,
        }
        backends[name] = OnnxRuntimeBackend(path, "cpu", threads=args.threads)
    names = list(backends)
    size = model.config.img_size
    for batch in parse_batches(args.batches):
        inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
        print(f"timing batch {batch}: both graphs interleaved, >= {args.min_seconds:g} s each ...", flush=True)
        latencies = interleaved_latencies(
            [backends[n] for n in names], inputs, warmup=3, min_seconds=args.min_seconds
        )
        for name, seconds in zip(names, latencies):
            results[name][f"p50_ms_batch{batch}"] = round(float(np.median(seconds)) * 1000, 2)
    first, second = names
    for batch in parse_batches(args.batches):
        key = f"p50_ms_batch{batch}"
        print(f"batch {batch}: {first} is {results[second][key] / results[first][key]:.3f}x the speed of {second}")
    print(json.dumps(results, indent=2))
    write_record(args, {"model": args.model, "keep_rate": args.keep_rate, "results": results})


if __name__ == "__main__":
    main()
