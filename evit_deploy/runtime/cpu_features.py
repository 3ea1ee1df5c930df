"""The CPU instruction sets that decide which precisions are fast here, read from /proc/cpuinfo.

FP32 runs on AVX2 or AVX-512F; BF16 needs AVX-512 BF16 or AMX-BF16 (without them OpenVINO would
emulate it, slower than FP32); INT8 is four times FP32's multiply-adds per instruction with
AVX-512 VNNI (AVX-VNNI on 256-bit cores), and AMX-INT8 goes further.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# What doctor reports: label -> the /proc/cpuinfo flag
FEATURES = {
    "AVX2": "avx2",
    "AVX-512F": "avx512f",
    "AVX-512 BF16": "avx512_bf16",
    "AVX-512 VNNI": "avx512_vnni",
    "AVX-VNNI": "avx_vnni",
    "AMX-BF16": "amx_bf16",
    "AMX-INT8": "amx_int8",
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass
class CpuFeatures:
    name: str
    flags: dict[str, bool]  # FEATURES label -> present; empty when /proc/cpuinfo is unreadable
    openvino_capabilities: list[str] = field(default_factory=list)  # OPTIMIZATION_CAPABILITIES

    @property
    def known(self) -> bool:
        return bool(self.flags)

    @property
    def bf16(self) -> bool:
        """Native BF16 (AVX-512 BF16 or AMX); where the flags are unknown, OpenVINO's word."""
        if self.known:
            return any(self.flags[label] for label, flag in FEATURES.items() if flag in BF16_FLAGS)
        return "BF16" in self.openvino_capabilities

    @property
    def vnni(self) -> bool:
        return any(self.flags.get(label) for label, flag in FEATURES.items() if flag in VNNI_FLAGS)

    def to_dict(self) -> dict:
        return {**asdict(self), "bf16": self.bf16, "vnni": self.vnni}


def parse_cpuinfo(text: str) -> tuple[str, dict[str, bool]]:
    """(model name, FEATURES label -> present) from /proc/cpuinfo text (the first processor's
    entry; x86 calls the line 'flags', ARM 'Features')."""
    name = ""
    flags: set[str] | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
    if flags is None:
        return name, {}
    return name, {label: flag in flags for label, flag in FEATURES.items()}


def openvino_capabilities() -> list[str]:
    """OpenVINO's CPU OPTIMIZATION_CAPABILITIES (FP32, BF16, INT8, ...); [] without OpenVINO."""
    try:
        import openvino as ov

        return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # not installed, or no CPU plugin
        return []


def probe_cpu(cpuinfo: str | None = None, with_openvino: bool = True) -> CpuFeatures:
    """This machine's CPU (or the given /proc/cpuinfo text)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            cpuinfo = ""
    name, flags = parse_cpuinfo(cpuinfo)
    if not name:
        import platform

        name = platform.processor() or platform.machine()
    return CpuFeatures(name, flags, openvino_capabilities() if with_openvino else [])


def missing_bf16(cpu: CpuFeatures) -> str | None:
    """Why BF16 is not offered on `cpu`, in one line; None when it is."""
    if cpu.bf16 and (not cpu.openvino_capabilities or "BF16" in cpu.openvino_capabilities):
        return None
    have = ", ".join(label for label, present in cpu.flags.items() if present) or "none of them"
    return (
        f"this CPU ({cpu.name}) has no native BF16 (needs AVX-512 BF16 or AMX-BF16; it has "
        f"{have}): use --precision fp32"
    )
