"""The `evit-deploy` command line: parses options, calls the library, renders results.

User mistakes come back as EvitDeployError and are printed as one line (exit 2 for usage, 1 for
runtime failures); so are the argument parser's (main). Tracebacks only with --debug.

Options that mean the same on several commands are defined once below and shared: the JSON
outputs (--json on stdout, --json-out to a file) and a checkpoint's EViT settings.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evit_deploy import __version__, interrupt
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model.config import EvitConfig  # plain Python: the defaults the options name

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


def command(*args, group: typer.Typer = app, **kwargs):
    """group.command() (app's by default) that turns errors into one line on stderr and an exit code (no traceback
    unless --debug): EvitDeployError -> its exit code, Ctrl-C/kill -> 130, a bug -> 1. A stop that was
    requested is 130 whatever the command did next (interrupt.py: libraries can swallow it)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*fn_args, **fn_kwargs):
            try:
                return _recorded_stop_as_interrupt(fn, *fn_args, **fn_kwargs)
            except typer.Exit:
                raise
            except BrokenPipeError:
                # The client converts its socket errors, so a closed pipe here is stdout's.
                raise typer.Exit(_closed_stdout()) from None
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

        return group.command(*args, **kwargs)(wrapper)

    return decorate


def _recorded_stop_as_interrupt(fn, *args, **kwargs):
    """A stop the signal handler recorded ends the command as interrupted, whatever it did after
    a library caught the KeyboardInterrupt: finished, failed or exited (interrupt.py)."""
    try:
        result = _memory_error_as_user_error(fn, *args, **kwargs)
    except BaseException:
        if interrupt.requested():
            raise KeyboardInterrupt from None
        raise
    interrupt.check()
    return result


def _memory_error_as_user_error(fn, *args, **kwargs):
    """Running out of memory means a batch or input too big for this machine: the user's to fix."""
    try:
        return fn(*args, **kwargs)
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        text = str(exc).strip()
        # PyTorch's CPU message starts with the C++ check that failed: keep what it says.
        text = text[text.find(CPU_ALLOCATOR) :] if CPU_ALLOCATOR in text else text
        reason = text.splitlines()[0] if text else "no details"
        raise EvitDeployError(
            f"out of memory ({reason}); use a smaller batch or input size"
        ) from exc


CPU_ALLOCATOR = "DefaultCPUAllocator"


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError (numpy), CUDA's out-of-memory error where torch is loaded (not imported for
    it), and PyTorch's CPU allocator failing, which raises a plain RuntimeError."""
    torch = sys.modules.get("torch")
    return (
        isinstance(exc, MemoryError)
        or (torch is not None and isinstance(exc, torch.OutOfMemoryError))
        or CPU_ALLOCATOR in str(exc)
    )


def _closed_stdout() -> int:
    """A reader that stops early (`| head -1`) is normal in a shell: no message, and the status
    standard tools get from SIGPIPE (141). Later writes and the final flush go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


# JSON, the same on every command: --json prints it on stdout instead of the tables, --json-out
# also writes it to a file (atomically; an existing file only with --force).
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout instead of the tables.")
JSON_OUT = typer.Option(None, "--json-out", metavar="PATH", help="Also write the result as JSON to PATH.")
FORCE = typer.Option(False, "--force", help="Replace existing output files.")


def check_json_out(json_out: Path | None, force: bool) -> None:
    """Refuse an existing --json-out file before any work is done."""
    if json_out is not None:
        from evit_deploy.fileio import check_can_write

        check_can_write(json_out, force)


def emit_json(data, as_json: bool, json_out: Path | None, force: bool) -> None:
    text = json.dumps(data, indent=2)
    if json_out is not None:
        from evit_deploy.fileio import write_bytes_atomic

        write_bytes_atomic(json_out, (text + "\n").encode(), force)
        if not as_json:
            console.print(f"wrote {escape(str(json_out))}", highlight=False)
    if as_json:
        print(text)


# A checkpoint's EViT settings, the same options on every command that loads one. An exported
# model carries its own: giving one for it is refused (see checkpoint_settings).
MODEL = typer.Option(
    None, "--model",
    help=f"Architecture or official EViT name (default: read off the checkpoint's weights; {EvitConfig.model} for random weights).",
)
KEEP_RATE = typer.Option(None, "--keep-rate", help=f"Fraction of image tokens each drop block keeps (default {EvitConfig.keep_rate}).")
DROP_LOC = typer.Option(None, "--drop-loc", help=f"Blocks (from 0) that drop tokens (default {','.join(map(str, EvitConfig.drop_loc))}).")
FUSE_TOKEN = typer.Option(None, "--fuse-token/--no-fuse-token", help="Fuse the dropped tokens into one extra token (default: fuse).")
IMG_SIZE = typer.Option(None, "--img-size", help=f"Input resolution; pos_embed is resampled to it (default {EvitConfig.img_size}).")


def evit_settings(
    model: str | None = None,
    keep_rate: float | None = None,
    drop_loc: str | None = None,
    fuse_token: bool | None = None,
    img_size: int | None = None,
) -> dict:
    """The EViT options given, parsed; those not given are left out, so the artifact's own or
    EvitConfig's defaults apply."""
    from evit_deploy.model.config import parse_drop_loc

    given = {
        "model": model, "keep_rate": keep_rate, "drop_loc": drop_loc, "fuse_token": fuse_token,
        "img_size": img_size,
    }
    settings = {k: v for k, v in given.items() if v is not None}
    if "drop_loc" in settings:
        settings["drop_loc"] = parse_drop_loc(settings["drop_loc"])
    return settings


def checkpoint_settings(artifact: Path, backend: str, *given) -> dict:
    """evit_settings(*given) for a checkpoint; an exported artifact carries its own, so any
    setting given for one is refused rather than silently ignored."""
    from evit_deploy.runtime.backends import backend_for

    settings = evit_settings(*given)
    if settings and backend_for(artifact, backend) != "pytorch":
        flags = ", ".join("--" + k.replace("_", "-") for k in settings)
        raise UsageError(f"settings ({flags}) are for checkpoints; {artifact.name} carries its own")
    return settings


def settings_text(meta) -> str:
    """An artifact's (or EvitConfig's) EViT settings in one line, the keep rate in use first."""
    fusion = "fused token" if meta.fuse_token else "no fused token"
    blocks = ",".join(map(str, meta.drop_loc)) or "none"
    return f"{meta.model}, keep rate {meta.keep_rate:g}, drop blocks {blocks}, {fusion}, {meta.img_size} px"


@command()
def export(
    checkpoint: Optional[Path] = typer.Option(
        None, help=".pth/.pt (official EViT or timm) or .safetensors; none: random weights."
    ),
    model: Optional[str] = MODEL,
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
    opset: int = typer.Option(18, help="ONNX opset (18 to 23; LayerNorm is a single node)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .onnx path."),
    force: bool = FORCE,
    with_token_indices: bool = typer.Option(
        False, help="Also output each drop block's kept-token indices."
    ),
    labels: Optional[Path] = typer.Option(
        None, help="Class names, one per line in class-id order (default: labels.txt beside the checkpoint)."
    ),
    validate_dir: Optional[Path] = typer.Option(
        None, help="Also validate on every image in this folder (e.g. held-out data; needed for fp16)."
    ),
    precision: str = typer.Option("fp32", help="fp32, or fp16: FP16 weights and compute with FP32 islands (float32 I/O)."),
    fp32_islands: str = typer.Option(
        "topk_scores", help="fp16 only: what stays FP32, comma-separated: topk_scores (the class attention TopK ranks), layernorm; or none."
    ),
    accept_failed_gates: bool = typer.Option(False, help="fp16: write the file even if it misses a precision gate (recorded in its metadata)."),
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
) -> None:
    """Export a checkpoint to ONNX (dynamic batch), validated against PyTorch before it is written."""
    from evit_deploy.export import export_onnx
    from evit_deploy.export.onnx import check_export_precision, check_opset
    from evit_deploy.export.validate import ValidationFailed
    from evit_deploy.fileio import check_can_write
    from evit_deploy.model.checkpoint import build_model, checkpoint_config

    settings = evit_settings(None, keep_rate, drop_loc, fuse_token, img_size)
    check_opset(opset)
    for path in (output, json_out):
        if path is not None:
            check_can_write(path, force)
    islands = () if fp32_islands.strip() == "none" else tuple(p.strip() for p in fp32_islands.split(",") if p.strip())
    check_export_precision(precision, islands, validate_dir)
    title = "Validation: ONNX Runtime vs PyTorch" + (f" FP32 ({precision}, FP32 islands: {', '.join(islands) or 'none'})" if precision != "fp32" else "")
    try:
        with err_console.status("loading model") as status:
            config, state = checkpoint_config(checkpoint, model, **settings)
            if output is None:
                output = check_can_write(default_onnx_name(config, precision), force)
            net = build_model(config, checkpoint, state=state, labels=labels)
            result = export_onnx(
                net,
                output,
                opset=opset,
                force=force,
                with_token_indices=with_token_indices,
                validate_dir=validate_dir,
                precision=precision,
                fp32_islands=islands,
                accept_failed_gates=accept_failed_gates,
                on_step=lambda step: status.update(step),
            )
    except ValidationFailed as failed:
        (err_console if as_json else console).print(validation_table(failed.report, title))
        raise
    meta = result.metadata
    if not as_json:
        console.print(validation_table(result.report, title))
        if meta.gates_missed:
            err_console.print(
                f"[yellow]warning:[/] written although it missed the gates (--accept-failed-gates): "
                f"{escape(result.report.failure_summary())}",
                highlight=False, soft_wrap=True,
            )
        summary = [
            f"[bold green]exported[/] {escape(str(result.path))} ({result.size_bytes / 2**20:.1f} MiB, opset {result.opset}, {meta.precision}"
            + (f", FP32 islands: {', '.join(meta.fp32_islands) or 'none'})" if meta.precision == "fp16" else ")"),
            f"model           {settings_text(meta)}",
            f"TopK K          {meta.topk_k or 'none (plain ViT)'}",
            f"tokens/block    {meta.tokens_per_block}",
            f"classes         {len(meta.classes)}: {', '.join(meta.classes)}" if meta.classes
            else f"classes         {meta.num_classes} (unnamed{', ImageNet names' if meta.num_classes == 1000 else ''})",
            f"next            evit-deploy bench {escape(str(result.path))} --batch 64",
        ]
        for line in summary:
            console.print(line, soft_wrap=True, highlight=False)
    record = {
        "path": str(result.path),
        "size_bytes": result.size_bytes,
        "opset": result.opset,
        "metadata": meta.to_dict(),
        "validation": result.report.to_dict(),
    }
    emit_json(record, as_json, json_out, force)


def default_onnx_name(config, precision: str = "fp32") -> str:
    suffix = f"_keep{config.keep_rate:g}" if config.is_evit else ""
    size = f"_{config.img_size}px" if config.img_size != 224 else ""
    kind = f".{precision}" if precision != "fp32" else ""
    return f"{config.model}{suffix}{size}{kind}.onnx"


def validation_table(report, title: str = "Validation: ONNX Runtime vs PyTorch") -> Table:
    if report.gates is not None:
        return precision_table(report, title)
    table = Table(title=title)
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


def precision_table(report, title: str) -> Table:
    """A reduced precision against FP32: top-1 agreement, the share of images keeping the same
    tokens at each drop block, accuracy reference -> candidate; gated on the held-out row."""
    gates = report.gates
    table = Table(
        title=title,
        caption=f"{report.precision} gates (held-out row): top-1 agreement >= {gates.min_top1_agreement:.1%}, "
        f"same kept tokens at the first drop block >= {gates.min_kept_identical:.0%}"
        + (f", accuracy drop <= {gates.max_accuracy_drop:g} points" if gates.max_accuracy_drop is not None else ""),
    )
    columns = ("inputs", "batch", "max |diff|", "top-1 agreement", "same kept tokens per drop block", "kept-token overlap", "accuracy", "result")
    for column in columns:
        table.add_column(column, justify="left" if column in ("inputs", "result") else "right")
    for case in report.cases:
        kept = " / ".join(f"{share:.1%}" for share in case.kept_identical) or "-"
        overlap = " / ".join(f"{share:.2%}" for share in case.kept_overlap) or "-"
        accuracy = "-"
        if case.accuracy is not None and case.reference_accuracy is not None:
            accuracy = f"{case.reference_accuracy:.1%} -> {case.accuracy:.1%}"
        if not case.gated:
            result = "reported"
        elif case.passed:
            result = "[green]pass[/]"
        else:
            result = "[red]FAIL[/]: " + escape("; ".join(case.missed_gates()))
        table.add_row(
            case.name, str(case.batch), f"{case.max_abs_diff:.2e}", f"{case.top1_agreement:.1%}", kept, overlap, accuracy, result
        )
    return table


BACKEND_HELP = "auto (from the file suffix), onnxruntime, openvino, tensorrt or pytorch."
PRECISION = typer.Option(
    None, "--precision", help="OpenVINO: fp32 (default) or bf16 (needs AVX-512 BF16 or AMX; the TopK score path stays FP32)."
)
TOPK_SCORES = typer.Option(
    True, "--fp32-topk-scores/--bf16-topk-scores", help="OpenVINO bf16: keep the scores TopK ranks in FP32."
)


def _precision_options(precision: Optional[str], fp32_topk_scores: bool = True) -> dict:
    """Backend options for --precision / --bf16-topk-scores (only what was asked for)."""
    options = {"precision": precision} if precision else {}
    if not fp32_topk_scores:
        options["fp32_topk_scores"] = False
    return options


@command()
def predict(
    artifact: Path = typer.Argument(..., help=".onnx, .plan/.engine, or a .pth/.safetensors checkpoint."),
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...)."),
    topk: int = typer.Option(5, help="Classes to report per image."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: best available)."),
    model: Optional[str] = MODEL,
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
    precision: Optional[str] = PRECISION,
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Classify images with any artifact (DeiT preprocessing, settings from the artifact)."""
    from evit_deploy.runtime import Predictor

    settings = checkpoint_settings(artifact, backend, model, keep_rate, drop_loc, fuse_token, img_size)
    check_json_out(json_out, force)
    predictor = Predictor(artifact, backend=backend, device=device, **settings, **_precision_options(precision))
    predictions = predictor.predict([str(p) for p in images], topk=topk)
    if not as_json:
        title = f"{artifact.name}: {settings_text(predictor.metadata)}"
        caption = f"{predictor.backend.name} ({predictor.backend.provider}, {predictor.backend.precision})"
        table = predictions_table(title, images, [p.to_dict() for p in predictions], predictor.metadata.classes, caption)
        console.print(table)
    records = [{"image": str(i), **p.to_dict()} for i, p in zip(images, predictions)]
    emit_json(records, as_json, json_out, force)


def predictions_table(
    title: str, images: list[Path], predictions: list[dict], classes: list[str] = (), caption: str | None = None
) -> Table:
    """Top-k rows per image from {class_ids, labels, probs} dicts. Where an image sits in a folder
    named after one of the model's classes (an ImageFolder), that class is shown as the truth."""
    truths = [Path(image).parent.name if Path(image).parent.name in classes else None for image in images]
    table = Table(title=title, caption=caption)
    columns = ["image", *(["true class"] if any(truths) else []), "rank", "class", "label", "prob"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("rank", "class", "prob") else "left")
    for image, truth, result in zip(images, truths, predictions):
        rows = zip(result["class_ids"], result["labels"], result["probs"])
        for rank, (cid, label, prob) in enumerate(rows, 1):
            first = rank == 1
            cells = [str(image) if first else ""]
            if any(truths):
                mark = "" if truth is None else (" [green]✓[/]" if truth == result["labels"][0] else " [red]✗[/]")
                cells.append(f"{truth or '-'}{mark}" if first else "")
            table.add_row(*cells, str(rank), str(cid), escape(label), f"{prob:.4f}")
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
    threads: Optional[int] = typer.Option(None, help="CPU threads (ONNX Runtime / OpenVINO / PyTorch; --end-to-end's preprocessing too)."),
    precision: Optional[str] = PRECISION,
    fp32_topk_scores: bool = TOPK_SCORES,
    baseline: bool = typer.Option(True, help="Also time the plain ViT (keep_rate 1.0) of the same weights."),
    end_to_end: Optional[Path] = typer.Option(
        None, "--end-to-end", metavar="DIR",
        help="Also time image files in DIR to top-5 classes at the same batch sizes, per stage: decode, resize/crop/normalise, inference, softmax/top-k.",
    ),
    keep_rates: Optional[str] = typer.Option(None, help="Sweep: time these keep rates instead (re-exported, cached), e.g. 0.5,0.7,1.0."),
    plot: Optional[Path] = typer.Option(None, help="Sweep: plot throughput, GMACs (and accuracy) against keep rate to this PNG."),
    eval_dir: Optional[Path] = typer.Option(None, help="Sweep: also measure accuracy on this image folder (as for eval)."),
    model: Optional[str] = MODEL,
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Latency percentiles and throughput, EViT beside plain ViT, timed interleaved; with
    --end-to-end also from image files to top-k, stage by stage."""
    from evit_deploy.fileio import check_can_write
    from evit_deploy.bench.bench import REFERENCE, bench_artifact, parse_batches
    from evit_deploy.bench.sweep import check_plotting, parse_keep_rates, plot_sweep, sweep_keep_rates

    batches = parse_batches(batch)
    settings = checkpoint_settings(artifact, backend, model, keep_rate, drop_loc, fuse_token, img_size)
    check_json_out(json_out, force)
    if keep_rates is None and (plot or eval_dir):
        raise UsageError("--plot and --eval-dir go with --keep-rates")
    if keep_rates is not None and keep_rate is not None:
        raise UsageError("give --keep-rate (one model) or --keep-rates (a sweep), not both")
    if plot:
        check_can_write(plot, force)
        check_plotting()
    timing = dict(warmup=warmup, iterations=iters, min_seconds=min_seconds, end_to_end_dir=end_to_end)
    options = ({"threads": threads} if threads else {}) | _precision_options(precision, fp32_topk_scores)
    with err_console.status(f"benchmarking {artifact.name} at batch {batch}") as status:
        if keep_rates is None:
            report = bench_artifact(
                artifact, batches, backend, device, baseline=baseline, on_step=status.update,
                **timing, **options, **settings,
            )
        else:
            report = sweep_keep_rates(
                artifact, parse_keep_rates(keep_rates), batches, backend, device,
                eval_dir=eval_dir, on_step=status.update, **timing, **options, **settings,
            )
    if not as_json:
        console.print(bench_table(report) if keep_rates is None else sweep_table(report))
        flops = report.flops_ratio
        first = report.runs[0]
        reference = report.reference_speedup
        for keep, by_batch in report.speedup.items() if keep_rates is None else ():
            for size, speedup in by_batch.items():
                console.print(
                    f"batch {size}: EViT (keep {keep:g}) is [bold]{speedup:.2f}x[/] the plain ViT's throughput "
                    f"on {first.backend} {first.precision} (FLOPs ratio {flops[keep]:.2f}x: {speedup / flops[keep]:.0%} of it)"
                    + (f"; [bold]{reference[keep][size]:.2f}x[/] {REFERENCE} (the reference)" if size in reference.get(keep, {}) else ""),
                    highlight=False,
                )
        if report.end_to_end:
            print_end_to_end(report, end_to_end)
    emit_json(report.to_dict(), as_json, json_out, force)
    if plot:
        path = plot_sweep(report, plot, force)
        if not as_json:
            console.print(f"wrote {escape(str(path))}", highlight=False)


def print_end_to_end(report, folder: Path) -> None:
    """The per-stage table beside the model-only throughput, and what survives of the speed-up."""
    from evit_deploy.bench.end_to_end import STAGE_NAMES, STAGES, TOPK

    first = report.end_to_end[0]
    model_only = {(r.keep_rate, r.batch, r.backend, r.precision): r.throughput_ips for r in report.runs}
    several = len({(r.backend, r.precision) for r in report.end_to_end}) > 1
    table = Table(
        title=f"End to end: image files to top-{TOPK}, ms per image (share of the total)",
        caption=(
            f"{first.images} image file(s) from {folder}; decoding and preprocessing on "
            f"{first.preprocess_threads} thread(s), idle while the model runs"
        ),
    )
    for column in ("model", "keep", "batch", *(STAGE_NAMES[s] for s in STAGES), "total", "img/s", "model only img/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in report.end_to_end:
        share = row.share
        table.add_row(
            row.model.replace("_patch16_224", "") + (f" ({row.backend} {row.precision})" if several else ""),
            f"{row.keep_rate:g}", str(row.batch),
            *(f"{row.stage_ms[s]:.1f} ({share[s]:.0%})" for s in STAGES),
            f"{row.total_ms:.1f}", f"{row.throughput_ips:.1f}",
            f"{model_only[(row.keep_rate, row.batch, row.backend, row.precision)]:.1f}",
        )
    console.print(table)
    for keep, by_batch in report.end_to_end_speedup.items():
        for size, speedup in by_batch.items():
            console.print(
                f"batch {size}: end to end, EViT (keep {keep:g}) is [bold]{speedup:.2f}x[/] the plain "
                f"ViT's throughput (model only: {report.speedup[keep][size]:.2f}x)"
            )


def bench_table(report) -> Table:
    first = report.runs[0]
    table = Table(
        title=f"{first.backend} ({first.provider}, {first.precision}) on {first.device}",
        caption="latency per batch in ms; throughput = batch / median latency",
    )
    columns = ("model", "keep", "backend", "precision", "batch", "mean", "p50", "p90", "p99", "img/s", "GMACs", "runs")
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
            run.backend,
            run.precision,
            str(run.batch),
            *(f"{lat[k]:.1f}" if lat[k] < 1000 else f"{lat[k]:.0f}" for k in ("mean", "p50", "p90", "p99")),
            f"{run.throughput_ips:.1f}",
            f"{run.gmacs:.2f}",
            str(run.iterations),
        )
    return table


@command()
def visualize(
    artifact: Path = typer.Argument(..., help="A checkpoint, or an ONNX exported with --with-token-indices."),
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...)."),
    output: Path = typer.Option(Path("."), "--output", "-o", help="Folder for <image>_tokens.png, or a .png path for one image."),
    force: bool = typer.Option(False, help="Replace existing pictures."),
    model: Optional[str] = MODEL,
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
) -> None:
    """Draw the patches every drop block keeps, one PNG per image (the paper's figure).

    Dropped patches are masked out; patches fused in that block are shaded."""
    from evit_deploy.analysis.visualize import figure_paths, load_token_source, write_figures

    settings = checkpoint_settings(artifact, "auto", model, keep_rate, drop_loc, fuse_token, img_size)
    paths = figure_paths(images, output, force)
    with err_console.status(f"loading {artifact.name}"):
        source = load_token_source(artifact, **settings)
    console.print(settings_text(source.metadata), highlight=False)
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
    model: Optional[str] = MODEL,
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
    precision: Optional[str] = PRECISION,
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Top-1 / top-5 accuracy on an image folder, with any backend; with an objects.json (from
    `evit-deploy dataset shapes`) also how much of each object the drop blocks keep."""
    import time

    from evit_deploy.data.shapes import OBJECTS_FILE

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from evit_deploy.analysis.evaluate import evaluate
    from evit_deploy.data.samples import find_samples, spread_subset
    from evit_deploy.runtime import Predictor

    settings = checkpoint_settings(artifact, backend, model, keep_rate, drop_loc, fuse_token, img_size)
    check_json_out(json_out, force)
    with err_console.status(f"loading {artifact.name}"):
        predictor = Predictor(artifact, backend=backend, device=device, **settings, **_precision_options(precision))
    meta = predictor.metadata
    samples = spread_subset(find_samples(data_dir, meta.num_classes, labels, meta.classes), limit)
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
    if not as_json:
        info = predictor.backend.describe()
        table = Table(
            title=f"{artifact.name} on {data_dir}: {settings_text(predictor.metadata)}",
            caption=f"{info['backend']} ({info['provider']}, {info['precision']}) on {info['device']}",
        )
        for column in ("images", "top-1", "top-5", "img/s", "model img/s"):
            table.add_column(column, justify="right")
        table.add_row(
            str(result.images), f"{result.top1:.2%}", f"{result.top5:.2%}",
            f"{result.images_per_s:.1f}", f"{result.model_images_per_s:.1f}",
        )
        console.print(table)
    record = {
        "artifact": str(artifact), "data_dir": str(data_dir),
        "keep_rate": predictor.metadata.keep_rate, **result.to_dict(),
    }
    if (data_dir / OBJECTS_FILE).is_file():
        recall = _object_recall(artifact, data_dir, limit, settings)
        if recall is not None:
            if not as_json:
                console.print(recall_table(recall))
            record["object_recall"] = recall.to_dict()
    emit_json(record, as_json, json_out, force)


def _object_recall(artifact: Path, data_dir: Path, limit: Optional[int], options: dict):
    """Object recall per drop block where the artifact can say which tokens it keeps; a note
    instead where it cannot (an engine, an ONNX without kept-token outputs, a plain ViT)."""
    from evit_deploy.analysis.object_recall import object_recall
    from evit_deploy.analysis.visualize import load_token_source

    try:
        with err_console.status("object recall: which patches each drop block keeps"):
            return object_recall(load_token_source(artifact, **options), data_dir, limit)
    except EvitDeployError as exc:
        err_console.print(f"[yellow]note:[/] no object recall: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return None


def recall_table(report) -> Table:
    table = Table(
        title=f"Kept tokens vs objects ({report.images} images, object {report.object_share:.1%} of the patches)",
        caption="object recall: share of the object's patches still kept; background: share of the other patches still kept",
    )
    for column in ("drop block", "K", "object recall", "background kept", "object / background"):
        table.add_column(column, justify="right")
    for row in report.blocks:
        ratio = row.object_recall / row.background_kept if row.background_kept else float("inf")
        table.add_row(
            str(row.block), str(row.keep), f"{row.object_recall:.1%}", f"{row.background_kept:.1%}",
            f"{ratio:.1f}x",
        )
    return table


@command()
def info(
    target: str = typer.Argument(..., metavar="ARTIFACT_OR_MODEL", help="A model name, a checkpoint, an exported .onnx or an engine."),
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Parameters, tokens entering each block and GMACs counted with those token counts.
    Reads an exported model's metadata only: no torch, no runtime."""
    from evit_deploy.analysis.planning import model_cost, resolve_config

    check_json_out(json_out, force)
    config = resolve_config(target, **evit_settings(None, keep_rate, drop_loc, fuse_token, img_size))
    cost = model_cost(config)
    if not as_json:
        paper = f"; paper {cost.published_gmacs:.1f}" if cost.published_gmacs is not None else ""
        console.print(f"[bold]{config.model}[/]{settings_text(config).removeprefix(config.model)}")
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
    emit_json(cost.to_dict(), as_json, json_out, force)


@command()
def plan(
    target: str = typer.Argument(..., metavar="ARTIFACT_OR_MODEL", help="A model name, a checkpoint, an exported .onnx or an engine: its architecture and classes."),
    budget_gmacs: float = typer.Option(..., help="GMACs per image to stay within (DeiT-S at 224: 4.6)."),
    img_sizes: Optional[str] = typer.Option(None, help="Sizes to try (default 224,240,...,384)."),
    keep_rates: Optional[str] = typer.Option(None, help="Keep rates to try (default 0.40,0.45,...,1.00)."),
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """More tokens at the same cost: per input size, the highest keep rate that fits a budget."""
    from evit_deploy.analysis.planning import (
        DEFAULT_PLAN_KEEP_RATES, DEFAULT_PLAN_SIZES, fit_budget, parse_numbers, resolve_config,
    )

    check_json_out(json_out, force)
    sizes = parse_numbers(img_sizes, int, "--img-sizes") if img_sizes else DEFAULT_PLAN_SIZES
    rates = parse_numbers(keep_rates, float, "--keep-rates") if keep_rates else DEFAULT_PLAN_KEEP_RATES
    base = resolve_config(target, **evit_settings(drop_loc=drop_loc, fuse_token=fuse_token))
    fits = fit_budget(base, budget_gmacs, sizes, rates)
    if not as_json:
        table = Table(title=f"{base.model} within {budget_gmacs:g} GMACs per image")
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
    emit_json([cost.to_dict() for cost in fits], as_json, json_out, force)


@command()
def quantize(
    model: Path = typer.Argument(..., metavar="MODEL.onnx", help="An FP32 ONNX exported with `evit-deploy export`."),
    calibration: Optional[Path] = typer.Option(None, help="Images to calibrate activation ranges on (static, nncf)."),
    method: str = typer.Option("static", help="static (ONNX Runtime QDQ), dynamic (ONNX Runtime, no calibration) or nncf."),
    calibration_images: int = typer.Option(256, help="Calibrate on at most this many images, spread over the folder."),
    validate_dir: Optional[Path] = typer.Option(None, help="Held-out images (class folders) the INT8 model is judged on."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output path (default: MODEL.int8.onnx)."),
    accept_failed_gates: bool = typer.Option(False, help="Write the file even if it misses a precision gate (recorded in its metadata)."),
    force: bool = FORCE,
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
) -> None:
    """INT8 quantization of an exported ONNX (TopK score path kept in float), validated against the
    FP32 file on held-out images; nothing is written when a precision gate is missed."""
    from evit_deploy.export.quantize import default_int8_name, quantize_onnx
    from evit_deploy.export.validate import ValidationFailed

    output = output or default_int8_name(model)
    check_json_out(json_out, force)
    title = f"Validation: INT8 ({method}) vs FP32, ONNX Runtime"
    try:
        with err_console.status(f"quantizing {model.name}") as status:
            result = quantize_onnx(
                model, output, method=method, calibration_dir=calibration, calibration_images=calibration_images,
                validate_dir=validate_dir, accept_failed_gates=accept_failed_gates, force=force,
                on_step=status.update,
            )
    except ValidationFailed as missed:
        (err_console if as_json else console).print(validation_table(missed.report, title))
        raise
    meta = result.metadata
    record = {
        "path": str(result.path),
        "size_bytes": result.size_bytes,
        "metadata": meta.to_dict(),
        "validation": result.report.to_dict(),
    }
    if as_json:
        emit_json(record, as_json, json_out, force)
        return
    console.print(validation_table(result.report, title))
    if not result.report.passed:
        err_console.print(
            f"[yellow]warning:[/] written although it missed the gates (--accept-failed-gates): "
            f"{escape(result.report.failure_summary())}",
            highlight=False, soft_wrap=True,
        )
    calibration_info = meta.quantization.get("calibration")
    console.print(f"[bold green]quantized[/] {escape(str(result.path))} ({result.size_bytes / 2**20:.1f} MiB, int8, {method})", highlight=False)
    console.print(f"kept in float   TopK score path: {len(result.excluded)} nodes", highlight=False)
    if calibration_info:
        console.print(f"calibration     {escape(calibration_info['folder'])} ({calibration_info['images']} images)", highlight=False)
    console.print(f"next            evit-deploy bench {escape(str(result.path))} --batch 1,8", soft_wrap=True, highlight=False)
    emit_json(record, as_json, json_out, force)


@command(name="build-engine")
def build_engine_command(
    model: Path = typer.Argument(..., metavar="MODEL.onnx", help="An ONNX exported with `evit-deploy export` (FP32, or FP16 from `export --precision fp16`)."),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="FP16 where the GPU has fast FP16: an FP32 ONNX is converted to FP16 with FP32 islands first, an FP16 ONNX builds as it is; or FP32 throughout (TF32 off). Always a strongly typed network."),
    min_batch: int = typer.Option(1, help="Smallest batch the engine accepts."),
    opt_batch: int = typer.Option(64, help="Batch size the kernels are tuned for."),
    max_batch: int = typer.Option(128, help="Largest batch the engine accepts (the Predictor splits larger ones)."),
    workspace: Optional[float] = typer.Option(None, metavar="GB", help="TensorRT workspace limit in GB (default: the GPU's memory)."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, reused and updated (default: one per TensorRT version and GPU in the evit-deploy cache)."),
    fp32_layers: Optional[list[str]] = typer.Option(None, "--fp32-layers", metavar="PATTERN", help="Converting an FP32 ONNX: also keep ONNX nodes in FP32 whose name contains this text (or matches this glob); repeatable."),
    fp32_topk_scores: bool = typer.Option(True, "--fp32-topk-scores/--fp16-topk-scores", help="Converting an FP32 ONNX: keep the class-attention scores that TopK ranks in FP32."),
    fp32_layernorm: bool = typer.Option(False, "--fp32-layernorm/--fp16-layernorm", help="Converting an FP32 ONNX: keep every LayerNorm in FP32."),
    detailed_profile: bool = typer.Option(False, "--detailed-profile", help="Keep per-layer details (types, precisions) in the engine for TensorRT's engine inspector."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Engine path (default: MODEL.fp16.plan or MODEL.fp32.plan)."),
    force: bool = FORCE,
    device: Optional[str] = typer.Option(None, help="cuda or cuda:N (default: the current GPU)."),
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
) -> None:
    """Build a TensorRT engine (strongly typed, dynamic batch, FP16 by default) carrying the model's metadata."""
    from evit_deploy.engines.settings import BatchProfile, BuildSettings
    from evit_deploy.engines.tensorrt import build_engine

    check_json_out(json_out, force)
    islands = [name for name, wanted in (("topk_scores", fp32_topk_scores), ("layernorm", fp32_layernorm)) if wanted]
    settings = BuildSettings(
        precision="fp16" if fp16 else "fp32",
        profile=BatchProfile(min_batch, opt_batch, max_batch),
        workspace_gb=workspace,
        fp32_layers=tuple(fp32_layers or ()),
        fp32_islands=tuple(islands),
        timing_cache=str(timing_cache) if timing_cache else "",
        detailed_profile=detailed_profile,
    )
    with err_console.status(f"building an engine from {model.name}") as status:
        result = build_engine(model, output, settings, force, device, on_step=status.update)
    header = result.header
    record = {
        "path": str(result.path),
        "size_bytes": result.size_bytes,
        "seconds": result.seconds,
        "timing_cache": str(result.timing_cache),
        "timing_cache_saved": result.timing_cache_saved,
        "converted_to_fp16": result.converted,
        "tensorrt_warnings": result.tensorrt_warnings,
        "header": header.to_dict(),
    }
    if as_json:
        emit_json(record, as_json, json_out, force)
        return
    profile = header.settings.profile
    console.print(
        f"[bold green]built[/] {result.path} ({result.size_bytes / 2**20:.1f} MiB, "
        f"{header.precision}, strongly typed, {result.seconds:.0f} s)"
    )
    console.print(f"for             TensorRT {header.tensorrt_version}, {header.gpu_name} (compute capability {header.compute_capability})")
    console.print(f"batch profile   min {profile.min}, opt {profile.opt}, max {profile.max}; input {header.input_shape}")
    if header.precision == "fp16":
        source = "converted here from FP32" if result.converted else "FP16 graph as exported"
        islands = ", ".join(header.fp32_islands) or "none"
        console.print(f"FP32 islands    {islands}: {len(header.fp32_layers)} nodes ({source})")
    cache_note = "" if result.timing_cache_saved else " (not saved)"
    console.print(f"timing cache    {result.timing_cache}{cache_note}")
    for message in result.tensorrt_warnings[:5]:
        err_console.print(f"[yellow]TensorRT:[/] {escape(message)}", highlight=False)
    if len(result.tensorrt_warnings) > 5:
        err_console.print(f"[yellow]TensorRT:[/] {len(result.tensorrt_warnings) - 5} more warning(s) (--json lists all)")
    console.print(f"next            evit-deploy bench {escape(str(result.path))} --batch {profile.opt}", soft_wrap=True)
    emit_json(record, as_json, json_out, force)


@command()
def doctor(
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Versions, GPU, and which backends, exports, builds, serving and plots work here (and what
    to install)."""
    from evit_deploy.doctor import diagnose

    check_json_out(json_out, force)
    report = diagnose()
    if as_json:
        emit_json(report.to_dict(), as_json, json_out, force)
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
    if report.cpu is not None:
        flags = ", ".join(f"{label} {'yes' if present else 'no'}" for label, present in report.cpu.flags.items())
        capabilities = ", ".join(report.cpu.openvino_capabilities) or "OpenVINO not installed"
        console.print(
            f"CPU             {escape(report.cpu.name)}: {flags or 'flags unknown (no /proc/cpuinfo)'}; "
            f"OpenVINO capabilities: {capabilities}",
            highlight=False, soft_wrap=True,
        )
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
    emit_json(report.to_dict(), as_json, json_out, force)


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
    precision: Optional[str] = PRECISION,
    max_body_mb: float = typer.Option(10.0, help="Largest image upload on the REST front (413 beyond)."),
    shutdown_timeout: int = typer.Option(30, help="Seconds to finish in-flight requests on Ctrl-C / SIGTERM."),
    verbose: bool = typer.Option(False, help="Print Triton's own log."),
    model: Optional[str] = MODEL,
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
) -> None:
    """Serve an artifact with Triton Inference Server (via PyTriton): dynamic batching, HTTP/gRPC,
    health, Prometheus metrics, plus a REST endpoint for JPEG/PNG uploads."""
    from evit_deploy.serve import EvitServer, ServeOptions

    settings = checkpoint_settings(artifact, backend, model, keep_rate, drop_loc, fuse_token, img_size)
    options = ServeOptions(
        host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port, rest_port=rest_port,
        model_name=model_name, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
        workers=workers, max_body_mb=max_body_mb, shutdown_timeout_s=shutdown_timeout, verbose=verbose,
    )
    server = EvitServer(artifact, options, backend=backend, device=device, **settings, **_precision_options(precision))
    try:
        with err_console.status(f"loading {artifact.name} and starting Triton Inference Server"):
            server.start()
        meta, urls, backend_info = server.metadata, server.urls, server.predictors[0].backend
        console.print(
            f"[bold green]serving[/] {artifact.name} ({settings_text(meta)}) on "
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
        interrupt.handled()  # a stop is how a server ends: exit 0 once in-flight requests finish
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
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Classify images on a running `evit-deploy serve` (uploads them to its REST front)."""
    from evit_deploy.client import Client

    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise EvitDeployError(f"image not found: {', '.join(missing)}")
    check_json_out(json_out, force)
    with Client(url, model_name, rest_url=rest_url) as remote:
        results = [remote.predict_image(image, topk=topk) for image in images]
    if not as_json:
        console.print(predictions_table(f"model '{model_name}' at {url}", images, results))
    emit_json([{"image": str(i), **r} for i, r in zip(images, results)], as_json, json_out, force)


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
    model: Optional[str] = MODEL,
    keep_rate: Optional[float] = KEEP_RATE,
    drop_loc: Optional[str] = DROP_LOC,
    fuse_token: Optional[bool] = FUSE_TOKEN,
    img_size: Optional[int] = IMG_SIZE,
    as_json: bool = JSON,
    json_out: Optional[Path] = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Load a server with N concurrent clients: latency percentiles, throughput, errors, wrong answers.
    Exits 1 if any request failed or was answered with a wrong result."""
    from evit_deploy.client import load_test

    given = (model, keep_rate, drop_loc, fuse_token, img_size)
    if artifact is None and any(value is not None for value in given):
        raise UsageError("the EViT settings (--model, --keep-rate, ...) go with --artifact")
    settings = checkpoint_settings(artifact, "auto", *given) if artifact is not None else {}
    check_json_out(json_out, force)
    with err_console.status(f"{requests} requests from {concurrency} clients to {url}"):
        result = load_test(
            url, model=model_name, concurrency=concurrency, requests=requests, batch=batch,
            artifact=artifact, artifact_settings=settings, max_seconds=max_seconds,
        )
    if not as_json:
        print_load_test(result, url, model_name, concurrency, batch)
    emit_json(result.to_dict(), as_json, json_out, force)
    if result.errors or result.mismatches:
        raise typer.Exit(1)


def print_load_test(result, url: str, model_name: str, concurrency: int, batch: int) -> None:
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
    platform: str = typer.Option("auto", help="auto (from the file), onnxruntime, tensorrt, or openvino (Triton's OpenVINO backend, CPU)."),
    precision: str = typer.Option("fp32", help="--platform openvino: fp32 (serves the ONNX) or bf16 (writes OpenVINO IR, TopK scores FP32)."),
    threads: Optional[int] = typer.Option(None, help="--platform openvino: inference threads per instance (default: all cores)."),
) -> None:
    """Write a Triton Inference Server model repository (config.pbtxt, model, labels) for an artifact."""
    from evit_deploy.serve.triton_repo import write_triton_repo

    result = write_triton_repo(
        artifact, output, model_name=model_name, instances=instances, max_batch=max_batch,
        preferred_batch=preferred_batch, max_queue_delay_us=max_queue_delay_us, max_queue=max_queue,
        kind=kind, force=force, platform=platform, precision=precision, threads=threads,
    )
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"[bold green]wrote[/] {result.model_dir} ({result.spec.platform}, max_batch_size {result.spec.max_batch_size}, {instances} instance(s))")
    console.print(f"next            tritonserver --model-repository {escape(str(output.resolve()))}", soft_wrap=True)


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


dataset_app = typer.Typer(no_args_is_help=True, help="Generate datasets (no download needed).")
app.add_typer(dataset_app, name="dataset")


@command(name="shapes", group=dataset_app)
def dataset_shapes(
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write (ImageFolder layout)."),
    count: int = typer.Option(..., help="Images in all (classes balanced)."),
    seed: int = typer.Option(0, help="Same seed, same images; use different seeds for train and held-out sets."),
    img_size: int = typer.Option(224, help="Image size in pixels (a multiple of 16)."),
    force: bool = typer.Option(False, help="Replace an existing folder."),
) -> None:
    """The shapes dataset the shipped model was trained on: one coloured object on grey clutter,
    8 classes (colour family x shape), with each image's object patches in objects.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from evit_deploy.data.shapes import CLASSES, write_dataset

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("shapes", total=count)
        write_dataset(
            output, count, seed, img_size, force,
            on_image=lambda done: progress.update(task, completed=done),
        )
    console.print(
        f"[bold green]wrote[/] {escape(str(output))}: {count} images, {len(CLASSES)} classes "
        f"({', '.join(CLASSES)}), labels.txt, objects.json",
        soft_wrap=True, highlight=False,
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    interrupt.install()  # kill -> the same clean-up as Ctrl-C
    warnings.showwarning = _show_warning
    # Decoders' own notes on a damaged image or checkpoint: the one error line says it already.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"PIL\.")
    warnings.filterwarnings("ignore", message="Detected pickle protocol", module=r"torch\.")
    try:
        code = app(standalone_mode=False)
    except _PARSER_ERROR as exc:
        code = exc.exit_code
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            err_console.print(f"[red]error:[/] {escape(_parser_error_line(exc))}", highlight=False, soft_wrap=True)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _closed_stdout()
    sys.exit(code)


# click's UsageError (unknown option, missing or extra argument, bad value), found through the
# public typer.BadParameter, as typer bundles its own click.
_PARSER_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _parser_error_line(exc) -> str:
    """The parser's message in one line, and where the options are listed."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see {ctx.command_path} --help)" if ctx is not None else message


if __name__ == "__main__":
    main()
