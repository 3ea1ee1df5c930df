"""Client for `evit-deploy serve` (and any Triton server running the same model) plus a load
generator. Standard library only: no tritonclient needed to call the server.

Two endpoints, as `evit-deploy serve` lays them out:

- Triton's HTTP server (default port 8000), KServe v2 protocol: raw NCHW float32 tensors in,
  logits out, with the binary-tensor extension so a 224px image travels as 602 KB of bytes, not
  JSON numbers. `Client.logits(batch)`.
- evit-deploy's REST front (default port 8003): POST an encoded JPEG/PNG, get top-k classes.
  `Client.predict_image(path_or_bytes)`.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.model.config import EvitOverrides
from evit_deploy.stats import latency_summary

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "evit"
REST_PORT_OFFSET = 3  # serve's REST front listens on Triton's HTTP port + 3 unless told otherwise
HEADER_LENGTH = "Inference-Header-Content-Length"  # KServe v2 binary-tensor extension

_DTYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1"}


class ServerError(EvitDeployError):
    """The server answered with an HTTP error; `status` is the HTTP status code."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------------------------
# KServe v2 binary-tensor encoding (shared with the REST front)


def encode_infer_request(
    input_name: str, batch: np.ndarray, output_name: str, datatype: str = "FP32"
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a KServe v2 infer request with one binary input and output."""
    data = np.ascontiguousarray(batch).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(batch.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
    return header + data, headers


def decode_infer_response(body: bytes, header_length: str | None, output_name: str) -> np.ndarray:
    """The named output of a KServe v2 infer response (binary or JSON-encoded data)."""
    split = int(header_length) if header_length else len(body)
    try:
        header = json.loads(body[:split])
        offset = split
        for output in header["outputs"]:
            size = output.get("parameters", {}).get("binary_data_size")
            if output["name"] == output_name:
                dtype = np.dtype(_DTYPES[output["datatype"]])
                shape = output["shape"]
                if size is None:
                    return np.asarray(output["data"], dtype=dtype).reshape(shape)
                return np.frombuffer(body, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
            offset += size or 0
    except (ValueError, KeyError, TypeError) as exc:
        raise EvitDeployError(f"malformed inference response: {exc}") from None
    raise EvitDeployError(f"the response has no output '{output_name}'")


def error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:500].decode("utf-8", "replace") or "(empty body)"


# ----------------------------------------------------------------------------------------------
# Client


def _split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"expected a URL like http://127.0.0.1:8000, got '{url}'")
    return parts.hostname, parts.port or 80


class Client:
    """One keep-alive HTTP connection to a server; not thread-safe (use one per thread).

    url: Triton's HTTP endpoint; rest_url: evit-deploy's REST front (default: url's port + 3).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        rest_url: str | None = None,
        timeout: float = 30.0,
        input_name: str = "images",
        output_name: str = "logits",
    ):
        self.host, self.port = _split_url(url)
        if rest_url:
            self.rest_host, self.rest_port = _split_url(rest_url)
        else:
            self.rest_host, self.rest_port = self.host, self.port + REST_PORT_OFFSET
        self.model = model
        self.timeout = timeout
        self.input_name = input_name
        self.output_name = output_name
        self._connections: dict[tuple[str, int], http.client.HTTPConnection] = {}

    # -- transport

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        rest: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); retries once on a connection the server closed while idle."""
        key = (self.rest_host, self.rest_port) if rest else (self.host, self.port)
        for attempt in (0, 1):
            conn = self._connections.get(key)
            if conn is None:
                conn = http.client.HTTPConnection(*key, timeout=self.timeout)
                self._connections[key] = conn
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                data = response.read()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, TimeoutError, OSError) as exc:
                conn.close()
                self._connections.pop(key, None)
                reused = isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if attempt == 0 and reused:
                    continue
                raise EvitDeployError(f"cannot reach http://{key[0]}:{key[1]}{path}: {exc}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- Triton (KServe v2)

    def ready(self) -> bool:
        """True when the server and the model are ready (GET /v2/models/<model>/ready)."""
        try:
            status, _, _ = self.request("GET", f"/v2/models/{self.model}/ready")
        except EvitDeployError:
            return False
        return status == 200

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise EvitDeployError(
                    f"model '{self.model}' at http://{self.host}:{self.port} not ready after {timeout:g} s"
                )
            time.sleep(0.2)

    def model_metadata(self) -> dict:
        status, _, body = self.request("GET", f"/v2/models/{self.model}")
        if status != 200:
            raise ServerError(status, error_message(body))
        return json.loads(body)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] float32 -> [B, num_classes] float32 logits, through the server."""
        body, headers = encode_infer_request(self.input_name, batch, self.output_name)
        status, response_headers, data = self.request(
            "POST", f"/v2/models/{self.model}/infer", body, headers
        )
        if status != 200:
            raise ServerError(status, error_message(data))
        return decode_infer_response(
            data, response_headers.get(HEADER_LENGTH.lower()), self.output_name
        )

    # -- REST front

    def predict_image(self, image: str | Path | bytes, topk: int = 5, logits: bool = False) -> dict:
        """Top-k classes of an encoded image (JPEG/PNG path or bytes) from the REST front."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
        query = f"?topk={topk}" + ("&logits=true" if logits else "")
        status, _, body = self.request(
            "POST",
            f"/v1/models/{self.model}/predict{query}",
            data,
            {"Content-Type": "application/octet-stream"},
            rest=True,
        )
        if status != 200:
            raise ServerError(status, error_message(body))
        return json.loads(body)


# ----------------------------------------------------------------------------------------------
# Load generator


@dataclass
class LoadTestResult:
    requests: int
    errors: int
    mismatches: int
    checked: int  # answers compared with an expected result
    concurrency: int
    batch: int
    wall_s: float
    throughput_rps: float  # successful requests per second
    throughput_ips: float  # images per second (requests x batch)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    expected_from: str = ""  # "artifact" (Predictor.logits at batch 1) or "first-answer"
    max_abs_diff: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def logits_match(got: np.ndarray, expected: np.ndarray, rtol: float = 1e-3) -> bool:
    """Same answer up to float reordering: |diff| <= rtol * max(1, max|expected|).

    Batch-size-dependent kernels change the last bits of logits (about 1e-5 here); answering
    with another request's result changes them by the size of the logits themselves."""
    if got.shape != expected.shape or not np.isfinite(got).all():
        return False
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(got - expected).max()) <= rtol * scale


def load_test(
    url: str = DEFAULT_URL,
    *,
    model: str = DEFAULT_MODEL,
    concurrency: int = 32,
    requests: int = 2000,
    batch: int = 1,
    img_size: int | None = None,
    pool: int = 64,
    artifact: str | Path | None = None,
    evit: EvitOverrides | None = None,
    timeout: float = 30.0,
    max_seconds: float = 600.0,
    seed: int = 0,
) -> LoadTestResult:
    """`requests` inference calls from `concurrency` threads, each with its own connection.

    Inputs are drawn from a pool of `pool` random tensors. Expected results: Predictor.logits at
    batch 1 on `artifact` if given (a checkpoint's EViT settings in `evit`); otherwise the first answer for each pool entry, so a
    request answered with another request's result still counts as a mismatch. Stops after
    `max_seconds` even if not all requests were sent."""
    if concurrency <= 0 or requests <= 0 or batch <= 0 or pool <= 0:
        raise UsageError("concurrency, requests, batch and pool must be positive")
    probe = Client(url, model, timeout=timeout)
    try:
        probe.wait_ready(timeout=min(timeout, 30.0))
        meta = probe.model_metadata()
    finally:
        probe.close()
    inputs = {i["name"]: i for i in meta.get("inputs", [])}
    outputs = [o["name"] for o in meta.get("outputs", [])]
    input_name = "images" if "images" in inputs else next(iter(inputs))
    output_name = "logits" if "logits" in outputs else outputs[0]
    shape = inputs[input_name]["shape"]
    size = img_size or int(shape[-1])
    pool = min(pool, requests)
    rng = np.random.default_rng(seed)
    tensors = rng.standard_normal((pool, batch, 3, size, size), dtype=np.float32)

    expected: list[np.ndarray | None] = [None] * pool
    expected_from = "first-answer"
    if artifact is not None:
        from evit_deploy.runtime import Predictor

        predictor = Predictor(artifact, evit=evit)
        expected = [np.concatenate([predictor.logits(t[i : i + 1]) for i in range(batch)]) for t in tensors]
        expected_from = "artifact"

    lock = threading.Lock()
    counter = iter(range(requests))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    mismatches = checked = 0
    max_diff = 0.0
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        nonlocal mismatches, checked, max_diff
        client = Client(url, model, timeout=timeout, input_name=input_name, output_name=output_name)
        try:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                entry = index % pool
                start = time.perf_counter()
                try:
                    got = client.logits(tensors[entry])
                except ServerError as exc:
                    with lock:
                        errors[str(exc.status)] = errors.get(str(exc.status), 0) + 1
                    continue
                except EvitDeployError:
                    with lock:
                        errors["connection"] = errors.get("connection", 0) + 1
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    reference = expected[entry]
                    if reference is None:
                        expected[entry] = got.copy()
                        continue
                    checked += 1
                    if got.shape == reference.shape:
                        max_diff = max(max_diff, float(np.abs(got - reference).max()))
                    if not logits_match(got, reference):
                        mismatches += 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + timeout + 5)
    wall = time.perf_counter() - start
    done = len(latencies)
    ms = [x * 1000 for x in latencies]
    summary = latency_summary(ms)
    return LoadTestResult(
        requests=done + sum(errors.values()),
        errors=sum(errors.values()),
        mismatches=mismatches,
        checked=checked,
        concurrency=concurrency,
        batch=batch,
        wall_s=round(wall, 3),
        throughput_rps=round(done / wall, 2) if wall else 0.0,
        throughput_ips=round(done * batch / wall, 2) if wall else 0.0,
        p50_ms=round(summary["p50"], 2),
        p90_ms=round(summary["p90"], 2),
        p99_ms=round(summary["p99"], 2),
        mean_ms=round(summary["mean"], 2),
        max_ms=round(max(ms), 2) if ms else float("nan"),
        error_kinds=errors,
        expected_from=expected_from,
        max_abs_diff=float(f"{max_diff:.3g}"),
    )
