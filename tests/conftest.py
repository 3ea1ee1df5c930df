"""Shared fixtures and helpers for the evit-deploy test suite.

Everything expensive is built once per session and shared: seeded random-weight models
(`random_model`, cached by its arguments) and validated ONNX exports (`onnx_export`, an
ExportCache keyed by the export settings, shared by all modules and all pytest-xdist workers of a
run). Shared objects must be treated as read-only; a test that changes a model builds its own with
`fresh_model`.

No test downloads anything: weights are seeded random (`init_random_weights` makes the class
attention peaky, as in a trained model) and images are made by the tests or the shipped sample
photograph (`SAMPLE_IMAGE`).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

# One intra-op thread for PyTorch (OpenMP) and numpy's BLAS, in this process and in the CLI
# processes the tests start (they inherit the environment); set before torch or numpy loads.
# The tests run many small tensor ops, and on a busy machine (2 cores shared with other jobs,
# or with a second pytest-xdist worker) a second OpenMP thread spin-waits for a core at every
# op: measured, tests/test_checkpoint.py and tests/test_model.py took 137 s with 2 threads and
# 16 s with 1. Nothing a test asserts depends on the thread count (a test that sets one, as
# `--threads N` does, gets it back to this after; see `_one_torch_thread`). An
# OMP_NUM_THREADS you set yourself is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from evit_deploy.model import EvitConfig, build_model  # noqa: E402
from evit_deploy.model.vit import EViT  # noqa: E402
from evit_deploy.preprocess import SAMPLE_IMAGE, preprocess  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # so tests can `import reference_evit`
    sys.path.insert(0, str(TESTS_DIR))

TINY = "deit_tiny_patch16_224"
SMALL = "deit_small_patch16_224"
BASE = "deit_base_patch16_224"
PUBLISHED_DROP_LOC = (3, 6, 9)
# The top-level keys of bench's JSON, with or without --keep-rates (README, "bench JSON").
BENCH_JSON_KEYS = {
    "runs", "variants", "speedup", "flops_ratio", "accuracy", "end_to_end", "end_to_end_speedup", "reference",
    "reference_speedup", "profiles", "plain_artifact",
}

__all__ = [
    "BASE",
    "BENCH_JSON_KEYS",
    "PUBLISHED_DROP_LOC",
    "SAMPLE_IMAGE",
    "SMALL",
    "TINY",
    "config_for",
    "fresh_model",
    "natural_images",
    "random_images",
    "random_model",
    "run_cli",
    "assert_one_line_error",
    "cli_env",
]


# --------------------------------------------------------------------------------------------
# Models


def config_for(
    model: str = TINY,
    keep_rate: float = 0.7,
    drop_loc: tuple[int, ...] = PUBLISHED_DROP_LOC,
    fuse_token: bool = True,
    img_size: int = 224,
    num_classes: int = 1000,
) -> EvitConfig:
    return EvitConfig(model, keep_rate, tuple(drop_loc), fuse_token, img_size, num_classes)


def fresh_model(config: EvitConfig, seed: int = 0, checkpoint=None) -> EViT:
    """A newly built eval-mode model (random weights with `seed`, or from `checkpoint`), without
    the 'no checkpoint given' warning. Yours to modify."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_model(config, checkpoint, seed=seed)


@functools.cache
def _cached_model(config: EvitConfig, seed: int) -> EViT:
    model = fresh_model(config, seed)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def random_model(
    model: str = TINY,
    keep_rate: float = 0.7,
    drop_loc: tuple[int, ...] = PUBLISHED_DROP_LOC,
    fuse_token: bool = True,
    img_size: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
) -> EViT:
    """A seeded random-weight model built once per session for these arguments. Shared: do not
    modify it (use `fresh_model` for that)."""
    config = config_for(model, keep_rate, drop_loc, fuse_token, img_size, num_classes)
    return _cached_model(config, seed)


# --------------------------------------------------------------------------------------------
# Images


def random_images(batch: int, img_size: int = 224, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal NCHW float32 images (already 'normalised')."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, img_size, img_size), dtype=np.float32)


@functools.cache
def _natural_images(batch: int, img_size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(SAMPLE_IMAGE) as opened:
        photo = opened.convert("RGB")
    views = [
        photo,
        ImageOps.mirror(photo),
        photo.rotate(90, expand=True),
        ImageOps.flip(photo),
        photo.crop((0, 0, photo.width // 2, photo.height // 2)),
        ImageOps.grayscale(photo).convert("RGB"),
        photo.rotate(270, expand=True),
    ]
    return preprocess([views[i % len(views)] for i in range(batch)], img_size)


def natural_images(batch: int, img_size: int = 224) -> np.ndarray:
    """`batch` preprocessed views (flips, rotations, crops) of the shipped sample photograph."""
    return _natural_images(batch, img_size).copy()


@pytest.fixture(scope="session")
def sample_batch() -> np.ndarray:
    """Three random and three natural 224px images, [6, 3, 224, 224] float32."""
    return np.concatenate([random_images(3), natural_images(3)])


# --------------------------------------------------------------------------------------------
# Exports


def run_shared_folder(tmp_path_factory) -> Path:
    """A folder every process of this test run sees: the session's temp folder, or under
    pytest-xdist (`-n 2`) the parent of the workers' temp folders."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


class ExportCache:
    """Validated ONNX exports of `random_model`, made once per test run and shared by every module
    that asks for the same settings.

    Why: one export (torch.export trace, onnxslim, validation against PyTorch) takes 10-40 s on a
    2-core machine, and a dozen modules need the same few (the tiny keep-0.7 model above all).
    The key is every setting that changes the file: the config, the seed of the weights, the
    token-index outputs and the opset; a test that needs anything else (a checkpoint, another
    precision, a patched exporter) exports its own. Under pytest-xdist the workers share one
    folder: the first that needs an export makes it under a file lock, the others wait for it
    and read its result, so no export is made twice in a run.

    The files are shared: read them, do not modify or move them (copy first)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.results: dict[tuple, object] = {}

    def __call__(
        self, config: EvitConfig, with_token_indices: bool = False, seed: int = 0, opset: int | None = None
    ):
        from evit_deploy.export.onnx import DEFAULT_OPSET

        key = (config, with_token_indices, seed, DEFAULT_OPSET if opset is None else opset)
        if key not in self.results:
            self.results[key] = self._load_or_export(key)
        return self.results[key]

    def _load_or_export(self, key: tuple):
        import hashlib
        import pickle

        from filelock import FileLock

        from evit_deploy.export import export_onnx

        config, with_token_indices, seed, opset = key
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:10]
        stem = (
            f"{config.model}_k{config.keep_rate:g}_d{'-'.join(map(str, config.drop_loc))}"
            f"_f{int(config.fuse_token)}_{config.img_size}_n{config.num_classes}"
            f"_i{int(with_token_indices)}_s{seed}_o{opset}_{digest}"
        )
        path, record = self.folder / f"{stem}.onnx", self.folder / f"{stem}.result.pickle"
        with FileLock(str(self.folder / f"{stem}.lock")):
            if record.is_file():  # made by another xdist worker of this run
                return pickle.loads(record.read_bytes())
            model = _cached_model(config, seed)
            result = export_onnx(model, path, with_token_indices=with_token_indices, opset=opset)
            record.write_bytes(pickle.dumps(result))
            return result


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory) -> ExportCache:
    """`onnx_export(config, with_token_indices=False, seed=0, opset=None)` -> ExportResult of a
    validated export of `random_model` for those settings, made once per run (see ExportCache).
    Read the file; do not modify or move it."""
    folder = run_shared_folder(tmp_path_factory) / "shared-exports"
    folder.mkdir(exist_ok=True)
    return ExportCache(folder)


# --------------------------------------------------------------------------------------------
# Environment and CLI


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """Keep every cache the code writes (EVIT_DEPLOY_CACHE) out of the user's home."""
    folder = tmp_path_factory.mktemp("evit-cache")
    previous = os.environ.get("EVIT_DEPLOY_CACHE")
    os.environ["EVIT_DEPLOY_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("EVIT_DEPLOY_CACHE", None)
    else:
        os.environ["EVIT_DEPLOY_CACHE"] = previous


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Give back PyTorch's thread count after a test that changed it (the PyTorch backend's
    `threads` option sets it for the whole process), so later tests keep OMP_NUM_THREADS."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty EVIT_DEPLOY_CACHE for this test only (also seen by `run_cli` subprocesses)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(folder))
    return folder


def cli_env(**extra: str) -> dict[str, str]:
    """The environment CLI subprocesses get: the current one, colour off, no inherited terminal
    width (Rich then renders at its fixed default), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    env.update(NO_COLOR="1", PYTHONIOENCODING="utf-8", TERM="dumb")
    env.update(extra)
    return env


def run_cli(
    *args: str,
    cwd: str | Path | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m evit_deploy ARGS` as a user would; returns the CompletedProcess with text
    stdout/stderr. Never raises on a non-zero exit: assert on returncode yourself."""
    return subprocess.run(
        [sys.executable, "-m", "evit_deploy", *map(str, args)],
        cwd=cwd,
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """The `run_cli` helper as a fixture."""
    return run_cli


# The line of a stage under way and the done line of a counted one, where stderr is no terminal
# (evit_deploy/cli/progress.py): "validating on heldout/ (400 images) ... done in 109 s".
STAGE_LINE = re.compile(r".+ \.\.\.( done in \d+ s)?")


def assert_one_line_error(
    proc: subprocess.CompletedProcess, code: int, *fragments: str, after_stages: bool = False
) -> str:
    """A CLI failure as users should see it: exit `code`, one `error: ...` line on stderr, no
    traceback anywhere; returns the line. after_stages: a failure that ends work under way (a
    missed gate), after the lines of its stages."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output
    assert "Traceback" not in output, output
    lines = proc.stderr.splitlines()
    if after_stages:
        lines = [line for line in lines if not STAGE_LINE.fullmatch(line)]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def export_torchscript(model, with_token_indices: bool = True):
    """The older TorchScript exporter (dynamo=False): an ONNX the user brings from elsewhere, with
    other node names and op patterns, that build-engine must convert just as well."""
    import io

    import onnx
    import torch

    from evit_deploy.export.onnx import _WithTokenIndices
    from evit_deploy.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata

    meta = ArtifactMetadata.from_config(model.config, with_token_indices=with_token_indices)
    module = _WithTokenIndices(model) if with_token_indices else model
    names = [OUTPUT_NAME, *meta.token_index_outputs]
    size = model.config.img_size
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (torch.zeros(2, 3, size, size),), buffer, dynamo=False,
            opset_version=17, input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *names]},
        )
    return onnx.load_from_string(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# pytest-xdist (`make test` runs `-n 2`)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `-n`: each test file runs whole on one worker, so its module fixtures (servers,
    exports of their own, the errors table's CLI runs) are built once, not once per worker; the
    done-when matrix rows are the exception, one unit each: independent exports of 15-40 s that
    balance the two workers. (Exports shared across files come from ExportCache, once per run.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndMatrixRows(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module, _, name = nodeid.partition("::")
            return nodeid if name.startswith("test_done_when_matrix[") else module

    return FilesAndMatrixRows(config, log)
