"""The `evit-deploy` command line: parses options, calls the library, renders results.

User mistakes come back as EvitDeployError and are printed as one line (exit 2 for usage, 1 for
runtime failures); tracebacks only with --debug.
"""

from __future__ import annotations

import functools
import json
import signal
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from evit_deploy import __version__
from evit_deploy.errors import EvitDeployError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Export, validate, build and benchmark EViT token-pruned vision transformers.",
)
console = Console()
err_console = Console(stderr=True)
_debug = False


def _version(value: bool) -> None:
    if value:
        console.print(f"evit-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    global _debug
    _debug = debug


def command(*args, **kwargs):
    """app.command() that turns errors into one line on stderr and an exit code (no traceback
    unless --debug): EvitDeployError -> its exit code, Ctrl-C/kill -> 130, a bug -> 1."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*fn_args, **fn_kwargs):
            try:
                return fn(*fn_args, **fn_kwargs)
            except typer.Exit:
                raise
            except KeyboardInterrupt:
                err_console.print("interrupted: no partial output was left behind")
                raise typer.Exit(130) from None
            except EvitDeployError as exc:
                if _debug:
                    raise
                err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            except Exception as exc:
                if _debug:
                    raise
                err_console.print(
                    f"[red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug "
                    "for the traceback, and please report it)",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _model_config(model: str, keep_rate: float, drop_loc: str, fuse_token: bool, img_size: int):
    from evit_deploy.model.config import EvitConfig, parse_drop_loc

    return EvitConfig(model, keep_rate, parse_drop_loc(drop_loc), fuse_token, img_size)


@command()
def export(
    model: str = typer.Option("deit_small_patch16_224", help="Architecture (or official EViT name)."),
    checkpoint: Optional[Path] = typer.Option(
        None, help=".pth/.pt (official EViT or timm) or .safetensors; none: random weights."
    ),
    keep_rate: float = typer.Option(0.7, help="Fraction of image tokens kept in each drop block."),
    drop_loc: str = typer.Option("3,6,9", help="Blocks (from 0) that drop tokens."),
    fuse_token: bool = typer.Option(True, help="Fuse the dropped tokens into one extra token."),
    img_size: int = typer.Option(224, help="Input resolution; pos_embed is resampled to it."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17: single-node LayerNorm)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .onnx path."),
    force: bool = typer.Option(False, help="Replace an existing output file."),
    with_token_indices: bool = typer.Option(
        False, help="Also output each drop block's kept-token indices."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a checkpoint to ONNX (dynamic batch), validated against PyTorch before it is written."""
    from evit_deploy.export import export_onnx
    from evit_deploy.fileio import check_can_write
    from evit_deploy.model import build_model

    config = _model_config(model, keep_rate, drop_loc, fuse_token, img_size)
    output = output or Path(default_onnx_name(config))
    check_can_write(output, force)
    with err_console.status("loading model") as status:
        net = build_model(config, checkpoint)
        result = export_onnx(
            net,
            output,
            opset=opset,
            force=force,
            with_token_indices=with_token_indices,
            checkpoint=checkpoint.name if checkpoint else "",
            on_step=lambda step: status.update(step),
        )
    meta = result.metadata
    if as_json:
        print(
            json.dumps(
                {
                    "path": str(result.path),
                    "size_bytes": result.size_bytes,
                    "opset": result.opset,
                    "metadata": meta.to_props() | {"tokens_per_block": meta.tokens_per_block},
                    "validation": result.report.to_dict(),
                },
                indent=2,
            )
        )
        return
    console.print(validation_table(result.report))
    console.print(f"[bold green]exported[/] {result.path} ({result.size_bytes / 2**20:.1f} MiB, opset {result.opset})")
    console.print(f"model           {meta.model}, keep_rate {meta.keep_rate}, drop_loc {meta.drop_loc}, fuse_token {meta.fuse_token}")
    console.print(f"TopK K          {meta.topk_k or 'none (plain ViT)'}")
    console.print(f"tokens/block    {meta.tokens_per_block}")
    console.print(f"next            evit-deploy bench {result.path} --batch 64")


def default_onnx_name(config) -> str:
    suffix = f"_keep{config.keep_rate:g}" if config.is_evit else ""
    size = f"_{config.img_size}px" if config.img_size != 224 else ""
    return f"{config.model}{suffix}{size}.onnx"


def validation_table(report) -> Table:
    table = Table(title="Validation: ONNX Runtime vs PyTorch")
    for column in ("inputs", "batch", "max |diff|", "tolerance", "top-1", "kept tokens", "result"):
        table.add_column(column, justify="left" if column == "inputs" else "right")
    for case in report.cases:
        kept = f"{case.kept_agreement:.0%}"
        if case.near_ties:
            kept += f" ({case.near_ties} near-tie)"
        table.add_row(
            case.name,
            str(case.batch),
            f"{case.max_abs_diff:.2e}",
            f"{case.tolerance:.2e}",
            f"{case.top1_agreement:.0%}",
            kept,
            "[green]pass[/]" if case.passed else "[red]FAIL[/]",
        )
    return table


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _interrupt)  # kill -> the same clean-up as Ctrl-C
    warnings.showwarning = _show_warning
    app()


if __name__ == "__main__":
    main()
