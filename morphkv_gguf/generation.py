"""One generation with the rebuilt llama-cpp-python, with timings (``morphkv generate``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from .models import resolve_model


def load_llama(model: str | os.PathLike | None = None, *, n_ctx: int | None = None, seed: int = 1234,
               n_threads: int | None = None, verbose: bool = False, **kwargs):
    """A ``llama_cpp.Llama`` on ``model`` (default model when None).

    ``n_ctx=None`` means 2048 without a budget and the model's trained context with ``kv_budget``
    (the budget bounds the memory; n_ctx only bounds the positions).
    """
    from llama_cpp import Llama

    path = resolve_model(model)
    if n_ctx is None:
        n_ctx = 0 if kwargs.get("kv_budget") else 2048
    return Llama(model_path=str(path), n_ctx=n_ctx, seed=seed, n_threads=n_threads,
                 verbose=verbose, **kwargs)


def memory_report(llm) -> dict:
    """The KV cache as llama.cpp reports it: allocation, cells in use, evictions (``kv_budget_info``)."""
    info = llm.kv_budget_info()
    bytes_per_cell = info["kv_bytes"] / info["n_cells"] if info["n_cells"] else 0.0
    return {
        "budget_active": bool(info["active"]),
        "kv_bytes": int(info["kv_bytes"]),
        "aux_bytes": int(info["aux_bytes"]),
        "n_cells": int(info["n_cells"]),
        "n_used": int(info["n_used"]),
        "n_evictions": int(info["n_evictions"]),
        "evict_interval": int(info["kv_evict_interval"]),  # the one in use (the automatic one by default)
        "evict_ms": round(float(info["t_evict_ms"]), 3),
        "n_kept": int(info["n_kept"]),  # prompt tokens kept besides the budget (kv_keep)
        # what a full cache would hold for the same tokens, for comparison
        "full_cache_bytes_for_tokens": int(round(bytes_per_cell * llm.n_tokens)),
        "n_tokens": int(llm.n_tokens),
    }


def eos_mask(llm):
    """A logits processor that forbids end-of-sequence (llama.cpp's --ignore-eos)."""
    from llama_cpp import LogitsProcessorList
    import numpy as np

    eos = llm.token_eos()

    def no_eos(_ids, scores):
        scores[eos] = -np.inf
        return scores

    return LogitsProcessorList([no_eos])


def stream_chat(llm, messages: list[dict], *, max_tokens: int, temperature: float, seed: int,
                ignore_eos: bool = False, repeat_penalty: float = 1.0,
                on_text: Callable[[str], None] | None = None) -> tuple[str, str | None, int]:
    """Stream one chat answer: (text, finish_reason, chunks)."""
    pieces: list[str] = []
    finish_reason = None
    n_chunks = 0
    stream = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature,
                                        seed=seed, stream=True, repeat_penalty=repeat_penalty,
                                        logits_processor=eos_mask(llm) if ignore_eos else None)
    for chunk in stream:
        choice = chunk["choices"][0]
        text = choice["delta"].get("content") or ""
        finish_reason = choice.get("finish_reason") or finish_reason
        if text:
            n_chunks += 1
            pieces.append(text)
            if on_text:
                on_text(text)
    return "".join(pieces), finish_reason, n_chunks


def generate_text(prompt: str, *, model: str | os.PathLike | None = None, max_tokens: int = 128,
                  n_ctx: int | None = None, temperature: float = 0.0, seed: int = 1234,
                  n_threads: int | None = None, chat: bool | None = None, ignore_eos: bool = False,
                  repeat_penalty: float = 1.0, kv: dict | None = None, on_text: Callable[[str], None] | None = None) -> dict:
    """Generate one answer (streamed to ``on_text``) and return an OpenAI-style summary dict.

    ``kv``: the ``Llama`` kv_* keyword arguments (``kv_budget`` None or absent = the full cache).
    ``chat``: apply the model's chat template; None: when it has one (a base model continues the prompt as text).
    """
    kv = {k: v for k, v in (kv or {}).items() if v is not None}  # kv_* and batch sizes for Llama
    load_start = time.perf_counter()
    llm = load_llama(model, n_ctx=n_ctx, seed=seed, n_threads=n_threads, **kv)
    load_s = time.perf_counter() - load_start

    start = time.perf_counter()
    first_token_s = None
    pieces: list[str] = []
    n_chunks = 0  # llama-cpp-python streams one chunk per sampled token
    finish_reason = None

    def on_piece(text: str) -> None:
        nonlocal first_token_s
        first_token_s = first_token_s or time.perf_counter() - start
        if on_text:
            on_text(text)

    if chat is None:
        chat = bool(llm.metadata.get("tokenizer.chat_template"))
    if chat:
        text, finish_reason, n_chunks = stream_chat(
            llm, [{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=temperature,
            seed=seed, ignore_eos=ignore_eos, repeat_penalty=repeat_penalty, on_text=on_piece)
        pieces.append(text)
    else:
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                           seed=seed, stream=True, repeat_penalty=repeat_penalty,
                                           logits_processor=eos_mask(llm) if ignore_eos else None):
            choice = chunk["choices"][0]
            text = choice["text"]
            finish_reason = choice.get("finish_reason") or finish_reason
            if text:
                n_chunks += 1
                pieces.append(text)
                on_piece(text)
    total_s = time.perf_counter() - start

    # llama.cpp's own counters: prompt evaluation and generation, separately
    import llama_cpp.llama_cpp as native

    data = native.llama_perf_context(llm._ctx.ctx)
    prompt_tokens = int(data.n_p_eval)
    completion_tokens = n_chunks
    eval_s = data.t_eval_ms / 1000.0  # decode time of the n_eval single-token steps
    return {
        "model": str(Path(llm.model_path)),
        "text": "".join(pieces),
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "timings": {
            "load_s": round(load_s, 3),
            "prompt_eval_s": round(data.t_p_eval_ms / 1000.0, 3),
            "first_token_s": round(first_token_s or 0.0, 3),
            "generate_s": round(total_s, 3),
            "tokens_per_s": round(data.n_eval / eval_s, 2) if eval_s > 0 else 0.0,
        },
        "kv_settings": kv,
        "memory": memory_report(llm),
    }
