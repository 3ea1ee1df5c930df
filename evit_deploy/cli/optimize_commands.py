"""`evit-deploy optimize`: the fastest artifact that passes the precision gates on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from evit_deploy.cli.app import command, console, err_console
from evit_deploy.cli.options import Output, output_options
from evit_deploy.cli.progress import stages
from evit_deploy.stats import share_text


@command()
@output_options()
def optimize(
    model: Path = typer.Argument(..., metavar="MODEL", help="An FP32 ONNX from `evit-deploy export`, or a checkpoint."),
    validate_dir: Path = typer.Option(..., metavar="DIR", help="Held-out images (class folders) every candidate is judged on."),
    calibration: Optional[Path] = typer.Option(None, metavar="DIR", help="Images to calibrate INT8 static and NNCF on (without: INT8 dynamic only)."),
    batch: int = typer.Option(8, help="The batch size to time at."),
    min_seconds: float = typer.Option(2.0, help="Time each model at least this long (interleaved)."),
    output: Path = typer.Option(Path("deployment"), "--output", "-o", metavar="DIR", help="Folder for the chosen artifact and deployment.json."),
    out: Output = Output(),
) -> None:
    """The fastest runtime and precision here that passes the gates.

    Judges every runtime and precision this machine runs by the precision gates on held-out
    images, times each beside its plain ViT, and writes the fastest that passes with its
    deployment.json."""
    from evit_deploy.bench.optimize import NothingPassed, optimize as run_optimize

    try:
        with stages(f"optimizing {model.name}") as shown:
            result = run_optimize(
                model, validate_dir, output, calibration=calibration, batch=batch, min_seconds=min_seconds,
                force=out.force, on_step=shown.step, on_progress=shown.advance,
            )
    except NothingPassed as failed:
        print_optimize(failed.result, err_console if out.as_json else console)
        raise
    if out.as_json:
        out.emit(result.to_dict())
        return
    print_optimize(result, console)
    chosen = result.chosen
    console.print(
        f"[bold green]chose[/] {escape(chosen.name)}: {escape(str(result.output))}/ ({chosen.artifact.name}, "
        f"deployment.json)", highlight=False, soft_wrap=True,
    )
    console.print(f"next            evit-deploy predict {escape(str(result.output))} IMAGE...", highlight=False, soft_wrap=True)
    out.emit(result.to_dict()) if out.json_out else None


def print_optimize(result, where) -> None:
    """The table, then what each failed or skipped candidate missed, one line each."""
    where.print(optimize_table(result))
    for number, c in enumerate(noted(result), 1):
        why = f"skipped: {c.skipped}" if c.skipped else "; ".join(m for case in c.report.cases for m in case.missed_gates())
        where.print(f"({number}) {escape(c.name)}: {escape(why)}", highlight=False, soft_wrap=True)


def noted(result) -> list:
    return [c for c in result.candidates if c.skipped or not c.passed]


def optimize_table(result) -> Table:
    """One row per candidate: size, accuracy, agreement, overlap and object recall per drop block,
    speed, the speed-ups over its plain ViT and over the reference, and the gates (what a row
    missed is a numbered note under the table)."""
    machine = result.machine
    table = Table(
        title=f"optimize at batch {result.batch} on {machine.get('name') or 'this CPU'} "
        f"({', '.join(machine.get('features', [])) or 'no listed features'})",
        caption="judged against FP32 on ONNX Runtime on the held-out images; speed-ups at the same batch, "
        "timed interleaved; reference = plain FP32 on ONNX Runtime",
    )
    columns = ("candidate", "MiB", "accuracy", "top-1 agreement", "kept overlap", "object recall", "p50 ms",
               "img/s", "x plain", "x ref", "gates")
    for column in columns:
        table.add_column(column, justify="left" if column in ("candidate", "gates") else "right")
    notes = {id(c): number for number, c in enumerate(noted(result), 1)}
    for c in result.candidates:
        row = c.to_dict(result.reference_ms, result.batch)
        if c.skipped:
            table.add_row(f"[dim]{escape(c.name)}[/]", *["-"] * 9, f"[dim]skipped ({notes[id(c)]})[/]")
            continue
        ratio = lambda value: f"{value:.2f}x" if value else "-"  # noqa: E731
        gates = "[green]pass[/]" if c.passed else f"[red]FAIL[/] ({notes[id(c)]})"
        name = f"[bold]{escape(c.name)}[/] *" if c is result.chosen else escape(c.name)
        table.add_row(
            name,
            f"{row['file_bytes'] / 2**20:.1f}" if row["file_bytes"] else "-",
            f"{row['accuracy']:.2%}" if row["accuracy"] is not None else "-",
            share_text(row["top1_agreement"]) if row["top1_agreement"] is not None else "-",
            " / ".join(share_text(s, 1) for s in row["kept_overlap"]) or "-",
            " / ".join(f"{s:.1%}" for s in row["object_recall"]) or "-",
            f"{row['p50_ms']:.1f}" if row["p50_ms"] else "-",
            f"{row['images_per_s']:.0f}" if row["images_per_s"] else "-",
            ratio(row["speedup_over_plain"]),
            ratio(row["speedup_over_reference"]),
            gates,
        )
    return table
