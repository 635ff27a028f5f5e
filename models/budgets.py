"""Numerics over compute budgets, shared by train, tune and evaluate (numpy/scipy only: no torch, Ray or files).

- Budget lists: one parser for e_c lists (CLI strings and config lists), its valid range given by the caller.
- The capacity search space of a target e_c: the feasible polytope {c >= 0, sum c = 1, c . d/D = e_c}, its
  vertices, and a Dirichlet(1) mixture of them from parameters in [0, 1) (every sample feasible).
- Pareto fronts (max accuracy, min GFLOPs).
- The isoFLOPs sampling probabilities over training budgets.
- Held-out evaluation: seeded class-stratified splits, and percentile bootstrap intervals over videos
  (scipy.stats.bootstrap; paired differences by resampling the per-video differences).
- The confidence cascade: run the cheapest level first and send on only the videos it is unsure of. A level
  answers a video when its confidence (max softmax probability, or the top-1/top-2 margin) is >= its threshold;
  a threshold above 1 sends every video on, and the level is then not run at all. `calibrate_cascade` picks the
  thresholds that minimise mean compute per video while keeping top-1 within `max_drop` of the last level's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .capacity import width_fractions

# ============================================================================ budget lists


def ec_range(num_experts: int = 4) -> tuple[float, float]:
    """The valid effective capacities (low, high]: below 1/2^(E-1) every token already sits on the smallest expert."""
    return 2.0 ** -(num_experts - 1), 1.0


def parse_budget_list(value: str | float | Sequence[float | str] | None, *, what: str, low: float, high: float,
                      include_high: bool = True, quantity: str = "budget e_c",
                      range_name: str = "effective capacity", hint: str = "") -> list[float]:
    """Budgets from a comma/space separated string ("0.2,0.3 1.0"), a number or a list, each checked to lie in
    (low, high] ((low, high) when include_high is False), in the order given.

    Raises ValueError with one line naming the input (`what`, plus `[i]` for an item of a list) and the fix."""
    if value is None:
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items, names = [value], [what]
    elif isinstance(value, str):
        items = [s for s in value.replace(" ", ",").split(",") if s]
        names = [what] * len(items)
    else:
        items = list(value)
        names = [f"{what}[{i}]" for i in range(len(items))]
    example = f"{what} 0.2,0.3,1.0" if what.startswith("-") else f"{what}: [0.3]"
    interval = f"({low:g}, {high:g}{']' if include_high else ')'}"
    out = []
    for name, s in zip(names, items, strict=True):
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: '{s}' is not a number (e.g. {example})") from None
        inside = low < v <= high + 1e-9 if include_high else low < v < high
        if not math.isfinite(v) or not inside:
            raise ValueError(f"{name}: {quantity}={v:g} is out of range; {range_name} must be in {interval}"
                             + (f" ({hint})" if hint else ""))
        out.append(min(v, high) if include_high else v)
    return out


# ============================================================================ capacity search space


def polytope_vertices(e_c: float, num_experts: int = 4) -> list[tuple[float, ...]]:
    """Vertices of {c >= 0, sum c = 1, sum c_i w_i = e_c} (w = d_i/D): points with at most two non-zero
    capacities, one expert narrower and one wider than e_c. Every feasible c is a convex mix of them."""
    w = width_fractions(num_experts)
    verts: list[tuple[float, ...]] = []
    for i in range(num_experts):
        for j in range(i, num_experts):
            c = [0.0] * num_experts
            if abs(w[i] - e_c) < 1e-12:
                c[i] = 1.0
            elif abs(w[j] - e_c) < 1e-12:
                c[j] = 1.0
            elif w[i] < e_c < w[j]:
                c[i] = (w[j] - e_c) / (w[j] - w[i])
                c[j] = 1.0 - c[i]
            else:
                continue
            v = tuple(round(x, 12) for x in c)
            if v not in verts:
                verts.append(v)
    if not verts:
        raise ValueError(f"e_c={e_c:g} is outside ({w[0]:g}, 1]")
    return verts


def simplex_capacities(e_c: float, params: Sequence[float], num_experts: int = 4) -> tuple[float, ...]:
    """A feasible capacity vector from parameters in [0, 1): exponential spacings -log(1 - u_k) normalised are
    Dirichlet(1) weights on the polytope's vertices (uniform u -> uniform weights); the mix meets both constraints."""
    verts = polytope_vertices(e_c, num_experts)
    if len(params) < len(verts):
        raise ValueError(f"{len(verts)} vertex weights needed at e_c={e_c:g}, got {len(params)}")
    u = np.clip(np.asarray(params[: len(verts)], dtype=np.float64), 0.0, 1.0 - 1e-12)  # (k,)
    a = -np.log(np.maximum(1e-12, 1.0 - u)) + 1e-12  # (k,) Exp(1) spacings
    c = np.clip((a / a.sum()) @ np.asarray(verts), 0.0, None)  # (E,)
    return tuple(float(x) for x in c / c.sum())


def max_vertices(targets: Sequence[float], num_experts: int = 4) -> int:
    """The most vertices any target's polytope has: the number of parameters a search needs."""
    return max(len(polytope_vertices(e, num_experts)) for e in targets)


# ============================================================================ Pareto front


def pareto_mask(top1: Sequence[float], gflops: Sequence[float]) -> list[bool]:
    """Non-dominated points (max top-1, min GFLOPs); of identical points only the first is kept."""
    a = np.asarray(top1, dtype=np.float64)  # (n,)
    g = np.asarray(gflops, dtype=np.float64)  # (n,)
    n = len(a)
    better_eq = (a[None, :] >= a[:, None]) & (g[None, :] <= g[:, None])  # (n, n): [i, j] j is at least as good as i
    strictly = (a[None, :] > a[:, None]) | (g[None, :] < g[:, None])
    earlier = np.arange(n)[None, :] < np.arange(n)[:, None]  # j < i: an identical earlier point wins
    np.fill_diagonal(better_eq, False)
    return (~(better_eq & (strictly | earlier)).any(axis=1)).tolist()


# ============================================================================ training-time sampling


def budget_probabilities(budgets: Sequence[float], target: float | None) -> list[float]:
    """Sampling probabilities over the training budgets.

    `target=None`: uniform (the paper). Otherwise the isoFLOPs schedule: the maximum-entropy distribution
    p_i ∝ exp(λ e_i) whose mean budget is `target`, so the expected compute per step equals that of a model
    trained at e_c = target while every budget is still seen.
    """
    e = np.asarray(budgets, dtype=np.float64)
    if target is None or len(e) == 1:
        return [1.0 / len(e)] * len(e)
    if not e.min() <= target <= e.max():
        raise ValueError(f"isoflops target {target} is outside the training budgets [{e.min()}, {e.max()}]")

    def mean(lam: float) -> tuple[float, np.ndarray]:
        w = np.exp(lam * (e - e.mean()))
        p = w / w.sum()
        return float(p @ e), p

    lo, hi = -200.0, 200.0  # mean(λ) is increasing in λ: bisection
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean(mid)[0] < target:
            lo = mid
        else:
            hi = mid
    return mean(0.5 * (lo + hi))[1].tolist()


# ============================================================================ held-out evaluation


def stratified_split(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out) of a seeded split with `fraction` of every class held out.

    Per class, round(n_c * fraction) videos are held out, at least one on each side when the class has two or
    more; a class with a single video stays on the kept side. Both index arrays are sorted; together they are a
    partition of range(len(labels))."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction:g} must be in (0, 1)")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(np.floor(len(idx) * fraction + 0.5))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(rng.permutation(idx)[:k])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(y)), held_out)
    return kept, held_out


@dataclass(frozen=True)
class Interval:
    """A mean over videos and its percentile bootstrap interval (low, high); NaN bounds with fewer than 2 videos."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self, name: str) -> dict[str, float]:
        """{name: mean, name_low: low, name_high: high}"""
        return {name: self.mean, f"{name}_low": self.low, f"{name}_high": self.high}


def bootstrap_mean(values: Sequence[float], *, level: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> Interval:
    """The mean of per-video values (N,) with its percentile bootstrap interval over videos.

    For a paired difference between two methods on the same videos, pass the per-video differences: resampling
    the videos keeps the pairs together."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64).ravel()  # (N,)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = float(x.mean())
    if n < 2:
        return Interval(m, math.nan, math.nan, n)
    if np.all(x == x[0]):  # every resample has the same mean (scipy warns and returns NaN)
        return Interval(m, m, m, n)
    res = bootstrap((x,), np.mean, confidence_level=level, n_resamples=n_resamples, method="percentile",
                    vectorized=True, random_state=np.random.default_rng(seed))
    return Interval(m, float(res.confidence_interval.low), float(res.confidence_interval.high), n)


# ============================================================================ confidence cascade

CONFIDENCES = ("maxprob", "margin")
SEND_ON = math.inf  # a threshold no confidence reaches: every video goes on and the level is not run


def confidence(top_probs: np.ndarray, kind: str) -> np.ndarray:
    """Per-video confidence from class probabilities sorted best first, (N, k) with k >= 2 (the top-k a
    prediction keeps is enough): "maxprob" p1, or "margin" p1 - p2. Both lie in [0, 1]."""
    p = np.asarray(top_probs, dtype=np.float64)  # (N, k)
    if kind == "maxprob":
        return p[:, 0].copy()
    if kind == "margin":
        if p.shape[1] < 2:
            raise ValueError("margin confidence needs the two largest probabilities of each video")
        return p[:, 0] - p[:, 1]
    raise ValueError(f"confidence '{kind}': expected one of {', '.join(CONFIDENCES)}")


def runs_level(threshold: float) -> bool:
    """Whether a (non-final) level with this threshold is run: above 1 no confidence can reach it."""
    return not threshold > 1.0


@dataclass(frozen=True)
class CascadeResult:
    """Per video: the level that answered (N,), whether it was right (N,), and the compute it spent (N,)."""

    level: np.ndarray
    correct: np.ndarray
    cost: np.ndarray

    @property
    def top1(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else math.nan

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean()) if len(self.cost) else math.nan


def run_cascade(conf: np.ndarray, correct: np.ndarray, costs: Sequence[float],
                thresholds: Sequence[float]) -> CascadeResult:
    """What a cascade does, from every level's per-video confidence (N, L) and correctness (N, L).

    Level l < L-1 answers the videos that reach it with conf >= thresholds[l]; the last answers the rest. A video
    pays costs[l] for every level it reaches that is run (thresholds above 1: not run, see `runs_level`)."""
    conf = np.asarray(conf, dtype=np.float64)  # (N, L)
    correct = np.asarray(correct, dtype=bool)  # (N, L)
    n, L = conf.shape
    if len(costs) != L or len(thresholds) != L - 1:
        raise ValueError(f"{L} levels need {L} costs and {L - 1} thresholds, got {len(costs)} and {len(thresholds)}")
    level = np.full(n, L - 1, np.int64)
    cost = np.zeros(n)
    pending = np.ones(n, bool)
    for lv, t in enumerate(thresholds):
        if not runs_level(t):
            continue
        cost[pending] += costs[lv]
        answer = pending & (conf[:, lv] >= t)
        level[answer] = lv
        pending &= ~answer
    cost[pending] += costs[L - 1]
    return CascadeResult(level, correct[np.arange(n), level], cost)


@dataclass(frozen=True)
class CascadeFit:
    thresholds: tuple[float, ...]  # one per level but the last; SEND_ON: the level is not run
    top1: float  # of the cascade on the calibration videos
    mean_cost: float
    reference_top1: float  # of the last level alone
    reference_cost: float
    candidates: int  # threshold combinations compared


def _candidates(c: np.ndarray, limit: int) -> np.ndarray:
    """Thresholds worth trying for one level: 0 (answers every video), the midpoints between its distinct
    confidences (at most `limit`, spread over the quantiles), and SEND_ON."""
    u = np.unique(c)
    mids = 0.5 * (u[1:] + u[:-1])
    if len(mids) > limit:
        mids = np.unique(np.quantile(mids, np.linspace(0.0, 1.0, limit), method="nearest"))
    return np.concatenate([[0.0], mids, [SEND_ON]])


def calibrate_cascade(conf: np.ndarray, correct: np.ndarray, costs: Sequence[float], max_drop: float,
                      max_combinations: int = 200_000) -> CascadeFit:
    """Thresholds that minimise the mean cost per video subject to top-1 >= the last level's top-1 - max_drop
    (a fraction: 0.005 = half a point), by exhaustive search over each level's candidate thresholds (all of them
    when the combinations fit in `max_combinations`, else evenly spread quantiles). Ties: higher top-1, then the
    first found. The last level alone (every threshold SEND_ON) always qualifies."""
    conf = np.asarray(conf, dtype=np.float64)  # (N, L)
    correct = np.asarray(correct, dtype=bool)  # (N, L)
    n, L = conf.shape
    if n == 0:
        raise ValueError("no calibration videos")
    if L < 2:
        raise ValueError("a cascade needs at least two levels")
    if max_drop < 0:
        raise ValueError(f"max_drop={max_drop:g} must be >= 0")
    per_level = max(2, int(max_combinations ** (1.0 / (L - 1))) - 2)
    cands = [_candidates(conf[:, lv], per_level) for lv in range(L - 1)]
    ref = run_cascade(conf, correct, costs, [SEND_ON] * (L - 1))
    floor = ref.top1 - max_drop - 1e-12
    best = (round(ref.mean_cost, 12), -ref.top1, tuple([SEND_ON] * (L - 1)))
    count = 0
    # All but the last threshold are enumerated; the last one is vectorised: for each prefix, the videos still
    # pending at level L-2 are answered there iff conf >= t, for every candidate t at once.
    for prefix in itertools.product(*cands[:-1]):
        head = run_cascade(conf, correct, costs, [*prefix, SEND_ON])  # the last level answers what is pending
        pending = head.level == L - 1  # (N,)
        base_cost = head.cost - np.where(pending, costs[L - 1], 0.0)  # (N,) spent before levels L-2, L-1
        base_right = int(head.correct[~pending].sum())
        t = cands[-1]  # (T,)
        c_last = conf[pending, L - 2]  # (P,)
        answer = c_last[:, None] >= t[None, :]  # (P, T)
        right = base_right + (answer & correct[pending, L - 2][:, None]).sum(0) \
            + (~answer & correct[pending, L - 1][:, None]).sum(0)  # (T,)
        runs = np.array([runs_level(x) for x in t])  # (T,)
        cost = base_cost.sum() + len(c_last) * costs[L - 2] * runs + (~answer).sum(0) * costs[L - 1]  # (T,)
        top1, mean_cost = right / n, cost / n
        count += len(t)
        ok = np.flatnonzero(top1 >= floor)
        if len(ok):
            i = ok[np.lexsort((-top1[ok], mean_cost[ok]))[0]]
            cand = (round(float(mean_cost[i]), 12), -float(top1[i]), (*prefix, float(t[i])))
            if cand[:2] < best[:2]:
                best = cand
    return CascadeFit(tuple(float(x) for x in best[2]), -best[1], best[0], ref.top1, ref.mean_cost, count)
