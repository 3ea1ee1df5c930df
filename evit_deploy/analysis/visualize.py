"""Which image patches EViT keeps, drawn in the style of the paper's figure.

One PNG per image: the crop the model sees, then one panel per drop block. A patch is shown as it
is while its token is alive. Patches dropped in that block are shaded when their content is
fused into the fused token, masked out when it is discarded (no fusion); patches dropped in an
earlier block are masked out. Only which patches are kept matters, not their order, so PyTorch
and ONNX give the same picture for the same input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.fileio import atomic_output, check_can_write
from evit_deploy.model.config import EvitConfig, EvitOverrides, keep_text
from evit_deploy.model.vit import kept_patch_ids
from evit_deploy.preprocess import load_image, preprocess, resize_and_crop
from evit_deploy.runtime.backends import backend_for, load_backend
from evit_deploy.runtime.base import Backend

ALIVE, FUSED, MASKED = 0, 1, 2
MASK_COLOR = (224, 224, 224)
SHADE_COLOR = (255, 176, 32)
SHADE_ALPHA = 0.6  # weight of SHADE_COLOR in a fused patch
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (32, 32, 32)
PANEL_GAP = 6
CAPTION_HEIGHT = 22
FONT_SIZE = 13


def load_token_source(path: str | Path, evit: EvitOverrides | None = None) -> Backend:
    """A checkpoint (PyTorch, with `evit`'s settings) or an ONNX exported with kept-token outputs,
    on the CPU in fp32 so every source sees the same arithmetic."""
    path = Path(path)
    kind = backend_for(path, "auto")
    if kind not in ("pytorch", "onnxruntime"):
        raise UsageError(
            f"visualize reads kept tokens from a checkpoint or an ONNX file, not a {kind} engine "
            f"({path.name}); give the checkpoint or ONNX it was built from"
        )
    source = load_backend(path, "auto", "cpu", evit)
    meta = source.metadata
    if not meta.topk_k:
        raise UsageError(
            f"{path.name} drops no tokens (keep rate {keep_text(meta.keep_rate)}): nothing to show"
        )
    if kind == "onnxruntime" and not meta.token_index_outputs:
        raise EvitDeployError(
            f"{path} has no kept-token outputs; re-export it with "
            "`evit-deploy export --with-token-indices`"
        )
    return source


def kept_token_indices(source: Backend, batch: np.ndarray) -> list[np.ndarray]:
    """Each drop block's TopK indices ([B, K], positions in that block's image tokens)."""
    if source.name == "pytorch":
        import torch

        with torch.inference_mode():
            _, indices = source.model(source.prepare(batch), return_token_indices=True)
        return [idx.cpu().numpy() for idx in indices]
    meta = source.metadata
    return source.session.run(meta.token_index_outputs, {meta.input_name: batch})


def patch_states(kept_ids: Sequence[np.ndarray], num_patches: int, fuse_token: bool) -> np.ndarray:
    """[drops, num_patches] of ALIVE / FUSED / MASKED for one image, from the original patch ids
    each drop block kept (kept_patch_ids; ids >= num_patches are fused tokens)."""
    states = np.full((len(kept_ids), num_patches), MASKED, dtype=np.uint8)
    alive = np.ones(num_patches, dtype=bool)
    for j, ids in enumerate(kept_ids):
        still_alive = np.zeros(num_patches, dtype=bool)
        still_alive[ids[ids < num_patches]] = True
        if (still_alive & ~alive).any():
            raise EvitDeployError(
                f"drop {j} keeps a patch an earlier drop removed (corrupt indices?)"
            )
        states[j, still_alive] = ALIVE
        if fuse_token:
            states[j, alive & ~still_alive] = FUSED
        alive = still_alive
    return states


def shade(pixels: np.ndarray) -> np.ndarray:
    """How a fused patch's pixels are drawn: blended towards SHADE_COLOR."""
    blended = (1 - SHADE_ALPHA) * pixels.astype(np.float32) + SHADE_ALPHA * np.float32(SHADE_COLOR)
    return blended.round().astype(np.uint8)


def panel_origin(index: int, img_size: int) -> tuple[int, int]:
    """Top-left pixel of panel `index` (0: the input) in a figure."""
    return index * (img_size + PANEL_GAP), 0


def figure_size(panels: int, img_size: int) -> tuple[int, int]:
    return panels * img_size + (panels - 1) * PANEL_GAP, img_size + CAPTION_HEIGHT


def draw_panel(crop: np.ndarray, states: np.ndarray, patch_size: int) -> np.ndarray:
    grid = crop.shape[0] // patch_size
    per_pixel = np.kron(states.reshape(grid, grid), np.ones((patch_size, patch_size), np.uint8))
    panel = crop.copy()
    panel[per_pixel == MASKED] = MASK_COLOR
    fused = per_pixel == FUSED
    panel[fused] = shade(crop[fused])
    return panel


def render_figure(
    crop: np.ndarray, states: np.ndarray, patch_size: int, captions: Sequence[str]
) -> Image.Image:
    """The input crop and one panel per row of `states`, side by side, each captioned."""
    size = crop.shape[0]
    panels = [crop, *(draw_panel(crop, row, patch_size) for row in states)]
    figure = Image.new("RGB", figure_size(len(panels), size), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(FONT_SIZE)
    for i, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
        x, y = panel_origin(i, size)
        figure.paste(Image.fromarray(panel), (x, y))
        draw.text(
            (x + size / 2, y + size + CAPTION_HEIGHT / 2),
            caption,
            fill=TEXT_COLOR,
            font=font,
            anchor="mm",
        )
    return figure


def captions(config: EvitConfig) -> list[str]:
    plan = config.token_plan
    return [
        f"input: {config.num_patches} patches",
        *(f"block {b.block}: {b.keep} of {b.tokens_in} kept" for b in plan if b.keep is not None),
    ]


def token_figure(source: Backend, image) -> Image.Image:
    """The figure for one image (a path, PIL image or HWC uint8 array)."""
    meta = source.metadata
    picture = load_image(image)
    crop = np.asarray(resize_and_crop(picture, meta.img_size, meta.crop_pct, meta.interpolation))
    batch = preprocess(
        [picture], meta.img_size, meta.mean, meta.std, meta.crop_pct, meta.interpolation
    )
    config = meta.to_config()
    kept = kept_patch_ids(kept_token_indices(source, batch), config.num_patches, config.fuse_token)
    states = patch_states([ids[0] for ids in kept], config.num_patches, config.fuse_token)
    return render_figure(crop, states, config.arch.patch_size, captions(config))


def figure_paths(images: Sequence[Path], output: Path, force: bool) -> list[Path]:
    """Where each image's figure goes: `output` itself when it is a .png (one image), else
    output/<image name>_tokens.png. Refuses before any work if an image is missing or a figure
    exists (without force)."""
    missing = [str(image) for image in images if not Path(image).is_file()]
    if missing:
        raise EvitDeployError(f"image not found: {', '.join(missing)}")
    if output.suffix.lower() == ".png":
        if len(images) != 1:
            raise UsageError(
                f"--output {output} names one file, but {len(images)} images were given; "
                "give a folder"
            )
        paths = [output]
    else:
        paths = [output / f"{Path(image).stem}_tokens.png" for image in images]
    seen = set()
    for image, path in zip(images, paths):
        if path in seen:
            raise UsageError(f"two images would both be drawn to {path}; rename one ({image})")
        seen.add(path)
        check_can_write(path, force)
    return paths


def write_figures(
    source: Backend, images: Sequence[Path], paths: Sequence[Path], force: bool = False
) -> list[Path]:
    for image, path in zip(images, paths, strict=True):
        figure = token_figure(source, image)
        with atomic_output(path, force) as tmp:
            figure.save(tmp, format="PNG", optimize=True)
    return list(paths)
