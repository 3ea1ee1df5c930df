"""Options that mean the same on several commands, declared once.

Two option groups (like Polygraphy's argument groups): the EViT settings of a checkpoint and the
outputs (--json, --json-out, --force). A group's decorator adds its options to a command's
signature and hands the command one typed value instead: `evit` (EvitOverrides) or `out` (Output).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from evit_deploy.cli.app import console
from evit_deploy.fileio import check_can_write, write_bytes_atomic
from evit_deploy.model.config import EvitConfig, EvitOverrides, keep_text, parse_drop_loc


def option_group(options: dict[str, tuple[type, object]], build: Callable, name: str):
    """A decorator factory: `only` picks some of the group's options (all by default)."""

    def group(only: Sequence[str] | None = None):
        chosen = {key: options[key] for key in (only or options)}

        def decorate(fn):
            signature = inspect.signature(fn)
            kept = [p for p in signature.parameters.values() if p.name != name]
            added = [
                inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                for key, (kind, option) in chosen.items()
            ]

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                kwargs[name] = build(**{key: kwargs.pop(key) for key in chosen})
                return fn(*args, **kwargs)

            wrapper.__signature__ = signature.replace(parameters=[*kept, *added])
            wrapper.__annotations__ = {
                **{k: v for k, v in fn.__annotations__.items() if k != name},
                **{key: kind for key, (kind, _) in chosen.items()},
            }
            return wrapper

        return decorate

    return group


def _evit_overrides(
    model: str | None = None,
    keep_rate: float | None = None,
    drop_loc: str | None = None,
    fuse_token: bool | None = None,
    img_size: int | None = None,
) -> EvitOverrides:
    drops = parse_drop_loc(drop_loc) if drop_loc is not None else None
    return EvitOverrides(model, keep_rate, drops, fuse_token, img_size)


# A checkpoint's EViT settings. An exported model carries its own: giving one for it is refused
# (load_backend).
evit_options = option_group(
    {
        "model": (Optional[str], typer.Option(
            None, "--model", metavar="NAME",
            help=f"Architecture or official EViT name (default: read off the checkpoint's weights; {EvitConfig.model} for random weights).",
        )),
        "keep_rate": (Optional[float], typer.Option(
            None, "--keep-rate", metavar="RATE",
            help=f"Fraction of image tokens each drop block keeps (default {EvitConfig.keep_rate}).",
        )),
        "drop_loc": (Optional[str], typer.Option(
            None, "--drop-loc", metavar="BLOCKS",
            help=f"Blocks (from 0) that drop tokens (default {','.join(map(str, EvitConfig.drop_loc))}).",
        )),
        "fuse_token": (Optional[bool], typer.Option(
            None, "--fuse-token/--no-fuse-token",
            help="Fuse the dropped tokens into one extra token (default: fuse).",
        )),
        "img_size": (Optional[int], typer.Option(
            None, "--img-size", metavar="PX",
            help=f"Input resolution; pos_embed is resampled to it (default {EvitConfig.img_size}).",
        )),
    },
    _evit_overrides,
    "evit",
)


@dataclass(frozen=True)
class Output:
    """Where a command's result goes: the tables, or JSON on stdout (--json), and also a JSON
    file (--json-out; atomically, an existing file only with --force)."""

    as_json: bool = False
    json_out: Path | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.json_out is not None:  # refused before any work is done
            check_can_write(self.json_out, self.force)

    def emit(self, data) -> None:
        text = json.dumps(data, indent=2)
        if self.json_out is not None:
            write_bytes_atomic(self.json_out, (text + "\n").encode(), self.force)
            if not self.as_json:
                console.print(f"wrote {escape(str(self.json_out))}", highlight=False)
        if self.as_json:
            print(text)


output_options = option_group(
    {
        "as_json": (bool, typer.Option(False, "--json", help="Print the result as JSON on stdout instead of the tables.")),
        "json_out": (Optional[Path], typer.Option(None, "--json-out", metavar="PATH", help="Also write the result as JSON to PATH.")),
        "force": (bool, typer.Option(False, "--force", help="Replace existing output files.")),
    },
    Output,
    "out",
)

FORCE = typer.Option(False, "--force", help="Replace existing output files.")
BACKEND = typer.Option("auto", metavar="NAME", help="auto (from the file suffix), onnxruntime, openvino, tensorrt or pytorch.")
DEVICE = typer.Option(None, metavar="DEVICE", help="cpu, cuda or cuda:N (default: best available).")
PRECISION = typer.Option(
    None, "--precision", metavar="PRECISION",
    help="OpenVINO: fp32 (default) or bf16 (needs AVX-512 BF16 or AMX; the TopK score path stays FP32).",
)
TOPK_SCORES = typer.Option(
    True, "--fp32-topk-scores/--bf16-topk-scores", help="OpenVINO bf16: keep the scores TopK ranks in FP32."
)


def precision_options(precision: str | None, fp32_topk_scores: bool = True) -> dict:
    """Backend options for --precision / --bf16-topk-scores (only what was asked for)."""
    options = {"precision": precision} if precision else {}
    if not fp32_topk_scores:
        options["fp32_topk_scores"] = False
    return options


def precision_text(meta) -> str:
    """What an exported file computes in: int8 (static quantization), fp16 (FP32 islands: ...)."""
    if meta.quantization:
        return f"{meta.precision} ({meta.quantization.get('method', 'unknown')} quantization)"
    if meta.fp32_islands:
        return f"{meta.precision} (FP32 islands: {', '.join(meta.fp32_islands)})"
    return meta.precision


def settings_text(meta) -> str:
    """An artifact's (or EvitConfig's) EViT settings in one line, the keep rate in use first."""
    if meta.keep_rate >= 1:  # drop blocks and fusion do nothing: do not suggest they do
        return f"{meta.model}, keep rate 1.0 (no token dropped), {meta.img_size} px"
    fusion = "fused token" if meta.fuse_token else "no fused token"
    blocks = ",".join(map(str, meta.drop_loc)) or "none"
    return f"{meta.model}, keep rate {keep_text(meta.keep_rate)}, drop blocks {blocks}, {fusion}, {meta.img_size} px"
