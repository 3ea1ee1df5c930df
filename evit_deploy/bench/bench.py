"""Latency and throughput of an artifact, EViT beside its plain ViT on the same backend.

Shared machines are noisy, so variants are timed interleaved (A, B, A, B, ...) on the same input
and compared by median latency. Each iteration times the model alone: inputs are placed on the
device once (`Backend.prepare`) and the backend waits for its result (CUDA synchronised).
With an image folder, the whole path from files to top-k is timed too (bench/end_to_end.py).

`BenchReport` is what a single bench and a keep-rate sweep (bench/sweep.py) both produce, and
its `to_dict` is the one JSON schema of both (README, "bench JSON").
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evit_deploy.analysis.planning import model_cost
from evit_deploy.bench.baseline import baseline_engine, baseline_onnx, quantized_baseline_onnx
from evit_deploy.bench.end_to_end import EndToEndResult, time_end_to_end
from evit_deploy.bench.profile import Profile, profile_variants
from evit_deploy.data.samples import find_images
from evit_deploy.errors import UsageError
from evit_deploy.model.config import EvitOverrides, keep_text
from evit_deploy.model.flops import count_macs, count_params
from evit_deploy.runtime.backends import backend_for, load_backend
from evit_deploy.runtime.base import Backend
from evit_deploy.runtime.deployment import resolve_artifact
from evit_deploy.stats import latency_summary, load_warning
from evit_deploy.precisions import FP32, INT8

DEFAULT_MIN_SECONDS = 3.0


@dataclass
class BenchResult:
    model: str
    keep_rate: float
    backend: str
    provider: str
    precision: str
    device: str
    batch: int
    iterations: int
    latency_ms: dict[str, float]  # mean, p50, p90, p99 per batch
    throughput_ips: float  # batch / median latency
    gmacs: float  # per image
    params_m: float
    gpu_compute_ms: dict[str, float] | None = None  # where the backend measures it (TensorRT)
    artifact: str = ""  # the file timed (its name)

    def to_dict(self) -> dict:
        return asdict(self)


PLAIN_KEEP_RATE = 1.0
REFERENCE = "plain FP32 on ONNX Runtime (CPU)"


@dataclass
class BenchReport:
    runs: list[BenchResult]
    variants: list[dict] = field(default_factory=list)  # see describe_variant
    accuracy: dict[float, dict] = field(default_factory=dict)  # keep rate -> EvalResult dict
    end_to_end: list[EndToEndResult] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)  # bench --profile
    plain_artifact: str | None = None  # bench --plain: the plain ViT given, timed as the plain run

    @property
    def speedup(self) -> dict[float, dict[int, float]]:
        """keep rate -> batch -> throughput over the plain ViT's (keep 1.0) on the same backend at
        the same precision, the model alone."""
        return _over_plain(self.runs, lambda run: run.latency_ms["p50"])

    @property
    def reference_speedup(self) -> dict[float, dict[int, float]]:
        """keep rate -> batch -> throughput over REFERENCE's, for CPU runs (timed interleaved with
        the others, or the plain run itself when that is ONNX Runtime FP32)."""
        reference = {run.batch: run.latency_ms["p50"] for run in self.runs if is_reference_run(run)}
        ratios: dict[float, dict[int, float]] = {}
        for run in self.runs:
            if run.keep_rate != PLAIN_KEEP_RATE and run.batch in reference:
                ratios.setdefault(run.keep_rate, {})[run.batch] = reference[run.batch] / run.latency_ms["p50"]
        return ratios

    @property
    def end_to_end_speedup(self) -> dict[float, dict[int, float]]:
        """The same as speedup from image files to top-k classes."""
        return _over_plain(self.end_to_end, lambda run: run.total_ms)

    @property
    def flops_ratio(self) -> dict[float, float]:
        """keep rate -> plain GMACs / its GMACs: the speed-up its FLOPs promise."""
        gmacs: dict[float, float] = {}
        for variant in self.variants:  # the plain run comes before the reference (maybe at another size)
            gmacs.setdefault(variant["keep_rate"], variant["gmacs"])
        plain = gmacs.get(PLAIN_KEEP_RATE)
        return {k: plain / g for k, g in gmacs.items() if plain and k != PLAIN_KEEP_RATE}

    def to_dict(self) -> dict:
        def by_rate(ratios: dict[float, dict[int, float]]) -> dict:
            return {keep_text(k): {str(b): s for b, s in by_batch.items()} for k, by_batch in ratios.items()}

        return {
            "runs": [r.to_dict() for r in self.runs],
            "variants": self.variants,
            "speedup": by_rate(self.speedup),
            "flops_ratio": {keep_text(k): r for k, r in self.flops_ratio.items()},
            "accuracy": {keep_text(k): a for k, a in self.accuracy.items()},
            "end_to_end": [e.to_dict() for e in self.end_to_end],
            "end_to_end_speedup": by_rate(self.end_to_end_speedup),
            "reference": REFERENCE if self.reference_speedup else None,
            "reference_speedup": by_rate(self.reference_speedup),
            "profiles": [p.to_dict() for p in self.profiles],
            "plain_artifact": self.plain_artifact,
        }


def is_reference_run(run) -> bool:
    """A plain FP32 run on ONNX Runtime's CPU provider: REFERENCE."""
    return run.keep_rate == PLAIN_KEEP_RATE and is_reference_kind(run.backend, run.provider, run.precision)


def is_reference_kind(backend: str, provider: str, precision: str) -> bool:
    return backend == "onnxruntime" and provider == "CPUExecutionProvider" and precision == FP32


def _over_plain(rows: Sequence, time_of: Callable) -> dict[float, dict[int, float]]:
    """keep rate -> batch -> the plain ViT's time / this row's time, for rows (runs or
    end-to-end runs) that have a plain row at the same batch size, backend and precision."""
    def key(row):
        return row.batch, row.backend, row.precision

    plain = {key(row): time_of(row) for row in rows if row.keep_rate == PLAIN_KEEP_RATE}
    ratios: dict[float, dict[int, float]] = {}
    for row in rows:
        if row.keep_rate != PLAIN_KEEP_RATE and key(row) in plain:
            ratios.setdefault(row.keep_rate, {})[row.batch] = plain[key(row)] / time_of(row)
    return ratios


def describe_variant(artifact: str | Path, backend: Backend) -> dict:
    """One timed model: keep_rate, artifact, backend, precision, gmacs, published_gmacs,
    tokens_per_block."""
    cost = model_cost(backend.metadata.to_config())
    return {
        "keep_rate": cost.config.keep_rate,
        "artifact": str(artifact),
        "backend": backend.name,
        "precision": backend.precision,
        "gmacs": cost.gmacs,
        "published_gmacs": cost.published_gmacs,
        "tokens_per_block": cost.tokens_per_block,
    }


def parse_batches(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]; every size positive."""
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--batch takes comma-separated positive integers, got '{text}'") from None
    if not batches or any(b <= 0 for b in batches):
        raise UsageError(f"--batch takes comma-separated positive integers, got '{text}'")
    return batches


def interleaved_latencies(
    backends: Sequence[Backend],
    batch: np.ndarray | Sequence[np.ndarray],
    warmup: int = 3,
    iterations: int | None = None,
    min_seconds: float = DEFAULT_MIN_SECONDS,
) -> list[np.ndarray]:
    """Seconds per run for each backend, timed A, B, A, B, ... until each has `iterations` runs
    (or, without `iterations`, at least `min_seconds` of runs and 5 runs). `batch`: one input for
    all, or one per backend (models of other input sizes)."""
    if iterations is not None and iterations <= 0:
        raise UsageError(f"--iters must be positive, got {iterations}")
    if warmup < 0 or min_seconds <= 0:
        raise UsageError("--warmup must be >= 0 and --min-seconds > 0")
    batches = list(batch) if isinstance(batch, (list, tuple)) else [batch] * len(backends)
    for backend, inputs in zip(backends, batches):
        if backend.max_batch is not None and len(inputs) > backend.max_batch:
            raise UsageError(
                f"batch {len(inputs)} exceeds the {backend.name} artifact's max batch "
                f"{backend.max_batch}; rebuild it with a larger --max-batch"
            )
    prepared = [backend.prepare(inputs) for backend, inputs in zip(backends, batches)]
    for backend, inputs in zip(backends, prepared):
        for _ in range(warmup):
            backend.run_prepared(inputs)
        backend.take_gpu_compute_ms()  # drop the warm-up runs
    times: list[list[float]] = [[] for _ in backends]

    def finished() -> bool:
        if iterations is not None:
            return all(len(t) >= iterations for t in times)
        return all(len(t) >= 5 and sum(t) >= min_seconds for t in times)

    while not finished():
        for backend, inputs, record in zip(backends, prepared, times):
            start = time.perf_counter()
            backend.run_prepared(inputs)
            record.append(time.perf_counter() - start)
    return [np.asarray(t) for t in times]


def summarize(backend: Backend, batch: int, seconds: np.ndarray, artifact: str) -> BenchResult:
    ms = seconds * 1e3
    config = backend.metadata.to_config()
    gpu_ms = backend.take_gpu_compute_ms()
    return BenchResult(
        model=config.model,
        keep_rate=config.keep_rate,
        backend=backend.name,
        provider=backend.provider,
        precision=backend.precision,
        device=backend.device_name,
        batch=batch,
        iterations=len(ms),
        latency_ms=latency_summary(ms),
        throughput_ips=batch / float(np.median(seconds)),
        gmacs=count_macs(config) / 1e9,
        params_m=count_params(config) / 1e6,
        gpu_compute_ms=latency_summary(gpu_ms) if gpu_ms else None,
        artifact=artifact,
    )


def load_baseline(
    primary: Backend, path: Path, backend: str, device: str | None, options: dict
) -> tuple[Path, Backend]:
    """The plain ViT of the same weights on the same backend with the same settings (an INT8
    artifact's plain ViT quantized the same way), and its file."""
    kind = backend_for(path, backend)
    if kind == "pytorch":
        evit = dataclasses.replace(options.get("evit") or EvitOverrides(), keep_rate=PLAIN_KEEP_RATE)
        return path, load_backend(path, "pytorch", device, **{**options, "evit": evit})
    if kind == "tensorrt":
        engine = baseline_engine(path, device)
        return engine, load_backend(engine, "tensorrt", device)
    if primary.metadata.precision == INT8:
        plain = quantized_baseline_onnx(primary.metadata)
    else:
        plain = baseline_onnx(primary.metadata)
    return plain, load_backend(plain, kind, device, **options)


def load_plain(primary: Backend, path: str | Path, backend: str, device: str | None, options: dict) -> Backend:
    """A plain ViT artifact given to time beside `primary`, on the same backend with the same
    settings; refused unless it is plain and has the same classes (its input size may differ:
    EViT at a higher resolution for the cost of a plain ViT)."""
    plain = load_backend(path, backend, device, **options)
    meta, evit = plain.metadata, primary.metadata
    problem = (
        f"is an EViT (keep rate {meta.keep_rate:g}), not a plain ViT" if meta.to_config().is_evit
        else f"has {meta.num_classes} classes, the EViT {evit.num_classes}" if meta.num_classes != evit.num_classes
        else "names its classes differently" if meta.classes != evit.classes else ""
    )
    if problem:
        plain.close()
        raise UsageError(f"--plain {Path(path).name} {problem}")
    return plain


def runs_on_cpu(backend: Backend) -> bool:
    """A CPU deployment runtime (ONNX Runtime's CPU provider, OpenVINO): where REFERENCE is
    timed beside it. PyTorch eager is the reference's source, not a deployment."""
    return backend.name == "openvino" or backend.provider == "CPUExecutionProvider"


def load_reference(primary: Backend, options: dict) -> tuple[Path, Backend]:
    """REFERENCE: the plain FP32 ViT of the same weights on ONNX Runtime's CPU provider."""
    threads = {"threads": options["threads"]} if options.get("threads") else {}
    plain = baseline_onnx(primary.metadata)
    return plain, load_backend(plain, "onnxruntime", "cpu", **threads)


def time_variants(
    report: BenchReport,
    variants: Sequence[Backend],
    batches: Sequence[int],
    warmup: int,
    iterations: int | None,
    min_seconds: float,
    end_to_end_dir: str | Path | None = None,
    threads: int | None = None,
    seed: int = 0,
    on_step: Callable[[str], None] = lambda step: None,
    busy: str | None = None,
) -> None:
    """Model-only runs of every variant at each batch size (interleaved), and with an image
    folder the end-to-end runs at the same batch sizes, added to `report`. `busy`: the load
    warning taken when the run began, given once the timings are taken (never before an error)."""
    images = find_images(end_to_end_dir) if end_to_end_dir is not None else []
    files = [Path(v["artifact"]).name for v in report.variants]
    rng = np.random.default_rng(seed)
    for batch in batches:
        # a batch too big for memory fails here, before its stage is announced: one error line
        noise = {size: rng.standard_normal((batch, 3, size, size), dtype=np.float32)
                 for size in sorted({v.metadata.img_size for v in variants})}  # each at its own input size
        inputs = [noise[v.metadata.img_size] for v in variants]
        on_step(f"timing {len(variants)} model(s) at batch {batch}")
        seconds = interleaved_latencies(variants, inputs, warmup, iterations, min_seconds)
        report.runs.extend(summarize(v, batch, s, f) for v, s, f in zip(variants, seconds, files, strict=True))
        if images:
            on_step(f"timing {len(variants)} model(s) end to end at batch {batch}")
            report.end_to_end.extend(
                time_end_to_end(variants, images, batch, threads, iterations, min_seconds)
            )
    if busy:
        warnings.warn(busy)


def bench_artifact(
    path: str | Path,
    batches: Sequence[int] = (64,),
    backend: str = "auto",
    device: str | None = None,
    warmup: int = 3,
    iterations: int | None = None,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    baseline: bool = True,
    end_to_end_dir: str | Path | None = None,
    seed: int = 0,
    on_step: Callable[[str], None] = lambda step: None,
    profile: bool = False,
    plain: str | Path | None = None,
    **options,
) -> BenchReport:
    """Time `path` at each batch size; for an EViT artifact also its plain ViT and, on the CPU,
    REFERENCE, all interleaved. With `end_to_end_dir`, also the whole path from its image files
    to top-k classes; with `profile`, per-operator times of the EViT and the plain run. `path`
    may be a deployment folder (runtime/deployment.py). `plain`: a plain ViT artifact to time as
    the plain run (one trained without token reduction) instead of these weights at keep 1.0."""
    path, backend, options = resolve_artifact(path, backend, options)
    busy = load_warning()
    with contextlib.ExitStack() as loaded:
        primary = loaded.enter_context(load_backend(path, backend, device, **options))
        if profile and not primary.profiles:
            raise UsageError(f"--profile works on onnxruntime and openvino, not on {primary.name}")
        files, variants = [path], [primary]
        given_plain = plain is not None
        if given_plain and not primary.metadata.to_config().is_evit:
            raise UsageError(f"{Path(path).name} is a plain ViT: --plain times a plain ViT beside an EViT")
        if baseline and primary.metadata.to_config().is_evit:
            on_step("loading the plain ViT")
            if plain is None:
                plain_path, plain = load_baseline(primary, path, backend, device, options)
            else:
                plain_path, plain = Path(plain), load_plain(primary, plain, backend, device, options)
            files.append(plain_path)
            variants.append(loaded.enter_context(plain))
            if runs_on_cpu(primary) and not is_reference_kind(plain.name, plain.provider, plain.precision):
                on_step("loading the reference: plain FP32 on ONNX Runtime")
                reference_path, reference = load_reference(primary, options)
                files.append(reference_path)
                variants.append(loaded.enter_context(reference))
        report = BenchReport(
            runs=[], variants=[describe_variant(f, v) for f, v in zip(files, variants)],
            plain_artifact=Path(files[1]).name if given_plain and len(files) > 1 else None,
        )
        time_variants(
            report, variants, batches, warmup, iterations, min_seconds, end_to_end_dir,
            options.get("threads"), seed, on_step, busy,
        )
        if profile:
            for size in batches:
                on_step(f"profiling at batch {size}")
                report.profiles.extend(profile_variants(variants[:2], files[:2], size, seed=seed))
    return report
