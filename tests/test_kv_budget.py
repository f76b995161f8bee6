"""The budgeted KV cache (native/src/llama-kv-budget.cpp) through the rebuilt wheel: constant memory, MorphKV selection
structure, equality with the full cache below the budget, long prompts, refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest
from llama_cpp import Llama, LogitsProcessorList

from conftest import decode_rows

PROMPT = "Write a long story about a lighthouse keeper who records every passing ship in a ledger."


def _llm(model_path, **kwargs) -> Llama:
    kwargs.setdefault("n_ctx", 2048)
    if kwargs.get("kv_budget"):
        kwargs.setdefault("kv_preset", "paper")  # the references below are written for the paper's settings
    # MORPHKV_TEST_GPU_LAYERS=99 runs the same checks with the layers (and the cache) on the GPU
    kwargs.setdefault("n_gpu_layers", int(os.environ.get("MORPHKV_TEST_GPU_LAYERS", "0")))
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


@pytest.mark.parametrize("budget, n_ubatch, policy", [
    (128, 512, "morphkv"), (1024, 512, "morphkv"), (1024, 96, "morphkv"), (4096, 512, "morphkv"), (1024, 512, "h2o"),
])
def test_the_default_interval_is_the_automatic_one(model_path, budget, n_ubatch, policy):
    """kv_evict_interval=None (the default): llama.cpp picks C/8 within [64, n_ubatch] (64 for H2O), reports
    it in kv_budget_info, and allocates no more cells than with S = 64."""
    from morphkv_gguf.gguf_info import auto_evict_interval, budget_cells

    llm = _llm(model_path, kv_budget=budget, n_ctx=8192, n_batch=n_ubatch, n_ubatch=n_ubatch, kv_policy=policy)
    info = llm.kv_budget_info()
    assert info["kv_evict_interval"] == auto_evict_interval(budget, n_ubatch, policy)
    assert info["n_cells"] == budget_cells(budget, 64, n_ubatch)


def test_evictions_follow_the_automatic_interval(model_path):
    budget = 640
    llm = _llm(model_path, kv_budget=budget)  # S = 640/8 = 80
    assert llm.kv_budget_info()["kv_evict_interval"] == 80
    snaps: list[dict] = []
    _generate(llm, budget + 2 * 80 + 8, snapshots=snaps)
    assert max(s["n_used"] for s in snaps) == budget + 80
    assert snaps[-1]["n_evictions"] >= 2


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
        _llm(model_path, kv_budget=128, type_k=llama_cpp.GGML_TYPE_Q4_K)
    # and the process goes on working
    assert _generate(_llm(model_path, kv_budget=128), 4)


def _snapshot(llm: Llama) -> dict:
    n_layer = llm.kv_budget_info()["n_layer"]
    return {"n_evictions": llm.kv_budget_info()["n_evictions"],
            "layers": [llm.kv_budget_layer_state(il) for il in range(n_layer)],
            "positions": [llm.kv_budget_positions(il) for il in range(n_layer)]}


def _check_evictions(llm: Llama, budget: int, interval: int, n_checks: int, check) -> None:
    """Snapshot the inputs of evictions 2, 3, ... (n_checks of them), let each run, then ``check``."""
    snapshot = None
    checked = 0
    for _ in _greedy(llm):
        info = llm.kv_budget_info()
        if snapshot is not None:
            # the eviction ran before the last token was added: cells [0, budget) per head now
            assert info["n_evictions"] == snapshot["n_evictions"] + 1
            check(snapshot)
            checked += 1
            snapshot = None
            if checked == n_checks:
                break
        elif info["n_used"] >= budget + interval and info["n_evictions"] >= 1:
            snapshot = _snapshot(llm)
    assert checked == n_checks


def _heads(llm: Llama) -> tuple[int, int]:
    meta = llm.metadata
    arch = meta["general.architecture"]
    return int(meta[f"{arch}.attention.head_count"]), int(meta[f"{arch}.attention.head_count_kv"])


def _morphkv_reference(window: int, n_head: int, n_head_kv: int, fusion: str = "sum", group_reduce: str = "sum",
                       scale: float | None = None):
    """The NumPy MorphKV scores of a snapshotted layer (``layer_scores_fn`` of _check_against_reference)."""
    from morphkv_gguf import policies

    def scores(st, classes):
        q = st["queries"].reshape(window, n_head, -1)
        k = st["keys"].reshape(-1, n_head_kv, q.shape[-1])
        return policies.layer_scores(q, k, classes.evictable, fusion, group_reduce, scale)

    return scores


def _as_granite(model_path, out_path, attention_scale: float):
    """The default model relabelled as a Granite model (same tensors; Granite's llama-like graph reads
    ``granite.attention.scale`` and uses it as its kq_scale instead of 1/sqrt(d))."""
    import gguf

    reader = gguf.GGUFReader(str(model_path))
    writer = gguf.GGUFWriter(str(out_path), "granite")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        name = "granite." + field.name[len("llama."):] if field.name.startswith("llama.") else field.name
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_key_value("granite.logit_scale", 1.0, gguf.GGUFValueType.FLOAT32)
    writer.add_key_value("granite.attention.scale", attention_scale, gguf.GGUFValueType.FLOAT32)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return out_path


def _selections_differ(snap, window: int, budget: int, scores_a, scores_b) -> bool:
    """Whether two reference scorings of a snapshot keep different cells in some layer and head (a test that
    compares native selection with ``scores_a`` then sees the difference ``scores_b`` would make)."""
    from morphkv_gguf import policies

    first = snap["layers"][0]
    classes = policies.classify_cells(first["cell_pos"], window, composite=first["composite"])
    for st in snap["layers"]:
        kept_a = np.sort(policies.select_per_head(scores_a(st, classes), classes, budget), axis=1)
        kept_b = np.sort(policies.select_per_head(scores_b(st, classes), classes, budget), axis=1)
        if not np.array_equal(kept_a, kept_b):
            return True
    return False


def test_selection_scores_at_the_models_attention_scale(model_path, tmp_path):
    """A model whose attention scales q.k by its own factor (here 3/sqrt(d), Granite's attention.scale) is
    scored at that temperature: what every head keeps matches the reference with that scale, and the
    reference with 1/sqrt(d) would have kept other cells."""
    budget, window, interval = 64, 8, 16
    d = 64  # the default model's head size
    path = _as_granite(model_path, tmp_path / "granite.gguf", 3.0 / np.sqrt(d))
    llm = _llm(path, kv_budget=budget, kv_window=window, kv_evict_interval=interval)
    assert llm.metadata["general.architecture"] == "granite"
    check_selection_at_scale(llm, budget, window, interval, 3.0 / np.sqrt(d))


def check_selection_at_scale(llm: Llama, budget: int, window: int, interval: int, scale: float) -> None:
    """Two evictions keep per head what the reference keeps at the model's scale of q.k, and some layer or head
    would have kept other cells at 1/sqrt(d) (so that the check sees a wrong scale)."""
    n_head, n_head_kv = _heads(llm)
    scores = _morphkv_reference(window, n_head, n_head_kv, scale=scale)
    plain = _morphkv_reference(window, n_head, n_head_kv)
    differs = []

    def check(snap):
        _check_against_reference(llm, snap, budget, window, "head", n_head_kv, scores)
        differs.append(_selections_differ(snap, window, budget, scores, plain))

    _check_evictions(llm, budget, interval, 2, check)
    assert any(differs), "the scale changed no selection: the test would not see a wrong scale"


@pytest.mark.parametrize("fusion, granularity", [("sum", "head"), ("max", "head"), ("sum", "token"), ("max", "token")])
def test_native_selection_matches_the_numpy_reference(model_path, fusion, granularity):
    """Snapshot the next eviction's inputs, let it run, and compare what every head kept with
    morphkv_gguf.policies on the same queries and keys. Cells whose reference score lies within a
    small tolerance of the cut may swap (F16 keys, F32 vs F64 arithmetic): that is the only slack."""

    budget, window, interval = 64, 8, 16
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval,
               kv_fusion=fusion, kv_group_reduce=fusion, kv_granularity=granularity)
    n_head, n_head_kv = _heads(llm)
    scores = _morphkv_reference(window, n_head, n_head_kv, fusion, fusion)

    _check_evictions(llm, budget, interval, 2,
                     lambda snap: _check_against_reference(llm, snap, budget, window, granularity, n_head_kv, scores))


def test_large_cache_selection_matches_the_numpy_reference(model_path):
    """A budget whose per-head position tables (layers x KV heads x C >= 65536 entries) are rewritten on
    several threads after each eviction (rewrite_head's workers): every head's kept cells and their original
    positions still match the reference, over two consecutive evictions."""

    budget, window, interval = 768, 8, 16
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval)
    n_head, n_head_kv = _heads(llm)
    assert llm.kv_budget_info()["n_layer"] * n_head_kv * budget >= 65536
    scores = _morphkv_reference(window, n_head, n_head_kv)

    _check_evictions(llm, budget, interval, 2,
                     lambda snap: _check_against_reference(llm, snap, budget, window, "head", n_head_kv, scores))


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_h2o_selection_and_carried_scores_match_the_numpy_reference(model_path, granularity):
    """H2O: accumulated attention of every query since the last eviction (causal), plus what the kept
    cells carried; the native scores after the eviction are the reference's, moved with their cells."""
    from morphkv_gguf import policies

    budget, window, interval = 64, 8, 16
    rows = max(window, interval)
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval, kv_policy="h2o",
               kv_granularity=granularity)
    n_head, n_head_kv = _heads(llm)
    totals: dict[int, np.ndarray] = {}

    def scores(st, classes):
        q = st["queries"].reshape(rows, n_head, -1)
        k = st["keys"].reshape(-1, n_head_kv, q.shape[-1])
        total = policies.h2o_scores(q, k, st["cell_pos"], st["pos_last_evict"], prev_scores=st["scores"])
        totals[len(totals)] = total
        return total

    def check(snap):
        totals.clear()
        kept_cells = _check_against_reference(llm, snap, budget, window, granularity, n_head_kv, scores)
        for il, total in totals.items():
            after = llm.kv_budget_layer_state(il)["scores"]
            if granularity == "head":
                want = policies.h2o_carry(total, kept_cells[il])
                got = after[:, :budget]
            else:
                want = policies.h2o_carry(total, kept_cells[il])
                got = after[:, kept_cells[il]]
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)  # F32 sums vs F64

    _check_evictions(llm, budget, interval, 2, check)


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_snapkv_compresses_the_prompt_once_like_the_numpy_reference(model_path, data_dir, granularity):
    from morphkv_gguf import policies

    budget, window = 64, 8
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_policy="snapkv", kv_granularity=granularity)
    n_head, n_head_kv = _heads(llm)
    prompt = llm.tokenize((data_dir / "sample.txt").read_text()[:900].encode())
    llm.eval(prompt)
    info = llm.kv_budget_info()
    assert info["n_evictions"] == 0 and info["n_used"] == len(prompt) and info["n_cells"] == 2048
    snap = _snapshot(llm)
    llm.eval([llm.token_eos() - 1])  # the first single-token batch: the compression runs before it

    def scores(st, classes):
        q = st["queries"].reshape(window, n_head, -1)
        k = st["keys"].reshape(-1, n_head_kv, q.shape[-1])
        return policies.snapkv_scores(q, k, classes.evictable)

    _check_against_reference(llm, snap, budget, window, granularity, n_head_kv, scores)
    # then no more evictions: the cache grows
    for _ in range(3):
        llm.eval([llm.token_eos() - 2] * 40)
    info = llm.kv_budget_info()
    assert info["n_evictions"] == 1 and info["n_used"] == budget + 1 + 120


def test_streaming_keeps_sinks_and_the_most_recent_tokens(model_path):
    budget, window, interval, sinks = 64, 8, 16, 4
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval, kv_sinks=sinks,
               kv_policy="streaming")
    n = 0
    for _ in _greedy(llm):
        n += 1
        pos_max = llm.n_tokens - 1
        held = llm.kv_budget_positions(0)
        n_used = llm.kv_budget_info()["n_used"]
        want = set(range(sinks)) | set(range(pos_max - (n_used - sinks) + 1, pos_max + 1))
        for il in (0, 15, 29):
            for head in llm.kv_budget_positions(il):
                assert set(head[head >= 0].tolist()) == want
        assert (held[0] >= 0).sum() == n_used
        if n == 250:
            break
    assert llm.kv_budget_info()["n_evictions"] >= 8


def _check_against_reference(llm, snapshot, budget, window, granularity, n_head_kv, layer_scores_fn, rel_tol=2e-3,
                             kept=()):
    """Compare the cells kept by the eviction that ran after ``snapshot`` with the reference selection
    on ``layer_scores_fn(layer_state, classes)``; returns the native kept cells per layer
    ([n_head_kv, budget] per head, or [budget] for token granularity), in snapshot cell numbers."""
    from morphkv_gguf import policies

    after = [llm.kv_budget_positions(il) for il in range(len(snapshot["layers"]))]
    first = snapshot["layers"][0]
    classes = policies.classify_cells(first["cell_pos"], window, composite=first["composite"], kept=kept)
    all_scores = [layer_scores_fn(st, classes) for st in snapshot["layers"]]
    n_prot = int(classes.protected.sum())

    def allowed_swaps(score_row, ref_cells, nat_cells):
        """(every swapped cell scores within tolerance of the cut, swaps that are not exact ties): exact
        ties are common with SnapKV, whose max-pool gives neighbouring cells the same score."""
        cut = np.sort(score_row[ref_cells])[0] if len(ref_cells) else 0.0
        diff = set(ref_cells.tolist()) ^ set(nat_cells.tolist())
        near = all(abs(score_row[c] - cut) <= rel_tol * max(abs(cut), 1e-3) for c in diff)
        return near, sum(abs(score_row[c] - cut) > 1e-12 * max(abs(cut), 1e-12) for c in diff)

    if granularity == "token":
        kept = policies.select_tokens(all_scores, classes, budget)
        total = sum(s.sum(axis=0) for s in all_scores)
        pos_of = {p: c for c, p in enumerate(snapshot["positions"][0][0]) if p >= 0}
        newest = after[0][0].max()  # the token decoded after the eviction
        nat_cells = np.array(sorted(pos_of[p] for p in after[0][0][after[0][0] >= 0].tolist() if p != newest))
        ref_cells = np.array(sorted(kept))
        ok, n_diff = allowed_swaps(np.where(classes.protected, np.inf, total), ref_cells[~classes.protected[ref_cells]],
                                   nat_cells[~classes.protected[nat_cells]])
        assert ok, f"token selection differs beyond ties ({n_diff} cells)"
        return [nat_cells] * len(all_scores)

    n_swapped = n_compared = 0
    native = []
    for il, scores in enumerate(all_scores):
        kept = policies.select_per_head(scores, classes, budget)
        layer_cells = []
        for h in range(n_head_kv):
            pos_to_cell = {}
            for c, p in enumerate(snapshot["positions"][il][h]):
                if p >= 0:
                    pos_to_cell.setdefault(p, c)
            nat_cells = np.array([pos_to_cell[p] for p in after[il][h][:budget].tolist()])
            layer_cells.append(nat_cells)
            # protected cells first, newest first, identical in every head
            assert np.array_equal(nat_cells[:n_prot], kept[h][:n_prot])
            ok, n_diff = allowed_swaps(scores[h], kept[h][n_prot:], nat_cells[n_prot:])
            assert ok, f"layer {il} head {h}: selection differs beyond ties ({n_diff} cells)"
            n_swapped += n_diff
            n_compared += budget
        native.append(np.array(layer_cells))
    assert n_swapped <= 0.02 * n_compared, f"{n_swapped} of {n_compared} kept cells differ"
    return native


@pytest.mark.parametrize("cache_type", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"])
def test_quantized_cache_keeps_memory_constant_and_matches_the_reference(model_path, cache_type):
    """Quantized K/V: the eviction gathers quantized rows; what it keeps follows the reference on the
    dequantized keys."""
    import llama_cpp

    budget, window, interval = 64, 8, 16
    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{cache_type}")
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval,
               type_k=ggml_type, type_v=ggml_type)
    n_head, n_head_kv = _heads(llm)
    start = llm.kv_budget_info()
    scores = _morphkv_reference(window, n_head, n_head_kv)

    # the composed graph multiplies quantized keys with queries quantized to Q8_0: ~1 % score noise
    _check_evictions(llm, budget, interval, 2,
                     lambda snap: _check_against_reference(llm, snap, budget, window, "head", n_head_kv, scores,
                                                           rel_tol=2e-2))
    info = llm.kv_budget_info()
    assert info["kv_bytes"] == start["kv_bytes"] and info["kv_bytes"] < 0.6 * _llm(model_path, kv_budget=budget).kv_budget_info()["kv_bytes"]


def test_multi_head_attention_model(tmp_path):
    """MHA (n_head_kv == n_head, no GQA group): a synthetic llama model with random weights."""
    from morphkv_gguf.gguf_synth import write_synthetic_gguf

    path = tmp_path / "tiny-mha.gguf"
    write_synthetic_gguf(path, "tiny-mha", dtype="f16", seed=3)
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=2, seed=1, verbose=False, n_batch=16, n_ubatch=16,
                kv_budget=48, kv_window=8, kv_evict_interval=16)
    llm.eval(list(range(10, 250)))  # in ubatches of 16 with evictions between them
    info = llm.kv_budget_info()
    assert info["n_head_kv"] == 4 and info["n_evictions"] >= 5 and info["n_used"] <= 48 + 16
    for il in range(info["n_layer"]):
        pos = llm.kv_budget_positions(il)
        for head in pos:
            held = head[head >= 0]
            assert len(held) == info["n_used"] and len(set(held.tolist())) == len(held)
            assert set(range(239 - 8 + 1, 240)) <= set(held.tolist())


def test_rejected_draft_queries_do_not_score_the_next_eviction(model_path):
    """Speculative decoding's rollback: draft tokens decoded past the last eviction and removed again (seq_rm)
    leave their queries in the query window's rows; the next eviction scores with the rows of the positions
    the cache holds and skips those, as the reference does on the remaining rows."""
    import llama_cpp

    budget, window, interval = 64, 8, 16
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval)
    n_head, n_head_kv = _heads(llm)
    ctx, mem = llm._ctx.ctx, llama_cpp.llama_get_memory(llm._ctx.ctx)
    tokens = llm.tokenize((PROMPT + " The story goes on and on. ").encode() * 8)

    def decode(pos0: int, toks: list[int]) -> None:
        decode_rows(ctx, [(0, pos0 + i, t) for i, t in enumerate(toks)], {len(toks) - 1})

    # past the first evictions, then up to one cell short of C + S: the next batch's update evicts
    n = 0
    while llm.kv_budget_info()["n_evictions"] < 2 or llm.kv_budget_info()["n_used"] != budget + interval - 1:
        decode(n, [tokens[n]])
        n += 1
    drafts = [tokens[n + 5], tokens[n + 9], tokens[n + 2]]  # rejected: other tokens than the ones that follow
    decode(n, drafts)
    assert llama_cpp.llama_memory_seq_rm(mem, 0, n, -1)
    decode(n, [tokens[n]])  # the accepted token takes the first draft's place (and its row)
    n += 1
    # the rows of the two later drafts (positions n and n + 1 now) still hold their queries
    stale = {(n + k) % window for k in range(len(drafts) - 1)}
    snap = _snapshot(llm)
    valid = [r for r in range(window) if r not in stale]

    def scores(st, classes):
        from morphkv_gguf import policies

        q = st["queries"].reshape(window, n_head, -1)[valid]
        k = st["keys"].reshape(-1, n_head_kv, q.shape[-1])
        return policies.layer_scores(q, k, classes.evictable, "sum", "sum", None)

    all_rows = _morphkv_reference(window, n_head, n_head_kv)
    decode(n, [tokens[n]])  # its update runs the eviction
    assert llm.kv_budget_info()["n_evictions"] == snap["n_evictions"] + 1
    _check_against_reference(llm, snap, budget, window, "head", n_head_kv, scores)
    assert _selections_differ(snap, window, budget, scores, all_rows), \
        "the stale rows changed no selection: the test would not see them used"
