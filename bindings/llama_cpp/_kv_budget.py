"""morphkv-gguf: validation of the budgeted-KV-cache keyword arguments of ``Llama``.

Every check runs before any native call, so a bad value raises ``ValueError`` naming the accepted
values and nothing is allocated.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

from . import llama_cpp

FUSIONS = {"sum": llama_cpp.LLAMA_KV_FUSION_SUM, "max": llama_cpp.LLAMA_KV_FUSION_MAX}
GRANULARITIES = {
    "head": llama_cpp.LLAMA_KV_GRANULARITY_HEAD,
    "token": llama_cpp.LLAMA_KV_GRANULARITY_TOKEN,
}
POLICIES = {
    "morphkv": llama_cpp.LLAMA_KV_POLICY_MORPHKV,
    "streaming": llama_cpp.LLAMA_KV_POLICY_STREAMING,
    "h2o": llama_cpp.LLAMA_KV_POLICY_H2O,
    "snapkv": llama_cpp.LLAMA_KV_POLICY_SNAPKV,
}


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _choice(name: str, value: Any, accepted: Dict[str, int]) -> int:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r} (accepted: {', '.join(map(repr, accepted))})")
    return accepted[value]


# the settings a preset gives the kwargs left at None: "measured" (the default) was the best measured on the dev
# prompts of SmolLM2-135M-Instruct and Gemma 3 270M (docs/evaluation.md); "paper" is MorphKV's own (W=32, sum)
PRESETS: Dict[str, Dict[str, Any]] = {
    "measured": {"kv_fusion": "max", "kv_group_reduce": "max", "kv_sinks": 4, "kv_recent": "auto"},
    "paper": {"kv_fusion": "sum", "kv_group_reduce": "sum", "kv_sinks": 0, "kv_recent": "window"},
}


def _recent(value: Union[int, str]) -> int:
    """kv_recent: "auto" (0: 3/4 of the budget), "window" (1: the window alone) or a number of tokens >= 1."""
    if value == "auto":
        return 0
    if value == "window":
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"kv_recent must be 'auto', 'window' or a number of tokens >= 1, got {value!r}")
    return value


def _keep(value: Union[int, str, None], kv_budget: Optional[int]) -> int:
    """kv_keep: None or "none" (0), "prompt" (as many tokens as kv_budget) or a number of tokens."""
    if value is None or value == "none":
        return 0
    if value == "prompt":
        return kv_budget if isinstance(kv_budget, int) and not isinstance(kv_budget, bool) else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"kv_keep must be None, 'none', 'prompt' or a number of tokens >= 0, got {value!r}")
    return value


def _preset(value: Optional[str]) -> str:
    if value is None:
        return "measured"
    if value not in PRESETS:
        raise ValueError(f"unknown kv_preset {value!r} (accepted: {', '.join(map(repr, PRESETS))})")
    return value


def validate(
    kv_budget: Optional[int],
    kv_window: int,
    kv_evict_interval: Optional[int],
    kv_fusion: Optional[str],
    kv_group_reduce: Optional[str],
    kv_granularity: str,
    kv_sinks: Optional[int],
    kv_policy: str = "morphkv",
    kv_keep: Union[int, str, None] = None,
    kv_recent: Union[int, str, None] = None,
    kv_preset: Optional[str] = None,
) -> Dict[str, int]:
    """The native values for the budget kwargs (kv_budget 0 = off, kv_evict_interval 0 = auto), or ValueError.
    kv_fusion, kv_group_reduce, kv_sinks and kv_recent left at None take kv_preset's values (PRESETS)."""
    preset = PRESETS[_preset(kv_preset)]
    kv_fusion = preset["kv_fusion"] if kv_fusion is None else kv_fusion
    kv_group_reduce = preset["kv_group_reduce"] if kv_group_reduce is None else kv_group_reduce
    kv_sinks = preset["kv_sinks"] if kv_sinks is None else kv_sinks
    kv_recent = preset["kv_recent"] if kv_recent is None else kv_recent
    window = _count("kv_window", kv_window, 1)
    # None: the native default (kv_budget/8 within [64, n_ubatch]; the value in use is in kv_budget_info())
    interval = 0 if kv_evict_interval is None else _count("kv_evict_interval", kv_evict_interval, 1)
    sinks = _count("kv_sinks", kv_sinks, 0)
    recent = _recent(kv_recent)
    fusion = _choice("kv_fusion", kv_fusion, FUSIONS)
    group_reduce = _choice("kv_group_reduce", kv_group_reduce, FUSIONS)
    granularity = _choice("kv_granularity", kv_granularity, GRANULARITIES)
    policy = _choice("kv_policy", kv_policy, POLICIES)
    budget = 0
    keep = _keep(kv_keep, kv_budget)
    if kv_budget is None and kv_keep not in (None, "none", 0):
        raise ValueError(f"kv_keep={kv_keep!r} keeps the prompt besides a budget: set kv_budget as well")
    if keep and policy == POLICIES["snapkv"]:
        raise ValueError(f"kv_keep={kv_keep!r} keeps the prompt, which kv_policy 'snapkv' compresses: use kv_keep=None")
    if kv_budget is not None:
        budget = _count("kv_budget", kv_budget, 1)
        if budget <= window + sinks:
            raise ValueError(
                f"kv_budget ({budget}) must be greater than kv_window ({window}) + kv_sinks ({sinks}): "
                "the budget includes the protected recent window and sinks"
            )
        if budget <= recent + sinks:
            raise ValueError(
                f"kv_budget ({budget}) must be greater than kv_recent ({recent}) + kv_sinks ({sinks}): "
                "the budget includes the protected recent tokens and sinks"
            )
    return {
        "kv_budget": budget,
        "kv_window": window,
        "kv_evict_interval": interval,
        "kv_sinks": sinks,
        "kv_keep": keep,
        "kv_recent": recent,
        "kv_fusion": fusion,
        "kv_group_reduce": group_reduce,
        "kv_granularity": granularity,
        "kv_policy": policy,
    }
