"""What the loaded llama-cpp-python is: our patched build or not, CPU or CUDA."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import MORPHKV_VERSION


class NotPatchedError(RuntimeError):
    pass


@dataclass
class BuildInfo:
    llama_cpp_python_version: str
    library_path: str
    morphkv_native_version: str | None
    patched: bool
    gpu_offload: bool
    backends: list[str]
    system_info: str

    def as_dict(self) -> dict:
        return asdict(self)


def build_info() -> BuildInfo:
    """Describe the ``llama_cpp`` that Python imports (loads the native library)."""
    import llama_cpp
    import llama_cpp.llama_cpp as native

    native_version = None
    if hasattr(native, "llama_morphkv_version"):
        native_version = native.llama_morphkv_version().decode()
    system_info = native.llama_print_system_info().decode()
    backends = []
    for part in system_info.split("|"):
        if " : " in part:
            backends.append(part.split(" : ", 1)[0].strip())
    lib = getattr(native, "_lib", None)
    return BuildInfo(
        llama_cpp_python_version=llama_cpp.__version__,
        library_path=str(getattr(lib, "_name", "?")),
        morphkv_native_version=native_version,
        patched=native_version == MORPHKV_VERSION,
        gpu_offload=bool(native.llama_supports_gpu_offload()),
        backends=backends,
        system_info=system_info.strip(),
    )


def require_patched() -> BuildInfo:
    info = build_info()
    if not info.patched:
        raise NotPatchedError(
            f"the imported llama_cpp ({info.llama_cpp_python_version}, {info.library_path}) is not the "
            f"morphkv-gguf build {MORPHKV_VERSION} (native marker: {info.morphkv_native_version}); "
            f"run scripts/setup.sh to build and install it")
    return info
