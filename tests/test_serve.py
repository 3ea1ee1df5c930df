"""`evit-deploy serve` on Triton Inference Server (PyTriton), its REST front, client and load test.

Loopback only. Servers are started by fixtures and always stopped; every client loop is bounded
in count and by timeouts. Tests that run a server need the `serve` extra (nvidia-pytriton) and are
skipped without it; the rest run anywhere.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_IMAGE, assert_one_line_error, cli_env, config_for, run_cli
from evit_deploy.client import (
    Client,
    ServerError,
    decode_infer_response,
    encode_infer_request,
    logits_match,
)
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.preprocess import preprocess
from evit_deploy.runtime import Predictor
from evit_deploy.serve.metrics import Histogram, ServeMetrics, batch_buckets
from evit_deploy.serve.server import BatchRunner, ServeOptions, python_backend_library_path
from evit_deploy.stats import latency_summary

SERVER_TIMEOUT = 120  # seconds for a server to start / stop, worst case on a loaded 2-core box


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_options(**kwargs) -> ServeOptions:
    http, grpc, metrics, rest = free_ports(4)
    return ServeOptions(
        host="127.0.0.1", port=http, grpc_port=grpc, metrics_port=metrics, rest_port=rest,
        shutdown_timeout_s=5, **kwargs,
    )


@pytest.fixture(scope="module")
def artifact(onnx_export):
    return onnx_export(config_for()).path


@pytest.fixture(scope="module")
def predictor(artifact):
    return Predictor(artifact)


# ------------------------------------------------------------------------------------------
# Pieces that need no server


def test_protocol_round_trip():
    batch = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)
    body, headers = encode_infer_request("images", batch, "logits")
    split = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:split])
    assert header["inputs"][0] == {
        "name": "images", "shape": [2, 3, 4, 4], "datatype": "FP32",
        "parameters": {"binary_data_size": batch.nbytes},
    }
    assert np.array_equal(np.frombuffer(body[split:], "<f4").reshape(batch.shape), batch)
    # a response with a binary output, and one with JSON data
    out = np.arange(6, dtype=np.float32).reshape(2, 3)
    head = json.dumps({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 3],
                                    "parameters": {"binary_data_size": out.nbytes}}]}).encode()
    assert np.array_equal(decode_infer_response(head + out.tobytes(), str(len(head)), "logits"), out)
    plain = json.dumps({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 3],
                                     "data": out.ravel().tolist()}]}).encode()
    assert np.array_equal(decode_infer_response(plain, None, "logits"), out)
    with pytest.raises(EvitDeployError, match="no output"):
        decode_infer_response(plain, None, "other")


def test_logits_match_tolerates_rounding_not_other_answers():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 1000), dtype=np.float32) * 3
    assert logits_match(a + 1e-5, a)
    assert not logits_match(b, a)
    assert not logits_match(np.full_like(a, np.nan), a)


def test_latency_summary_interpolates_between_ranks_and_is_nan_for_no_samples():
    summary = latency_summary([1, 2, 3, 4])
    assert summary == {"mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97)}
    assert all(np.isnan(v) for v in latency_summary([]).values())


def test_batch_runner_answers_each_request_with_its_own_rows(predictor):
    """The function Triton calls: requests of different sizes concatenated into one batch, and
    split back; a request with NaN gets NaN rows without changing anyone else's answer."""
    metrics = ServeMetrics("evit", 64)
    runner = BatchRunner(predictor, metrics)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((n, 3, 224, 224), dtype=np.float32) for n in (1, 3, 2)]
    poisoned = inputs[2].copy()
    poisoned[1, 0, 5, 5] = np.nan
    responses = runner([{"images": x} for x in (inputs[0], inputs[1], poisoned)])
    assert [r["logits"].shape for r in responses] == [(1, 1000), (3, 1000), (2, 1000)]
    for got, x in zip(responses[:2], inputs[:2]):
        assert logits_match(got["logits"], predictor.logits(x))
    assert logits_match(responses[2]["logits"][:1], predictor.logits(inputs[2][:1]))
    assert np.isnan(responses[2]["logits"][1]).all()
    counts, count, total = metrics.batch_size.snapshot()
    assert (count, total) == (1, 6)
    assert metrics.nonfinite_inputs.get("evit") == 1
    # all-NaN batch: no model run at all, NaN answers
    only_nan = np.full((1, 3, 224, 224), np.inf, np.float32)
    assert np.isnan(runner([{"images": only_nan}])[0]["logits"]).all()


def test_metrics_render_prometheus_histograms():
    hist = Histogram("evit_batch_size", "Images per execution.", batch_buckets(8), 'model="m"')
    for value in (1, 3, 8, 8):
        hist.observe(value)
    text = hist.render()
    assert '# TYPE evit_batch_size histogram' in text
    assert 'evit_batch_size_bucket{model="m",le="1"} 1' in text
    assert 'evit_batch_size_bucket{model="m",le="4"} 2' in text
    assert 'evit_batch_size_bucket{model="m",le="8"} 4' in text
    assert 'evit_batch_size_bucket{model="m",le="+Inf"} 4' in text
    assert 'evit_batch_size_sum{model="m"} 20' in text
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_serve_options_are_checked():
    assert ServeOptions(port=9000).ports == {"http": 9000, "grpc": 9001, "metrics": 9002, "rest": 9003}
    with pytest.raises(UsageError, match="distinct"):
        ServeOptions(port=9000, rest_port=9000)
    with pytest.raises(UsageError, match="max-queue"):
        ServeOptions(max_queue=0)
    with pytest.raises(UsageError, match="model name"):
        ServeOptions(model_name="a/b")
    for dots in (".", ".."):  # accepted once, then unreachable: /v2/models/../ready
        with pytest.raises(UsageError, match="not only dots"):
            ServeOptions(model_name=dots)


def test_python_backend_library_path_is_set_then_restored(monkeypatch):
    import sysconfig

    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere")
    with python_backend_library_path():
        first = os.environ["LD_LIBRARY_PATH"].split(":")[0]
        assert first == sysconfig.get_config_var("LIBDIR")
        assert os.environ["LD_LIBRARY_PATH"].endswith(":/somewhere")
    assert os.environ["LD_LIBRARY_PATH"] == "/somewhere"


def test_undecodable_upload_is_answered_without_python_internals():
    from evit_deploy.serve.rest import RequestError, decode_image

    for body in (b"this is not an image", np.random.default_rng(0).bytes(2048)):
        with pytest.raises(RequestError) as caught:
            decode_image(body, 40_000_000)
        assert caught.value.status == 400
        assert caught.value.message == "cannot decode image: not a JPEG, PNG, WEBP, BMP image"


def test_missing_pytriton_is_one_clear_error(monkeypatch, artifact):
    from evit_deploy.serve import EvitServer

    monkeypatch.setitem(sys.modules, "pytriton", None)
    with pytest.raises(EvitDeployError, match=r"evit-deploy\[serve\]"):
        EvitServer(artifact, port_options()).start()


# ------------------------------------------------------------------------------------------
# A running server (in this process, so the test can see its metrics and slow its model)

needs_pytriton = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None,
    reason="needs the serve extra: pip install 'evit-deploy[serve]'",
)


@pytest.fixture(scope="module")
def server(artifact):
    from evit_deploy.serve import EvitServer

    srv = EvitServer(artifact, port_options(max_batch=64, max_delay_ms=20, max_queue=1024))
    srv.start(ready_timeout_s=SERVER_TIMEOUT)
    try:
        yield srv
    finally:
        srv.stop()


def connect(srv, timeout: float = 60.0) -> Client:
    return Client(srv.urls["http"], rest_url=srv.urls["rest"], timeout=timeout)


def hold_model(srv, wait) -> None:
    """Every batch waits inside the model (each worker's Predictor) until `wait()` returns; it
    must return true. Instance attributes: this server's Predictors only."""
    for predictor in srv.predictors:
        original = predictor.logits

        def held(batch, _original=original):
            assert wait()
            return _original(batch)

        predictor.logits = held


class ClientThreads:
    """`work(i)` in `count` threads released together; results (or exceptions) in order, and the
    indices of those finished so far in `finished`, in the order they finished."""

    def __init__(self, count: int, work):
        self.results: list = [None] * count
        self.finished: list[int] = []
        self._changed = threading.Condition()
        barrier = threading.Barrier(count)

        def target(i: int) -> None:
            try:
                barrier.wait(timeout=30)
                self.results[i] = work(i)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self.results[i] = exc
            finally:
                with self._changed:
                    self.finished.append(i)
                    self._changed.notify_all()

        self.threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def wait_finished(self, count: int, timeout: float = 60.0) -> list[int]:
        """Wait until at least `count` have finished (fails after `timeout` seconds); the indices
        of all finished by then."""
        with self._changed:
            done = self._changed.wait_for(lambda: len(self.finished) >= count, timeout)
            finished = list(self.finished)
        assert done, f"only {len(finished)} of {len(self.results)} finished: {[self.results[i] for i in finished]}"
        return finished

    def join(self, timeout: float = 90.0) -> list:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "clients did not finish in time"
        return self.results


def run_clients(count: int, work, timeout: float = 90.0) -> list:
    """`work(i)` in `count` threads released together; results (or exceptions) in order."""
    return ClientThreads(count, work).join(timeout)


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll `condition()` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@needs_pytriton
def test_64_concurrent_clients_each_get_their_own_result_in_shared_batches(server, predictor):
    rng = np.random.default_rng(7)
    sizes = [1 + (i % 3 == 0) for i in range(64)]  # mostly single images, some pairs
    inputs = [rng.standard_normal((n, 3, 224, 224), dtype=np.float32) for n in sizes]
    rows = predictor.logits(np.concatenate(inputs))
    expected = np.split(rows, np.cumsum(sizes)[:-1])
    before = server.metrics.batch_size.snapshot()[1]

    def work(i: int) -> np.ndarray:
        with connect(server) as client:
            return client.logits(inputs[i])

    results = run_clients(64, work)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    wrong = [i for i, (got, want) in enumerate(zip(results, expected)) if not logits_match(got, want)]
    assert not wrong, f"requests {wrong} got another answer than Predictor.logits on their input"
    # Triton's dynamic batcher merged requests: some execution ran more than one image
    counts, executions, images = server.metrics.batch_size.snapshot()
    assert images >= sum(sizes)
    assert executions - before < 64, "every request ran alone: no batch was formed"
    assert executions > counts[0], "no execution had a batch size > 1"
    # the same shows on the public Prometheus endpoint
    with connect(server) as client:
        status, _, body = client.request("GET", "/metrics", rest=True)
    text = body.decode()
    assert status == 200
    bucket_1 = next(line for line in text.splitlines() if line.startswith('evit_batch_size_bucket{model="evit",le="1"}'))
    total = next(line for line in text.splitlines() if line.startswith('evit_batch_size_count{model="evit"}'))
    assert int(bucket_1.split()[-1]) < int(total.split()[-1])
    for name in ("nv_inference_request_success", "nv_inference_queue_duration_us",
                 "nv_inference_request_duration_us", "nv_inference_queue_summary_us",
                 "nv_inference_exec_count"):
        assert f'{name}{{model="evit"' in text or f"{name}_count{{model=\"evit\"" in text, name


@needs_pytriton
def test_health_and_model_metadata_on_the_triton_protocol(server):
    with connect(server) as client:
        assert client.request("GET", "/v2/health/live")[0] == 200
        assert client.request("GET", "/v2/health/ready")[0] == 200
        assert client.ready()
        meta = client.model_metadata()
        status, _, body = client.request("GET", "/v1/health/ready", rest=True)
    assert status == 200 and json.loads(body)["ready"] is True
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]


@needs_pytriton
def test_image_upload_matches_predictor(server, predictor, tmp_path):
    """JPEG, PNG, WebP and BMP, as the REST front promises."""
    encoded = [SAMPLE_IMAGE]
    with Image.open(SAMPLE_IMAGE) as image:
        for fmt in ("png", "webp", "bmp"):
            encoded.append(tmp_path / f"sample.{fmt}")
            image.convert("RGB").save(encoded[-1])
    with connect(server) as client:
        for path in encoded:
            got = client.predict_image(path, topk=3, logits=True)
            want = predictor.logits(preprocess([str(path)]))
            assert logits_match(np.asarray([got["logits"]], np.float32), want)
            assert got["class_ids"] == predictor.classify(want, 3)[0].class_ids
            assert got["model"] == "evit" and len(got["labels"]) == 3
        # multipart form upload, as a browser form sends it
        boundary = "evitboundary"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode() + SAMPLE_IMAGE.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        status, _, data = client.request(
            "POST", "/v1/models/evit/predict?topk=2", body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"}, rest=True,
        )
    assert status == 200, data
    assert json.loads(data)["class_ids"] == predictor.classify(predictor.logits(preprocess([SAMPLE_IMAGE])), 2)[0].class_ids
    assert data.endswith(b"\n") and data.count(b"\n") == 1  # one JSON line


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (it holds almost none)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


@needs_pytriton
def test_bad_input_gets_4xx_with_a_message_and_the_server_keeps_serving(server, predictor):
    jpeg = _jpeg_bytes()
    good = np.random.default_rng(3).standard_normal((1, 3, 224, 224), dtype=np.float32)
    with connect(server) as client:
        rest_cases = [
            (b"this is not an image", 400, "cannot decode image: not a JPEG"),
            (jpeg[: len(jpeg) // 2], 400, "cannot decode image"),
            (b"", 400, "empty body"),
            (b"GIF89a" + b"\0" * 64, 400, "cannot decode"),
        ]
        for body, status, message in rest_cases:
            with pytest.raises(ServerError) as caught:
                client.predict_image(body)
            assert caught.value.status == status and message in caught.value.message, caught.value
        gif = io.BytesIO()
        Image.new("RGB", (8, 8)).save(gif, "GIF")
        with pytest.raises(ServerError, match="unsupported image format GIF") as caught:
            client.predict_image(gif.getvalue())
        assert caught.value.status == 415
        # a body over the upload limit is refused from its Content-Length, before it is read
        big = b"\xff" * (int(server.options.max_body_mb * 2**20) + 1)
        status, _, data = client.request("POST", "/v1/models/evit/predict", big, {"Content-Type": "image/jpeg"}, rest=True)
        assert status == 413 and b"limit" in data
        # an image over 40 megapixels is refused from its header, before it is decoded
        status, _, data = client.request("POST", "/v1/models/evit/predict", _png_declaring(8000, 5001), rest=True)
        assert status == 413 and b"8000x5001 pixels; the limit is 40000000" in data, data
        status, _, data = client.request("POST", "/v1/models/evit/predict?topk=abc", jpeg, rest=True)
        assert status == 400 and b"topk" in data
        status, _, data = client.request("POST", "/v1/models/other/predict", jpeg, rest=True)
        assert status == 404
        # raw tensors: Triton checks shape, type and batch size against the model config
        for bad, message in (
            (np.zeros((1, 3, 100, 100), np.float32), "unexpected shape"),
            (np.zeros((65, 3, 224, 224), np.float32), "batch-size must be <= 64"),
        ):
            with pytest.raises(ServerError, match=message) as caught:
                client.logits(bad)
            assert caught.value.status == 400
        body, headers = encode_infer_request("images", good.astype(np.float64), "logits", "FP64")
        status, _, data = client.request("POST", "/v2/models/evit/infer", body, headers)
        assert status == 400 and b"FP64" in data
        body, headers = encode_infer_request("images", good, "logits")
        status, _, data = client.request("POST", "/v2/models/evit/infer", body[:-100], headers)
        assert status == 400  # fewer bytes than the shape says
        status, _, data = client.request("POST", "/v2/models/evit/infer", body + b"\0" * 2**20, headers)
        assert status == 400  # more bytes than the shape says
        # NaN in one request: its own answer is NaN, the other image of the request is right
        mixed = np.concatenate([good, good])
        mixed[1, 0, 0, 0] = np.nan
        out = client.logits(mixed)
        assert logits_match(out[:1], predictor.logits(good)) and np.isnan(out[1]).all()
        # still serving, correctly
        assert logits_match(client.logits(good), predictor.logits(good))
        assert client.predict_image(jpeg)["class_ids"]


@needs_pytriton
def test_cli_loadtest_reports_zero_errors_and_mismatches(server, artifact, tmp_path):
    out = tmp_path / "load.json"
    proc = run_cli(
        "loadtest", server.urls["http"], "--concurrency", "8", "--requests", "32",
        "--artifact", artifact, "--json-out", out, "--max-seconds", "120", timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["requests"] == 32 and result["errors"] == 0
    assert result["mismatches"] == 0 and result["checked"] == 32
    assert result["expected_from"] == "artifact"
    for key in ("p50_ms", "p99_ms", "throughput_rps"):
        assert result[key] > 0


@needs_pytriton
def test_cli_client_classifies_an_image(server, predictor):
    proc = run_cli(
        "client", SAMPLE_IMAGE, "--url", server.urls["http"], "--rest-url", server.urls["rest"],
        "--json", "--topk", "2", timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)
    (want,) = predictor.predict(SAMPLE_IMAGE, topk=2)
    assert result["image"] == str(SAMPLE_IMAGE)
    assert (result["class_ids"], result["labels"]) == (want.class_ids, want.labels), result
    assert np.allclose(result["probs"], want.probs, rtol=1e-4, atol=1e-6), (result["probs"], want.probs)


@needs_pytriton
def test_cli_loadtest_exits_1_on_wrong_answers(server, artifact, tmp_path):
    """Answers checked against an artifact whose logits differ (one class's bias moved by 10)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact))
    (head,) = [node for node in model.graph.node if node.op_type == "Gemm"]  # the classifier
    bias = np.zeros(model.graph.output[0].type.tensor_type.shape.dim[1].dim_value, np.float32)
    bias[0] = 10.0  # onnxslim drops an all-zero bias, so the head gets a new one
    model.graph.initializer.append(numpy_helper.from_array(bias, "moved_bias"))
    del head.input[2:]
    head.input.append("moved_bias")
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    out = tmp_path / "load.json"
    proc = run_cli(
        "loadtest", server.urls["http"], "--concurrency", "2", "--requests", "4",
        "--artifact", other, "--json-out", out, "--max-seconds", "120", timeout=180,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert (result["errors"], result["mismatches"], result["checked"]) == (0, 4, 4), result


@needs_pytriton
def test_grpc_port_serves_stock_tritonclient(server, predictor):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    batch = np.random.default_rng(11).standard_normal((2, 3, 224, 224), dtype=np.float32)
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    try:
        assert client.is_model_ready("evit")
        images = grpcclient.InferInput("images", list(batch.shape), "FP32")
        images.set_data_from_numpy(batch)
        result = client.infer("evit", [images], outputs=[grpcclient.InferRequestedOutput("logits")])
    finally:
        client.close()
    assert logits_match(result.as_numpy("logits"), predictor.logits(batch))


@needs_pytriton
def test_full_queue_answers_503_at_once_and_serving_resumes(artifact):
    """Queue of 1, one image per batch, and a model held until the test lets it go: of 12
    simultaneous requests, one runs, one waits, and the other 10 are refused by Triton's queue
    policy while the model is still held, that is at once. Image uploads beyond the REST front's
    in-flight limit (the same number as the queue) are refused the same way, with Retry-After."""
    from evit_deploy.serve import EvitServer

    srv = EvitServer(artifact, port_options(max_batch=1, max_delay_ms=0, max_queue=1))
    srv.start(ready_timeout_s=SERVER_TIMEOUT)
    release = threading.Event()
    try:
        hold_model(srv, lambda: release.wait(SERVER_TIMEOUT))
        x = np.zeros((1, 3, 224, 224), np.float32)

        def work(i: int):
            with connect(srv) as client:
                try:
                    client.logits(x)
                    return 200, ""
                except ServerError as exc:
                    return exc.status, exc.message

        clients = ClientThreads(12, work)
        early = clients.wait_finished(12 - 2)  # the running and the queued one wait for the release
        release.set()
        results = clients.join()
        assert all(results[i][0] == 503 and "queue" in results[i][1] for i in early), results
        assert sorted(r[0] for r in results) == [200] * 2 + [503] * 10, results

        release.clear()
        jpeg = SAMPLE_IMAGE.read_bytes()

        def upload(i: int):
            with connect(srv) as client:
                status, headers, body = client.request(
                    "POST", "/v1/models/evit/predict", jpeg, {"Content-Type": "image/jpeg"}, rest=True
                )
                return status, headers.get("retry-after"), body

        uploads = ClientThreads(8, upload)
        early = uploads.wait_finished(8 - 1)  # one upload in flight, held in the model
        release.set()
        results = uploads.join()
        assert all(results[i][:2] == (503, "1") and b"busy" in results[i][2] for i in early), results
        assert sorted(r[0] for r in results) == [200] + [503] * 7, results
        # the overload is over: the next requests are served
        with connect(srv) as client:
            assert client.logits(x).shape == (1, 1000)
            assert client.predict_image(SAMPLE_IMAGE)["class_ids"]
    finally:
        release.set()
        srv.stop()


@pytest.mark.parametrize(
    "failures, attempts, restarts, outcome",
    [
        (["race", "race"], 3, 2, "started"),  # the last of three starts works
        (["race"] * 3, 3, 2, "race"),  # three misses: the error is final
        (["other"], 1, 0, "other"),  # any other failure is not retried
    ],
)
def test_only_the_instance_handshake_race_restarts_triton(failures, attempts, restarts, outcome):
    """PyTriton 0.7's 1 s handshake between model instances (pytriton#109) can fail on a busy
    machine: that failure alone starts Triton again, up to TRITON_STARTS times, with a warning."""
    from evit_deploy.serve import EvitServer
    from evit_deploy.serve.server import HANDSHAKE_TIMEOUT, TRITON_STARTS

    assert TRITON_STARTS == 3
    srv = EvitServer("unused.onnx", ServeOptions(workers=2))
    started, stopped = [], []
    errors = {"race": f"Triton Inference Server failed to start: ... {HANDSHAKE_TIMEOUT} ...", "other": "port taken"}

    def start_once():
        started.append(1)
        if len(started) <= len(failures):
            raise EvitDeployError(errors[failures[len(started) - 1]])

    srv._start_triton_once, srv._stop_triton = start_once, lambda: stopped.append(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome == "started":
            srv._start_triton()
        else:
            with pytest.raises(EvitDeployError, match=HANDSHAKE_TIMEOUT if outcome == "race" else "port taken"):
                srv._start_triton()
    assert len(started) == attempts
    assert len(stopped) == len(caught) == restarts
    assert all("starting Triton again" in str(w.message) for w in caught)


@needs_pytriton
def test_two_workers_run_two_batches_at_once(artifact, predictor):
    """--workers 2: two Triton model instances, each with its own Predictor. Each batch is held
    in the model until the other one is inside too, which a single instance could never reach
    (the barrier would break), and both answers are the right ones."""
    from evit_deploy.serve import EvitServer

    srv = EvitServer(artifact, port_options(max_batch=1, max_delay_ms=0, workers=2))
    srv.start(ready_timeout_s=SERVER_TIMEOUT)
    both_inside = threading.Barrier(2)
    try:
        assert len({id(p) for p in srv.predictors}) == 2
        hold_model(srv, lambda: both_inside.wait(timeout=60) is not None)
        rng = np.random.default_rng(12)
        batches = [rng.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(2)]

        def work(i: int):
            with connect(srv) as client:
                return client.logits(batches[i])

        results = ClientThreads(2, work).join()
        for got, batch in zip(results, batches):
            assert isinstance(got, np.ndarray), got
            assert logits_match(got, predictor.logits(batch))
        with connect(srv) as client:
            status, _, body = client.request("GET", "/v2/models/evit/config")
        assert status == 200, body
        assert [group["count"] for group in json.loads(body)["instance_group"]] == [2]
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------
# The CLI process: start, serve, SIGTERM -> in-flight requests finish, exit 0


def _rest_ready(client: Client) -> bool:
    try:
        return client.request("GET", "/v1/health/ready", rest=True)[0] == 200
    except EvitDeployError:
        return False


@needs_pytriton
def test_cli_serve_finishes_in_flight_requests_on_sigterm(artifact, predictor):
    """Requests wait in Triton's batcher (max delay 3 s) when SIGTERM arrives: the tensor
    requests and an image upload through the REST front are all answered, correctly, and the
    process exits 0. SIGTERM is sent once Triton's metrics count all four as pending; the upload
    goes first (it takes longest to arrive), so the batcher's clock starts as late as it can."""
    http, grpc, metrics, rest = free_ports(4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "evit_deploy", "serve", str(artifact), "--port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--rest-port", str(rest),
         "--max-delay-ms", "3000", "--shutdown-timeout", "30"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url, rest_url = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{rest}"
        with Client(url, rest_url=rest_url, timeout=5) as probe:
            deadline = time.monotonic() + SERVER_TIMEOUT
            while not probe.ready() or not _rest_ready(probe):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)
                time.sleep(0.2)

        def pending() -> int:
            with Client(f"http://127.0.0.1:{metrics}", timeout=5) as scrape:
                text = scrape.request("GET", "/metrics")[2].decode()
            line = next(x for x in text.splitlines() if x.startswith('nv_inference_pending_request_count{model="evit"'))
            return int(float(line.split()[-1]))

        inputs = np.random.default_rng(5).standard_normal((3, 2, 3, 224, 224), dtype=np.float32)
        clients = [Client(url, rest_url=rest_url, timeout=60) for _ in range(4)]
        for client in clients[:3]:  # connect first, so the requests below are sent at once
            assert client.ready()
        assert clients[3].request("GET", "/v1/health/live", rest=True)[0] == 200
        results: list = [None] * 4
        finished = [0.0] * 4

        def run(i: int) -> None:
            try:
                client = clients[i]
                results[i] = client.logits(inputs[i]) if i < 3 else client.predict_image(SAMPLE_IMAGE, logits=True)
                finished[i] = time.monotonic()
            except BaseException as exc:  # noqa: BLE001 - reported below
                results[i] = exc
            finally:
                clients[i].close()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
        threads[3].start()
        wait_until(lambda: pending() == 1, "the upload to wait in Triton's batcher")
        for thread in threads[:3]:
            thread.start()
        wait_until(lambda: pending() == 4, "all four requests to wait in Triton's batcher")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(90)
        stdout, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stdout + stderr
        assert "serving" in stdout and "stopped" in stderr, stdout + stderr
        assert "Task was destroyed" not in stderr and "Traceback" not in stderr, stderr
        for i in range(3):
            assert isinstance(results[i], np.ndarray), results[i]
            assert logits_match(results[i], predictor.logits(inputs[i]))
        assert isinstance(results[3], dict), results[3]
        image_logits = np.asarray([results[3]["logits"]], np.float32)
        assert logits_match(image_logits, predictor.logits(preprocess([SAMPLE_IMAGE])))
        assert min(finished) > signalled, "a request finished before SIGTERM: it was not in flight"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


@needs_pytriton
def test_cli_serve_port_in_use_is_one_line_error(artifact):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", artifact, "--port", str(port), timeout=120)
    assert_one_line_error(proc, 2, f"cannot listen on 127.0.0.1:{port}")
