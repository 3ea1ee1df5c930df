"""Commands that run and measure artifacts: predict, bench, eval, visualize, info and plan."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from evit_deploy.cli.app import command, console, err_console
from evit_deploy.cli.options import (
    BACKEND, DEVICE, FORCE, PRECISION, TOPK_SCORES, Output, evit_options, keep_text,
    output_options, precision_options, precision_text, settings_text,
)
from evit_deploy.cli.progress import stages
from evit_deploy.cli.render import (
    bench_table, predictions_table, print_end_to_end, print_profiles, recall_table, sweep_table,
)
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model.config import EvitOverrides


@command()
@evit_options()
@output_options()
def predict(
    artifact: Path = typer.Argument(..., help=".onnx, .plan/.engine, or a .pth/.safetensors checkpoint."),
    images: list[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files (JPEG, PNG, ...) or folders (searched recursively, as eval does)."),
    topk: int = typer.Option(5, help="Classes to report per image."),
    backend: str = BACKEND,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    evit: EvitOverrides = EvitOverrides(),
    out: Output = Output(),
) -> None:
    """Classify images with any artifact.

    DeiT preprocessing, with the settings the artifact carries."""
    from evit_deploy.data.samples import find_images
    from evit_deploy.runtime import Predictor

    images = [found for path in images for found in (find_images(path) if path.is_dir() else [path])]
    predictor = Predictor(artifact, backend=backend, device=device, evit=evit, **precision_options(precision))
    predictions = predictor.predict([str(p) for p in images], topk=topk)
    if not out.as_json:  # JSON consumers read stdout; the table's reader gets the warning
        warn_if_random(predictor.metadata, artifact, "its predictions are meaningless")
        title = f"{artifact.name}: {settings_text(predictor.metadata)}"
        caption = f"{predictor.backend.name} ({predictor.backend.provider}, {predictor.backend.precision})"
        table = predictions_table(title, images, [p.to_dict() for p in predictions], predictor.metadata.classes, caption)
        console.print(table)
    records = [{"image": str(i), **p.to_dict()} for i, p in zip(images, predictions)]
    out.emit(records)


def warn_if_random(meta, artifact: Path, consequence: str) -> None:
    """One line where an artifact has seeded random weights (export without --checkpoint)."""
    if meta.weights.startswith("random:"):
        warnings.warn(f"{artifact.name} has random weights ({meta.weights}): {consequence}")


@command()
@evit_options()
@output_options()
def bench(
    artifact: Path = typer.Argument(..., help=".onnx, .plan/.engine, or a .pth/.safetensors checkpoint."),
    batch: str = typer.Option("64", help="Batch size, or a list: 1,8,64."),
    warmup: int = typer.Option(3, help="Untimed runs per variant and batch size."),
    iters: Optional[int] = typer.Option(None, help="Timed runs per variant (default: as many as fit in --min-seconds)."),
    min_seconds: float = typer.Option(3.0, help="Time each variant at least this long (without --iters)."),
    backend: str = BACKEND,
    device: Optional[str] = DEVICE,
    threads: Optional[int] = typer.Option(None, help="CPU threads (ONNX Runtime / OpenVINO / PyTorch; --end-to-end's preprocessing too)."),
    precision: Optional[str] = PRECISION,
    fp32_topk_scores: bool = TOPK_SCORES,
    baseline: bool = typer.Option(True, help="Also time the plain ViT (keep_rate 1.0) of the same weights."),
    plain: Optional[Path] = typer.Option(None, metavar="PATH", help="Time this plain ViT (one trained without token reduction) as the plain run instead."),
    end_to_end: Optional[Path] = typer.Option(
        None, "--end-to-end", metavar="DIR",
        help="Also time image files in DIR to top-5 classes at the same batch sizes, per stage: decode, resize/crop/normalise, inference, softmax/top-k.",
    ),
    profile: bool = typer.Option(False, "--profile", help="Also profile the EViT and the plain run per operator type with the runtime's own profiler (ONNX Runtime, OpenVINO), and what the drop machinery costs."),
    keep_rates: Optional[str] = typer.Option(None, help="Sweep: time these keep rates instead (re-exported, cached), e.g. 0.5,0.7,1.0."),
    plot: Optional[Path] = typer.Option(None, help="Sweep: plot throughput, GMACs (and accuracy) against keep rate to this PNG."),
    eval_dir: Optional[Path] = typer.Option(None, help="Sweep: also measure accuracy on this image folder (as for eval)."),
    evit: EvitOverrides = EvitOverrides(),
    out: Output = Output(),
) -> None:
    """Time EViT beside the plain ViT: latency and throughput.

    The two are timed interleaved. With --end-to-end also from image files to top-k, stage by
    stage; with --profile per operator."""
    from evit_deploy.fileio import check_can_write
    from evit_deploy.bench.bench import REFERENCE, bench_artifact, is_reference_kind, parse_batches
    from evit_deploy.bench.sweep import check_plotting, parse_keep_rates, plot_sweep, sweep_keep_rates

    batches = parse_batches(batch)
    if keep_rates is None and (plot or eval_dir):
        raise UsageError("--plot and --eval-dir go with --keep-rates")
    for flag, given in (("--profile", profile), ("--plain", plain)):
        if keep_rates is not None and given:
            raise UsageError(f"{flag} goes with one model, not --keep-rates")
    if keep_rates is not None and evit.keep_rate is not None:
        raise UsageError("give --keep-rate (one model) or --keep-rates (a sweep), not both")
    if plot:
        check_can_write(plot, out.force)
        check_plotting()
    timing = dict(warmup=warmup, iterations=iters, min_seconds=min_seconds, end_to_end_dir=end_to_end)
    options = ({"threads": threads} if threads else {}) | precision_options(precision, fp32_topk_scores)
    with stages(f"benchmarking {artifact.name} at batch {batch}") as shown:
        if keep_rates is None:
            report = bench_artifact(
                artifact, batches, backend, device, baseline=baseline, on_step=shown.step,
                profile=profile, plain=plain, **timing, **options, evit=evit,
            )
        else:
            report = sweep_keep_rates(
                artifact, parse_keep_rates(keep_rates), batches, backend, device,
                eval_dir=eval_dir, on_step=shown.step, **timing, **options, evit=evit,
            )
    if not out.as_json:
        console.print(bench_table(report) if keep_rates is None else sweep_table(report))
        flops = report.flops_ratio
        first = report.runs[0]
        # where the plain run is the reference itself, its ratio would only say the same again
        reference = {} if is_reference_kind(first.backend, first.provider, first.precision) else report.reference_speedup
        given_plain = f" ({escape(report.plain_artifact)}, trained without token reduction)" if report.plain_artifact else ""
        for keep, by_batch in report.speedup.items() if keep_rates is None else ():
            for size, speedup in by_batch.items():
                console.print(
                    f"batch {size}: EViT (keep {keep_text(keep)}) is [bold]{speedup:.2f}x[/] the plain ViT's{given_plain} throughput "
                    f"on {first.backend} {first.precision} (FLOPs ratio {flops[keep]:.2f}x: {speedup / flops[keep]:.0%} of it)"
                    + (f"; [bold]{reference[keep][size]:.2f}x[/] {REFERENCE} (the reference)" if size in reference.get(keep, {}) else ""),
                    highlight=False,
                )
        if report.end_to_end:
            print_end_to_end(report, end_to_end)
        if report.profiles:
            print_profiles(report.profiles)
    out.emit(report.to_dict())
    if plot:
        path = plot_sweep(report, plot, out.force)
        if not out.as_json:
            console.print(f"wrote {escape(str(path))}", highlight=False)


@command(name="eval")
@evit_options()
@output_options()
def evaluate_accuracy(
    artifact: Path = typer.Argument(..., help=".onnx, .plan/.engine, or a .pth/.safetensors checkpoint."),
    data_dir: Path = typer.Argument(..., help="ImageNet-val-style folder: DATA_DIR/<wnid>/<images>."),
    batch: int = typer.Option(64, help="Images per backend call."),
    limit: Optional[int] = typer.Option(None, help="Evaluate N images spread evenly over the folder."),
    labels: Optional[Path] = typer.Option(None, help="File of 'image-or-folder class' lines (index or wnid)."),
    backend: str = BACKEND,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    evit: EvitOverrides = EvitOverrides(),
    out: Output = Output(),
) -> None:
    """Top-1 / top-5 accuracy on an image folder, with any backend.

    With an objects.json (from `evit-deploy dataset shapes`) also how much of each object the
    drop blocks keep."""
    from evit_deploy.analysis.evaluate import evaluate
    from evit_deploy.data.samples import find_samples, spread_subset
    from evit_deploy.data.shapes import OBJECTS_FILE
    from evit_deploy.runtime import Predictor

    with stages(f"loading {artifact.name}") as shown:
        predictor = Predictor(artifact, backend=backend, device=device, evit=evit, **precision_options(precision))
        meta = predictor.metadata
        samples = spread_subset(find_samples(data_dir, meta.num_classes, labels, meta.classes), limit)
        warn_if_random(predictor.metadata, artifact, "its accuracy is meaningless")
        shown.step(f"evaluating {len(samples)} images in {data_dir}", len(samples))
        result = evaluate(predictor, samples, batch, on_batch=shown.advance)
    if not out.as_json:
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
    if (data_dir / OBJECTS_FILE).is_file() and predictor.metadata.topk_k:  # a plain ViT keeps every patch
        recall = _object_recall(artifact, data_dir, limit, evit)
        if recall is not None:
            if not out.as_json:
                console.print(recall_table(recall))
            record["object_recall"] = recall.to_dict()
    out.emit(record)


def _object_recall(artifact: Path, data_dir: Path, limit: Optional[int], evit: EvitOverrides):
    """Object recall per drop block where the artifact can say which tokens it keeps; a note
    instead where it cannot (an engine, an ONNX without kept-token outputs, a plain ViT)."""
    from evit_deploy.analysis.object_recall import object_recall
    from evit_deploy.analysis.visualize import load_token_source

    try:
        with stages(f"loading {artifact.name}'s kept tokens") as shown:
            source = load_token_source(artifact, evit)
            shown.step("object recall: which patches each drop block keeps")
            return object_recall(source, data_dir, limit)
    except EvitDeployError as exc:
        err_console.print(f"[yellow]note:[/] no object recall: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return None


@command()
@evit_options()
def visualize(
    artifact: Path = typer.Argument(..., help="A checkpoint, or an ONNX exported with --with-token-indices."),
    images: list[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files (JPEG, PNG, ...)."),
    output: Path = typer.Option(Path("."), "--output", "-o", help="Folder for <image>_tokens.png, or a .png path for one image."),
    force: bool = FORCE,
    evit: EvitOverrides = EvitOverrides(),
) -> None:
    """Draw the patches each drop block keeps (the paper's figure).

    One PNG per image: dropped patches are masked out; patches fused in that block are shaded."""
    from evit_deploy.analysis.visualize import figure_paths, load_token_source, write_figures

    paths = figure_paths(images, output, force)
    with stages(f"loading {artifact.name}") as shown:
        source = load_token_source(artifact, evit)
        console.print(settings_text(source.metadata), highlight=False)
        shown.step("drawing")
        for path in write_figures(source, images, paths, force):
            console.print(f"wrote {path}")


@command()
@evit_options(("keep_rate", "drop_loc", "fuse_token", "img_size"))
@output_options()
def info(
    target: str = typer.Argument(..., metavar="MODEL", help="A model name, a checkpoint, an exported .onnx or an engine."),
    evit: EvitOverrides = EvitOverrides(),
    out: Output = Output(),
) -> None:
    """Parameters, tokens per block and GMACs of a model.

    GMACs are counted with the tokens entering each block. Of an exported model only the
    metadata is read: no torch, no runtime."""
    from evit_deploy.analysis.planning import model_cost, resolve_target

    config, metadata = resolve_target(target, evit)
    cost = model_cost(config)
    if not out.as_json:
        paper = f"; paper {cost.published_gmacs:.1f}" if cost.published_gmacs is not None else ""
        console.print(f"[bold]{config.model}[/]{settings_text(config).removeprefix(config.model)}")
        if metadata is not None:
            console.print(f"precision       {precision_text(metadata)}", highlight=False)
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
    out.emit({**cost.to_dict(), "precision": metadata.precision if metadata is not None else None})


@command()
@evit_options(("drop_loc", "fuse_token"))
@output_options()
def plan(
    target: str = typer.Argument(..., metavar="MODEL", help="A model name, a checkpoint, an exported .onnx or an engine: its architecture and classes."),
    budget_gmacs: float = typer.Option(..., help="GMACs per image to stay within (DeiT-S at 224: 4.6)."),
    img_sizes: Optional[str] = typer.Option(None, help="Sizes to try (default 224,240,...,384)."),
    keep_rates: Optional[str] = typer.Option(None, help="Keep rates to try (default 0.40,0.45,...,1.00)."),
    evit: EvitOverrides = EvitOverrides(),
    out: Output = Output(),
) -> None:
    """The highest keep rate per input size within a GMACs budget.

    More tokens at the same cost: a larger input with a lower keep rate."""
    from evit_deploy.analysis.planning import (
        DEFAULT_PLAN_KEEP_RATES, DEFAULT_PLAN_SIZES, fit_budget, parse_numbers, resolve_config,
    )

    sizes = parse_numbers(img_sizes, int, "--img-sizes") if img_sizes else DEFAULT_PLAN_SIZES
    rates = parse_numbers(keep_rates, float, "--keep-rates") if keep_rates else DEFAULT_PLAN_KEEP_RATES
    base = resolve_config(target, evit)
    fits = fit_budget(base, budget_gmacs, sizes, rates)
    if not out.as_json:
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
    out.emit([cost.to_dict() for cost in fits])

