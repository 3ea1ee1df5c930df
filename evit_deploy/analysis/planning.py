"""What an EViT configuration costs, and which configurations fit a compute budget.

The paper's two uses of token reorganization: the same resolution for less compute (a lower keep
rate), or more tokens for the same compute (a higher resolution at a lower keep rate). Costs are
counted per block with the token counts the model actually runs (model/flops.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.metadata import ArtifactMetadata, read_onnx_metadata
from evit_deploy.model.config import DEFAULT_DROP_LOC, EvitConfig, EvitOverrides
from evit_deploy.model.flops import BlockMacs, block_macs, count_macs, count_params

# GMACs the official README publishes for DeiT-S at 224 px (fused token, drops at blocks 3/6/9).
PUBLISHED_DEIT_S_GMACS = {1.0: 4.6, 0.9: 4.0, 0.8: 3.5, 0.7: 3.0, 0.6: 2.6, 0.5: 2.3}

DEFAULT_PLAN_SIZES = tuple(range(224, 385, 16))
DEFAULT_PLAN_KEEP_RATES = tuple(round(0.4 + 0.05 * i, 2) for i in range(13))  # 0.40 .. 1.00


@dataclass(frozen=True)
class ModelCost:
    config: EvitConfig
    params: int
    macs: int
    blocks: list[BlockMacs]

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def tokens_per_block(self) -> list[int]:
        """Image tokens entering each block (fused token included, class token excluded)."""
        return [b.tokens_in for b in self.config.token_plan]

    @property
    def tokens_after_drops(self) -> list[int]:
        """Patches, then the image tokens left after each drop block: 196 -> 139 -> 99 -> 71."""
        plan = self.config.token_plan
        return [self.config.num_patches, *(b.tokens_out for b in plan if b.keep is not None)]

    @property
    def published_gmacs(self) -> float | None:
        """The paper's figure for this configuration, where it publishes one."""
        c = self.config
        if c.model != "deit_small_patch16_224" or c.img_size != 224 or c.num_classes != 1000:
            return None
        if not c.is_evit:
            return PUBLISHED_DEIT_S_GMACS[1.0]
        if c.drop_loc != DEFAULT_DROP_LOC or not c.fuse_token:
            return None
        return PUBLISHED_DEIT_S_GMACS.get(c.keep_rate)

    def to_dict(self) -> dict:
        c = self.config
        return {
            "model": c.model,
            "keep_rate": c.keep_rate,
            "drop_loc": list(c.drop_loc),
            "fuse_token": c.fuse_token,
            "img_size": c.img_size,
            "num_classes": c.num_classes,
            "params": self.params,
            "macs": self.macs,
            "gmacs": round(self.gmacs, 4),
            "published_gmacs": self.published_gmacs,
            "tokens_per_block": self.tokens_per_block,
            "blocks": [
                {
                    "block": b.block,
                    "tokens_attention": b.tokens_attn,
                    "tokens_mlp": b.tokens_mlp,
                    "attention_macs": b.attention,
                    "mlp_macs": b.mlp,
                }
                for b in self.blocks
            ],
        }


def model_cost(config: EvitConfig) -> ModelCost:
    return ModelCost(config, count_params(config), count_macs(config), block_macs(config))


def fit_budget(
    base: EvitConfig,
    budget_gmacs: float,
    img_sizes: Sequence[int] = DEFAULT_PLAN_SIZES,
    keep_rates: Sequence[float] = DEFAULT_PLAN_KEEP_RATES,
) -> list[ModelCost]:
    """For each resolution, the highest keep rate whose cost fits the budget: the most tokens
    that budget buys there. `base` gives the architecture, classes, drop blocks and fusion.
    Resolutions where even the lowest keep rate is too dear are left out; if none fits, the
    error names the cheapest option."""
    if budget_gmacs <= 0:
        raise UsageError(f"the budget must be positive, got {budget_gmacs} GMACs")
    if not img_sizes or not keep_rates:
        raise UsageError("give at least one image size and one keep rate")
    fits = []
    cheapest = None
    for size in sorted(set(img_sizes)):
        # Cost grows with the keep rate, so the first that fits from the top is the best one.
        for keep_rate in sorted(set(keep_rates), reverse=True):
            cost = model_cost(replace(base, keep_rate=keep_rate, img_size=size))
            if cheapest is None or cost.macs < cheapest.macs:
                cheapest = cost
            if cost.gmacs <= budget_gmacs:
                fits.append(cost)
                break
    if not fits:
        c = cheapest.config
        raise UsageError(
            f"nothing fits {budget_gmacs:g} GMACs: the cheapest option is {c.img_size} px at keep "
            f"rate {c.keep_rate:g} ({cheapest.gmacs:.2f} GMACs); raise the budget or add lower "
            f"keep rates or sizes"
        )
    return fits


def parse_numbers(text: str, kind: type, what: str) -> tuple:
    """'0.5,0.7,1.0' or '224,256' (the CLI form) as a tuple of `kind`."""
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


def resolve_config(target: str, evit: EvitOverrides = EvitOverrides()) -> EvitConfig:
    return resolve_target(target, evit)[0]


def resolve_target(
    target: str, evit: EvitOverrides = EvitOverrides()
) -> tuple[EvitConfig, ArtifactMetadata | None]:
    """The configuration behind a model name, a checkpoint (architecture and head read off its
    weights) or an exported ONNX or engine (its metadata; its token counts are fixed, so settings
    that differ are refused), with `evit`'s settings (its model, if any, is the target's); and an
    exported file's metadata (None for the others). Exported files are read without torch or
    onnxruntime."""
    overrides = {k: v for k, v in evit.given().items() if k != "model"}
    path = Path(target)
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".plan", ".engine"):
        metadata = exported_metadata(path)
        config = metadata.to_config()
        differing = [
            f"{k} {getattr(config, k)}" for k, v in overrides.items() if getattr(config, k) != v
        ]
        if differing:
            raise UsageError(
                f"{path.name} was exported with {', '.join(differing)} and its token counts are "
                f"fixed; give the model name ({config.model}) to see other settings"
            )
        return config, metadata
    if suffix in (".pth", ".pt", ".safetensors"):
        from evit_deploy.model.checkpoint import infer_model_name, read_state_dict

        state = read_state_dict(path)
        head = state.get("head.weight")
        classes = head.shape[0] if head is not None and head.ndim == 2 else None
        return evit.config(infer_model_name(state, path), classes), None
    if path.exists():
        raise EvitDeployError(
            f"{target} is not an ONNX model (.onnx), an evit-deploy engine (.plan/.engine) or a "
            "checkpoint (.pth/.pt/.safetensors)"
        )
    return EvitConfig(target, **overrides), None


def exported_metadata(path: Path) -> ArtifactMetadata:
    """The metadata of an exported ONNX, or of an engine (its header, no TensorRT needed; with the
    precision and FP32 islands it was built with, which may not be its ONNX's)."""
    if path.suffix.lower() == ".onnx":
        return read_onnx_metadata(path)
    from evit_deploy.engines.header import read_engine_header

    header = read_engine_header(path)
    return replace(header.metadata, precision=header.precision, fp32_islands=header.fp32_islands)
