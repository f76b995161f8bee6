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


def require_tools(*names: str) -> dict[tuple[str, str], Path]:
    """Paths of tools from both trees; skip if not built, unless MORPHKV_REQUIRE_TOOLS=1 (CI)."""
    found = {}
    missing = []
    for name in names:
        for tree in ("patched", "stock"):
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
