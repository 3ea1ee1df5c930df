"""One precision vocabulary: the names, what each means, which step writes an artifact in it,
which backends run it, and where it is a setting chosen when a model is loaded. Every option that
names a precision is checked against this table (check_precision)."""

from __future__ import annotations

from dataclasses import dataclass

from evit_deploy.errors import UsageError

FP32, FP16, BF16, INT8 = "fp32", "fp16", "bf16", "int8"


@dataclass(frozen=True)
class Precision:
    name: str
    meaning: str
    written_by: tuple[str, ...]  # steps that write an artifact in it
    runs_on: tuple[str, ...]  # backends that run such an artifact
    chosen_at_load: tuple[str, ...] = ()  # backends where it is a load-time setting instead


PRECISIONS = {
    p.name: p
    for p in (
        Precision(FP32, "float32 weights and compute", ("export", "build-engine"),
                  ("onnxruntime", "openvino", "tensorrt", "pytorch"), ("openvino",)),
        Precision(FP16, "float16 weights and compute, the TopK score path kept in FP32",
                  ("export", "build-engine"), ("onnxruntime", "tensorrt", "pytorch")),
        Precision(BF16, "bfloat16 compute chosen when OpenVINO compiles a model (all of an FP32 one, "
                  "the float parts of an INT8 one), the TopK score path pinned to FP32", (), (), ("openvino",)),
        Precision(INT8, "int8 weights (and activations, by quantization method), the TopK score "
                  "path left in float", ("quantize",), ("onnxruntime", "openvino")),
    )
}


def written_by(step: str) -> tuple[str, ...]:
    """The precisions `step` (export, build-engine, quantize) can write."""
    return tuple(name for name, p in PRECISIONS.items() if step in p.written_by)


def chosen_at_load(backend: str) -> tuple[str, ...]:
    """The precisions `backend` can be asked to compute in when it loads a model."""
    return tuple(name for name, p in PRECISIONS.items() if backend in p.chosen_at_load)


def run_precision(artifact: str, compute: str) -> str:
    """How a model runs, as backends report it: an FP32 file at the precision chosen at load; a
    reduced one as it is, or with its float parts' precision when that is not FP32 ('int8+bf16':
    the INT8 multiplies as quantized, everything else in BF16)."""
    if artifact == FP32:
        return compute
    return artifact if compute == FP32 else f"{artifact}+{compute}"


def check_precision(precision: str, choices: tuple[str, ...], where: str) -> str:
    """`precision` if it is one of `choices`, else one usage error naming them."""
    if precision not in choices:
        raise UsageError(
            f"{where} takes precision {' or '.join(choices)}, got '{precision}'"
            + ("" if precision in PRECISIONS else f" (precisions: {', '.join(PRECISIONS)})")
        )
    return precision
