"""The budgeted KV cache (patch 0003) through the rebuilt wheel: constant memory, MorphKV selection
structure, equality with the full cache below the budget, long prompts, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import Llama, LogitsProcessorList

PROMPT = "Write a long story about a lighthouse keeper who records every passing ship in a ledger."


def _llm(model_path, **kwargs) -> Llama:
    kwargs.setdefault("n_ctx", 2048)
    return Llama(model_path=str(model_path), n_threads=2, seed=1, verbose=False, **kwargs)


def _greedy(llm: Llama, prompt: str = PROMPT):
    """llm.generate() greedily with EOS forbidden, so every run is as long as asked."""
    eos = llm.token_eos()

    def no_eos(_ids, scores):
        scores[eos] = -np.inf
        return scores

    return llm.generate(llm.tokenize(prompt.encode()), temp=0.0, top_k=1,
                        logits_processor=LogitsProcessorList([no_eos]), reset=True)


def _generate(llm: Llama, n: int, prompt: str = PROMPT, snapshots: list | None = None) -> list[int]:
    """Greedy tokens, EOS forbidden; optionally record the cache state after every token."""
    tokens = []
    for tok in _greedy(llm, prompt):
        tokens.append(tok)
        if snapshots is not None:
            snapshots.append(llm.kv_budget_info())
        if len(tokens) >= n:
            break
    return tokens


def test_memory_stays_constant_over_8x_the_budget(model_path):
    budget, interval = 128, 64
    llm = _llm(model_path, kv_budget=budget, kv_evict_interval=interval)
    start = llm.kv_budget_info()
    assert start["active"] and start["n_cells"] < 2048
    snaps: list[dict] = []
    _generate(llm, 8 * budget, snapshots=snaps)
    assert len(snaps) == 8 * budget
    assert {s["n_cells"] for s in snaps} == {start["n_cells"]}
    assert {s["kv_bytes"] for s in snaps} == {start["kv_bytes"]}
    assert max(s["n_used"] for s in snaps) <= budget + interval
    assert snaps[-1]["n_evictions"] >= 8 * budget // interval - 2


def test_below_the_budget_output_equals_the_full_cache(model_path):
    full = _generate(_llm(model_path, flash_attn=True), 150)
    budgeted = _generate(_llm(model_path, kv_budget=1500), 150)
    assert budgeted == full


def test_no_budget_keeps_stock_defaults(model_path):
    llm = _llm(model_path)
    info = llm.kv_budget_info()
    assert not info["active"] and info["n_evictions"] == 0
    assert info["n_cells"] == 2048


def _positions(llm: Llama) -> list[np.ndarray]:
    return [llm.kv_budget_positions(il) for il in range(llm.kv_budget_info()["n_layer"])]


@pytest.mark.parametrize("fusion", ["sum", "max"])
def test_per_head_selection_keeps_window_and_budget(model_path, fusion):
    budget, window = 96, 16
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=32, kv_fusion=fusion)
    _generate(llm, 300)
    info = llm.kv_budget_info()
    assert info["n_evictions"] >= 3
    pos_max = llm.n_tokens - 1
    layers = _positions(llm)
    differ = False
    for pos in layers:
        for head in pos:
            held = head[head >= 0]
            assert len(held) == info["n_used"]
            assert len(set(held.tolist())) == len(held), "a head holds a position twice"
            assert held.max() <= pos_max
            # the recent window is never evicted, in any head
            assert set(range(pos_max - window + 1, pos_max + 1)) <= set(held.tolist())
        differ |= any(not np.array_equal(pos[0], h) for h in pos[1:])
    assert differ, "with per-head granularity some heads must keep different tokens"


def test_token_granularity_keeps_one_choice_for_all_heads(model_path):
    llm = _llm(model_path, kv_budget=96, kv_window=16, kv_evict_interval=32, kv_granularity="token")
    _generate(llm, 300)
    layers = _positions(llm)
    first = layers[0][0]
    for pos in layers:
        for head in pos:
            assert np.array_equal(head, first)
    assert (first >= 0).sum() == llm.kv_budget_info()["n_used"]


def test_prompt_4x_longer_than_the_budget_is_answered(model_path, data_dir):
    budget = 64
    llm = _llm(model_path, kv_budget=budget, kv_window=16, kv_evict_interval=32, n_batch=512, n_ubatch=32)
    prompt = (data_dir / "sample.txt").read_text()[:1400]
    n_prompt = len(llm.tokenize(prompt.encode()))
    assert n_prompt >= 4 * budget
    tokens = _generate(llm, 16, prompt=prompt)
    info = llm.kv_budget_info()
    assert len(tokens) == 16
    assert info["n_cells"] < n_prompt, "the cache must be smaller than the prompt"
    assert info["n_evictions"] >= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_budget": 32, "kv_window": 32}, "must be greater than kv_window"),
    ({"kv_budget": 64, "kv_window": 16, "kv_sinks": 48}, "must be greater than kv_window"),
    ({"kv_budget": -5}, "kv_budget must be an integer >= 1"),
    ({"kv_budget": 12.5}, "kv_budget must be an integer"),
    ({"kv_budget": 128, "kv_evict_interval": 0}, "kv_evict_interval must be an integer >= 1"),
    ({"kv_budget": 128, "kv_fusion": "mean"}, "unknown kv_fusion 'mean' (accepted: 'sum', 'max')"),
    ({"kv_budget": 128, "kv_group_reduce": "avg"}, "unknown kv_group_reduce"),
    ({"kv_budget": 128, "kv_granularity": "layer"}, "unknown kv_granularity 'layer' (accepted: 'head', 'token')"),
])
def test_bad_values_raise_value_error(model_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        _llm(model_path, **kwargs)
    assert message in str(err.value)


def test_native_refusal_does_not_crash(model_path):
    import llama_cpp

    # a K cache type the budget does not support is refused at context creation
    with pytest.raises(ValueError):
        _llm(model_path, kv_budget=128, type_k=llama_cpp.GGML_TYPE_Q4_0)
    # and the process goes on working
    assert _generate(_llm(model_path, kv_budget=128), 4)


@pytest.mark.parametrize("fusion, granularity", [("sum", "head"), ("max", "head"), ("sum", "token"), ("max", "token")])
def test_native_selection_matches_the_numpy_reference(model_path, fusion, granularity):
    """Snapshot the next eviction's inputs, let it run, and compare what every head kept with
    morphkv_gguf.policies on the same queries and keys. Cells whose reference score lies within a
    small tolerance of the cut may swap (F16 keys, F32 vs F64 arithmetic): that is the only slack."""
    budget, window, interval = 64, 8, 16
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval,
               kv_fusion=fusion, kv_group_reduce=fusion, kv_granularity=granularity)
    meta = llm.metadata
    n_head = int(meta["llama.attention.head_count"])
    n_head_kv = int(meta["llama.attention.head_count_kv"])
    n_layer = llm.kv_budget_info()["n_layer"]

    snapshot = None
    checked = 0
    for _ in _greedy(llm):
        info = llm.kv_budget_info()
        if snapshot is not None:
            # the eviction ran before the last token was added: cells [0, budget) per head now
            assert info["n_evictions"] == snapshot["n_evictions"] + 1
            _check_against_reference(llm, snapshot, budget, window, fusion, granularity, n_head, n_head_kv)
            checked += 1
            snapshot = None
            if checked == 2:
                break
        elif info["n_used"] >= budget + interval and info["n_evictions"] >= 1:
            snapshot = {"n_evictions": info["n_evictions"],
                        "layers": [llm.kv_budget_layer_state(il) for il in range(n_layer)],
                        "positions": [llm.kv_budget_positions(il) for il in range(n_layer)]}
    assert checked == 2


def _check_against_reference(llm, snapshot, budget, window, fusion, granularity, n_head, n_head_kv):
    from morphkv_gguf import policies

    after = [llm.kv_budget_positions(il) for il in range(len(snapshot["layers"]))]
    first = snapshot["layers"][0]
    classes = policies.classify_cells(first["cell_pos"], window, composite=first["composite"])
    all_scores = []
    for st in snapshot["layers"]:
        q = st["queries"].reshape(window, n_head, -1)
        d = q.shape[-1]
        k = st["keys"].reshape(-1, n_head_kv, d)
        all_scores.append(policies.layer_scores(q, k, classes.evictable, fusion, fusion))

    def allowed_swaps(score_row, ref_cells, nat_cells):
        cut = np.sort(score_row[ref_cells])[0] if len(ref_cells) else 0.0
        diff = set(ref_cells.tolist()) ^ set(nat_cells.tolist())
        return all(abs(score_row[c] - cut) <= 2e-3 * max(abs(cut), 1e-3) for c in diff), len(diff)

    if granularity == "token":
        kept = policies.select_tokens(all_scores, classes, budget)
        total = sum(s.sum(axis=0) for s in all_scores)
        got = set(after[0][0][after[0][0] >= 0].tolist()) - {after[0][0].max()}
        ref_cells = np.array(sorted(kept))
        pos_of = {p: c for c, p in enumerate(snapshot["positions"][0][0]) if p >= 0}
        nat_cells = np.array(sorted(pos_of[p] for p in got))
        ok, n_diff = allowed_swaps(np.where(classes.protected, np.inf, total), ref_cells[~classes.protected[ref_cells]],
                                   nat_cells[~classes.protected[nat_cells]])
        assert ok, f"token selection differs beyond ties ({n_diff} cells)"
        return

    n_swapped = n_compared = 0
    for il, scores in enumerate(all_scores):
        kept = policies.select_per_head(scores, classes, budget)
        for h in range(n_head_kv):
            before_pos = snapshot["positions"][il][h]
            want_cells = kept[h]
            got_pos = after[il][h][:budget]
            pos_to_cell = {}
            for c, p in enumerate(before_pos):
                if p >= 0:
                    pos_to_cell.setdefault(p, c)
            nat_cells = np.array([pos_to_cell[p] for p in got_pos.tolist()])
            # protected cells first, newest first, identical in every head
            assert np.array_equal(nat_cells[: classes.protected.sum()], want_cells[: classes.protected.sum()])
            ok, n_diff = allowed_swaps(scores[h], want_cells[classes.protected.sum():],
                                       nat_cells[classes.protected.sum():])
            assert ok, f"layer {il} head {h}: selection differs beyond ties ({n_diff} cells)"
            n_swapped += n_diff
            n_compared += budget
    assert n_swapped <= 0.02 * n_compared, f"{n_swapped} of {n_compared} kept cells differ"
