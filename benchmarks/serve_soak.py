"""A bounded soak of `evit-deploy serve`: several client threads send a mix of good and bad
requests for N minutes, the Python backend stub is killed with SIGKILL half-way, and the verdict
counts the requests that got a wrong answer or an unexpected status, and checks that the server's
memory stayed flat. Not a test (it takes minutes and all the CPU): run it by hand.

Every request kind has one expected answer: good tensors and images the artifact's own logits
(Predictor, in this process), bad ones their 4xx (400, 404, 408, 413, 415). While the backend is
down (from the kill until 2 s after the server is ready again), 503 with Retry-After, a closed
Triton port, Triton's "Stub process is not healthy" and its 404 while the model loads again are
excused and counted apart (the clients then wait a second, as Retry-After asks). At the end serve gets
SIGTERM, must exit 0 and leave no process, run folder or shared memory behind. Exit 0 when all of
that holds. Results: build/serve_soak.json (or --json-out, under build/).

    PYTHONPATH=. python benchmarks/serve_soak.py MODEL.onnx --minutes 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from evit_deploy.client import Client, decode_infer_response, encode_infer_request, logits_match
from evit_deploy.errors import EvitDeployError
from evit_deploy.fileio import atomic_output
from evit_deploy.preprocess import SAMPLE_IMAGE
from evit_deploy.runtime import Predictor
from evit_deploy.serve import processes

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
MAX_BODY_MB = 1  # serve's upload limit here: an over-limit body costs 1 MB, not 10
RSS_PERIOD_S = 5.0
# Memory counts as flat when the last quarter's median RSS is within this of the second quarter's.
FLAT_MB, FLAT_SHARE = 50.0, 0.10
# While the backend is down and restarting: the REST front's 503, Triton's closed port, Triton's
# answer for a dead stub (before serve kills it), and its 404 until the model is loaded again.
EXCUSED = {"503", "no connection", "500 dead stub", "404 model loading"}


@dataclass
class Kind:
    """One kind of request: how to send it and what it must get."""

    name: str
    weight: float
    send: object  # (SoakClients, Client) -> (status: str, ok: bool, detail: str)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header says `width` x `height` (what a decompression bomb sends)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class Soak:
    def __init__(self, args):
        self.args = args
        self.predictor = Predictor(args.artifact)
        self.meta = self.predictor.metadata
        self.topk = min(5, self.meta.num_classes)
        self.http, self.grpc, self.metrics, self.rest = free_ports(4)
        self.lock = threading.Lock()
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.errors: list[dict] = []
        self.error_count = 0
        self.excused = 0
        self.killed_at: float | None = None
        self.ready_again_at: float | None = None
        self.kill_report: dict = {}
        self.rss: list[list[float]] = []
        self.loads: list[float] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self._prepare_inputs()

    # -- inputs and their expected answers

    def _prepare_inputs(self) -> None:
        size = self.meta.img_size
        rng = np.random.default_rng(0)
        self.tensors = [rng.standard_normal((1 + i % 2, 3, size, size), dtype=np.float32) for i in range(8)]
        self.tensor_logits = [self.predictor.logits(t) for t in self.tensors]
        with Image.open(SAMPLE_IMAGE) as photo:
            rgb = photo.convert("RGB")
        views = [rgb, rgb.rotate(90, expand=True), rgb.crop((0, 0, rgb.width // 2, rgb.height // 2))]
        self.images = [encoded(v, "JPEG", quality=90) for v in views] + [encoded(v, "PNG") for v in views[:1]]
        self.image_logits = [
            self.predictor.logits(self.predictor.preprocess([Image.open(io.BytesIO(data))])) for data in self.images
        ]
        self.gif = encoded(rgb.resize((64, 48)), "GIF")

    # -- request kinds

    def kinds(self) -> list[Kind]:
        jpeg = self.images[0]
        boundary = "soakboundary"
        refused = self._refused
        return [
            Kind("tensor", 4, self._tensor),
            Kind("image", 4, self._image),
            Kind("image multipart", 1, lambda client: self._image(client, boundary)),
            Kind("nan tensor", 0.5, self._nan_tensor),
            Kind("undecodable", 0.5, refused(b"this is not an image" * 10, 400)),
            Kind("truncated jpeg", 0.5, refused(jpeg[: len(jpeg) // 2], 400)),
            Kind("multipart without boundary", 0.5, refused(jpeg, 400, "multipart/form-data")),
            Kind("multipart garbage", 0.5, refused(b"\x00garbage" * 50, 400, f"multipart/form-data; boundary={boundary}")),
            Kind("gif", 0.5, refused(self.gif, 415, "image/gif")),
            Kind("20000x20000 header", 0.5, refused(png_declaring(20000, 20000), 413, "image/png")),
            Kind("1x8000 image", 0.5, refused(png_declaring(1, 8000), 413, "image/png")),
            Kind("body over the limit", 0.2, refused(b"\xff" * (MAX_BODY_MB * 2**20 + 1), 413)),
            Kind("bad topk", 0.3, refused(jpeg, 400, query="?topk=0")),
            Kind("unknown model", 0.3, refused(jpeg, 404, model="nosuch")),
            Kind("wrong tensor shape", 0.5, self._wrong_shape),
        ]

    def _refused(self, body: bytes, status: int, ctype: str = "image/jpeg", query: str = "", model: str = "evit"):
        """An upload that must get `status`."""

        def send(client: Client):
            code, _, data = client.request("POST", f"/v1/models/{model}/predict{query}", body, {"Content-Type": ctype}, rest=True)
            return self._status(code, data), code == status, f"expected {status}: {data[:200].decode('utf-8', 'replace')}"

        return send

    def _tensor(self, client: Client):
        i = random.randrange(len(self.tensors))
        body, headers = encode_infer_request(self.meta.input_name, self.tensors[i], self.meta.output_name)
        status, response_headers, data = client.request("POST", "/v2/models/evit/infer", body, headers)
        if status != 200:
            return self._status(status, data), False, data[:200].decode("utf-8", "replace")
        got = decode_infer_response(data, response_headers.get("inference-header-content-length"), self.meta.output_name)
        return "200", logits_match(got, self.tensor_logits[i]), "wrong logits"

    def _nan_tensor(self, client: Client):
        batch = self.tensors[0].copy()
        batch[0, 0, 0, 0] = np.nan
        body, headers = encode_infer_request(self.meta.input_name, batch, self.meta.output_name)
        status, response_headers, data = client.request("POST", "/v2/models/evit/infer", body, headers)
        if status != 200:
            return self._status(status, data), False, data[:200].decode("utf-8", "replace")
        got = decode_infer_response(data, response_headers.get("inference-header-content-length"), self.meta.output_name)
        return "200", bool(np.isnan(got).all()), "a NaN input did not get NaN logits"

    def _wrong_shape(self, client: Client):
        bad = np.zeros((1, 3, self.meta.img_size // 2, self.meta.img_size // 2), np.float32)
        body, headers = encode_infer_request(self.meta.input_name, bad, self.meta.output_name)
        status, _, data = client.request("POST", "/v2/models/evit/infer", body, headers)
        return self._status(status, data), status == 400, data[:200].decode("utf-8", "replace")

    def _image(self, client: Client, boundary: str | None = None):
        i = random.randrange(len(self.images))
        body, ctype = self.images[i], "image/jpeg"
        if boundary:
            body = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'.encode()
                + body + f"\r\n--{boundary}--\r\n".encode()
            )
            ctype = f"multipart/form-data; boundary={boundary}"
        status, _, data = client.request(
            "POST", f"/v1/models/evit/predict?topk={self.topk}&logits=true", body, {"Content-Type": ctype}, rest=True
        )
        if status != 200:
            return self._status(status, data), False, data[:200].decode("utf-8", "replace")
        answer = json.loads(data)
        want = self.image_logits[i]
        expected_ids = self.predictor.classify(want, self.topk)[0].class_ids
        right = logits_match(np.asarray([answer["logits"]], np.float32), want) and answer["class_ids"] == expected_ids
        return "200", right, "wrong classes or logits"

    @staticmethod
    def _status(status: int, data: bytes) -> str:
        if status == 500 and b"Stub process" in data:
            return "500 dead stub"
        if status == 404 and b"Request for unknown model" in data:  # Triton's, not the REST front's
            return "404 model loading"
        return str(status)

    # -- threads

    def client_thread(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        kinds = self.kinds()
        weights = [k.weight for k in kinds]
        with Client(f"http://127.0.0.1:{self.http}", rest_url=f"http://127.0.0.1:{self.rest}", timeout=60) as client:
            while time.monotonic() < deadline and not self.stop.is_set():
                kind = rng.choices(kinds, weights)[0]
                started = time.monotonic()
                try:
                    status, ok, detail = kind.send(client)
                except EvitDeployError as exc:  # the port closed: Triton is being restarted
                    status, ok, detail = "no connection", False, str(exc)
                self.record(kind.name, status, ok, detail, started)
                if status in EXCUSED:  # as a client should: wait a little (Retry-After: 1) and retry
                    time.sleep(1.0)

    def slow_client_thread(self, deadline: float) -> None:
        """Uploads that send one byte a second: each must get 408, never hold the others up."""
        head = ("POST /v1/models/evit/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                "Content-Length: 102400\r\n\r\n").encode()
        while time.monotonic() < deadline - 15 and not self.stop.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.rest), timeout=2) as sock:
                    sock.sendall(head)
                    answer = b""
                    while not answer and time.monotonic() - started < 30:
                        sock.sendall(b"\xff")
                        try:
                            answer = sock.recv(4096)
                        except TimeoutError:
                            continue
                status = answer[9:12].decode("ascii", "replace") if answer else "no answer"
                self.record("slow upload", status, status == "408", answer[:120].decode("utf-8", "replace"), started)
            except OSError as exc:
                self.record("slow upload", "no connection", False, str(exc), started)
            self.stop.wait(10)

    def record(self, kind: str, status: str, ok: bool, detail: str, started: float) -> None:
        with self.lock:
            self.counts[kind][status] += 1
            if ok:
                return
            if status in EXCUSED and self._during_restart(started):
                self.excused += 1
                return
            self.error_count += 1
            if len(self.errors) < 50:
                self.errors.append({"kind": kind, "status": status, "detail": detail, "at_s": round(started - self.t0, 1)})

    def _during_restart(self, started: float) -> bool:
        """Sent between the kill and 2 s after the server was ready again."""
        if self.killed_at is None or started < self.killed_at - 1.0:
            return False
        return self.ready_again_at is None or started < self.ready_again_at + 2.0

    def rest_ready(self) -> int | None:
        try:
            with Client(f"http://127.0.0.1:{self.http}", rest_url=f"http://127.0.0.1:{self.rest}", timeout=5) as c:
                return c.request("GET", "/v1/health/ready", rest=True)[0]
        except EvitDeployError:
            return None

    def kill_stub(self, serve_pid: int) -> None:
        """SIGKILL the Python backend stub; time readiness going false and coming back."""
        tritons = processes.processes(processes.TRITON_NAME, parent=serve_pid)
        stubs = {p: s for t in tritons for p, s in processes.processes(processes.STUB_NAME, parent=t).items()}
        if not stubs:
            self.kill_report = {"error": "no Python backend stub found"}
            return
        pid = next(iter(stubs))
        with self.lock:
            self.killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        print(f"  killed the Python backend stub (pid {pid}) with SIGKILL", flush=True)
        unready = ready = None
        while time.monotonic() - self.killed_at < 180 and ready is None:
            status = self.rest_ready()
            now = time.monotonic() - self.killed_at
            if unready is None and status != 200:
                unready = now
            elif unready is not None and status == 200:
                ready = now
            time.sleep(0.05)
        with self.lock:
            self.ready_again_at = self.killed_at + ready if ready is not None else None
        self.kill_report = {
            "stub_pid": pid,
            "at_s": round(self.killed_at - self.t0, 1),
            "unready_after_s": None if unready is None else round(unready, 2),
            "ready_again_after_s": None if ready is None else round(ready, 2),
        }
        print(f"  readiness false after {_seconds(unready)}, ready again after {_seconds(ready)}", flush=True)

    def sample(self, serve_pid: int) -> None:
        tree = [serve_pid]
        for triton in processes.processes(processes.TRITON_NAME, parent=serve_pid):
            tree += [triton, *processes.processes(processes.STUB_NAME, parent=triton)]
        self.rss.append([round(time.monotonic() - self.t0, 1), round(rss_mb(serve_pid), 1), round(sum(map(rss_mb, tree)), 1)])
        self.loads.append(os.getloadavg()[0])

    # -- the run

    def run(self) -> dict:
        args = self.args
        cores = os.cpu_count() or 1
        log = tempfile.NamedTemporaryFile("w+", prefix="serve-soak-", suffix=".log", delete=False)
        serve = subprocess.Popen(
            [sys.executable, "-m", "evit_deploy", "serve", str(args.artifact), "--port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--rest-port", str(self.rest),
             "--max-body-mb", str(MAX_BODY_MB), "--shutdown-timeout", "10"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            return self._soak(serve, cores, log.name)
        finally:
            self.stop.set()
            if serve.poll() is None:
                serve.kill()
                serve.wait(30)
            os.unlink(log.name)

    def _soak(self, serve: subprocess.Popen, cores: int, log: str) -> dict:
        args = self.args
        self.t0 = time.monotonic()
        while self.rest_ready() != 200:
            if serve.poll() is not None or time.monotonic() - self.t0 > 180:
                raise SystemExit(f"serve did not become ready:\n{Path(log).read_text()}")
            time.sleep(0.5)
        print(f"serve ready after {time.monotonic() - self.t0:.1f} s (pid {serve.pid}); soaking for {args.minutes:g} min "
              f"with {args.threads} client threads and one slow client", flush=True)
        self.t0 = time.monotonic()
        deadline = self.t0 + args.minutes * 60
        threads = [threading.Thread(target=self.client_thread, args=(i, deadline), daemon=True) for i in range(args.threads)]
        threads.append(threading.Thread(target=self.slow_client_thread, args=(deadline,), daemon=True))
        for thread in threads:
            thread.start()
        kill_at = self.t0 + args.kill_at * args.minutes * 60
        killed, next_sample, next_progress = False, self.t0, self.t0 + args.progress_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_sample:
                self.sample(serve.pid)
                next_sample += RSS_PERIOD_S
            if not killed and now >= kill_at:
                killed = True
                threading.Thread(target=self.kill_stub, args=(serve.pid,), daemon=True).start()
            if now >= next_progress:
                self.progress(cores)
                next_progress += args.progress_s
            if serve.poll() is not None:
                print("serve exited during the soak", flush=True)
                break
            time.sleep(0.1)
        for thread in threads:
            thread.join(90)
        self.sample(serve.pid)
        self.progress(cores)
        serve.send_signal(signal.SIGTERM)
        try:
            exit_code = serve.wait(90)
        except subprocess.TimeoutExpired:
            exit_code = None
        output = Path(log).read_text(errors="replace").splitlines()
        leftovers = [str(p) for p in Path(tempfile.gettempdir()).glob(f"{processes.RUN_PREFIX}{serve.pid}-*")]
        leftovers += [str(p) for p in Path("/dev/shm").glob(f"pytrtion{serve.pid}-*")]
        leftovers += [f"tritonserver pid {p}" for p in processes.processes(processes.TRITON_NAME, parent=serve.pid)]
        return self.report(exit_code, output, leftovers, cores)

    def progress(self, cores: int) -> None:
        with self.lock:
            total = sum(sum(c.values()) for c in self.counts.values())
            errors, excused = self.error_count, self.excused
        load = os.getloadavg()[0]
        serve_rss = self.rss[-1][1] if self.rss else 0.0
        print(f"  {(time.monotonic() - self.t0) / 60:5.1f} min  requests {total}  errors {errors}  "
              f"excused while restarting {excused}  serve RSS {serve_rss:.0f} MB  load {load:.1f}", flush=True)
        if load > cores:
            print(f"  warning: load average {load:.1f} is above the {cores} cores: the clients and the server compete", flush=True)

    def report(self, exit_code, output: list[str], leftovers: list[str], cores: int) -> dict:
        memory = {name: growth([row[i] for row in self.rss]) for i, name in ((1, "serve"), (2, "serve_and_triton"))}
        restarted = [line for line in output if "starting Triton again" in line]
        kill = self.kill_report
        checks = {
            "no wrong answers or unexpected statuses": self.error_count == 0,
            "memory flat": all(m["flat"] for m in memory.values()),
            "readiness false, then ready again after the kill": bool(kill.get("unready_after_s") is not None and kill.get("ready_again_after_s") is not None),
            "one restart": len(restarted) == 1,
            "serve exited 0 on SIGTERM": exit_code == 0,
            "nothing left behind": not leftovers,
        }
        return {
            "artifact": str(self.args.artifact),
            "minutes": self.args.minutes,
            "client_threads": self.args.threads,
            "requests": {kind: dict(counts) for kind, counts in sorted(self.counts.items())},
            "total_requests": sum(sum(c.values()) for c in self.counts.values()),
            "errors": self.error_count,
            "error_samples": self.errors,
            "excused_while_restarting": self.excused,
            "kill": kill,
            "serve_output": [line for line in output if line.startswith(("warning", "error", "stopp"))],
            "rss_mb": {"columns": ["seconds", "serve", "serve_and_triton"], "samples": self.rss},
            "memory": memory,
            "load_average": {"max": round(max(self.loads, default=0.0), 2), "cores": cores},
            "serve_exit_code": exit_code,
            "leftovers": leftovers,
            "checks": checks,
            "passed": all(checks.values()),
        }


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def growth(samples: list[float]) -> dict:
    """Median RSS of the last quarter against the second quarter (the first is warm-up)."""
    if len(samples) < 8:
        return {"flat": True, "note": "too few samples to judge", "samples": len(samples)}
    quarter = len(samples) // 4
    before = statistics.median(samples[quarter : 2 * quarter])
    after = statistics.median(samples[-quarter:])
    grew = after - before
    return {
        "second_quarter_mb": round(before, 1),
        "last_quarter_mb": round(after, 1),
        "growth_mb": round(grew, 1),
        "flat": grew <= max(FLAT_MB, FLAT_SHARE * before),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="An exported .onnx (or engine) to serve.")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=4, help="Client threads sending good and bad requests.")
    parser.add_argument("--kill-at", type=float, default=0.5, help="When to kill the backend, as a share of the run.")
    parser.add_argument("--progress-s", type=float, default=30.0, help="Seconds between progress lines.")
    parser.add_argument("--json-out", type=Path, default=BUILD / "serve_soak.json", help="Under build/.")
    args = parser.parse_args()
    if BUILD.resolve() not in args.json_out.resolve().parents:
        parser.error(f"--json-out must be under {BUILD}/ (results are never written over tracked files)")
    if not args.artifact.is_file():
        parser.error(f"no such artifact: {args.artifact}")
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > cores:
        print(f"warning: load average {os.getloadavg()[0]:.1f} is above the {cores} cores before the soak starts", flush=True)
    result = Soak(args).run()
    with atomic_output(args.json_out, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    for check, held in result["checks"].items():
        print(f"{'ok  ' if held else 'FAIL'}  {check}")
    print(f"{result['total_requests']} requests, {result['errors']} errors, "
          f"{result['excused_while_restarting']} excused while restarting; wrote {args.json_out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
