"""Build settings of a TensorRT engine: precision, the batch profile, the memory pool, which parts
of the graph stay in FP32 when build-engine converts an FP32 ONNX to FP16. Pure data, checked
before any TensorRT call, and stored in the engine header so the plain-ViT baseline can be rebuilt
with exactly the same settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.precision import DEFAULT_ISLANDS, ISLANDS
from evit_deploy.precisions import FP16, check_precision, written_by



@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile over the batch axis: TensorRT accepts any batch in [min, max]
    and tunes its kernels for `opt`."""

    min: int = 1
    opt: int = 64
    max: int = 128

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UsageError(f"batch profile sizes must be integers, got {values}")
        if self.min <= 0:
            raise UsageError(f"--min-batch must be positive, got {self.min}")
        if not self.min <= self.opt <= self.max:
            raise UsageError(
                f"batch profile needs min <= opt <= max, got min {self.min}, opt {self.opt}, "
                f"max {self.max}"
            )

    def shapes(self, input_dims: list[int | None]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) input shapes for an ONNX input whose dims are ints or None (dynamic).

        Only the batch axis may be dynamic; a static batch must equal the whole profile."""
        if not input_dims:
            raise EvitDeployError("the ONNX input has no shape; re-export it with evit-deploy export")
        batch, rest = input_dims[0], input_dims[1:]
        if any(d is None for d in rest):
            raise EvitDeployError(
                f"only the batch axis may be dynamic, but the ONNX input is {_dims(input_dims)}"
            )
        if batch is not None and not self.min == self.opt == self.max == batch:
            raise UsageError(
                f"the ONNX input has a fixed batch of {batch}; use --min-batch {batch} "
                f"--opt-batch {batch} --max-batch {batch} or export with a dynamic batch"
            )
        return tuple((size, *rest) for size in (self.min, self.opt, self.max))


@dataclass(frozen=True)
class BuildSettings:
    """Everything `build-engine` takes besides the input and output files."""

    precision: str = FP16
    profile: BatchProfile = field(default_factory=BatchProfile)
    workspace_gb: float | None = None  # None: TensorRT's default (the GPU's memory)
    # ONNX node-name patterns kept in FP32 when an FP32 ONNX is converted to FP16 for the build
    fp32_layers: tuple[str, ...] = ()
    # FP32 islands of that conversion (evit_deploy.export.precision.ISLANDS)
    fp32_islands: tuple[str, ...] = DEFAULT_ISLANDS
    timing_cache: str = ""  # "" : the default cache file for this TensorRT version and GPU
    # ProfilingVerbosity.DETAILED: per-layer names, types and formats in the plan, for the engine
    # inspector (benchmarks/trt_layer_precisions.py reads the FP32 islands' precisions with it)
    detailed_profile: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision, written_by("build-engine"), "build-engine")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise UsageError(f"--workspace must be a positive number of GB, got {self.workspace_gb}")
        object.__setattr__(self, "fp32_layers", tuple(self.fp32_layers))
        object.__setattr__(self, "fp32_islands", tuple(self.fp32_islands))
        if any(not pattern.strip() for pattern in self.fp32_layers):
            raise UsageError("--fp32-layers patterns must not be empty")
        unknown = [name for name in self.fp32_islands if name not in ISLANDS]
        if unknown:
            raise UsageError(f"unknown FP32 island(s) {', '.join(unknown)}; choose from {', '.join(ISLANDS)}")

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * 2**30)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fp32_layers"] = list(self.fp32_layers)
        out["fp32_islands"] = list(self.fp32_islands)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "BuildSettings":
        data = dict(data)
        data["profile"] = BatchProfile(**data["profile"])
        data["fp32_layers"] = tuple(data.get("fp32_layers", ()))
        if "fp32_topk_scores" in data:  # engine header format 1
            data["fp32_islands"] = ("topk_scores",) if data.pop("fp32_topk_scores") else ()
        data["fp32_islands"] = tuple(data.get("fp32_islands", DEFAULT_ISLANDS))
        return cls(**data)


def _dims(dims: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
