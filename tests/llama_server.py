"""A patched llama-server started as a real process on 127.0.0.1 for a test, and its HTTP calls."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``with LlamaServer(binary, model, log_path, args) as srv:`` waits for /health and stops the server (its
    process group) on exit, also when the test fails; ``srv.alive()`` says whether it still runs."""

    def __init__(self, binary: Path, model: Path, log_path: Path, args: list[str], ready_s: float = 120):
        self.port = free_port()
        self.log_path = log_path
        self._cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._ready_s = ready_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self._cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self._ready_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise AssertionError("llama-server stopped at start:\n" + self.log()[-3000:])
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError("llama-server did not become ready:\n" + self.log()[-3000:])
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kv_buffer_mib(self) -> float:
        """The KV cache's buffer size from the server's log (llama_kv_cache: ... KV buffer size = X MiB)."""
        sizes = re.findall(r"KV buffer size =\s*([0-9.]+) MiB", self.log())
        assert sizes, "no KV buffer size in the server log"
        return sum(float(s) for s in sizes)

    def get(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()

    def post(self, path: str, body: dict, timeout: float = 600) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
