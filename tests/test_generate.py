"""The default model loads and generates with the rebuilt wheel; the CLI reports errors in one line."""

from __future__ import annotations

import json

from click.testing import CliRunner
from llama_cpp import Llama

from morphkv_gguf.cli import main
from morphkv_gguf.models import DEFAULT_MODEL_FILE


def test_default_model_comes_from_the_installed_package(model_path):
    assert model_path.as_posix().endswith(DEFAULT_MODEL_FILE)
    assert model_path.read_bytes()[:4] == b"GGUF"


def test_default_model_generates_32_tokens_greedily(model_path):
    llm = Llama(model_path=str(model_path), n_ctx=256, n_threads=2, seed=1, verbose=False)
    eos = llm.token_eos()
    kwargs = dict(max_tokens=32, temperature=0.0, logit_bias={eos: float("-inf")})
    first = llm.create_completion("The three primary colours are", **kwargs)
    second = llm.create_completion("The three primary colours are", **kwargs)
    assert first["usage"]["completion_tokens"] == 32
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["choices"][0]["text"].strip()
    assert first["choices"][0]["text"] == second["choices"][0]["text"], "greedy decoding must be deterministic"


def test_cli_info_reports_patched_build():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["patched"] is True
    assert facts["default_model"].endswith(DEFAULT_MODEL_FILE)


def test_cli_generate_json(model_path):
    result = CliRunner().invoke(main, ["generate", "Say hello.", "-n", "8", "--json", "-t", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["usage"]["completion_tokens"] >= 1
    assert out["timings"]["tokens_per_s"] > 0


def test_cli_missing_model_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["generate", "hi", "-m", str(tmp_path / "nope.gguf")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: model file not found: {tmp_path / 'nope.gguf'} "
                                                  "(expected a .gguf file or one of the short names smollm2, gemma3-270m)"]


def test_cli_non_gguf_file_is_one_line_error(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("definitely not a model")
    result = CliRunner().invoke(main, ["generate", "hi", "-m", str(bogus)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "not a GGUF file" in lines[0]


def test_cli_bad_option_value_is_rejected():
    result = CliRunner().invoke(main, ["generate", "hi", "-n", "0"])
    assert result.exit_code == 2
    assert "Invalid value for '-n' / '--max-tokens'" in result.output


def test_cli_generate_with_a_budget_reports_constant_memory():
    # --ubatch 16: the cache holds 256 cells (64 + 16, padded), fewer than the 300+ tokens generated
    args = ["generate", "Write a long story about a harbour.", "-n", "300", "--ignore-eos", "--json", "-t", "2",
            "--kv-budget", "64", "--kv-window", "16", "--kv-evict-interval", "16", "--ubatch", "16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    mem = out["memory"]
    assert out["usage"]["completion_tokens"] == 300
    assert mem["budget_active"] and mem["n_evictions"] >= 10 and mem["n_cells"] == 256
    assert mem["n_used"] <= 64 + 16
    assert mem["kv_bytes"] < mem["full_cache_bytes_for_tokens"]
    assert out["kv_settings"]["kv_budget"] == 64


def test_cli_budget_not_above_the_window_is_one_line_error():
    result = CliRunner().invoke(main, ["generate", "hi", "--kv-budget", "32"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: kv_budget (32) must be greater than kv_window (32) + kv_sinks (4): the budget includes the "
        "protected recent window and sinks"]


def test_cli_chat_streams_turns_and_reports_memory():
    script = "Hello, who are you?\n/reset\nTell me about lighthouses.\n/exit\n"
    result = CliRunner().invoke(main, ["chat", "-n", "40", "-t", "2", "--temperature", "0", "--kv-budget", "48",
                                       "--kv-window", "16", "--kv-evict-interval", "16"], input=script)
    assert result.exit_code == 0, result.output
    assert "[new conversation]" in result.output
    status = [line for line in result.output.splitlines() if "KV cache" in line]
    assert len(status) == 2 and all("cells" in line for line in status)
