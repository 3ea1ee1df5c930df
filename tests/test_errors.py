"""Every way a user can get it wrong, through the real CLI: exit code, one clear line on stderr,
no traceback, and every file that was there before left as it was.

CASES (the CLI) and API_CASES (the Python API) are also the source of docs/errors.md, and of the
README's short errors section, which points there: the test
`test_docs_errors_table_is_rendered_from_the_cases` fails when either differs from what the tables
give, and `python tests/test_errors.py` rewrites both.

Each CLI case runs in its own folder of hard links to shared fixture files, all cases in
parallel; a case passes when its process exits with `code`, stderr holds exactly the `shows` line
(`…` stands for any text; "" means stderr stays empty), and the folder afterwards holds the same
files, untouched (same inode, size and mtime; the files in `unchanged` also byte-for-byte).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SMALL, TINY, cli_env, config_for, random_model, run_cli
from PIL import Image

from evit_deploy.engines.header import EngineHeader, encode_header
from evit_deploy.engines.settings import BuildSettings
from evit_deploy.errors import EvitDeployError
from evit_deploy.metadata import read_onnx_metadata
from evit_deploy.runtime import Predictor

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
FAKE_TENSORRT = Path(__file__).resolve().parent / "fake_tensorrt"  # see its docstring
CODE_RAN_MARKER = "checkpoint-code-ran"  # the code-executing pickle would create this file


@dataclass(frozen=True)
class Case:
    id: str
    did: str  # what the user did, in words
    argv: tuple[str, ...]  # evit-deploy arguments, run in the case's folder
    code: int  # expected exit code
    shows: str  # the one stderr line; "…" stands for any text; "" means no stderr at all
    unchanged: tuple[str, ...] = ()  # files that must stay byte-for-byte the same
    machine: tuple[str, str] | None = None  # (TensorRT version, "GPU NAME;MAJOR.MINOR") to pretend


CASES = [
    # Bad arguments
    Case("keep-rate-zero", "keep rate 0", ("export", "--keep-rate", "0", "-o", "out.onnx"), 2,
         "error: keep rate must be in (0, 1], got 0.0"),
    Case("drop-loc-outside", "drop block outside the model", ("export", "--model", TINY, "--drop-loc", "3,12", "-o", "out.onnx"), 2,
         "error: drop_loc [3, 12] has blocks outside 0..11 (deit_tiny_patch16_224 has 12 blocks)"),
    Case("drop-loc-unsorted", "drop blocks out of order and repeated", ("export", "--drop-loc", "6,3,3", "-o", "out.onnx"), 2,
         "error: drop_loc must be increasing without repeats, got [6, 3, 3]"),
    Case("img-size-not-multiple", "input size not a multiple of the patch", ("export", "--img-size", "200", "-o", "out.onnx"), 2,
         "error: img_size must be a positive multiple of the patch size 16, got 200"),
    Case("img-size-too-large", "input size too large for attention memory", ("export", "--img-size", "4096", "-o", "out.onnx"), 2,
         "error: img_size must be at most 1024 (attention memory grows with the 4th power of the input size), got 4096"),
    Case("opset-unsupported", "ONNX opset this PyTorch cannot export", ("export", "--opset", "99", "-o", "out.onnx"), 2,
         "error: opset must be >= 18 (the oldest the torch.export-based exporter writes) and <= 23 (the newest), got 99"),
    Case("model-typo", "misspelt model name", ("export", "--model", "deit_tinny", "-o", "out.onnx"), 2,
         "error: unknown model 'deit_tinny'. Did you mean 'deit_tiny_patch16_224'? Known models: …"),
    Case("batch-zero", "batch size 0", ("bench", "tiny.onnx", "--batch", "0"), 2,
         "error: --batch takes comma-separated positive integers, got '0'"),
    Case("dataset-img-size", "generated images of a size that is no multiple of the patch",
         ("dataset", "shapes", "-o", "shapes", "--count", "8", "--img-size", "100"), 2,
         "error: --img-size must be a positive multiple of 16, got 100"),
    Case("profile-min-above-opt", "engine batch profile with min > opt", ("build-engine", "tiny.onnx", "--min-batch", "8", "--opt-batch", "4"), 2,
         "error: batch profile needs min <= opt <= max, got min 8, opt 4, max 128"),
    Case("backend-unknown", "unknown backend", ("predict", "tiny.onnx", "photo.jpg", "--backend", "onnxrt"), 2,
         "error: unknown backend 'onnxrt'; choose one of auto, onnxruntime, openvino, tensorrt, pytorch"),
    Case("device-unknown", "unknown device", ("predict", "tiny.onnx", "photo.jpg", "--device", "gpu0"), 2,
         "error: unknown device 'gpu0'; use cpu, cuda or cuda:N"),
    Case("settings-for-export", "a checkpoint's EViT setting for an exported model", ("predict", "tiny.onnx", "photo.jpg", "--keep-rate", "0.5"), 2,
         "error: settings (--keep-rate) are for checkpoints; tiny.onnx carries its own"),
    Case("option-unknown", "an option the command does not have", ("export", "--bogus"), 2,
         "error: No such option: --bogus (see … export --help)"),
    Case("argument-extra", "an argument too many", ("info", "tiny.onnx", "small.pth"), 2,
         "error: Got unexpected extra argument(s) (small.pth) (see … info --help)"),
    Case("option-bad-value", "an option value of the wrong type", ("bench", "tiny.onnx", "--iters", "many"), 2,
         "error: Invalid value for '--iters': …integer… (see … bench --help)"),
    Case("batch-beyond-memory", "batch far beyond this machine's memory", ("bench", "tiny.onnx", "--batch", "1000000000000", "--no-baseline"), 1,
         "error: out of memory (Unable to allocate … for an array with shape (1000000000000, 3, 224, 224) and data type float32); use a smaller batch or input size"),
    # Bad files
    Case("checkpoint-missing", "checkpoint that does not exist", ("export", "--checkpoint", "missing.pth", "-o", "out.onnx"), 1,
         "error: checkpoint not found: missing.pth"),
    Case("checkpoint-empty", "empty checkpoint", ("export", "--checkpoint", "empty.pth", "-o", "out.onnx"), 1,
         "error: checkpoint is empty (0 bytes): empty.pth"),
    Case("checkpoint-truncated", "half-downloaded checkpoint", ("predict", "truncated.pth", "photo.jpg"), 1,
         "error: cannot read checkpoint truncated.pth (truncated or corrupted?): PytorchStreamReader failed reading zip archive: …"),
    Case("checkpoint-runs-code", "checkpoint whose pickle would run code", ("predict", "evil.pth", "photo.jpg"), 1,
         "error: refused to load evil.pth: weights_only loading rejected it (…GLOBAL …system…). It holds pickled objects other than tensors (possibly code, which is never run) or is corrupted. Re-save it as a plain state dict or safetensors."),
    Case("checkpoint-other-width", "checkpoint of another architecture (shapes)", ("export", "--model", TINY, "--checkpoint", "small.pth", "-o", "out.onnx"), 1,
         "error: small.pth does not fit deit_tiny_patch16_224: shape mismatch: cls_token (1, 1, 384) (model: (1, 1, 192)), … Is --model the architecture this checkpoint was trained with?"),
    Case("checkpoint-other-keys", "checkpoint of another architecture (keys)", ("export", "--model", TINY, "--checkpoint", "resnet.pth", "-o", "out.onnx"), 1,
         "error: resnet.pth does not fit deit_tiny_patch16_224: missing keys: blocks.0.attn.proj.bias, …; unexpected keys: conv1.weight, fc.bias, fc.weight. Is --model the architecture this checkpoint was trained with?"),
    Case("not-a-model", "a file that is no model (random bytes)", ("info", "weights.bin"), 1,
         "error: weights.bin is not an ONNX model (.onnx), an evit-deploy engine (.plan/.engine) or a checkpoint (.pth/.pt/.safetensors)"),
    Case("onnx-empty", "empty ONNX", ("bench", "empty.onnx"), 1,
         "error: ONNX file empty.onnx is empty (0 bytes); export it again"),
    Case("onnx-truncated", "truncated ONNX", ("predict", "truncated.onnx", "photo.jpg"), 1,
         "error: cannot read ONNX file truncated.onnx (truncated or corrupted?)"),
    Case("onnx-foreign-predict", "ONNX not made by evit-deploy (predict)", ("predict", "foreign.onnx", "photo.jpg"), 1,
         "error: foreign.onnx carries no evit-deploy metadata (missing model, …), so its input size, normalisation and token plan are unknown: re-export it from its checkpoint with `evit-deploy export`"),
    Case("onnx-foreign-bench", "ONNX not made by evit-deploy (bench)", ("bench", "foreign.onnx", "--batch", "1"), 1,
         "error: foreign.onnx carries no evit-deploy metadata (…re-export it from its checkpoint with `evit-deploy export`"),
    Case("onnx-foreign-build", "ONNX not made by evit-deploy (build-engine)", ("build-engine", "foreign.onnx"), 1,
         "error: foreign.onnx carries no evit-deploy metadata (…re-export it from its checkpoint with `evit-deploy export`"),
    Case("onnx-foreign-visualize", "ONNX not made by evit-deploy (visualize)", ("visualize", "foreign.onnx", "photo.jpg"), 1,
         "error: foreign.onnx carries no evit-deploy metadata (…re-export it from its checkpoint with `evit-deploy export`"),
    Case("onnx-foreign-eval", "ONNX not made by evit-deploy (eval)", ("eval", "foreign.onnx", "data"), 1,
         "error: foreign.onnx carries no evit-deploy metadata (…re-export it from its checkpoint with `evit-deploy export`"),
    Case("onnx-edited", "ONNX whose graph was edited after export", ("predict", "edited.onnx", "photo.jpg"), 1,
         "error: edited.onnx's graph does not match its evit-deploy metadata (metadata: input 'images' [batch, 3, 256, 256] -> output 'logits' [batch, 1000]; graph: …); was it edited after export? Re-export it with `evit-deploy export`"),
    Case("onnx-other-graph", "ONNX carrying copied metadata over another graph (other TopK counts)", ("predict", "swapped.onnx", "photo.jpg"), 1,
         "error: swapped.onnx's graph does not match its evit-deploy metadata (metadata: TopK K [1, 1, 1]; graph: …); was it edited after export? Re-export it with `evit-deploy export`"),
    Case("onnx-other-classes", "ONNX carrying copied metadata over a graph with another class count", ("predict", "classes.onnx", "photo.jpg"), 1,
         "error: classes.onnx's graph does not match its evit-deploy metadata (metadata: input 'images' [batch, 3, 224, 224] -> output 'logits' [batch, 10]; graph: …); was it edited after export? Re-export it with `evit-deploy export`"),
    Case("onnx-damaged-metadata", "ONNX with damaged metadata", ("info", "damaged.onnx"), 1,
         "error: damaged.onnx has damaged evit-deploy metadata (Expecting ',' delimiter: …); re-export it with `evit-deploy export`"),
    Case("engine-other-tensorrt", "engine built with another TensorRT for another GPU (run where TensorRT 10.16.0 and a compute capability 8.9 GPU are)",
         ("predict", "other_trt.plan", "photo.jpg"), 1,
         "error: other_trt.plan was built with TensorRT 9.9.9 for NVIDIA Other GPU (compute capability 7.5); this "
         "machine has TensorRT 10.16.0 and NVIDIA Test GPU (compute capability 8.9): rebuild it here with "
         "`evit-deploy build-engine tiny.onnx`",
         machine=("10.16.0", "NVIDIA Test GPU;8.9")),
    Case("engine-raw-plan", "TensorRT plan without evit-deploy's header", ("bench", "raw.plan"), 1,
         "error: raw.plan is not an evit-deploy engine (no evit-deploy header): build it with `evit-deploy build-engine MODEL.onnx`; a raw TensorRT plan carries no preprocessing metadata"),
    Case("engine-truncated", "truncated engine", ("predict", "truncated.plan", "photo.jpg"), 1,
         "error: truncated.plan is truncated or corrupted (engine header cut short)"),
    # Bad data
    Case("image-corrupt", "image that does not decode", ("predict", "tiny.onnx", "corrupt.jpg"), 1,
         "error: cannot decode image corrupt.jpg: …"),
    Case("image-bad-tiff", "TIFF with a corrupt header", ("predict", "tiny.onnx", "bad.tif"), 1,
         "error: cannot decode image bad.tif: cannot identify image file 'bad.tif'"),
    Case("image-cut-tiff", "TIFF cut short after its header", ("predict", "tiny.onnx", "cut.tif"), 1,
         "error: cannot decode image cut.tif: cannot identify image file 'cut.tif'"),
    Case("image-huge", "image declaring 100000 x 100000 pixels", ("predict", "tiny.onnx", "huge.png"), 1,
         "error: image huge.png is over the 64,000,000-pixel limit; downscale it"),
    Case("image-thin", "image of 1 x 8000 pixels (93 bytes that preprocessing once blew up to 1.5 GB)", ("predict", "tiny.onnx", "thin.png"), 1,
         "error: image thin.png is 1x8000, more than 20:1; crop it to the object first"),
    Case("image-modes", "grayscale, RGBA and 16-bit PNGs (converted to RGB)", ("predict", "tiny.onnx", "gray.png", "rgba.png", "gray16.png", "--json"), 0,
         ""),
    Case("predict-folder", "a folder of images for predict (searched recursively)", ("predict", "tiny.onnx", "data", "--json"), 0,
         ""),
    Case("predict-random-weights", "predictions from a model with random weights (exported without --checkpoint)", ("predict", "tiny.onnx", "photo.jpg"), 0,
         "warning: tiny.onnx has random weights (random:0): its predictions are meaningless"),
    Case("eval-corrupt-image", "a corrupt image in an eval folder", ("eval", "tiny.pth", "broken-data"), 1,
         "error: cannot decode image broken-data/n01440764/corrupt.jpg: …"),
    # Files
    Case("output-exists", "export over an existing file without --force", ("export", "-o", "existing.onnx"), 2,
         "error: existing.onnx already exists; pass --force to replace it", ("existing.onnx",)),
    Case("json-exists", "bench --json-out over an existing file without --force", ("bench", "tiny.onnx", "--json-out", "existing.json"), 2,
         "error: existing.json already exists; pass --force to replace it", ("existing.json",)),
    Case("output-under-file", "output path inside a file, not a folder", ("export", "-o", "photo.jpg/out.onnx", "--force"), 2,
         "error: cannot write photo.jpg/out.onnx: …photo.jpg is not a writable folder", ("photo.jpg",)),
]


@dataclass(frozen=True)
class ApiCase:
    id: str
    did: str
    call: Callable[[Predictor, Path], object]  # given a Predictor of tiny.onnx and the folder
    shows: str  # "ExceptionType: message", "…" standing for any text


def _nan_and_inf() -> np.ndarray:
    batch = np.zeros((2, 3, 224, 224), np.float32)
    batch[0, 0, 0, 0], batch[1, 2, 5, 5] = np.nan, np.inf
    return batch


API_CASES = [
    ApiCase("nan-input", "`Predictor.logits()` on a batch holding NaN or Inf",
            lambda p, _: p.logits(_nan_and_inf()), "EvitDeployError: input contains NaN or Inf values"),
    ApiCase("float64-input", "`Predictor.logits()` on float64",
            lambda p, _: p.logits(np.zeros((1, 3, 224, 224))), "EvitDeployError: input must be float32, got float64"),
    ApiCase("shape-input", "`Predictor.logits()` on the wrong input size",
            lambda p, _: p.logits(np.zeros((2, 3, 200, 200), np.float32)),
            "EvitDeployError: input must have shape [B>0, 3, 224, 224], got [2, 3, 200, 200]"),
    ApiCase("no-images", "`Predictor.predict([])`",
            lambda p, _: p.predict([]), "EvitDeployError: no images given"),
    ApiCase("empty-image", "`Predictor.predict()` on a 0 x 0 array",
            lambda p, _: p.predict(np.zeros((0, 0, 3), np.uint8)), "EvitDeployError: image (ndarray) has no pixels (0x0)"),
    ApiCase("float-image-array", "`Predictor.predict()` on a float image array",
            lambda p, _: p.predict(np.zeros((8, 8, 3), np.float32)),
            "EvitDeployError: image arrays must be HWC (or HW) uint8 with 1, 3 or 4 channels, got float32 (8, 8, 3)"),
    ApiCase("nan-image", "`Predictor.predict()` on a float image holding NaN",
            lambda p, _: p.predict(Image.fromarray(np.full((8, 8), np.nan, np.float32))),
            "EvitDeployError: image has NaN or Inf pixel values"),
    ApiCase("threads-zero", "`Predictor(model.onnx, threads=0)`",
            lambda p, folder: Predictor(folder / "tiny.onnx", threads=0), "UsageError: threads must be positive, got 0"),
    ApiCase("unknown-option", "`Predictor(model.onnx, bogus=1)`",
            lambda p, folder: Predictor(folder / "tiny.onnx", bogus=1),
            "UsageError: the onnxruntime backend does not take bogus; it takes providers, threads"),
]


def pattern(shows: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in shows.split("…")), re.DOTALL)


# --------------------------------------------------------------------------------------------
# Fixture files


class _RunsCode:
    """Pickles as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _tiff_with_bad_samples_per_pixel() -> bytes:
    """A TIFF whose SamplesPerPixel tag says 999 (PIL logs it and gives up)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    entry = data.find(struct.pack("<HHI", 277, 3, 1))  # tag 277, SHORT, one value
    data[entry + 8 : entry + 10] = struct.pack("<H", 999)
    return bytes(data)


def _half_transparent() -> np.ndarray:
    """RGBA: green on the left, fully transparent on the right (white, once composited)."""
    rgba = np.zeros((60, 90, 4), np.uint8)
    rgba[:, :, :3] = (10, 200, 30)
    rgba[:, :45, 3] = 255
    return rgba


def _gray16() -> np.ndarray:
    return (np.arange(90 * 60).reshape(60, 90) * 12).astype(np.uint16)


def _edit_metadata(source: onnx.ModelProto, path: Path, **values: str) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(source)
    for entry in model.metadata_props:
        if entry.key in values:
            entry.value = values[entry.key]
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory, onnx_export) -> Path:
    """One folder with every file the cases use (read-only from here on)."""
    folder = tmp_path_factory.mktemp("error-cases")
    tiny = onnx_export(config_for(TINY)).path
    shutil.copyfile(tiny, folder / "tiny.onnx")
    torch.save({"model": random_model(TINY).state_dict()}, folder / "tiny.pth")
    torch.save({"model": random_model(SMALL).state_dict()}, folder / "small.pth")
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)}
    torch.save(resnet, folder / "resnet.pth")
    checkpoint = (folder / "tiny.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(checkpoint[: len(checkpoint) // 2])
    torch.save({"model": _RunsCode(f"touch {folder / CODE_RAN_MARKER}")}, folder / "evil.pth")

    exported = onnx.load(str(tiny))
    (folder / "truncated.onnx").write_bytes(exported.SerializeToString()[:100_000])
    foreign = onnx.ModelProto()
    foreign.CopyFrom(exported)
    del foreign.metadata_props[:]
    foreign.producer_name = "pytorch"
    onnx.save(foreign, str(folder / "foreign.onnx"))
    _edit_metadata(exported, folder / "edited.onnx", img_size="256")
    _edit_metadata(exported, folder / "damaged.onnx", drop_loc="[3, 6")
    _edit_metadata(exported, folder / "swapped.onnx", topk_k="[1, 1, 1]")
    _edit_metadata(exported, folder / "classes.onnx", num_classes="10")

    header = EngineHeader(
        read_onnx_metadata(tiny), "9.9.9", "NVIDIA Other GPU", "7.5", "fp16", BuildSettings(),
        [3, 224, 224], onnx="tiny.onnx",
    )
    (folder / "other_trt.plan").write_bytes(encode_header(header) + b"\0" * 256)
    (folder / "truncated.plan").write_bytes(encode_header(header)[:100])
    (folder / "raw.plan").write_bytes(b"ftrt" + bytes(range(256)))
    for name in ("empty.pth", "empty.onnx"):
        (folder / name).write_bytes(b"")
    (folder / "weights.bin").write_bytes(np.random.default_rng(1).bytes(4096))

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(3000))
    (folder / "bad.tif").write_bytes(_tiff_with_bad_samples_per_pixel())
    (folder / "cut.tif").write_bytes((folder / "bad.tif").read_bytes()[:8])  # PIL warns, then fails
    (folder / "huge.png").write_bytes(_png_declaring(100_000, 100_000))
    Image.new("RGB", (1, 8000), (200, 30, 30)).save(folder / "thin.png")
    Image.new("L", (90, 60), 128).save(folder / "gray.png")
    Image.fromarray(_half_transparent()).save(folder / "rgba.png")
    Image.fromarray(_gray16()).save(folder / "gray16.png")
    (folder / "data" / "n01440764").mkdir(parents=True)
    shutil.copyfile(folder / "photo.jpg", folder / "data" / "n01440764" / "photo.jpg")
    (folder / "broken-data" / "n01440764").mkdir(parents=True)
    shutil.copyfile(folder / "corrupt.jpg", folder / "broken-data" / "n01440764" / "corrupt.jpg")

    (folder / "existing.onnx").write_bytes(b"an earlier export")
    (folder / "existing.json").write_text('{"earlier": "results"}')
    Image.new("RGB", (4, 4)).save(folder / "existing.png")
    return folder


def _link_tree(source: Path, target: Path) -> None:
    """Mirror `source` into `target` with hard links (no copying of the large files)."""
    target.mkdir()
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir()
        else:
            os.link(path, destination)


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file (hidden ones included) with its inode, size and mtime: any write shows."""
    return {
        str(path.relative_to(folder)): (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file() and (stat := path.stat())
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine_env(machine: tuple[str, str] | None) -> dict[str, str]:
    """The CLI's environment; with `machine`, the fake TensorRT of that version (the real API
    names, tests/fake_tensorrt) and a pretend CUDA GPU, so a command gets as far as it would on
    such a machine: for an engine, to the header check inside TensorRTBackend."""
    if machine is None:
        return cli_env()
    version, gpu = machine
    path = os.pathsep.join(filter(None, [str(FAKE_TENSORRT), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path, FAKE_TENSORRT_VERSION=version, FAKE_CUDA_GPU=gpu)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict
    after: dict
    hashes_before: dict[str, str]
    hashes_after: dict[str, str]


@pytest.fixture(scope="module")
def outcomes(fixture_files, tmp_path_factory) -> dict[str, Outcome]:
    """Run every case, in parallel (each is a Python start-up plus a little work)."""
    root = tmp_path_factory.mktemp("error-runs")

    def run(case: Case) -> Outcome:
        folder = root / case.id
        _link_tree(fixture_files, folder)
        hashes = {name: _sha256(folder / name) for name in case.unchanged}
        before = _snapshot(folder)
        proc = run_cli(*case.argv, cwd=folder, timeout=300, env=machine_env(case.machine))
        return Outcome(
            proc.returncode, proc.stdout, proc.stderr, before, _snapshot(folder), hashes,
            {name: _sha256(folder / name) for name in case.unchanged},
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip((case.id for case in CASES), pool.map(run, CASES)))


# --------------------------------------------------------------------------------------------
# Tests


def test_case_ids_are_unique():
    ids = [case.id for case in [*CASES, *API_CASES]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_cli_case(case: Case, outcomes):
    outcome = outcomes[case.id]
    output = outcome.stdout + outcome.stderr
    assert "Traceback" not in output, output
    assert "internal error" not in output, output
    assert outcome.returncode == case.code, output
    lines = outcome.stderr.splitlines()  # a blank line is a line too
    if case.shows:
        assert len(lines) == 1, f"expected one line on stderr, got:\n{outcome.stderr}"
        assert pattern(case.shows).fullmatch(lines[0]), f"{lines[0]!r}\ndoes not match\n{case.shows!r}"
    else:
        assert lines == [], outcome.stderr
    assert outcome.after == outcome.before, "files were created, replaced or modified"
    assert outcome.hashes_after == outcome.hashes_before


def test_checkpoint_code_never_ran(outcomes, fixture_files):
    refused = [case for case in CASES if "evil.pth" in case.argv]
    assert refused and all(outcomes[case.id].returncode == 1 for case in refused)
    assert not (fixture_files / CODE_RAN_MARKER).exists(), "a checkpoint's pickled code ran"


def test_closed_pipe_exits_quietly(fixture_files):
    """`evit-deploy predict ... --json | head -1`: a reader that stops early is normal in a shell.
    Here the pipe is closed before anything is written, so the write certainly fails."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evit_deploy", "predict", "tiny.onnx", "photo.jpg", "--json"],
        cwd=fixture_files, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and stderr == ""
    shell = subprocess.run(  # and as typed in a shell: whoever wins the race, nothing is said
        f"{shlex.quote(sys.executable)} -m evit_deploy predict tiny.onnx photo.jpg --json | head -1",
        shell=True, cwd=fixture_files, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert shell.stdout == "[\n" and shell.stderr == ""


def test_pytorch_cpu_out_of_memory_is_the_one_line_error(fixture_files, monkeypatch):
    """PyTorch's CPU allocator fails with a plain RuntimeError (CUDA's has its own type): a
    request for 40 TB fails at once, without touching memory."""
    from typer.testing import CliRunner

    from evit_deploy.cli import app
    from evit_deploy.runtime.torch_backend import TorchBackend

    monkeypatch.setattr(TorchBackend, "run", lambda self, batch: torch.empty(10**13))
    result = CliRunner().invoke(app, ["predict", str(fixture_files / "tiny.pth"), str(fixture_files / "photo.jpg")])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (
        "error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "40000000000000 bytes. Error code 12 (Cannot allocate memory)); use a smaller batch or input size"
    )


@pytest.fixture(scope="module")
def tiny_predictor(fixture_files) -> Predictor:
    return Predictor(fixture_files / "tiny.onnx")


@pytest.mark.parametrize("case", API_CASES, ids=lambda case: case.id)
def test_api_case(case: ApiCase, tiny_predictor, fixture_files):
    with pytest.raises(EvitDeployError) as caught:
        case.call(tiny_predictor, fixture_files)
    shown = f"{type(caught.value).__name__}: {caught.value}"
    assert "\n" not in shown
    assert pattern(case.shows).fullmatch(shown), f"{shown!r}\ndoes not match\n{case.shows!r}"


def test_image_modes_are_converted_to_rgb_as_documented(outcomes, tiny_predictor):
    """The image-modes case's predictions are those of the RGB images worked out by hand: gray
    repeated in each channel, transparency composited on white, 16 bits stretched from their
    minimum to their maximum."""
    gray = np.full((60, 90, 3), 128, np.uint8)
    composited = np.where(_half_transparent()[:, :, 3:] == 255, _half_transparent()[:, :, :3], 255).astype(np.uint8)
    stretched = np.round(_gray16() / _gray16().max() * 255).astype(np.uint8)  # its minimum is 0
    expected = tiny_predictor.predict([gray, composited, np.dstack([stretched] * 3)])
    got = json.loads(outcomes["image-modes"].stdout)
    assert [g["image"] for g in got] == ["gray.png", "rgba.png", "gray16.png"]
    for g, want in zip(got, expected):
        assert g["class_ids"] == want.class_ids, (g["image"], g["class_ids"], want.class_ids)
        assert np.allclose(g["probs"], want.probs, rtol=1e-4, atol=1e-7), (g["image"], g["probs"], want.probs)


def test_predict_reads_a_folder_as_eval_does(outcomes):
    got = json.loads(outcomes["predict-folder"].stdout)
    assert [g["image"] for g in got] == ["data/n01440764/photo.jpg"] and len(got[0]["class_ids"]) == 5


# --------------------------------------------------------------------------------------------
# docs/errors.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_errors_markdown() -> str:
    """docs/errors.md: the CLI and API tables, one row per case."""
    lines = [
        "# Errors: what you did, what you see",
        "",
        "Generated from the test tables in `tests/test_errors.py` (every row is a test; `…` stands",
        "for text that depends on the case; regenerate with `.venv/bin/python tests/test_errors.py`).",
        "",
        "- Every user mistake gets one line on stderr and exit code 2 for a bad argument or 1 for a bad",
        "  file or input, no traceback unless `--debug`; so does the argument parser's (an unknown",
        "  option, a missing or extra argument, a value of the wrong type), with the command's `--help`",
        "  to see.",
        "- Where stderr is no terminal (a log, CI), long steps write a line per stage there once the",
        "  work is under way (the inputs read): a failure in the middle of that work, such as a",
        "  missed precision gate, comes after those lines; a mistake in the inputs, before them.",
        "- A closed pipe (`evit-deploy predict ... --json | head -1`) ends the command quietly, with",
        "  status 141 as standard tools have.",
        "- Outputs are written to a temp file and renamed, so no command leaves a partial or changed",
        "  file behind, and an interrupted export or build leaves the previous file as it was.",
        "- Ctrl-C or SIGTERM ends any command with status 130 and \"interrupted: no partial output was",
        "  left behind\", also when a library caught the interrupt (torch.export's lazy imports do):",
        "  the request is recorded, and no file is renamed after it. The exception is `serve`, for",
        "  which a stop is the normal end: it finishes its in-flight requests and exits 0 (130 only",
        "  when the stop comes before it is serving).",
        "",
        "## Command line",
        "",
        "| What you did | Exit | What you see on stderr |",
        "| --- | --- | --- |",
    ]
    for case in CASES:
        command = "evit-deploy " + shlex.join(case.argv)
        shows = case.shows or "nothing: it works"
        lines.append(f"| {_cell(case.did)}: `{_cell(command)}` | {case.code} | {_cell(shows)} |")
    lines += [
        "",
        "## Python API",
        "",
        "| What you did | What is raised |",
        "| --- | --- |",
    ]
    for api_case in API_CASES:
        lines.append(f"| {_cell(api_case.did)} | {_cell(api_case.shows)} |")
    return "\n".join(lines) + "\n"


README = DOCS.parents[1] / "README.md"
README_START, README_END = "<!-- errors:start -->\n", "<!-- errors:end -->"


def readme_errors_section() -> str:
    """What README.md holds between its errors markers: a pointer to docs/errors.md, not the
    tables (they live there only)."""
    return (
        f"The {len(CASES)} command-line cases and {len(API_CASES)} Python API errors that the tests check, each\n"
        "with its exit code and the exact line you see, are in [docs/errors.md](docs/errors.md).\n"
    )


def readme_with_errors(readme: str) -> str:
    """README.md with its errors section replaced by `readme_errors_section()`."""
    head, rest = readme.split(README_START, 1)
    return head + README_START + readme_errors_section() + README_END + rest.split(README_END, 1)[1]


def test_docs_errors_table_is_rendered_from_the_cases():
    rendered = render_errors_markdown()
    assert DOCS.is_file() and DOCS.read_text(encoding="utf-8") == rendered, (
        f"{DOCS} is out of date: run `.venv/bin/python tests/test_errors.py` to regenerate it"
    )
    readme = README.read_text(encoding="utf-8")
    assert README_START in readme and README_END in readme, f"README.md lacks {README_START.strip()} / {README_END}"
    assert readme == readme_with_errors(readme), (
        "README.md's errors section is out of date: run `.venv/bin/python tests/test_errors.py`"
    )


if __name__ == "__main__":
    DOCS.parent.mkdir(exist_ok=True)
    rendered = render_errors_markdown()
    DOCS.write_text(rendered, encoding="utf-8")
    README.write_text(readme_with_errors(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {DOCS} and the errors section of {README}", file=sys.stderr)
