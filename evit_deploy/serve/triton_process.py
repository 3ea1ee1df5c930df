"""PyTriton 0.7's Triton as serve runs it: the one place that reaches into PyTriton's internals
(pyproject.toml pins nvidia-pytriton below 0.8).

- tritonserver gets its own process group, so a terminal's Ctrl-C (SIGINT to the foreground
  group) reaches serve alone, which then stops everything once and in order, the REST front
  first. In serve's group, Triton began its own shutdown at the same moment and printed
  "Signal (2) received." twice (once for the terminal, once for PyTriton's stop).
- tritonserver's output is kept (PyTriton's `logs()`) and echoed only with `verbose`: with a log
  file, it prints little more than those signal lines.
- its exit is left to EvitServer's watch, which restarts it, rather than PyTriton stopping itself
  from the thread that noticed (the watch would race that stop's clean-up).
- `kill()` ends a Triton whose backend died; a graceful stop would wait up to its exit timeout for
  a stub that cannot answer.
"""

from __future__ import annotations

import os
import signal
import time

import sh
from pytriton.triton import Triton

from evit_deploy.serve import processes

KILL_WAIT_S = 10.0


class ServeTriton(Triton):
    def __init__(self, *, verbose: bool = False, **kwargs):
        self._echo = verbose
        super().__init__(**kwargs)

    @property
    def shm_prefix(self) -> str:
        """The name prefix of the Python backend's shared-memory regions in /dev/shm."""
        return self._python_backend_config["shm-region-prefix-name"]

    @property
    def server_pid(self) -> int | None:
        command = self._triton_server._tritonserver_running_cmd if self._triton_server else None
        return command.pid if command is not None else None

    def how_it_ended(self) -> str:
        command = self._triton_server._tritonserver_running_cmd if self._triton_server else None
        code = command.process.exit_code if command is not None else None
        if code is None:
            return "stopped"
        return processes.describe_exit(-code if code < 0 else code << 8)  # sh gives -signal or the status

    def _initialize_server(self) -> None:
        super()._initialize_server()
        self._triton_server._verbose = self._echo

    def _run_server(self) -> None:
        defaults = sh.Command._call_args  # how PyTriton's TritonServer.start() runs tritonserver
        previous = defaults["new_group"]
        defaults["new_group"] = True
        try:
            super()._run_server()
        finally:
            defaults["new_group"] = previous

    def _on_tritonserver_exit(self, *_) -> None:
        """Left to EvitServer's watch."""

    def kill(self) -> None:
        """SIGKILL tritonserver, then PyTriton's own clean-up (its workspace)."""
        server = self._triton_server
        if server is not None and server.is_alive():
            os.kill(self.server_pid, signal.SIGKILL)
            deadline = time.monotonic() + KILL_WAIT_S
            while server.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.stop()
