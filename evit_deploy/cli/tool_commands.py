"""Commands about the machine and the data: doctor and dataset."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from evit_deploy.cli.app import app, command, console
from evit_deploy.cli.options import FORCE, Output, output_options
from evit_deploy.cli.progress import stages


@command()
@output_options()
def doctor(
    out: Output = Output(),
) -> None:
    """What works here: backends, exports, serving and plots.

    Versions, GPU, and which backends, exports, builds, serving and plots work here, and what to
    install for the others."""
    from evit_deploy.doctor import diagnose

    report = diagnose()
    if out.as_json:
        out.emit(report.to_dict())
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
    out.emit(report.to_dict())


dataset_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Generate datasets (no download needed).")
app.add_typer(dataset_app, name="dataset")


@command(name="shapes", group=dataset_app)
def dataset_shapes(
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write (ImageFolder layout)."),
    count: int = typer.Option(..., help="Images in all (classes balanced)."),
    seed: int = typer.Option(0, help="Same seed, same images; use different seeds for train and held-out sets."),
    img_size: int = typer.Option(224, help="Image size in pixels (a multiple of 16)."),
    force: bool = FORCE,
) -> None:
    """The shapes dataset the shipped model was trained on.

    One coloured object on grey clutter, 8 classes (colour family x shape), with each image's
    object patches in objects.json."""
    from evit_deploy.data.shapes import CLASSES, write_dataset

    with stages(f"generating {count} images in {output}", count) as shown:
        write_dataset(output, count, seed, img_size, force, on_image=shown.advance)
    console.print(
        f"[bold green]wrote[/] {escape(str(output))}: {count} images, {len(CLASSES)} classes "
        f"({', '.join(CLASSES)}), labels.txt, objects.json",
        soft_wrap=True, highlight=False,
    )

