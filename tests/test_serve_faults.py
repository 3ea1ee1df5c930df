"""`evit-deploy serve` under faults and hostile clients: a backend that dies, slow uploads, client
mistakes that must be 4xx, Ctrl-C and kill -9, and the files a run leaves behind.

One server for the module (queue of 1, so Triton's own 503 is easy to reach, and a 1 MB upload
limit); the CLI tests start their own, each stopped or killed before the test ends.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_IMAGE, cli_env, config_for
from evit_deploy.client import ServerError, logits_match
from evit_deploy.errors import UsageError
from evit_deploy.runtime import Predictor
from evit_deploy.serve import processes
from evit_deploy.serve.rest import UPLOAD_GRACE_S, RequestError, multipart_file
from evit_deploy.serve.server import ServeOptions
from test_serve import (
    SERVER_TIMEOUT,
    ClientThreads,
    _png_declaring,
    connect,
    free_ports,
    hold_model,
    needs_pytriton,
    port_options,
    wait_until,
)

PREDICT = "/v1/models/evit/predict"


@pytest.fixture(scope="module")
def artifact(onnx_export):
    return onnx_export(config_for()).path


@pytest.fixture(scope="module")
def predictor(artifact):
    return Predictor(artifact)


@pytest.fixture(scope="module")
def server(artifact):
    from evit_deploy.serve import EvitServer

    srv = EvitServer(artifact, port_options(max_batch=1, max_delay_ms=0, max_queue=1, max_body_mb=1))
    srv.start(ready_timeout_s=SERVER_TIMEOUT)
    try:
        yield srv
    finally:
        srv.stop()


def status_of(url: str) -> int | None:
    """The HTTP status of GET `url`; None when nothing answers (the port is closed)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def readiness(srv) -> tuple:
    http, rest = srv.urls["http"], srv.urls["rest"]
    return (
        status_of(f"{http}/v2/health/ready"),
        status_of(f"{http}/v2/models/evit/ready"),
        status_of(f"{rest}/v1/health/ready"),
    )


def upload(srv, body: bytes, content_type: str = "image/jpeg", path: str = PREDICT) -> tuple[int, dict, bytes]:
    with connect(srv) as client:
        return client.request("POST", path, body, {"Content-Type": content_type}, rest=True)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# ------------------------------------------------------------------------------------------
# Pieces that need no server


def test_new_serve_options_are_checked():
    for field, flag in (("body_timeout_s", "body-timeout"), ("min_upload_kb_per_s", "min-upload-rate")):
        with pytest.raises(UsageError, match=f"{flag} must be positive"):
            ServeOptions(**{field: 0})
    with pytest.raises(UsageError, match="max-restarts must be >= 0"):
        ServeOptions(max_restarts=-1)
    assert ServeOptions(max_restarts=0).max_restarts == 0


def test_malformed_multipart_is_a_400_with_a_reason():
    jpeg = SAMPLE_IMAGE.read_bytes()
    good = (
        b'--b1\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b'--b1\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--b1--\r\n"
    )
    assert multipart_file(good, "multipart/form-data; boundary=b1") == jpeg
    assert multipart_file(good, 'multipart/form-data; boundary="b1"') == jpeg
    cases = [
        (good, "multipart/form-data", "without a boundary"),
        (b"garbage \x00\xff garbage", "multipart/form-data; boundary=b1", "boundary was not found"),
        (b'--b1\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n--b1--\r\n', "multipart/form-data; boundary=b1", "no file field"),
    ]
    for body, content_type, reason in cases:
        with pytest.raises(RequestError, match=reason) as caught:
            multipart_file(body, content_type)
        assert caught.value.status == 400


def _plant_run(root: Path, tmp: Path, shm: Path, pid: int, start_ticks, tag: str) -> dict[str, Path]:
    """A run folder as serve writes it for process `pid`, with the Triton files outside it."""
    run = root / f"{processes.RUN_PREFIX}{pid}-{tag}"
    (run / "workspace").mkdir(parents=True)
    env, copy, region = f"python_env_{tag}", tmp / f"folder{tag}", shm / f"pytrtion{pid}-{tag}-0000"
    (tmp / env).mkdir()
    copy.mkdir()
    (copy / "config.pbtxt").write_text(
        f'parameters {{ key: "workspace-path" value {{ string_value: "{run.resolve() / "workspace"}" }} }}'
    )
    region.write_bytes(b"\0" * 16)
    record = {"pid": pid, "start_ticks": start_ticks, "shm_prefix": f"pytrtion{pid}-{tag}", "python_envs": [env]}
    (run / processes.RECORD).write_text(json.dumps(record))
    return {"run": run, "env": tmp / env, "copy": copy, "region": region}


def test_stale_runs_go_and_live_ones_stay(tmp_path):
    """A run whose serve process is gone loses its folder, shared memory, model copy and recorded
    python_env; a live run, a pid reused by another process, and files of no run are kept."""
    root, tmp, shm = (tmp_path / name for name in ("temp", "tmp", "shm"))
    for folder in (root, tmp, shm):
        folder.mkdir()
    me = processes.process_stat(os.getpid())
    stale = _plant_run(root, tmp, shm, dead_pid(), None, "AAAAAA")
    reused = _plant_run(root, tmp, shm, os.getpid(), me.start_ticks - 1, "BBBBBB")  # same pid, another process
    live = _plant_run(root, tmp, shm, os.getpid(), me.start_ticks, "CCCCCC")
    unrelated = [tmp / "python_env_DDDDDD", tmp / "folderDDDDDD", shm / "pytrtion1-other", root / "evit-serve-legacy"]
    for path in unrelated:
        path.mkdir()
    removed = processes.remove_stale_runs(root, tmp, shm)
    assert sorted(removed) == sorted(p["run"].resolve() for p in (stale, reused))
    for planted in (stale, reused):
        assert not any(path.exists() for path in planted.values()), planted
    assert all(path.exists() for path in [*live.values(), *unrelated])


def test_a_dead_runs_orphaned_stubs_are_killed_and_a_run_still_shutting_down_is_kept(tmp_path):
    """A stub that outlived its tritonserver (and its serve) is killed with its run; a run whose
    tritonserver still runs (finishing its shutdown after serve was killed) is left for later."""
    root, tmp, shm = (tmp_path / name for name in ("temp", "tmp", "shm"))
    for folder in (root, tmp, shm):
        folder.mkdir()
    orphaned = _plant_run(root, tmp, shm, dead_pid(), None, "EEEEEE")["run"]
    stopping = _plant_run(root, tmp, shm, dead_pid(), None, "FFFFFF")["run"]
    started = []
    try:
        for run, name in ((orphaned, "triton_python_backend_stub"), (stopping, "tritonserver")):
            program = run / "workspace" / "bin" / name  # sleep, under the name Triton's processes have
            program.parent.mkdir(parents=True)
            shutil.copy(shutil.which("sleep"), program)
            started.append(subprocess.Popen([str(program), "60"]))
        wait_until(lambda: all(processes.running_from(run.resolve()) for run in (orphaned, stopping)), "the programs to start")
        assert processes.remove_stale_runs(root, tmp, shm) == [orphaned.resolve()]
        assert started[0].wait(10) == -signal.SIGKILL and started[1].poll() is None
        assert stopping.exists() and not orphaned.exists()
    finally:
        for proc in started:
            proc.kill()
            proc.wait(10)


def test_python_env_is_recorded_only_when_no_unrecorded_tritonserver_runs(tmp_path, monkeypatch):
    """Triton's python_env_* folders name no owner: a new one is this run's only when every other
    tritonserver is one that a serve recorded (so it made its own before)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "python_env_OLDOLD").mkdir()
    before = processes.python_envs(tmp)
    (tmp / "python_env_NEWNEW").mkdir()
    other_run = processes.RunFolder(tmp_path)
    other = processes.ProcessStat("tritonserver", "S", 1, 1234, 0)
    exe = other_run.path / "workspace" / "tritonserver" / "bin" / "tritonserver"
    monkeypatch.setattr(processes, "executable", lambda pid: exe)
    monkeypatch.setattr(processes, "processes", lambda name, parent=None: {4242: other})
    run = processes.RunFolder(tmp_path)
    run.note_triton(None, "pytrtion1-x", before, tmp)
    assert run.record["python_envs"] == []  # pid 4242 is nobody's recorded tritonserver
    other_run.note(triton=[4242, 1234])
    run.note_triton(None, "pytrtion1-x", before, tmp)
    assert run.record["python_envs"] == ["python_env_NEWNEW"]
    assert processes.read_record(run.path) == run.record


# ------------------------------------------------------------------------------------------
# The module's server: client mistakes, slow clients, accepted images


@needs_pytriton
def test_client_mistakes_are_4xx_without_a_traceback(server, caplog):
    """Malformed multipart, an upload cut short, broken chunk framing: 400 (the first two were 500
    with a traceback per request); sizes: 413, a chunked body too (it has no Content-Length to
    refuse it from)."""
    jpeg = SAMPLE_IMAGE.read_bytes()
    with caplog.at_level(logging.WARNING):
        for body, content_type, reason in (
            (jpeg, "multipart/form-data", b"without a boundary"),
            (b"\x00garbage" * 100, "multipart/form-data; boundary=xyz", b"boundary was not found"),
        ):
            status, _, data = upload(server, body, content_type)
            assert (status, reason in data) == (400, True), data
        refused = server.metrics.rest_requests.get("400")
        for framing in (b"Content-Length: 1000\r\n\r\nabc", b"Transfer-Encoding: chunked\r\n\r\n10\r\nabc"):
            with socket.create_connection(_rest_address(server), timeout=10) as sock:  # leaves mid-body
                sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n".encode() + framing)
                time.sleep(0.2)
        wait_until(lambda: server.metrics.rest_requests.get("400") == refused + 2, "uploads cut short to be answered 400")
        with socket.create_connection(_rest_address(server), timeout=10) as sock:
            sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".encode())
            assert sock.recv(4096)[9:12] == b"400", "broken chunk framing"
    assert not [r for r in caplog.records if r.name.startswith(("evit_deploy", "aiohttp"))], caplog.text
    for width, height in ((20000, 20000), (1, 8000)):
        status, _, data = upload(server, _png_declaring(width, height), "image/png")
        assert status == 413, data
    status, _, data = upload(server, _jpeg_declaring(20000, 20000))
    assert status == 413, data
    assert _chunked_upload(server, 2**20 + 2**16).startswith(b"HTTP/1.1 413"), "chunked body over the limit"
    status, _, _ = upload(server, jpeg)
    assert status == 200


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header says `width` x `height`."""
    data = bytearray(SAMPLE_IMAGE.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _rest_address(srv) -> tuple[str, int]:
    host, port = srv.urls["rest"].removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _chunked_upload(srv, size: int, chunk: int = 2**16) -> bytes:
    """POST `size` bytes with Transfer-Encoding: chunked; the answer's first bytes."""
    host, _ = address = _rest_address(srv)
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(0, size, chunk):
                sock.sendall(f"{chunk:x}\r\n".encode() + b"\xff" * chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed before the end
            pass
        return sock.recv(4096)


@needs_pytriton
def test_64_slow_uploads_do_not_lock_out_other_uploads(server):
    """64 connections announce 100 KB and send 1 byte a second. An upload slot is taken once a
    body has arrived (this server has 1), so a normal upload is answered at once; the slow ones
    get 408 when they fall behind the minimum rate, after UPLOAD_GRACE_S."""
    host, _ = address = _rest_address(server)
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
            "Content-Length: 102400\r\n\r\n").encode()
    slow = [socket.create_connection(address, timeout=10) for _ in range(64)]
    answers: dict[socket.socket, bytes] = {}
    done = threading.Event()

    def trickle() -> None:  # one byte a second on every slow connection, until all are answered
        while not done.wait(1.0):
            for sock in slow:
                if sock not in answers:
                    try:
                        sock.sendall(b"\xff")
                    except OSError:
                        pass

    try:
        for sock in slow:
            sock.sendall(head + b"\xff")
        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(1.0)  # every slow upload is being read by now
        started = time.monotonic()
        status, _, data = upload(server, SAMPLE_IMAGE.read_bytes())
        assert status == 200, data
        assert time.monotonic() - started < UPLOAD_GRACE_S, "the upload waited for the slow ones"
        deadline = time.monotonic() + UPLOAD_GRACE_S + 30
        while len(answers) < len(slow) and time.monotonic() < deadline:
            readable, _, _ = select.select([s for s in slow if s not in answers], [], [], 1.0)
            for sock in readable:
                answers[sock] = sock.recv(4096)
        assert len(answers) == len(slow), f"{len(slow) - len(answers)} slow uploads got no answer"
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers.values()), set(a[:40] for a in answers.values())
        assert b"upload too slow" in next(iter(answers.values()))
    finally:
        done.set()
        for sock in slow:
            sock.close()


@needs_pytriton
def test_tritons_queue_full_503_through_the_rest_front_says_when_to_retry(server):
    """Queue of 1 and a held model: one tensor request runs, one waits, and the upload that
    follows is refused by Triton itself; the REST front passes that 503 on with Retry-After."""
    release, running = threading.Event(), threading.Event()
    hold_model(server, lambda: running.set() or release.wait(SERVER_TIMEOUT))
    x = np.zeros((1, 3, 224, 224), np.float32)

    def tensor(i: int):
        with connect(server) as client:
            return client.logits(x)

    def queued() -> int:
        with connect(server) as client:
            text = client.request("GET", "/metrics", rest=True)[2].decode()
        line = next(x for x in text.splitlines() if x.startswith('nv_inference_pending_request_count{model="evit"'))
        return int(float(line.split()[-1]))

    clients = []
    try:
        clients.append(ClientThreads(1, tensor))
        assert running.wait(60), "the first tensor request did not reach the model"
        clients.append(ClientThreads(1, tensor))
        wait_until(lambda: queued() == 1, "the second tensor request to wait in Triton's queue")
        status, headers, data = upload(server, SAMPLE_IMAGE.read_bytes())
        assert status == 503 and b"queue" in data, data
        assert headers.get("retry-after") == "1", headers
    finally:
        release.set()
        for predictor in server.predictors:
            del predictor.logits  # hold_model's instance attribute: the class's method again
    results = [r for c in clients for r in c.join()]
    assert len(results) == 2 and all(isinstance(r, np.ndarray) for r in results), results


@needs_pytriton
def test_cmyk_16_bit_and_animated_images_are_accepted_animated_gif_refused(server, predictor, tmp_path):
    """CMYK JPEG, 16-bit PNG, animated PNG and WebP are classified as Predictor classifies the
    same file (animations: their first frame); GIF, animated or not, is not an accepted format."""
    with Image.open(SAMPLE_IMAGE) as photo:
        rgb = photo.convert("RGB")
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    files = {
        "cmyk.jpg": lambda path: rgb.convert("CMYK").save(path, "JPEG"),
        "gray16.png": lambda path: Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(path),
        "animated.png": lambda path: rgb.save(path, "PNG", save_all=True, append_images=frames[1:]),
        "animated.webp": lambda path: rgb.save(path, "WEBP", save_all=True, append_images=frames[1:]),
    }
    with connect(server) as client:
        for name, write in files.items():
            path = tmp_path / name
            write(path)
            got = client.predict_image(path, topk=3, logits=True)
            want = predictor.logits(predictor.preprocess([path]))
            assert logits_match(np.asarray([got["logits"]], np.float32), want), name
        gif = tmp_path / "animated.gif"
        rgb.save(gif, "GIF", save_all=True, append_images=frames[1:])
        with pytest.raises(ServerError, match="unsupported image format GIF") as caught:
            client.predict_image(gif)
        assert caught.value.status == 415


# ------------------------------------------------------------------------------------------
# A backend that dies


@needs_pytriton
def test_a_dead_backend_is_unready_at_once_then_started_again(server, predictor):
    """The Python backend stub killed with SIGKILL (what the OOM killer does): every readiness
    endpoint turns false within a second (they answered 200, and inferences 500, for ever), Triton
    is started again with one warning, the dead run's files are gone, and answers are right again."""
    assert readiness(server) == (200, 200, 200)
    run, record = server.run.path, dict(server.run.record)
    copies = [c for c in Path("/tmp").glob("folder*") if str(run / "workspace") in _read(c / "config.pbtxt")]
    regions = list(Path("/dev/shm").glob(record["shm_prefix"] + "*"))
    assert copies and regions, (copies, regions)
    (stub,) = server.stubs
    with pytest.warns(UserWarning, match=r"backend died \(its Python backend stub .* was killed by SIGKILL\): starting Triton again \(1 of 3"):
        killed = time.monotonic()
        os.kill(stub, signal.SIGKILL)
        wait_until(lambda: 200 not in readiness(server), "every readiness endpoint to turn false", timeout=5)
        unready = time.monotonic() - killed
        wait_until(lambda: readiness(server) == (200, 200, 200), "ready again", timeout=SERVER_TIMEOUT)
    assert unready < 2.0, f"readiness turned false only after {unready:.1f} s"
    assert len(server.restarts) == 1 and server.metrics.backend_restarts.get("evit") == 1
    leftovers = [run, *copies, *regions, *(Path("/tmp") / env for env in record["python_envs"])]
    assert not [path for path in leftovers if path.exists()]
    assert server.run.path != run
    jpeg = SAMPLE_IMAGE.read_bytes()
    status, _, data = upload(server, jpeg)
    assert status == 200, data
    with connect(server) as client:
        got = client.predict_image(SAMPLE_IMAGE, logits=True)
    assert logits_match(np.asarray([got["logits"]], np.float32), predictor.logits(predictor.preprocess([SAMPLE_IMAGE])))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------
# The CLI process: Ctrl-C, a backend that keeps dying, kill -9


class ServeProcess:
    """`evit-deploy serve` in its own session (as a terminal runs it: its own process group)."""

    def __init__(self, artifact, *args: str):
        http, grpc, metrics, rest = free_ports(4)
        self.rest = f"http://127.0.0.1:{rest}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evit_deploy", "serve", str(artifact), "--port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--rest-port", str(rest),
             "--shutdown-timeout", "5", *args],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            # as a terminal's foreground job has it: run from a background job (CI scripts, nohup),
            # the tests would hand serve SIGINT ignored, and Ctrl-C would then never reach it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while status_of(f"{self.rest}/v1/health/ready") != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.communicate(timeout=60)
            time.sleep(0.2)

    def tritonserver(self) -> tuple[int, dict[int, processes.ProcessStat]]:
        """Its tritonserver's pid and that one's stubs."""
        (pid,) = processes.processes(processes.TRITON_NAME, parent=self.proc.pid)
        return pid, processes.processes(processes.STUB_NAME, parent=pid)

    def finish(self, timeout: float = 90) -> tuple[int, str, str]:
        stdout, stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, stdout, stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


def _runs_of(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{processes.RUN_PREFIX}{pid}-*"))


@needs_pytriton
def test_ctrl_c_in_a_terminal_stops_serve_once_quietly_with_status_0(artifact):
    """A terminal's Ctrl-C is SIGINT to the whole foreground group. Triton, in serve's group,
    stopped on its own at the same moment and printed "Signal (2) received." twice; now it is
    stopped once, by serve, and none of its chatter shows. A graceful stop exits 0."""
    serve = ServeProcess(artifact)
    try:
        serve.wait_ready()
        triton, _ = serve.tritonserver()
        assert os.getpgid(triton) != os.getpgid(serve.proc.pid), "tritonserver would get the terminal's SIGINT too"
        os.killpg(serve.proc.pid, signal.SIGINT)
        code, stdout, stderr = serve.finish()
    finally:
        serve.close()
    assert code == 0, stdout + stderr
    assert "Signal (2)" not in stdout + stderr and "Triton Inference Server" not in stdout + stderr, stdout + stderr
    assert stderr.splitlines() == ["stopping: finishing in-flight requests", "stopped"], stderr
    assert _runs_of(serve.proc.pid) == []


@needs_pytriton
def test_serve_exits_1_with_one_line_when_its_backend_dies_past_max_restarts(artifact):
    """--max-restarts 0 and tritonserver killed: serve exits 1 with one error line, leaving no
    process or file behind. Its start removed a killed run's folder first."""
    stale = Path(tempfile.gettempdir()) / f"{processes.RUN_PREFIX}{dead_pid()}-planted"
    (stale / "workspace").mkdir(parents=True)
    serve = ServeProcess(artifact, "--max-restarts", "0")
    try:
        serve.wait_ready()
        assert not stale.exists(), "the start left a killed run's folder"
        triton, stubs = serve.tritonserver()
        os.kill(triton, signal.SIGKILL)
        code, stdout, stderr = serve.finish()
    finally:
        serve.close()
        shutil.rmtree(stale, ignore_errors=True)  # if the test failed before the start removed it
    assert code == 1, stdout + stderr
    assert stderr.splitlines() == [
        "error: the model backend died (tritonserver was killed by SIGKILL); restarts are off (--max-restarts 0)"
    ], stderr
    assert not any(processes.running(pid, stat.start_ticks) for pid, stat in stubs.items())
    assert _runs_of(serve.proc.pid) == []


@needs_pytriton
def test_serve_killed_with_sigkill_leaves_no_tritonserver_and_its_files_go_at_the_next_start(artifact):
    serve = ServeProcess(artifact)
    try:
        serve.wait_ready()
        triton, stubs = serve.tritonserver()
        triton_start = processes.process_stat(triton).start_ticks
        serve.proc.kill()
        serve.finish()
    finally:
        serve.close()
    wait_until(
        lambda: not processes.running(triton, triton_start) and not any(processes.running(p, s.start_ticks) for p, s in stubs.items()),
        "tritonserver and its stubs to end after serve was killed", timeout=60,
    )
    (run,) = _runs_of(serve.proc.pid)  # what a killed process cannot clean
    assert run.resolve() in processes.remove_stale_runs()  # what the next start does first
    assert _runs_of(serve.proc.pid) == []
    assert list(Path("/dev/shm").glob(f"pytrtion{serve.proc.pid}-*")) == []
