"""One generation with the rebuilt llama-cpp-python, with timings (``morphkv generate``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from .models import resolve_model


def load_llama(model: str | os.PathLike | None = None, *, n_ctx: int = 2048, seed: int = 1234,
               n_threads: int | None = None, verbose: bool = False, **kwargs):
    """A ``llama_cpp.Llama`` on ``model`` (default model when None)."""
    from llama_cpp import Llama

    path = resolve_model(model)
    return Llama(model_path=str(path), n_ctx=n_ctx, seed=seed, n_threads=n_threads,
                 verbose=verbose, **kwargs)


def generate_text(prompt: str, *, model: str | os.PathLike | None = None, max_tokens: int = 128,
                  n_ctx: int = 2048, temperature: float = 0.0, seed: int = 1234,
                  n_threads: int | None = None, chat: bool = True,
                  on_text: Callable[[str], None] | None = None) -> dict:
    """Generate one answer (streamed to ``on_text``) and return an OpenAI-style summary dict."""
    load_start = time.perf_counter()
    llm = load_llama(model, n_ctx=n_ctx, seed=seed, n_threads=n_threads)
    load_s = time.perf_counter() - load_start

    start = time.perf_counter()
    first_token_s = None
    pieces: list[str] = []
    n_chunks = 0  # llama-cpp-python streams one chunk per sampled token
    finish_reason = None
    if chat:
        stream = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=temperature,
                                            seed=seed, stream=True)
        for chunk in stream:
            choice = chunk["choices"][0]
            text = choice["delta"].get("content") or ""
            finish_reason = choice.get("finish_reason") or finish_reason
            if text:
                n_chunks += 1
                first_token_s = first_token_s or time.perf_counter() - start
                pieces.append(text)
                if on_text:
                    on_text(text)
    else:
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                           seed=seed, stream=True):
            choice = chunk["choices"][0]
            text = choice["text"]
            finish_reason = choice.get("finish_reason") or finish_reason
            if text:
                n_chunks += 1
                first_token_s = first_token_s or time.perf_counter() - start
                pieces.append(text)
                if on_text:
                    on_text(text)
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
    }
