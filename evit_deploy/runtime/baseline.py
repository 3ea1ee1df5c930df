"""The plain ViT (keep_rate 1.0) that an EViT artifact is compared against, built from the same
weights and cached, so `bench` can show the speed-up without the user exporting it by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

from evit_deploy import __version__
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.model.checkpoint import build_model, file_sha256

PLAIN_KEEP_RATE = 1.0


def cache_dir() -> Path:
    """$EVIT_DEPLOY_CACHE, else ~/.cache/evit-deploy (XDG_CACHE_HOME respected)."""
    root = os.environ.get("EVIT_DEPLOY_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "evit-deploy"


def baseline_onnx(metadata: ArtifactMetadata, opset: int = 17) -> Path:
    """Export (once, then reuse) the keep_rate-1.0 ONNX with the weights `metadata` records.

    Weights: the recorded checkpoint when it is still there with the same digest; random weights
    with the recorded seed otherwise (with a warning when a checkpoint was recorded: speed does
    not depend on the weight values, only the logits would).
    """
    from evit_deploy.export.onnx import export_onnx

    config = dataclasses.replace(metadata.to_config(), keep_rate=PLAIN_KEEP_RATE)
    checkpoint = _same_checkpoint(metadata)
    weights = metadata.weights if checkpoint else _random_weights(metadata)
    key = json.dumps(
        [config.model, config.img_size, config.num_classes, weights, opset, __version__]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "baselines" / f"{config.model}_{config.img_size}px_plain_{digest}.onnx"
    if path.exists():
        return path
    seed = int(weights.split(":", 1)[1]) if weights.startswith("random:") else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random baseline weights are intended here
        model = build_model(config, checkpoint, seed=seed)
    export_onnx(model, path, opset=opset, force=True)
    return path


def _same_checkpoint(metadata: ArtifactMetadata) -> str | None:
    path = metadata.checkpoint
    if not path or not metadata.weights.startswith("sha256:"):
        return None
    if Path(path).is_file() and f"sha256:{file_sha256(path)}" == metadata.weights:
        return path
    warnings.warn(
        f"baseline: checkpoint {path} is gone or changed; the plain ViT is timed with random "
        "weights (speed does not depend on weight values)",
        stacklevel=3,
    )
    return None


def _random_weights(metadata: ArtifactMetadata) -> str:
    return metadata.weights if metadata.weights.startswith("random:") else "random:0"
