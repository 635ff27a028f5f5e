import numpy as np
import pytest
import torch

from pipeline import transforms as T
from pipeline.sampling import ClipSpec


def _clip(t=4, h=48, w=64):
    return np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_short_side_resize_numpy_and_torch_agree():
    c = _clip()
    a = T.short_side_resize(c, 24)
    b = T.short_side_resize(torch.from_numpy(c), 24)
    assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
    assert a.shape == (4, 24, 32, 3) and a.dtype == np.uint8
    assert (a == b.numpy()).all()
    tall = T.short_side_resize(_clip(h=64, w=48), 24)
    assert tall.shape == (4, 32, 24, 3)
    assert T.short_side_resize(c, 48) is c  # no-op when already there


def test_resize_keeps_constant_colour():
    c = np.full((2, 30, 40, 3), 77, np.uint8)
    assert (T.resize(c, 15, 20) == 77).all() and (T.resize(c, 60, 80) == 77).all()


def test_crops():
    c = _clip()
    assert (T.center_crop(c, 32) == c[:, 8:40, 16:48]).all()
    left, mid, right = T.three_crop(c, 48)
    assert (left == c[:, :, :48]).all() and (right == c[:, :, 16:]).all() and (mid == c[:, :, 8:56]).all()
    r = T.random_crop(c, 32, np.random.default_rng(0))
    assert r.shape == (4, 32, 32, 3)
    rr = T.random_resized_crop(c, 32, np.random.default_rng(0))
    assert rr.shape == (4, 32, 32, 3) and rr.dtype == np.uint8
    with pytest.raises(ValueError, match="resize the short side first"):
        T.center_crop(c, 64)


def test_flip():
    c = _clip()
    assert (T.hflip(c)[:, :, 0] == c[:, :, -1]).all()
    assert (T.hflip(torch.from_numpy(c)).numpy() == T.hflip(c)).all()


def test_spatial_views_per_spec():
    c = _clip(h=48, w=64)
    base = dict(num_frames=4, short_side=32, crop_size=32, patch=16, tubelet_t=2)
    ev = ClipSpec(**base, train=False, spatial_views=3)
    views = T.spatial_views(c, ev, None)
    assert len(views) == 3 and all(v.shape == (4, 32, 32, 3) for v in views)
    tr = ClipSpec(**base, train=True, flip=True)
    a = T.spatial_views(c, tr, np.random.default_rng(5))
    b = T.spatial_views(c, tr, np.random.default_rng(5))
    assert len(a) == 1 and (a[0] == b[0]).all()  # same seed, same crop and flip
    # no flip unless asked (SSv2 / synthetic directions: flipping changes the label)
    nf = ClipSpec(**base, train=True, flip=False, train_crop="center")
    outs = [T.spatial_views(c, nf, np.random.default_rng(s))[0] for s in range(8)]
    assert all((o == outs[0]).all() for o in outs)
