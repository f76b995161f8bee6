"""`morphkv eval --prompts-file`: a user's prompts in the packaged schema, checked entry by entry with errors that
name the entry and the field; prompts without facts are scored for fidelity only."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from morphkv_gguf import evaluation as ev
from morphkv_gguf.cli import main
from morphkv_gguf.eval_prompts import DATA_FILE, PromptsFileError, parse_prompts, read_prompts_file

FACT = {"statement": "The pass key is 4242.", "question": "What is the pass key?", "answer_prefix": "The pass key is",
        "answer": "4242"}


def test_the_packaged_prompts_follow_the_schema():
    prompts = read_prompts_file(DATA_FILE)
    assert len(prompts) >= 20 and all(p["facts"] for p in prompts)


def test_defaults_for_optional_fields():
    [p] = parse_prompts([{"id": "a", "task": "Write."}])
    assert (p["split"], p["type"], p["facts"]) == ("test", "task", [])
    [p] = parse_prompts({"prompts": [{"id": "a", "task": "Write.", "facts": [FACT]}]})
    assert p["facts"][0]["kind"] == "fact"
    assert ev.user_message({"task": "Write.", "facts": []}) == "Write."


@pytest.mark.parametrize("doc, words", [
    ({"prompts": "x"}, "expected a list of prompts"),
    ([], "holds no prompts"),
    ([{"task": "Write."}], "prompt 1: field 'id' is missing"),
    ([{"id": "a", "task": ""}], "prompt 1 ('a'): field 'task' must be a non-empty string"),
    ([{"id": "a", "task": "W"}, {"id": "a", "task": "W"}], "prompt 2 ('a'): the id 'a' is used twice"),
    ([{"id": "a", "task": "W", "split": "train"}], "field 'split' must be one of dev, test (got 'train')"),
    ([{"id": "a", "task": "W", "facts": {"x": 1}}], "field 'facts' must be a list"),
    ([{"id": "a", "task": "W", "facts": [{**FACT, "answer": 4242}]}], "fact 1: field 'answer' must be a non-empty"),
    ([{"id": "b", "task": "W", "facts": [FACT, {"statement": "s"}]}], "prompt 1 ('b'), fact 2: field 'question' is missing"),
    ([7], "prompt 1: expected an object"),
])
def test_malformed_prompts_name_the_entry_and_the_field(doc, words):
    with pytest.raises(PromptsFileError, match="^mine.json: ") as e:
        parse_prompts(doc, "mine.json")
    assert words in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(PromptsFileError, match="no such prompts file"):
        read_prompts_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompts": [\n  {"id": "a",, }]}')
    with pytest.raises(PromptsFileError, match=r"bad.json: not valid JSON \(line 2, column"):
        read_prompts_file(bad)
    only_dev = tmp_path / "dev.json"
    only_dev.write_text(json.dumps([{"id": "a", "task": "W", "split": "dev"}]))
    with pytest.raises(ev.EvalError, match="no prompts in the test split .it has: dev."):
        ev.load_prompts("test", path=only_dev)


def test_cli_bad_file_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps([{"id": "a", "task": "W", "facts": [{"statement": "s"}]}]))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["eval", "--prompts-file", str(bad), "--out", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and "fact 1: field 'question' is missing" in res.output
    assert not out.exists()


def test_cli_eval_on_a_prompts_file_with_and_without_facts(model_path, tmp_path):
    prompts = tmp_path / "mine.json"
    prompts.write_text(json.dumps({"prompts": [
        {"id": "plain", "task": "Describe a walk along a river at dawn."},
        {"id": "with-fact", "task": "Write a short poem about the sea.", "facts": [FACT]},
    ]}))
    res = CliRunner().invoke(main, ["eval", "--prompts-file", str(prompts), "--policies", "full,morphkv",
                                    "--budgets", "64", "--answer-tokens", "24", "--window", "16", "--interval", "16",
                                    "--threads", "2", "--out", str(tmp_path / "out"),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [p["id"] for p in doc["prompts"]] == ["plain", "with-fact"]
    assert doc["config"]["prompts_file"] == str(prompts)
    runs = {p["id"]: p["runs"] for p in doc["prompts"]}
    assert all(r["recall_exact"] is None for r in runs["plain"])
    assert all(r["recall_exact"] is not None for r in runs["with-fact"])
