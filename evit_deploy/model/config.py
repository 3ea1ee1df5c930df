"""Model architectures, EViT settings and the static token plan they imply.

With a fixed keep rate every token count is known before the model runs; the plan below is the
single place that computes it, so the model, the ONNX metadata and the FLOP counter agree.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

from evit_deploy.errors import UsageError


def keep_text(rate: float) -> str:
    """A keep rate as the JSON writes it: 0.7, 1.0 (never "1"); also bench's JSON keys."""
    return repr(float(rate))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PCT = 0.875
# A crop of less than this share of the short side throws most of the image away: refused in
# checkpoints and artifacts as damaged (torchvision-style resizing to img_size / crop_pct).
MIN_CROP_PCT = 0.25
INTERPOLATION = "bicubic"


@dataclass(frozen=True)
class Preprocessing:
    """How images become the model's input: DeiT's evaluation transform by default. A checkpoint
    trained on something else carries its own (safetensors metadata, see checkpoint.py)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = CROP_PCT
    interpolation: str = INTERPOLATION

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UsageError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")
        if not MIN_CROP_PCT <= self.crop_pct <= 1:
            raise UsageError(f"crop_pct must be in [{MIN_CROP_PCT}, 1], got {self.crop_pct}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise UsageError(f"unknown interpolation '{self.interpolation}'")

    def to_dict(self) -> dict:
        return {
            "mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class ViTArch:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


ARCHS = {
    a.name: a
    for a in (
        ViTArch("deit_tiny_patch16_224", 192, 12, 3),
        ViTArch("deit_small_patch16_224", 384, 12, 6),
        ViTArch("deit_base_patch16_224", 768, 12, 12),
    )
}

# The official EViT repository's model names for the same architectures.
ALIASES = {
    "deit_tiny_patch16_shrink_base": "deit_tiny_patch16_224",
    "deit_small_patch16_shrink_base": "deit_small_patch16_224",
    "deit_base_patch16_shrink_base": "deit_base_patch16_224",
}

DEFAULT_DROP_LOC = (3, 6, 9)
# Attention memory grows with the 4th power of the input size: at 1024 px one DeiT-B attention map
# is already 4097^2 per head, beyond that an export or batch runs out of memory.
MAX_IMG_SIZE = 1024


def resolve_arch(name: str) -> ViTArch:
    """Look a model name up (canonical or official EViT alias); suggest the closest on a typo."""
    canonical = ALIASES.get(name, name)
    if canonical in ARCHS:
        return ARCHS[canonical]
    known = sorted([*ARCHS, *ALIASES])
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UsageError(f"unknown model '{name}'.{hint} Known models: {', '.join(known)}")


@dataclass(frozen=True)
class BlockTokens:
    """Image tokens (fused token included, class token excluded) entering and leaving one block."""

    block: int
    tokens_in: int
    keep: int | None  # TopK's K in this block; None where the block drops nothing
    tokens_out: int


def plan_tokens(
    num_patches: int, depth: int, keep_rate: float, drop_loc: tuple[int, ...], fuse_token: bool
) -> list[BlockTokens]:
    """Token counts per block exactly as the official code computes them at run time.

    k = ceil(keep_rate * n) with Python float arithmetic (the official code's rounding included);
    a block whose k equals n drops nothing.
    """
    plan = []
    n = num_patches
    for block in range(depth):
        keep = None
        out = n
        if keep_rate < 1 and block in drop_loc:
            k = math.ceil(keep_rate * n)
            if k < n:
                keep = k
                out = k + 1 if fuse_token else k
        plan.append(BlockTokens(block, n, keep, out))
        n = out
    return plan


@dataclass(frozen=True)
class EvitConfig:
    """Everything that fixes the exported graph: architecture, EViT settings, input size."""

    model: str = "deit_small_patch16_224"
    keep_rate: float = 0.7
    drop_loc: tuple[int, ...] = DEFAULT_DROP_LOC
    fuse_token: bool = True
    img_size: int = 224
    num_classes: int = 1000
    arch: ViTArch = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        arch = resolve_arch(self.model)
        object.__setattr__(self, "model", arch.name)
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "drop_loc", tuple(int(b) for b in self.drop_loc))
        if not (isinstance(self.keep_rate, (int, float)) and 0 < self.keep_rate <= 1):
            raise UsageError(f"keep rate must be in (0, 1], got {self.keep_rate}")
        bad = [b for b in self.drop_loc if not 0 <= b < arch.depth]
        if bad:
            raise UsageError(
                f"drop_loc {list(self.drop_loc)} has blocks outside 0..{arch.depth - 1} "
                f"({self.model} has {arch.depth} blocks)"
            )
        if list(self.drop_loc) != sorted(set(self.drop_loc)):
            raise UsageError(
                f"drop_loc must be increasing without repeats, got {list(self.drop_loc)}"
            )
        if self.img_size <= 0 or self.img_size % arch.patch_size:
            raise UsageError(
                f"img_size must be a positive multiple of the patch size {arch.patch_size}, "
                f"got {self.img_size}"
            )
        if self.img_size > MAX_IMG_SIZE:
            raise UsageError(
                f"img_size must be at most {MAX_IMG_SIZE} (attention memory grows with the 4th "
                f"power of the input size), got {self.img_size}"
            )
        if self.num_classes <= 0:
            raise UsageError(f"num_classes must be positive, got {self.num_classes}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.arch.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def token_plan(self) -> list[BlockTokens]:
        return plan_tokens(
            self.num_patches, self.arch.depth, self.keep_rate, self.drop_loc, self.fuse_token
        )

    @property
    def is_evit(self) -> bool:
        """True when at least one block actually drops tokens."""
        return any(b.keep is not None for b in self.token_plan)


@dataclass(frozen=True)
class EvitOverrides:
    """The EViT settings a user gives for a checkpoint (the CLI's EViT options, Predictor's and
    load_backend's `evit`), from the command line down to the PyTorch backend. None leaves the
    architecture read off the weights and EvitConfig's defaults: those live in EvitConfig alone.
    An exported artifact carries its own settings, so overrides for one are refused."""

    model: str | None = None
    keep_rate: float | None = None
    drop_loc: tuple[int, ...] | None = None
    fuse_token: bool | None = None
    img_size: int | None = None

    def __post_init__(self) -> None:
        if self.drop_loc is not None:
            object.__setattr__(self, "drop_loc", tuple(int(b) for b in self.drop_loc))

    def given(self) -> dict:
        """The settings given, by EvitConfig field name."""
        return {
            name: value for name, value in
            (("model", self.model), ("keep_rate", self.keep_rate), ("drop_loc", self.drop_loc),
             ("fuse_token", self.fuse_token), ("img_size", self.img_size))
            if value is not None
        }

    def flags(self) -> str:
        """The given settings as the CLI spells them: '--keep-rate, --img-size'."""
        return ", ".join("--" + name.replace("_", "-") for name in self.given())

    def config(self, model: str | None = None, num_classes: int | None = None) -> EvitConfig:
        """EvitConfig for these settings; `model` (read off a checkpoint) unless one was given."""
        settings = self.given()
        settings.setdefault("model", model or EvitConfig.model)
        if num_classes is not None:
            settings["num_classes"] = num_classes
        return EvitConfig(**settings)

    def __bool__(self) -> bool:
        return bool(self.given())


def parse_drop_loc(text: str) -> tuple[int, ...]:
    """Parse '3,6,9' (the CLI form); an empty string means no drop blocks."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"drop_loc must be comma-separated block indices, got '{text}'") from None
