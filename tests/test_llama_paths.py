"""llama-cpp-python paths past the physical cache with ``Llama(kv_budget=...)`` (patch 0007):
chat completion, streaming, prefix reuse after evictions, save/load, logits_all, the server."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import Llama, LogitsProcessorList

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the ships she counts."}]


def _llm(model_path, **kwargs) -> Llama:
    kwargs.setdefault("n_threads", 2)
    return Llama(model_path=str(model_path), seed=7, verbose=False, **kwargs)


def _no_eos(llm: Llama) -> LogitsProcessorList:
    eos = llm.token_eos()

    def mask(_ids, scores):
        scores[eos] = -np.inf
        return scores

    return LogitsProcessorList([mask])


@pytest.mark.slow
def test_chat_completion_2000_tokens_at_a_fixed_kv_buffer(model_path):
    llm = _llm(model_path, kv_budget=128)
    first = llm.kv_budget_info()
    assert first["active"] and llm.n_ctx() == 8192  # n_ctx defaults to the trained context with a budget
    sizes, used = set(), []
    n = 0
    for chunk in llm.create_chat_completion(STORY, max_tokens=2000, temperature=0.0, stream=True,
                                            logits_processor=_no_eos(llm)):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            info = llm.kv_budget_info()
            sizes.add((info["n_cells"], info["kv_bytes"]))
            used.append(info["n_used"])
    assert n == 2000
    assert sizes == {(first["n_cells"], first["kv_bytes"])}
    assert max(used) <= 128 + 64
    assert llm.kv_budget_info()["n_evictions"] >= 2000 // 64 - 2
    # the token buffer grew with use: it was not allocated for n_ctx
    assert llm.n_tokens > first["n_cells"]


def test_stream_equals_non_stream(model_path):
    kwargs = dict(max_tokens=300, temperature=0.8, top_p=0.95, seed=11)
    llm = _llm(model_path, kv_budget=64, kv_window=16, kv_evict_interval=16)
    whole = llm.create_chat_completion(STORY, logits_processor=_no_eos(llm), **kwargs)
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in llm.create_chat_completion(STORY, stream=True, logits_processor=_no_eos(llm), **kwargs))
    assert llm.kv_budget_info()["n_evictions"] > 0
    assert streamed == whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] == 300


def _greedy_continue(llm: Llama, tokens: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(tokens, temp=0.0, top_k=1, logits_processor=_no_eos(llm), reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("policy", ["morphkv", "h2o"])
def test_save_load_continue_is_identical(model_path, policy):
    llm = _llm(model_path, kv_budget=96, kv_window=16, kv_evict_interval=32, kv_policy=policy)
    prompt = llm.tokenize(b"The history of the lighthouse begins")
    _greedy_continue(llm, prompt, 260)
    assert llm.kv_budget_info()["n_evictions"] >= 3
    tokens = llm._input_ids.tolist()
    state = llm.save_state()

    continued = _greedy_continue(llm, tokens, 120)
    assert llm.kv_budget_info()["n_evictions"] >= 6

    llm.load_state(state)
    restored = _greedy_continue(llm, tokens, 120)
    assert restored == continued

    # into a fresh context of the same configuration as well
    other = _llm(model_path, kv_budget=96, kv_window=16, kv_evict_interval=32, kv_policy=policy)
    other.load_state(state)
    assert _greedy_continue(other, tokens, 120) == continued


def test_budgeted_state_is_refused_by_a_context_without_budget(model_path):
    llm = _llm(model_path, kv_budget=64, kv_window=16, kv_evict_interval=16)
    _greedy_continue(llm, llm.tokenize(b"Once upon a time"), 100)
    state = llm.save_state()
    plain = _llm(model_path, n_ctx=512, flash_attn=True)
    with pytest.raises(RuntimeError):
        plain.load_state(state)


def test_prefix_before_the_last_eviction_is_not_reused(model_path):
    """A new prompt that shares only an evicted-from prefix is evaluated from scratch."""
    kwargs = dict(kv_budget=64, kv_window=16, kv_evict_interval=16)
    llm = _llm(model_path, **kwargs)
    _greedy_continue(llm, llm.tokenize(b"A report on the harbour's traffic in the year of the storm"), 200)
    assert llm.kv_budget_info()["pos_last_evict"] > 10
    second = llm.tokenize(b"A report on the harbour's old lighthouse and its keepers")
    reused = _greedy_continue(llm, second, 80)
    fresh = _greedy_continue(_llm(model_path, **kwargs), second, 80)
    assert reused == fresh


def test_continuing_the_same_sequence_reuses_the_cache(model_path):
    llm = _llm(model_path, kv_budget=64, kv_window=16, kv_evict_interval=16)
    _greedy_continue(llm, llm.tokenize(b"Dear Ada, the ships came in late"), 150)
    evictions = llm.kv_budget_info()["n_evictions"]
    tokens = llm._input_ids.tolist()
    more = tokens + llm.tokenize(b" and then", add_bos=False)
    _greedy_continue(llm, more, 5)
    info = llm.kv_budget_info()
    # nothing was re-evaluated: no eviction beyond what the few new tokens need
    assert info["n_evictions"] - evictions <= 1
    assert llm.n_tokens == len(more) + 4


def test_logits_all_grows_past_the_cache(model_path):
    llm = _llm(model_path, kv_budget=64, kv_window=16, kv_evict_interval=16, logits_all=True)
    assert len(llm.input_ids) < llm.n_ctx()  # not allocated for n_ctx
    tokens = (llm.tokenize(b"The keeper wrote in her ledger every night. ") * 200)[:1500]
    llm.eval(tokens)
    assert llm.n_tokens == 1500 and len(llm.input_ids) >= 1500
    scores = llm.scores[: llm.n_tokens]
    assert scores.shape == (1500, llm.n_vocab()) and np.isfinite(scores).all()
    # the first positions, before any eviction, match the full cache
    full = _llm(model_path, n_ctx=2048, flash_attn=True, logits_all=True)
    full.eval(tokens[:64])
    np.testing.assert_allclose(scores[:64], full.scores[:64], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_policy="lru"), "kv_policy"),
    (dict(kv_policy=3), "kv_policy"),
])
def test_bad_policy_is_a_value_error(model_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _llm(model_path, kv_budget=64, **kwargs)


@pytest.mark.slow
def test_server_answers_a_chat_past_the_cache(model_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    app = create_app(server_settings=ServerSettings(),
                     model_settings=[ModelSettings(model=str(model_path), kv_budget=64, kv_window=16,
                                                   kv_evict_interval=16, n_ctx=1024, n_threads=2, verbose=False)])
    client = TestClient(app)
    eos = Llama(model_path=str(model_path), vocab_only=True, verbose=False).token_eos()
    resp = client.post("/v1/chat/completions", json={
        "messages": STORY, "max_tokens": 300, "temperature": 0.0, "logit_bias": {str(eos): -100},
    })
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["usage"]["completion_tokens"] == 300  # answer longer than the 64 + 16 cells kept
    assert body["choices"][0]["message"]["content"]
