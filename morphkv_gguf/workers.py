"""Set-up of the processes ``morphkv eval --jobs N`` spawns (this module imports nothing heavy: a worker
imports llama_cpp before numpy, whose import first crashed a CUDA libllama's load on the GPU machine)."""

from __future__ import annotations

import importlib
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def worker_init() -> None:
    """A worker ends with the evaluation: on Linux the kernel sends it SIGTERM when its parent dies (even by SIGTERM
    or SIGKILL, which run no clean-up in the parent); then llama_cpp is imported."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: a worker then outlives a killed parent until its prompt is done
        if os.getppid() == 1:
            os._exit(1)  # the parent died before the worker got here
    importlib.import_module("llama_cpp")
