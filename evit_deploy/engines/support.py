"""What TensorRT engines need from the machine. Kept free of imports beyond the standard library
so `evit-deploy doctor` can use it on a broken install (install hints: evit_deploy/install.py)."""

from __future__ import annotations

import re

# Every build is strongly typed, which is complete from TensorRT 10.12 on: 10.12 deprecated the
# weak-typing APIs in its favour, and NVIDIA's strong-typing migration notes say to upgrade an
# earlier 10.x first (.agents/skills/trt-strong-typing-migration/SKILL.md in NVIDIA/TensorRT).
MIN_TENSORRT = (10, 12)
MIN_TENSORRT_TEXT = "10.12"
# GPUs on which TensorRT reports fast FP16: compute capability 5.3, 6.0, 6.2 and 7.0 or later.
FAST_FP16_CAPABILITIES = {(5, 3), (6, 0), (6, 2)}


def has_fast_fp16(compute_capability: str) -> bool:
    major, minor = (int(part) for part in compute_capability.split("."))
    return (major, minor) >= (7, 0) or (major, minor) in FAST_FP16_CAPABILITIES


def tensorrt_too_old(version: str) -> bool:
    """Whether a TensorRT version ('10.11.0.33', '11.1.0') is below MIN_TENSORRT; an unreadable
    one counts as too old."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is None or (int(match[1]), int(match[2])) < MIN_TENSORRT
