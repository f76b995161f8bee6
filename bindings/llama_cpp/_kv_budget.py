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


def _keep(value: Union[int, str, None], kv_budget: Optional[int]) -> int:
    """kv_keep: None or "none" (0), "prompt" (as many tokens as kv_budget) or a number of tokens."""
    if value is None or value == "none":
        return 0
    if value == "prompt":
        return kv_budget if isinstance(kv_budget, int) and not isinstance(kv_budget, bool) else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"kv_keep must be None, 'none', 'prompt' or a number of tokens >= 0, got {value!r}")
    return value


def validate(
    kv_budget: Optional[int],
    kv_window: int,
    kv_evict_interval: Optional[int],
    kv_fusion: str,
    kv_group_reduce: str,
    kv_granularity: str,
    kv_sinks: int,
    kv_policy: str = "morphkv",
    kv_keep: Union[int, str, None] = None,
) -> Dict[str, int]:
    """The native values for the budget kwargs (kv_budget 0 = off, kv_evict_interval 0 = auto), or ValueError."""
    window = _count("kv_window", kv_window, 1)
    # None: the native default (kv_budget/8 within [64, n_ubatch]; the value in use is in kv_budget_info())
    interval = 0 if kv_evict_interval is None else _count("kv_evict_interval", kv_evict_interval, 1)
    sinks = _count("kv_sinks", kv_sinks, 0)
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
    return {
        "kv_budget": budget,
        "kv_window": window,
        "kv_evict_interval": interval,
        "kv_sinks": sinks,
        "kv_keep": keep,
        "kv_fusion": fusion,
        "kv_group_reduce": group_reduce,
        "kv_granularity": granularity,
        "kv_policy": policy,
    }
