"""Read back, with TensorRT's engine inspector, the precision an FP16 engine runs its FP32 islands
in (the TopK score paths, and any other island it was built with); exit 1 if an island tensor
visible in the engine is not FP32, exit 3 ("no evidence") if none is visible, so that an engine
whose islands are all fused away is not reported as a pass. The engine must be built with
`--detailed-profile`; MODEL.onnx is the file it was built from (an FP32 ONNX is converted again
with the engine's settings, the same deterministic conversion build-engine ran, to name the
island tensors).

    PYTHONPATH=. python benchmarks/trt_layer_precisions.py evit.onnx evit.fp16.plan [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import onnx

from evit_deploy.engines.header import read_engine
from evit_deploy.engines.layer_precisions import Verdict, check_island_precisions, engine_layers, island_tensors
from evit_deploy.engines.tensorrt import require_tensorrt_gpu, tensorrt_logger
from evit_deploy.export.precision import convert_to_fp16, is_fp16_model

EXIT_CODES = {Verdict.PASS: 0, Verdict.FAIL: 1, Verdict.NO_EVIDENCE: 3}  # gpu_check.sh reads 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("engine")
    parser.add_argument("--json", help="Write the result here.")
    args = parser.parse_args()
    header, plan = read_engine(args.engine)
    if header.precision != "fp16":
        print(f"{args.engine} is {header.precision}: nothing to check")
        return 0
    model = onnx.load(args.onnx)
    if not is_fp16_model(model):
        settings = header.settings
        conversion = convert_to_fp16(model, settings.fp32_islands, settings.fp32_layers, require_matches=False)
        model = conversion.model
        if conversion.fp32_nodes != header.fp32_layers:
            print(f"{args.onnx} converts to other FP32 nodes than {args.engine} records: was it built from another file?")
            return 1
    tensors = island_tensors(model, header.fp32_layers)
    if not tensors:
        print(f"{args.engine} has no FP32 islands: nothing to check")
        return 0
    trt, _ = require_tensorrt_gpu(None, "the layer-precision check")
    runtime = trt.Runtime(tensorrt_logger(trt))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        print(f"TensorRT cannot load {args.engine}")
        return 1
    verbosity = getattr(engine, "profiling_verbosity", None)
    layers = engine_layers(trt, engine)
    result = check_island_precisions(layers, tensors)
    print(f"{args.engine}: {len(layers)} engine layers, profiling verbosity {verbosity}; islands "
          f"{', '.join(header.fp32_islands) or 'none'}: {result.verdict.value.upper()}: {result.summary()}")
    for name, kind in result.not_fp32.items():
        print(f"  NOT FP32: {name} (node {tensors[name]}): {kind}")
    for name in result.not_visible[:10]:
        print(f"  not visible (fused): {name} (node {tensors[name]})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({
                "engine": args.engine, "islands": header.fp32_islands, "profiling_verbosity": str(verbosity),
                "verdict": result.verdict.value, "fp32": result.fp32, "not_fp32": result.not_fp32,
                "not_visible": result.not_visible, "layers": layers,
            }, handle, indent=2)
    if result.verdict is Verdict.NO_EVIDENCE:
        print("no island tensor is visible in the engine: built without --detailed-profile, or all inside fused layers")
    return EXIT_CODES[result.verdict]


if __name__ == "__main__":
    sys.exit(main())
