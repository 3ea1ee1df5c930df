"""`evit-deploy optimize`: the fastest artifact that passes the precision gates on this machine.

The answer depends on the machine (AMX, AVX-512 BF16, VNNI or none of them), so it is measured
here instead of read from a table. Candidates are every (runtime, precision) this machine runs:
ONNX Runtime FP32 (the reference's own path), OpenVINO FP32 and, where the CPU has it natively,
BF16; INT8 by each quantization method on ONNX Runtime and OpenVINO, and on OpenVINO with native
BF16 the calibrated INT8 files with their float parts in BF16 (INT8_BF16_METHODS); with a CUDA GPU,
ONNX Runtime CUDA FP32 and FP16. Each is judged against the FP32 ONNX on ONNX Runtime by the gates of its
precision on held-out images (export/validate.py), then all are timed at one batch size, each
beside its plain ViT at the same precision, interleaved with the reference (plain FP32 on ONNX
Runtime). The fastest that passes is written with deployment.json (runtime/deployment.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from evit_deploy.bench.baseline import baseline_onnx
from evit_deploy.bench.bench import interleaved_latencies, load_baseline, load_reference
from evit_deploy.data.samples import find_images
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export.onnx import export_onnx
from evit_deploy.export.precision import convert_to_fp16
from evit_deploy.export.quantize import METHODS, quantize_onnx
from evit_deploy.export.validate import ValidationReport, gates_for, onnx_runner, validate
from evit_deploy.fileio import atomic_folder, occupied
from evit_deploy.metadata import load_onnx, onnx_metadata, read_onnx_metadata, stamp_metadata
from evit_deploy.precisions import BF16, FP16, FP32, INT8, run_precision
from evit_deploy.runtime.backends import load_backend
from evit_deploy.runtime.cpu_features import missing_bf16, probe_cpu
from evit_deploy.runtime.deployment import DEPLOYMENT_FILE, FORMAT, VERSION, this_machine

DEFAULT_BATCH = 8
DEFAULT_MIN_SECONDS = 2.0
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
# INT8 files OpenVINO runs with BF16 float parts: those whose multiplies it runs in INT8 (QDQ).
# Under the FP32 hint their layer norms, GELU, softmax and attention run in FP32 where the BF16
# candidate runs them in BF16; a dynamic file's multiplies run in FP32 on OpenVINO either way.
INT8_BF16_METHODS = ("static", "nncf")


@dataclass
class Candidate:
    """One way to run the model, and what was found about it."""

    name: str  # "OpenVINO BF16", "ONNX Runtime INT8 (dynamic)"
    backend: str  # onnxruntime | openvino
    precision: str  # as the backend reports it (run_precision): fp32, bf16, int8, int8+bf16, fp16
    method: str | None = None  # INT8: the quantization method
    options: dict = field(default_factory=dict)  # load_backend options, as deployment.json records them
    cuda: bool = False
    skipped: str = ""  # why it was not tried on this machine
    artifact: Path | None = None
    file_bytes: int | None = None
    report: ValidationReport | None = None
    evit_ms: float | None = None  # p50 per batch
    plain_ms: float | None = None

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.passed

    @property
    def held_out(self):
        return None if self.report is None else next((c for c in self.report.cases if c.gated), None)

    def to_dict(self, reference_ms: float | None, batch: int) -> dict:
        held = self.held_out
        return {
            "name": self.name,
            "backend": self.backend,
            "precision": self.precision,
            "method": self.method,
            "options": self.options,
            "skipped": self.skipped or None,
            "file_bytes": self.file_bytes,
            "passed": self.passed if self.report else None,
            "missed": [m for c in self.report.cases for m in c.missed_gates()] if self.report else [],
            "accuracy": held.accuracy if held else None,
            "reference_accuracy": held.reference_accuracy if held else None,
            "top1_agreement": held.top1_agreement if held else None,
            "kept_overlap": list(held.kept_overlap) if held else [],
            "object_recall": list(held.object_recall) if held else [],
            "reference_object_recall": list(held.reference_object_recall) if held else [],
            "p50_ms": self.evit_ms,
            "images_per_s": batch * 1e3 / self.evit_ms if self.evit_ms else None,
            "plain_p50_ms": self.plain_ms,
            "speedup_over_plain": self.plain_ms / self.evit_ms if self.plain_ms and self.evit_ms else None,
            "speedup_over_reference": reference_ms / self.evit_ms if reference_ms and self.evit_ms else None,
        }


@dataclass
class OptimizeResult:
    candidates: list[Candidate]
    chosen: Candidate | None
    batch: int
    reference_ms: float | None  # plain FP32 on ONNX Runtime, p50 per batch
    machine: dict
    output: Path | None = None

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "machine": self.machine,
            "reference": "plain FP32 on ONNX Runtime (CPU)",
            "reference_p50_ms": self.reference_ms,
            "candidates": [c.to_dict(self.reference_ms, self.batch) for c in self.candidates],
            "chosen": self.chosen.name if self.chosen else None,
            "output": str(self.output) if self.output else None,
        }


class NothingPassed(EvitDeployError):
    """No candidate passed the gates: nothing was written. Carries the result for the table."""

    def __init__(self, message: str, result: OptimizeResult):
        super().__init__(message)
        self.result = result


def plan_candidates(
    calibration: bool, bf16_problem: str | None, openvino: bool, nncf: bool, cuda: bool
) -> list[Candidate]:
    """Every candidate, in the table's order; those this machine cannot try say why."""
    no_openvino = "" if openvino else "OpenVINO is not installed (pip install 'evit-deploy[openvino]')"
    candidates = [
        Candidate("ONNX Runtime FP32", "onnxruntime", FP32),
        Candidate("OpenVINO FP32", "openvino", FP32, options={"precision": FP32}, skipped=no_openvino),
        Candidate("OpenVINO BF16", "openvino", BF16, options={"precision": BF16},
                  skipped=no_openvino or (bf16_problem or "")),
    ]
    for method in METHODS:
        needs = ""
        if method != "dynamic" and not calibration:
            needs = "calibrates on images: pass --calibration DIR"
        elif method == "nncf" and not nncf:
            needs = "needs NNCF (pip install 'evit-deploy[openvino]')"
        candidates.append(Candidate(f"ONNX Runtime INT8 ({method})", "onnxruntime", INT8, method, skipped=needs))
        candidates.append(Candidate(f"OpenVINO INT8 ({method})", "openvino", INT8, method,
                                    options={"precision": FP32}, skipped=needs or no_openvino))
        if method in INT8_BF16_METHODS:
            candidates.append(Candidate(f"OpenVINO INT8 ({method}) + BF16", "openvino", run_precision(INT8, BF16),
                                        method, options={"precision": BF16},
                                        skipped=needs or no_openvino or (bf16_problem or "")))
    no_cuda = "" if cuda else "no CUDA GPU for ONNX Runtime here"
    candidates.append(Candidate("ONNX Runtime CUDA FP32", "onnxruntime", FP32, options={"providers": list(CUDA)},
                                cuda=True, skipped=no_cuda))
    candidates.append(Candidate("ONNX Runtime CUDA FP16", "onnxruntime", FP16, options={"providers": list(CUDA)},
                                cuda=True, skipped=no_cuda))
    return candidates


def this_machine_candidates(calibration: bool) -> list[Candidate]:
    import importlib.util

    import onnxruntime

    openvino = importlib.util.find_spec("openvino") is not None
    nncf = importlib.util.find_spec("nncf") is not None
    bf16_problem = missing_bf16(probe_cpu(with_openvino=openvino)) if openvino else None
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return plan_candidates(calibration, bf16_problem, openvino, nncf, cuda)


def cached(runner):
    """The reference's outputs computed once per input batch: every candidate is compared with
    the same FP32 run."""
    memo: dict[bytes, object] = {}

    def run(images: np.ndarray):
        key = hashlib.sha1(images.tobytes()).digest() + str(images.shape).encode()
        if key not in memo:
            memo[key] = runner(images)
        return memo[key]

    return run


def optimize(
    model: str | Path,
    validate_dir: str | Path,
    output: str | Path,
    *,
    calibration: str | Path | None = None,
    batch: int = DEFAULT_BATCH,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    force: bool = False,
    on_step: Callable[..., None] = lambda text, total=None: None,
    on_progress: Callable[[int], None] = lambda done: None,
) -> OptimizeResult:
    """Judge and time every candidate; write the fastest that passes into `output` (the
    artifact and deployment.json, atomically). NothingPassed when none does. on_step(text)
    names each stage, on_step(text, images) a counted one, whose images done go to on_progress."""
    model, output = Path(model), Path(output)
    if occupied(output) and not force:
        raise UsageError(f"{output} already exists; pass --force to replace it")
    if batch <= 0:
        raise UsageError(f"--batch must be positive, got {batch}")
    find_images(validate_dir)  # a missing or empty folder fails before any work
    if calibration is not None:
        find_images(calibration)
    candidates = this_machine_candidates(calibration is not None)
    with tempfile.TemporaryDirectory(prefix="evit-optimize-") as work:
        work = Path(work)
        fp32 = fp32_onnx(model, work, validate_dir, on_step, on_progress)
        tried = [c for c in candidates if not c.skipped]
        judge(tried, fp32, work, validate_dir, calibration, on_step, on_progress)
        reference_ms = time_candidates(tried, batch, min_seconds, work, on_step)
        passing = [c for c in tried if c.passed and c.evit_ms]
        chosen = min(passing, key=lambda c: c.evit_ms, default=None)
        result = OptimizeResult(candidates, chosen, batch, reference_ms, this_machine())
        if chosen is None:
            raise NothingPassed(
                f"no candidate passed the precision gates on {Path(validate_dir).name}/, nothing written", result
            )
        on_step(f"writing {output}")
        write_deployment(result, output, validate_dir, force)
    return result


def fp32_onnx(model: Path, work: Path, validate_dir, on_step, on_progress) -> Path:
    """The FP32 ONNX every candidate comes from: `model` itself, or exported from the checkpoint
    (validated as export validates, on the held-out folder too)."""
    if model.suffix.lower() == ".onnx":
        meta = read_onnx_metadata(model)
        if meta.precision != FP32:
            raise UsageError(f"{model.name} is {meta.precision}; optimize starts from the FP32 export or the checkpoint")
        return model
    from evit_deploy.model import load_model

    on_step(f"exporting {model.name} (FP32)")
    net = load_model(model)
    config = net.config
    name = f"{config.model.replace('_patch16_224', '')}_keep{config.keep_rate:g}.onnx"
    return export_onnx(net, work / name, validate_dir=validate_dir, on_step=on_step, on_progress=on_progress).path


def judge(candidates, fp32: Path, work: Path, validate_dir, calibration, on_step, on_progress) -> None:
    """Each candidate's artifact, and its report against the FP32 ONNX on ONNX Runtime."""
    from evit_deploy.runtime.openvino_backend import openvino_runner

    source = load_onnx(fp32)
    meta = onnx_metadata(source, fp32)
    reference = cached(onnx_runner(source))
    quantized: dict[str, Path] = {}
    for index, candidate in enumerate(candidates, 1):
        step = f"judging {index}/{len(candidates)}: {candidate.name}"
        on_step(step)
        stage = lambda text, total=None: on_step(f"{step}: {text}", total)  # noqa: E731
        if candidate.method and candidate.method not in quantized:
            path = work / f"{fp32.stem}.int8.{candidate.method}.onnx"
            done = quantize_onnx(  # judged on ONNX Runtime as it quantizes
                fp32, path, method=candidate.method, calibration_dir=calibration, validate_dir=validate_dir,
                accept_failed_gates=True, on_step=stage, on_progress=on_progress,
            )
            quantized[candidate.method] = path
            if candidate.backend == "onnxruntime":
                candidate.artifact, candidate.report, candidate.file_bytes = path, done.report, done.size_bytes
                continue
        if candidate.method:
            candidate.artifact = quantized[candidate.method]
        elif candidate.precision == FP16:
            candidate.artifact = fp16_copy(fp32, work)
        else:
            candidate.artifact = fp32
        candidate.file_bytes = candidate.artifact.stat().st_size
        if candidate.backend == "openvino":
            runner = openvino_runner(candidate.artifact, candidate.options.get("precision", FP32))
        else:
            runner = onnx_runner(load_onnx(candidate.artifact), tuple(candidate.options.get("providers", ["CPUExecutionProvider"])))
        candidate.report = validate(
            reference, runner, meta, validate_dir=validate_dir, gates=gates_for(candidate.precision),
            on_step=stage, on_progress=on_progress,
        )


def fp16_copy(fp32: Path, work: Path) -> Path:
    """The FP16 graph of an FP32 ONNX, its TopK score path kept in FP32 (as export writes it)."""
    path = work / f"{fp32.stem}.fp16.onnx"
    if not path.exists():
        source = load_onnx(fp32)
        converted = convert_to_fp16(source).model
        stamp_metadata(converted, replace(onnx_metadata(source, fp32), precision=FP16, fp32_islands=["topk_scores"]))
        path.write_bytes(converted.SerializeToString())
    return path


def time_candidates(candidates, batch: int, min_seconds: float, work: Path, on_step) -> float | None:
    """p50 ms per batch of each candidate and its plain ViT, all interleaved with the reference
    (plain FP32 on ONNX Runtime), whose p50 is returned."""
    with contextlib.ExitStack() as stack:
        timed = []  # (candidate, "evit" | "plain" | "reference", backend)
        for candidate in candidates:
            on_step(f"loading {candidate.name} and its plain ViT")
            device = None if candidate.cuda else "cpu"  # CUDA: the providers option says it
            evit = stack.enter_context(load_backend(candidate.artifact, candidate.backend, device, **candidate.options))
            timed.append((candidate, "evit", evit))
            if not evit.metadata.to_config().is_evit:
                continue
            if candidate.precision == FP16:
                plain = load_backend(fp16_copy(baseline_onnx(evit.metadata), work), candidate.backend, device,
                                     **candidate.options)
            else:
                _, plain = load_baseline(evit, candidate.artifact, candidate.backend, device, dict(candidate.options))
            timed.append((candidate, "plain", stack.enter_context(plain)))
        _, reference = load_reference(timed[0][2], {})
        timed.append((None, "reference", stack.enter_context(reference)))
        on_step(f"timing {len(timed)} models interleaved at batch {batch} (about {len(timed) * min_seconds:.0f} s)")
        size = timed[0][2].metadata.img_size
        inputs = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
        seconds = interleaved_latencies([b for _, _, b in timed], inputs, min_seconds=min_seconds)
    reference_ms = None
    for (candidate, role, _), times in zip(timed, seconds):
        p50 = float(np.median(times)) * 1e3
        if role == "evit":
            candidate.evit_ms = p50
            candidate.plain_ms = candidate.plain_ms or p50  # a plain ViT is its own baseline
        elif role == "plain":
            candidate.plain_ms = p50
        else:
            reference_ms = p50
    return reference_ms


def write_deployment(result: OptimizeResult, output: Path, validate_dir, force: bool) -> None:
    """The chosen artifact (its metadata carrying its own judgement) and deployment.json."""
    chosen = result.chosen
    source = load_onnx(chosen.artifact)
    meta = onnx_metadata(source, chosen.artifact)
    record = {**chosen.report.record(validate_dir), "accepted_failed_gates": False, "backend": chosen.backend}
    stamp_metadata(source, replace(meta, validation=record))
    name = chosen.artifact.name
    summary = chosen.to_dict(result.reference_ms, result.batch)
    deployment = {
        "format": FORMAT,
        "version": VERSION,
        "artifact": name,
        "backend": chosen.backend,
        "precision": chosen.precision,
        "options": chosen.options,
        "gates": chosen.report.gates.to_dict() if chosen.report.gates else None,
        "measured": {k: v for k, v in summary.items() if k not in ("name", "backend", "precision", "options", "skipped")},
        "candidate": chosen.name,
        "batch": result.batch,
        "machine": result.machine,
        "reference": "plain FP32 on ONNX Runtime (CPU)",
        "reference_p50_ms": result.reference_ms,
    }
    with atomic_folder(output, force) as tmp:
        (tmp / name).write_bytes(source.SerializeToString())
        (tmp / DEPLOYMENT_FILE).write_text(json.dumps(deployment, indent=2) + "\n", encoding="utf-8")
    result.output = output
    chosen.artifact = output / name
