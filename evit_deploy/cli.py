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


BACKEND_HELP = "auto (from the file suffix), onnxruntime, tensorrt or pytorch."


@command()
def predict(
    artifact: Path = typer.Argument(..., help=".onnx, .plan/.engine, or a .pth/.safetensors checkpoint."),
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...)."),
    topk: int = typer.Option(5, help="Classes to report per image."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: best available)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Classify images with any artifact (DeiT preprocessing, settings from the artifact)."""
    from evit_deploy.runtime import Predictor

    predictor = Predictor(artifact, backend=backend, device=device)
    predictions = predictor.predict([str(p) for p in images], topk=topk)
    if as_json:
        print(json.dumps([{"image": str(i), **p.to_dict()} for i, p in zip(images, predictions)], indent=2))
        return
    table = Table(title=f"{artifact.name} ({predictor.backend.name}, {predictor.backend.provider})")
    for column in ("image", "rank", "class", "label", "prob"):
        table.add_column(column, justify="right" if column in ("rank", "class", "prob") else "left")
    for image, prediction in zip(images, predictions):
        for rank, (cid, label, prob) in enumerate(zip(prediction.class_ids, prediction.labels, prediction.probs), 1):
            table.add_row(str(image) if rank == 1 else "", str(rank), str(cid), label, f"{prob:.4f}")
    console.print(table)


@command()
def bench(
    artifact: Path = typer.Argument(..., help=".onnx, .plan/.engine, or a .pth/.safetensors checkpoint."),
    batch: str = typer.Option("64", help="Batch size, or a list: 1,8,64."),
    warmup: int = typer.Option(3, help="Untimed runs per variant and batch size."),
    iters: Optional[int] = typer.Option(None, help="Timed runs per variant (default: --min-seconds)."),
    min_seconds: float = typer.Option(3.0, help="Time each variant at least this long (without --iters)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: best available)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (ONNX Runtime / PyTorch)."),
    baseline: bool = typer.Option(True, help="Also time the plain ViT (keep_rate 1.0) of the same weights."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    force: bool = typer.Option(False, help="Replace an existing --json file."),
) -> None:
    """Latency percentiles and throughput, EViT beside plain ViT, timed interleaved."""
    from evit_deploy.fileio import check_can_write, write_bytes_atomic
    from evit_deploy.runtime.bench import bench_artifact, parse_batches

    batches = parse_batches(batch)
    if json_path:
        check_can_write(json_path, force)
    options = {"threads": threads} if threads else {}
    with err_console.status(f"benchmarking {artifact.name} at batch {batch}"):
        report = bench_artifact(
            artifact, batches, backend, device, warmup, iters, min_seconds, baseline, **options
        )
    console.print(bench_table(report))
    for size, speedup in report.speedup.items():
        console.print(
            f"batch {size}: EViT is [bold]{speedup:.2f}x[/] the plain ViT's throughput "
            f"(FLOPs ratio {report.flops_ratio:.2f}x: {speedup / report.flops_ratio:.0%} of it)"
        )
    if json_path:
        write_bytes_atomic(json_path, json.dumps(report.to_dict(), indent=2).encode(), force)
        console.print(f"wrote {json_path}")


def bench_table(report) -> Table:
    first = report.runs[0]
    table = Table(
        title=f"{first.backend} ({first.provider}, {first.precision}) on {first.device}",
        caption="latency per batch in ms; throughput = batch / median latency",
    )
    columns = ("model", "keep", "batch", "mean", "p50", "p90", "p99", "img/s", "GMACs", "runs")
    for column in columns:
        if column == "model":
            table.add_column(column, no_wrap=True, min_width=10)
        else:
            table.add_column(column, justify="right")
    for run in report.runs:
        lat = run.latency_ms
        table.add_row(
            run.model.replace("_patch16_224", ""),
            f"{run.keep_rate:g}",
            str(run.batch),
            *(f"{lat[k]:.1f}" for k in ("mean", "p50", "p90", "p99")),
            f"{run.throughput_ips:.1f}",
            f"{run.gmacs:.2f}",
            str(run.iterations),
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
