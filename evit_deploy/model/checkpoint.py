"""Load official EViT .pth, timm DeiT and safetensors checkpoints into our EViT.

Like timm's checkpoint_filter_fn: unwrap the container, strip wrapper prefixes, resample pos_embed
to the target grid, then load strictly and report every mismatch in one message.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from evit_deploy.errors import EvitDeployError, first_line
from evit_deploy.model.config import ARCHS, EvitConfig, EvitOverrides, Preprocessing
from evit_deploy.model.vit import EViT, init_random_weights

CONTAINER_KEYS = ("model", "state_dict", "model_ema", "module")
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
LABELS_FILE = "labels.txt"  # class names beside a checkpoint, read automatically
SAFE_GLOBALS = [argparse.Namespace]  # plain data, allowed past weights_only loading


class CheckpointError(EvitDeployError):
    pass


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file; never executes pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"cannot read safetensors file {path} (truncated or corrupted?): {first_line(exc)}"
            ) from exc
    try:
        # Training checkpoints written by the official EViT/DeiT main.py also hold 'args', an
        # argparse.Namespace: allow that plain-data class (it cannot run code), nothing else.
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: weights_only loading rejected it ({_unpickling_reason(exc)})."
            f" It holds pickled objects other than tensors (possibly code, which is never run) or"
            f" is corrupted. Re-save it as a plain state dict or safetensors."
        ) from exc
    except Exception as exc:  # malformed bytes also raise KeyError, IndexError, struct.error...
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or corrupted?): {first_line(exc)}"
        ) from exc
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: object, source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside {'model': ...}, {'state_dict': ...} or a raw dict of tensors."""
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(
                f"{source} holds no state dict: expected tensors or one of the keys "
                f"{', '.join(CONTAINER_KEYS)}, found keys {sorted(map(str, obj))[:8]}"
            )
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} holds no state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def resample_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubically resize the patch part of a [1, 1 + g*g, C] pos_embed to another square grid."""
    old_patches = pos_embed.shape[1] - 1
    old_grid, new_grid = math.isqrt(old_patches), math.isqrt(num_patches)
    if old_grid**2 != old_patches or new_grid**2 != num_patches:
        raise CheckpointError(
            f"pos_embed has {pos_embed.shape[1]} tokens, not a class token plus a square grid"
        )
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(
        grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=False
    )
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, num_patches, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def load_into(model: EViT, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load strictly, first adapting pos_embed; one error names every bad key."""
    config = model.config
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[1] != config.num_patches + 1:
        state = {**state, "pos_embed": resample_pos_embed(pos, config.num_patches)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatch: {_some(mis_shaped)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {config.model}: " + "; ".join(problems)
            + ". Is --model the architecture this checkpoint was trained with?"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def build_model(
    config: EvitConfig,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    state: dict[str, torch.Tensor] | None = None,
    labels: str | Path | None = None,
) -> EViT:
    """An eval-mode EViT with checkpoint weights, or seeded random weights (with a warning).

    `state` is the checkpoint's state dict when the caller has read it already. The head's class
    count comes from the checkpoint, so fine-tuned heads load as they are. Class names come from
    `labels` (one name per line, in class-id order), else from a labels.txt beside the checkpoint;
    preprocessing from the checkpoint's own settings (checkpoint_settings).
    """
    if checkpoint is None:
        warnings.warn(
            "no checkpoint given: using seeded random weights. Predictions are meaningless; "
            "speed and export are representative.",
            stacklevel=2,
        )
        model = init_random_weights(EViT(config), seed).eval()
        model.classes = read_class_names(labels, config.num_classes) if labels else []
        return model
    if state is None:
        state = read_state_dict(checkpoint)
    head = state.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != config.num_classes:
        config = dataclasses.replace(config, num_classes=head.shape[0])
    model = EViT(config)
    load_into(model, state, checkpoint)
    model.checkpoint = str(Path(checkpoint).resolve())
    model.weights = f"sha256:{file_sha256(checkpoint)}"
    settings = checkpoint_settings(checkpoint)
    model.preprocessing = settings.get("preprocessing", model.preprocessing)
    beside = Path(checkpoint).with_name(LABELS_FILE)
    if labels is None and beside.is_file():
        labels = beside
    model.classes = read_class_names(labels, config.num_classes) if labels else []
    return model.eval()


def load_model(
    checkpoint: str | Path | None, evit: EvitOverrides = EvitOverrides(),
    labels: str | Path | None = None,
) -> EViT:
    """A checkpoint as the CLI loads it: the architecture read off the weights (unless
    `evit.model` names one), EViT settings from `evit` over EvitConfig's defaults."""
    config, state = checkpoint_config(checkpoint, evit)
    return build_model(config, checkpoint, state=state, labels=labels)


def checkpoint_settings(path: str | Path) -> dict:
    """What a safetensors checkpoint says about its model in its header metadata (the shipped
    model writes them; other files have none): {"preprocessing": Preprocessing} where given.
    Keys: mean, std (JSON lists), crop_pct (number), interpolation (name)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        header = handle.metadata() or {}
    fields = {k: header[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in header}
    if not fields:
        return {}
    try:
        values = {k: v if k == "interpolation" else json.loads(v) for k, v in fields.items()}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return {"preprocessing": Preprocessing(**values)}
    except (ValueError, TypeError, EvitDeployError) as exc:
        raise CheckpointError(f"{path} has invalid preprocessing settings in its metadata: {exc}") from None


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """Class names, one per line in class-id order (blank lines at the end ignored); their count
    must be the model's class count."""
    try:
        names = Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvitDeployError(f"cannot read class names from {path}: {exc}") from None
    names = [name.strip() for name in names]
    if len(names) != num_classes or not all(names):
        raise EvitDeployError(
            f"{path} gives {len(names)} class names ({sum(not n for n in names)} empty) for a "
            f"model with {num_classes} classes: one name per line, in class-id order"
        )
    return names
def checkpoint_config(
    checkpoint: str | Path | None, evit: EvitOverrides = EvitOverrides()
) -> tuple[EvitConfig, dict[str, torch.Tensor] | None]:
    """The configuration to build for a checkpoint, and its state dict (read once, for
    build_model): the architecture is read off the weights unless `evit.model` names one (a model
    that does not fit them fails when they are loaded). Without a checkpoint: `evit.model`, else
    the default architecture, for random weights."""
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    inferred = infer_model_name(state, checkpoint) if state is not None and evit.model is None else None
    if state is None:
        return evit.config(inferred), state
    trained = trained_settings(checkpoint, state, evit.config(inferred).arch.patch_size)
    return EvitOverrides(**{**trained, **evit.given()}).config(inferred), state


def trained_settings(path: str | Path, state: dict[str, torch.Tensor], patch_size: int) -> dict:
    """What the weights say they were trained with, as defaults for running them: the input size
    (pos_embed's grid: a 256 px model runs at 256 px) and, where an evit-deploy safetensors header
    records its recipe, the keep rate and drop blocks (a plain model trained at keep 1.0 runs plain)."""
    settings = {}
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:
            settings["img_size"] = side * patch_size
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            recipe = (handle.metadata() or {}).get("recipe")
        try:
            recipe = json.loads(recipe) if recipe else {}
            settings.update({k: recipe[k] for k in ("keep_rate", "drop_loc") if k in recipe})
            settings["drop_loc"] = tuple(settings.get("drop_loc", ())) or None
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} has an invalid recipe in its metadata: {exc}") from None
    return {k: v for k, v in settings.items() if v is not None}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def infer_model_name(state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> str:
    """The architecture whose width and depth match a state dict."""
    weight = state.get("patch_embed.proj.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for arch in ARCHS.values():
        if weight is not None and weight.shape[0] == arch.embed_dim and depth == arch.depth:
            return arch.name
    width = tuple(weight.shape) if weight is not None else "none"
    raise CheckpointError(
        f"{source} matches no known architecture (patch_embed.proj.weight {width}, {depth} "
        f"blocks); known: {', '.join(ARCHS)}"
    )


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _some(items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's weights_only message that names the culprit (a blocked GLOBAL or an
    unsupported opcode); torch's advice to retry with weights_only=False is left out."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    culprit = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return culprit[0] if culprit else first_line(exc)

