"""A budget across machines: llama.cpp's RPC backend spreads the layers over two rpc-server processes (CPU backends,
on 127.0.0.1 here, as on two hosts); with --kv-budget every server holds the budgeted cache of its layers, evictions
run there, and the answer equals the same run on the local CPU (temperature 0)."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest

from conftest import require_tools

PROMPT = "Write a long story about a lighthouse keeper who records every passing ship in a ledger."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def rpc_servers(exe, n: int):
    """n ggml-rpc-server processes on 127.0.0.1, each with a CPU backend and one thread; yields their host:port."""
    procs, endpoints = [], []
    try:
        for _ in range(n):
            port = _free_port()
            procs.append(subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoints.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for ep, proc in zip(endpoints, procs):
            host, port = ep.split(":")
            while True:
                assert proc.poll() is None, f"rpc-server on {ep} exited with {proc.returncode}"
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"rpc-server on {ep} did not start"
                    time.sleep(0.2)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _completion(tool, model_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(tool), "-m", str(model_path), "-p", PROMPT, "-n", "400", "--ignore-eos", "-c", "2048", "--temp", "0",
           "-no-cnv", "-t", "2", "--simple-io", "--no-warmup", "-v", "--kv-budget", "128", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_budget_over_two_rpc_servers_answers_as_the_local_cpu(model_path):
    tools = require_tools("llama-completion", "ggml-rpc-server", trees=("patched",))
    completion, server = tools[("llama-completion", "patched")], tools[("ggml-rpc-server", "patched")]
    local = _completion(completion, model_path, "-ngl", "0")
    with rpc_servers(server, 2) as endpoints:
        remote = _completion(completion, model_path, "--rpc", ",".join(endpoints), "-ngl", "99")

    # the layers, and the budgeted cache of each, are spread over both servers
    for ep in endpoints:
        assert re.search(rf"RPC\d*\[{re.escape(ep)}\] model buffer size =\s+[1-9]", remote.stderr), ep
        assert re.search(rf"RPC\d*\[{re.escape(ep)}\] KV buffer size =\s+[1-9]", remote.stderr), ep
    evictions = re.findall(r"budget_evict: eviction (\d+): (\d+) -> (\d+) cells", remote.stderr)
    assert len(evictions) >= 3 and all(int(after) == 128 for _, _, after in evictions)
    assert len(evictions) == len(re.findall(r"budget_evict: eviction (\d+):", local.stderr))
    assert remote.stdout == local.stdout
