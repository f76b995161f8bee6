"""morphkv-gguf: constant-memory KV caches (MorphKV) for GGUF models in llama.cpp.

The package holds the tooling around our patched llama.cpp: fetching and patching the pinned
upstream source, building the llama-cpp-python wheel and the comparison tools, model lookup,
and the ``morphkv`` command line.  Importing it never imports ``llama_cpp``.
"""

__version__ = "0.1.0"

# Version string of the patch set; patch 0004 defines the same value as LLAMA_MORPHKV_VERSION
# in llama.h, and the rebuilt wheel is versioned ``0.3.36+morphkv.<this>``.
MORPHKV_VERSION = __version__
