"""``morphkv eval``: metrics, the teacher-forcing schedule, the prompt set, and a tiny end-to-end run."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from morphkv_gguf import evaluation as ev
from morphkv_gguf.cli import main


# --- metrics -------------------------------------------------------------------------------------

def test_log_softmax_and_kl_by_hand():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    q = np.array([[0.25, 0.5, 0.25], [0.1, 0.6, 0.3]])
    lp, lq = np.log(p), np.log(q)
    np.testing.assert_allclose(ev.log_softmax(lp + 3.0), lp)       # shift invariant
    kl = ev.kl_divergence(lp, lq)
    want0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    np.testing.assert_allclose(kl, [want0, 0.0], atol=1e-12)
    # zero-probability tokens of the reference contribute nothing
    with np.errstate(divide="ignore"):
        r = np.log(np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(ev.kl_divergence(r, np.log(np.array([[0.5, 0.5]]))), [math.log(2)])


def test_top1_nll_and_ratio():
    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]]))
    pol = np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    assert ev.top1_agreement(ref, pol).tolist() == [True, False, False]
    nll = ev.token_nll(pol, [0, 2, 1])
    np.testing.assert_allclose(nll, [-math.log(0.6), -math.log(0.2), -math.log(0.1)])
    full = ev.token_nll(ref, [0, 2, 1])
    assert ev.nll_ratio(nll, full) == pytest.approx(nll.mean() / full.mean())
    assert ev.nll_ratio(full, full) == pytest.approx(1.0)


def test_summary_bins_cover_the_answer():
    kl = np.arange(10, dtype=float)
    top1 = np.array([1, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)
    nll = np.full(10, 2.0)
    nll_full = np.full(10, 1.0)
    s = ev.summarize_tokens(kl, top1, nll, nll_full, n_bins=4)
    assert s["kl"] == pytest.approx(4.5) and s["top1"] == pytest.approx(0.7) and s["nll_ratio"] == pytest.approx(2.0)
    assert [(b["start"], b["end"]) for b in s["bins"]] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert s["bins"][1]["kl"] == pytest.approx(3.0)
    assert s["bins"][1]["top1"] == pytest.approx(2 / 3)


def test_dry_penalises_extending_a_repeat():
    # the answer ends with 1 2 3 4, which was followed by 5 before: 5 would extend a 4-token repeat
    assert ev.dry_penalties([1, 2, 3, 4, 5, 9, 1, 2, 3, 4], 0.8, 1.75, 4) == {5: pytest.approx(0.8)}
    assert ev.dry_penalties([1, 2, 3, 4, 5, 9, 1, 2, 3, 4], 0.8, 1.75, 2) == {5: pytest.approx(0.8 * 1.75 ** 2)}
    assert ev.dry_penalties([1, 2, 3, 4, 5, 9, 1, 2, 3, 4], 0.8, 1.75, 5) == {}
    assert ev.dry_penalties([1, 2, 3], 0.8, 1.75, 1) == {}
    assert ev.dry_penalties([1, 2, 1, 2], 0.0, 1.75, 1) == {}


def test_sampler_is_reproducible_and_masks_banned_tokens():
    logits = np.random.default_rng(0).normal(size=200)
    logits[7] = 50.0
    draws = [ev.sample_token(logits, [], np.random.default_rng(3), banned=[7]) for _ in range(2)]
    assert draws[0] == draws[1] and draws[0] != 7


# --- teacher-forcing schedule ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_pieces_reproduce_token_by_token_evictions(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        budget = int(rng.integers(8, 80))
        interval = int(rng.integers(1, 40))
        n_ubatch = int(rng.integers(1, 130))
        u0 = int(rng.integers(0, budget + interval + 60))    # after a prompt: may be past C + S
        n = int(rng.integers(1, 400))
        pieces = ev.plan_pieces(n, u0, budget, interval, n_ubatch)
        assert sum(pieces) == n and all(1 <= k <= n_ubatch for k in pieces)
        assert ev.simulate_pieces(pieces, u0, budget, interval) == ev.simulate_token_by_token(n, u0, budget, interval)
        # every piece is as large as the rule allows: one more token would skip an eviction
        u = u0
        for i, k in enumerate(pieces[:-1]):
            if u >= budget + interval:
                u = budget
            if k < n_ubatch:
                assert u + k == budget + interval, (pieces, i)
            u += k


def test_max_piece_examples():
    # C=64, S=16: after an eviction 16 tokens fit; a prompt of 100 cells evicts first
    assert ev.max_piece(64, 64, 16, 128, 1000) == 16
    assert ev.max_piece(100, 64, 16, 128, 1000) == 16
    assert ev.max_piece(70, 64, 16, 128, 1000) == 10
    assert ev.max_piece(10, 64, 16, 32, 1000) == 32            # n_ubatch caps
    assert ev.max_piece(10, 64, 16, 128, 5) == 5               # the tokens left cap
    assert ev.max_piece(10, None, 16, 128, 1000) == 128        # full cache
    assert ev.plan_pieces(300, 120, 64, 16, 128, first_single=True) == [1, 128, 128, 43]


def test_budget_refusals_are_predicted():
    assert ev.budget_problem(ev.POLICIES["morphkv"], 32, 32)
    assert ev.budget_problem(ev.POLICIES["morphkv"], 33, 32) is None
    assert ev.budget_problem(ev.POLICIES["streaming"], 36, 32)     # 4 sinks
    assert ev.budget_problem(ev.POLICIES["full"], 1, 32) is None


def test_parse_lists():
    assert ev.parse_budgets("256, 64,64") == [64, 256]
    for bad in ("", "64,abc", "0", "-5"):
        with pytest.raises(ev.EvalError):
            ev.parse_budgets(bad)
    assert ev.parse_policies("full,morphkv,full") == ["full", "morphkv"]
    with pytest.raises(ev.EvalError, match="accepted: full, full-shift, morphkv"):
        ev.parse_policies("full,lru")


def test_policy_variants():
    v = ev.resolve_policy("morphkv:window=64:sinks=4:fusion=max")
    assert v.name == "morphkv:window=64:sinks=4:fusion=max" and v.native == "morphkv" and v.budgeted
    assert v.kv["kv_window"] == 64 and v.kv["kv_sinks"] == 4 and v.kv["kv_fusion"] == "max"
    assert v.kv["kv_granularity"] == "head"                        # the rest from the base policy
    assert ev.budget_problem(v, 68, 32) and ev.budget_problem(v, 69, 32) is None   # its own window counts
    assert ev.parse_policies("full,morphkv:sinks=4") == ["full", "morphkv:sinks=4"]
    for bad, why in (("morphkv:win=3", "key one of window"), ("full:window=8", "takes no setting 'window'"),
                     ("morphkv:fusion=avg", "accepted: sum, max"), ("morphkv:window=x", "an integer"),
                     ("morphkv:window=0", "too small"), ("lru:window=8", "unknown policy")):
        with pytest.raises(ev.EvalError, match=why):
            ev.resolve_policy(bad)



def test_window_and_recent_as_a_share_of_the_budget():
    v = ev.resolve_policy("morphkv-max:window=32:recent=3C/4:sinks=4")
    assert (v.window(16, 256), v.recent(256), v.recent(64)) == (32, 192, 48)
    assert ev.resolve_policy("morphkv:window=c/2").window(32, 128) == 64
    assert ev.budget_problem(v, 64, 32) is None                      # 48 recent + 4 sinks < 64
    assert "protected recent tokens 64" in ev.budget_problem(ev.resolve_policy("morphkv:recent=64"), 64, 32)
    assert ev.resolve_policy("morphkv").recent(256) == 0               # 0: the window alone
    d = ev.POLICIES["morphkv-default"]                                 # the library's defaults, pinned
    assert (d.kv["kv_fusion"], d.kv["kv_sinks"], d.recent(512)) == ("max", 4, 384)
    for bad in ("morphkv:window=C/1", "morphkv:recent=5C/4", "morphkv:window=xC", "morphkv:recent=0C/2"):
        with pytest.raises(ev.EvalError, match="a share of the budget below 1"):
            ev.resolve_policy(bad)


def test_cache_type_variants_and_memory_matched_budgets(model_path):
    full_q8 = ev.resolve_policy("full:type=q8_0")
    assert (full_q8.cache_type, full_q8.budgeted, full_q8.kv) == ("q8_0", False, {})
    assert ev.resolve_policy("streaming:type=q4_0:sinks=2").cache_type == "q4_0"
    assert ev.POLICIES["morphkv"].cache_type == "f16"
    with pytest.raises(ev.EvalError, match="accepted: f32, f16"):
        ev.resolve_policy("full:type=q3_k")
    # SmolLM2: 30 layers x 3 KV heads x 64 values for K and V; q8_0 stores 32 values in 34 bytes, q4_0 in 18
    shape = ev.read_model_shape(model_path)
    per_cell = {t: ev.kv_bytes_per_token(shape, t) for t in ("f16", "q8_0", "q4_0")}
    assert per_cell == {"f16": 30 * 2 * 3 * 64 * 2, "q8_0": 30 * 2 * 3 * 2 * 34, "q4_0": 30 * 2 * 3 * 2 * 18}
    assert ev.memory_matched_budget(256, "f16", per_cell) == 256
    assert ev.memory_matched_budget(256, "q8_0", per_cell) == 481        # 256 * 64 / 34
    assert ev.memory_matched_budget(256, "q4_0", per_cell) == 910        # 256 * 64 / 18
    for t in ("q8_0", "q4_0"):
        assert ev.memory_matched_budget(256, t, per_cell) * per_cell[t] <= 256 * per_cell["f16"]


def test_memory_matched_eval(model_path, tmp_path):
    """f16 at C and q8_0 at the cells of the same bytes, in one run: the table and plot of equal memory."""
    cfg = ev.EvalConfig(model=model_path, policies=["full", "full:type=q8_0", "streaming", "streaming:type=q8_0"],
                        budgets=[64], answer_tokens=80, split="dev", n_prompts=1, window=16, interval=16, threads=1,
                        cache_dir=tmp_path / "cache", memory_matched=True)
    doc = ev.run_eval(cfg, log=lambda s: None)
    runs = {r["policy"]: r for r in doc["prompts"][0]["runs"]}
    f16, q8 = runs["streaming"], runs["streaming:type=q8_0"]
    assert (f16["budget"], f16["cache_type"], q8["budget"], q8["cache_type"]) == (64, "f16", 120, "q8_0")
    assert f16["matched_budget"] == q8["matched_budget"] == 64 and runs["full"]["matched_budget"] is None
    assert q8["n_evictions"] > 0 and q8["held_bytes_end"] <= f16["held_bytes_end"]
    assert q8["kv_bytes_allocated"] / q8["n_cells"] == pytest.approx(f16["kv_bytes_allocated"] / f16["n_cells"] * 34 / 64)
    # quantising the full cache alone costs little, and fewer bytes
    assert runs["full:type=q8_0"]["kl"] < 0.05 and runs["full:type=q8_0"]["held_bytes_end"] < runs["full"]["held_bytes_end"]
    paths = ev.write_outputs(doc, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "## Equal KV memory" in md and "| 64 | streaming:type=q8_0 | q8_0 | 120 |" in md
    assert paths["kl_vs_memory"].read_bytes()[:4] == b"\x89PNG"


# --- prompts -------------------------------------------------------------------------------------

def test_prompt_set():
    every = ev.load_prompts("all")
    assert len(every) >= 20
    assert len({p["id"] for p in every}) == len(every)
    dev, test = ev.load_prompts("dev"), ev.load_prompts("test")
    assert 5 <= len(dev) <= 7 and len(dev) + len(test) == len(every)
    assert ev.load_prompts("test", 3) == test[:3]
    for p in every:
        assert {f["kind"] for f in p["facts"]} == {"pass_key", "name", "number"}
        for f in p["facts"]:
            assert f["answer"] in f["statement"] and f["answer"] not in f["question"]
            assert f["answer"] in ev.user_message(p)
    with pytest.raises(ev.EvalError):
        ev.load_prompts("train")


# --- end to end (the default model, a few tokens) -----------------------------------------------------

def test_cli_errors_are_one_line():
    runner = CliRunner()
    for args, msg in ((["--budgets", "64,x"], "bad budget 'x'"), (["--policies", "full,lru"], "unknown policy 'lru'"),
                      (["-m", "/no/such/model.gguf"], "model file not found")):
        res = runner.invoke(main, ["eval", *args])
        assert res.exit_code == 1, res.output
        assert msg in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory, model_path):
    """1 dev prompt, 96 answer tokens; full, full-shift, morphkv at C=64 (W=16, S=16) and at a budget past the
    sequence."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = ev.EvalConfig(model=model_path, policies=["full", "full-shift", "morphkv"], budgets=[64, 2048], answer_tokens=96,
                        split="dev", n_prompts=1, window=16, interval=16, threads=1, cache_dir=tmp / "cache")
    doc = ev.run_eval(cfg, log=lambda s: None)
    paths = ev.write_outputs(doc, tmp / "out")
    return cfg, doc, paths


def test_tiny_eval_writes_json_markdown_and_plots(tiny_eval):
    cfg, doc, paths = tiny_eval
    saved = json.loads(paths["json"].read_text())
    assert [r["policy"] for r in saved["prompts"][0]["runs"]] == ["full", "full-shift", "morphkv", "morphkv"]
    md = paths["markdown"].read_text()
    assert "| morphkv | 64 |" in md and "| full | - |" in md
    for name in ("kl_vs_budget", "kl_by_position", "memory_vs_length"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    # the reference answer is cached: a second run reads it back
    p = saved["prompts"][0]
    assert p["n_answer_tokens"] == 96 and not p["reference_cached"]
    doc2 = ev.run_eval(ev.EvalConfig(**{**cfg.__dict__, "policies": ["full"]}), log=lambda s: None)
    assert doc2["prompts"][0]["reference_cached"]
    assert doc2["prompts"][0]["runs"][0]["nll"] == pytest.approx(p["runs"][0]["nll"], rel=1e-9)


def test_tiny_eval_sanity(tiny_eval):
    _, doc, _ = tiny_eval
    runs = {(r["policy"], r["budget"]): r for r in doc["prompts"][0]["runs"]}
    full, small, large = runs[("full", None)], runs[("morphkv", 64)], runs[("morphkv", 2048)]
    assert full["kl"] == 0 and full["top1"] == 1 and full["nll_ratio"] == pytest.approx(1.0)
    # a budget larger than the whole sequence never evicts: the same distributions as the full cache
    assert large["n_evictions"] == 0
    assert large["kl"] < 1e-3 and large["top1"] >= 0.98
    assert small["n_evictions"] > 0 and small["kl"] > large["kl"]
    # the same full cache fed in other batches: only llama.cpp's batching numerics differ
    shifted = runs[("full-shift", None)]
    assert shifted["n_evictions"] == 0 and shifted["kl"] < 0.05 and small["kl"] > shifted["kl"]
    # memory: the budgeted cache holds one constant buffer, the full cache grows with the answer
    assert len({m for _, _, m in small["memory_trace"]}) == 1
    mem_full = [m for _, _, m in full["memory_trace"]]
    assert mem_full == sorted(mem_full) and mem_full[-1] > mem_full[0]
    assert full["memory_trace"][-1][0] == 96


def test_full_cache_against_itself(model_path, tmp_path):
    """Two independent full-cache sessions read the same sequence identically: KL ~0, top-1 = 1."""
    prompt = ev.load_prompts("dev", 1)[0]
    tok = ev.vocab_llama(model_path)
    try:
        answer = tok.tokenize(b" Once upon a time there was a lighthouse keeper named Elias who kept a ledger.",
                              add_bos=False)
        seq = ev.ChatFormat(tok).build(prompt, answer)
    finally:
        tok.close()
    common = dict(window=16, interval=16, n_ubatch=64, threads=1, seed=1)
    first = ev.teacher_force(model_path, seq, ev.POLICIES["full"], None, keep_lp=True, **common)
    second = ev.teacher_force(model_path, seq, ev.POLICIES["full"], None, lp_full=first.lp, **common)
    assert second.kl.max() < 1e-6 and second.top1.all()
    np.testing.assert_allclose(second.nll, first.nll, rtol=1e-6)
    assert [r["exact"] for r in second.recall] == [r["exact"] for r in first.recall]


def test_cli_eval_tiny(model_path, tmp_path):
    res = CliRunner().invoke(main, ["eval", "--policies", "full,morphkv", "--budgets", "64", "--answer-tokens", "16",
                                    "--prompts", "1", "--split", "dev", "--window", "16", "--interval", "16",
                                    "--threads", "1", "--out", str(tmp_path / "out"),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "| morphkv | 64 |" in res.output
    assert (tmp_path / "out" / "eval.json").exists() and (tmp_path / "out" / "memory_vs_length.png").exists()


def test_jobs_give_the_same_results_as_one_process(tiny_eval, model_path, tmp_path):
    """Prompts evaluated in worker processes: same figures, same prompt order as one process."""
    cfg = tiny_eval[0]
    base = dict(model=model_path, policies=["full", "morphkv:window=8"], budgets=[48], answer_tokens=64, split="dev",
                n_prompts=2, window=16, interval=16, threads=2, cache_dir=cfg.cache_dir)
    one = ev.run_eval(ev.EvalConfig(**base), log=lambda s: None)
    two = ev.run_eval(ev.EvalConfig(**base, jobs=2), log=lambda s: None)
    assert [p["id"] for p in two["prompts"]] == [p["id"] for p in one["prompts"]]
    for a, b in zip(one["prompts"], two["prompts"]):
        assert [(r["policy"], r["budget"], r["kl"], r["nll"]) for r in a["runs"]] == \
               [(r["policy"], r["budget"], r["kl"], r["nll"]) for r in b["runs"]]
    assert two["config"]["jobs"] == 2 and two["config"]["backend"] == "cpu"


def test_cli_render_saved_results(tiny_eval, tmp_path):
    doc = tiny_eval[1]
    saved = tmp_path / "saved" / "eval.json"
    saved.parent.mkdir()
    saved.write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["eval", "--render", str(saved), "--out", str(tmp_path / "re")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "re" / "eval.md").read_text() == ev.markdown_report(doc)
    assert (tmp_path / "re" / "kl_vs_budget.png").stat().st_size > 0
    # the recorded runs in results/ are kept gzip-compressed: the same document, the same tables
    packed = tmp_path / "saved" / "eval.json.gz"
    packed.write_bytes(gzip.compress(saved.read_bytes()))
    assert ev.load_results(packed) == doc
    r = CliRunner().invoke(main, ["eval", "--render", str(packed), "--out", str(tmp_path / "re-gz")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "re-gz" / "eval.md").read_text() == ev.markdown_report(doc)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    r = CliRunner().invoke(main, ["eval", "--render", str(bad)])
    assert r.exit_code != 0 and "not an eval.json results file" in r.output
