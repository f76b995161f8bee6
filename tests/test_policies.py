"""The NumPy reference of the MorphKV selection, checked against a plain loop of the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from morphkv_gguf import policies


def _loop_scores(q, k, evictable, fusion, group_reduce, softcap=0.0):
    """MorphKV's definition element by element (softmax over evictable cells per query head and row)."""
    n_w, n_head, d = q.shape
    n_cells, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    out = np.zeros((n_head_kv, n_cells))
    for hk in range(n_head_kv):
        per_q = []
        for j in range(group):
            h = hk * group + j
            rows = []
            for r in range(n_w):
                logits = [sum(q[r, h, x] * k[c, hk, x] for x in range(d)) / math.sqrt(d) if evictable[c] else None
                          for c in range(n_cells)]
                if softcap:
                    logits = [softcap * math.tanh(v / softcap) if v is not None else None for v in logits]
                m = max(v for v in logits if v is not None)
                e = [math.exp(v - m) if v is not None else 0.0 for v in logits]
                z = sum(e)
                rows.append([v / z for v in e])
            rows = np.array(rows)
            per_q.append(rows.sum(axis=0) if fusion == "sum" else rows.max(axis=0))
        per_q = np.array(per_q)
        out[hk] = per_q.sum(axis=0) if group_reduce == "sum" else per_q.max(axis=0)
    return out


@pytest.mark.parametrize("fusion", ["sum", "max"])
@pytest.mark.parametrize("group_reduce", ["sum", "max"])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_scores_match_the_definition(fusion, group_reduce, softcap):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 4, 5)) * 3       # W=3, 4 query heads, d=5 (logits large enough for a cap of 1.5 to bite)
    k = rng.normal(size=(9, 2, 5))           # 9 cells, 2 KV heads (GQA group of 2)
    positions = np.array([0, 1, 2, 3, -1, 5, 6, 7, 8])
    classes = policies.classify_cells(positions, window=3)
    got = policies.layer_scores(q, k, classes.evictable, fusion, group_reduce, softcap=softcap)
    want = _loop_scores(q, k, classes.evictable, fusion, group_reduce, softcap)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if softcap:
        assert not np.allclose(got, policies.layer_scores(q, k, classes.evictable, fusion, group_reduce))


def test_classify_protects_window_and_sinks_not_composites():
    pos = np.array([0, 1, 40, 41, -1, 50, 97, 98, 99])
    composite = np.array([False, False, True, False, False, False, False, False, False])
    c = policies.classify_cells(pos, window=3, sinks=1, composite=composite)
    assert c.protected.tolist() == [True, False, False, False, False, False, True, True, True]
    assert c.evictable.tolist() == [False, True, True, True, False, True, False, False, False]
    assert c.protected_rank[[0, 6, 7, 8]].tolist() == [0, 1, 2, 3]


def test_per_head_selection_puts_protected_first_in_every_head():
    rng = np.random.default_rng(1)
    pos = np.arange(20)
    classes = policies.classify_cells(pos, window=4)
    scores = policies.layer_scores(rng.normal(size=(4, 6, 8)), rng.normal(size=(20, 3, 8)), classes.evictable)
    kept = policies.select_per_head(scores, classes, budget=10)
    assert kept.shape == (3, 10)
    for head, row in zip(scores, kept):
        assert row[:4].tolist() == [19, 18, 17, 16]          # newest first, same in every head
        best = np.argsort(-head[:16], kind="stable")[:6]
        assert sorted(row[4:].tolist()) == sorted(best.tolist())
    assert len({tuple(r[4:]) for r in kept}) > 1, "heads choose independently"


def test_token_selection_sums_heads_and_layers():
    pos = np.arange(12)
    classes = policies.classify_cells(pos, window=2)
    s1 = np.zeros((2, 12)); s1[0, 3] = 0.9
    s2 = np.zeros((2, 12)); s2[1, 5] = 0.5; s2[0, 7] = 0.4
    kept = policies.select_tokens([s1, s2], classes, budget=5)
    assert kept.tolist() == [3, 5, 7, 10, 11]


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="accepted: sum, max"):
        policies.layer_scores(np.zeros((1, 1, 2)), np.zeros((2, 1, 2)), np.array([True, True]), fusion="mean")
