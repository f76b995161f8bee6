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
    assert result.output.strip().splitlines() == [f"Error: model file not found: {tmp_path / 'nope.gguf'} (expected a .gguf file)"]


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
