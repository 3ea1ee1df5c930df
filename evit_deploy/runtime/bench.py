"""Latency and throughput of an artifact, EViT beside its plain ViT on the same backend.

Shared machines are noisy, so variants are timed interleaved (A, B, A, B, ...) on the same input
and compared by median latency. Each iteration times the model alone: inputs are placed on the
device once (`Backend.prepare`) and the backend waits for its result (CUDA synchronised).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evit_deploy.errors import UsageError
from evit_deploy.model.flops import count_macs, count_params
from evit_deploy.runtime.backends import Backend, backend_for, load_backend

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

    def to_dict(self) -> dict:
        return asdict(self)


REFERENCE = "plain FP32 on ONNX Runtime (CPU)"


@dataclass
class BenchReport:
    runs: list[BenchResult]
    # batch -> plain p50 / EViT p50, plain on the same backend at the same precision
    speedup: dict[int, float] = field(default_factory=dict)
    flops_ratio: float | None = None  # plain GMACs / EViT GMACs: what the speed-up approaches
    # batch -> reference p50 / EViT p50: the reference is REFERENCE, for CPU runs (timed
    # interleaved with the others, or the plain run itself when that is ONNX Runtime FP32)
    reference_speedup: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {"runs": [r.to_dict() for r in self.runs]}
        if self.speedup:
            out["speedup"] = {str(b): s for b, s in self.speedup.items()}
            out["flops_ratio"] = self.flops_ratio
        if self.reference_speedup:
            out["reference"] = REFERENCE
            out["reference_speedup"] = {str(b): s for b, s in self.reference_speedup.items()}
        return out


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
    batch: np.ndarray,
    warmup: int = 3,
    iterations: int | None = None,
    min_seconds: float = DEFAULT_MIN_SECONDS,
) -> list[np.ndarray]:
    """Seconds per run for each backend, timed A, B, A, B, ... until each has `iterations` runs
    (or, without `iterations`, at least `min_seconds` of runs and 5 runs)."""
    if iterations is not None and iterations <= 0:
        raise UsageError(f"--iters must be positive, got {iterations}")
    if warmup < 0 or min_seconds <= 0:
        raise UsageError("--warmup must be >= 0 and --min-seconds > 0")
    for backend in backends:
        if backend.max_batch is not None and len(batch) > backend.max_batch:
            raise UsageError(
                f"batch {len(batch)} exceeds the {backend.name} artifact's max batch "
                f"{backend.max_batch}; rebuild it with a larger --max-batch"
            )
    prepared = [backend.prepare(batch) for backend in backends]
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


def summarize(backend: Backend, batch: int, seconds: np.ndarray) -> BenchResult:
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
        latency_ms=_percentiles(ms),
        throughput_ips=batch / float(np.median(seconds)),
        gmacs=count_macs(config) / 1e9,
        params_m=count_params(config) / 1e6,
        gpu_compute_ms=_percentiles(np.asarray(gpu_ms)) if gpu_ms else None,
    )


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


def load_baseline(primary: Backend, path: Path, backend: str, device: str | None, options: dict) -> Backend:
    """The plain ViT of the same weights on the same backend with the same settings (an INT8
    artifact's plain ViT quantized the same way)."""
    kind = backend_for(path, backend)
    if kind == "pytorch":
        return load_backend(path, "pytorch", device, **{**options, "keep_rate": 1.0})
    if kind == "tensorrt":
        from evit_deploy.engines.tensorrt import build_baseline_engine

        return load_backend(build_baseline_engine(path, device), "tensorrt", device)
    from evit_deploy.runtime.baseline import baseline_onnx, quantized_baseline_onnx

    if primary.metadata.precision == "int8":
        plain = quantized_baseline_onnx(primary.metadata)
    else:
        plain = baseline_onnx(primary.metadata)
    return load_backend(plain, kind, device, **options)


def runs_on_cpu(backend: Backend) -> bool:
    return backend.name == "openvino" or backend.provider in ("CPUExecutionProvider", "cpu (eager)")


def is_reference_kind(backend: Backend) -> bool:
    """Whether a plain run on `backend` is the reference itself (ONNX Runtime FP32 on the CPU)."""
    return backend.name == "onnxruntime" and backend.provider == "CPUExecutionProvider" and backend.precision == "fp32"


def load_reference(primary: Backend, options: dict) -> Backend:
    """The plain FP32 ViT of the same weights on ONNX Runtime's CPU provider."""
    from evit_deploy.runtime.baseline import baseline_onnx

    threads = {"threads": options["threads"]} if options.get("threads") else {}
    return load_backend(baseline_onnx(primary.metadata), "onnxruntime", "cpu", **threads)


def bench_artifact(
    path: str | Path,
    batches: Sequence[int] = (64,),
    backend: str = "auto",
    device: str | None = None,
    warmup: int = 3,
    iterations: int | None = None,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    baseline: bool = True,
    seed: int = 0,
    **options,
) -> BenchReport:
    """Time `path` at each batch size; for an EViT artifact also its plain ViT and, on the CPU,
    the reference (plain FP32 on ONNX Runtime), all interleaved."""
    path = Path(path)
    primary = load_backend(path, backend, device, **options)
    variants = [primary]
    with_baseline = baseline and primary.metadata.to_config().is_evit
    if with_baseline:
        variants.append(load_baseline(primary, path, backend, device, options))
    with_reference = with_baseline and runs_on_cpu(primary)
    if with_reference and not is_reference_kind(variants[-1]):
        variants.append(load_reference(primary, options))
    rng = np.random.default_rng(seed)
    report = BenchReport(runs=[])
    for batch in batches:
        size = primary.metadata.img_size
        inputs = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        seconds = interleaved_latencies(variants, inputs, warmup, iterations, min_seconds)
        results = [summarize(v, batch, s) for v, s in zip(variants, seconds)]
        report.runs.extend(results)
        if with_baseline:
            evit, plain, reference = results[0], results[1], results[-1]
            report.speedup[batch] = plain.latency_ms["p50"] / evit.latency_ms["p50"]
            report.flops_ratio = plain.gmacs / evit.gmacs
            if with_reference:
                report.reference_speedup[batch] = reference.latency_ms["p50"] / evit.latency_ms["p50"]
    return report
