"""Budgets per sequence: with n_seq_max = N every sequence keeps its own constant-size cache (a stream of the
non-unified KV cache) with its own query window, composite cells and evictions. What a sequence keeps does not
depend on what the other sequences of the context do."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import llama_cpp

from conftest import decode_rows

BUDGET, WINDOW, INTERVAL = 64, 8, 16
N_SEQ = 4
N_UBATCH = 64  # a 4-sequence prompt batch is split into ubatches of 16 tokens per sequence
GPU_LAYERS = int(os.environ.get("MORPHKV_TEST_GPU_LAYERS", "0"))  # 99: the same checks on the GPU


def _context(model, n_seq: int, **overrides):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 1024 * n_seq
    params.n_batch = 1024
    params.n_ubatch = N_UBATCH
    params.n_seq_max = n_seq
    params.n_threads = params.n_threads_batch = 2
    params.kv_budget, params.kv_window, params.kv_evict_interval = BUDGET, WINDOW, INTERVAL
    for key, value in overrides.items():
        setattr(params, key, value)
    return llama_cpp.llama_init_from_model(model, params)


def _seq_info(ctx, seq: int) -> llama_cpp.llama_kv_budget_info:
    info = llama_cpp.llama_kv_budget_info()
    assert llama_cpp.llama_kv_budget_get_seq_info(ctx, seq, ctypes.byref(info))
    return info


def _positions(ctx, seq: int) -> list[np.ndarray]:
    """Per layer, the original positions every KV head keeps in the sequence's cache: [n_head_kv, n_cells]."""
    info = _seq_info(ctx, seq)
    out = []
    for il in range(info.n_layer):
        buf = (llama_cpp.llama_pos * (info.n_cells * info.n_head_kv))()
        n = llama_cpp.llama_kv_budget_get_seq_positions(ctx, seq, il, buf, len(buf))
        assert n > 0
        out.append(np.array(buf[:n]).reshape(-1, info.n_cells))
    return out


@pytest.fixture(scope="module")
def streams(model, data_dir) -> list[list[int]]:
    """N_SEQ different token streams of 300 tokens (different parts of the sample text)."""
    text = (data_dir / "sample.txt").read_text() * 3
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = (llama_cpp.llama_token * 16384)()
    n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, len(buf), True, False)
    tokens = list(buf[:n])
    assert len(tokens) >= 300 * N_SEQ + 200
    return [tokens[k * 317:k * 317 + 300] for k in range(N_SEQ)]


N_PROMPT = 100


def _kept_sets(positions: list[np.ndarray]) -> list[list[frozenset]]:
    return [[frozenset(p[p >= 0].tolist()) for p in layer] for layer in positions]


def _compare(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[int, int]:
    """(positions kept by one and not the other, positions compared), over every layer and KV head."""
    n_diff = n_all = 0
    for la, lb in zip(_kept_sets(a), _kept_sets(b)):
        for ha, hb in zip(la, lb):
            n_diff += len(ha ^ hb)
            n_all += len(ha | hb)
    return n_diff, n_all


def test_each_sequence_keeps_what_it_would_keep_alone(model, streams):
    """The same token streams teacher-forced into a 4-sequence context (a prompt of 100 tokens per sequence in
    one batch, then one token per sequence per batch) and, one each, into 1-sequence contexts fed the same
    pieces: after every eviction each sequence keeps the same positions per KV head as when alone (up to
    near-ties from batch-size dependent arithmetic), and its cache stays the budgeted size."""
    multi = _context(model, N_SEQ)
    singles = [_context(model, 1) for _ in range(N_SEQ)]
    assert multi and all(singles)
    try:
        # the prompt: one batch of 4 x 100 tokens; alone, the same 16-token pieces its ubatches hold
        decode_rows(multi, [(k, p, streams[k][p]) for k in range(N_SEQ) for p in range(N_PROMPT)])
        for k, ctx in enumerate(singles):
            for p0 in range(0, N_PROMPT, N_UBATCH // N_SEQ):
                decode_rows(ctx, [(0, p, streams[k][p]) for p in range(p0, min(p0 + N_UBATCH // N_SEQ, N_PROMPT))])

        n_diff = n_all = n_checked = 0
        last = [0] * N_SEQ
        for p in range(N_PROMPT, len(streams[0])):
            decode_rows(multi, [(k, p, streams[k][p]) for k in range(N_SEQ)])
            for k, ctx in enumerate(singles):
                decode_rows(ctx, [(0, p, streams[k][p])])
            for k, ctx in enumerate(singles):
                m, s = _seq_info(multi, k), _seq_info(ctx, 0)
                assert m.n_evictions == s.n_evictions and m.n_used == s.n_used
                assert m.n_used <= BUDGET + INTERVAL
                if m.n_evictions > last[k]:
                    last[k] = m.n_evictions
                    d, a = _compare(_positions(multi, k), _positions(ctx, 0))
                    n_diff, n_all, n_checked = n_diff + d, n_all + a, n_checked + 1
        assert min(last) >= 8, last
        assert n_checked >= 8 * N_SEQ
        # the 4-sequence batches run other kernels than the 1-sequence ones (on the GPU more so: other matrix and
        # attention kernels per batch size); a near-tie decided apart is then carried into the later evictions
        tol = 0.05 if GPU_LAYERS else 0.02
        assert n_diff <= tol * n_all, f"{n_diff} of {n_all} kept positions differ from the sequences alone"

        # one cache per sequence, each the size of the single-sequence context's
        total = llama_cpp.llama_kv_budget_info()
        assert llama_cpp.llama_kv_budget_get_info(multi, ctypes.byref(total))
        assert total.n_seq == N_SEQ and total.n_cells == N_SEQ * _seq_info(singles[0], 0).n_cells
        assert total.kv_bytes == N_SEQ * _seq_info(singles[0], 0).kv_bytes
    finally:
        llama_cpp.llama_free(multi)
        for ctx in singles:
            llama_cpp.llama_free(ctx)


def test_sequence_edits_per_sequence(model, streams):
    """seq_rm of a whole sequence frees only its cache; removing positions older than its last eviction is
    refused (False) while other sequences are unaffected; seq_cp copies a budgeted sequence's composite state."""
    ctx = _context(model, N_SEQ)
    assert ctx
    try:
        mem = llama_cpp.llama_get_memory(ctx)
        decode_rows(ctx, [(k, p, streams[k][p]) for k in range(2) for p in range(200)])
        decode_rows(ctx, [(k, 200, streams[k][200]) for k in range(2)])  # the update before it evicts both
        assert _seq_info(ctx, 0).n_evictions > 0 and _seq_info(ctx, 1).n_evictions > 0
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, 10, -1)   # older than the last eviction
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 200, -1)      # the token decoded after it
        before = _positions(ctx, 1)

        llama_cpp.llama_memory_seq_cp(mem, 1, 2, -1, -1)
        decode_rows(ctx, [(2, 201, streams[1][201]), (1, 201, streams[1][201])])  # the update copies the data
        assert _seq_info(ctx, 2).n_used == _seq_info(ctx, 1).n_used
        assert all(np.array_equal(a, b) for a, b in zip(_positions(ctx, 1), _positions(ctx, 2)))
        assert _positions(ctx, 1)[0][:, :BUDGET].tolist() == before[0][:, :BUDGET].tolist()

        assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
        assert _seq_info(ctx, 1).n_used == 0 and _seq_info(ctx, 1).pos_last_evict == -1
        assert _seq_info(ctx, 2).n_used > 0 and _seq_info(ctx, 0).n_used > 0
    finally:
        llama_cpp.llama_free(ctx)


def test_a_unified_cache_with_several_sequences_is_refused(model):
    """A unified cache would trade one sequence's tokens for another's: refused at context creation."""
    assert not _context(model, N_SEQ, kv_unified=True)
    ctx = _context(model, 1, kv_unified=True)  # one sequence: unified or not is the same cache
    assert ctx
    llama_cpp.llama_free(ctx)
