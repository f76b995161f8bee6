"""Synthetic llama GGUF models for speed and memory benchmarks: real shapes, random meaningless weights.

The files load in stock and patched llama.cpp without downloading anything: architecture ``llama``,
a byte-level GPT-2 style vocabulary (bytes 0..255 as GPT-2's byte-to-unicode characters, a few
merges, filler tokens, BOS/EOS as control tokens).  Weights are written tensor by tensor in chunks
cut from a small random pool, so an 8B model takes about as long as the disk needs and little RAM.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ARCH = "llama"
DTYPES = ("f16", "q8_0", "q4_0")

# a pool of about a million random values; a tensor is a sequence of windows of it at random offsets,
# which costs no more CPU per byte than a memcpy.  Prime numbers of units, so rows do not repeat in step.
_POOL_UNITS = {"f16": 1_048_573, "q8_0": 32_771, "q4_0": 32_771}  # values, blocks, blocks
_CHUNK_BYTES = 8 << 20           # bytes per write
_WEIGHT_STD = 0.02               # like a freshly initialised transformer: activations stay finite

ProgressFn = Callable[[int, int, str], None]  # (bytes written, total bytes, tensor just written)


@dataclass(frozen=True)
class SynthShape:
    """Hyperparameters of a llama-architecture model."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    rope_freq_base: float = 10000.0
    tied_embeddings: bool = False  # True: no output.weight; llama.cpp reuses token_embd
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES: dict[str, SynthShape] = {
    "llama-3.1-8b": SynthShape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256,
                               n_ctx=131072, rope_freq_base=500000.0),
    "llama-3.2-1b": SynthShape(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=128256,
                               n_ctx=131072, rope_freq_base=500000.0, tied_embeddings=True),
    "tiny": SynthShape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512, n_ctx=4096),
    # multi-head attention (one KV head per query head), for tests of the budget without GQA
    "tiny-mha": SynthShape(n_layer=2, n_embd=256, n_head=4, n_head_kv=4, n_ff=512, n_vocab=512, n_ctx=4096),
}


@dataclass(frozen=True)
class SynthResult:
    path: Path
    shape_name: str
    dtype: str
    n_params: int
    file_size: int
    seconds: float


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, ne0)
    kind: str               # "norm" (F32 ones) or "weight" (the file's dtype)


def get_shape(shape_name: str) -> SynthShape:
    try:
        return SHAPES[shape_name]
    except KeyError:
        raise ValueError(f"unknown synthetic shape {shape_name!r} (accepted: {', '.join(SHAPES)})") from None


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown synthetic weight type {dtype!r} (accepted: {', '.join(DTYPES)})")


def _tensors(s: SynthShape) -> list[_Tensor]:
    """The tensors llama.cpp's llama loader requires, in numpy order (GGUF lists them reversed)."""
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    out = [_Tensor("token_embd.weight", (s.n_vocab, s.n_embd), "weight"),
           _Tensor("output_norm.weight", (s.n_embd,), "norm")]
    if not s.tied_embeddings:
        out.append(_Tensor("output.weight", (s.n_vocab, s.n_embd), "weight"))
    for i in range(s.n_layer):
        b = f"blk.{i}."
        out += [_Tensor(b + "attn_norm.weight", (s.n_embd,), "norm"),
                _Tensor(b + "attn_q.weight", (q, s.n_embd), "weight"),
                _Tensor(b + "attn_k.weight", (kv, s.n_embd), "weight"),
                _Tensor(b + "attn_v.weight", (kv, s.n_embd), "weight"),
                _Tensor(b + "attn_output.weight", (s.n_embd, q), "weight"),
                _Tensor(b + "ffn_norm.weight", (s.n_embd,), "norm"),
                _Tensor(b + "ffn_gate.weight", (s.n_ff, s.n_embd), "weight"),
                _Tensor(b + "ffn_up.weight", (s.n_ff, s.n_embd), "weight"),
                _Tensor(b + "ffn_down.weight", (s.n_embd, s.n_ff), "weight")]
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies store)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BOS_TEXT, EOS_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
# a few merges, so llama.cpp's BPE has ranks to apply; each result is in the vocabulary
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("r", "e"), ("o", "n"), ("e", "r"))


def synthetic_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str], int, int]:
    """(tokens, token types, merges, bos id, eos id) of a byte-level vocabulary of ``n_vocab`` unique tokens."""
    from gguf import TokenType

    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    tokens += [a + b for a, b in _MERGES]
    n_fill = n_vocab - len(tokens) - 2
    if n_fill < 0:
        raise ValueError(f"vocabulary of {n_vocab} is too small (at least {len(tokens) + 2})")
    tokens += [f"<tok_{i}>" for i in range(len(tokens), len(tokens) + n_fill)]
    tokens += [BOS_TEXT, EOS_TEXT]
    assert len(set(tokens)) == n_vocab  # llama.cpp asserts id_to_token.size() == token_to_id.size()
    types = [int(TokenType.NORMAL)] * (n_vocab - 2) + [int(TokenType.CONTROL)] * 2
    merges = [f"{a} {b}" for a, b in _MERGES]
    return tokens, types, merges, n_vocab - 2, n_vocab - 1


def _qtype(dtype: str):
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType[dtype.upper()]


def _weight_pool(dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, int, int, int]:
    """(pool bytes, bytes per unit, units in the pool, units per chunk); a unit is one F16 value or one
    quantised block.

    The pool repeats itself for one chunk beyond its end, so a window of up to a chunk starting at
    any unit of the first round is a contiguous slice.
    """
    n = _POOL_UNITS[dtype]
    if dtype == "f16":
        values = (rng.standard_normal(n, dtype=np.float32) * _WEIGHT_STD).astype(np.float16)
        units = values.view(np.uint8).reshape(n, 2)
    elif dtype == "q8_0":  # block: f16 scale d, 32 x int8; value = d * q
        d = 0.002
        q = np.clip(np.rint(rng.standard_normal((n, 32), dtype=np.float32) * (_WEIGHT_STD / d)), -127, 127)
        units = np.concatenate([np.full((n, 1), d, np.float16).view(np.uint8),
                                q.astype(np.int8).view(np.uint8)], axis=1)
    elif dtype == "q4_0":  # block: f16 scale d, 16 bytes of nibbles; value = d * (nibble - 8)
        d = 0.008
        nib = np.clip(np.rint(rng.standard_normal((n, 32), dtype=np.float32) * (_WEIGHT_STD / d)) + 8, 0, 15)
        nib = nib.astype(np.uint8)
        packed = nib[:, :16] | (nib[:, 16:] << 4)  # ggml's layout: x[j] low nibble, x[j+16] high nibble
        units = np.concatenate([np.full((n, 1), d, np.float16).view(np.uint8), packed], axis=1)
    else:
        raise AssertionError(dtype)
    unit_bytes = units.shape[1]
    chunk = max(1, _CHUNK_BYTES // unit_bytes)
    pool = np.tile(units, (-(-(n + chunk) // n), 1))[: n + chunk]
    return np.ascontiguousarray(pool).reshape(-1), unit_bytes, n, chunk


def _tensor_layout(t: _Tensor, dtype: str) -> tuple[tuple[int, ...], np.dtype, int, object | None]:
    """(shape for add_tensor_info, numpy dtype, bytes, raw ggml type or None)."""
    from gguf import GGML_QUANT_SIZES

    if t.kind == "norm":
        return t.shape, np.dtype(np.float32), int(np.prod(t.shape)) * 4, None
    if dtype == "f16":
        return t.shape, np.dtype(np.float16), int(np.prod(t.shape)) * 2, None
    qtype = _qtype(dtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rows, ne0 = t.shape
    if ne0 % block:
        raise ValueError(f"{t.name}: rows of {ne0} values are not a multiple of the {dtype} block ({block})")
    # quantised tensors are given as bytes [rows, bytes per row]; gguf-py converts the shape back
    return (rows, ne0 // block * size), np.dtype(np.uint8), rows * (ne0 // block) * size, qtype


def _file_type(dtype: str) -> int:
    from gguf import LlamaFileType
    return int({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                "q4_0": LlamaFileType.MOSTLY_Q4_0}[dtype])


def synthetic_n_params(shape_name: str) -> int:
    """Parameters of a synthetic model (element counts of all its tensors)."""
    return sum(int(np.prod(t.shape)) for t in _tensors(get_shape(shape_name)))


def synthetic_size(shape_name: str, dtype: str = "f16") -> int:
    """Bytes of tensor data the file will hold (the metadata adds a few MB at most)."""
    _check_dtype(dtype)
    return sum(_tensor_layout(t, dtype)[2] for t in _tensors(get_shape(shape_name)))


def check_output(path: Path, n_bytes: int, overwrite: bool = False) -> None:
    """Raise OSError (FileExistsError, ...) saying why ``path`` cannot take a file of ``n_bytes``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a .gguf file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"directory {parent} does not exist (create it first)")
    free = shutil.disk_usage(parent).free
    if free < n_bytes + (64 << 20):  # the metadata and some slack
        raise OSError(f"not enough disk space in {parent}: the model needs {n_bytes / 2**30:.2f} GiB, "
                      f"{free / 2**30:.2f} GiB free")


def write_synthetic_gguf(path: str | os.PathLike, shape_name: str, dtype: str = "f16", seed: int = 0,
                         progress: ProgressFn | None = None, overwrite: bool = False) -> SynthResult:
    """Write a llama GGUF with ``SHAPES[shape_name]`` and random weights of type ``dtype``.

    Written to ``<path>.partial`` and renamed when complete, so an interrupted write leaves no
    half-written model behind.  Raises FileExistsError unless ``overwrite``, ValueError for an
    unknown shape or type, OSError if the disk lacks room.
    """
    from gguf import GGML_QUANT_VERSION, GGUFWriter

    s = get_shape(shape_name)
    _check_dtype(dtype)
    path = Path(path)
    tensors = _tensors(s)
    layouts = [_tensor_layout(t, dtype) for t in tensors]
    total = sum(nbytes for _, _, nbytes, _ in layouts)
    check_output(path, total, overwrite=overwrite)

    t0 = time.monotonic()
    tmp = path.with_name(path.name + ".partial")
    w = GGUFWriter(tmp, ARCH)
    try:
        w.add_name(f"morphkv synthetic {shape_name}")
        w.add_description("random weights for speed and memory benchmarks; the output is meaningless")
        w.add_context_length(s.n_ctx)
        w.add_embedding_length(s.n_embd)
        w.add_feed_forward_length(s.n_ff)
        w.add_block_count(s.n_layer)
        w.add_head_count(s.n_head)
        w.add_head_count_kv(s.n_head_kv)
        w.add_layer_norm_rms_eps(s.rms_eps)
        w.add_rope_freq_base(s.rope_freq_base)
        w.add_rope_dimension_count(s.head_dim)  # llama.cpp requires n_rot == head size for llama
        w.add_vocab_size(s.n_vocab)
        w.add_file_type(_file_type(dtype))
        w.add_quantization_version(GGML_QUANT_VERSION)

        tokens, types, merges, bos, eos = synthetic_vocab(s.n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")  # llama.cpp knows it; no pre-tokenizer hash check at load time
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)      # required for gpt2 (and must be non-empty: empty arrays are dropped)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.add_add_bos_token(True)

        for t, (shape, np_dtype, nbytes, raw) in zip(tensors, layouts):
            w.add_tensor_info(t.name, shape, np_dtype, nbytes, raw_dtype=raw)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_data(w, tensors, layouts, dtype, seed, total, progress)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    w.close()
    os.replace(tmp, path)
    return SynthResult(path=path, shape_name=shape_name, dtype=dtype, n_params=synthetic_n_params(shape_name),
                       file_size=path.stat().st_size, seconds=time.monotonic() - t0)


def _write_data(w, tensors: list[_Tensor], layouts: list, dtype: str, seed: int, total: int,
                progress: ProgressFn | None) -> None:
    """Stream the tensor data after the tensor infos, in their order and with GGUF's alignment.

    GGUFWriter.write_tensor_data wants each tensor as one array (1 GiB for an 8B model's embedding);
    writing the same bytes in chunks to its open file keeps memory at the pool's size.
    """
    rng = np.random.default_rng(seed)
    pool, unit_bytes, pool_units, chunk_units = _weight_pool(dtype, rng)
    ones = np.ones(max(t.shape[0] for t in tensors if t.kind == "norm"), np.float32)
    fout = w.fout[0]
    done = 0
    for t, (_, _, nbytes, _) in zip(tensors, layouts):
        w.write_padding(fout, fout.tell())
        if t.kind == "norm":
            ones[: t.shape[0]].tofile(fout)
        else:
            left = nbytes // unit_bytes
            while left:
                n = min(left, chunk_units)
                start = int(rng.integers(pool_units)) * unit_bytes
                fout.write(memoryview(pool[start: start + n * unit_bytes]))
                left -= n
        w.write_padding(fout, nbytes)
        done += nbytes
        if progress is not None:
            progress(done, total, t.name)
    fout.flush()
