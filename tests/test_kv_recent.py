"""kv_recent: more recent tokens protected than the window that scores (native/src/llama-kv-budget.cpp,
llama_kv_budget_params::n_recent), against the NumPy reference, through the wheel."""

from __future__ import annotations

import pytest

from test_kv_budget import _check_against_reference, _greedy, _heads, _llm, _morphkv_reference, _snapshot

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_selection_with_recent_tokens_protected_matches_the_numpy_reference(model_path, granularity):
    from morphkv_gguf import policies

    budget, window, recent, interval = 96, 16, 56, 32
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_recent=recent, kv_evict_interval=interval,
               kv_granularity=granularity, logits_all=True)
    n_head, n_head_kv = _heads(llm)
    checked, snapshot = 0, None
    for _ in _greedy(llm, PROMPT):
        info = llm.kv_budget_info()
        if snapshot is not None:
            assert info["n_evictions"] == snapshot["n_evictions"] + 1
            first = snapshot["layers"][0]
            classes = policies.classify_cells(first["cell_pos"], recent, composite=first["composite"])
            assert int(classes.protected.sum()) == recent  # the last R positions, not only the W that score
            # protection by R, scores from the W queries of the window
            _check_against_reference(llm, snapshot, budget, recent, granularity, n_head_kv,
                                     _morphkv_reference(window, n_head, n_head_kv))
            checked, snapshot = checked + 1, None
            if checked == 2:
                break
        elif info["n_used"] >= budget + interval and info["n_evictions"] >= 1:
            snapshot = _snapshot(llm)
    assert checked == 2


def test_recent_tokens_cost_no_query_memory(model_path):
    """Protecting R recent tokens keeps the query ring at W rows; a window of R rows would grow it."""
    base = _llm(model_path, kv_budget=128, kv_window=16, kv_recent="window").kv_budget_info()
    recent = _llm(model_path, kv_budget=128, kv_window=16, kv_recent=96).kv_budget_info()
    wide = _llm(model_path, kv_budget=128, kv_window=96, kv_recent="window").kv_budget_info()
    assert recent["kv_recent"] == 96 and base["kv_recent"] == 16 and recent["kv_window"] == 16
    assert recent["aux_bytes"] == base["aux_bytes"] < wide["aux_bytes"]
    assert recent["kv_bytes"] == base["kv_bytes"] == wide["kv_bytes"]


@pytest.mark.parametrize("kwargs,message", [
    ({"kv_budget": 64, "kv_recent": 64}, r"kv_budget \(64\) must be greater than kv_recent \(64\) \+ kv_sinks \(0\)"),
    ({"kv_budget": 64, "kv_recent": 60, "kv_sinks": 4}, r"kv_recent \(60\) \+ kv_sinks \(4\)"),
    ({"kv_budget": 64, "kv_recent": 60, "kv_preset": None}, r"kv_recent \(60\) \+ kv_sinks \(4\)"),  # the default sinks count
    ({"kv_budget": 64, "kv_recent": -1}, r"kv_recent must be 'auto', 'window' or a number of tokens >= 1"),
    ({"kv_budget": 64, "kv_recent": "half"}, r"kv_recent must be 'auto', 'window' or a number of tokens >= 1"),
    ({"kv_budget": 64, "kv_preset": "fast"}, r"unknown kv_preset 'fast' \(accepted: 'measured', 'paper'\)"),
])
def test_bad_kv_recent_values_raise_value_error(model_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _llm(model_path, **kwargs)


def test_defaults_are_the_measured_preset_and_paper_is_one_keyword_away(model_path):
    from llama_cpp import llama_cpp as C

    measured = _llm(model_path, kv_budget=256, kv_preset=None).kv_budget_info()  # None: the library's default
    assert (measured["kv_window"], measured["kv_recent"], measured["kv_sinks"]) == (32, 192, 4)
    assert (measured["kv_fusion"], measured["kv_group_reduce"]) == (C.LLAMA_KV_FUSION_MAX, C.LLAMA_KV_FUSION_MAX)
    paper = _llm(model_path, kv_budget=256, kv_preset="paper").kv_budget_info()
    assert (paper["kv_window"], paper["kv_recent"], paper["kv_sinks"]) == (32, 32, 0)
    assert (paper["kv_fusion"], paper["kv_group_reduce"]) == (C.LLAMA_KV_FUSION_SUM, C.LLAMA_KV_FUSION_SUM)
    # a setting given explicitly wins over the preset's
    mixed = _llm(model_path, kv_budget=256, kv_preset="paper", kv_sinks=2, kv_recent=100).kv_budget_info()
    assert (mixed["kv_recent"], mixed["kv_sinks"], mixed["kv_fusion"]) == (100, 2, C.LLAMA_KV_FUSION_SUM)
    # the C API's defaults are the same (0 = auto: 3/4 of the budget, keeping the sinks and one scored cell)
    params = C.llama_context_default_params()
    assert (params.kv_window, params.kv_recent, params.kv_sinks, params.kv_fusion, params.kv_group_reduce) == \
        (32, 0, 4, C.LLAMA_KV_FUSION_MAX, C.LLAMA_KV_FUSION_MAX)
