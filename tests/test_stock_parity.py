"""With no budget set, the patched build behaves exactly like stock: same greedy tokens, same perplexity.

Both trees' tools run in the same test session on the same input (scripts/setup.sh --tools builds them).
"""

from __future__ import annotations

import re
import subprocess

from conftest import require_tools

PROMPT = "Write a short note about lighthouses and the people who keep them."


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_patched_and_stock_generate_the_same_greedy_tokens(model_path):
    tools = require_tools("llama-completion")
    outputs = {}
    for tree in ("patched", "stock"):
        proc = _run([str(tools[("llama-completion", tree)]), "-m", str(model_path), "-p", PROMPT,
                     "-n", "64", "--temp", "0", "--seed", "1", "--ignore-eos", "-no-cnv", "-t", "2",
                     "-c", "512", "--no-display-prompt", "--simple-io", "--no-warmup"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[tree] = proc.stdout
        marker = "MORPHKV = " in proc.stderr
        assert marker == (tree == "patched"), f"{tree} build's system_info marker is wrong"
    assert outputs["patched"].strip(), "no text generated"
    assert outputs["patched"] == outputs["stock"]


def _perplexity(tool, model_path, text_path) -> str:
    proc = _run([str(tool), "-m", str(model_path), "-f", str(text_path), "-c", "128", "-b", "128",
                 "--chunks", "4", "-t", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, (proc.stdout + proc.stderr)[-2000:]
    return m.group(0)


def test_patched_and_stock_give_the_same_perplexity(model_path, data_dir):
    tools = require_tools("llama-perplexity")
    text = data_dir / "sample.txt"
    patched = _perplexity(tools[("llama-perplexity", "patched")], model_path, text)
    stock = _perplexity(tools[("llama-perplexity", "stock")], model_path, text)
    assert patched == stock
    assert 1.0 < float(patched.split("=")[1].split()[0]) < 1000.0
