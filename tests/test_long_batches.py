"""A budgeted cache decodes a batch of any length in one llama_decode call: the evictions run between its
ubatches, and every output index of the batch is the batch's own (llama-server asks for them by index)."""

from __future__ import annotations

import numpy as np
import pytest
import llama_cpp

from conftest import decode_rows, require_tools
from llama_server import LlamaServer

N_UBATCH = 256


def _context(model, **overrides):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 4096
    params.n_batch = 4096
    params.n_ubatch = N_UBATCH
    params.n_threads = params.n_threads_batch = 2
    params.kv_budget = 128
    for key, value in overrides.items():
        setattr(params, key, value)
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx, "context creation failed"
    return ctx


def _decode(ctx, tokens: list[int], start: int, wanted: set[int]) -> dict[int, np.ndarray]:
    """Decode tokens (positions start..) in one call; return the logits of the wanted positions."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx)))
    outputs = {i for i in range(len(tokens)) if start + i in wanted}
    decode_rows(ctx, [(0, start + i, tok) for i, tok in enumerate(tokens)], outputs)
    out = {}
    for i in sorted(outputs):
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        assert ptr, f"no logits for batch index {i}"
        out[start + i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
    return out


def _evictions(ctx) -> int:
    info = llama_cpp.llama_kv_budget_info()
    assert llama_cpp.llama_kv_budget_get_info(ctx, info)
    return info.n_evictions


@pytest.fixture(scope="module")
def long_tokens(model, data_dir) -> list[int]:
    text = (data_dir / "sample.txt").read_text() * 2
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = (llama_cpp.llama_token * 8192)()
    n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 8192, True, False)
    assert n > 1100, n
    return list(buf[:1100])


def test_one_call_equals_ubatch_sized_calls_at_every_output(model, long_tokens):
    """One decode of 1100 tokens (5 ubatches, evictions between them) gives the same logits, at outputs in every
    ubatch, as feeding the same tokens one ubatch per decode call (the evictions then run between the calls)."""
    wanted = {10, 255, 256, 600, 900, 1099}
    whole_ctx, piece_ctx = _context(model), _context(model)
    try:
        whole = _decode(whole_ctx, long_tokens, 0, wanted)
        pieces = {}
        for i0 in range(0, len(long_tokens), N_UBATCH):
            pieces.update(_decode(piece_ctx, long_tokens[i0:i0 + N_UBATCH], i0, wanted))
        assert _evictions(whole_ctx) == _evictions(piece_ctx) > 0
        assert sorted(whole) == sorted(pieces) == sorted(wanted)
        for pos in sorted(wanted):
            np.testing.assert_allclose(whole[pos], pieces[pos], rtol=1e-4, atol=1e-4, err_msg=f"position {pos}")
    finally:
        llama_cpp.llama_free(whole_ctx)
        llama_cpp.llama_free(piece_ctx)


def test_outputs_before_the_first_eviction_equal_the_full_cache(model, long_tokens):
    """Position 200 is computed before any eviction: its logits are the full cache's, read by its own index."""
    budget_ctx, full_ctx = _context(model), _context(model, kv_budget=0)
    try:
        a = _decode(budget_ctx, long_tokens, 0, {200, 1099})
        b = _decode(full_ctx, long_tokens, 0, {200, 1099})
        np.testing.assert_allclose(a[200], b[200], rtol=1e-4, atol=1e-4)
        assert _evictions(budget_ctx) > 0
    finally:
        llama_cpp.llama_free(budget_ctx)
        llama_cpp.llama_free(full_ctx)


def test_llama_server_answers_a_prompt_longer_than_a_ubatch(model_path, data_dir, tmp_path):
    """llama-server with a budget: a ~1000-token prompt (several ubatches, evictions between them) is answered,
    again and edited, and the server is still serving afterwards."""
    server = require_tools("llama-server")[("llama-server", "patched")]
    args = ["-c", "8192", "-np", "1", "--kv-budget", "128", "-t", "2", "-ub", "256", "--no-warmup"]
    with LlamaServer(server, model_path, tmp_path / "server.log", args) as srv:
        prompt = ((data_dir / "sample.txt").read_text() * 2)[:5000]
        # the same prompt again (its cached prefix reused), then one edited near its start and one near its end:
        # a budgeted cache keeps a prefix only up to its last eviction, otherwise the prompt is evaluated again
        edited_start = "Summary of the log. " + prompt[40:]
        edited_end = prompt[:-60] + " The end."
        for text in (prompt, prompt, edited_start, edited_end):
            out = srv.post("/completion", {"prompt": text, "n_predict": 16, "temperature": 0})
            assert out["tokens_evaluated"] > 600 and out["tokens_predicted"] == 16, out
            assert out["content"].strip()
        assert srv.alive(), "the server stopped"
        props = srv.get("/props")
        assert props["kv_budget"]["kv_budget"] == 128 and props["kv_budget"]["kv_policy"] == "morphkv"
        slot = srv.get("/slots")[0]
        assert slot["kv_budget"]["n_evictions"] > 0 and slot["kv_budget"]["n_used"] <= 128 + 256
