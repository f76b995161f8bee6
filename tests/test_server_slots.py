"""llama-server with several slots and a budget per slot, as a real process over HTTP: concurrent long answers,
long prompts, edits and regenerations after evictions, slot save/restore, the per-slot reports, and a KV
buffer of the budgeted size. Every request is bounded (n_predict, timeouts) and the server is stopped at the end."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from conftest import require_tools
from llama_server import LlamaServer

BUDGET, N_SLOTS, N_CTX = 128, 4, 16384
N_LONG = 1200  # tokens generated per concurrent request: ~10x the budget
ARGS = ["-c", str(N_CTX), "-np", str(N_SLOTS), "-t", "2", "-ub", "256", "-b", "1024", "--no-warmup", "--no-kv-unified", "-lv", "4"]  # -lv 4: the KV buffer size in the log


@pytest.fixture(scope="module")
def server_bin():
    return require_tools("llama-server")[("llama-server", "patched")]


@pytest.fixture(scope="module")
def srv(server_bin, model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slots")
    args = ARGS + ["--kv-budget", str(BUDGET), "--slot-save-path", str(tmp / "saved"), "--metrics"]
    (tmp / "saved").mkdir()
    with LlamaServer(server_bin, model_path, tmp / "server.log", args) as s:
        yield s
        assert s.alive(), "the server stopped:\n" + s.log()[-3000:]


def _complete(srv, prompt: str, n: int, slot: int | None = None, **kw) -> dict:
    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True, "cache_prompt": True, **kw}
    if slot is not None:
        body["id_slot"] = slot
    return srv.post("/completion", body)


def _chat(srv, messages: list[dict], n: int, slot: int) -> str:
    out = srv.post("/v1/chat/completions", {"messages": messages, "max_tokens": n, "temperature": 0,
                                             "id_slot": slot, "cache_prompt": True})
    return out["choices"][0]["message"]["content"]


def test_four_concurrent_answers_past_the_budget(srv):
    """4 requests at once, one per slot, each generating 1200 tokens (~10x the budget): all complete, every
    slot evicted and holds at most the budget plus one interval, /slots and /metrics report each slot."""
    prompts = [f"Story {k}: write a long tale about a {animal}." for k, animal in
               enumerate(["fox", "whale", "crow", "bear"])]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(N_SLOTS) as pool:
        outs = list(pool.map(lambda p: _complete(srv, p, N_LONG), prompts))
    elapsed = time.monotonic() - t0
    assert all(o["tokens_predicted"] == N_LONG for o in outs), [o["tokens_predicted"] for o in outs]
    print(f"\n4 x {N_LONG} tokens with --kv-budget {BUDGET}: {elapsed:.1f} s, {4 * N_LONG / elapsed:.1f} tokens/s aggregate")

    slots = srv.get("/slots")
    assert len(slots) == N_SLOTS
    for slot in slots:
        kvb = slot["kv_budget"]
        assert kvb["n_evictions"] >= 10, kvb
        assert kvb["n_used"] <= BUDGET + 256 and kvb["n_cells"] < N_CTX // N_SLOTS, kvb
    metrics = srv.get("/metrics")
    for k in range(N_SLOTS):
        assert f'llamacpp:kv_budget_evictions_total{{slot="{k}"}}' in metrics
        assert f'llamacpp:kv_budget_cells{{slot="{k}"}}' in metrics


def test_a_2000_token_prompt(srv, data_dir):
    text = (data_dir / "sample.txt").read_text() * 4
    out = _complete(srv, text[:10000], 32)
    assert out["tokens_evaluated"] >= 2000, out["tokens_evaluated"]
    assert out["tokens_predicted"] == 32 and out["content"].strip()


def test_edit_the_first_message_and_regenerate_after_evictions(srv):
    """A chat whose first turn is answered past the budget; then the first message edited (its prefix is older
    than the last eviction: the server evaluates it again), then the last turn regenerated three times. The
    second and third regenerations both find the cache evicted past the prompt's end and evaluate the prompt
    again from the start: the same answer."""
    first = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    answer = _chat(srv, first, 400, slot=1)
    assert answer.strip()
    edited = [{"role": "user", "content": "Tell me a long story about a clockmaker."}]
    assert _chat(srv, edited, 64, slot=1).strip()
    convo = edited + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now shorten it."}]
    regen = [_chat(srv, convo, 200, slot=1) for _ in range(3)]
    assert all(r.strip() for r in regen) and regen[1] == regen[2]
    assert srv.get("/slots")[1]["kv_budget"]["n_evictions"] > 0


def test_slot_save_and_restore_gives_the_same_continuation(srv):
    """Save a slot after evictions, continue it, restore the saved state into the slot, continue again: the
    two continuations are the same tokens (temperature 0)."""
    base = _complete(srv, "The history of the printing press, in detail:", 300, slot=2)
    assert srv.get("/slots")[2]["kv_budget"]["n_evictions"] > 0
    saved = srv.post("/slots/2?action=save", {"filename": "slot2.bin"})
    assert saved["n_saved"] > 0, saved
    follow = "The history of the printing press, in detail:" + base["content"] + " In short,"
    first = _complete(srv, follow, 48, slot=2)
    _complete(srv, "Something else entirely.", 8, slot=2)  # the slot now holds other tokens
    restored = srv.post("/slots/2?action=restore", {"filename": "slot2.bin"})
    assert restored["n_restored"] == saved["n_saved"], restored
    second = _complete(srv, follow, 48, slot=2)
    assert first["content"] == second["content"]


def test_bad_requests_leave_the_server_serving(srv):
    """Requests a client may send wrong: none stops the server."""
    import urllib.error

    bad = [("/slots/99?action=save", {"filename": "x.bin"}), ("/slots/0?action=restore", {"filename": "missing.bin"}),
           ("/completion", {"prompt": "x", "n_predict": 4, "id_slot": 17}), ("/completion", {"prompt": [10**9]})]
    for path, body in bad:
        try:
            srv.post(path, body, timeout=120)
        except urllib.error.HTTPError:
            pass
        assert srv.alive(), (path, srv.log()[-2000:])
    assert _complete(srv, "Still there?", 4)["tokens_predicted"] == 4


def test_kv_buffer_is_the_budgeted_size(server_bin, model_path, srv, tmp_path):
    """The budgeted server's KV buffer is at most 1/4 of the same server's without a budget."""
    with LlamaServer(server_bin, model_path, tmp_path / "full.log", ARGS) as full:
        full_mib = full.kv_buffer_mib()
    budget_mib = srv.kv_buffer_mib()
    print(f"\nKV buffer, {N_SLOTS} slots, -c {N_CTX}: {budget_mib:.1f} MiB with --kv-budget {BUDGET}, {full_mib:.1f} MiB without")
    assert budget_mib <= full_mib / 4
