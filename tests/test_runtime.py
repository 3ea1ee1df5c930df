"""Predictor over every CPU backend, preprocessing, batching, thread safety, and bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import BENCH_JSON_KEYS
from evit_deploy import Predictor
from evit_deploy.cli import app
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.export import export_onnx
from evit_deploy.metadata import ArtifactMetadata
from evit_deploy.model import EvitConfig, EvitOverrides, build_model
from evit_deploy.preprocess import SAMPLE_IMAGE, preprocess
from evit_deploy.runtime.backends import backend_for, load_backend
from evit_deploy.runtime.base import Backend
from evit_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from evit_deploy.bench.bench import bench_artifact, interleaved_latencies, parse_batches
from evit_deploy.data.labels import default_class_names, imagenet_classes
from evit_deploy.runtime.onnxruntime_backend import choose_providers
from reference_evit import reference_forward

TINY = EvitConfig("deit_tiny_patch16_224", 0.7)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny EViT as checkpoint (.pth) and as its validated ONNX export."""
    folder = tmp_path_factory.mktemp("artifacts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(TINY, seed=3)
    checkpoint = folder / "tiny.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    reloaded = build_model(TINY, checkpoint)
    onnx_path = folder / "tiny.onnx"
    export_onnx(reloaded, onnx_path)
    return {"pth": checkpoint, "onnx": onnx_path, "model": reloaded}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((5, 3, 224, 224), dtype=np.float32)


def test_onnx_predictor_is_bit_identical_to_onnxruntime(artifacts, images):
    session = ort.InferenceSession(str(artifacts["onnx"]), providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], {"images": images})[0]
    got = Predictor(artifacts["onnx"]).logits(images)
    assert got.dtype == np.float32 and got.shape == (5, 1000)
    assert np.array_equal(got, expected)


def test_pytorch_predictor_matches_onnx_within_tolerance(artifacts, images):
    torch_logits = Predictor(artifacts["pth"], evit=EvitOverrides(keep_rate=0.7)).logits(images)
    onnx_logits = Predictor(artifacts["onnx"]).logits(images)
    scale = np.abs(torch_logits).max()
    assert np.abs(torch_logits - onnx_logits).max() <= 1e-4 * scale
    with torch.no_grad():
        reference = artifacts["model"](torch.from_numpy(images)).numpy()
    assert np.array_equal(torch_logits, reference)


def checkpoint_reference(artifacts, images: np.ndarray, keep_rate: float, drop_loc: tuple[int, ...]) -> np.ndarray:
    """Logits of the independent reference EViT (tests/reference_evit.py) on the checkpoint."""
    state = torch.load(artifacts["pth"], weights_only=True)["model"]
    result = reference_forward(
        state, torch.from_numpy(images), num_heads=3, keep_rate=keep_rate, drop_loc=drop_loc, fuse_token=True
    )  # deit_tiny: 3 heads
    return result.logits.numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()


def test_pytorch_backend_reads_architecture_and_settings(artifacts, images):
    predictor = Predictor(artifacts["pth"], evit=EvitOverrides(keep_rate=0.5, drop_loc=(2, 5)))
    meta = predictor.metadata
    assert (meta.model, meta.keep_rate, meta.drop_loc) == ("deit_tiny_patch16_224", 0.5, [2, 5])
    assert meta.weights.startswith("sha256:") and meta.checkpoint.endswith("tiny.pth")
    assert predictor.backend.describe()["backend"] == "pytorch"
    # and it runs them: the reference at these settings, not at the defaults
    got = predictor.logits(images[:2])
    assert_close(got, checkpoint_reference(artifacts, images[:2], 0.5, (2, 5)))
    default = checkpoint_reference(artifacts, images[:2], 0.7, (3, 6, 9))
    assert np.abs(got - default).max() > 1e-2 * np.abs(default).max()


def test_metadata_drives_settings(artifacts):
    predictor = Predictor(artifacts["onnx"])
    assert predictor.input_shape == (3, 224, 224)
    assert predictor.metadata.keep_rate == 0.7
    assert predictor.metadata.topk_k == [b.keep for b in TINY.token_plan if b.keep]


def test_predict_same_answer_for_path_pil_and_array(artifacts):
    predictor = Predictor(artifacts["onnx"])
    pil = Image.open(SAMPLE_IMAGE).convert("RGB")
    by_path, by_pil, by_array = predictor.predict([str(SAMPLE_IMAGE), pil, np.asarray(pil)], topk=5)
    assert by_path == by_pil == by_array
    assert len(by_path.class_ids) == 5 and by_path.probs == sorted(by_path.probs, reverse=True)
    assert by_path.labels == [default_class_names(1000)[c] for c in by_path.class_ids]
    single = predictor.predict(SAMPLE_IMAGE, topk=3)
    assert len(single) == 1 and single[0].class_ids == by_path.class_ids[:3]


def test_predict_probabilities_are_the_softmax_of_the_logits(artifacts):
    predictor = Predictor(artifacts["onnx"])
    batch = preprocess([SAMPLE_IMAGE])
    logits = predictor.logits(batch)[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = predictor.predict(SAMPLE_IMAGE, topk=4)[0]
    assert top.class_ids == list(np.argsort(-probs)[:4])
    assert np.allclose(top.probs, probs[top.class_ids], rtol=1e-5)


def test_imagenet_labels_shipped():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len({w for w, _ in classes}) == 1000
    assert classes[0] == ("n01440764", "tench") and classes[207][1] == "golden retriever"
    assert default_class_names(10) == tuple(f"class {i}" for i in range(10))


def test_chunking_splits_large_inputs(artifacts, images):
    whole = Predictor(artifacts["onnx"]).logits(images)
    chunked = Predictor(artifacts["onnx"], max_batch=2).logits(images)
    assert chunked.shape == whole.shape
    assert np.allclose(chunked, whole, atol=1e-5 * np.abs(whole).max())


class FakeBackend(Backend):
    """A backend with a fixed batch range whose logits name their input (each image's mean, in
    every class). It records the batches it gets. Not thread-safe, like a TensorRT context: a call
    that starts while another runs is counted in `overlaps`; each call stays in for up to
    `hold_s`, or until another call comes in, so that an unserialised caller would overlap."""

    name = "fake"

    def __init__(self, min_batch: int = 1, max_batch: int | None = None, hold_s: float = 0.0):
        self.metadata = ArtifactMetadata.from_config(TINY)
        self.min_batch, self.max_batch, self.hold_s = min_batch, max_batch, hold_s
        self.thread_safe = False
        self.batches: list[np.ndarray] = []
        self.overlaps = 0
        self._busy = threading.Lock()
        self._intruder = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        assert self.min_batch <= len(batch) <= (self.max_batch or len(batch)), len(batch)
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            self._intruder.set()
        else:
            try:
                self._intruder.wait(self.hold_s)
            finally:
                self._busy.release()
        self.batches.append(batch.copy())
        return np.repeat(batch.mean(axis=(1, 2, 3))[:, None], 1000, axis=1)


def image_means(batch: np.ndarray) -> np.ndarray:
    return batch.astype(np.float64).mean(axis=(1, 2, 3))


def test_chunks_follow_the_smaller_of_the_callers_and_the_backends_max_batch(images):
    more = np.concatenate([images, images[:2]])  # 7 images
    for backend_max, caller_max, sizes in ((4, None, [4, 3]), (4, 3, [3, 3, 1]), (4, 8, [4, 3]), (None, None, [7])):
        backend = FakeBackend(max_batch=backend_max)
        predictor = Predictor(backend, max_batch=caller_max)
        out = predictor.logits(more)
        assert [len(b) for b in backend.batches] == sizes
        assert out.shape == (7, 1000) and np.allclose(out[:, 0], image_means(more), atol=1e-6)


def test_chunks_below_min_batch_are_zero_padded_and_the_padding_dropped(images):
    backend = FakeBackend(min_batch=4, max_batch=4)
    out = Predictor(backend).logits(images)  # 5 images -> 4 + (1 padded to 4)
    assert [len(b) for b in backend.batches] == [4, 4]
    assert np.array_equal(backend.batches[1][0], images[4]) and not backend.batches[1][1:].any()
    assert out.shape == (5, 1000) and np.allclose(out[:, 0], image_means(images), atol=1e-6)


def test_a_backend_that_is_not_thread_safe_is_never_entered_twice():
    backend = FakeBackend(max_batch=2, hold_s=0.05)
    predictor = Predictor(backend)
    inputs = [np.random.default_rng(i).standard_normal((3, 3, 224, 224), dtype=np.float32) for i in range(6)]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(inputs))

    def call(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = predictor.logits(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert backend.overlaps == 0, f"{backend.overlaps} backend calls overlapped"
    assert sorted(results) == list(range(len(inputs)))
    for i, x in enumerate(inputs):
        assert np.allclose(results[i][:, 0], image_means(x), atol=1e-6)


class MeetingBackend(FakeBackend):
    """Thread-safe; each call returns only once `parties` calls are inside together."""

    def __init__(self, parties: int):
        super().__init__()
        self.thread_safe = True
        self._meeting = threading.Barrier(parties, timeout=20)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._meeting.wait()  # BrokenBarrierError if the calls were serialised
        return np.zeros((len(batch), 1000), np.float32)


def test_a_thread_safe_backend_is_called_concurrently(images):
    predictor = Predictor(MeetingBackend(parties=2))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            predictor.logits(images[:1])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_a_loaded_backend_takes_no_loading_options():
    with pytest.raises(UsageError, match="no backend, device or options"):
        Predictor(FakeBackend(), device="cpu")


def test_concurrent_callers_get_their_own_results(artifacts):
    predictor = Predictor(artifacts["onnx"])
    inputs = [np.random.default_rng(i).standard_normal((2, 3, 224, 224), dtype=np.float32) for i in range(8)]
    expected = [predictor.logits(x) for x in inputs]
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = predictor.logits(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8))
    for i in range(8):
        assert np.allclose(results[i], expected[i], atol=1e-5 * np.abs(expected[i]).max())


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3, 224, 224), np.float64), "float32"),
        (np.zeros((2, 3, 160, 160), np.float32), "shape"),
        (np.zeros((3, 224, 224), np.float32), "shape"),
        (np.zeros((0, 3, 224, 224), np.float32), "shape"),
        (np.full((1, 3, 224, 224), np.nan, np.float32), "NaN"),
        ([[1.0]], "numpy array"),
    ],
)
def test_bad_tensor_inputs_are_refused(artifacts, bad, message):
    with pytest.raises(EvitDeployError, match=message):
        Predictor(artifacts["onnx"]).logits(bad)


def test_backend_selection(tmp_path):
    assert backend_for(tmp_path / "m.onnx", "auto") == "onnxruntime"
    assert backend_for(tmp_path / "m.plan", "auto") == "tensorrt"
    assert backend_for(tmp_path / "m.engine", "auto") == "tensorrt"
    assert backend_for(tmp_path / "m.safetensors", "auto") == "pytorch"
    assert backend_for(tmp_path / "m.onnx", "pytorch") == "pytorch"
    with pytest.raises(UsageError, match="cannot tell the backend"):
        backend_for(tmp_path / "m.bin", "auto")
    with pytest.raises(UsageError, match="unknown backend"):
        backend_for(tmp_path / "m.onnx", "tflite")


def test_provider_choice():
    cpu_only = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(cpu_only) == cpu_only
    assert choose_providers(list(reversed(gpu))) == gpu  # preference order, not install order
    assert choose_providers(gpu, device="cpu") == cpu_only
    assert choose_providers(gpu, requested=["cuda", "cpu"]) == gpu[1:]
    with pytest.raises(UsageError, match="not installed"):
        choose_providers(cpu_only, requested=["cuda"])
    with pytest.raises(UsageError, match="onnxruntime-gpu"):
        choose_providers(cpu_only, device="cuda")


class CountingBackend(Backend):
    name = "counting"

    def __init__(self, tag: str, log: list[str]):
        self.metadata = ArtifactMetadata.from_config(TINY)
        self.tag, self.log = tag, log

    def run(self, batch):
        self.log.append(self.tag)
        return np.zeros((len(batch), 1000), np.float32)


def test_variants_are_timed_interleaved():
    log: list[str] = []
    a, b = CountingBackend("A", log), CountingBackend("B", log)
    times = interleaved_latencies([a, b], np.zeros((1, 3, 224, 224), np.float32), warmup=1, iterations=4)
    assert [len(t) for t in times] == [4, 4]
    assert log == ["A", "B"] + ["A", "B"] * 4


def test_parse_batches():
    assert parse_batches("1,8,64") == [1, 8, 64]
    for bad in ("0", "-1", "a", "", "8,,x"):
        with pytest.raises(UsageError):
            parse_batches(bad)


def test_bench_evit_beside_cached_plain_baseline(artifacts, images, tmp_path, monkeypatch):
    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(tmp_path / "cache"))
    report = bench_artifact(artifacts["onnx"], [1, 2], iterations=2, warmup=1)
    assert [(r.keep_rate, r.batch) for r in report.runs] == [(0.7, 1), (1.0, 1), (0.7, 2), (1.0, 2)]
    assert set(report.speedup) == {0.7} and set(report.speedup[0.7]) == {1, 2}
    assert all(s > 0 for s in report.speedup[0.7].values())
    assert report.flops_ratio == {0.7: pytest.approx(report.runs[1].gmacs / report.runs[0].gmacs)}
    baselines = list((tmp_path / "cache" / "baselines").glob("*.onnx"))
    assert len(baselines) == 1
    # the baseline was rebuilt from the same checkpoint: it computes what the checkpoint's plain
    # ViT computes
    plain = Predictor(baselines[0])
    assert plain.metadata.keep_rate == 1.0
    assert_close(plain.logits(images[:2]), checkpoint_reference(artifacts, images[:2], 1.0, ()))
    stamp = baselines[0].stat().st_mtime_ns
    bench_artifact(artifacts["onnx"], [1], iterations=1, warmup=0)
    assert baselines[0].stat().st_mtime_ns == stamp  # reused, not re-exported


def test_bench_times_a_separately_trained_plain_vit_at_its_own_input_size(artifacts, bench_cache, tmp_path, monkeypatch):
    """--plain: the plain run is the given artifact (a ViT trained without token reduction, here
    at 192 px as a higher-resolution EViT's equal-cost baseline would be), timed at its own size;
    an EViT or other classes are refused."""
    from conftest import config_for, fresh_model

    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(bench_cache))
    plain = tmp_path / "plain192.onnx"
    export_onnx(fresh_model(config_for(keep_rate=1.0, img_size=192), seed=7), plain)
    report = bench_artifact(artifacts["onnx"], [2], iterations=2, warmup=0, plain=plain)
    assert [(v["keep_rate"], v["artifact"]) for v in report.variants][:2] == [
        (0.7, str(artifacts["onnx"])), (1.0, str(plain))
    ]
    assert report.runs[1].keep_rate == 1.0 and report.speedup[0.7][2] > 0
    assert report.plain_artifact == report.runs[1].artifact == "plain192.onnx"
    with pytest.raises(UsageError, match="is an EViT"):
        bench_artifact(artifacts["onnx"], [1], iterations=1, warmup=0, plain=artifacts["onnx"])
    with pytest.raises(UsageError, match="plain192.onnx is a plain ViT: --plain times a plain ViT beside an EViT"):
        bench_artifact(plain, [1], iterations=1, warmup=0, plain=plain)
    # off ONNX Runtime FP32 the reference (these EViT weights at keep 1.0, 224 px) is timed too:
    # the FLOPs ratio is still the one against the given plain ViT, at its 192 px
    report = bench_artifact(artifacts["onnx"], [1], "openvino", iterations=1, warmup=0, plain=plain)
    evit, given, reference = report.variants
    assert reference["keep_rate"] == 1.0 and reference["gmacs"] > given["gmacs"]
    assert report.flops_ratio[0.7] == pytest.approx(given["gmacs"] / evit["gmacs"])
    proc = subprocess.run(
        [sys.executable, "-m", "evit_deploy", "bench", str(artifacts["onnx"]), "--plain", str(plain),
         "--batch", "1", "--iters", "1", "--warmup", "0", "--json-out", str(tmp_path / "bench.json")],
        capture_output=True, text=True, env={**os.environ, "EVIT_DEPLOY_CACHE": str(bench_cache), "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["variants"][1]["artifact"] == str(plain)
    assert "keep 1.0 on onnxruntime: plain192.onnx, trained without token reduction" in proc.stdout  # the table's caption
    assert "the plain ViT's (plain192.onnx, trained without token reduction) throughput" in proc.stdout
    other = tmp_path / "plain10.onnx"
    export_onnx(fresh_model(config_for(keep_rate=1.0, num_classes=10), seed=7), other)
    with pytest.raises(UsageError, match="has 10 classes"):
        bench_artifact(artifacts["onnx"], [1], iterations=1, warmup=0, plain=other)


def test_a_closed_backend_releases_its_session_and_the_predictor_closes_its_backend(artifacts, images):
    with load_backend(artifacts["onnx"]) as backend:
        assert backend.run(images[:1]).shape == (1, 1000)
    assert backend.session is None
    with Predictor(artifacts["onnx"]) as predictor:
        predictor.logits(images[:1])
    assert predictor.backend.session is None


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """An EVIT_DEPLOY_CACHE for the bench tests that do not check the caching itself
    (test_bench_evit_beside_cached_plain_baseline does, with its own empty one): the plain
    baseline that bench exports for `artifacts` (10-20 s) is made once for them, not once each."""
    return tmp_path_factory.mktemp("bench-cache")


def test_bench_closes_every_backend_it_loaded(artifacts, bench_cache, monkeypatch):
    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(bench_cache))
    closed = []
    monkeypatch.setattr(
        OnnxRuntimeBackend, "close", lambda self: closed.append(self.metadata.keep_rate)
    )
    bench_artifact(artifacts["onnx"], [1], iterations=1, warmup=0)
    assert sorted(closed) == [0.7, 1.0]


def test_bench_warns_when_the_machine_is_busy(artifacts, bench_cache, monkeypatch):
    """Above the cores, the load average makes timings slow and uneven: one warning, given
    with the timings; at or below, none."""
    monkeypatch.setenv("EVIT_DEPLOY_CACHE", str(bench_cache))
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    with pytest.warns(UserWarning, match=rf"the machine is busy \(load average {cores + 0.5:.1f} on {cores} cores\)"):
        bench_artifact(artifacts["onnx"], [1], iterations=1, warmup=0)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench_artifact(artifacts["onnx"], [1], iterations=1, warmup=0)
    assert not [w for w in caught if "busy" in str(w.message)]


def test_bench_cli_writes_json(artifacts, bench_cache, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "EVIT_DEPLOY_CACHE": str(bench_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "evit_deploy", "bench", str(artifacts["onnx"]), "--batch", "1,2",
         "--iters", "2", "--warmup", "0", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 4 and set(data["speedup"]) == {"0.7"}
    assert set(data["speedup"]["0.7"]) == {"1", "2"} and set(data["flops_ratio"]) == {"0.7"}
    assert [v["keep_rate"] for v in data["variants"]] == [0.7, 1.0] and set(data) == BENCH_JSON_KEYS
    assert data["end_to_end"] == [] and data["accuracy"] == {}
    for run in data["runs"]:
        assert {"model", "keep_rate", "backend", "batch", "latency_ms", "throughput_ips", "gmacs"} <= set(run)
        assert set(run["latency_ms"]) == {"mean", "p50", "p90", "p99"}
    assert "EViT (keep 0.7) is" in proc.stdout and "FLOPs ratio" in proc.stdout
    # the plain run is ONNX Runtime FP32, the reference itself: its ratio is not said twice
    assert "(the reference)" not in proc.stdout
    keep_cells = [line.split("│")[2].strip() for line in proc.stdout.splitlines() if line.count("│") > 10]
    assert keep_cells == ["0.7", "1.0", "0.7", "1.0"]  # as the JSON writes them, never "1"
    again = subprocess.run(
        [sys.executable, "-m", "evit_deploy", "bench", str(artifacts["onnx"]), "--batch", "1",
         "--iters", "1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_bench_end_to_end_times_every_stage_beside_the_model_alone(artifacts, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.open(SAMPLE_IMAGE).save(folder / "photo.jpg")
    Image.new("RGB", (300, 200), (10, 200, 30)).save(folder / "sub" / "green.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", str(artifacts["pth"]), "--keep-rate", "0.7", "--batch", "1,3", "--iters", "2",
        "--warmup", "0", "--end-to-end", str(folder), "--threads", "2", "--json-out", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data) == BENCH_JSON_KEYS
    rows = data["end_to_end"]
    assert [(r["keep_rate"], r["batch"]) for r in rows] == [(0.7, 1), (1.0, 1), (0.7, 3), (1.0, 3)]
    assert [(r["keep_rate"], r["batch"]) for r in data["runs"]] == [(0.7, 1), (1.0, 1), (0.7, 3), (1.0, 3)]
    for row in rows:
        ms = row["ms_per_image"]
        assert set(ms) == {"decode", "preprocess", "inference", "topk", "total"}
        assert all(ms[stage] > 0 for stage in ms)
        assert ms["total"] == pytest.approx(ms["decode"] + ms["preprocess"] + ms["inference"] + ms["topk"])
        assert sum(row["share"].values()) == pytest.approx(1.0)
        assert (row["images"], row["batches"], row["preprocess_threads"]) == (2, 2, 2)
        assert row["throughput_ips"] == pytest.approx(1000 / ms["total"])
    assert set(data["end_to_end_speedup"]) == {"0.7"} and set(data["end_to_end_speedup"]["0.7"]) == {"1", "3"}
    for fragment in ("End to end: image files to top-5", "2 image file(s)", "2 thread(s)", "end to end, EViT (keep 0.7) is"):
        assert fragment in result.output
