"""NumPy reference of the native MorphKV selection (patch 0003, ``llama-kv-budget.cpp``).

Given one layer's query window and cached keys, these functions compute what the native eviction
graph computes: ``softmax(Q_win K^T / sqrt(d))`` over the evictable cells, fused over the window rows
(``fusion``) and over the query heads of each KV head (``group_reduce``), then per KV head (or once
for all heads and layers with token granularity) the cells kept: the protected cells (recent window
and sinks, which score above any attention weight) and the best-scoring evictable cells.

Ties: the native code sorts with ggml_argsort, whose order among equal scores is not specified;
where two cells score exactly the same at the cut, either may be kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FUSIONS = ("sum", "max")
PROTECTED_BIAS = 1e6  # the native code's KV_BUDGET_PROTECTED_BIAS


@dataclass(frozen=True)
class CellClasses:
    """Which cells an eviction may drop: from the cells' positions as the native code classifies them."""

    evictable: npt.NDArray[np.bool_]   # [n_cells]
    protected: npt.NDArray[np.bool_]   # [n_cells]
    protected_rank: npt.NDArray[np.int64]  # [n_cells]: rank by position among protected cells, -1 otherwise


def classify_cells(positions: npt.ArrayLike, window: int, sinks: int = 0,
                   composite: npt.ArrayLike | None = None) -> CellClasses:
    """Classify cells by their (cell) positions; -1 marks an empty cell.

    A non-composite cell is protected if it is one of the last ``window`` positions or one of the
    first ``sinks`` positions; every other non-empty cell is evictable.
    """
    pos = np.asarray(positions, dtype=np.int64)
    comp = np.zeros_like(pos, dtype=bool) if composite is None else np.asarray(composite, dtype=bool)
    live = pos >= 0
    pos_max = pos[live].max() if live.any() else -1
    protected = live & ~comp & ((pos > pos_max - window) | (pos < sinks))
    rank = np.full(pos.shape, -1, dtype=np.int64)
    order = np.argsort(np.where(protected, pos, np.iinfo(np.int64).max), kind="stable")
    for r, cell in enumerate(order[: int(protected.sum())]):
        rank[cell] = r
    return CellClasses(live & ~protected, protected, rank)


def _reduce(x: np.ndarray, axis: int, how: str) -> np.ndarray:
    if how == "sum":
        return x.sum(axis=axis)
    if how == "max":
        return x.max(axis=axis)
    raise ValueError(f"unknown reduction {how!r} (accepted: {', '.join(FUSIONS)})")


def layer_scores(q_win: npt.ArrayLike, keys: npt.ArrayLike, evictable: npt.ArrayLike,
                 fusion: str = "sum", group_reduce: str = "sum") -> np.ndarray:
    """MorphKV scores of one layer's cells, per KV head.

    q_win: [W, n_head, d] post-RoPE queries of the window; keys: [n_cells, n_head_kv, d];
    evictable: [n_cells] bool. Returns [n_head_kv, n_cells] with 0 for cells that are not evictable.
    Query head h reads KV head h // (n_head // n_head_kv), as in llama.cpp's GQA.
    """
    q = np.asarray(q_win, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    ev = np.asarray(evictable, dtype=bool)
    n_w, n_head, d = q.shape
    n_cells, n_head_kv, d_k = k.shape
    if d != d_k or n_head % n_head_kv:
        raise ValueError(f"shapes do not match: q_win {q.shape}, keys {k.shape}")
    group = n_head // n_head_kv
    k_per_q = np.repeat(k, group, axis=1)                         # [n_cells, n_head, d]
    logits = np.einsum("whd,chd->hwc", q, k_per_q) / np.sqrt(d)    # [n_head, W, n_cells]
    logits = np.where(ev[None, None, :], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=-1, keepdims=True)
    per_q_head = _reduce(prob, 1, fusion)                          # [n_head, n_cells]
    per_kv_head = _reduce(per_q_head.reshape(n_head_kv, group, n_cells), 1, group_reduce)
    return np.where(ev[None, :], per_kv_head, 0.0)


def _with_protection(scores: np.ndarray, classes: CellClasses) -> np.ndarray:
    out = np.where(classes.protected, PROTECTED_BIAS + classes.protected_rank, scores)
    return np.where(classes.evictable | classes.protected, out, -np.inf)


def select_per_head(scores: npt.ArrayLike, classes: CellClasses, budget: int) -> np.ndarray:
    """Head granularity: for each KV head, the ``budget`` cells kept, best first ([n_head_kv, budget]).

    The protected cells come first, newest first, identically in every head; they and the
    evictable cells after them become cells 0..budget-1 of that head after the eviction.
    """
    s = _with_protection(np.asarray(scores, dtype=np.float64), classes)
    return np.argsort(-s, axis=-1, kind="stable")[:, :budget]


def select_tokens(layer_scores_list: list[np.ndarray], classes: CellClasses, budget: int) -> np.ndarray:
    """Token granularity: one set of ``budget`` cells for every head and layer (scores summed)."""
    total = sum(np.asarray(s, dtype=np.float64).sum(axis=0) for s in layer_scores_list)
    return np.sort(np.argsort(-_with_protection(total, classes), kind="stable")[:budget])
