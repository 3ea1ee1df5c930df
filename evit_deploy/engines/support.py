"""What TensorRT engines need from the machine. Kept free of imports beyond the standard library
so `evit-deploy doctor` can use it on a broken install (install hints: evit_deploy/install.py)."""

from __future__ import annotations

MIN_TENSORRT_MAJOR = 10
# GPUs on which TensorRT reports fast FP16: compute capability 5.3, 6.0, 6.2 and 7.0 or later.
FAST_FP16_CAPABILITIES = {(5, 3), (6, 0), (6, 2)}


def has_fast_fp16(compute_capability: str) -> bool:
    major, minor = (int(part) for part in compute_capability.split("."))
    return (major, minor) >= (7, 0) or (major, minor) in FAST_FP16_CAPABILITIES


def tensorrt_major(version: str) -> int:
    return int(version.split(".")[0])
