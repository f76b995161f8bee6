"""NumPy reference of the native MorphKV selection (``native/src/llama-kv-budget.cpp``).

Given one layer's query window and cached keys, these functions compute what the native eviction
graph computes: ``softmax(s Q_win K^T)`` (s: the model's scale of q.k, 1/sqrt(d) for most) over the
evictable cells, fused over the window rows
(``fusion``) and over the query heads of each KV head (``group_reduce``), then per KV head (or once
for all heads and layers with token granularity) the cells kept: the protected cells (recent window
and sinks, which score above any attention weight) and the best-scoring evictable cells.

Ties: the native code sorts with ggml_argsort, whose order among equal scores is not specified;
where two cells score exactly the same at the cut, either may be kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt

FUSIONS = ("sum", "max")
PROTECTED_BIAS = 1e6  # the native code's KV_BUDGET_PROTECTED_BIAS


@dataclass
class PromptKeep:
    """kv_keep's rule (``llama_kv_budget_keep``): which prompt positions of a sequence are never evicted.

    A prompt token is one decoded in a batch with other tokens of its sequence; a generated token
    comes alone. Kept: the first prompt since the sequence was empty and the latest prompt after an
    answer (a new one releases the previous latest one), at most ``cap`` positions in all; the
    tokens of a prompt past the cap are not kept.
    """

    cap: int
    first: tuple[int, int] = (0, 0)
    last: tuple[int, int] = (0, 0)
    first_done: bool = False
    answered: bool = False

    @property
    def n_kept(self) -> int:
        return (self.first[1] - self.first[0]) + (self.last[1] - self.last[0])

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [r for r in (self.first, self.last) if r[1] > r[0]]

    def add(self, pos: int, prompt: bool) -> None:
        """A token of the sequence at ``pos``; ``prompt``: its batch held other tokens of the sequence."""
        if not prompt:
            self.answered = self.answered or self.first[1] > self.first[0]
            return
        if self.answered:
            self.first_done, self.answered, self.last = True, False, (pos, pos)
        p0, p1 = self.last if self.first_done else self.first
        if p1 == p0:
            p0 = p1 = pos
        if pos == p1 and self.n_kept < self.cap:  # the stored ranges: this one is as long as (p0, p1)
            p1 = pos + 1
        if self.first_done:
            self.last = (p0, p1)
        else:
            self.first = (p0, p1)

    def add_batch(self, positions: Sequence[int]) -> None:
        """One batch's tokens of the sequence (in order)."""
        for pos in positions:
            self.add(int(pos), len(positions) > 1)


@dataclass(frozen=True)
class CellClasses:
    """Which cells an eviction may drop: from the cells' positions as the native code classifies them."""

    evictable: npt.NDArray[np.bool_]   # [n_cells]
    protected: npt.NDArray[np.bool_]   # [n_cells]
    protected_rank: npt.NDArray[np.int64]  # [n_cells]: rank by position among protected cells, -1 otherwise


def classify_cells(positions: npt.ArrayLike, window: int, sinks: int = 0,
                   composite: npt.ArrayLike | None = None,
                   kept: Sequence[tuple[int, int]] = ()) -> CellClasses:
    """Classify cells by their (cell) positions; -1 marks an empty cell.

    A non-composite cell is protected if it is one of the last ``window`` positions, one of the
    first ``sinks`` positions or in one of the ``kept`` prompt ranges [p0, p1) (kv_keep,
    :class:`PromptKeep`); every other non-empty cell is evictable.
    """
    pos = np.asarray(positions, dtype=np.int64)
    comp = np.zeros_like(pos, dtype=bool) if composite is None else np.asarray(composite, dtype=bool)
    live = pos >= 0
    pos_max = pos[live].max() if live.any() else -1
    in_kept = np.zeros_like(live)
    for p0, p1 in kept:
        in_kept |= (pos >= p0) & (pos < p1)
    protected = live & ~comp & ((pos > pos_max - window) | (pos < sinks) | in_kept)
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


def _kq_scale(d: int, scale: float | None) -> float:
    """The model's scale of q.k (llama.cpp's kq_scale); None: the usual 1/sqrt(d)."""
    return 1.0 / np.sqrt(d) if scale is None else scale


def layer_scores(q_win: npt.ArrayLike, keys: npt.ArrayLike, evictable: npt.ArrayLike,
                 fusion: str = "sum", group_reduce: str = "sum", scale: float | None = None,
                 softcap: float = 0.0) -> np.ndarray:
    """MorphKV scores of one layer's cells, per KV head.

    q_win: [W, n_head, d] post-RoPE queries of the window; keys: [n_cells, n_head_kv, d];
    evictable: [n_cells] bool; scale: the model's scale of q.k (llama.cpp's kq_scale; None: 1/sqrt(d));
    softcap: the model's attention logit soft-capping (logits softcap*tanh(x/softcap), Gemma 2: 50; 0: none).
    Returns [n_head_kv, n_cells] with 0 for cells that are not evictable.
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
    logits = np.einsum("whd,chd->hwc", q, k_per_q) * _kq_scale(d, scale)  # [n_head, W, n_cells]
    if softcap > 0:
        logits = softcap * np.tanh(logits / softcap)
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


# ---------------------------------------------------------------------------------------------
# Baseline policies (kv_policy = "streaming", "h2o", "snapkv"): what the native code computes from
# one layer's snapshot. Selection reuses classify_cells / select_per_head / select_tokens: protected
# cells first (their score ignored), then the best evictable cells.

POLICIES = ("morphkv", "streaming", "h2o", "snapkv")


def streaming_scores(positions: npt.ArrayLike, classes: CellClasses) -> np.ndarray:
    """StreamingLLM: an evictable cell scores its position (newer is better); [n_cells], 0 elsewhere."""
    pos = np.asarray(positions, dtype=np.int64)
    return np.where(classes.evictable, pos.astype(np.float64), 0.0)


def streaming_select(positions: npt.ArrayLike, classes: CellClasses, budget: int) -> np.ndarray:
    """Cells kept by StreamingLLM (sorted cell indices, one choice for every head): the protected cells
    (last ``window`` positions and the first ``sinks``) plus the most recent evictable cells."""
    s = _with_protection(streaming_scores(positions, classes), classes)
    return np.sort(np.argsort(-s, kind="stable")[:budget])


def ring_positions(pos_max: int, rows: int) -> np.ndarray:
    """Position held by each slot of a query ring of ``rows`` rows written at slot ``pos % rows``:
    the newest p <= pos_max with p % rows == r, -1 where no such position exists yet."""
    r = np.arange(rows, dtype=np.int64)
    p = pos_max - np.mod(pos_max - r, rows)
    return np.where(p >= 0, p, -1)


def h2o_increment(q_ring: npt.ArrayLike, keys: npt.ArrayLike, positions: npt.ArrayLike,
                  pos_last_evict: int, pos_max: int | None = None, scale: float | None = None) -> np.ndarray:
    """Attention the cells received since the previous eviction, per KV head ([n_head_kv, n_cells]).

    q_ring: [R, n_head, d] post-RoPE queries, row r = the query of position p_r (``ring_positions``);
    keys: [n_cells, n_head_kv, d]; positions: [n_cells] cell positions (-1 empty), or
    [n_head_kv, n_cells] per-head positions of composite cells, used for the causal mask.
    Rows with p_r > pos_last_evict are counted: each query head's softmax(s q.k) (s: ``scale``, None:
    1/sqrt(d)) over the live
    cells with position <= p_r, summed over the counted rows and over the query heads of each KV head.
    ``pos_max`` defaults to the newest live position.
    """
    q = np.asarray(q_ring, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.int64)
    n_rows, n_head, d = q.shape
    n_cells, n_head_kv, d_k = k.shape
    if d != d_k or n_head % n_head_kv:
        raise ValueError(f"shapes do not match: q_ring {q.shape}, keys {k.shape}")
    group = n_head // n_head_kv
    pos_kv = np.broadcast_to(pos, (n_head_kv, n_cells)) if pos.ndim == 1 else pos
    if pos_kv.shape != (n_head_kv, n_cells):
        raise ValueError(f"positions must be [n_cells] or [n_head_kv, n_cells], got {pos.shape}")
    if pos_max is None:
        live_pos = pos_kv[pos_kv >= 0]
        pos_max = int(live_pos.max()) if live_pos.size else -1
    pos_q = np.repeat(pos_kv, group, axis=0)                        # [n_head, n_cells]
    k_per_q = np.repeat(k, group, axis=1)                          # [n_cells, n_head, d]
    logits = np.einsum("rhd,chd->rhc", q, k_per_q) * _kq_scale(d, scale)  # [R, n_head, n_cells]
    p_r = ring_positions(pos_max, n_rows)
    counted = (p_r >= 0) & (p_r > pos_last_evict)
    total = np.zeros((n_head, n_cells))
    for r in np.flatnonzero(counted):
        visible = (pos_q >= 0) & (pos_q <= p_r[r])
        x = np.where(visible, logits[r], -np.inf)
        m = x.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.where(visible, np.exp(x - m), 0.0)
        z = e.sum(axis=-1, keepdims=True)
        total += np.divide(e, z, out=np.zeros_like(e), where=z > 0)
    return total.reshape(n_head_kv, group, n_cells).sum(axis=1)


def h2o_scores(q_ring: npt.ArrayLike, keys: npt.ArrayLike, positions: npt.ArrayLike, pos_last_evict: int,
               prev_scores: npt.ArrayLike | None = None, pos_max: int | None = None) -> np.ndarray:
    """H2O's accumulated score per KV head and cell: ``prev_scores`` (0 for cells that entered since the
    last eviction) + ``h2o_increment``. Select with select_per_head / select_tokens."""
    inc = h2o_increment(q_ring, keys, positions, pos_last_evict, pos_max)
    if prev_scores is None:
        return inc
    prev = np.asarray(prev_scores, dtype=np.float64)
    if prev.shape != inc.shape:
        raise ValueError(f"prev_scores must be {inc.shape}, got {prev.shape}")
    return prev + inc


def h2o_carry(scores: npt.ArrayLike, kept: npt.ArrayLike) -> np.ndarray:
    """The accumulated scores the kept cells take into the next eviction ([n_head_kv, budget]).

    kept: [n_head_kv, budget] from select_per_head (cell r of head h after the eviction holds kept[h, r])
    or [budget] cells from select_tokens (the cells stay where they are; each head keeps its score)."""
    s = np.asarray(scores, dtype=np.float64)
    kept = np.asarray(kept, dtype=np.int64)
    if kept.ndim == 1:
        return s[:, kept]
    return np.take_along_axis(s, kept, axis=1)


def max_pool_cells(scores: npt.ArrayLike, kernel: int = 5) -> np.ndarray:
    """1-D max pool along the cell axis (last axis), stride 1, padding kernel // 2; out-of-range cells
    are ignored (not zero-padded)."""
    s = np.asarray(scores, dtype=np.float64)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number, got {kernel}")
    half = kernel // 2
    n = s.shape[-1]
    padded = np.full(s.shape[:-1] + (n + 2 * half,), -np.inf)
    padded[..., half: half + n] = s
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
    return windows.max(axis=-1)


def snapkv_scores(q_win: npt.ArrayLike, keys: npt.ArrayLike, evictable: npt.ArrayLike,
                  fusion: str = "sum", group_reduce: str = "sum", kernel: int = 5) -> np.ndarray:
    """SnapKV's scores ([n_head_kv, n_cells]): MorphKV's layer_scores of the observation window, then a
    max pool of ``kernel`` cells per KV head along the cells (which are in position order at SnapKV's
    one compression, right after the prompt); cells that are not evictable score 0 (protected cells
    then take the protection bias in select_per_head / select_tokens)."""
    ev = np.asarray(evictable, dtype=bool)
    pooled = max_pool_cells(layer_scores(q_win, keys, ev, fusion, group_reduce), kernel)
    return np.where(ev[None, :], pooled, 0.0)
