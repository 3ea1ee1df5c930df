"""`evit-deploy doctor`: what is installed, what GPU there is, and therefore which backends run
here and which exports and builds are possible, with what to install for the rest.

Every probe is guarded and this module imports only the standard library at import time, so the
doctor reports a broken install instead of crashing on it. Packages are imported to prove they
load, except torch (seconds to import): it is imported only for the CUDA part, where an NVIDIA
driver and a CUDA build of torch make a GPU possible; its CUDA version is read from its files.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evit_deploy.engines.support import MIN_TENSORRT_TEXT, has_fast_fp16, tensorrt_too_old
from evit_deploy.errors import first_line
from evit_deploy.install import (
    OPENVINO_INSTALL, ORT_GPU_INSTALL, PLOT_INSTALL, SERVE_INSTALL, TENSORRT_INSTALL,
    TORCH_CUDA_INSTALL,
)
from evit_deploy.runtime.cpu_features import CpuFeatures, missing_bf16, probe_cpu
from evit_deploy.version import __version__

PACKAGES = (
    "torch", "onnx", "onnxscript", "onnxruntime", "onnxslim", "safetensors", "tensorrt", "openvino", "numpy", "pillow", "typer", "rich",
    "nvidia-pytriton", "tritonclient", "aiohttp",  # the serve extra
    "matplotlib",  # the plot extra
)
SERVE_PACKAGES = ("nvidia-pytriton", "tritonclient", "aiohttp")
IMPORT_NAMES = {"pillow": "PIL", "nvidia-pytriton": "pytriton"}  # where they differ from the distribution's
IMPORTED_FOR_CUDA_ONLY = {"torch"}
DISTRIBUTION_ALTERNATIVES = {"onnxruntime": ("onnxruntime-gpu",)}
MIN_GLIBC = (2, 35)  # what the Triton Inference Server bundled in PyTriton 0.7 needs
NO_GPU = "no CUDA GPU visible to PyTorch"
GPU_INSTALL = f"needs an NVIDIA GPU and {TORCH_CUDA_INSTALL}"


@dataclass
class Package:
    name: str
    version: str | None  # None: not installed
    error: str = ""  # installed, but importing it fails

    @property
    def works(self) -> bool:
        return self.version is not None and not self.error


@dataclass
class Gpu:
    index: int
    name: str
    compute_capability: str
    memory_gib: float
    fast_fp16: bool


@dataclass
class Capability:
    name: str
    available: bool
    detail: str  # what it uses when available; what is missing and how to install it when not


@dataclass
class DoctorReport:
    evit_deploy: str
    python: str
    platform: str
    glibc: str | None  # None: another C library, or not Linux
    packages: list[Package]
    torch_cuda: str | None  # the CUDA version torch was built with; None: a CPU-only build
    nvidia_driver: str | None
    onnxruntime_providers: list[str]
    gpus: list[Gpu]
    gpu_hint: str = ""  # how to get a usable GPU when none is visible
    backends: list[Capability] = field(default_factory=list)
    actions: list[Capability] = field(default_factory=list)
    cpu: CpuFeatures | None = None  # instruction sets that decide the CPU precisions

    def to_dict(self) -> dict:
        return asdict(self)

    def package(self, name: str) -> Package:
        return next(p for p in self.packages if p.name == name)


def diagnose() -> DoctorReport:
    packages = [probe_package(name) for name in PACKAGES]
    works = {p.name: p.works for p in packages}
    driver = probe_nvidia_driver()
    torch_cuda, gpus = torch_build_cuda(), []
    if works["torch"] and torch_cuda and driver:  # the CUDA part: only here is torch imported
        try:
            torch_cuda, gpus = probe_torch_gpus()
        except Exception as exc:  # installed, but importing it fails
            packages[PACKAGES.index("torch")].error = f"{type(exc).__name__}: {first_line(exc)}"
    libc, libc_version = platform.libc_ver()
    report = DoctorReport(
        evit_deploy=__version__,
        python=f"{platform.python_version()} ({sys.executable})",
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        glibc=libc_version if libc == "glibc" and libc_version else None,
        packages=packages,
        torch_cuda=torch_cuda,
        nvidia_driver=driver,
        onnxruntime_providers=probe_ort_providers() if works["onnxruntime"] else [],
        gpus=gpus,
        gpu_hint="" if gpus else GPU_INSTALL,
        cpu=probe_cpu(with_openvino=works["openvino"]),
    )
    report.backends, report.actions = capabilities(report)
    return report


def capabilities(report: DoctorReport) -> tuple[list[Capability], list[Capability]]:
    """Which backends run here and which commands can do their work, from the probes alone."""
    works = {p.name: p.works for p in report.packages}
    gpu = report.gpus[0] if report.gpus else None
    providers = report.onnxruntime_providers
    no_gpu = None if gpu else NO_GPU
    no_torch = None if works["torch"] else "pip install torch"
    no_tensorrt = tensorrt_problem(report.package("tensorrt"))
    no_fast_fp16 = None if gpu is None or gpu.fast_fp16 else f"{gpu.name} has no fast FP16: use --fp32"
    export_missing = [n for n in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxslim") if not works[n]]
    on_gpu = f" on {gpu.name}" if gpu else ""
    no_openvino = None if works["openvino"] else OPENVINO_INSTALL
    cpu = report.cpu
    no_bf16 = missing_bf16(cpu) if cpu is not None else "CPU features unknown"
    int8_speed = (
        "VNNI: INT8 does 4x the FP32 multiply-adds per instruction"
        if cpu is not None and cpu.vnni else "no VNNI here: INT8 gains little on this CPU"
    )

    def capability(name: str, detail: str, *problems: str | None) -> Capability:
        found = [p for p in problems if p]
        return Capability(name, not found, "; ".join(found) or detail)

    backends = [
        capability("pytorch (cpu)", "eager, fp32", no_torch),
        capability("pytorch (cuda)", f"fp16, eager or torch.compile{on_gpu}", no_torch, no_gpu),
        capability(
            "onnxruntime (cpu)",
            "CPUExecutionProvider",
            None if "CPUExecutionProvider" in providers else "pip install onnxruntime",
        ),
        capability(
            "onnxruntime (cuda)",
            f"CUDAExecutionProvider{on_gpu}",
            no_gpu or (None if "CUDAExecutionProvider" in providers else ORT_GPU_INSTALL),
        ),
        capability("tensorrt", f"TensorRT {report.package('tensorrt').version}{on_gpu}", no_torch, no_gpu, no_tensorrt),
        capability("openvino (cpu, fp32)", "CPU plugin", no_openvino),
        capability("openvino (cpu, bf16)", "CPU plugin, BF16 with the TopK scores in FP32", no_openvino, no_bf16),
    ]
    actions = [
        capability(
            "export (ONNX)",
            "torch.export (onnxscript), simplify (onnxslim), validate (ONNX Runtime)",
            f"pip install {' '.join(export_missing)}" if export_missing else None,
        ),
        capability(
            "safetensors checkpoints",
            "load .safetensors",
            None if works["safetensors"] else "pip install safetensors (.pth/.pt load without it)",
        ),
        capability("build-engine --fp16", "FP16, strongly typed, TopK scores kept in FP32 in the graph", no_torch, no_gpu, no_tensorrt, no_fast_fp16),
        capability("build-engine --fp32", "FP32", no_torch, no_gpu, no_tensorrt),
        capability(
            "quantize (int8)",
            f"ONNX Runtime static/dynamic, NNCF where installed; {int8_speed}",
            None if works["onnxruntime"] and works["onnx"] else "pip install onnx onnxruntime",
        ),
        capability(
            "serve",
            f"Triton Inference Server through PyTriton {report.package('nvidia-pytriton').version}, REST front (aiohttp)",
            glibc_problem(report.glibc),
            missing_extra(works, SERVE_PACKAGES, SERVE_INSTALL),
        ),
        capability(
            "bench --plot",
            f"matplotlib {report.package('matplotlib').version}",
            missing_extra(works, ("matplotlib",), PLOT_INSTALL),
        ),
    ]
    return backends, actions


def missing_extra(works: dict[str, bool], names: tuple[str, ...], install: str) -> str | None:
    missing = [name for name in names if not works[name]]
    return f"{', '.join(missing)} missing or broken: {install}" if missing else None


def glibc_problem(glibc: str | None) -> str | None:
    """PyTriton's Triton binary is built for Linux with glibc 2.35 or newer."""
    if glibc is None:
        return "needs Linux with glibc 2.35 or newer (Ubuntu 22.04, Debian 12)"
    version = tuple(int(part) for part in glibc.split(".")[:2] if part.isdigit())
    if version < MIN_GLIBC:
        return f"needs glibc 2.35 or newer (Ubuntu 22.04, Debian 12); this system has {glibc}"
    return None


def tensorrt_problem(trt: Package) -> str | None:
    if trt.version is None:
        return f"TensorRT not installed: {TENSORRT_INSTALL}"
    if trt.error:
        return f"TensorRT {trt.version} does not load ({trt.error}): {TENSORRT_INSTALL}"
    if tensorrt_too_old(trt.version):
        return f"TensorRT {trt.version} is older than {MIN_TENSORRT_TEXT} (strongly typed builds): {TENSORRT_INSTALL}"
    return None


def probe_package(name: str) -> Package:
    """Installed version (distribution metadata), then an import to prove it loads."""
    version = None
    for distribution in (name, *DISTRIBUTION_ALTERNATIVES.get(name, ())):
        try:
            version = importlib.metadata.version(distribution)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    if version is None:
        return Package(name, None)
    if name in IMPORTED_FOR_CUDA_ONLY:
        return Package(name, version)
    try:
        module = importlib.import_module(IMPORT_NAMES.get(name, name))
    except Exception as exc:  # e.g. TensorRT without its CUDA libraries
        return Package(name, version, f"{type(exc).__name__}: {first_line(exc)}")
    return Package(name, str(getattr(module, "__version__", version)))


def torch_build_cuda() -> str | None:
    """The CUDA version torch was built with (None: a CPU-only build, or no torch), read from
    torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "cuda" and node.value is not None:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            return value if isinstance(value, str) else None
    return None


def probe_torch_gpus() -> tuple[str | None, list[Gpu]]:
    import torch

    gpus = []
    try:
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            props = torch.cuda.get_device_properties(index)
            capability = f"{props.major}.{props.minor}"
            memory = round(props.total_memory / 2**30, 1)
            gpus.append(Gpu(index, props.name, capability, memory, has_fast_fp16(capability)))
    except Exception:  # a driver/runtime mismatch: no usable GPU
        gpus = []
    return torch.version.cuda, gpus


def probe_nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else None


def probe_ort_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())

