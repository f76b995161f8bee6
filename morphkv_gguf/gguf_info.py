"""Model shapes from GGUF metadata, and the KV memory a context needs with and without a budget.

Figures follow our patched llama.cpp (``llama-kv-budget.cpp``): a plain KV cache of ``length``
cells padded to 256, or, with a budget C, a cache of ``pad256(C + max(S, n_ubatch))`` cells
whatever the length, plus a per-layer F32 ring buffer of the last W post-RoPE queries.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .models import ModelError, check_gguf

# KV cache types llama.cpp offers (--cache-type-k/-v); sizes come from gguf.GGML_QUANT_SIZES
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
# what llama_kv_budget_configure accepts for type_k/type_v
BUDGET_CACHE_TYPES = KV_CACHE_TYPES  # every type llama.cpp caches: the eviction gathers quantized rows too

CELL_PAD = 256              # llama.cpp pads n_ctx (and the budget's cell count) to 256
DEFAULT_KV_WINDOW = 32      # llama_kv_budget_params defaults
MIN_EVICT_INTERVAL = 64     # the automatic interval's floor (and H2O's automatic interval)
DEFAULT_N_UBATCH = 512      # llama_context_default_params().n_ubatch

# What a budget does with every architecture llama.cpp knows, as our every-architecture test found it (a context
# with a budget on test-llama-archs' tiny model of each one: budgeted, or refused with llama.cpp's reason);
# regenerated with `build/tools-cpu/patched/bin/test-kv-budget-archs > morphkv_gguf/data/kv_budget_architectures.tsv`
# and kept fresh by tests/test_every_architecture.py
ARCHITECTURES_TABLE = "kv_budget_architectures.tsv"
BUDGET_ACCEPTED = ("supported: decoders with a plain or sliding-window (iSWA) KV cache and rotary or no positions, "
                   "such as llama, qwen2, mistral, gemma3; split mode layer or row")


@dataclass(frozen=True)
class ArchitectureVerdict:
    architecture: str
    config: str   # the fixture tested: dense or MoE
    verdict: str  # budget, refused, untested
    detail: str   # the budget's figures, llama.cpp's refusal, or why it was not tested


def read_architectures_table(text: str | None = None) -> dict[str, ArchitectureVerdict]:
    """The every-architecture table (the packaged one unless ``text`` is given), by architecture name."""
    if text is None:
        return dict(_packaged_table())
    table = {}
    for line in text.splitlines():
        if line.strip():
            arch, config, verdict, detail = line.split("\t", 3)
            table[arch] = ArchitectureVerdict(arch, config, verdict, detail)
    return table


@functools.lru_cache(maxsize=1)
def _packaged_table() -> dict[str, ArchitectureVerdict]:
    from importlib.resources import files

    return read_architectures_table((files("morphkv_gguf") / "data" / ARCHITECTURES_TABLE).read_text())


def architectures_markdown(table: dict[str, ArchitectureVerdict] | None = None) -> str:
    """The every-architecture table as markdown (docs/architectures.md): budgeted, then refused, then untested."""
    table = read_architectures_table() if table is None else table
    order = {"budget": 0, "refused": 1, "untested": 2}
    say = {"budget": "budgeted", "refused": "refused", "untested": "not tested"}
    lines = ["| architecture | fixture | with a budget | detail |", "|---|---|---|---|"]
    for r in sorted(table.values(), key=lambda r: (order.get(r.verdict, 3), r.architecture)):
        detail = _refusal_reason(r.detail) if r.verdict == "refused" else r.detail
        lines.append(f"| {r.architecture} | {r.config} | {say.get(r.verdict, r.verdict)} | {detail} |")
    return "\n".join(lines) + "\n"


def _refusal_reason(detail: str) -> str:
    """What llama.cpp's refusal says about the architecture, without the list of what is supported."""
    text = detail.split(" (supported: ")[0]
    for lead, say in ((", whose memory ", "its memory "), (", which uses ", "it uses ")):
        if lead in text:
            return say + text.split(lead, 1)[1]
    return text


@dataclass(frozen=True)
class ModelShape:
    """What decides a model's KV memory, read from a GGUF file's metadata."""

    path: str
    architecture: str
    name: str | None
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int              # the largest per-layer value if the file lists one per layer
    head_k: int
    head_v: int
    n_ctx_train: int | None
    n_vocab: int | None
    file_type: str | None       # e.g. "Q4_1", "F16"; None if the file does not say
    sliding_window: int | None  # the {arch}.attention.sliding_window key, if present
    is_mla: bool
    n_params: int               # sum of the tensors' element counts
    file_size: int
    n_head_kv_per_layer: tuple[int, ...] | None = None  # only when the file stores an array
    notes: tuple[str, ...] = field(default=())
    # iSWA models: per layer, whether llama.cpp gives it the sliding-window cache (None: no such layers known)
    swa_layers: tuple[bool, ...] | None = None

    @property
    def kv_heads_per_layer(self) -> tuple[int, ...]:
        return self.n_head_kv_per_layer or (self.n_head_kv,) * self.n_layer

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether llama.cpp gives it the sliding-window cache (all False for a plain cache)."""
        if self.swa_layers and self.sliding_window:
            return self.swa_layers
        return (False,) * self.n_layer

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_head_kv_per_layer"] = list(self.n_head_kv_per_layer) if self.n_head_kv_per_layer else None
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class KVMemoryPlan:
    """Bytes of K+V for a full cache of ``length`` tokens and, with a budget, for the fixed-size cache."""

    cache_type: str
    length: int
    bytes_per_token: int
    full_cells: int
    full_bytes: int
    swa_layers: int = 0      # iSWA: layers in the sliding-window cache of swa_cells cells (the rest: full_cells)
    swa_cells: int = 0
    kv_budget: int | None = None
    kv_window: int | None = None
    kv_evict_interval: int | None = None
    n_ubatch: int | None = None
    kv_keep: int = 0           # prompt tokens kept besides the budget (their cells are part of budget_cells)
    budget_cells: int | None = None
    budget_kv_bytes: int | None = None
    query_window_bytes: int | None = None  # F32 ring buffer of the last W queries, all layers

    @property
    def budget_total_bytes(self) -> int | None:
        if self.budget_kv_bytes is None or self.query_window_bytes is None:
            return None
        return self.budget_kv_bytes + self.query_window_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "budget_total_bytes": self.budget_total_bytes}


def _pad(n: int, to: int = CELL_PAD) -> int:
    return (n + to - 1) // to * to


def _field(reader: Any, key: str) -> Any:
    """A metadata value (a list for arrays), or None if the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def _array_len(reader: Any, key: str) -> int | None:
    f = reader.fields.get(key)
    return None if f is None else len(f.data)


def _file_type_name(value: int | None) -> str | None:
    if value is None:
        return None
    try:
        from gguf import LlamaFileType
        name = LlamaFileType(value).name
    except (ImportError, ValueError):
        return f"type {value}"
    return name.replace("MOSTLY_", "").replace("ALL_", "")


def _per_layer(value: Any, what: str, notes: list[str]) -> tuple[int, tuple[int, ...] | None]:
    """A hyperparameter that may be one number or one per layer: (the largest, the array or None)."""
    if isinstance(value, list):
        values = tuple(int(v) for v in value)
        if not values:
            raise ModelError(f"{what} is an empty array")
        if len(set(values)) > 1:
            notes.append(f"{what} differs per layer ({min(values)}..{max(values)}); the largest is shown")
        return max(values), values
    return int(value), None


def read_model_shape(path: str | os.PathLike) -> ModelShape:
    """Read a GGUF file's architecture and attention shape (metadata only; tensor data is not read)."""
    from gguf import GGUFReader

    path = check_gguf(Path(path))
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OSError) as e:
        raise ModelError(f"cannot read GGUF file {path}: {e}") from None

    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelError(f"GGUF file {path} has no general.architecture key (expected a model, "
                         f"e.g. 'llama'); is it a LoRA adapter or a vocabulary-only file?")

    def req(key: str) -> Any:
        value = _field(reader, key.format(arch=arch))
        if value is None:
            raise ModelError(f"GGUF file {path} (architecture {arch}) lacks the key {key.format(arch=arch)}")
        return value

    notes: list[str] = []
    n_layer = int(req("{arch}.block_count"))
    n_embd = int(req("{arch}.embedding_length"))
    n_head, _ = _per_layer(req("{arch}.attention.head_count"), "head_count", notes)
    kv = _field(reader, f"{arch}.attention.head_count_kv")
    if kv is None:
        n_head_kv, kv_per_layer = n_head, None  # llama.cpp's default: no grouped-query attention
    else:
        n_head_kv, kv_per_layer = _per_layer(kv, "head_count_kv", notes)
    if kv_per_layer is not None and len(kv_per_layer) != n_layer:
        raise ModelError(f"GGUF file {path}: head_count_kv has {len(kv_per_layer)} entries for {n_layer} layers")

    head_default = n_embd // n_head if n_head else 0
    head_k = int(_field(reader, f"{arch}.attention.key_length") or head_default)
    head_v = int(_field(reader, f"{arch}.attention.value_length") or head_default)

    n_vocab = _field(reader, f"{arch}.vocab_size")
    if n_vocab is None:
        n_vocab = _array_len(reader, "tokenizer.ggml.tokens")
    ctx = _field(reader, f"{arch}.context_length")
    swa = _field(reader, f"{arch}.attention.sliding_window")
    if isinstance(swa, list):  # a few converters write one value per layer
        swa = max(swa) if swa else None
    ftype = _field(reader, "general.file_type")

    shape = ModelShape(
        swa_layers=_swa_layers(reader, str(arch), n_layer, swa),
        path=str(path),
        architecture=str(arch),
        name=_field(reader, "general.name"),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_k=head_k,
        head_v=head_v,
        n_ctx_train=None if ctx is None else int(ctx),
        n_vocab=None if n_vocab is None else int(n_vocab),
        file_type=_file_type_name(None if ftype is None else int(ftype)),
        sliding_window=None if swa is None else int(swa),
        is_mla=f"{arch}.attention.kv_lora_rank" in reader.fields,
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        file_size=path.stat().st_size,
        n_head_kv_per_layer=kv_per_layer,
        notes=tuple(notes),
    )
    del reader  # releases the memory map
    return shape


def budget_support(shape: ModelShape) -> tuple[bool, str]:
    """Whether our patched llama.cpp runs this model with a KV budget, and why (or why not): the verdict of the
    every-architecture test for its architecture (llama.cpp decides the memory type by architecture), and
    whether the file makes every layer sliding-window (then llama.cpp bounds the cache without a budget)."""
    arch = shape.architecture
    row = read_architectures_table().get(arch)

    def no(why: str) -> tuple[bool, str]:
        return False, f"KV budgets are not supported for architecture {arch}: {why} ({BUDGET_ACCEPTED})"

    if row is None:
        return no("llama.cpp does not know it")
    if row.verdict == "refused":
        return no(_refusal_reason(row.detail))
    if row.verdict != "budget":
        return no(f"not covered by the every-architecture test ({row.detail})")
    n_swa = sum(shape.sliding_layers)
    if n_swa == shape.n_layer:
        return False, (f"a KV budget is not needed for this {arch} model: every layer uses sliding-window attention, "
                       f"whose cache llama.cpp already bounds")
    if n_swa:
        return True, (f"architecture {arch} uses llama.cpp's iSWA cache: the budget covers its "
                      f"{shape.n_layer - n_swa} full-attention layers, the sliding-window layers keep their bounded "
                      f"cache")
    return True, f"architecture {arch} runs under a budget in llama.cpp (every-architecture test: {row.detail})"


def _cache_quant_size(cache_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a KV cache type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if cache_type not in KV_CACHE_TYPES:
        raise ValueError(f"unknown cache type {cache_type!r} (accepted: {', '.join(KV_CACHE_TYPES)})")
    return GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]


def kv_bytes_per_token(shape: ModelShape, cache_type: str = "f16") -> int:
    """Bytes of K and V that one cell (token) takes in every layer: n_head_kv*(head_k+head_v) values per layer."""
    block, size = _cache_quant_size(cache_type)
    total = 0
    for n_kv in shape.kv_heads_per_layer:
        for head in (shape.head_k, shape.head_v):
            n = n_kv * head
            if n % block:
                raise ValueError(f"cache type {cache_type} stores blocks of {block} values; a row of "
                                 f"{n_kv} KV heads x {head} is not a multiple of it")
            total += n // block * size
    return total


def query_window_bytes(shape: ModelShape, kv_window: int = DEFAULT_KV_WINDOW) -> int:
    """The budget's ring buffer: F32 [head_k*n_head, W] per budgeted layer (with a KV cache, not sliding-window)."""
    layers = sum(1 for n_kv, is_swa in zip(shape.kv_heads_per_layer, shape.sliding_layers) if n_kv > 0 and not is_swa)
    return layers * shape.n_head * shape.head_k * kv_window * 4


def auto_evict_interval(kv_budget: int, n_ubatch: int = DEFAULT_N_UBATCH, policy: str = "morphkv") -> int:
    """The interval S llama.cpp uses when none is given (kv_evict_interval = 0 / None): C/8, at least 64
    and at most n_ubatch, so the cache (C + max(S, n_ubatch) cells) is no larger than with S = 64; 64 for
    H2O, whose query ring holds every query since the last eviction."""
    if policy == "h2o":
        return MIN_EVICT_INTERVAL
    return max(MIN_EVICT_INTERVAL, min(kv_budget // 8, n_ubatch))


def budget_cells(kv_budget: int, kv_evict_interval: int | None = None, n_ubatch: int = DEFAULT_N_UBATCH,
                 kv_keep: int = 0) -> int:
    """Cells the patched llama.cpp allocates for a budget C: after an eviction C (and up to kv_keep kept prompt
    tokens) are in use, and one more ubatch (prefill) or S tokens (decode) must fit; independent of n_ctx.
    S None: the automatic one."""
    if kv_evict_interval is None:
        kv_evict_interval = auto_evict_interval(kv_budget, n_ubatch)
    return _pad(kv_budget + kv_keep + max(kv_evict_interval, n_ubatch))


# llama.cpp's default layer patterns of iSWA architectures (load_swa_pattern(ml, n, dense_first) in their
# loaders), used when the file has no {arch}.attention.sliding_window_pattern
SWA_PATTERNS = {"gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
                "cohere2": (4, False), "gpt-oss": (2, False), "llama4": (4, False), "exaone4": (4, False)}


def _swa_layers(reader, arch: str, n_layer: int, swa) -> tuple[bool, ...] | None:
    """Per layer, whether it is a sliding-window layer (llama_hparams::set_swa_pattern), for the known iSWA archs."""
    if not swa:
        return None
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) >= n_layer:
        return tuple(bool(x) for x in pattern[:n_layer])
    n, dense_first = SWA_PATTERNS.get(arch, (None, False))
    if pattern is not None and not isinstance(pattern, list):
        n = int(pattern)
    if n is None:
        return None
    if dense_first:
        return tuple(n == 0 or il % n != 0 for il in range(n_layer))
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))


def plan_kv_memory(shape: ModelShape, length: int, *, cache_type: str = "f16", kv_budget: int | None = None,
                   kv_evict_interval: int | None = None, n_ubatch: int = DEFAULT_N_UBATCH,
                   kv_window: int = DEFAULT_KV_WINDOW, kv_keep: int = 0) -> KVMemoryPlan:
    """KV memory of a context of ``length`` tokens, and of a budget of ``kv_budget`` cells if given.

    Plain KV caches (see budget_support) and iSWA models, whose sliding-window layers hold at most the window plus
    one ubatch (the full-attention layers hold ``length``); per-token bytes are taken as equal across layers.
    """
    if length < 1:
        raise ValueError(f"length must be at least 1 token, got {length}")
    per_token = kv_bytes_per_token(shape, cache_type)
    full_cells = _pad(length)
    plan = KVMemoryPlan(cache_type=cache_type, length=length, bytes_per_token=per_token,
                        full_cells=full_cells, full_bytes=full_cells * per_token)
    n_swa = sum(shape.sliding_layers)
    if n_swa:
        # llama_kv_cache_iswa: the sliding-window layers hold min(length, n_swa + n_ubatch) cells (padded)
        swa_cells = _pad(min(length, shape.sliding_window + n_ubatch))
        per_layer = per_token / shape.n_layer
        plan = KVMemoryPlan(cache_type=cache_type, length=length, bytes_per_token=per_token, full_cells=full_cells,
                            full_bytes=int(per_layer * ((shape.n_layer - n_swa) * full_cells + n_swa * swa_cells)),
                            swa_layers=n_swa, swa_cells=swa_cells)
    if kv_budget is None:
        return plan
    # the same checks as llama_kv_budget_configure, so a plan never shows what the library refuses
    if cache_type not in BUDGET_CACHE_TYPES:
        raise ValueError(f"cache type {cache_type} cannot be used with a KV budget "
                         f"(accepted: {', '.join(BUDGET_CACHE_TYPES)})")
    if kv_window < 1:
        raise ValueError(f"kv_window must be at least 1, got {kv_window}")
    if kv_budget <= kv_window:
        raise ValueError(f"kv_budget ({kv_budget}) must be greater than kv_window ({kv_window}): "
                         f"the budget includes the protected recent window")
    if kv_evict_interval is not None and kv_evict_interval < 1:
        raise ValueError(f"kv_evict_interval must be at least 1 (or None: automatic), got {kv_evict_interval}")
    if n_ubatch < 1:
        raise ValueError(f"n_ubatch must be at least 1, got {n_ubatch}")
    if kv_keep < 0:
        raise ValueError(f"kv_keep must be at least 0 (prompt tokens kept besides the budget), got {kv_keep}")
    if kv_evict_interval is None:
        kv_evict_interval = auto_evict_interval(kv_budget, n_ubatch)
    cells = budget_cells(kv_budget, kv_evict_interval, n_ubatch, kv_keep)
    budget_bytes = cells * per_token
    if plan.swa_layers:  # the budget covers the full-attention layers; the sliding-window ones stay as planned
        per_layer = per_token / shape.n_layer
        budget_bytes = int(per_layer * ((shape.n_layer - plan.swa_layers) * cells + plan.swa_layers * plan.swa_cells))
    return KVMemoryPlan(**{**asdict(plan), "kv_budget": kv_budget, "kv_window": kv_window,
                           "kv_evict_interval": kv_evict_interval, "n_ubatch": n_ubatch, "kv_keep": kv_keep,
                           "budget_cells": cells, "budget_kv_bytes": budget_bytes,
                           "query_window_bytes": query_window_bytes(shape, kv_window)})
