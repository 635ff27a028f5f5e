import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sampling import ClipSpec, dense_indices, sample_indices, segment_indices


def test_dense_train_random_start_reproducible():
    a = dense_indices(100, 8, 2, train=True, rng=np.random.default_rng(1))
    b = dense_indices(100, 8, 2, train=True, rng=np.random.default_rng(1))
    assert a.shape == (1, 8) and (a == b).all()
    assert (np.diff(a[0]) == 2).all() and 0 <= a[0, 0] <= 100 - 15
    starts = {int(dense_indices(100, 8, 2, train=True, rng=np.random.default_rng(s))[0, 0]) for s in range(50)}
    assert len(starts) > 20  # really random


def test_dense_test_centre_and_views():
    assert dense_indices(100, 8, 2, train=False)[0, 0] == (100 - 15) // 2
    v = dense_indices(100, 8, 2, train=False, views=4)
    assert v.shape == (4, 8) and v[0, 0] == 0 and v[-1, -1] == 99
    assert (np.diff(v[:, 0]) > 0).all()


def test_dense_short_video_loops():
    idx = dense_indices(5, 8, 2, train=False)
    assert idx.tolist() == [[0, 2, 4, 1, 3, 0, 2, 4]]
    r = dense_indices(1, 4, 3, train=True, rng=np.random.default_rng(0))
    assert r.tolist() == [[0, 0, 0, 0]]


def test_segment_sampling():
    mid = segment_indices(80, 8, train=False)
    assert mid.tolist() == [[5, 15, 25, 35, 45, 55, 65, 75]]
    tr = segment_indices(80, 8, train=True, rng=np.random.default_rng(0))
    seg = np.arange(8) * 10
    assert ((tr[0] >= seg) & (tr[0] < seg + 10)).all()
    views = segment_indices(80, 8, train=False, views=2)
    assert views.tolist()[0][:2] == [2, 12] and views.tolist()[1][:2] == [7, 17]


def test_segment_short_video_repeats_frames():
    idx = segment_indices(3, 8, train=False)
    assert idx.shape == (1, 8) and idx.min() == 0 and idx.max() == 2
    assert (np.diff(idx[0]) >= 0).all()


def test_training_needs_a_generator():
    with pytest.raises(ValueError, match="Generator"):
        dense_indices(100, 8, 2, train=True)


def test_clip_spec():
    s = ClipSpec(num_frames=8, crop_size=64, short_side=64, patch=16, tubelet_t=2)
    assert s.grid == (4, 4, 4) and s.num_tokens == 64 and s.token_dim == 2 * 16 * 16 * 3
    assert s.tokens_shape == (1, 64, 1536)
    ev = ClipSpec(**{**s.to_dict(), "train": False, "temporal_views": 4, "spatial_views": 3})
    assert ev.num_views == 12 and sample_indices(200, ev).shape == (4, 8)
    assert ClipSpec.from_dict(ev.to_dict()) == ev
    assert ClipSpec.kinetics(train=False).num_views == 12 and not ClipSpec.ssv2().flip
    with pytest.raises(ValueError, match="multiple of patch"):
        ClipSpec(crop_size=100)
    with pytest.raises(ValueError, match="tubelet_t"):
        ClipSpec(num_frames=7)
    with pytest.raises(ValueError, match="unknown fields"):
        ClipSpec.from_dict({"frames": 3})


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), t=st.integers(1, 32), stride=st.integers(1, 4), train=st.booleans(),
       views=st.integers(1, 5), seed=st.integers(0, 2**31), sampling=st.sampled_from(["dense", "segment"]))
def test_indices_always_valid(n, t, stride, train, views, seed, sampling):
    rng = np.random.default_rng(seed)
    if sampling == "dense":
        idx = dense_indices(n, t, stride, train=train, rng=rng, views=views)
    else:
        idx = segment_indices(n, t, train=train, rng=rng, views=views)
    assert idx.shape == (views, t) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n  # never out of range, short videos included
    if sampling == "segment" or n >= (t - 1) * stride + 1:
        assert (np.diff(idx, axis=1) >= 0).all()  # in time order
