"""The plain ViT (keep_rate 1.0) that an EViT artifact is compared against, and the other keep
rates of a sweep, built from the same weights and cached (ONNX, INT8 ONNX, TensorRT engines), so
`bench` can show the speed-up without the user exporting them by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from evit_deploy.version import __version__
from evit_deploy.engines.header import read_engine_header
from evit_deploy.engines.tensorrt import build_engine, require_tensorrt_gpu
from evit_deploy.export.onnx import DEFAULT_OPSET, export_onnx
from evit_deploy.export.precision import ISLANDS
from evit_deploy.export.quantize import quantize_graph
from evit_deploy.fileio import cache_dir, write_bytes_atomic
from evit_deploy.metadata import ArtifactMetadata, load_onnx, onnx_metadata, stamp_metadata
from evit_deploy.model.checkpoint import build_model, file_sha256
from evit_deploy.model.config import Preprocessing
from evit_deploy.precisions import FP16, INT8

PLAIN_KEEP_RATE = 1.0


def baseline_onnx(metadata: ArtifactMetadata, opset: int = DEFAULT_OPSET) -> Path:
    """The keep_rate-1.0 ONNX with the weights `metadata` records (exported once, then reused)."""
    return cached_onnx(metadata, PLAIN_KEEP_RATE, opset)


def cached_onnx(metadata: ArtifactMetadata, keep_rate: float, opset: int = DEFAULT_OPSET) -> Path:
    """Export (once, then reuse) `metadata`'s model at `keep_rate` with the weights it records.

    Weights: the recorded checkpoint when it is still there with the same digest; random weights
    with the recorded seed otherwise (with a warning when a checkpoint was recorded: speed does
    not depend on the weight values, only the logits would).
    """
    config = dataclasses.replace(metadata.to_config(), keep_rate=keep_rate)
    checkpoint = _same_checkpoint(metadata)
    weights = metadata.weights if checkpoint else _random_weights(metadata)
    evit = [config.keep_rate, list(config.drop_loc), config.fuse_token] if config.is_evit else []
    key = json.dumps(
        [config.model, config.img_size, config.num_classes, *evit, weights, opset, __version__,
         metadata.classes, metadata.mean, metadata.std, metadata.crop_pct, metadata.interpolation]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder, variant = ("baselines", "plain")
    if config.is_evit:
        folder, variant = "evit", f"keep{config.keep_rate:g}"
    path = cache_dir() / folder / f"{config.model}_{config.img_size}px_{variant}_{digest}.onnx"
    if path.exists():
        return path
    seed = int(weights.split(":", 1)[1]) if weights.startswith("random:") else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are intended here: speed only
        model = build_model(config, checkpoint, seed=seed)
    # The same names and input transform as the source, however they were given to it.
    model.classes = list(metadata.classes)
    model.preprocessing = Preprocessing(
        tuple(metadata.mean), tuple(metadata.std), metadata.crop_pct, metadata.interpolation
    )
    export_onnx(model, path, opset=opset, force=True)
    return path


def _same_checkpoint(metadata: ArtifactMetadata) -> str | None:
    path = metadata.checkpoint
    if not path or not metadata.weights.startswith("sha256:"):
        return None
    if Path(path).is_file() and f"sha256:{file_sha256(path)}" == metadata.weights:
        return path
    warnings.warn(
        f"checkpoint {path} is gone or changed; the re-exports for timing use random weights "
        "(speed does not depend on weight values)",
        stacklevel=3,
    )
    return None


def _random_weights(metadata: ArtifactMetadata) -> str:
    return metadata.weights if metadata.weights.startswith("random:") else "random:0"


def quantized_baseline_onnx(metadata: ArtifactMetadata) -> Path:
    """The plain ViT quantized like an INT8 artifact (its recorded method; the same settings), for
    timing only: static ranges are calibrated on seeded noise, since the ranges' values do not
    change the speed. Cached beside the FP32 baselines."""
    method = metadata.quantization.get("method", "dynamic")
    plain = baseline_onnx(metadata)
    path = plain.with_name(f"{plain.stem}_int8_{method}.onnx")
    if path.exists():
        return path
    model = load_onnx(plain)
    size = metadata.img_size
    noise = np.random.default_rng(0).standard_normal((4, 3, size, size), dtype=np.float32)
    quantized, settings = quantize_graph(model, method, metadata, lambda: iter([noise]), [])
    timing_only = {"method": method, **settings, "calibration": "seeded noise (timing only)"}
    stamp_metadata(quantized, dataclasses.replace(onnx_metadata(model, plain), precision=INT8, quantization=timing_only))
    write_bytes_atomic(path, quantized.SerializeToString(), force=True)
    return path


def baseline_engine(engine_path: str | Path, device: str | None = None) -> Path:
    """The plain-ViT (keep_rate 1.0) engine of the same weights, built with the same settings as
    `engine_path`, cached next to the cached baseline ONNX and reused while TensorRT, the GPU and
    the settings stay the same."""
    header = read_engine_header(engine_path)
    trt, gpu = require_tensorrt_gpu(device, "the TensorRT baseline")
    onnx_path = baseline_onnx(header.metadata)
    settings = header.settings
    islands = tuple(kind for kind in header.fp32_islands if kind in ISLANDS)
    if header.precision == FP16 and islands:  # the engine's islands (from export, if it was FP16)
        settings = dataclasses.replace(settings, fp32_islands=islands)
    key = json.dumps([settings.to_dict(), trt.__version__, gpu.compute_capability, gpu.name])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = onnx_path.with_name(f"{onnx_path.stem}_{digest}.plan")
    if not target.exists():  # written atomically: an existing file is a complete engine
        build_engine(onnx_path, target, settings, force=True, device=device, require_layer_matches=False)
    return target
