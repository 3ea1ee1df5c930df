"""`evit-deploy serve`: a Predictor behind Triton Inference Server, through PyTriton.

Triton does the serving: its HTTP (KServe v2) and gRPC servers, its dynamic batcher (batches up
to max_batch or max_delay_ms, whichever comes first), its queue policy (a full queue answers 503
at once), its health endpoints and Prometheus metrics, and its graceful shutdown. PyTriton runs
Triton as a subprocess and calls `BatchRunner` with each batch the batcher formed. evit-deploy
adds a REST front for encoded images (serve/rest.py) and a batch-size histogram.

Ports (Triton's conventions): HTTP `port` (8000), gRPC port+1, metrics port+2; REST front port+3.

A backend that dies (tritonserver, or the Python backend stub that relays batches, killed by the
OOM killer for instance) is noticed within WATCH_PERIOD_S: readiness turns false at once (the REST
front answers 503, Triton's ports close), and Triton is started again, at most `max_restarts` times
in RESTART_WINDOW_S; beyond that serve gives up (`failure`, and `wait()` raises).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sysconfig
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evit_deploy.install import SERVE_INSTALL
from evit_deploy.model.config import EvitOverrides
from evit_deploy.errors import EvitDeployError, UsageError
from evit_deploy.runtime import Predictor
from evit_deploy.runtime.backends import backend_for
from evit_deploy.runtime.deployment import resolve_artifact
from evit_deploy.serve import processes
from evit_deploy.serve.metrics import ServeMetrics
from evit_deploy.serve.triton_repo import check_model_name

# What a model instance that missed PyTriton's handshake with the first instance reports, and how
# many times Triton is started before that failure is final (EvitServer._start_triton).
HANDSHAKE_TIMEOUT = "Timeout occurred while waiting for config file"
TRITON_STARTS = 3
WATCH_PERIOD_S = 0.2  # how often the backend's processes are checked (a few /proc reads)
RESTART_WINDOW_S = 600  # max_restarts counts the restarts within this many seconds
READING_PER_UPLOAD = 4  # bodies being read at once, per upload slot (max_uploads)


# The serve options whose command-line flag is not the field's name with dashes.
FLAGS = {"shutdown_timeout_s": "shutdown-timeout", "body_timeout_s": "body-timeout", "min_upload_kb_per_s": "min-upload-rate"}


def _flag(name: str) -> str:
    return FLAGS.get(name, name.replace("_", "-"))


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # Triton HTTP (KServe v2)
    grpc_port: int | None = None  # default port + 1
    metrics_port: int | None = None  # default port + 2
    rest_port: int | None = None  # default port + 3
    model_name: str = "evit"
    max_batch: int = 64
    max_delay_ms: float = 5.0
    max_queue: int = 1024
    workers: int = 1  # model instances (Triton instance_group count), each with its own Predictor
    max_body_mb: float = 10.0  # REST front upload limit
    max_uploads: int = 64  # REST front: image requests in flight at once (more -> 503); bounds memory
    max_image_pixels: int = 40_000_000
    body_timeout_s: float = 60.0  # REST front: an upload's body arrives in full within this (408 beyond)
    min_upload_kb_per_s: float = 4.0  # REST front: and keeps up this rate after its first seconds (408)
    max_restarts: int = 3  # backend restarts allowed within RESTART_WINDOW_S; beyond, serve gives up
    shutdown_timeout_s: int = 30
    verbose: bool = False  # Triton's own log on stdout instead of a temp file

    def __post_init__(self) -> None:
        self.grpc_port = self.port + 1 if self.grpc_port is None else self.grpc_port
        self.metrics_port = self.port + 2 if self.metrics_port is None else self.metrics_port
        self.rest_port = self.port + 3 if self.rest_port is None else self.rest_port
        for name in (
            "max_batch", "max_queue", "workers", "shutdown_timeout_s", "max_image_pixels", "max_uploads",
            "max_body_mb", "body_timeout_s", "min_upload_kb_per_s",
        ):
            if getattr(self, name) <= 0:
                raise UsageError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.max_delay_ms < 0:
            raise UsageError(f"max-delay-ms must be >= 0, got {self.max_delay_ms}")
        if self.max_restarts < 0:
            raise UsageError(f"max-restarts must be >= 0, got {self.max_restarts}")
        ports = [self.port, self.grpc_port, self.metrics_port, self.rest_port]
        if any(not 0 < p < 65536 for p in ports) or len(set(ports)) != 4:
            raise UsageError(f"ports must be four distinct numbers in 1..65535, got {ports}")
        check_model_name(self.model_name)

    @property
    def ports(self) -> dict[str, int]:
        return {
            "http": self.port,
            "grpc": self.grpc_port,
            "metrics": self.metrics_port,
            "rest": self.rest_port,
        }


class BatchRunner:
    """The function Triton calls with each batch: a list of requests -> a list of responses,
    request i answered with exactly the rows of its own input.

    A request's NaN/Inf images are not run: their rows are zeroed for the batch and answered with
    NaN logits, so one client's bad values cannot fail, or change, anyone else's result (PyTriton
    can only fail a whole batch, not one request in it)."""

    def __init__(self, predictor: Predictor, metrics: ServeMetrics):
        self.predictor = predictor
        self.metrics = metrics
        self.input_name = predictor.metadata.input_name
        self.output_name = predictor.metadata.output_name

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        arrays = [np.asarray(request[self.input_name], dtype=np.float32) for request in requests]
        sizes = [len(a) for a in arrays]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        finite = np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
        bad = int(len(batch) - finite.sum())
        if bad == len(batch):
            logits = np.full((len(batch), self.predictor.metadata.num_classes), np.nan, np.float32)
        elif bad:
            batch = batch.copy()
            batch[~finite] = 0.0
            logits = self.predictor.logits(batch)
            logits[~finite] = np.nan
        else:
            logits = self.predictor.logits(batch)
        self.metrics.observe_batch(len(batch), len(requests), bad)
        responses, start = [], 0
        for size in sizes:
            responses.append({self.output_name: logits[start : start + size]})
            start += size
        return responses


@contextlib.contextmanager
def python_backend_library_path() -> Iterator[None]:
    """Put this interpreter's libpython folder first on LD_LIBRARY_PATH while Triton starts.

    Triton's Python backend stub (the process that relays batches to this one) links
    libpython3.X.so.1.0. Without this it finds the system's libpython, which may be another patch
    release than the interpreter whose standard library it then loads (a pyenv or conda Python on
    Debian: AttributeError: '_thread.RLock' object has no attribute '_recursion_count'). The
    variable only matters for the processes started meanwhile; it is restored afterwards."""
    libdir = sysconfig.get_config_var("LIBDIR")
    old = os.environ.get("LD_LIBRARY_PATH")
    if libdir and Path(libdir).is_dir():
        os.environ["LD_LIBRARY_PATH"] = libdir + (f":{old}" if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = old


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}") from None


def _require_pytriton() -> None:
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise EvitDeployError(
            f"serving needs PyTriton (NVIDIA's Triton Inference Server for Python): {SERVE_INSTALL}"
        ) from None


class EvitServer:
    """Start with `start()` (or `with EvitServer(...) as server:`), stop with `stop()`.

    evit: a checkpoint's EViT settings, as for Predictor."""

    def __init__(
        self,
        artifact: str | Path,
        options: ServeOptions | None = None,
        backend: str = "auto",
        device: str | None = None,
        backend_options: dict | None = None,  # e.g. precision for openvino
        evit: EvitOverrides | None = None,
    ):
        # a deployment folder (`evit-deploy optimize`) is served with the backend and options it records
        self.artifact, self.backend, self.backend_options = resolve_artifact(artifact, backend, dict(backend_options or {}))
        self.options = options or ServeOptions()
        self.device = device
        self.evit = evit
        self.predictors: list[Predictor] = []
        self.metrics: ServeMetrics | None = None
        self.triton = None
        self.front = None
        self.run: processes.RunFolder | None = None  # the running Triton's files
        self.stubs: dict[int, processes.ProcessStat] = {}  # its Python backend stubs
        self.restarts: list[float] = []  # when the backend was started again (time.monotonic)
        self.failure: str | None = None  # why serving stopped for good
        self.max_batch = self.options.max_batch
        self._ready_timeout_s = 120.0
        self._failed = threading.Event()
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()  # one start or stop of Triton at a time
        self._watch_thread: threading.Thread | None = None

    # -- lifecycle

    def start(self, ready_timeout_s: float = 120.0) -> "EvitServer":
        opts = self.options
        for what, port in opts.ports.items():
            check_port_free(opts.host, port, f"the {what} endpoint")
        _require_pytriton()
        processes.remove_stale_runs()
        self._load_predictors()
        self._ready_timeout_s = ready_timeout_s
        self._stopping.clear()
        atexit.register(self.stop)
        try:
            self._start_triton()
            self._start_front()
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self._watch_thread = threading.Thread(target=self._watch, name="evit-watch", daemon=True)
        self._watch_thread.start()
        return self

    def _load_predictors(self) -> None:
        opts = self.options
        kind = backend_for(self.artifact, self.backend)
        extra = dict(self.backend_options)
        if opts.workers > 1 and kind in ("onnxruntime", "openvino", "pytorch") and self.device in (None, "cpu"):
            extra["threads"] = max(1, (os.cpu_count() or 1) // opts.workers)
        self.predictors = [
            Predictor(self.artifact, self.backend, self.device, evit=self.evit, **extra)
            for _ in range(opts.workers)
        ]
        limit = self.predictors[0].max_batch
        if limit is not None and limit < self.max_batch:
            warnings.warn(f"the artifact takes batches of at most {limit}; max-batch lowered from {self.max_batch}", stacklevel=2)
            self.max_batch = limit
        for predictor in self.predictors:
            predictor.warmup(batch_size=1)
        self.metrics = ServeMetrics(opts.model_name, self.max_batch)

    @property
    def metadata(self):
        return self.predictors[0].metadata

    def _start_triton(self) -> None:
        """With several instances, PyTriton 0.7 loads them together and every instance but the
        first waits only 1 s for the first one's handshake socket (pytriton#109), which a busy
        machine can miss: that load failure, and only that one, is retried."""
        for attempt in range(1, TRITON_STARTS + 1):
            try:
                return self._start_triton_once()
            except EvitDeployError as exc:
                if HANDSHAKE_TIMEOUT not in str(exc) or attempt == TRITON_STARTS:
                    raise
                self._stop_triton()
                warnings.warn(
                    f"a model instance missed PyTriton's 1 s handshake with the first one (busy machine): "
                    f"starting Triton again ({attempt + 1} of {TRITON_STARTS})",
                    stacklevel=2,
                )

    def _start_triton_once(self) -> None:
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
        from pytriton.triton import TritonConfig

        from evit_deploy.serve.triton_process import ServeTriton

        opts = self.options
        meta = self.metadata
        self.run = processes.RunFolder()
        config = TritonConfig(
            http_address=opts.host,
            http_port=opts.port,
            grpc_address=opts.host,
            grpc_port=opts.grpc_port,
            metrics_address=opts.host,
            metrics_port=opts.metrics_port,
            allow_gpu_metrics=False,
            metrics_config=["summary_latencies=true"],  # request/queue/compute quantiles
            exit_timeout_secs=opts.shutdown_timeout_s,
            log_file=None if opts.verbose else self.run.path / "triton.log",
        )
        model_config = ModelConfig(
            max_batch_size=self.max_batch,
            batcher=DynamicBatcher(
                max_queue_delay_microseconds=int(round(opts.max_delay_ms * 1000)),
                preferred_batch_size=[self.max_batch],
                default_queue_policy=QueuePolicy(max_queue_size=opts.max_queue),
            ),
        )
        size = meta.img_size
        with python_backend_library_path(), processes.start_lock():
            envs_before = processes.python_envs()
            self.triton = ServeTriton(verbose=opts.verbose, config=config, workspace=self.run.path / "workspace")
            self.triton.bind(
                model_name=opts.model_name,
                infer_func=[BatchRunner(p, self.metrics) for p in self.predictors],
                inputs=[Tensor(name=meta.input_name, dtype=np.float32, shape=(3, size, size))],
                outputs=[Tensor(name=meta.output_name, dtype=np.float32, shape=(meta.num_classes,))],
                config=model_config,
                strict=False,
            )
            try:
                self.triton.run()
            except Exception as exc:
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                race = f" ({HANDSHAKE_TIMEOUT})" if HANDSHAKE_TIMEOUT in str(exc) else ""
                raise EvitDeployError(
                    f"Triton Inference Server failed to start: {first_line}{race}{self._log_tail()}"
                ) from exc
            finally:
                self.run.note_triton(self.triton.server_pid, self.triton.shm_prefix, envs_before)

    def _start_front(self) -> None:
        from evit_deploy.serve.rest import RestFront

        opts = self.options
        self.front = RestFront(
            self.predictors[0],
            opts.model_name,
            triton_http=(_connect_host(opts.host), opts.port),
            triton_metrics=(_connect_host(opts.host), opts.metrics_port),
            host=opts.host,
            port=opts.rest_port,
            metrics=self.metrics,
            max_inflight=min(opts.max_uploads, opts.max_queue),
            max_reading=READING_PER_UPLOAD * opts.max_uploads,
            max_body_bytes=int(opts.max_body_mb * 2**20),
            body_timeout_s=opts.body_timeout_s,
            min_upload_rate=opts.min_upload_kb_per_s * 1024,
            max_pixels=opts.max_image_pixels,
            preprocess_threads=min(4, os.cpu_count() or 1),
        )
        self.front.start()

    def _wait_ready(self, timeout: float) -> None:
        """Until Triton says the model is ready; then the stubs are known and the front is ready."""
        from evit_deploy.client import Client

        with Client(self.urls["http"], self.options.model_name, timeout=5) as client:
            deadline = time.monotonic() + timeout
            while not client.ready():
                if time.monotonic() > deadline or self.triton is None or not self.triton.is_alive():
                    raise EvitDeployError(f"model '{self.options.model_name}' did not become ready{self._log_tail()}")
                if self._stopping.is_set():
                    raise EvitDeployError("stopped while Triton was starting")
                time.sleep(0.1)
        self.stubs = processes.processes(processes.STUB_NAME, parent=self.triton.server_pid)
        self.front.backend_ready = True

    @property
    def alive(self) -> bool:
        return bool(self.triton is not None and self.triton.is_alive() and self.front is not None and self.front.alive)

    def wait(self, poll_s: float = 1.0) -> None:
        """Block until serving stops for good (raises) or the caller is interrupted."""
        while not self._failed.wait(poll_s):
            if self.front is None or not self.front.alive:
                raise EvitDeployError("the REST front stopped unexpectedly")
        raise EvitDeployError(self.failure)

    def stop(self) -> None:
        """Graceful: the front stops taking requests and finishes its in-flight ones, then Triton
        stops accepting, finishes in-flight inferences (up to shutdown_timeout_s), and exits.
        Its files go with it, whatever Triton managed to clean itself."""
        self._stopping.set()
        with self._lifecycle:
            if self.front is not None:
                self.front.stop(self.options.shutdown_timeout_s)
                self.front = None
            self._stop_triton()
        if self._watch_thread is not None and self._watch_thread is not threading.current_thread():
            self._watch_thread.join()
            self._watch_thread = None
        atexit.unregister(self.stop)

    def _stop_triton(self, kill: bool = False) -> None:
        """Stop Triton (kill: at once), then whatever still runs from its run folder (the stubs of a
        killed tritonserver, or one a stopped tritonserver left behind: seen once, running on
        after its tritonserver had exited), then its files."""
        try:
            if self.triton is not None:
                if kill:
                    self.triton.kill()
                else:
                    self.triton.stop()
        finally:
            self.triton = None
            self.stubs = {}
            if self.run is not None:
                processes.kill(processes.running_from(self.run.path))
                self.run.remove()
                self.run = None

    # -- the watch on the backend

    def _watch(self) -> None:
        """Runs as long as the server: a tritonserver it starts again gets SIGTERM when the thread
        that started it ends (PyTriton sets PR_SET_PDEATHSIG)."""
        while not self._stopping.wait(WATCH_PERIOD_S):
            death = self._backend_death()
            if death is None:
                continue
            with self._lifecycle:
                if self._stopping.is_set() or not self._restart(death):
                    return

    def _backend_death(self) -> str | None:
        """How the backend died, or None while it lives."""
        if self.triton is None:
            return None
        if not self.triton.is_alive():
            ended = self.triton.how_it_ended()
            return f"tritonserver {ended}" if ended else "PyTriton's side of the model stopped"
        for pid, stat in self.stubs.items():
            if not processes.running(pid, stat.start_ticks):
                dead = processes.process_stat(pid)
                ended = processes.describe_exit(dead.exit_status) if dead else "ended"
                return f"its Python backend stub (pid {pid}) {ended}"
        return None

    def _restart(self, death: str) -> bool:
        """Readiness false at once, then Triton again if the restart budget allows; whether it runs."""
        self.front.backend_ready = False
        self._stop_triton(kill=True)
        now, limit = time.monotonic(), self.options.max_restarts
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
        if len(self.restarts) >= limit:
            budget = (
                f"it was started again {limit} times in {RESTART_WINDOW_S // 60} minutes, the limit"
                if limit else "restarts are off"
            )
            self._fail(f"the model backend died ({death}); {budget} (--max-restarts {limit})")
            return False
        self.restarts.append(now)
        self.metrics.backend_restarts.inc(self.options.model_name)
        warnings.warn(
            f"the model backend died ({death}): starting Triton again "
            f"({len(self.restarts)} of {limit} within {RESTART_WINDOW_S // 60} minutes)",
            stacklevel=1,
        )
        try:
            self._start_triton()
            self._wait_ready(self._ready_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported as the failure
            self._stop_triton(kill=True)
            if not self._stopping.is_set():
                self._fail(f"the model backend died ({death}) and did not start again: {exc}")
            return False
        return True

    def _fail(self, message: str) -> None:
        self.failure = message
        self._failed.set()

    def __enter__(self) -> "EvitServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- info

    @property
    def urls(self) -> dict[str, str]:
        host = _url_host(self.options.host)
        ports = self.options.ports
        return {
            "http": f"http://{host}:{ports['http']}",
            "grpc": f"{host}:{ports['grpc']}",
            "metrics": f"http://{host}:{ports['metrics']}/metrics",
            "rest": f"http://{host}:{ports['rest']}",
        }

    def _log_tail(self, lines: int = 15) -> str:
        log = self.run.path / "triton.log" if self.run else None
        if log is None or not log.exists():
            return ""
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        return "\nTriton log (last lines):\n  " + "\n  ".join(tail) if tail else ""


def _connect_host(host: str) -> str:
    """Where to connect to reach a server bound to `host` (a wildcard address -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url_host(host: str) -> str:
    host = _connect_host(host)
    return f"[{host}]" if ":" in host else host
