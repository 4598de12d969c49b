"""A ``vllm serve``-like command on a free loopback port: what the soak and the serving
tests both start, poll and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``command`` plus ``--host 127.0.0.1 --port P`` in its own session, so that stop()
    ends the server and its engine-core child together; its output goes to ``log_path``."""

    def __init__(self, command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.base = ""

    def start(self, timeout: float) -> ServerProcess:
        """Start it and wait for ``/health``; on an early exit or a timeout it is stopped and
        the error quotes the end of its log."""
        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([*self.command, "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode} (log: {self.log_path}):\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s (log: {self.log_path}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # vLLM's clean shutdown, engine core included
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
