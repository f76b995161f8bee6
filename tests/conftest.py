from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

from morphkv_gguf.build import tool_path
from morphkv_gguf.models import default_model_path

DATA = Path(__file__).parent / "data"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def require_tools(*names: str, trees: tuple[str, ...] = ("patched", "stock")) -> dict[tuple[str, str], Path]:
    """Paths of tools from the trees; skip if not built, unless MORPHKV_REQUIRE_TOOLS=1 (CI)."""
    found = {}
    missing = []
    for name in names:
        for tree in trees:
            path = tool_path(name, tree)
            if path.exists():
                found[(name, tree)] = path
            else:
                missing.append(str(path))
    if missing:
        msg = "llama.cpp tools not built (scripts/setup.sh --tools): " + ", ".join(missing)
        if os.environ.get("MORPHKV_REQUIRE_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (the scripts are not a package), for testing its functions."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model(model_path):
    """The default model loaded through the C API (MORPHKV_TEST_GPU_LAYERS=99: its layers and caches on the GPU)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = int(os.environ.get("MORPHKV_TEST_GPU_LAYERS", "0"))
    m = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    assert m
    yield m
    llama_cpp.llama_model_free(m)


def decode_rows(ctx, rows: list[tuple[int, int, int]], outputs: set[int] = frozenset()) -> None:
    """Decode (seq, pos, token) rows in one llama_decode call; rows whose index is in ``outputs`` get logits."""
    import llama_cpp

    batch = llama_cpp.llama_batch_init(len(rows), 0, 1)
    try:
        batch.n_tokens = len(rows)
        for i, (seq, pos, tok) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, i in outputs
            batch.seq_id[i][0] = seq
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
