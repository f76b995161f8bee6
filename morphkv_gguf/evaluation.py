"""Long-answer fidelity, recall and memory of the KV policies (``morphkv eval``).

For each prompt of ``data/eval_prompts.json`` the full cache generates a reference answer once
(sampled, EOS masked, cached on disk). Every policy then reads the same prompt + reference answer +
recall questions with teacher forcing, fed in pieces that keep the native eviction schedule exactly
as in token-by-token generation (``max_piece``), and is compared with the full cache token by token:

* KL(full || policy) of the next-token distributions, top-1 agreement, NLL of the reference tokens
  (ratio to the full cache), overall and per position bin of the answer;
* recall: facts stated before the task are asked about after the answer; the assistant's reply is
  forced to "<answer prefix> <answer>": probability of the answer tokens, and exact match = every
  answer token is the argmax given the right prefix (which is what greedy decoding of those tokens
  would produce, since greedy decoding is deterministic);
* memory: the KV bytes of the cache as the answer grows, from ``kv_budget_info()``.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import math
import os
import sys
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .gguf_info import KV_CACHE_TYPES as CACHE_TYPES, kv_bytes_per_token, read_model_shape
from .models import resolve_model
from .workers import worker_init

DATA_FILE = Path(__file__).parent / "data" / "eval_prompts.json"
DEFAULT_CACHE_DIR = Path(os.environ.get("MORPHKV_EVAL_CACHE", Path.home() / ".cache" / "morphkv-gguf" / "eval"))

DEFAULT_BUDGETS = (64, 128, 256, 512)
DEFAULT_ANSWER_TOKENS = 2048
QUICK = {"prompts": 4, "answer_tokens": 1024, "budgets": (64, 256),
         "policies": ("full", "full-shift", "morphkv", "streaming", "h2o", "snapkv")}
SPLITS = ("dev", "test", "all")
N_BINS = 4

# the reference answers' sampler (our own, in NumPy, so that it is reproducible and independent of
# llama-cpp-python's sampler chain): repeat penalty, DRY, top-k, temperature, top-p, EOS masked.
# DRY (llama.cpp's "don't repeat yourself" penalty, over the answer): without it small models fall
# into verbatim paragraph loops late in long answers, which the full cache then predicts by copying
# from far back; the position bins would measure that artifact rather than long-answer fidelity.
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "repeat_last_n": 64,
            "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 4}

FACTS_INTRO = "Remember these facts; I will ask you about them after your answer."
# base models (no chat template): the facts in prose, the task, the answer as a continuation; each recall
# question as "Question: ... / Answer:" continued by the forced reply
PLAIN_FACTS = "Facts to remember: "


class EvalError(ValueError):
    """A bad evaluation setting; the message says what is accepted."""


# ---------------------------------------------------------------------------------------------
# policies

@dataclass(frozen=True)
class Policy:
    name: str
    kv: dict                # Llama kv_* keyword arguments besides kv_budget (empty for the full cache)
    grows: bool             # the cache in use grows with the answer (full, snapkv)
    native: str | None      # the native kv_policy, None for the full cache
    description: str
    first_single: bool = False  # the first answer token is decoded alone (SnapKV compresses then)
    cache_type: str = "f16"     # K and V cache type (a "type=q8_0" variant)

    @property
    def budgeted(self) -> bool:
        return self.native is not None

    def sinks(self) -> int:
        return int(self.kv.get("kv_sinks", 0))

    def window(self, default: int, budget: int | None = None) -> int:
        """W: the variant's own (an integer, or a share of the budget such as "C/2", "3C/4"), else default."""
        return _cells(self.kv.get("kv_window", default), budget, 1)

    def recent(self, budget: int | None = None) -> int:
        """R: recent tokens protected beyond the window (kv_recent; 0 = the window)."""
        return _cells(self.kv.get("kv_recent", 0), budget, 0)

    @property
    def keeps_prompt(self) -> bool:
        """kv_keep: the prompt is kept besides the budget, so the answer is read one token at a time (a token
        decoded with others of its sequence counts as the user's)."""
        return bool(self.kv.get("kv_keep"))


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("full", {}, True, None, "stock full cache (flash attention)"),
    Policy("full-shift", {}, True, None, "the full cache read in pieces shifted by one token (the first answer token "
           "alone, as SnapKV reads it): the numerical noise floor of batching; llama.cpp's results depend slightly "
           "on how tokens are grouped into batches", first_single=True),
    Policy("morphkv", {"kv_fusion": "sum", "kv_group_reduce": "sum", "kv_granularity": "head"}, False, "morphkv",
           "MorphKV, sum fusion, per-head selection"),
    Policy("morphkv-max", {"kv_fusion": "max", "kv_group_reduce": "max", "kv_granularity": "head"}, False, "morphkv",
           "MorphKV, max fusion and max over the query-head group, per-head selection"),
    Policy("morphkv-default", {"kv_fusion": "max", "kv_group_reduce": "max", "kv_granularity": "head", "kv_sinks": 4,
                               "kv_recent": "3C/4"}, False, "morphkv",
           "MorphKV with the library's defaults: max fusion and group reduce, 4 sinks, the last 3C/4 tokens kept, "
           "the last W of them scoring"),
    Policy("morphkv-token", {"kv_fusion": "sum", "kv_group_reduce": "sum", "kv_granularity": "token"}, False,
           "morphkv", "MorphKV, sum fusion, one selection for all heads and layers"),
    Policy("streaming", {"kv_sinks": 4}, False, "streaming", "StreamingLLM: 4 sink tokens + the most recent"),
    Policy("h2o", {}, False, "h2o", "H2O: accumulated attention (heavy hitters) + the recent window"),
    Policy("snapkv", {}, True, "snapkv", "SnapKV: compress the prompt once, then keep every answer token",
           first_single=True),
)}
ALL_POLICIES = tuple(POLICIES)

# settings a policy variant may change: "morphkv:window=64:sinks=4" (for tuning on the dev split); "type" (the K/V
# cache type) applies to every policy, the full cache included
VARIANT_KEYS = {"window": "kv_window", "sinks": "kv_sinks", "fusion": "kv_fusion", "group": "kv_group_reduce",
                "granularity": "kv_granularity", "interval": "kv_evict_interval", "keep": "kv_keep",
                "recent": "kv_recent", "type": "cache_type"}
_VARIANT_VALUES = {"kv_fusion": ("sum", "max"), "kv_group_reduce": ("sum", "max"),
                   "kv_granularity": ("head", "token")}


def _cells(value: int | str, budget: int | None, minimum: int) -> int:
    if isinstance(value, str):
        num, den = window_share(value)
        return max(minimum, (budget or 0) * num // den)
    return int(value)


def window_share(value: str) -> tuple[int, int]:
    """"C/2" -> (1, 2), "3C/4" -> (3, 4): a window as a share of the budget C (0 < share < 1)."""
    m = re.fullmatch(r"(\d*)[cC]/(\d+)", value.strip())
    num, den = (int(m.group(1) or 1), int(m.group(2))) if m else (0, 0)
    if not m or den == 0 or not 0 < num < den:
        raise EvalError(f"bad window {value!r} (expected an integer, or a share of the budget below 1 such as C/2, 3C/4)")
    return num, den


def resolve_policy(spec: str) -> Policy:
    """A policy by name, or a variant of a budgeted one: ``NAME:key=value[:key=value...]`` with keys
    window and recent (an integer, or a share of the budget: C/2, 3C/4), sinks, interval (integers), fusion, group
    (sum|max), granularity (head|token), keep (prompt or an integer: kv_keep, the prompt kept besides the budget) and
    type (the K/V cache type: f16, q8_0, q4_0, ...; the one setting the full cache takes too)."""
    name, *settings = [part.strip() for part in spec.split(":")]
    if name not in POLICIES:
        raise EvalError(f"unknown policy {name!r} (accepted: {', '.join(ALL_POLICIES)}, or NAME:key=value variants)")
    base = POLICIES[name]
    if not settings:
        return base
    kv = dict(base.kv)
    cache_type = base.cache_type
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise EvalError(f"bad policy setting {item!r} in {spec!r} (expected key=value with key one of "
                            f"{', '.join(VARIANT_KEYS)})")
        kv_key = VARIANT_KEYS[key]
        if not base.budgeted and kv_key != "cache_type":
            raise EvalError(f"policy {name!r} takes no setting {key!r} (only type=...; the others are for budgeted "
                            f"policies)")
        if kv_key == "cache_type":
            if value not in CACHE_TYPES:
                raise EvalError(f"bad type {value!r} in {spec!r} (accepted: {', '.join(CACHE_TYPES)})")
            cache_type = value
        elif kv_key == "kv_keep" and value == "prompt":
            kv[kv_key] = value
        elif kv_key in ("kv_window", "kv_recent") and "c" in value.lower():
            window_share(value)  # raises with what is accepted
            kv[kv_key] = value.upper()
        elif kv_key in _VARIANT_VALUES:
            if value not in _VARIANT_VALUES[kv_key]:
                raise EvalError(f"bad {key} {value!r} in {spec!r} (accepted: {', '.join(_VARIANT_VALUES[kv_key])})")
            kv[kv_key] = value
        else:
            try:
                kv[kv_key] = int(value)
            except ValueError:
                raise EvalError(f"bad {key} {value!r} in {spec!r} (expected an integer)") from None
            if kv[kv_key] < (0 if key in ("sinks", "keep", "recent") else 1):
                raise EvalError(f"bad {key} {value!r} in {spec!r} (too small)")
    return Policy(spec, kv, base.grows, base.native, f"{base.description}; variant {':'.join(settings)}",
                  base.first_single, cache_type)


def native_has_policy_keyword() -> bool:
    """Whether the installed llama-cpp-python build accepts ``kv_policy``."""
    from llama_cpp import Llama

    return "kv_policy" in inspect.signature(Llama.__init__).parameters


def parse_budgets(text: str | Iterable[int]) -> list[int]:
    """"64,128" -> [64, 128] (sorted, unique); each budget an integer >= 1."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(b) for b in text]
    out = []
    for s in items:
        if not s:
            continue
        try:
            b = int(s)
        except ValueError:
            raise EvalError(f"bad budget {s!r} in the budget list (expected integers such as 64,128,256)") from None
        if b < 1:
            raise EvalError(f"bad budget {b} (a budget is a number of cells >= 1)")
        out.append(b)
    if not out:
        raise EvalError("empty budget list (expected integers such as 64,128,256)")
    return sorted(set(out))


def parse_policies(text: str | Iterable[str]) -> list[str]:
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for name in items:
        if not name:
            continue
        resolve_policy(name)  # raises EvalError with what is accepted
        if name not in out:
            out.append(name)
    if not out:
        raise EvalError(f"empty policy list (accepted: {', '.join(ALL_POLICIES)})")
    return out


def memory_matched_budget(budget: int, cache_type: str, bytes_per_cell: dict[str, int]) -> int:
    """The cells of ``cache_type`` that fit the bytes of ``budget`` f16 cells (q8_0: ~1.88 C, q4_0: ~3.56 C)."""
    return budget * bytes_per_cell["f16"] // bytes_per_cell[cache_type]


def budget_problem(policy: Policy, budget: int, window: int) -> str | None:
    """Why the native code would refuse this budget, or None."""
    window = max(policy.window(window, budget), policy.recent(budget))
    if policy.budgeted and budget <= window + policy.sinks():
        return (f"kv_budget {budget} must be greater than the protected recent tokens {window} + kv_sinks "
                f"{policy.sinks()} (the budget includes the protected cells)")
    return None


# ---------------------------------------------------------------------------------------------
# prompts

def load_prompts(split: str = "test", n: int | None = None, path: Path = DATA_FILE) -> list[dict]:
    """The prompts of a split of a prompts file (schema: :mod:`morphkv_gguf.eval_prompts`), the first n of them."""
    from .eval_prompts import read_prompts_file

    if split not in SPLITS:
        raise EvalError(f"unknown split {split!r} (accepted: {', '.join(SPLITS)})")
    prompts = read_prompts_file(path)
    if split != "all":
        splits = sorted({p["split"] for p in prompts})
        prompts = [p for p in prompts if p["split"] == split]
        if not prompts:
            raise EvalError(f"{path} has no prompts in the {split} split (it has: {', '.join(splits)}); "
                            f"choose one with --split, or --split all")
    if n is not None:
        if n < 1:
            raise EvalError(f"--prompts must be >= 1, got {n}")
        prompts = prompts[:n]
    return prompts


def user_message(prompt: dict) -> str:
    if not prompt["facts"]:
        return prompt["task"]
    facts = "\n".join(f"- {f['statement']}" for f in prompt["facts"])
    return f"{FACTS_INTRO}\n{facts}\n\n{prompt['task']}"


# ---------------------------------------------------------------------------------------------
# metrics (rows are token positions, columns the vocabulary)

def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(lp_ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """KL(ref || other) per row, from log-probabilities."""
    lp_ref = np.asarray(lp_ref, dtype=np.float64)
    lp = np.asarray(lp, dtype=np.float64)
    p = np.exp(lp_ref)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(p > 0, p * (lp_ref - lp), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


def top1_agreement(lp_ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    return np.argmax(lp_ref, axis=-1) == np.argmax(lp, axis=-1)


def token_nll(lp: np.ndarray, targets: Iterable[int]) -> np.ndarray:
    t = np.asarray(list(targets), dtype=np.int64)
    return -np.asarray(lp, dtype=np.float64)[np.arange(len(t)), t]


def nll_ratio(nll_policy: np.ndarray, nll_full: np.ndarray) -> float:
    """Mean NLL of the reference tokens under the policy / under the full cache."""
    den = float(np.mean(nll_full))
    return float(np.mean(nll_policy)) / den if den > 0 else float("nan")


def bin_edges(n: int, n_bins: int = N_BINS) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, n_bins + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def summarize_tokens(kl: np.ndarray, top1: np.ndarray, nll: np.ndarray, nll_full: np.ndarray,
                     n_bins: int = N_BINS) -> dict:
    """Means over the answer and per position bin."""
    def part(a, b):
        return {"start": a, "end": b, "kl": float(np.mean(kl[a:b])), "top1": float(np.mean(top1[a:b])),
                "nll": float(np.mean(nll[a:b])), "nll_full": float(np.mean(nll_full[a:b])),
                "nll_ratio": nll_ratio(nll[a:b], nll_full[a:b])}
    out = part(0, len(kl))
    out["bins"] = [part(a, b) for a, b in bin_edges(len(kl), n_bins) if b > a]
    return out


# ---------------------------------------------------------------------------------------------
# teacher-forcing schedule

def max_piece(n_used: int, budget: int | None, interval: int, n_ubatch: int, remaining: int) -> int:
    """Tokens the next batch may hold so that decoding it equals decoding its tokens one at a time.

    Before every ubatch the native code evicts down to ``budget`` cells when n_used >= budget +
    interval; inside a batch it never evicts. So a batch starting at n_used (after that check) may
    hold budget + interval - n_used tokens. Without a budget: n_ubatch.
    """
    if remaining <= 0:
        return 0
    if budget is None:
        return min(n_ubatch, remaining)
    u = budget if n_used >= budget + interval else n_used
    return max(1, min(budget + interval - u, n_ubatch, remaining))


def plan_pieces(n_tokens: int, n_used: int, budget: int | None, interval: int, n_ubatch: int,
                first_single: bool = False) -> list[int]:
    """Piece sizes for ``n_tokens`` answer tokens (pure simulation of the eviction rule; the evaluation
    itself asks the native cache for n_used before each piece). ``first_single``: SnapKV, which
    compresses right before the first single-token batch, gets the first token alone and then never
    evicts (budget None for the rest)."""
    pieces = []
    done = 0
    if first_single and n_tokens > 0:
        pieces.append(1)
        done = 1
        budget = None
    while done < n_tokens:
        k = max_piece(n_used, budget, interval, n_ubatch, n_tokens - done)
        if budget is not None and n_used >= budget + interval:
            n_used = budget
        n_used += k
        done += k
        pieces.append(k)
    return pieces


def simulate_token_by_token(n_tokens: int, n_used: int, budget: int, interval: int) -> list[int]:
    """n_used after each token when tokens are decoded one at a time (the generation reference)."""
    out = []
    for _ in range(n_tokens):
        if n_used >= budget + interval:
            n_used = budget
        n_used += 1
        out.append(n_used)
    return out


def simulate_pieces(pieces: list[int], n_used: int, budget: int, interval: int) -> list[int]:
    """n_used after each token when the tokens are decoded in ``pieces``; an eviction may run only
    before a piece."""
    out = []
    for k in pieces:
        if n_used >= budget + interval:
            n_used = budget
        for _ in range(k):
            n_used += 1
            out.append(n_used)
    return out


# ---------------------------------------------------------------------------------------------
# the sequence every policy reads: prompt + reference answer + recall questions and answers

@dataclass
class Sequence:
    prompt: list[int]
    answer: list[int]
    tail: list[int]
    recall: list[dict]          # per fact: kind, answer, start (index in tail), tokens

    @property
    def stream(self) -> list[int]:
        return self.answer + self.tail

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer) + len(self.tail)


class ChatFormat:
    """The model's chat template (GGUF metadata), split into the text around each assistant turn; for a base model
    without one, plain text (the facts in prose, the task, then the answer and the questions as continuations)."""

    PLACEHOLDER = "\x00MORPHKV_TURN_{}\x00"

    def __init__(self, llm):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            def special(tok: int) -> str:
                return llm.detokenize([tok], special=True).decode("utf-8", errors="ignore") if tok >= 0 else ""
            self.formatter = Jinja2ChatFormatter(template=template, eos_token=special(llm.token_eos()),
                                                 bos_token=special(llm.token_bos()))
        else:
            self.formatter = None

    def _render(self, messages: list[dict], generation_prompt: bool) -> tuple[str, bool]:
        self.formatter.add_generation_prompt = generation_prompt
        r = self.formatter(messages=messages)
        return r.prompt, bool(getattr(r, "added_special", False))

    def segments(self, users: list[str]) -> tuple[list[str], bool]:
        """Texts before assistant turn 0, between turns 0 and 1, ...: len(users) segments."""
        messages = []
        for i, u in enumerate(users):
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": self.PLACEHOLDER.format(i)}]
        text, added_special = self._render(messages, generation_prompt=False)
        segs = []
        rest = text
        for i in range(len(users)):
            before, sep, rest = rest.partition(self.PLACEHOLDER.format(i))
            if not sep:
                raise EvalError("the model's chat template does not place the assistant's text verbatim")
            segs.append(before)
        return segs, added_special

    def tokens(self, text: str, first: bool, added_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=first and not added_special, special=True)

    @staticmethod
    def plain_prompt(prompt: dict) -> str:
        facts = " ".join(f["statement"] for f in prompt["facts"])
        return (f"{PLAIN_FACTS}{facts}\n\n" if facts else "") + f"{prompt['task']}\n\n"

    def prompt_tokens(self, prompt: dict) -> list[int]:
        if self.formatter is None:
            return self.tokens(self.plain_prompt(prompt), True, False)
        segs, added = self.segments([user_message(prompt)])
        return self.tokens(segs[0], True, added)

    def build(self, prompt: dict, answer: list[int]) -> Sequence:
        """prompt tokens, answer, then per fact: end of turn + question + assistant start + forced reply (plain
        text: "Question: ...", "Answer:" + forced reply)."""
        facts = prompt["facts"]
        if self.formatter is None:
            segs = [self.plain_prompt(prompt)] + [f"\n\nQuestion: {f['question']}\nAnswer:" for f in facts]
            added, lead = False, " "
        else:
            segs, added = self.segments([user_message(prompt)] + [f["question"] for f in facts])
            lead = ""
        prompt_toks = self.tokens(segs[0], True, added)
        tail: list[int] = []
        recall = []
        for f, seg in zip(facts, segs[1:]):
            tail += self.tokens(seg, False, added)
            pre = self.llm.tokenize(f"{lead}{f['answer_prefix']}".encode(), add_bos=False, special=False)
            both = self.llm.tokenize(f"{lead}{f['answer_prefix']} {f['answer']}".encode(), add_bos=False, special=False)
            if both[:len(pre)] != pre or len(both) == len(pre):
                raise EvalError(f"cannot split the forced reply {f['answer_prefix']!r} + {f['answer']!r} into tokens")
            tail += pre
            recall.append({"kind": f["kind"], "answer": f["answer"], "start": len(tail), "tokens": both[len(pre):]})
            tail += both[len(pre):]
        return Sequence(prompt_toks, list(answer), tail, recall)


# ---------------------------------------------------------------------------------------------
# llama.cpp sessions through the low-level API (logits of every piece, no [n_tokens, n_vocab] scores)

class Session:
    def __init__(self, model_path: Path, *, n_ctx: int, n_ubatch: int, threads: int | None, seed: int,
                 policy: Policy, budget: int | None, window: int, interval: int, gpu_layers: int = 0):
        from llama_cpp import Llama
        import llama_cpp

        self._lc = llama_cpp
        kw: dict = {"flash_attn": True}
        if policy.budgeted:
            kw.update(kv_budget=budget, kv_window=window, kv_evict_interval=interval)
            kw.update(policy.kv)  # a variant's own window or interval wins
            kw["kv_window"] = policy.window(window, budget)
            kw["kv_recent"] = policy.recent(budget) or "window"
            kw["kv_sinks"] = policy.sinks()  # pinned: the library's defaults may change, a policy's settings do not
            if native_has_policy_keyword():
                kw["kv_policy"] = policy.native
            elif policy.native != "morphkv":
                raise EvalError(f"policy {policy.name} needs the kv_policy keyword, which the installed "
                                f"llama-cpp-python lacks (rebuild the patched wheel)")
        if policy.cache_type != "f16":
            ggml_type = getattr(llama_cpp, f"GGML_TYPE_{policy.cache_type.upper()}")
            kw.update(type_k=ggml_type, type_v=ggml_type)
        self.policy = policy
        self.budget = budget if policy.budgeted else None
        self.interval = int(policy.kv.get("kv_evict_interval", interval))
        self.n_ubatch = n_ubatch
        self.llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch,
                         n_threads=threads, n_threads_batch=threads, seed=seed, n_gpu_layers=gpu_layers, verbose=False,
                         **kw)
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(n_ubatch, 0, 1)
        self.n_past = 0

    def info(self) -> dict:
        return self.llm.kv_budget_info()

    def memory_bytes(self, info: dict | None = None) -> int:
        """KV bytes held: the whole (constant) buffer of a budgeted cache; the cells in use of a cache
        that grows (full, snapkv)."""
        info = info or self.info()
        if self.policy.grows:
            return int(round(info["n_used"] * info["kv_bytes"] / info["n_cells"]))
        return int(info["kv_bytes"])

    def decode(self, tokens: list[int], want: list[bool]) -> np.ndarray:
        """Decode one batch (<= n_ubatch tokens); returns the logits of the tokens marked in ``want``
        ([n_wanted, n_vocab] float32, a copy)."""
        n = len(tokens)
        assert 0 < n <= self.n_ubatch and len(want) == n
        b = self.batch
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = bool(want[i])
        rc = self._lc.llama_decode(self.llm.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) at position {self.n_past}")
        self.n_past += n
        n_out = sum(bool(w) for w in want)
        if n_out == 0:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        ptr = self._lc.llama_get_logits(self.llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,)).reshape(n_out, self.n_vocab).copy()

    def feed_prompt(self, prompt: list[int]) -> np.ndarray:
        """The prompt as a generation feeds it (n_ubatch pieces); logits of its last token [n_vocab]."""
        last = None
        for i in range(0, len(prompt), self.n_ubatch):
            piece = prompt[i:i + self.n_ubatch]
            is_last = i + self.n_ubatch >= len(prompt)
            out = self.decode(piece, [False] * (len(piece) - 1) + [is_last])
            if is_last:
                last = out[0]
        return last

    def close(self) -> None:
        if self.batch is not None:
            self._lc.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        gc.collect()


# ---------------------------------------------------------------------------------------------
# reference answers (full cache, sampled, cached on disk)

def vocab_llama(model_path: Path):
    """A tokenizer-only Llama (llama.cpp's context-size warning for vocab-only models silenced)."""
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    sys.stdout.flush()
    sys.stderr.flush()
    with suppress_stdout_stderr(disable=False):
        return Llama(model_path=str(model_path), vocab_only=True, verbose=False)


def _eog_tokens(llm) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def dry_penalties(answer: list[int], multiplier: float, base: float, allowed_length: int,
                  max_length: int = 64) -> dict[int, float]:
    """DRY: a token that would extend a repeat of the answer's last L tokens (L >= allowed_length)
    loses multiplier * base ** (L - allowed_length) from its logit."""
    n = len(answer)
    if multiplier <= 0 or n < 2:
        return {}
    h = np.asarray(answer, dtype=np.int64)
    j = np.flatnonzero(h[:-1] == h[-1]) + 1          # h[j] followed an earlier copy of the last token
    if not j.size:
        return {}
    length = np.ones(j.size, dtype=np.int64)
    alive = np.ones(j.size, dtype=bool)
    for k in range(1, min(max_length, n - 1)):
        a = j - 1 - k
        ok = alive & (a >= 0)
        ok[ok] = h[a[ok]] == h[n - 1 - k]
        length += ok
        alive = ok
        if not alive.any():
            break
    out: dict[int, float] = {}
    for tok, L in zip(h[j].tolist(), length.tolist()):
        if L >= allowed_length:
            out[tok] = max(out.get(tok, 0.0), multiplier * base ** (L - allowed_length))
    return out


def sample_token(logits: np.ndarray, history: list[int], rng: np.random.Generator, banned: list[int],
                 sampling: dict = SAMPLING, answer: list[int] | None = None) -> int:
    x = np.array(logits, dtype=np.float64)
    x[banned] = -np.inf
    for tok, pen in dry_penalties(answer or [], sampling["dry_multiplier"], sampling["dry_base"],
                                  sampling["dry_allowed_length"]).items():
        x[tok] -= pen
    last = set(history[-sampling["repeat_last_n"]:])
    if last and sampling["repeat_penalty"] != 1.0:
        idx = np.fromiter(last, dtype=np.int64)
        v = x[idx]
        x[idx] = np.where(v > 0, v / sampling["repeat_penalty"], v * sampling["repeat_penalty"])
    k = min(sampling["top_k"], len(x))
    top = np.argpartition(-x, k - 1)[:k]
    top = top[np.argsort(-x[top], kind="stable")]
    z = x[top] / sampling["temperature"]
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), sampling["top_p"]) + 1)
    p = p[:keep] / p[:keep].sum()
    return int(top[rng.choice(keep, p=p)])


def model_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"{path.stem}-{path.stat().st_size}-{h.hexdigest()[:16]}"


def _reference_stem(prompt: dict, prompt_tokens: list[int], seed: int) -> str:
    h = hashlib.sha256(json.dumps({"tokens": prompt_tokens, "sampling": SAMPLING}).encode()).hexdigest()[:12]
    return f"{prompt['id']}-{h}-seed{seed}"


def reference_answer(model_path: Path, key: str, prompt: dict, n_tokens: int, *, seed: int, threads: int | None,
                     n_ubatch: int, cache_dir: Path, log: Callable[[str], None] = lambda s: None,
                     gpu_layers: int = 0) -> dict:
    """The full cache's sampled answer to ``prompt`` (n_tokens tokens, EOS masked), from the cache
    directory when a run with the same model, prompt tokens, sampler and seed stored at least as many
    tokens (sampling is sequential, so a shorter answer is a prefix of a longer one)."""
    tok_llm = vocab_llama(model_path)
    chat = ChatFormat(tok_llm)
    prompt_tokens = chat.prompt_tokens(prompt)
    stem = _reference_stem(prompt, prompt_tokens, seed)
    d = Path(cache_dir) / key
    best = None
    if d.is_dir():
        for f in d.glob(f"{stem}-n*.json"):
            try:
                n = int(f.stem.rsplit("-n", 1)[1])
            except ValueError:
                continue
            if n >= n_tokens and (best is None or n < best[0]):
                best = (n, f)
    if best is not None:
        doc = json.loads(best[1].read_text())
        doc["tokens"] = doc["tokens"][:n_tokens]
        doc["cached"] = str(best[1])
        tok_llm.close()
        return doc

    t0 = time.perf_counter()
    policy = POLICIES["full"]
    with Session(model_path, n_ctx=_round_ctx(len(prompt_tokens) + n_tokens + 8), n_ubatch=n_ubatch, threads=threads,
                 seed=seed, policy=policy, budget=None, window=32, interval=64, gpu_layers=gpu_layers) as s:
        banned = _eog_tokens(s.llm)
        rng = np.random.default_rng(seed)
        logits = s.feed_prompt(prompt_tokens)
        out: list[int] = []
        history = list(prompt_tokens)
        for i in range(n_tokens):
            tok = sample_token(logits, history, rng, banned, answer=out)
            out.append(tok)
            history.append(tok)
            if i + 1 < n_tokens:
                logits = s.decode([tok], [True])[0]
            if (i + 1) % 256 == 0:
                log(f"    reference {i + 1}/{n_tokens} tokens ({time.perf_counter() - t0:.0f} s)")
        text = s.llm.detokenize(out).decode("utf-8", errors="replace")
    tok_llm.close()
    doc = {"model": model_path.name, "model_key": key, "prompt_id": prompt["id"], "seed": seed, "sampling": SAMPLING,
           "n_prompt_tokens": len(prompt_tokens), "n_tokens": n_tokens, "tokens": out, "text": text,
           "seconds": round(time.perf_counter() - t0, 2)}
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{stem}-n{n_tokens}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    doc["cached"] = None
    return doc


def _round_ctx(n: int) -> int:
    return int(math.ceil(n / 256) * 256)


# ---------------------------------------------------------------------------------------------
# one policy run: teacher forcing, metrics against the full cache

@dataclass
class RunResult:
    policy: str
    budget: int | None
    kl: np.ndarray                       # [T]
    top1: np.ndarray                     # [T]
    nll: np.ndarray                      # [T]
    recall: list[dict]
    trace: list[tuple[int, int, int]]    # (answer tokens read, n_used, memory bytes)
    info: dict
    seconds: float
    pieces: int
    lp: np.ndarray | None = None         # [T, n_vocab] float32 log-probs (kept for the full cache only)


def teacher_force(model_path: Path, seq: Sequence, policy: Policy, budget: int | None, *, window: int,
                  interval: int, n_ubatch: int, threads: int | None, seed: int, gpu_layers: int = 0,
                  lp_full: np.ndarray | None = None, keep_lp: bool = False) -> RunResult:
    """Read ``seq`` with ``policy`` at ``budget``; compare each answer position with ``lp_full``
    (the full cache's log-probs; None: compare with itself, i.e. KL 0)."""
    t0 = time.perf_counter()
    T = len(seq.answer)
    stream = seq.stream
    n_stream = len(stream)
    targets_tail = {}
    for j, r in enumerate(seq.recall):
        for i, tok in enumerate(r["tokens"]):
            targets_tail[T + r["start"] + i] = (j, i, tok)     # stream index predicted -> target
    # token stream[i] is fed with logits iff stream[i + 1] is a target (answer token or recall token)
    need = [(i + 1 < T) or ((i + 1) in targets_tail) for i in range(n_stream - 1)]

    kl = np.zeros(T)
    top1 = np.zeros(T, dtype=bool)
    nll = np.zeros(T)
    lp_keep = np.zeros((T, 0), dtype=np.float32)
    recall = [{"kind": r["kind"], "answer": r["answer"], "logprob": 0.0, "argmax": [], "tokens": r["tokens"]}
              for r in seq.recall]
    trace: list[tuple[int, int, int]] = []
    n_ctx = _round_ctx(len(seq) + 8)

    with Session(model_path, n_ctx=n_ctx, n_ubatch=n_ubatch, threads=threads, seed=seed, policy=policy,
                 budget=budget, window=window, interval=interval, gpu_layers=gpu_layers) as s:
        if keep_lp:
            lp_keep = np.zeros((T, s.n_vocab), dtype=np.float32)

        def score(rows: np.ndarray, positions: list[int]) -> None:
            """rows: logits predicting stream[positions]."""
            if not len(positions):
                return
            lp = log_softmax(rows)
            ans = [k for k, p in enumerate(positions) if p < T]
            if ans:
                idx = np.array([positions[k] for k in ans])
                lpa = lp[ans]
                ref = lp_full[idx] if lp_full is not None else lpa
                kl[idx] = kl_divergence(ref, lpa)
                top1[idx] = top1_agreement(ref, lpa)
                nll[idx] = token_nll(lpa, [stream[p] for p in idx])
                if keep_lp:
                    lp_keep[idx] = lpa
            for k, p in enumerate(positions):
                if p in targets_tail:
                    j, i, tok = targets_tail[p]
                    recall[j]["logprob"] += float(lp[k, tok])
                    recall[j]["argmax"].append(int(np.argmax(lp[k])))

        last = s.feed_prompt(seq.prompt)
        score(last[None, :], [0])
        info = s.info()
        trace.append((0, info["n_used"], s.memory_bytes(info)))
        done = 0
        pieces = 0
        n_feed = n_stream - 1
        while done < n_feed:
            if policy.first_single:
                k = 1 if done == 0 else min(n_ubatch, n_feed - done)
            elif policy.keeps_prompt and done < T:
                k = 1  # generated tokens come alone: they are the answer, not the user's
            else:
                budget_now = None if s.budget is None else s.budget + int(info.get("n_kept", 0))
                k = max_piece(info["n_used"], budget_now, s.interval, n_ubatch, n_feed - done)
            if done < T:
                k = min(k, T - done)  # a piece ends at the answer's end: the memory trace gets that point
            want = need[done:done + k]
            rows = s.decode(stream[done:done + k], want)
            score(rows, [done + i + 1 for i in range(k) if want[i]])
            done += k
            pieces += 1
            info = s.info()
            if done <= T:
                trace.append((done, info["n_used"], s.memory_bytes(info)))
        final = s.info()

    for r in recall:
        r["prob"] = math.exp(r["logprob"])
        r["exact"] = r["argmax"] == r["tokens"]
    return RunResult(policy.name, budget if policy.budgeted else None, kl, top1, nll, recall, trace, final,
                     time.perf_counter() - t0, pieces, lp_keep if keep_lp else None)


# ---------------------------------------------------------------------------------------------
# the whole evaluation

@dataclass
class EvalConfig:
    model: Path | None = None
    policies: list[str] = field(default_factory=lambda: list(ALL_POLICIES))
    budgets: list[int] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    split: str = "test"
    n_prompts: int | None = None
    window: int = 32
    interval: int = 64
    n_ubatch: int = 128
    threads: int | None = None
    seed: int = 1234
    out_dir: Path | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    quick: bool = False
    gpu_layers: int = 0                  # layers offloaded to the GPU (a CUDA build; 0: CPU only)
    jobs: int = 1                        # prompts evaluated at the same time, one process each
    prompts_file: Path = DATA_FILE
    memory_matched: bool = False         # budgets are f16 cells; other cache types get the cells of the same bytes

    def validate(self) -> None:
        parse_policies(self.policies)
        parse_budgets(self.budgets)
        if self.answer_tokens < 2:
            raise EvalError(f"--answer-tokens must be >= 2, got {self.answer_tokens}")
        if self.jobs < 1:
            raise EvalError(f"--jobs must be >= 1, got {self.jobs}")
        if self.window < 1 or self.interval < 1 or self.n_ubatch < 1:
            raise EvalError("window, interval and n_ubatch must be >= 1")


def _backend_name(gpu_layers: int) -> str:
    """Where the model ran: 'gpu' when layers were offloaded and the build can offload, else 'cpu'."""
    import llama_cpp

    if gpu_layers and llama_cpp.llama_supports_gpu_offload():
        return "gpu"
    return "cpu"


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s" if s >= 60 else f"{s:.1f}s"


def _eval_prompt_worker(task: dict) -> tuple[dict, list[dict]]:
    tok_llm = vocab_llama(task["model_path"])
    try:
        return _eval_prompt(chat=ChatFormat(tok_llm), tok_llm=tok_llm,
                            log=lambda s: print(s, file=sys.stderr, flush=True), **task)
    finally:
        tok_llm.close()


def _eval_prompt(*, model_path: Path, key: str, prompt: dict, head: str, runs_plan: list, cfg: EvalConfig,
                 threads: int, t_start: float, chat: "ChatFormat", tok_llm, log: Callable[[str], None]
                 ) -> tuple[dict, list[dict]]:
    """Reference answer + every planned run for one prompt; returns the prompt's document and the runs the
    native code refused."""
    skipped: list[dict] = []
    log(f"{head} reference answer ({cfg.answer_tokens} tokens, full cache) ... "
        f"elapsed {_fmt_s(time.perf_counter() - t_start)}")
    ref = reference_answer(model_path, key, prompt, cfg.answer_tokens, seed=cfg.seed, threads=threads,
                           n_ubatch=cfg.n_ubatch, cache_dir=cfg.cache_dir, log=log, gpu_layers=cfg.gpu_layers)
    how = f"from cache {ref['cached']}" if ref.get("cached") else f"generated in {ref['seconds']} s"
    log(f"{head}   reference {how}")
    seq = chat.build(prompt, ref["tokens"])
    common = dict(window=cfg.window, interval=cfg.interval, n_ubatch=cfg.n_ubatch, threads=threads, seed=cfg.seed,
                  gpu_layers=cfg.gpu_layers)

    full = teacher_force(model_path, seq, POLICIES["full"], None, keep_lp=True, **common)
    lp_full = full.lp
    full.lp = None
    nll_full = full.nll
    runs = []
    for policy, budget, matched in runs_plan:
        if policy.name == "full":
            res = full
        else:
            try:
                res = teacher_force(model_path, seq, policy, budget, lp_full=lp_full, **common)
            except (ValueError, RuntimeError) as e:  # a refusal of the native code: report, go on
                skipped.append({"policy": policy.name, "budget": budget, "prompt": prompt["id"], "reason": str(e)})
                log(f"{head} {policy.name} C={budget}: FAILED: {e}")
                continue
        summary = summarize_tokens(res.kl, res.top1, res.nll, nll_full)
        run = {
            "policy": policy.name, "budget": res.budget, "cache_type": policy.cache_type, "matched_budget": matched,
            **{k: summary[k] for k in ("kl", "top1", "nll", "nll_full", "nll_ratio")},
            "bins": summary["bins"],
            "recall": [{k: r[k] for k in ("kind", "answer", "prob", "logprob", "exact")}
                       | {"argmax_text": tok_llm.detokenize(r["argmax"]).decode("utf-8", errors="replace")}
                       for r in res.recall],
            "recall_exact": float(np.mean([r["exact"] for r in res.recall])) if res.recall else None,
            "recall_prob": float(np.mean([r["prob"] for r in res.recall])) if res.recall else None,
            "memory_end_bytes": _memory_at(res.trace, len(seq.answer)),
            "memory_max_bytes": max(m for _, _, m in res.trace),
            "kv_bytes_allocated": int(res.info["kv_bytes"]), "n_cells": int(res.info["n_cells"]),
            "aux_bytes": int(res.info.get("aux_bytes", 0)),
            "held_bytes_end": _held_bytes(res, policy, len(seq.answer)),
            "n_used_end": int(res.info["n_used"]), "n_evictions": int(res.info["n_evictions"]),
            "evict_ms": round(float(res.info["t_evict_ms"]), 2),
            "seconds": round(res.seconds, 2), "pieces": res.pieces,
            "memory_trace": _thin(res.trace, 64),
        }
        runs.append(run)
        log(f"{head} {policy.name:<13} C={str(res.budget or '-'):>4}: KL {run['kl']:.4f}  top-1 {run['top1']:.3f}  "
            f"NLL x{run['nll_ratio']:.3f}  recall {'-' if run['recall_exact'] is None else format(run['recall_exact'], '.2f')}  "
            f"KV {run['memory_end_bytes'] / 2**20:.2f} MiB  ({res.seconds:.1f} s, "
            f"elapsed {_fmt_s(time.perf_counter() - t_start)})")
    del lp_full
    gc.collect()
    doc_prompt = {"id": prompt["id"], "split": prompt["split"], "type": prompt["type"],
                  "n_prompt_tokens": len(seq.prompt), "n_answer_tokens": len(seq.answer),
                  "n_tail_tokens": len(seq.tail), "reference_cached": bool(ref.get("cached")),
                  "reference_text_start": ref["text"][:300], "runs": runs}
    return doc_prompt, skipped


def run_eval(cfg: EvalConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the evaluation; returns the results document (see ``write_outputs``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg.validate()
    model_path = resolve_model(cfg.model)
    policies = [resolve_policy(p) for p in parse_policies(cfg.policies)]
    budgets = parse_budgets(cfg.budgets)
    if any(p.native not in (None, "morphkv") for p in policies) and not native_has_policy_keyword():
        names = ", ".join(p.name for p in policies if p.native not in (None, "morphkv"))
        raise EvalError(f"policies {names} need the kv_policy keyword, which the installed llama-cpp-python lacks "
                        f"(rebuild the patched wheel, or use --policies full,morphkv)")
    prompts = load_prompts(cfg.split, cfg.n_prompts, cfg.prompts_file)
    threads = cfg.threads or os.cpu_count() or 1
    t_start = time.perf_counter()
    key = model_key(model_path)

    tok_llm = vocab_llama(model_path)
    chat = ChatFormat(tok_llm)

    runs_plan = []  # (policy, cells C, the f16 budget whose bytes C matches or None)
    skipped = []
    bytes_per_cell = {}
    if cfg.memory_matched:
        shape = read_model_shape(model_path)
        bytes_per_cell = {t: kv_bytes_per_token(shape, t) for t in {"f16"} | {p.cache_type for p in policies}}
    for p in policies:
        if not p.budgeted:
            runs_plan.append((p, None, None))
            continue
        for b in budgets:
            cells = memory_matched_budget(b, p.cache_type, bytes_per_cell) if cfg.memory_matched else b
            why = budget_problem(p, cells, cfg.window)
            if why:
                skipped.append({"policy": p.name, "budget": cells, "reason": why})
            else:
                runs_plan.append((p, cells, b if cfg.memory_matched else None))
    for sk in skipped:
        log(f"skipping {sk['policy']} at budget {sk['budget']}: {sk['reason']}")

    doc_prompts: list[dict | None] = [None] * len(prompts)
    jobs = max(1, min(cfg.jobs, len(prompts)))
    per_job_threads = max(1, threads // jobs) if jobs > 1 else threads
    tasks = [dict(model_path=model_path, key=key, prompt=prompt, head=f"[prompt {pi + 1}/{len(prompts)} {prompt['id']}]",
                  runs_plan=runs_plan, cfg=cfg, threads=per_job_threads, t_start=t_start)
             for pi, prompt in enumerate(prompts)]
    if jobs == 1:
        for pi, task in enumerate(tasks):
            doc_prompts[pi], failed = _eval_prompt(chat=chat, tok_llm=tok_llm, log=log, **task)
            skipped.extend(failed)
    else:
        # one process per prompt at a time (spawned: a forked llama.cpp context is not safe to reuse);
        # workers log to stderr themselves, results come back in prompt order
        import concurrent.futures as cf
        import multiprocessing as mp

        log(f"{len(prompts)} prompts in {jobs} processes of {per_job_threads} thread(s)")
        # llama_cpp is imported before the tasks (and numpy with them): with a CUDA libllama from
        # LLAMA_CPP_LIB_PATH, numpy imported first crashed the library's load on the GPU machine
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=worker_init) as pool:
            futures = {pool.submit(_eval_prompt_worker, task): pi for pi, task in enumerate(tasks)}
            for fut in cf.as_completed(futures):
                doc_prompts[futures[fut]], failed = fut.result()
                skipped.extend(failed)
    tok_llm.close()

    doc = {
        "model": str(model_path), "model_key": key,
        "config": {"policies": [p.name for p in policies], "budgets": budgets, "answer_tokens": cfg.answer_tokens,
                   "split": cfg.split, "n_prompts": len(prompts), "prompts_file": str(cfg.prompts_file),
                   "window": cfg.window, "interval": cfg.interval, "memory_matched": cfg.memory_matched,
                   "n_ubatch": cfg.n_ubatch, "threads": threads, "jobs": cfg.jobs,
                   "gpu_layers": cfg.gpu_layers, "backend": _backend_name(cfg.gpu_layers), "seed": cfg.seed, "quick": cfg.quick,
                   "sampling": SAMPLING, "n_bins": N_BINS,
                   "policy_settings": {p.name: {"kv": p.kv, "native": p.native, "description": p.description}
                                       for p in policies},
                   "native_kv_policy_keyword": native_has_policy_keyword()},
        "prompts": doc_prompts,
        "skipped": skipped,
        "summary": aggregate(doc_prompts),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    return doc


def _held_bytes(res: "RunResult", policy: Policy, n_answer: int) -> int:
    """KV bytes of the cells a policy holds at the end of the answer: C for a constant cache (its buffer also holds
    the interval's cells and llama.cpp's padding to 256), the cells in use for one that grows."""
    per_cell = res.info["kv_bytes"] / res.info["n_cells"]
    if res.budget is not None and not policy.grows:
        return int(round((res.budget + int(res.info.get("n_kept", 0))) * per_cell))
    return _memory_at(res.trace, n_answer)


def _mean_or_none(values: list) -> float | None:
    """The mean, or None for no values (prompts without facts have no recall)."""
    return float(np.mean(values)) if values else None


def _memory_at(trace: list[tuple[int, int, int]], n: int) -> int:
    best = trace[0][2]
    for t, _, m in trace:
        if t <= n:
            best = m
    return best


def _thin(trace: list[tuple[int, int, int]], n: int) -> list[list[int]]:
    if len(trace) <= n:
        return [list(t) for t in trace]
    idx = np.unique(np.linspace(0, len(trace) - 1, n).round().astype(int))
    return [list(trace[i]) for i in idx]


def aggregate(prompts: list[dict]) -> list[dict]:
    """Per (policy, budget): pooled means over the prompts (every prompt has the same answer length)."""
    groups: dict[tuple, list[dict]] = {}
    for p in prompts:
        for r in p["runs"]:
            groups.setdefault((r["policy"], r["budget"]), []).append(r)
    out = []
    for (policy, budget), runs in groups.items():
        n_bins = len(runs[0]["bins"])
        row = {
            "policy": policy, "budget": budget, "n_prompts": len(runs),
            "kl": float(np.mean([r["kl"] for r in runs])),
            "top1": float(np.mean([r["top1"] for r in runs])),
            "nll_ratio": float(np.mean([r["nll"] for r in runs]) / np.mean([r["nll_full"] for r in runs])),
            "recall_exact": _mean_or_none([x["exact"] for r in runs for x in r["recall"]]),
            "recall_prob": _mean_or_none([x["prob"] for r in runs for x in r["recall"]]),
            "memory_end_bytes": float(np.mean([r["memory_end_bytes"] for r in runs])),
            "aux_bytes": float(np.mean([r.get("aux_bytes", 0) for r in runs])),
            "held_bytes_end": float(np.mean([r.get("held_bytes_end", r["memory_end_bytes"]) for r in runs])),
            "cache_type": runs[0].get("cache_type", "f16"), "matched_budget": runs[0].get("matched_budget"),
            "memory_max_bytes": float(np.max([r["memory_max_bytes"] for r in runs])),
            "n_evictions": float(np.mean([r["n_evictions"] for r in runs])),
            "seconds": float(np.sum([r["seconds"] for r in runs])),
            "bins": [{"start": runs[0]["bins"][i]["start"], "end": runs[0]["bins"][i]["end"],
                      "kl": float(np.mean([r["bins"][i]["kl"] for r in runs])),
                      "top1": float(np.mean([r["bins"][i]["top1"] for r in runs])),
                      "nll_ratio": float(np.mean([r["bins"][i]["nll"] for r in runs])
                                         / np.mean([r["bins"][i]["nll_full"] for r in runs]))}
                     for i in range(n_bins)],
        }
        out.append(row)
    order = {name: i for i, name in enumerate(ALL_POLICIES)}
    out.sort(key=lambda r: (r["budget"] is not None, r["budget"] or 0, order.get(r["policy"], 99)))
    return out


# ---------------------------------------------------------------------------------------------
# outputs: JSON, Markdown, plots

def default_out_dir(model: Path | None) -> Path:
    return Path("results") / f"eval-{resolve_model(model).stem}"


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def _where(c: dict) -> str:
    where = "on the GPU" if c.get("backend") == "gpu" else f"{c['threads']} CPU threads"
    jobs = c.get("jobs", 1)
    return where + (f", {jobs} prompts at a time" if jobs > 1 else "")


def markdown_report(doc: dict) -> str:
    c = doc["config"]
    lines = [
        f"# KV policy evaluation: {Path(doc['model']).name}",
        "",
        f"{c['n_prompts']} prompts ({c['split']} split), reference answers of {c['answer_tokens']} tokens sampled by the "
        f"full cache (T={c['sampling']['temperature']}, top-p {c['sampling']['top_p']}, top-k {c['sampling']['top_k']}, "
        f"repeat penalty {c['sampling']['repeat_penalty']}, DRY {c['sampling']['dry_multiplier']}/{c['sampling']['dry_base']}/"
        f"{c['sampling']['dry_allowed_length']}, EOS masked, seed {c['seed']}); every policy reads them with "
        f"teacher forcing in the eviction schedule of token-by-token generation. Window W={c['window']}, eviction "
        f"interval S={c['interval']}, n_ubatch={c['n_ubatch']}, {_where(c)}. Wall time {_fmt_s(doc['wall_seconds'])}.",
        "",
        "KL = mean KL(full || policy) per answer token (nats); top-1 = agreement of the argmax with the full "
        "cache; NLL ratio = mean NLL of the reference tokens under the policy / under the full cache; recall EM = "
        "share of facts (pass key, name, number) whose answer tokens are all the argmax after the question (= greedy "
        "decoding reproduces them), P = mean probability of the answer tokens; KV MiB = KV cache bytes held at the "
        "end of the answer, from kv_budget_info() (budgeted caches: the whole constant buffer; full and SnapKV: the "
        "cells in use); aux MiB = the buffers a budget adds (the query window of the last W tokens' queries, "
        "H2O's scores), also constant.",
        "",
        "| policy | budget | KL | top-1 | NLL ratio | recall EM | recall P | KV MiB | aux MiB | evictions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["summary"]:
        em = "-" if r["recall_exact"] is None else f"{r['recall_exact']:.2f}"
        pr = "-" if r["recall_prob"] is None else f"{r['recall_prob']:.3f}"
        lines.append(f"| {r['policy']} | {r['budget'] or '-'} | {r['kl']:.4f} | {r['top1']:.3f} | "
                     f"{r['nll_ratio']:.3f} | {em} | {pr} | {_mib(r['memory_end_bytes'])} | {_mib(r.get('aux_bytes', 0))} | "
                     f"{r['n_evictions']:.0f} |")
    if doc["summary"]:
        bins = doc["summary"][0]["bins"]
        lines += ["", "KL per position bin of the answer (tokens):", "",
                  "| policy | budget | " + " | ".join(f"{b['start']}-{b['end']}" for b in bins) + " |",
                  "|---|---:|" + "---:|" * len(bins)]
        for r in doc["summary"]:
            lines.append(f"| {r['policy']} | {r['budget'] or '-'} | "
                         + " | ".join(f"{b['kl']:.4f}" for b in r["bins"]) + " |")
    lines += _equal_memory_table(doc)
    if doc["skipped"]:
        lines += ["", "Skipped:", ""]
        for s in doc["skipped"]:
            where = f" ({s['prompt']})" if "prompt" in s else ""
            lines.append(f"* {s['policy']} at budget {s['budget']}{where}: {s['reason']}")
    lines += ["", "Policies:", ""]
    for name, ps in c["policy_settings"].items():
        lines.append(f"* {name}: {ps['description']} {ps['kv'] or ''}".rstrip())
    return "\n".join(lines) + "\n"


def _compares_memory(doc: dict) -> bool:
    return bool(doc["config"].get("memory_matched")) or len({r.get("cache_type", "f16") for r in doc["summary"]}) > 1


def _equal_memory_table(doc: dict) -> list[str]:
    """Policies and cache types side by side at equal KV bytes (a --memory-matched run, or several types)."""
    if not _compares_memory(doc):
        return []
    full = [r for r in doc["summary"] if r["policy"] == "full"]
    full_bytes = full[0]["held_bytes_end"] if full else None
    lines = ["", "## Equal KV memory", "",
             "Budgets are counted in f16 cells; a run in another cache type holds the cells that fit the same bytes "
             "(q8_0 about 1.9 C, q4_0 about 3.6 C). Held MiB = the K/V bytes of the cells a constant cache holds (C, and "
             "a kept prompt; its buffer adds the eviction interval's cells and llama.cpp's padding to 256, the KV MiB "
             "above); for a cache that grows, the cells in use at the end. Share = held / the full f16 cache's bytes "
             "at the end of the answer.", "",
             "| f16 budget | policy | type | cells C | held MiB | share of full | KL | NLL ratio | top-1 | recall EM |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(doc["summary"], key=lambda r: (r.get("matched_budget") or r["budget"] or 0, r["held_bytes_end"]))
    for r in rows:
        em = "-" if r["recall_exact"] is None else f"{r['recall_exact']:.2f}"
        share = f"{r['held_bytes_end'] / full_bytes:.3f}" if full_bytes else "-"
        lines.append(f"| {r.get('matched_budget') or r['budget'] or '-'} | {r['policy']} | {r.get('cache_type', 'f16')} | "
                     f"{r['budget'] or '-'} | {_mib(r['held_bytes_end'])} | {share} | {r['kl']:.4f} | "
                     f"{r['nll_ratio']:.3f} | {r['top1']:.3f} | {em} |")
    return lines


def _plot_memory(doc: dict, plt) -> "object":
    """KL and NLL ratio vs the KV bytes held, one line per budgeted policy, a marker per full cache."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [n for n in doc["config"]["policies"] if any(r["policy"] == n for r in doc["summary"])]
    for n in names:
        rows = sorted((r for r in doc["summary"] if r["policy"] == n), key=lambda r: r["held_bytes_end"])
        budgeted = rows[0]["budget"] is not None
        for ax, key in zip(axes, ("kl", "nll_ratio")):
            ax.plot([r["held_bytes_end"] / 2**20 for r in rows], [r[key] for r in rows], label=n,
                    marker="o" if budgeted else "*", markersize=5 if budgeted else 11,
                    linestyle="-" if budgeted else "none")
    for ax, label in zip(axes, ("mean KL(full || policy) per token", "NLL ratio (policy / full f16)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV MiB held at the end of the answer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Fidelity vs KV memory")
    axes[1].set_title("NLL ratio vs KV memory")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_results(doc: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    summary = doc["summary"]
    budgeted = [r for r in summary if r["budget"] is not None]
    names = [n for n in doc["config"]["policies"] if any(r["policy"] == n for r in budgeted)]

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in names:
        rows = sorted((r for r in budgeted if r["policy"] == n), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in rows], [r["kl"] for r in rows], marker="o", label=n)
    floor = [r for r in summary if r["policy"] == "full-shift"]
    if floor:
        ax.axhline(floor[0]["kl"], color="grey", linestyle="--", label="full-shift (batching noise)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget C (cells)")
    ax.set_ylabel("mean KL(full || policy) per token")
    ax.set_title("Fidelity vs budget")
    ax.grid(alpha=0.3)
    if names or floor:
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "kl_vs_budget.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    plot_budget = _plot_budget(doc)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in names:
        rows = [r for r in budgeted if r["policy"] == n and r["budget"] == plot_budget]
        if rows:
            bins = rows[0]["bins"]
            ax.plot([(b["start"] + b["end"]) / 2 for b in bins], [b["kl"] for b in bins], marker="o", label=n)
    ax.set_xlabel("answer position (bin centre, tokens)")
    ax.set_ylabel("mean KL(full || policy)")
    ax.set_title(f"Fidelity along the answer, C={plot_budget}")
    ax.grid(alpha=0.3)
    if names:
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "kl_by_position.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ["-", "--", ":", "-."]
    if doc["prompts"]:
        shown = 0
        for r in doc["prompts"][0]["runs"]:
            if r["budget"] not in (None, plot_budget) or r["policy"] == "full-shift":
                continue
            tr = np.array(r["memory_trace"])
            # constant caches of one budget overlap: line styles keep them apart
            ax.plot(tr[:, 0], tr[:, 2] / 2**20, label=r["policy"], linestyle=styles[shown % len(styles)],
                    linewidth=2.0 if shown % len(styles) == 0 else 1.6)
            shown += 1
    ax.set_xlabel("answer tokens read")
    ax.set_ylabel("KV cache MiB (kv_budget_info)")
    ax.set_title(f"KV memory as the answer grows (C={plot_budget}, prompt 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "memory_vs_length.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if _compares_memory(doc):
        fig = _plot_memory(doc, plt)
        paths.append(out_dir / "kl_vs_memory.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _plot_budget(doc: dict) -> int | None:
    budgets = sorted({r["budget"] for r in doc["summary"] if r["budget"] is not None})
    if not budgets:
        return None
    return 128 if 128 in budgets else budgets[0]


def load_results(path: Path) -> dict:
    """A results document written by ``write_outputs`` (``eval.json``, or gzip-compressed ``eval.json.gz``
    as the recorded runs in results/ are kept)."""
    import gzip

    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        doc = json.loads(raw)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path} is not an eval.json results file: {e}") from None
    if not isinstance(doc, dict) or not {"config", "summary", "prompts"} <= doc.keys():
        raise EvalError(f"{path} is not an eval.json results file (no config/summary/prompts)")
    return doc


def write_outputs(doc: dict, out_dir: Path, plots: bool = True, results_file: bool = True) -> dict[str, Path]:
    """eval.json (unless ``results_file`` is False: re-rendering a saved one), eval.md and the plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "eval.md"}
    if results_file:
        paths["json"] = out_dir / "eval.json"
        paths["json"].write_text(json.dumps(doc, indent=1))
    paths["markdown"].write_text(markdown_report(doc))
    if plots:
        for p in plot_results(doc, out_dir):
            paths[p.stem] = p
    return paths
