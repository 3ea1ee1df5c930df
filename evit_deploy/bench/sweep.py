"""Keep-rate sweep: the same weights at several keep rates, timed interleaved on one backend.

Each keep rate is its own graph (TopK's K is a constant), so an ONNX sweep exports every keep
rate once from the recorded weights and reuses the exports (bench/baseline.py); a checkpoint
on PyTorch just builds each model. All variants are timed round-robin on the same input, so
load on a shared machine affects them alike. Optionally each is also evaluated on an image
folder, and the results are plotted against the keep rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evit_deploy.analysis.evaluate import evaluate
from evit_deploy.bench.baseline import cached_onnx
from evit_deploy.data.samples import find_samples
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.fileio import atomic_output
from evit_deploy.install import PLOT_INSTALL
from evit_deploy.metadata import read_onnx_metadata
from evit_deploy.model.config import EvitOverrides, keep_text
from evit_deploy.runtime.backends import backend_for, load_backend
from evit_deploy.runtime.deployment import resolve_artifact
from evit_deploy.runtime.predictor import Predictor
from evit_deploy.stats import load_warning
from evit_deploy.bench.bench import (
    DEFAULT_MIN_SECONDS,
    PLAIN_KEEP_RATE,
    BenchReport,
    describe_variant,
    time_variants,
)


@dataclass(frozen=True)
class Variant:
    keep_rate: float
    artifact: Path
    backend: str
    options: dict


def parse_keep_rates(text: str) -> list[float]:
    """'0.5,0.7,1.0' -> sorted distinct keep rates, each in (0, 1]."""
    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--keep-rates takes comma-separated numbers, got '{text}'") from None
    if not rates or any(not 0 < r <= 1 for r in rates):
        raise UsageError(f"--keep-rates takes keep rates in (0, 1], got '{text}'")
    return rates


def sweep_variants(
    path: str | Path,
    keep_rates: Sequence[float],
    backend: str = "auto",
    on_step: Callable[[str], None] = lambda step: None,
    **options,
) -> list[Variant]:
    """What to load for each keep rate: the checkpoint with that keep rate (PyTorch), or an ONNX
    exported from the source's weights (ONNX Runtime; the source itself at its own keep rate)."""
    path, backend, options = resolve_artifact(path, backend, options)
    kind, source_kind = backend_for(path, backend), backend_for(path, "auto")
    if "tensorrt" in (kind, source_kind):
        raise UsageError(
            "a keep-rate sweep re-exports the model at every keep rate: give the checkpoint or "
            "ONNX file and the pytorch or onnxruntime backend"
        )
    if kind == "pytorch":
        if source_kind != "pytorch":
            raise UsageError("the pytorch backend sweeps a checkpoint: give the .pth/.safetensors")
        evit = options.get("evit") or EvitOverrides()
        return [
            Variant(k, path, "pytorch", {**options, "evit": dataclasses.replace(evit, keep_rate=k)})
            for k in keep_rates
        ]
    evit = options.pop("evit", None)
    if source_kind == "onnxruntime":
        metadata = read_onnx_metadata(path)
    else:
        metadata = load_backend(path, "pytorch", "cpu", evit).metadata
    variants = []
    for k in keep_rates:
        if source_kind == "onnxruntime" and k == metadata.keep_rate:
            artifact = path
        else:
            on_step(f"exporting keep rate {keep_text(k)} (cached)")
            artifact = cached_onnx(metadata, k)
        variants.append(Variant(k, artifact, "onnxruntime", options))
    return variants


def sweep_keep_rates(
    path: str | Path,
    keep_rates: Sequence[float],
    batches: Sequence[int] = (64,),
    backend: str = "auto",
    device: str | None = None,
    warmup: int = 3,
    iterations: int | None = None,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    eval_dir: str | Path | None = None,
    end_to_end_dir: str | Path | None = None,
    on_step: Callable[[str], None] = lambda step: None,
    seed: int = 0,
    **options,
) -> BenchReport:
    """Time every keep rate at each batch size (interleaved), optionally also from image files
    to top-k (`end_to_end_dir`), and evaluate each on `eval_dir`."""
    busy = load_warning()  # before the exports raise the load themselves
    variants = sweep_variants(path, keep_rates, backend, on_step, **options)
    on_step("loading")
    loaded = [load_backend(v.artifact, v.backend, device, **v.options) for v in variants]
    report = BenchReport(
        runs=[], variants=[describe_variant(v.artifact, b) for v, b in zip(variants, loaded)]
    )
    time_variants(
        report, loaded, batches, warmup, iterations, min_seconds, end_to_end_dir,
        options.get("threads"), seed, on_step, busy,
    )
    if eval_dir is not None:
        num_classes = loaded[0].metadata.num_classes
        report.accuracy = evaluate_variants(
            variants, eval_dir, num_classes, max(batches), device, on_step
        )
    return report


def evaluate_variants(
    variants: Sequence[Variant],
    eval_dir: str | Path,
    num_classes: int,
    batch_size: int,
    device: str | None,
    on_step: Callable[[str], None],
) -> dict[float, dict]:
    accuracy, samples = {}, None
    for variant in variants:
        predictor = Predictor(variant.artifact, variant.backend, device, **variant.options)
        if samples is None:  # one set for all: the variants share the weights and class names
            samples = find_samples(eval_dir, num_classes, class_names=predictor.metadata.classes)
        on_step(f"evaluating keep rate {keep_text(variant.keep_rate)} on {len(samples)} images")
        accuracy[variant.keep_rate] = evaluate(predictor, samples, batch_size).to_dict()
    return accuracy


def check_plotting() -> None:
    """Fail before a long sweep, not after it, when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvitDeployError(f"--plot needs matplotlib: {PLOT_INSTALL}") from None


def plot_sweep(report: BenchReport, path: str | Path, force: bool = False) -> Path:
    """Throughput, GMACs (ours and the paper's) and, when measured, accuracy against keep rate,
    one panel each, written as a PNG (Agg, no display needed)."""
    check_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keep = [v["keep_rate"] for v in report.variants]
    panels = 3 if report.accuracy else 2
    figure = Figure(figsize=(6.4, 1.2 + 2.4 * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True)
    first = report.runs[0]
    figure.suptitle(
        f"{first.model} on {first.device}\n{first.backend} ({first.provider}, {first.precision})",
        fontsize=10,
    )

    speed = axes[0]
    gmacs = {v["keep_rate"]: v["gmacs"] for v in report.variants}
    for batch in sorted({r.batch for r in report.runs}):
        runs = sorted((r for r in report.runs if r.batch == batch), key=lambda r: r.keep_rate)
        line = speed.plot(
            [r.keep_rate for r in runs],
            [r.throughput_ips for r in runs],
            "o-",
            label=f"batch {batch}",
        )[0]
        plain = next((r for r in runs if r.keep_rate == PLAIN_KEEP_RATE), None)
        if plain is not None:  # what the speed would be if it followed the GMACs exactly
            ideal = [plain.throughput_ips * gmacs[PLAIN_KEEP_RATE] / gmacs[r.keep_rate] for r in runs]
            speed.plot(
                [r.keep_rate for r in runs],
                ideal,
                "--",
                color=line.get_color(),
                alpha=0.6,
                label=f"batch {batch}, proportional to 1/GMACs",
            )
    speed.set_ylabel("images / s")
    speed.legend(fontsize=8)

    cost = axes[1]
    cost.plot(keep, [v["gmacs"] for v in report.variants], "o-", label="counted here")
    published = [
        (v["keep_rate"], v["published_gmacs"]) for v in report.variants if v["published_gmacs"]
    ]
    if published:
        cost.plot(*zip(*published), "x", markersize=9, color="black", label="paper")
    cost.set_ylabel("GMACs / image")
    cost.legend(fontsize=8)

    if report.accuracy:
        acc = axes[2]
        rates = sorted(report.accuracy)
        for key, label in (("top1", "top-1"), ("top5", "top-5")):
            acc.plot(rates, [100 * report.accuracy[k][key] for k in rates], "o-", label=label)
        images = report.accuracy[rates[0]]["images"]
        acc.set_ylabel(f"accuracy % ({images} images)")
        acc.legend(fontsize=8)
    axes[-1].set_xlabel("keep rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    with atomic_output(path, force) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return Path(path)
