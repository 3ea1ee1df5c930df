"""The REST front: what Triton's tensor protocol cannot do by itself.

- POST /v1/models/<model>/predict  an encoded JPEG/PNG (raw body, or multipart form field) ->
  top-k classes as JSON. The image is decoded and preprocessed here, per request, so an
  undecodable image is answered 400 on its own and never reaches a batch; the tensor then goes to
  Triton's HTTP endpoint like any client's, so it joins Triton's dynamic batcher with raw-tensor
  requests.
- GET /metrics  Triton's Prometheus metrics plus evit-deploy's (batch-size histogram, REST counts).
- GET /v1/health/live, /v1/health/ready.

Bounded, so that no client can hold what others need:
- bodies over `max_body_bytes` -> 413, from Content-Length before they are read, or as they
  arrive (chunked);
- a body must arrive within `body_timeout_s`, keeping up `min_upload_rate` bytes/s after its first
  UPLOAD_GRACE_S seconds (-> 408), and at most `max_reading` are read at once (more -> 503);
- at most `max_inflight` image requests are decoded or waiting for the model at once (more ->
  503): the slot is taken once the body has arrived, so slow uploads cannot hold the slots;
- images over `max_pixels` -> 413 before they are decoded.
Every 503 carries Retry-After; while the model backend is down (the server restarts it) uploads
and /v1/health/ready answer 503 at once.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from evit_deploy.client import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    error_message,
)
from evit_deploy.errors import EvitDeployError
from evit_deploy.preprocess import ImageTooLarge, check_aspect_ratio, preprocess, to_rgb
from evit_deploy.runtime import Predictor
from evit_deploy.serve.metrics import ServeMetrics

LOGGER = logging.getLogger(__name__)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
MAX_TOPK = 100
UPLOAD_GRACE_S = 5.0  # an upload's first seconds, before its rate counts (a slow start, a TLS proxy)
RETRY_AFTER_S = "1"
# What Triton's Python backend answers for a model instance whose stub process died.
DEAD_STUB = "Stub process"


def json_line(payload) -> str:
    """JSON bodies end with a newline, as curl users and line-reading clients expect."""
    return json.dumps(payload) + "\n"


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB PIL image, refusing non-images and oversized images before decoding."""
    if not data:
        raise RequestError(400, "empty body: POST the bytes of a JPEG or PNG image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise RequestError(
                    415, f"unsupported image format {image.format}; send {', '.join(IMAGE_FORMATS)}"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    413, f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            check_aspect_ratio(width, height, "")
            image.load()
            return to_rgb(image)
    except RequestError:
        raise
    except ImageTooLarge as exc:
        raise RequestError(413, str(exc)) from None
    except Image.DecompressionBombError:  # PIL's own guard, at twice its pixel limit
        raise RequestError(413, f"image is over the {max_pixels}-pixel limit") from None
    except Image.UnidentifiedImageError:  # its message names the BytesIO object, an address
        raise RequestError(
            400, f"cannot decode image: not a {', '.join(IMAGE_FORMATS)} image"
        ) from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on corrupt data
        raise RequestError(400, f"cannot decode image: {exc}") from None


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The first file field of a multipart/form-data body (RequestError 400 when it has none or
    is not multipart: no boundary, a boundary the body does not hold)."""
    header = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if message.get_boundary() is None:
        raise RequestError(400, "multipart body without a boundary in its Content-Type")
    if not message.is_multipart():
        raise RequestError(400, "malformed multipart body: its boundary was not found")
    for part in message.iter_parts():
        if part.get_filename() is not None:
            return part.get_payload(decode=True) or b""
    raise RequestError(400, "multipart body has no file field; send the image as a file")


class _ClientProtocolErrors(logging.Filter):
    """Drops aiohttp's traceback for a request it refused as malformed HTTP (bad chunk framing, a
    broken header): aiohttp answers 400, and the mistake is the client's."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


CLIENT_PROTOCOL_ERRORS = _ClientProtocolErrors()


def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running on a stopped loop (aiohttp's keep-alive connection handlers)
    and let it finish, so closing the loop does not garbage-collect pending tasks, which asyncio
    reports as 'Task was destroyed but it is pending!'."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


class RestFront:
    """aiohttp app on its own event loop thread; `start()` returns once it listens."""

    def __init__(
        self,
        predictor: Predictor,
        model_name: str,
        triton_http: tuple[str, int],
        triton_metrics: tuple[str, int],
        host: str,
        port: int,
        metrics: ServeMetrics,
        max_inflight: int = 1024,
        max_reading: int = 4096,
        max_body_bytes: int = 10 * 2**20,
        body_timeout_s: float = 60.0,
        min_upload_rate: float = 4096.0,
        max_pixels: int = 40_000_000,
        preprocess_threads: int = 2,
        request_timeout_s: float = 60.0,
    ):
        self.predictor = predictor
        self.meta = predictor.metadata
        self.model_name = model_name
        self.triton_url = f"http://{triton_http[0]}:{triton_http[1]}"
        self.metrics_url = f"http://{triton_metrics[0]}:{triton_metrics[1]}/metrics"
        self.host = host
        self.port = port
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.max_reading = max_reading
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.min_upload_rate = min_upload_rate
        self.max_pixels = max_pixels
        self.request_timeout_s = request_timeout_s
        self.inflight = 0  # image requests past their upload: decoding, or waiting for the model
        self.reading = 0  # image requests whose body is arriving
        self.backend_ready = False  # set by the server: Triton's model is up (false while it restarts)
        self._pool = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="evit-preprocess")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._session = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # -- lifecycle

    def start(self, timeout: float = 30.0) -> None:
        logging.getLogger("aiohttp.server").addFilter(CLIENT_PROTOCOL_ERRORS)  # once: filters are a set
        self._thread = threading.Thread(target=self._run, name="evit-rest", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise EvitDeployError(f"REST front did not start within {timeout:g} s")
        if self._start_error is not None:
            raise EvitDeployError(
                f"REST front cannot listen on {self.host}:{self.port}: {self._start_error}"
            ) from self._start_error

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish (up to `timeout`), close the loop."""
        if self._loop is None or self._thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self._loop)
        try:
            future.result(timeout + 5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            _cancel_pending(loop)
            loop.close()

    async def _startup(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        app = web.Application()  # bodies are read, and bounded, by _read_body
        app.router.add_post("/v1/models/{model}/predict", self.handle_predict)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/v1/health/live", self.handle_live)
        app.router.add_get("/v1/health/ready", self.handle_ready)
        self._session = ClientSession(
            connector=TCPConnector(limit=256),
            timeout=ClientTimeout(total=self.request_timeout_s),
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            await self._session.close()
            raise

    async def _shutdown(self, timeout: float) -> None:
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()  # no new connections
            deadline = time.monotonic() + timeout
            while (self.inflight or self.reading) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()  # drop keep-alive connections so Triton can drain

    # -- handlers

    def _json(self, status: int, payload: dict):
        """A JSON answer; a 503 always says when to retry."""
        from aiohttp import web

        self.metrics.rest_requests.inc(str(status))
        headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
        return web.json_response(payload, status=status, headers=headers, dumps=json_line)

    async def handle_predict(self, request):
        if request.match_info["model"] != self.model_name:
            return self._json(404, {"error": f"unknown model '{request.match_info['model']}'; this server has '{self.model_name}'"})
        start = time.perf_counter()
        try:
            topk, want_logits = self._query(request)
            if not self.backend_ready:
                raise RequestError(503, "the model backend is not ready (starting, or restarting after a failure); retry later")
            body = await self._receive(request)
            if self.inflight >= self.max_inflight:
                raise RequestError(503, f"server busy: {self.inflight} image requests in flight (limit {self.max_inflight}); retry later")
            self.inflight += 1
            try:
                loop = asyncio.get_running_loop()
                batch = await loop.run_in_executor(self._pool, self._preprocess, body, request.headers.get("Content-Type", ""))
                logits = await self._infer(batch)
            finally:
                self.inflight -= 1
            prediction = self.predictor.classify(logits, topk)[0].to_dict()
            payload = {"model": self.model_name, **prediction}
            if want_logits:
                payload["logits"] = [float(x) for x in logits[0]]
            self.metrics.rest_latency.observe(time.perf_counter() - start)
            return self._json(200, payload)
        except RequestError as exc:
            response = self._json(exc.status, {"error": exc.message})
            if exc.status in (408, 413):  # the rest of the body is not read: do not wait for it
                response.force_close()
            return response
        except asyncio.TimeoutError:
            return self._json(504, {"error": f"no answer from the model within {self.request_timeout_s:g} s"})
        except Exception as exc:  # a bug, not the client's doing: answer 500, keep serving
            LOGGER.exception("image request failed")
            return self._json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def _query(self, request) -> tuple[int, bool]:
        raw = request.query.get("topk", "5")
        try:
            topk = int(raw)
        except ValueError:
            raise RequestError(400, f"topk must be an integer, got '{raw}'") from None
        if not 1 <= topk <= MAX_TOPK:
            raise RequestError(400, f"topk must be between 1 and {MAX_TOPK}, got {topk}")
        return topk, request.query.get("logits", "").lower() in ("1", "true", "yes")

    async def _receive(self, request) -> bytes:
        """The body, holding one of `max_reading` reading slots meanwhile."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise RequestError(413, f"body of {request.content_length} bytes is over the {self.max_body_bytes}-byte limit")
        if self.reading >= self.max_reading:
            raise RequestError(503, f"server busy: {self.reading} uploads arriving (limit {self.max_reading}); retry later")
        self.reading += 1
        try:
            return await self._read_body(request.content)
        finally:
            self.reading -= 1

    async def _read_body(self, stream) -> bytes:
        """Read until the end, refusing (408) a body that falls behind min_upload_rate after
        UPLOAD_GRACE_S or is not complete within body_timeout_s, (413) one that grows over
        max_body_bytes (a chunked body has no Content-Length to refuse it from), and (400) one cut
        short or badly chunked."""
        from aiohttp.http_exceptions import HttpProcessingError

        body = bytearray()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            # when the body falls behind, if no more of it arrives
            due = min(self.body_timeout_s, UPLOAD_GRACE_S + len(body) / self.min_upload_rate)
            try:
                chunk = await asyncio.wait_for(stream.readany(), max(0.0, due - (loop.time() - started)))
            except (ConnectionError, HttpProcessingError) as exc:  # the client left, or broke the framing
                raise RequestError(400, f"upload ended before its body was complete: {exc}") from None
            except asyncio.TimeoutError:
                raise RequestError(
                    408,
                    f"upload too slow: {len(body)} bytes in {loop.time() - started:.0f} s; a body must arrive at "
                    f"{self.min_upload_rate / 1024:g} KB/s or faster after its first {UPLOAD_GRACE_S:g} s, "
                    f"and in full within {self.body_timeout_s:g} s",
                ) from None
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > self.max_body_bytes:
                raise RequestError(413, f"body larger than the {self.max_body_bytes}-byte limit")

    def _preprocess(self, body: bytes, content_type: str) -> np.ndarray:
        if content_type.lower().startswith("multipart/"):
            body = multipart_file(body, content_type)
        image = decode_image(body, self.max_pixels)
        meta = self.meta
        return preprocess([image], meta.img_size, meta.mean, meta.std, meta.crop_pct, meta.interpolation)

    async def _infer(self, batch: np.ndarray) -> np.ndarray:
        from aiohttp import ClientError

        body, headers = encode_infer_request(self.meta.input_name, batch, self.meta.output_name)
        url = f"{self.triton_url}/v2/models/{self.model_name}/infer"
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                data = await response.read()
                if response.status != 200:
                    message = error_message(data)
                    if DEAD_STUB in message:  # the backend died under this request; the server restarts it
                        raise RequestError(503, f"the model backend failed ({message}); retry later")
                    raise RequestError(response.status, message)
                return decode_infer_response(data, response.headers.get(HEADER_LENGTH), self.meta.output_name)
        except ClientError as exc:
            raise RequestError(503, f"model server unavailable: {exc}") from None

    async def handle_metrics(self, request):
        from aiohttp import ClientError, ClientTimeout, web

        text = ""
        try:
            async with self._session.get(self.metrics_url, timeout=ClientTimeout(total=5)) as response:
                if response.status == 200:
                    text = await response.text()
        except (ClientError, asyncio.TimeoutError):
            text = "# Triton metrics unavailable\n"
        if text and not text.endswith("\n"):
            text += "\n"
        return web.Response(
            text=text + self.metrics.render(), content_type="text/plain", charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def handle_live(self, request):
        from aiohttp import web

        return web.json_response({"live": True}, dumps=json_line)

    async def handle_ready(self, request):
        """Ready when the server has not seen the backend die since it was last ready, and Triton
        says the model is ready."""
        from aiohttp import ClientError, ClientTimeout, web

        ready = self.backend_ready
        if ready:
            try:
                url = f"{self.triton_url}/v2/models/{self.model_name}/ready"
                async with self._session.get(url, timeout=ClientTimeout(total=5)) as response:
                    ready = response.status == 200
            except (ClientError, asyncio.TimeoutError):
                ready = False
        headers = None if ready else {"Retry-After": RETRY_AFTER_S}
        return web.json_response(
            {"ready": ready, "model": self.model_name}, status=200 if ready else 503, headers=headers, dumps=json_line
        )

