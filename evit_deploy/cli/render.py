"""Tables and summaries of results: what the commands print when --json is not given."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from evit_deploy.cli.app import console
from evit_deploy.cli.options import keep_text
from evit_deploy.stats import share_text


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
            share_text(case.top1_agreement, 1),
            kept,
            "[green]pass[/]" if case.passed else "[red]FAIL[/]",
        )
    return table


def precision_table(report, title: str) -> Table:
    """A reduced precision against FP32: top-1 agreement, accuracy reference -> candidate, the
    kept-token overlap and the object recall per drop block (gated on the held-out row), and the
    share of images keeping exactly FP32's tokens (reported)."""
    table = Table(title=title, caption=f"{report.precision} gates (held-out row): {report.gates.describe()}")
    columns = ("inputs", "batch", "top-1 agreement", "accuracy", "kept-token overlap per drop block",
               "object recall (FP32 -> this)", "same kept set", "result")
    for column in columns:
        table.add_column(column, justify="left" if column in ("inputs", "result") else "right")
    for case in report.cases:
        accuracy = "-"
        if case.accuracy is not None and case.reference_accuracy is not None:
            accuracy = f"{case.reference_accuracy:.2%} -> {case.accuracy:.2%}"
        recall = " / ".join(
            f"{r:.1%}->{c:.1%}" for r, c in zip(case.reference_object_recall, case.object_recall)
        ) or "-"
        if not case.gated:
            result = "reported"
        elif case.passed:
            result = "[green]pass[/]"
        else:
            result = "[red]FAIL[/]: " + escape("; ".join(case.missed_gates()))
        table.add_row(
            case.name, str(case.batch), share_text(case.top1_agreement), accuracy,
            " / ".join(share_text(s) for s in case.kept_overlap) or "-", recall,
            " / ".join(share_text(s, 1) for s in case.kept_identical) or "-", result,
        )
    return table


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


def bench_table(report) -> Table:
    first = report.runs[0]
    table = Table(
        title=f"{first.backend} ({first.provider}, {first.precision}) on {first.device}",
        caption="latency per batch in ms; throughput = batch / median latency"
        + (f"\nkeep 1.0 on {first.backend}: {escape(report.plain_artifact)}, trained without token reduction"
           if report.plain_artifact else ""),
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
            keep_text(run.keep_rate),
            run.backend,
            run.precision,
            str(run.batch),
            *(f"{lat[k]:.1f}" if lat[k] < 1000 else f"{lat[k]:.0f}" for k in ("mean", "p50", "p90", "p99")),
            f"{run.throughput_ips:.1f}",
            f"{run.gmacs:.2f}",
            str(run.iterations),
        )
    return table


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
            keep_text(row.keep_rate), str(row.batch),
            *(f"{row.stage_ms[s]:.1f} ({share[s]:.0%})" for s in STAGES),
            f"{row.total_ms:.1f}", f"{row.throughput_ips:.1f}",
            f"{model_only[(row.keep_rate, row.batch, row.backend, row.precision)]:.1f}",
        )
    console.print(table)
    for keep, by_batch in report.end_to_end_speedup.items():
        for size, speedup in by_batch.items():
            console.print(
                f"batch {size}: end to end, EViT (keep {keep_text(keep)}) is [bold]{speedup:.2f}x[/] the plain "
                f"ViT's throughput (model only: {report.speedup[keep][size]:.2f}x)"
            )


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
            keep_text(run.keep_rate),
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


def print_profiles(profiles) -> None:
    """Per batch size: time per operator type, EViT beside plain, and the drop machinery's cost."""
    for batch in sorted({p.batch for p in profiles}):
        rows = [p for p in profiles if p.batch == batch]
        evit = next((p for p in rows if p.keep_rate != 1.0), None)
        plain = next((p for p in rows if p.keep_rate == 1.0), None)
        shown = [p for p in (evit, plain) if p is not None]
        first = shown[0]
        table = Table(
            title=f"Profile at batch {batch}: {first.backend} {first.precision}, ms per inference "
            f"(the runtime's profiler, {first.runs} runs)",
            caption="op types as the runtime executes them (fused kernels included)",
        )
        table.add_column("op type")
        for p in shown:
            table.add_column(f"keep {keep_text(p.keep_rate)}", justify="right")
        if evit and plain:
            table.add_column("plain / EViT", justify="right")
        types = list(dict.fromkeys(t for p in shown for t in p.by_type))
        for op_type in types:
            cells = [f"{p.by_type.get(op_type, 0.0):.2f}" for p in shown]
            if evit and plain:
                e, b = evit.by_type.get(op_type, 0.0), plain.by_type.get(op_type, 0.0)
                cells.append(f"{b / e:.2f}x" if e > 0 and b > 0 else "-")
            table.add_row(op_type, *cells)
        totals = [f"{p.total_ms:.2f}" for p in shown]
        if evit and plain:
            totals.append(f"{plain.total_ms / evit.total_ms:.2f}x")
        table.add_row("[bold]total[/]", *totals)
        console.print(table)
        if evit is not None:
            parts = ", ".join(f"{name} {ms:.2f} ms" for name, ms in evit.drop_ms.items()) or "none found"
            console.print(
                f"batch {batch}: the drop machinery (class-attention scores, TopK, gather, fused "
                f"token) costs {sum(evit.drop_ms.values()):.2f} ms, {evit.drop_share:.1%} of the "
                f"EViT run ({parts})",
                highlight=False,
            )
