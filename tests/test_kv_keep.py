"""kv_keep: the prompt is never evicted (native/src/llama-kv-budget.cpp, llama_kv_budget_keep), through the wheel,
llama-server and the CLI: the kept positions follow the NumPy reference of the rule (policies.PromptKeep) over
several turns, every kept position is in every head of every layer after evictions, memory stays constant,
the selection of the rest follows the reference, state files carry the kept ranges, bad values are refused."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
from llama_cpp import Llama

from conftest import require_tools
from llama_server import LlamaServer
from test_kv_budget import _check_against_reference, _generate, _greedy, _heads, _llm, _morphkv_reference, _snapshot

FACTS = ("Remember these facts. The keeper's name is Ansel Varga. The ship's registry number is 4471. "
         "The lighthouse stands on Corran Point. ")
TASK = "Now write a long story about the lighthouse and the ships that pass it."


def _present_everywhere(llm: Llama, positions: set[int]) -> bool:
    """Every position is held by every KV head of every layer."""
    n_layer = llm.kv_budget_info()["n_layer"]
    for il in range(n_layer):
        for head in llm.kv_budget_positions(il):
            if not positions <= set(head[head >= 0].tolist()):
                return False
    return True


def _eval_turn(llm: Llama, text: str) -> list[int]:
    """A user turn decoded as one prompt (several tokens in a batch), continuing the cache."""
    toks = llm.tokenize(text.encode(), add_bos=False)
    llm.eval(toks)
    return toks


def _answer(llm: Llama, n: int) -> None:
    """n greedy tokens decoded one at a time."""
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])


def test_the_prompt_survives_a_long_answer_in_constant_memory(model_path):
    budget, interval = 96, 32
    llm = _llm(model_path, kv_budget=budget, kv_evict_interval=interval, kv_keep=256, logits_all=True)
    prompt = FACTS + TASK
    n_prompt = len(llm.tokenize(prompt.encode()))
    snaps: list[dict] = []
    _generate(llm, 600, prompt=prompt, snapshots=snaps)
    info = snaps[-1]
    assert info["n_evictions"] >= 10 and info["kv_keep"] == 256 and info["n_kept"] == n_prompt
    assert {s["n_cells"] for s in snaps} == {snaps[0]["n_cells"]}
    assert max(s["n_used"] for s in snaps) <= budget + n_prompt + interval
    assert _present_everywhere(llm, set(range(n_prompt)))


def test_turns_follow_the_reference_rule(model_path):
    """First prompt, answer, second turn, answer, third turn: the first and the latest turn are kept (the second
    is released and partly evicted), as policies.PromptKeep computes from the same batches."""
    from morphkv_gguf.policies import PromptKeep

    budget, interval, cap = 96, 32, 200
    llm = _llm(model_path, kv_budget=budget, kv_evict_interval=interval, kv_keep=cap, logits_all=True)
    ref = PromptKeep(cap)
    turns = [FACTS + TASK, " Make it shorter and name the ship.", " Now tell it from the ship's side."]
    for k, text in enumerate(turns):
        start = llm.n_tokens
        toks = llm.tokenize(text.encode(), add_bos=k == 0)
        llm.eval(toks)
        ref.add_batch(range(start, start + len(toks)))
        for _ in range(250):
            ref.add(llm.n_tokens, False)
            _answer(llm, 1)
        assert llm.kv_budget_info()["n_kept"] == ref.n_kept
        kept = {p for p0, p1 in ref.ranges for p in range(p0, p1)}
        assert _present_everywhere(llm, kept), (k, ref.ranges)
    second = range(ref.first[1] + 250, ref.last[0])
    assert not _present_everywhere(llm, set(second)), "the released second turn was never evicted"
    assert llm.kv_budget_info()["n_evictions"] >= 15


def test_a_prompt_past_kv_keep_keeps_its_first_tokens(model_path):
    """The engine keeps at most kv_keep positions: the rest of a longer prompt is evicted like the answer."""
    budget, cap = 96, 16
    llm = _llm(model_path, kv_budget=budget, kv_evict_interval=32, kv_keep=cap, logits_all=True)
    toks = llm.tokenize((FACTS + TASK).encode())
    llm.eval(toks[:cap])             # Python refuses a longer prompt (below); the C API keeps its first cap
    llm.eval(toks[cap:])
    _answer(llm, 300)
    assert llm.kv_budget_info()["n_kept"] == cap
    assert _present_everywhere(llm, set(range(cap)))


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_selection_with_a_kept_prompt_matches_the_numpy_reference(model_path, granularity):
    from morphkv_gguf import policies

    budget, window, interval = 96, 16, 32
    llm = _llm(model_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval, kv_keep=128,
               kv_granularity=granularity, logits_all=True)
    n_head, n_head_kv = _heads(llm)
    prompt = FACTS + TASK
    n_prompt = len(llm.tokenize(prompt.encode()))
    checked, snapshot = 0, None
    for _ in _greedy(llm, prompt):
        info = llm.kv_budget_info()
        if snapshot is not None:
            assert info["n_evictions"] == snapshot["n_evictions"] + 1
            first = snapshot["layers"][0]
            classes = policies.classify_cells(first["cell_pos"], window, composite=first["composite"],
                                              kept=[(0, n_prompt)])
            assert int(classes.protected.sum()) >= n_prompt
            _check_against_reference(llm, snapshot, budget + n_prompt, window, granularity, n_head_kv,
                                     _morphkv_reference(window, n_head, n_head_kv), kept=[(0, n_prompt)])
            checked, snapshot = checked + 1, None
            if checked == 2:
                break
        elif info["n_used"] >= budget + n_prompt + interval and info["n_evictions"] >= 1:
            snapshot = _snapshot(llm)
    assert checked == 2


def test_state_files_carry_the_kept_prompt(model_path):
    llm = _llm(model_path, kv_budget=96, kv_evict_interval=32, kv_keep=200, logits_all=True)
    prompt = FACTS + TASK
    n_prompt = len(llm.tokenize(prompt.encode()))
    _generate(llm, 300, prompt=prompt)
    state = llm.save_state()
    follow = _generate_more(llm, 40)
    _eval_turn(llm, " Something else entirely, a new turn.")
    llm.load_state(state)
    assert llm.kv_budget_info()["n_kept"] == n_prompt
    assert _generate_more(llm, 40) == follow
    assert _present_everywhere(llm, set(range(n_prompt)))


def _generate_more(llm: Llama, n: int) -> list[int]:
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_budget": 96, "kv_keep": "all"}, "kv_keep must be None, 'none', 'prompt' or a number of tokens"),
    ({"kv_budget": 96, "kv_keep": -1}, "kv_keep must be None"),
    ({"kv_keep": 64}, "set kv_budget as well"),
    ({"kv_keep": "prompt"}, "set kv_budget as well"),
    ({"kv_budget": 96, "kv_keep": 64, "kv_policy": "snapkv"}, "which kv_policy 'snapkv' compresses"),
])
def test_bad_kv_keep_values_raise_value_error(model_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _llm(model_path, **kwargs)


def test_prompt_keep_is_the_budget_and_memory_grows_by_it(model_path):
    from morphkv_gguf.gguf_info import budget_cells

    llm = _llm(model_path, kv_budget=128, kv_keep="prompt")
    info = llm.kv_budget_info()
    assert info["kv_keep"] == 128 and info["n_kept"] == 0
    assert info["n_cells"] == budget_cells(128 + 128, 64, 512)


def test_a_prompt_larger_than_kv_keep_is_refused_and_the_llama_stays_usable(model_path):
    llm = _llm(model_path, kv_budget=96, kv_keep=8)
    with pytest.raises(ValueError, match=r"the prompt \(\d+ tokens to evaluate\) is larger than kv_keep \(8"):
        llm.create_completion(FACTS + TASK, max_tokens=4)
    assert llm.kv_budget_info()["n_used"] == 0
    out = llm.create_completion("Hi there", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] == 4


def test_budget_info_reports_every_setting(model_path):
    llm = _llm(model_path, kv_budget=160, kv_window=48, kv_sinks=4, kv_keep=32, kv_fusion="max",
               kv_group_reduce="max", kv_granularity="token", kv_policy="h2o", kv_evict_interval=40)
    info = llm.kv_budget_info()
    assert (info["kv_budget"], info["kv_window"], info["kv_sinks"], info["kv_keep"], info["kv_evict_interval"]) == \
        (160, 48, 4, 32, 40)
    from llama_cpp import llama_cpp as C
    assert (info["kv_fusion"], info["kv_group_reduce"], info["kv_granularity"], info["kv_policy"]) == \
        (C.LLAMA_KV_FUSION_MAX, C.LLAMA_KV_FUSION_MAX, C.LLAMA_KV_GRANULARITY_TOKEN, C.LLAMA_KV_POLICY_H2O)


def test_llama_server_keeps_each_slots_prompt_and_refuses_a_longer_one(model_path, tmp_path):
    server_bin = require_tools("llama-server")[("llama-server", "patched")]
    args = ["-c", "8192", "-np", "2", "-t", "2", "--no-warmup", "--no-kv-unified", "--kv-budget", "96",
            "--kv-keep", "64"]
    with LlamaServer(server_bin, model_path, tmp_path / "server.log", args) as srv:
        assert srv.get("/props")["kv_budget"]["kv_keep"] == 64
        out = srv.post("/completion", {"prompt": "The keeper's name is Ansel. Write about him:", "n_predict": 300,
                                       "temperature": 0, "ignore_eos": True, "id_slot": 0})
        assert out["tokens_predicted"] == 300
        kvb = srv.get("/slots")[0]["kv_budget"]
        assert kvb["n_evictions"] > 0 and kvb["n_kept"] == out["tokens_evaluated"]
        with pytest.raises(urllib.error.HTTPError) as err:
            srv.post("/completion", {"prompt": FACTS * 4, "n_predict": 4, "id_slot": 1, "cache_prompt": False})
        assert "--kv-keep" in err.value.read().decode()
        assert srv.alive()
        assert srv.post("/completion", {"prompt": "Still there?", "n_predict": 4, "id_slot": 1, "temperature": 0,
                                      "ignore_eos": True})["tokens_predicted"] == 4
