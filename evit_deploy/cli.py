"""The `evit-deploy` command line: parses options, calls the library, renders results.

User mistakes come back as EvitDeployError and are printed as one line (exit 2 for usage, 1 for
runtime failures); tracebacks only with --debug.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evit_deploy import __version__
from evit_deploy.errors import EvitDeployError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Export, validate, build and benchmark EViT token-pruned vision transformers.",
)
# Piped output (CI logs, files) gets room for the tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 120)
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
                return _memory_error_as_user_error(fn, *fn_args, **fn_kwargs)
            except typer.Exit:
                raise
            except KeyboardInterrupt:
                err_console.print("interrupted: no partial output was left behind")
                raise typer.Exit(130) from None
            except EvitDeployError as exc:
                if _debug:
                    raise
                err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            except Exception as exc:
                if _debug:
                    raise
                err_console.print(
                    f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug "
                    "for the traceback, and please report it)",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _memory_error_as_user_error(fn, *args, **kwargs):
    """Running out of memory means a batch or input too big for this machine: the user's to fix."""
    try:
        return fn(*args, **kwargs)
    except _out_of_memory_errors() as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        raise EvitDeployError(
            f"out of memory ({reason}); use a smaller batch or input size"
        ) from exc


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """MemoryError, and CUDA's out-of-memory error where torch is loaded (not imported for it)."""
    torch = sys.modules.get("torch")
    return (MemoryError, torch.OutOfMemoryError) if torch else (MemoryError,)


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
    from evit_deploy.export.onnx import check_opset
    from evit_deploy.fileio import check_can_write
    from evit_deploy.model import build_model

    config = _model_config(model, keep_rate, drop_loc, fuse_token, img_size)
    check_opset(opset)
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
    summary = [
        f"[bold green]exported[/] {escape(str(result.path))} ({result.size_bytes / 2**20:.1f} MiB, opset {result.opset})",
        f"model           {meta.model}, keep_rate {meta.keep_rate}, drop_loc {meta.drop_loc}, fuse_token {meta.fuse_token}",
        f"TopK K          {meta.topk_k or 'none (plain ViT)'}",
        f"tokens/block    {meta.tokens_per_block}",
        f"next            evit-deploy bench {escape(str(result.path))} --batch 64",
    ]
    for line in summary:
        console.print(line, soft_wrap=True, highlight=False)


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
    title = f"{artifact.name} ({predictor.backend.name}, {predictor.backend.provider})"
    console.print(predictions_table(title, images, [p.to_dict() for p in predictions]))


def predictions_table(title: str, images: list[Path], predictions: list[dict]) -> Table:
    """Top-k rows per image from {class_ids, labels, probs} dicts."""
    table = Table(title=title)
    for column in ("image", "rank", "class", "label", "prob"):
        table.add_column(column, justify="right" if column in ("rank", "class", "prob") else "left")
    for image, result in zip(images, predictions):
        rows = zip(result["class_ids"], result["labels"], result["probs"])
        for rank, (cid, label, prob) in enumerate(rows, 1):
            table.add_row(str(image) if rank == 1 else "", str(rank), str(cid), label, f"{prob:.4f}")
    return table


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
    keep_rates: Optional[str] = typer.Option(None, help="Sweep: time these keep rates instead (re-exported, cached), e.g. 0.5,0.7,1.0."),
    plot: Optional[Path] = typer.Option(None, help="Sweep: plot throughput, GMACs (and accuracy) against keep rate to this PNG."),
    eval_dir: Optional[Path] = typer.Option(None, help="Sweep: also measure accuracy on this image folder (as for eval)."),
) -> None:
    """Latency percentiles and throughput, EViT beside plain ViT, timed interleaved."""
    from evit_deploy.errors import UsageError
    from evit_deploy.fileio import check_can_write, write_bytes_atomic
    from evit_deploy.runtime.bench import bench_artifact, parse_batches

    batches = parse_batches(batch)
    if json_path:
        check_can_write(json_path, force)
    options = {"threads": threads} if threads else {}
    if keep_rates is not None:
        sweep_args = (warmup, iters, min_seconds, options, json_path, plot, eval_dir, force)
        return _bench_sweep(artifact, keep_rates, batches, backend, device, *sweep_args)
    if plot or eval_dir:
        raise UsageError("--plot and --eval-dir go with --keep-rates")
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
            *(f"{lat[k]:.1f}" if lat[k] < 1000 else f"{lat[k]:.0f}" for k in ("mean", "p50", "p90", "p99")),
            f"{run.throughput_ips:.1f}",
            f"{run.gmacs:.2f}",
            str(run.iterations),
        )
    return table


CHECKPOINT_MODEL = typer.Option(None, "--model", help="Checkpoints only: architecture (default: read off the weights).")
CHECKPOINT_KEEP_RATE = typer.Option(None, "--keep-rate", help="Checkpoints only: keep rate (default 0.7).")
CHECKPOINT_DROP_LOC = typer.Option(None, "--drop-loc", help="Checkpoints only: drop blocks (default 3,6,9).")
CHECKPOINT_FUSE_TOKEN = typer.Option(None, "--fuse-token/--no-fuse-token", help="Checkpoints only (default: fuse).")
CHECKPOINT_IMG_SIZE = typer.Option(None, "--img-size", help="Checkpoints only: input size (default 224).")


def _checkpoint_options(artifact: Path, backend: str, **given) -> dict:
    """The EViT settings given for a checkpoint; an exported artifact carries its own, so any
    setting given for one is refused rather than silently ignored."""
    from evit_deploy.errors import UsageError
    from evit_deploy.model.config import parse_drop_loc
    from evit_deploy.runtime.backends import backend_for

    options = {k: v for k, v in given.items() if v is not None}
    if "drop_loc" in options:
        options["drop_loc"] = parse_drop_loc(options["drop_loc"])
    if options and backend_for(artifact, backend) != "pytorch":
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise UsageError(f"settings ({flags}) are for checkpoints; {artifact.name} carries its own")
    return options


@command()
def visualize(
    artifact: Path = typer.Argument(..., help="A checkpoint, or an ONNX exported with --with-token-indices."),
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...)."),
    output: Path = typer.Option(Path("."), "--output", "-o", help="Folder for <image>_tokens.png, or a .png path for one image."),
    force: bool = typer.Option(False, help="Replace existing pictures."),
    model: Optional[str] = CHECKPOINT_MODEL,
    keep_rate: Optional[float] = CHECKPOINT_KEEP_RATE,
    drop_loc: Optional[str] = CHECKPOINT_DROP_LOC,
    fuse_token: Optional[bool] = CHECKPOINT_FUSE_TOKEN,
    img_size: Optional[int] = CHECKPOINT_IMG_SIZE,
) -> None:
    """Draw the patches every drop block keeps, one PNG per image (the paper's figure).

    Dropped patches are masked out; patches fused in that block are shaded."""
    from evit_deploy.analysis.visualize import figure_paths, load_token_source, write_figures

    options = _checkpoint_options(
        artifact, "auto", model=model, keep_rate=keep_rate, drop_loc=drop_loc,
        fuse_token=fuse_token, img_size=img_size,
    )
    paths = figure_paths(images, output, force)
    with err_console.status(f"loading {artifact.name}"):
        source = load_token_source(artifact, **options)
    with err_console.status("drawing"):
        for path in write_figures(source, images, paths, force):
            console.print(f"wrote {path}")


@command(name="eval")
def evaluate_accuracy(
    artifact: Path = typer.Argument(..., help=".onnx, .plan/.engine, or a .pth/.safetensors checkpoint."),
    data_dir: Path = typer.Argument(..., help="ImageNet-val-style folder: DATA_DIR/<wnid>/<images>."),
    batch: int = typer.Option(64, help="Images per backend call."),
    limit: Optional[int] = typer.Option(None, help="Evaluate N images spread evenly over the folder."),
    labels: Optional[Path] = typer.Option(None, help="File of 'image-or-folder class' lines (index or wnid)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: best available)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    force: bool = typer.Option(False, help="Replace an existing --json file."),
    model: Optional[str] = CHECKPOINT_MODEL,
    keep_rate: Optional[float] = CHECKPOINT_KEEP_RATE,
    drop_loc: Optional[str] = CHECKPOINT_DROP_LOC,
    fuse_token: Optional[bool] = CHECKPOINT_FUSE_TOKEN,
    img_size: Optional[int] = CHECKPOINT_IMG_SIZE,
) -> None:
    """Top-1 / top-5 accuracy on an image folder, with any backend."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from evit_deploy.analysis.evaluate import evaluate, find_samples, spread_subset
    from evit_deploy.fileio import check_can_write, write_bytes_atomic
    from evit_deploy.runtime import Predictor

    options = _checkpoint_options(
        artifact, backend, model=model, keep_rate=keep_rate, drop_loc=drop_loc,
        fuse_token=fuse_token, img_size=img_size,
    )
    if json_path:
        check_can_write(json_path, force)
    with err_console.status(f"loading {artifact.name}"):
        predictor = Predictor(artifact, backend=backend, device=device, **options)
    samples = spread_subset(find_samples(data_dir, predictor.metadata.num_classes, labels), limit)
    if predictor.metadata.weights.startswith("random:"):
        warnings.warn(f"{artifact.name} has random weights: its accuracy is meaningless")
    columns = (
        TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("eval", total=len(samples), rate="-")
        start = time.perf_counter()

        def advance(done: int) -> None:
            rate = done / (time.perf_counter() - start)
            progress.update(task, completed=done, rate=f"{rate:.1f}")

        result = evaluate(predictor, samples, batch, on_batch=advance)
    info = predictor.backend.describe()
    table = Table(
        title=f"{artifact.name} on {data_dir}",
        caption=f"{info['backend']} ({info['provider']}, {info['precision']}) on {info['device']}",
    )
    for column in ("images", "top-1", "top-5", "img/s", "model img/s"):
        table.add_column(column, justify="right")
    table.add_row(
        str(result.images), f"{result.top1:.2%}", f"{result.top5:.2%}",
        f"{result.images_per_s:.1f}", f"{result.model_images_per_s:.1f}",
    )
    console.print(table)
    if json_path:
        record = {"artifact": str(artifact), "data_dir": str(data_dir), **result.to_dict()}
        write_bytes_atomic(json_path, json.dumps(record, indent=2).encode(), force)
        console.print(f"wrote {json_path}")


@command()
def info(
    target: str = typer.Argument(..., metavar="ARTIFACT_OR_MODEL", help="A model name, a checkpoint or an exported .onnx."),
    keep_rate: Optional[float] = typer.Option(None, help="Keep rate (default: the artifact's, else 0.7)."),
    drop_loc: Optional[str] = typer.Option(None, help="Drop blocks (default: the artifact's, else 3,6,9)."),
    fuse_token: Optional[bool] = typer.Option(None, "--fuse-token/--no-fuse-token", help="Fuse dropped tokens (default: the artifact's, else yes)."),
    img_size: Optional[int] = typer.Option(None, help="Input size (default: the artifact's, else 224)."),
    as_json: bool = typer.Option(False, "--json", help="Print {params, gmacs, tokens_per_block, ...} as JSON."),
) -> None:
    """Parameters, tokens entering each block and GMACs counted with those token counts."""
    from evit_deploy.analysis.planning import model_cost, resolve_config
    from evit_deploy.model.config import parse_drop_loc

    config = resolve_config(
        target, keep_rate, parse_drop_loc(drop_loc) if drop_loc is not None else None,
        fuse_token, img_size,
    )
    cost = model_cost(config)
    if as_json:
        print(json.dumps(cost.to_dict(), indent=2))
        return
    paper = f"; paper {cost.published_gmacs:.1f}" if cost.published_gmacs is not None else ""
    fusion = "fused token" if config.fuse_token else "no fused token"
    console.print(
        f"[bold]{config.model}[/], keep rate {config.keep_rate:g}, drop blocks "
        f"{','.join(map(str, config.drop_loc)) or 'none'}, {fusion}, {config.img_size} px"
    )
    console.print(f"params          {cost.params / 1e6:.2f} M")
    console.print(f"GMACs           [bold]{cost.gmacs:.1f}[/] ({cost.gmacs:.3f}{paper})")
    console.print(f"image tokens    {' -> '.join(map(str, cost.tokens_after_drops))}")
    table = Table(caption="tokens: image tokens (fused included, class excluded); MMACs per image")
    for column in ("block", "tokens in", "kept (K)", "tokens out", "attention MMACs", "MLP MMACs"):
        table.add_column(column, justify="right")
    for plan, macs in zip(config.token_plan, cost.blocks):
        table.add_row(
            str(plan.block), str(plan.tokens_in), "-" if plan.keep is None else str(plan.keep),
            str(plan.tokens_out), f"{macs.attention / 1e6:.1f}", f"{macs.mlp / 1e6:.1f}",
        )
    console.print(table)


@command()
def plan(
    budget_gmacs: float = typer.Option(..., help="GMACs per image to stay within (DeiT-S at 224: 4.6)."),
    model: str = typer.Option("deit_small_patch16_224", help="Architecture (or official EViT name)."),
    img_sizes: Optional[str] = typer.Option(None, help="Sizes to try (default 224,240,...,384)."),
    keep_rates: Optional[str] = typer.Option(None, help="Keep rates to try (default 0.40,0.45,...,1.00)."),
    drop_loc: str = typer.Option("3,6,9", help="Blocks (from 0) that drop tokens."),
    fuse_token: bool = typer.Option(True, help="Fuse the dropped tokens into one extra token."),
    as_json: bool = typer.Option(False, "--json", help="Print the options as JSON."),
) -> None:
    """More tokens at the same cost: per input size, the highest keep rate that fits a budget."""
    from evit_deploy.analysis.planning import (
        DEFAULT_PLAN_KEEP_RATES, DEFAULT_PLAN_SIZES, fit_budget, parse_numbers,
    )
    from evit_deploy.model.config import parse_drop_loc

    sizes = parse_numbers(img_sizes, int, "--img-sizes") if img_sizes else DEFAULT_PLAN_SIZES
    rates = parse_numbers(keep_rates, float, "--keep-rates") if keep_rates else DEFAULT_PLAN_KEEP_RATES
    fits = fit_budget(model, budget_gmacs, sizes, rates, parse_drop_loc(drop_loc), fuse_token)
    if as_json:
        print(json.dumps([cost.to_dict() for cost in fits], indent=2))
        return
    table = Table(title=f"{fits[0].config.model} within {budget_gmacs:g} GMACs per image")
    for column in ("img size", "keep rate", "image tokens after each drop", "GMACs", "of budget"):
        table.add_column(column, justify="left" if column.startswith("image") else "right")
    for cost in fits:
        table.add_row(
            str(cost.config.img_size), f"{cost.config.keep_rate:.2f}",
            " -> ".join(map(str, cost.tokens_after_drops)), f"{cost.gmacs:.2f}",
            f"{cost.gmacs / budget_gmacs:.0%}",
        )
    console.print(table)
    console.print(
        "Sizes other than the checkpoint's resample its pos_embed; the paper fine-tunes at the "
        "new size."
    )


@command(name="build-engine")
def build_engine_command(
    model: Path = typer.Argument(..., metavar="MODEL.onnx", help="An ONNX exported with `evit-deploy export`."),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="FP16 where the GPU has fast FP16 (TopK scores stay FP32), or FP32 throughout (TF32 off)."),
    min_batch: int = typer.Option(1, help="Smallest batch the engine accepts."),
    opt_batch: int = typer.Option(64, help="Batch size the kernels are tuned for."),
    max_batch: int = typer.Option(128, help="Largest batch the engine accepts (the Predictor splits larger ones)."),
    workspace: Optional[float] = typer.Option(None, metavar="GB", help="TensorRT workspace limit in GB (default: the GPU's memory)."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, reused and updated (default: one per TensorRT version and GPU in the evit-deploy cache)."),
    fp32_layers: Optional[list[str]] = typer.Option(None, "--fp32-layers", metavar="PATTERN", help="Also keep layers in FP32 whose name contains this text (or matches this glob); repeatable."),
    fp32_topk_scores: bool = typer.Option(True, "--fp32-topk-scores/--fp16-topk-scores", help="Keep the class-attention scores that TopK ranks in FP32."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Engine path (default: MODEL.fp16.plan or MODEL.fp32.plan)."),
    force: bool = typer.Option(False, help="Replace an existing engine."),
    device: Optional[str] = typer.Option(None, help="cuda or cuda:N (default: the current GPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build a TensorRT engine (dynamic batch, FP16 by default) carrying the model's metadata."""
    from evit_deploy.engines.settings import BatchProfile, BuildSettings
    from evit_deploy.engines.tensorrt import build_engine

    settings = BuildSettings(
        precision="fp16" if fp16 else "fp32",
        profile=BatchProfile(min_batch, opt_batch, max_batch),
        workspace_gb=workspace,
        fp32_layers=tuple(fp32_layers or ()),
        fp32_topk_scores=fp32_topk_scores,
        timing_cache=str(timing_cache) if timing_cache else "",
    )
    with err_console.status(f"building an engine from {model.name}") as status:
        result = build_engine(model, output, settings, force, device, on_step=status.update)
    header = result.header
    if as_json:
        print(
            json.dumps(
                {
                    "path": str(result.path),
                    "size_bytes": result.size_bytes,
                    "seconds": result.seconds,
                    "timing_cache": str(result.timing_cache),
                    "tensorrt_warnings": result.tensorrt_warnings,
                    "header": header.to_dict(),
                },
                indent=2,
            )
        )
        return
    profile = header.settings.profile
    console.print(
        f"[bold green]built[/] {result.path} ({result.size_bytes / 2**20:.1f} MiB, "
        f"{header.precision}, {result.seconds:.0f} s)"
    )
    console.print(f"for             TensorRT {header.tensorrt_version}, {header.gpu_name} (compute capability {header.compute_capability})")
    console.print(f"batch profile   min {profile.min}, opt {profile.opt}, max {profile.max}; input {header.input_shape}")
    if header.precision == "fp16":
        asked = [("TopK score paths", settings.fp32_topk_scores), ("--fp32-layers", bool(settings.fp32_layers))]
        reasons = " and ".join(name for name, wanted in asked if wanted) or "none asked for"
        console.print(f"FP32 layers     {len(header.fp32_layers)} ({reasons})")
    console.print(f"timing cache    {result.timing_cache}")
    for message in result.tensorrt_warnings[:5]:
        err_console.print(f"[yellow]TensorRT:[/] {escape(message)}", highlight=False)
    if len(result.tensorrt_warnings) > 5:
        err_console.print(f"[yellow]TensorRT:[/] {len(result.tensorrt_warnings) - 5} more warning(s) (--json lists all)")
    console.print(f"next            evit-deploy bench {escape(str(result.path))} --batch {profile.opt}", soft_wrap=True)


@command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Versions, GPU, and which backends, exports, builds, serving and plots work here (and what
    to install)."""

    from evit_deploy.doctor import diagnose

    report = diagnose()
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console.print(
        f"evit-deploy {report.evit_deploy}, Python {report.python}, {report.platform}, "
        f"glibc {report.glibc or 'none'}"
    )
    packages = Table(title="Packages")
    for column in ("package", "version", "status"):
        packages.add_column(column)
    for package in report.packages:
        status = "[green]ok[/]" if package.works else ("[red]not installed[/]" if package.version is None else f"[red]broken:[/] {escape(package.error)}")
        packages.add_row(package.name, package.version or "-", status)
    console.print(packages)
    console.print(f"CUDA (torch build) {report.torch_cuda or 'none (CPU-only torch)'}; NVIDIA driver {report.nvidia_driver or 'none found'}")
    console.print(f"ONNX Runtime providers {', '.join(report.onnxruntime_providers) or 'none'}")
    if not report.gpus:
        console.print(f"GPU             none visible to PyTorch: {escape(report.gpu_hint)}")
    for gpu in report.gpus:
        console.print(
            f"GPU {gpu.index}           {gpu.name}, compute capability {gpu.compute_capability}, "
            f"{gpu.memory_gib:.1f} GiB, fast FP16 {'yes' if gpu.fast_fp16 else 'no'}"
        )
    for title, rows in (("Backends", report.backends), ("Exports, builds, serving, plots", report.actions)):
        table = Table(title=title)
        for column in ("", "available", "uses / to enable"):
            table.add_column(column)
        for row in rows:
            table.add_row(row.name, "[green]yes[/]" if row.available else "[red]no[/]", escape(row.detail))
        console.print(table)


@command()
def serve(
    artifact: Path = typer.Argument(..., help=".onnx or .plan/.engine (or a .pth/.safetensors checkpoint)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Triton HTTP port (KServe v2); gRPC, metrics and REST default to port+1, +2, +3."),
    grpc_port: Optional[int] = typer.Option(None, help="Triton gRPC port (default: port+1)."),
    metrics_port: Optional[int] = typer.Option(None, help="Triton Prometheus metrics port (default: port+2)."),
    rest_port: Optional[int] = typer.Option(None, help="REST front for image uploads and /metrics (default: port+3)."),
    model_name: str = typer.Option("evit", help="Model name on the Triton protocol."),
    max_batch: int = typer.Option(64, help="Largest batch the dynamic batcher forms."),
    max_delay_ms: float = typer.Option(5.0, help="Longest a request waits for others to batch with."),
    max_queue: int = typer.Option(1024, help="Queued requests beyond this are answered 503 at once."),
    workers: int = typer.Option(1, help="Model instances, each with its own Predictor (CPU threads are split)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: best available)."),
    max_body_mb: float = typer.Option(10.0, help="Largest image upload on the REST front (413 beyond)."),
    shutdown_timeout: int = typer.Option(30, help="Seconds to finish in-flight requests on Ctrl-C / SIGTERM."),
    verbose: bool = typer.Option(False, help="Print Triton's own log."),
) -> None:
    """Serve an artifact with Triton Inference Server (via PyTriton): dynamic batching, HTTP/gRPC,
    health, Prometheus metrics, plus a REST endpoint for JPEG/PNG uploads."""
    from evit_deploy.serve import EvitServer, ServeOptions

    options = ServeOptions(
        host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port, rest_port=rest_port,
        model_name=model_name, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
        workers=workers, max_body_mb=max_body_mb, shutdown_timeout_s=shutdown_timeout, verbose=verbose,
    )
    server = EvitServer(artifact, options, backend=backend, device=device)
    try:
        with err_console.status(f"loading {artifact.name} and starting Triton Inference Server"):
            server.start()
        meta, urls, backend_info = server.metadata, server.urls, server.predictors[0].backend
        console.print(
            f"[bold green]serving[/] {artifact.name} ({meta.model}, keep_rate {meta.keep_rate}) on "
            f"{backend_info.name} ({backend_info.provider}) as Triton model '{model_name}': batches up to "
            f"{server.max_batch}, wait up to {max_delay_ms:g} ms, queue {max_queue}, {workers} instance(s)"
        )
        console.print(f"tensors (KServe v2)  POST {urls['http']}/v2/models/{model_name}/infer   gRPC {urls['grpc']}")
        console.print(f"images               POST {urls['rest']}/v1/models/{model_name}/predict  (JPEG/PNG body)")
        console.print(f"health               GET  {urls['http']}/v2/health/ready")
        console.print(f"metrics              GET  {urls['rest']}/metrics  (Triton's {urls['metrics']} + batch sizes)")
        console.print("Ctrl-C or SIGTERM stops after in-flight requests finish", style="dim")
        server.wait()
    except KeyboardInterrupt:
        if server.triton is None:
            raise
        err_console.print("stopping: finishing in-flight requests")
    finally:
        server.stop()
    err_console.print("stopped")


@command()
def client(
    images: list[Path] = typer.Argument(..., help="JPEG/PNG files to classify on a running server."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The server's Triton HTTP URL."),
    rest_url: Optional[str] = typer.Option(None, help="The server's REST front (default: --url's port + 3)."),
    model_name: str = typer.Option("evit", help="Model name on the server."),
    topk: int = typer.Option(5, help="Classes to report per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Classify images on a running `evit-deploy serve` (uploads them to its REST front)."""
    from evit_deploy.client import Client

    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise EvitDeployError(f"image not found: {', '.join(missing)}")
    with Client(url, model_name, rest_url=rest_url) as remote:
        results = [remote.predict_image(image, topk=topk) for image in images]
    if as_json:
        print(json.dumps([{"image": str(i), **r} for i, r in zip(images, results)], indent=2))
        return
    console.print(predictions_table(f"model '{model_name}' at {url}", images, results))


@command()
def loadtest(
    url: str = typer.Argument("http://127.0.0.1:8000", help="The server's Triton HTTP URL."),
    concurrency: int = typer.Option(32, help="Concurrent clients (threads, one connection each)."),
    requests: int = typer.Option(2000, help="Requests in all."),
    batch: int = typer.Option(1, help="Images per request."),
    model_name: str = typer.Option("evit", help="Model name on the server."),
    artifact: Optional[Path] = typer.Option(
        None, help="Check each answer against Predictor.logits at batch 1 on this artifact "
        "(default: against the first answer for the same input)."
    ),
    max_seconds: float = typer.Option(600.0, help="Stop sending after this long."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    force: bool = typer.Option(False, help="Replace an existing --json file."),
) -> None:
    """Load a server with N concurrent clients: latency percentiles, throughput, errors, wrong answers.
    Exits 1 if any request failed or was answered with a wrong result."""
    from evit_deploy.client import load_test
    from evit_deploy.fileio import check_can_write, write_bytes_atomic

    if json_path:
        check_can_write(json_path, force)
    with err_console.status(f"{requests} requests from {concurrency} clients to {url}"):
        result = load_test(
            url, model=model_name, concurrency=concurrency, requests=requests, batch=batch,
            artifact=artifact, max_seconds=max_seconds,
        )
    table = Table(title=f"load test: {url} model '{model_name}', {concurrency} clients, batch {batch}")
    for column in ("requests", "errors", "mismatches", "p50 ms", "p90 ms", "p99 ms", "req/s", "img/s"):
        table.add_column(column, justify="right")
    table.add_row(
        str(result.requests), str(result.errors), f"{result.mismatches}/{result.checked}",
        f"{result.p50_ms:.1f}", f"{result.p90_ms:.1f}", f"{result.p99_ms:.1f}",
        f"{result.throughput_rps:.1f}", f"{result.throughput_ips:.1f}",
    )
    console.print(table)
    if result.error_kinds:
        console.print(f"errors by kind: {result.error_kinds}")
    if json_path:
        write_bytes_atomic(json_path, json.dumps(result.to_dict(), indent=2).encode(), force)
        console.print(f"wrote {json_path}")
    if result.errors or result.mismatches:
        raise typer.Exit(1)


@command(name="triton-repo")
def triton_repo(
    artifact: Path = typer.Argument(..., help=".onnx, or an evit-deploy .plan/.engine."),
    output: Path = typer.Option(..., "--output", "-o", help="Model repository folder (created if missing)."),
    model_name: str = typer.Option("evit", help="Model name (the folder under --output)."),
    instances: int = typer.Option(1, help="Model instances per device (instance_group count)."),
    max_batch: int = typer.Option(64, help="max_batch_size (capped at a TensorRT engine's profile max)."),
    preferred_batch: str = typer.Option("", help="Preferred batch sizes for the dynamic batcher, e.g. 16,32."),
    max_queue_delay_us: int = typer.Option(100, help="Dynamic batcher's max_queue_delay_microseconds."),
    max_queue: int = typer.Option(1024, help="Queue limit (rejected beyond; 0: unbounded)."),
    kind: str = typer.Option("auto", help="Instance kind for ONNX: auto, gpu or cpu (plans: gpu)."),
    force: bool = typer.Option(False, help="Replace an existing model folder."),
) -> None:
    """Write a Triton Inference Server model repository (config.pbtxt, model, labels) for an artifact."""
    from evit_deploy.serve.triton_repo import write_triton_repo

    result = write_triton_repo(
        artifact, output, model_name=model_name, instances=instances, max_batch=max_batch,
        preferred_batch=preferred_batch, max_queue_delay_us=max_queue_delay_us, max_queue=max_queue,
        kind=kind, force=force,
    )
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"[bold green]wrote[/] {result.model_dir} ({result.spec.platform}, max_batch_size {result.spec.max_batch_size}, {instances} instance(s))")
    console.print(f"next            tritonserver --model-repository {escape(str(output.resolve()))}", soft_wrap=True)


def _bench_sweep(
    artifact, keep_rates, batches, backend, device, warmup, iters, min_seconds, options, json_path,
    plot, eval_dir, force,
) -> None:
    """bench --keep-rates: every keep rate timed interleaved on one backend, then JSON and plot."""
    from evit_deploy.fileio import check_can_write, write_bytes_atomic
    from evit_deploy.runtime.sweep import check_plotting, parse_keep_rates, plot_sweep, sweep_keep_rates

    rates = parse_keep_rates(keep_rates)
    if plot:
        check_can_write(plot, force)
        check_plotting()
    with err_console.status(f"sweeping {artifact.name}") as status:
        report = sweep_keep_rates(
            artifact, rates, batches, backend, device, warmup, iters, min_seconds, eval_dir,
            on_step=status.update, **options,
        )
    console.print(sweep_table(report))
    if json_path:
        write_bytes_atomic(json_path, json.dumps(report.to_dict(), indent=2).encode(), force)
        console.print(f"wrote {json_path}")
    if plot:
        console.print(f"wrote {plot_sweep(report, plot, force)}")


def sweep_table(report) -> Table:
    first = report.runs[0]
    table = Table(
        title=f"{first.model} keep-rate sweep, {first.backend} ({first.provider}, {first.precision})",
        caption=f"on {first.device}; p50: median ms per batch; speed-up: img/s over keep 1.0",
    )
    columns = ["keep", "batch", "p50", "img/s", "speed-up", "GMACs", "paper"]
    if report.accuracy:
        columns += ["top-1", "top-5"]
    for column in columns:
        table.add_column(column, justify="right")
    plain = {r.batch: r.throughput_ips for r in report.runs if r.keep_rate == 1.0}
    paper = {v["keep_rate"]: v["published_gmacs"] for v in report.variants}
    for run in report.runs:
        row = [
            f"{run.keep_rate:g}",
            str(run.batch),
            f"{run.latency_ms['p50']:.1f}",
            f"{run.throughput_ips:.1f}",
            f"{run.throughput_ips / plain[run.batch]:.2f}x" if run.batch in plain else "-",
            f"{run.gmacs:.2f}",
            f"{paper[run.keep_rate]:.1f}" if paper.get(run.keep_rate) else "-",
        ]
        if report.accuracy:
            accuracy = report.accuracy[run.keep_rate]
            row += [f"{accuracy['top1']:.2%}", f"{accuracy['top5']:.2%}"]
        table.add_row(*row)
    return table


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _interrupt)  # kill -> the same clean-up as Ctrl-C
    warnings.showwarning = _show_warning
    # Decoders' own notes on a damaged image or checkpoint: the one error line says it already.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"PIL\.")
    warnings.filterwarnings("ignore", message="Detected pickle protocol", module=r"torch\.")
    app()


if __name__ == "__main__":
    main()
