import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# a parent that runs one task in a pool set up as `morphkv eval --jobs N` sets up its workers
PARENT = """
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time

from morphkv_gguf.workers import worker_init


def work(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


if __name__ == "__main__":
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=worker_init) as pool:
        pool.submit(work, sys.argv[1])
        time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_an_eval_worker_ends_when_its_parent_is_killed(tmp_path):
    """SIGKILL runs no clean-up in the parent: the worker still ends (the kernel signals it)."""
    script, pid_file = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(PARENT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], env=env)
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        os.kill(worker, 0)  # it runs
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its killed parent")
