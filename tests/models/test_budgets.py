"""models.budgets: budget lists, the capacity search space, Pareto fronts, isoFLOPs probabilities, stratified
splits, bootstrap intervals and the confidence cascade (no torch, no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.budgets import (
    SEND_ON,
    bootstrap_mean,
    budget_probabilities,
    calibrate_cascade,
    confidence,
    ec_range,
    max_vertices,
    pareto_mask,
    parse_budget_list,
    polytope_vertices,
    run_cascade,
    simplex_capacities,
    stratified_split,
)
from models.capacity import effective_capacity

# ----------------------------------------------------------------------------------------- budget lists


def test_budget_list_parser_takes_its_range_from_the_caller():
    lo, hi = ec_range(4)
    assert (lo, hi) == (0.125, 1.0)
    assert parse_budget_list("0.3, 0.2 1.0", what="--budget", low=lo, high=hi) == [0.3, 0.2, 1.0]
    assert parse_budget_list([0.3, "0.5"], what="mone.val_budgets", low=lo, high=hi) == [0.3, 0.5]
    assert parse_budget_list(0.4, what="mone.isoflops_target", low=lo, high=hi) == [0.4]
    assert parse_budget_list(None, what="--budget", low=lo, high=hi) == []
    with pytest.raises(ValueError, match=r"^--budget: budget e_c=1.5 is out of range; effective capacity must be "
                                         r"in \(0.125, 1\]"):
        parse_budget_list("0.3,1.5", what="--budget", low=lo, high=hi)
    with pytest.raises(ValueError, match=r"mone.val_budgets\[1\]: budget e_c=0.1 is out of range"):
        parse_budget_list([0.3, 0.1], what="mone.val_budgets", low=lo, high=hi)
    with pytest.raises(ValueError, match=r"--budget: 'abc' is not a number \(e.g. --budget 0.2,0.3,1.0\)"):
        parse_budget_list("abc", what="--budget", low=lo, high=hi)
    with pytest.raises(ValueError, match="out of range"):
        parse_budget_list("nan", what="--budget", low=lo, high=hi)
    # an open upper end: tune's targets (the dense model is always reported)
    with pytest.raises(ValueError, match=r"must be in \(0.125, 1\)"):
        parse_budget_list("1.0", what="--budgets", low=lo, high=hi, include_high=False)


# ----------------------------------------------------------------------------------------- search space


@pytest.mark.parametrize("e_c", [0.15, 0.2, 0.25, 0.3, 0.45, 0.5, 0.7, 0.95])
def test_every_sample_is_feasible(e_c):
    rng = np.random.default_rng(0)
    k = len(polytope_vertices(e_c))
    assert 1 <= k <= 4 and max_vertices([e_c, 0.3]) >= k
    for _ in range(200):
        c = simplex_capacities(e_c, rng.uniform(size=4))
        assert min(c) >= 0 and sum(c) == pytest.approx(1.0, abs=1e-9)
        assert effective_capacity(c) == pytest.approx(e_c, abs=1e-9)
    # the vertices themselves are reached at the corners of the parameter box
    corner = simplex_capacities(e_c, [0.0] * (k - 1) + [1.0 - 1e-12] + [0.0] * (4 - k))
    assert max(np.abs(np.subtract(corner, polytope_vertices(e_c)[k - 1]))) < 1e-6


def test_pareto_mask():
    #          (top1, gflops): a dominates b; c ties a (kept once); d is cheaper and worse: on the front
    assert pareto_mask([0.8, 0.7, 0.8, 0.5], [1.0, 1.1, 1.0, 0.5]) == [True, False, False, True]
    rng = np.random.default_rng(1)
    a, g = rng.uniform(size=50), rng.uniform(size=50)
    mask = pareto_mask(a, g)
    for i in range(50):  # brute force: on the front iff no other point is at least as good and better somewhere
        dominated = any(a[j] >= a[i] and g[j] <= g[i] and (a[j] > a[i] or g[j] < g[i]) for j in range(50) if j != i)
        assert mask[i] == (not dominated)


def test_isoflops_probabilities():
    budgets = [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    assert budget_probabilities(budgets, None) == pytest.approx([1 / 9] * 9)
    p = np.asarray(budget_probabilities(budgets, 0.4))
    assert p.sum() == pytest.approx(1.0) and p @ budgets == pytest.approx(0.4, abs=1e-9) and p.min() > 0
    assert list(p) == sorted(p, reverse=True)  # below the mean budget of 0.55: cheaper budgets drawn more often
    with pytest.raises(ValueError, match="outside the training budgets"):
        budget_probabilities(budgets, 0.1)


# ----------------------------------------------------------------------------------------- held-out figures


def test_stratified_split_is_a_seeded_disjoint_stratified_partition():
    labels = np.repeat(np.arange(8), [25, 25, 25, 25, 25, 25, 24, 3])
    labels = np.random.default_rng(0).permutation(labels)
    kept, held = stratified_split(labels, 0.5, seed=0)
    assert len(np.intersect1d(kept, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
    for c in range(8):
        n_c = int((labels == c).sum())
        n_held = int((labels[held] == c).sum())
        assert abs(n_held - n_c * 0.5) <= 0.5 + 1e-9 and 1 <= n_held <= n_c - 1, (c, n_held, n_c)
    again = stratified_split(labels, 0.5, seed=0)
    assert np.array_equal(again[1], held)  # seeded
    assert not np.array_equal(stratified_split(labels, 0.5, seed=1)[1], held)
    kept3, held3 = stratified_split(labels, 0.3, seed=0)
    assert len(held3) == sum(round(n * 0.3) for n in (25,) * 6 + (24, 3))
    assert stratified_split([0, 0, 1], 0.5)[1].tolist() in ([0], [1])  # a lone video stays on the kept side
    with pytest.raises(ValueError, match="must be in"):
        stratified_split(labels, 1.0)


def test_bootstrap_interval_of_a_known_difference_covers_it():
    # Paired per-video correctness of two methods whose true top-1 differ by 0.10 (0.80 vs 0.70).
    rng = np.random.default_rng(0)
    n, true_diff, reps = 200, 0.10, 200
    covered, widths = 0, []
    for r in range(reps):
        u = rng.uniform(size=n)
        a = u < 0.80
        b = u < 0.70  # correlated pairs, as two budgets of one model are
        iv = bootstrap_mean(a.astype(float) - b.astype(float), n_resamples=1000, seed=r)
        assert iv.mean == pytest.approx(a.mean() - b.mean())
        assert iv.low <= iv.mean <= iv.high
        covered += iv.low <= true_diff <= iv.high
        widths.append(iv.high - iv.low)
    assert 0.90 <= covered / reps <= 0.99, covered / reps  # a 95 % interval covers ~95 % of the time
    # the width shrinks like 1/sqrt(n): ~2 * 1.96 * sqrt(0.1 * 0.9 / 200) = 0.083
    assert np.median(widths) == pytest.approx(2 * 1.96 * np.sqrt(0.09 / n), rel=0.15)
    # identical methods: a zero difference, an interval of zero width that does not exclude 0
    same = bootstrap_mean(np.zeros(50))
    assert (same.low, same.high) == (0.0, 0.0) and not same.excludes_zero()
    assert bootstrap_mean(np.full(100, 0.5) + np.r_[np.zeros(50), np.ones(50)]).excludes_zero()
    assert np.isnan(bootstrap_mean([1.0]).low)


# ----------------------------------------------------------------------------------------- cascade


def test_confidences():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert confidence(p, "maxprob").tolist() == pytest.approx([0.7, 0.4])
    assert confidence(p, "margin").tolist() == pytest.approx([0.5, 0.05])
    with pytest.raises(ValueError, match="expected one of maxprob, margin"):
        confidence(p, "entropy")


def planted(n=600, seed=0):
    """Three levels. Level 0 is right exactly when its confidence >= 0.6; of the rest, level 1 is right exactly
    when its confidence >= 0.5; level 2 is always right. With costs 1, 1.5, 4 the cheapest cascade at no loss of
    top-1 answers at level 0 above 0.6, at level 1 above 0.5, and sends the rest on."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(size=(n, 3))
    correct = np.ones((n, 3), bool)
    correct[:, 0] = conf[:, 0] >= 0.6
    correct[:, 1] = conf[:, 1] >= 0.5
    return conf, correct, [1.0, 1.5, 4.0]


def test_cascade_thresholds_of_a_planted_structure_are_recovered():
    conf, correct, costs = planted()
    fit = calibrate_cascade(conf, correct, costs, max_drop=0.0)
    assert fit.top1 == 1.0 == fit.reference_top1
    # each threshold sits in the gap between the most confident wrong video and the least confident right one
    c0, c1 = conf[:, 0], conf[conf[:, 0] < 0.6, 1]
    assert c0[c0 < 0.6].max() < fit.thresholds[0] <= c0[c0 >= 0.6].min()
    assert c1[c1 < 0.5].max() < fit.thresholds[1] <= c1[c1 >= 0.5].min()
    expected = run_cascade(conf, correct, costs, [0.6, 0.5])
    assert fit.mean_cost == pytest.approx(expected.mean_cost) and fit.mean_cost < fit.reference_cost
    # allowing a drop buys compute; the drop stays within what was allowed
    loose = calibrate_cascade(conf, correct, costs, max_drop=0.05)
    assert loose.mean_cost < fit.mean_cost and loose.top1 >= fit.reference_top1 - 0.05


def test_calibration_is_the_exhaustive_optimum():
    """The vectorised search equals a plain loop over every combination of candidate thresholds."""
    rng = np.random.default_rng(3)
    n = 40
    conf = rng.uniform(size=(n, 3)).round(2)  # ties on purpose
    correct = rng.uniform(size=(n, 3)) < np.array([0.5, 0.7, 0.85])
    costs = [1.0, 2.0, 5.0]
    for drop in (0.0, 0.05, 0.2):
        fit = calibrate_cascade(conf, correct, costs, max_drop=drop)
        ref = run_cascade(conf, correct, costs, [SEND_ON, SEND_ON])
        best = None
        cands = [np.concatenate([[0.0], (lambda u: 0.5 * (u[1:] + u[:-1]))(np.unique(conf[:, lv])), [SEND_ON]])
                 for lv in range(2)]
        for ts in itertools.product(*cands):
            r = run_cascade(conf, correct, costs, ts)
            if r.top1 >= ref.top1 - drop - 1e-12 and (best is None or (r.mean_cost, -r.top1) < best):
                best = (r.mean_cost, -r.top1)
        assert (fit.mean_cost, -fit.top1) == pytest.approx(best)
        assert run_cascade(conf, correct, costs, fit.thresholds).mean_cost == pytest.approx(fit.mean_cost)


def test_cascade_that_sends_everything_on_is_the_last_level():
    conf, correct, costs = planted(50)
    r = run_cascade(conf, correct, costs, [SEND_ON, 2.0])  # any threshold above 1: the level is not run
    assert (r.level == 2).all() and np.array_equal(r.correct, correct[:, 2])
    assert np.allclose(r.cost, costs[2])
    r0 = run_cascade(conf, correct, costs, [0.0, 0.0])  # threshold 0: the first level answers everything
    assert (r0.level == 0).all() and np.allclose(r0.cost, costs[0])
