"""The engine file: a JSON header in front of the TensorRT plan, so one file carries the model's
metadata (preprocessing, classes, token plan) and what the plan was built for.

Layout: MAGIC (8 bytes) | header length (uint32, little-endian) | header (UTF-8 JSON) | plan.

A plan only runs with the TensorRT version that built it and on GPUs of the same compute
capability; the header records both so a mismatch is reported in one line before TensorRT is
asked to deserialize it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from evit_deploy.engines.settings import BatchProfile, BuildSettings
from evit_deploy.errors import EvitDeployError
from evit_deploy.fileio import atomic_output
from evit_deploy.metadata import ArtifactMetadata

MAGIC = b"EVITTRT\x00"
# 2: strongly typed builds; settings.fp32_islands replaces fp32_topk_scores, fp32_islands added.
# Format 1 headers are still read.
FORMAT_VERSION = 2
_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 16 * 2**20  # a sane bound: a corrupted length must not allocate gigabytes


@dataclass(frozen=True)
class EngineHeader:
    metadata: ArtifactMetadata
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.9"
    precision: str  # what was built: fp16, or fp32 (asked for, or no fast FP16 on the GPU)
    settings: BuildSettings  # as asked for; reused to build the plain-ViT baseline
    input_shape: list[int]  # one image, without the batch axis
    # FP16 engines: the ONNX nodes computing in FP32 in the graph TensorRT built (TensorRT's layers
    # carry these names); format 1: the layers pinned to FP32 with builder flags
    fp32_layers: list[str] = field(default_factory=list)
    onnx: str = ""  # source file name
    format_version: int = FORMAT_VERSION
    fp32_islands: list[str] = field(default_factory=list)  # e.g. ['topk_scores'] (precision.ISLANDS)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "metadata": self.metadata.to_props(),
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "settings": self.settings.to_dict(),
            "input_shape": list(self.input_shape),
            "fp32_layers": list(self.fp32_layers),
            "fp32_islands": list(self.fp32_islands),
            "onnx": self.onnx,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "engine") -> "EngineHeader":
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise EvitDeployError(
                f"{source} has engine header format {version}; this evit-deploy reads format "
                f"{FORMAT_VERSION}: upgrade evit-deploy or rebuild the engine"
            )
        try:
            return cls(
                metadata=ArtifactMetadata.from_props(data["metadata"], source),
                tensorrt_version=data["tensorrt_version"],
                gpu_name=data["gpu_name"],
                compute_capability=data["compute_capability"],
                precision=data["precision"],
                settings=BuildSettings.from_dict(data["settings"]),
                input_shape=list(data["input_shape"]),
                fp32_layers=list(data.get("fp32_layers", [])),
                onnx=data.get("onnx", ""),
                format_version=version,
                fp32_islands=list(data.get("fp32_islands", [])),
            )
        except (KeyError, TypeError) as exc:
            raise EvitDeployError(f"{source} has a damaged engine header ({exc})") from None

    @property
    def profile(self) -> BatchProfile:
        return self.settings.profile


def encode_header(header: EngineHeader) -> bytes:
    body = json.dumps(header.to_dict(), sort_keys=True).encode("utf-8")
    return MAGIC + _LENGTH.pack(len(body)) + body


def decode_header(prefix: bytes, source: str = "engine") -> tuple[EngineHeader, int]:
    """The header at the start of `prefix` and the offset where the plan starts."""
    if not prefix.startswith(MAGIC):
        raise EvitDeployError(
            f"{source} is not an evit-deploy engine (no evit-deploy header): build it with "
            "`evit-deploy build-engine MODEL.onnx`; a raw TensorRT plan carries no preprocessing "
            "metadata"
        )
    start = len(MAGIC) + _LENGTH.size
    if len(prefix) < start:
        raise EvitDeployError(f"{source} is truncated (engine header cut short)")
    (length,) = _LENGTH.unpack_from(prefix, len(MAGIC))
    if length > MAX_HEADER_BYTES or len(prefix) < start + length:
        raise EvitDeployError(f"{source} is truncated or corrupted (engine header cut short)")
    try:
        data = json.loads(prefix[start : start + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvitDeployError(f"{source} is corrupted (engine header is not valid JSON)") from None
    if not isinstance(data, dict):
        raise EvitDeployError(f"{source} is corrupted (engine header is not a JSON object)")
    return EngineHeader.from_dict(data, source), start + length


def write_engine(path: str | Path, header: EngineHeader, plan: bytes, force: bool = False) -> Path:
    """Header + plan, written atomically (never a half-written engine under `path`)."""
    with atomic_output(path, force) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(encode_header(header))
            handle.write(plan)
    return Path(path)


def read_engine_header(path: str | Path) -> EngineHeader:
    """Only the header: cheap, no TensorRT needed (for `info`, compatibility checks)."""
    return _read(path, with_plan=False)[0]


def read_engine(path: str | Path) -> tuple[EngineHeader, bytes]:
    header, plan = _read(path, with_plan=True)
    if not plan:
        raise EvitDeployError(f"{path} is truncated (no TensorRT plan after the header)")
    return header, plan


def _read(path: str | Path, with_plan: bool) -> tuple[EngineHeader, bytes]:
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise EvitDeployError(f"engine {path} is empty (0 bytes); build it again")
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(len(MAGIC) + _LENGTH.size)
            if len(prefix) == len(MAGIC) + _LENGTH.size and prefix.startswith(MAGIC):
                (length,) = _LENGTH.unpack_from(prefix, len(MAGIC))
                prefix += handle.read(min(length, MAX_HEADER_BYTES))
            header, _ = decode_header(prefix, str(path))
            plan = handle.read() if with_plan else b""
    except FileNotFoundError:
        raise EvitDeployError(f"engine not found: {path}") from None
    except IsADirectoryError:
        raise EvitDeployError(f"{path} is a directory; give an engine file") from None
    return header, plan


def check_compatible(
    header: EngineHeader, tensorrt_version: str, gpu_name: str, compute_capability: str, source: str
) -> str | None:
    """Fail in one line when the plan cannot run here (another TensorRT version or compute
    capability); return a warning when only the GPU model differs (it runs, but its kernels were
    timed on the other GPU)."""
    if header.tensorrt_version != tensorrt_version or header.compute_capability != compute_capability:
        raise EvitDeployError(
            f"{source} was built with TensorRT {header.tensorrt_version} for {header.gpu_name} "
            f"(compute capability {header.compute_capability}); this machine has TensorRT "
            f"{tensorrt_version} and {gpu_name} (compute capability {compute_capability}): "
            f"rebuild it here with `evit-deploy build-engine {header.onnx or 'MODEL.onnx'}`"
        )
    if header.gpu_name != gpu_name:
        return (
            f"{source} was built on {header.gpu_name}, this GPU is {gpu_name} (same compute "
            f"capability, so it runs, but its kernels were tuned for the other GPU); rebuild "
            f"here for best speed"
        )
    return None
