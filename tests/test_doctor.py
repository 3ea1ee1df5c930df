"""doctor: reports this machine without crashing, and derives which backends, exports and builds
work (and what to install) from what it found."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from evit_deploy import doctor
from evit_deploy.cli import app
from evit_deploy.doctor import Capability, DoctorReport, Gpu, Package, capabilities, diagnose
from evit_deploy.runtime.cpu_features import FEATURES, CpuFeatures, missing_bf16, parse_cpuinfo, probe_cpu

runner = CliRunner()
H100 = Gpu(0, "NVIDIA H100 80GB HBM3", "9.0", 79.1, True)
SAPPHIRE_RAPIDS = CpuFeatures("Intel Xeon Platinum 8480+", dict.fromkeys(FEATURES, True), ["FP32", "BF16", "INT8"])


@pytest.fixture(scope="module")
def here() -> DoctorReport:
    return diagnose()


def report_with(packages: dict[str, tuple[str | None, str]], gpus=(H100,), providers=("CUDAExecutionProvider", "CPUExecutionProvider"), glibc="2.36", cpu=SAPPHIRE_RAPIDS) -> DoctorReport:
    """A report as diagnose() would make it on another machine: every package installed and
    working unless `packages` says otherwise (name -> (version, import error))."""
    listed = {name: ("1.0", "") for name in doctor.PACKAGES} | {"tensorrt": ("10.16.0", "")} | packages
    report = DoctorReport(
        evit_deploy="0",
        python="3.11",
        platform="Linux",
        glibc=glibc,
        packages=[Package(name, *listed[name]) for name in doctor.PACKAGES],
        torch_cuda="12.6",
        nvidia_driver="560.35",
        onnxruntime_providers=list(providers),
        gpus=list(gpus),
        cpu=cpu,
    )
    report.backends, report.actions = capabilities(report)
    return report


def by_name(rows: list[Capability]) -> dict[str, Capability]:
    return {row.name: row for row in rows}


def test_this_machine(here):
    assert here.package("torch").works and here.package("onnxruntime").works
    assert "CPUExecutionProvider" in here.onnxruntime_providers
    backends = by_name(here.backends)
    assert backends["pytorch (cpu)"].available and backends["onnxruntime (cpu)"].available
    json.dumps(here.to_dict())  # serialisable as it is
    if not torch.cuda.is_available():
        assert here.gpus == [] and "CUDA build of PyTorch" in here.gpu_hint
        assert not backends["tensorrt"].available and not backends["pytorch (cuda)"].available
        assert "no CUDA GPU" in by_name(here.actions)["build-engine --fp16"].detail


def test_a_complete_gpu_machine_can_do_everything():
    report = report_with({})
    assert all(row.available for row in report.backends + report.actions), report.backends + report.actions
    assert by_name(report.backends)["tensorrt"].detail == "TensorRT 10.16.0 on NVIDIA H100 80GB HBM3"


def test_missing_pieces_say_what_to_install():
    report = report_with({"tensorrt": (None, ""), "onnxslim": (None, ""), "safetensors": (None, "")}, providers=["CPUExecutionProvider"])
    backends, actions = by_name(report.backends), by_name(report.actions)
    assert not backends["tensorrt"].available and "pip install 'evit-deploy[tensorrt]'" in backends["tensorrt"].detail
    assert "pip install -e '.[tensorrt]'" in backends["tensorrt"].detail
    assert not backends["onnxruntime (cuda)"].available and "onnxruntime-gpu" in backends["onnxruntime (cuda)"].detail
    assert backends["pytorch (cuda)"].available
    assert actions["export (ONNX)"].detail == "pip install onnxslim"
    assert not actions["safetensors checkpoints"].available
    assert not actions["build-engine --fp32"].available


def test_no_gpu_and_old_or_broken_tensorrt():
    no_gpu = by_name(report_with({}, gpus=()).backends)
    assert not no_gpu["tensorrt"].available and no_gpu["tensorrt"].detail == doctor.NO_GPU
    assert not no_gpu["onnxruntime (cuda)"].available and not no_gpu["pytorch (cuda)"].available
    old = by_name(report_with({"tensorrt": ("8.6.1", "")}).backends)["tensorrt"]
    assert not old.available and "older than 10.12" in old.detail
    weakly_typed = by_name(report_with({"tensorrt": ("10.11.0.33", "")}).backends)["tensorrt"]
    assert not weakly_typed.available and "TensorRT 10.11.0.33 is older than 10.12 (strongly typed builds)" in weakly_typed.detail
    assert by_name(report_with({"tensorrt": ("10.12.0.36", "")}).backends)["tensorrt"].available
    broken = by_name(report_with({"tensorrt": ("10.16.0", "OSError: libcudart.so.12")}).backends)["tensorrt"]
    assert not broken.available and "does not load (OSError: libcudart.so.12)" in broken.detail


def test_serving_and_plotting_extras_say_what_to_install():
    actions = by_name(report_with({}).actions)
    assert actions["serve"].available and "PyTriton 1.0" in actions["serve"].detail
    assert actions["bench --plot"].available
    missing = by_name(report_with({"tritonclient": (None, ""), "matplotlib": (None, "")}).actions)
    assert not missing["serve"].available and "tritonclient missing" in missing["serve"].detail
    assert "pip install 'evit-deploy[serve]'" in missing["serve"].detail and "-e '.[serve]'" in missing["serve"].detail
    assert not missing["bench --plot"].available and "evit-deploy[plot]" in missing["bench --plot"].detail
    old_glibc = by_name(report_with({}, glibc="2.31").actions)["serve"]
    assert not old_glibc.available and "glibc 2.35 or newer" in old_glibc.detail and "2.31" in old_glibc.detail
    assert not by_name(report_with({}, glibc=None).actions)["serve"].available


def test_torch_is_imported_only_for_the_cuda_part():
    """Without an NVIDIA driver (or with a CPU-only torch) no GPU can show up, so the doctor
    answers without the seconds a torch import takes; the CUDA version is read from its files."""
    assert doctor.torch_build_cuda() == torch.version.cuda
    code = (
        "import sys; from evit_deploy.doctor import diagnose; report = diagnose(); "
        "print(report.torch_cuda, report.nvidia_driver, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    torch_cuda, driver, imported = proc.stdout.split()
    assert imported == str(torch_cuda != "None" and driver != "None")


def test_slow_fp16_gpu_builds_fp32_only():
    pascal = Gpu(0, "GTX 1080", "6.1", 8.0, False)
    actions = by_name(report_with({}, gpus=[pascal]).actions)
    assert not actions["build-engine --fp16"].available and "use --fp32" in actions["build-engine --fp16"].detail
    assert actions["build-engine --fp32"].available


def test_probe_reports_a_broken_package_instead_of_crashing(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.0" if name == "brokenpkg" else real_version(name))
    package = doctor.probe_package("brokenpkg")
    assert package.version == "2.0" and not package.works and "libfoo.so" in package.error
    assert doctor.probe_package("surely-not-installed-pkg") == Package("surely-not-installed-pkg", None)


def test_gpu_probe_failure_means_no_gpu(monkeypatch):
    def fail():
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", fail)
    assert doctor.probe_torch_gpus()[1] == []


def test_cli_doctor_table_and_json():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for fragment in ("Packages", "Backends", "Exports, builds, serving, plots", "tensorrt", "onnxruntime (cpu)", "glibc", "serve", "bench --plot"):
        assert fragment in result.output
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert {f.name for f in dataclasses.fields(DoctorReport)} == set(data)
    assert {row["name"] for row in data["backends"]} >= {"tensorrt", "pytorch (cuda)", "onnxruntime (cuda)"}


# A Zen 4 EPYC's /proc/cpuinfo, shortened: AVX-512 with BF16 and VNNI, no AMX.
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni avx_vnni sha_ni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx2
"""
# An older Xeon: AVX-512F without BF16 or VNNI.
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: sse avx avx2 avx512f avx512cd avx512bw\n"
# An ARM server: no x86 flags at all ('Features', no 'model name').
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16 i8mm\n"


def test_cpu_features_from_cpuinfo():
    name, flags = parse_cpuinfo(EPYC)
    assert name == "AMD EPYC 9R14"  # the first processor's entry
    assert flags == {
        "AVX2": True, "AVX-512F": True, "AVX-512 BF16": True, "AVX-512 VNNI": True,
        "AVX-VNNI": True, "AMX-BF16": False, "AMX-INT8": False,
    }
    epyc = probe_cpu(EPYC, with_openvino=False)
    assert epyc.bf16 and epyc.vnni and missing_bf16(epyc) is None
    skylake = probe_cpu(SKYLAKE, with_openvino=False)
    assert skylake.flags["AVX-512F"] and not skylake.bf16 and not skylake.vnni
    reason = missing_bf16(skylake)
    assert "Gold 6148" in reason and "AVX-512 BF16 or AMX" in reason and "--precision fp32" in reason
    assert "\n" not in reason
    amx = CpuFeatures("Xeon", {**dict.fromkeys(FEATURES, False), "AMX-BF16": True}, [])
    assert amx.bf16
    graviton = probe_cpu(GRAVITON, with_openvino=False)
    assert graviton.flags == dict.fromkeys(FEATURES, False) and not graviton.bf16
    # no /proc/cpuinfo: flags unknown, OpenVINO's capabilities decide
    unknown = CpuFeatures("?", {}, ["FP32", "BF16"])
    assert not unknown.known and unknown.bf16
    assert not CpuFeatures("?", {}, ["FP32"]).bf16
    # flags say BF16 but the installed OpenVINO does not offer it: not offered
    assert missing_bf16(CpuFeatures("x", dict.fromkeys(FEATURES, True), ["FP32", "INT8"])) is not None


def test_openvino_rows_follow_the_cpu_and_the_install():
    backends = by_name(report_with({}).backends)
    assert backends["openvino (cpu, fp32)"].available and backends["openvino (cpu, bf16)"].available
    old = probe_cpu(SKYLAKE, with_openvino=False)
    bf16 = by_name(report_with({}, cpu=old).backends)["openvino (cpu, bf16)"]
    assert not bf16.available and "AVX-512 BF16" in bf16.detail
    missing = by_name(report_with({"openvino": (None, "")}).backends)
    assert not missing["openvino (cpu, fp32)"].available and "evit-deploy[openvino]" in missing["openvino (cpu, fp32)"].detail
    actions = by_name(report_with({}, cpu=old).actions)
    assert actions["quantize (int8)"].available and "no VNNI" in actions["quantize (int8)"].detail


def test_this_machines_cpu_is_reported(here):
    assert here.cpu is not None and here.cpu.name
    if here.package("openvino").works:
        assert "FP32" in here.cpu.openvino_capabilities
    result = runner.invoke(app, ["doctor"])
    assert "CPU " in result.output and "AVX2" in result.output
