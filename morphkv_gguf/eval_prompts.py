"""The prompts ``morphkv eval`` runs: the packaged set (``data/eval_prompts.json``) or a file of one's own.

A prompts file is JSON, either ``{"prompts": [...]}`` or the list itself. Each prompt::

    {
      "id": "story-lighthouse",            # required, unique: names the prompt in the results
      "task": "Write a long story ...",    # required: what the user asks for (the long answer)
      "split": "test",                     # optional, "dev" or "test" [test]; --split selects
      "type": "story",                     # optional, a label for the results [task]
      "facts": [                           # optional: stated before the task, asked about after the answer
        {"statement": "The pass key is 93571.",          # said in the prompt
         "question": "What is the pass key?",             # asked after the answer
         "answer_prefix": "The pass key is",              # the start of the reply, forced
         "answer": "93571",                                # what recall checks (exact match of its tokens)
         "kind": "pass_key"}                               # optional label [fact]
      ]
    }

Prompts without facts are scored for fidelity (KL, top-1, NLL) only; their recall columns stay empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).parent / "data" / "eval_prompts.json"
SPLITS = ("dev", "test")
FACT_FIELDS = ("statement", "question", "answer_prefix", "answer")


class PromptsFileError(ValueError):
    """A prompts file that cannot be read or does not follow the schema (the message names the entry and field)."""


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _check_fact(where: str, j: int, fact: Any) -> dict:
    at = f"{where}, fact {j + 1}"
    if not isinstance(fact, dict):
        raise PromptsFileError(f"{at}: expected an object with {', '.join(FACT_FIELDS)} (got {type(fact).__name__})")
    for key in FACT_FIELDS:
        if key not in fact:
            raise PromptsFileError(f"{at}: field {key!r} is missing (a fact needs {', '.join(FACT_FIELDS)})")
        if not _text(fact[key]):
            raise PromptsFileError(f"{at}: field {key!r} must be a non-empty string (got {fact[key]!r})")
    if "kind" in fact and not _text(fact["kind"]):
        raise PromptsFileError(f"{at}: field 'kind' must be a non-empty string (got {fact['kind']!r})")
    return {**fact, "kind": fact.get("kind", "fact")}


def _check_prompt(source: str, i: int, entry: Any, seen: set[str]) -> dict:
    where = f"{source}: prompt {i + 1}"
    if not isinstance(entry, dict):
        raise PromptsFileError(f"{where}: expected an object with 'id' and 'task' (got {type(entry).__name__})")
    if "id" in entry and _text(entry["id"]):
        where += f" ({entry['id']!r})"
    for key in ("id", "task"):
        if key not in entry:
            raise PromptsFileError(f"{where}: field {key!r} is missing (every prompt needs 'id' and 'task')")
        if not _text(entry[key]):
            raise PromptsFileError(f"{where}: field {key!r} must be a non-empty string (got {entry[key]!r})")
    if entry["id"] in seen:
        raise PromptsFileError(f"{where}: the id {entry['id']!r} is used twice (ids name the prompts in the results)")
    seen.add(entry["id"])
    split = entry.get("split", "test")
    if split not in SPLITS:
        raise PromptsFileError(f"{where}: field 'split' must be one of {', '.join(SPLITS)} (got {split!r})")
    if "type" in entry and not _text(entry["type"]):
        raise PromptsFileError(f"{where}: field 'type' must be a non-empty string (got {entry['type']!r})")
    facts = entry.get("facts", [])
    if not isinstance(facts, list):
        raise PromptsFileError(f"{where}: field 'facts' must be a list of facts (got {type(facts).__name__})")
    return {**entry, "split": split, "type": entry.get("type", "task"),
            "facts": [_check_fact(where, j, f) for j, f in enumerate(facts)]}


def parse_prompts(doc: Any, source: str = "prompts") -> list[dict]:
    """The prompts of a parsed prompts document, checked against the schema; PromptsFileError names what is wrong."""
    entries = doc.get("prompts") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise PromptsFileError(f"{source}: expected a list of prompts or an object with a 'prompts' list")
    if not entries:
        raise PromptsFileError(f"{source}: the file holds no prompts")
    seen: set[str] = set()
    return [_check_prompt(source, i, e, seen) for i, e in enumerate(entries)]


def read_prompts_file(path: Path = DATA_FILE) -> list[dict]:
    """Every prompt of a prompts file (the packaged one by default), checked."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PromptsFileError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsFileError(f"{path}: cannot be read ({e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptsFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return parse_prompts(doc, str(path))
