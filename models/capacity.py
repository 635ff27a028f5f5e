"""Budgets: from an effective capacity e_c to per-expert capacities, and from capacities to token counts.

Experts are nested and indexed smallest first: expert i (0-based) has width d_i = D / 2^(E-1-i),
so with E = 4 the widths are D/8, D/4, D/2, D. A capacity vector c gives the fraction of a frame's
tokens each expert takes; the effective capacity e_c = sum_i c_i * d_i / D is the fraction of the
dense projection FLOPs that is spent (1.0 = the dense model).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy.optimize import minimize

Budget = float | Sequence[float] | None


def width_fractions(num_experts: int = 4) -> tuple[float, ...]:
    """d_i / D for each expert, smallest first: (1/8, 1/4, 1/2, 1) for E = 4."""
    return tuple(2.0 ** (i - (num_experts - 1)) for i in range(num_experts))


def expert_widths(dim: int, num_experts: int = 4) -> tuple[int, ...]:
    """Nested widths d_i = D / 2^(E-1-i), smallest first."""
    if dim % 2 ** (num_experts - 1):
        raise ValueError(f"dim={dim} must be divisible by 2^(E-1)={2 ** (num_experts - 1)} for {num_experts} experts")
    return tuple(dim >> (num_experts - 1 - i) for i in range(num_experts))


def effective_capacity(capacities: Sequence[float]) -> float:
    """e_c = sum_i c_i * d_i / D."""
    return float(sum(c * f for c, f in zip(capacities, width_fractions(len(capacities)), strict=True)))


def dense_capacities(num_experts: int = 4) -> tuple[float, ...]:
    """All tokens on the full expert: the dense model."""
    return (0.0,) * (num_experts - 1) + (1.0,)


@lru_cache(maxsize=4096)
def _solve(e_c: float, num_experts: int, delta: float, beta: float) -> tuple[float, ...]:
    # maximise  sum_i c_i delta^i - beta sum_i c_i log c_i  s.t.  sum c = 1, c . w = e_c, 0 <= c <= 1
    # (MONE.md; delta^(i-1) with 1-based i is delta^i here). Written as a minimisation for SLSQP.
    w = np.asarray(width_fractions(num_experts))  # (E,)
    pref = delta ** np.arange(num_experts)  # (E,)

    def objective(c: np.ndarray) -> float:
        cc = np.clip(c, 1e-12, None)
        return -(c @ pref - beta * np.sum(cc * np.log(cc)))

    def gradient(c: np.ndarray) -> np.ndarray:
        cc = np.clip(c, 1e-12, None)
        return -(pref - beta * (np.log(cc) + 1.0))

    constraints = [
        {"type": "eq", "fun": lambda c: c.sum() - 1.0, "jac": lambda c: np.ones_like(c)},
        {"type": "eq", "fun": lambda c: c @ w - e_c, "jac": lambda c: w},
    ]
    res = minimize(
        objective,
        np.full(num_experts, 1.0 / num_experts),
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * num_experts,
        constraints=constraints,
        options={"ftol": 1e-12, "maxiter": 500},
    )
    c = np.clip(res.x, 0.0, 1.0)
    if not res.success or abs(c.sum() - 1.0) > 1e-6 or abs(c @ w - e_c) > 1e-6:
        raise ValueError(f"capacities_for_budget: SLSQP found no feasible capacities for e_c={e_c} ({res.message})")
    c = c / c.sum()
    return tuple(float(v) for v in c)


def capacities_for_budget(
    e_c: float, num_experts: int = 4, delta: float = 2.0, beta: float = 10.0
) -> tuple[float, ...]:
    """Capacities (smallest expert first) for an effective capacity e_c in (1/2^(E-1), 1].

    Cached on e_c rounded to 6 decimals: the training loop asks for it every step.
    """
    lo = 2.0 ** -(num_experts - 1)
    if not isinstance(e_c, numbers.Real) or not math.isfinite(e_c) or not lo < e_c <= 1.0 + 1e-9:
        raise ValueError(f"effective capacity e_c={e_c!r} is outside the valid range ({lo:g}, 1]")
    if num_experts < 2:
        raise ValueError(f"num_experts={num_experts} must be >= 2")
    if beta <= 0 or delta <= 0:
        raise ValueError(f"delta={delta} and beta={beta} must be > 0")
    if e_c >= 1.0 - 1e-9:  # the only feasible point: everything on the full expert
        return dense_capacities(num_experts)
    return _solve(round(float(e_c), 6), num_experts, float(delta), float(beta))


def resolve_budget(budget: Budget, num_experts: int = 4) -> tuple[float, ...]:
    """None -> dense; a float -> capacities_for_budget(e_c); a sequence of E floats -> validated capacities."""
    if budget is None:
        return dense_capacities(num_experts)
    if isinstance(budget, numbers.Real):
        return capacities_for_budget(float(budget), num_experts)
    c = tuple(float(v) for v in budget)
    if len(c) != num_experts:
        raise ValueError(f"capacities {c} must have {num_experts} entries (one per expert, smallest first)")
    if any(not math.isfinite(v) or v < 0 or v > 1 for v in c) or abs(sum(c) - 1.0) > 1e-4:
        raise ValueError(f"capacities {c} must lie in [0, 1] and sum to 1")
    return c


def expert_counts(capacities: Sequence[float], num_tokens: int) -> tuple[int, ...]:
    """Tokens per expert out of num_tokens under EPR: k_j = floor(c_j N) for every expert but the smallest,
    which takes the rest (its own share plus what flooring left over)."""
    # 1e-9 keeps c*N = 28.999999999999996 (0.29 * 100) from flooring to 28.
    ks = [int(math.floor(c * num_tokens + 1e-9)) for c in capacities[1:]]
    rest = num_tokens - sum(ks)
    if rest < 0:
        raise ValueError(f"capacities {tuple(capacities)} give more than {num_tokens} tokens")
    return (rest, *ks)
