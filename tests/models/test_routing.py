import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.capacity import expert_counts
from models.routing import Router, expert_preferred_routing

capacities = st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4).filter(lambda v: sum(v) > 1e-3)


def _probs(seed: int, groups: int, n: int) -> torch.Tensor:
    # Distinct scores (no ties) so "top-k" is well defined.
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(groups, n, 4, generator=g, dtype=torch.float64) * 3, dim=-1)


def _reference_epr(probs: np.ndarray, counts) -> np.ndarray:
    """EPR as MONE.md words it, one group at a time."""
    n, e = probs.shape
    expert = np.zeros(n, dtype=np.int64)
    free = set(range(n))
    for j in range(e - 1, 0, -1):
        ranked = sorted(free, key=lambda i: -probs[i, j])[: counts[j]]
        for i in ranked:
            expert[i] = j
        free -= set(ranked)
    return expert


@settings(max_examples=60, deadline=None)
@given(capacities, st.integers(1, 64), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_epr_properties(raw, n, groups, seed):
    c = [v / sum(raw) for v in raw]
    counts = expert_counts(c, n)
    probs = _probs(seed, groups, n)
    expert = expert_preferred_routing(probs, counts)  # (G, N)
    for g in range(groups):
        e = expert[g].numpy()
        # every token assigned exactly once, expert j > 0 gets exactly floor(c_j N)
        assert e.shape == (n,) and set(e.tolist()) <= {0, 1, 2, 3}
        for j in range(1, 4):
            assert (e == j).sum() == math.floor(c[j] * n + 1e-9)
        # the largest expert's tokens are the top ones by its own score
        top = probs[g, :, 3].numpy()
        if 0 < counts[3] < n:
            assert top[e == 3].min() > top[e != 3].max()
        np.testing.assert_array_equal(e, _reference_epr(probs[g].numpy(), counts))


@settings(max_examples=30, deadline=None)
@given(capacities, st.integers(2, 64), st.integers(0, 2**31 - 1))
def test_epr_is_permutation_equivariant(raw, n, seed):
    c = [v / sum(raw) for v in raw]
    counts = expert_counts(c, n)
    probs = _probs(seed, 1, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    e = expert_preferred_routing(probs, counts)
    e_perm = expert_preferred_routing(probs[:, perm], counts)
    torch.testing.assert_close(e_perm, e[:, perm])


@settings(max_examples=30, deadline=None)
@given(capacities, st.integers(1, 40), st.integers(1, 2), st.integers(1, 3))
def test_router_order_groups_experts(raw, n, batch, frames):
    c = [v / sum(raw) for v in raw]
    torch.manual_seed(0)
    router = Router(16)
    x = torch.randn(batch * frames, n, 16)
    r = router(x, c, batch)
    assert r.expert.shape == (batch, frames, n)
    assert r.counts == expert_counts(c, n)
    e = r.expert.reshape(batch * frames, n)
    grouped = e.gather(1, r.order)  # experts along the permuted order
    assert torch.equal(grouped, torch.sort(e, dim=1).values)  # contiguous blocks, smallest expert first
    assert torch.equal(r.order.gather(1, r.inverse), torch.arange(n).expand_as(r.order))
    own = r.probs.gather(2, e.unsqueeze(-1)).squeeze(-1)  # (G, N)
    torch.testing.assert_close(r.gate, own.gather(1, r.order).t())
