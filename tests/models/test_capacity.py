import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.capacity import (
    _solve,
    capacities_for_budget,
    effective_capacity,
    expert_counts,
    expert_widths,
    resolve_budget,
)

REFERENCE = {  # MONE.md, smallest expert first
    0.2: (0.601, 0.310, 0.083, 0.006),
    0.3: (0.414, 0.321, 0.194, 0.071),
    0.4: (0.307, 0.282, 0.239, 0.171),
    0.5: (0.227, 0.235, 0.251, 0.287),
}


@pytest.mark.parametrize("e_c", sorted(REFERENCE))
def test_reference_values(e_c):
    c = capacities_for_budget(e_c)
    assert tuple(round(v, 3) for v in c) == REFERENCE[e_c]
    assert math.isclose(sum(c), 1.0, abs_tol=1e-9)
    assert math.isclose(effective_capacity(c), e_c, abs_tol=1e-6)


@pytest.mark.parametrize("e_c", [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 0.999, 1.0])
def test_training_grid_is_feasible(e_c):
    c = capacities_for_budget(e_c)
    assert all(0.0 <= v <= 1.0 for v in c)
    assert math.isclose(effective_capacity(c), e_c, abs_tol=1e-6)


def test_dense_budget_is_all_full_expert():
    assert capacities_for_budget(1.0) == (0.0, 0.0, 0.0, 1.0)
    assert resolve_budget(None) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("bad", [0.125, 0.1, 0.0, -0.3, 1.01, float("nan"), float("inf")])
def test_out_of_range_names_value_and_range(bad):
    with pytest.raises(ValueError, match=r"e_c=.*outside the valid range \(0\.125, 1\]"):
        capacities_for_budget(bad)


def test_infeasible_parameters_raise():
    with pytest.raises(ValueError, match="beta"):
        capacities_for_budget(0.3, beta=0.0)
    with pytest.raises(ValueError, match="capacities"):
        resolve_budget((0.5, 0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="4 entries"):
        resolve_budget((0.5, 0.5))


def test_cached_per_rounded_budget():
    capacities_for_budget(0.37)
    hits = _solve.cache_info().hits
    assert capacities_for_budget(0.37) == capacities_for_budget(0.3700000001)
    assert _solve.cache_info().hits == hits + 2


def test_widths():
    assert expert_widths(768) == (96, 192, 384, 768)
    with pytest.raises(ValueError):
        expert_widths(100)


@given(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4).filter(lambda v: sum(v) > 0), st.integers(1, 400))
def test_counts_floor_and_leftovers_to_smallest(raw, n):
    c = [v / sum(raw) for v in raw]
    counts = expert_counts(c, n)
    assert sum(counts) == n
    for j in range(1, 4):
        assert counts[j] == math.floor(c[j] * n + 1e-9)
    assert counts[0] >= math.floor(c[0] * n + 1e-9)
