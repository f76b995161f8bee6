"""NumPy references of the baseline policies (streaming, H2O, SnapKV), checked against plain loops of
their definitions on small random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from morphkv_gguf import policies
from test_policies import _loop_scores


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


# --- streaming ----------------------------------------------------------------------------------

def _loop_streaming(pos, window, sinks, budget):
    live = [c for c in range(len(pos)) if pos[c] >= 0]
    pos_max = max(pos[c] for c in live)
    prot = [c for c in live if pos[c] > pos_max - window or pos[c] < sinks]
    rest = sorted((c for c in live if c not in prot), key=lambda c: -pos[c])
    return sorted(prot + rest[: budget - len(prot)])


@pytest.mark.parametrize("sinks", [0, 2])
def test_streaming_keeps_sinks_window_and_the_most_recent(sinks):
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(12, 30))
        pos = rng.permutation(np.arange(40))[:n].astype(np.int64)
        pos[rng.random(n) < 0.15] = -1
        window, budget = 3, 8
        classes = policies.classify_cells(pos, window, sinks)
        got = policies.streaming_select(pos, classes, budget)
        assert got.tolist() == _loop_streaming(pos.tolist(), window, sinks, budget), trial


def test_streaming_example():
    pos = np.arange(20)
    classes = policies.classify_cells(pos, window=4, sinks=2)
    assert policies.streaming_select(pos, classes, 9).tolist() == [0, 1, 13, 14, 15, 16, 17, 18, 19]


# --- H2O --------------------------------------------------------------------------------------------

def test_ring_positions():
    assert policies.ring_positions(10, 4).tolist() == [8, 9, 10, 7]
    assert policies.ring_positions(2, 4).tolist() == [0, 1, 2, -1]
    assert policies.ring_positions(-1, 3).tolist() == [-1, -1, -1]


def _loop_h2o_increment(q, k, cell_pos, pos_last_evict):
    n_rows, n_head, d = q.shape
    n_cells, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    pos_max = max(p for p in cell_pos if p >= 0)
    out = np.zeros((n_head_kv, n_cells))
    for r in range(n_rows):
        # the newest position <= pos_max that the ring writes to slot r
        p_r = max((p for p in range(pos_max + 1) if p % n_rows == r), default=-1)
        if p_r < 0 or p_r <= pos_last_evict:
            continue
        for h in range(n_head):
            hk = h // group
            vis = [c for c in range(n_cells) if 0 <= cell_pos[c] <= p_r]
            logit = {c: _dot(q[r, h], k[c, hk]) / math.sqrt(d) for c in vis}
            m = max(logit.values())
            z = sum(math.exp(v - m) for v in logit.values())
            for c in vis:
                out[hk, c] += math.exp(logit[c] - m) / z
    return out


@pytest.mark.parametrize("pos_last_evict", [-1, 20, 25])
def test_h2o_increment_matches_the_definition(pos_last_evict):
    rng = np.random.default_rng(5)
    n_rows, n_head, n_head_kv, d = 6, 4, 2, 5
    cell_pos = np.array([0, 1, 2, 14, -1, 22, 23, 24, 25, 26, 27, 28, 29])
    q = rng.normal(size=(n_rows, n_head, d))
    k = rng.normal(size=(len(cell_pos), n_head_kv, d))
    got = policies.h2o_increment(q, k, cell_pos, pos_last_evict)
    want = _loop_h2o_increment(q, k, cell_pos.tolist(), pos_last_evict)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # a counted row spreads one unit of attention per query head: the group sum of G heads
    p_r = policies.ring_positions(int(cell_pos.max()), n_rows)
    n_counted = int(((p_r >= 0) & (p_r > pos_last_evict)).sum())
    np.testing.assert_allclose(got.sum(axis=1), n_counted * (n_head // n_head_kv))
    assert np.all(got[:, cell_pos < 0] == 0)


def test_h2o_causal_mask_hides_cells_newer_than_the_row():
    rng = np.random.default_rng(6)
    cell_pos = np.arange(10)
    q = rng.normal(size=(4, 2, 3))
    k = rng.normal(size=(10, 1, 3))
    # the ring's rows hold positions 8, 9, 6, 7; after an eviction at 7 only rows 8 and 9 count
    got = policies.h2o_increment(q, k, cell_pos, pos_last_evict=7)
    np.testing.assert_allclose(got.sum(), 2 * 2)          # 2 rows x 2 query heads, one unit each
    row9 = q[1]                                            # slot 9 % 4 = 1
    logits = row9 @ k[:, 0].T / np.sqrt(3)                 # [2 heads, 10 cells]
    p9 = np.exp(logits - logits.max(1, keepdims=True))
    p9 /= p9.sum(1, keepdims=True)
    # cell 9 is newer than row 8's query: only row 9 attends to it
    np.testing.assert_allclose(got[0, 9], p9[:, 9].sum())


def test_h2o_scores_accumulate_and_carry():
    rng = np.random.default_rng(7)
    cell_pos = np.arange(12)
    q = rng.normal(size=(4, 2, 3))
    k = rng.normal(size=(12, 2, 3))
    prev = rng.random((2, 12))
    prev[:, 8:] = 0.0  # entered since the last eviction
    new = policies.h2o_scores(q, k, cell_pos, pos_last_evict=7, prev_scores=prev)
    np.testing.assert_allclose(new, prev + policies.h2o_increment(q, k, cell_pos, 7))
    classes = policies.classify_cells(cell_pos, window=2)
    kept = policies.select_per_head(new, classes, budget=6)
    for h in range(2):
        assert kept[h, :2].tolist() == [11, 10]
        best = np.argsort(-new[h, :10], kind="stable")[:4]
        assert sorted(kept[h, 2:].tolist()) == sorted(best.tolist())
    carried = policies.h2o_carry(new, kept)
    assert carried.shape == (2, 6)
    np.testing.assert_allclose(carried[1], new[1, kept[1]])
    tok = policies.select_tokens([new], classes, budget=6)
    np.testing.assert_allclose(policies.h2o_carry(new, tok), new[:, tok])


def test_h2o_per_head_positions_of_composite_cells():
    rng = np.random.default_rng(8)
    q = rng.normal(size=(3, 2, 4))
    k = rng.normal(size=(6, 2, 4))
    pos = np.array([[0, 3, 5, 6, 7, 8], [1, 2, 5, 6, 7, 8]])
    got = policies.h2o_increment(q, k, pos, pos_last_evict=5)
    for h in range(2):
        want = _loop_h2o_increment(q[:, [h]], k[:, [h]], pos[h].tolist(), 5)
        np.testing.assert_allclose(got[h], want[0], rtol=1e-12)


# --- SnapKV ---------------------------------------------------------------------------------------

def _loop_pool(row, kernel):
    half = kernel // 2
    n = len(row)
    return [max(row[j] for j in range(max(0, i - half), min(n, i + half + 1))) for i in range(n)]


def test_max_pool_ignores_out_of_range_cells():
    rng = np.random.default_rng(9)
    s = rng.normal(size=(3, 11))  # negative values: zero padding would show at the edges
    got = policies.max_pool_cells(s, 5)
    for h in range(3):
        np.testing.assert_array_equal(got[h], _loop_pool(s[h].tolist(), 5))
    np.testing.assert_array_equal(policies.max_pool_cells(np.array([[1.0, -2.0]]), 5), [[1.0, 1.0]])
    with pytest.raises(ValueError):
        policies.max_pool_cells(s, 4)


@pytest.mark.parametrize("fusion", ["sum", "max"])
@pytest.mark.parametrize("group_reduce", ["sum", "max"])
def test_snapkv_scores_match_the_definition(fusion, group_reduce):
    rng = np.random.default_rng(10)
    n_w, n_head, n_head_kv, d, n_cells = 3, 4, 2, 5, 14
    q = rng.normal(size=(n_w, n_head, d))
    k = rng.normal(size=(n_cells, n_head_kv, d))
    pos = np.arange(n_cells)
    classes = policies.classify_cells(pos, window=3, sinks=1)
    got = policies.snapkv_scores(q, k, classes.evictable, fusion, group_reduce)
    ev = classes.evictable
    loop = _loop_scores(q, k, ev, fusion, group_reduce)  # MorphKV's element-wise definition
    for hk in range(n_head_kv):
        fused = loop[hk]
        pooled = _loop_pool(fused.tolist(), 5)
        want = [pooled[c] if ev[c] else 0.0 for c in range(n_cells)]
        np.testing.assert_allclose(got[hk], want, rtol=1e-12, atol=1e-15)
    kept = policies.select_per_head(got, classes, budget=8)
    for hk in range(n_head_kv):
        assert kept[hk, :4].tolist() == [13, 12, 11, 0]   # window newest first, then the sink
        best = np.argsort(-got[hk] + 1e9 * ~ev, kind="stable")[:4]
        assert sorted(kept[hk, 4:].tolist()) == sorted(best.tolist())


def test_snapkv_pool_spreads_a_peak_to_its_neighbours():
    # one key aligned with every query: after pooling its two neighbours on each side score as high
    d = 4
    q = np.zeros((2, 1, d)); q[:, 0, 0] = 10.0
    k = np.zeros((12, 1, d)); k[5, 0, 0] = 1.0
    classes = policies.classify_cells(np.arange(12), window=2)
    s = policies.snapkv_scores(q, k, classes.evictable)
    peak = s[0, 5]
    assert np.all(s[0, 3:8] == peak)
    assert np.all(s[0, [0, 1, 2, 8, 9]] < peak)
    assert np.all(s[0, 10:] == 0)

# The native policies are checked against these references in tests/test_kv_budget.py (CPU in CI, CUDA on the
# GPU machine: scripts/gpu_bench.sh test).
