import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.tokens import conv_weight_as_linear, tubelet_patchify, tubelet_unpatchify


def _reference(clip, t, p):
    """The layout of docs/interfaces.md, written as loops: tubelets (t', gy, gx), inside (dt, py, px, c)."""
    T, H, W, C = clip.shape
    out = []
    for ti in range(T // t):
        for gy in range(H // p):
            for gx in range(W // p):
                vec = []
                for dt in range(t):
                    for py in range(p):
                        for px in range(p):
                            for c in range(C):
                                vec.append(clip[ti * t + dt, gy * p + py, gx * p + px, c])
                out.append(vec)
    return np.array(out, dtype=clip.dtype)


@settings(max_examples=25, deadline=None)
@given(t=st.sampled_from([1, 2]), p=st.sampled_from([2, 4]), nt=st.integers(1, 3), gh=st.integers(1, 3),
       gw=st.integers(1, 3), seed=st.integers(0, 1000))
def test_layout_matches_slow_reference(t, p, nt, gh, gw, seed):
    clip = np.random.default_rng(seed).integers(0, 256, (nt * t, gh * p, gw * p, 3), dtype=np.uint8)
    tok = tubelet_patchify(clip, t, p)
    assert tok.shape == (nt * gh * gw, t * p * p * 3) and tok.dtype == np.uint8
    assert (tok == _reference(clip, t, p)).all()
    assert (tubelet_patchify(torch.from_numpy(clip), t, p).numpy() == tok).all()
    assert (tubelet_unpatchify(tok, (nt, gh, gw), t, p) == clip).all()


def test_equals_conv3d_patch_embedding():
    torch.manual_seed(0)
    t, p, D = 2, 16, 24
    clip = torch.randint(0, 256, (8, 64, 48, 3), dtype=torch.uint8)  # (T, H, W, 3)
    conv = torch.nn.Conv3d(3, D, kernel_size=(t, p, p), stride=(t, p, p))
    x = clip.permute(3, 0, 1, 2)[None].double()  # (1, 3, T, H, W)
    ref = conv.double()(x)[0]  # (D, T', gh, gw)
    ref = ref.permute(1, 2, 3, 0).reshape(-1, D)  # (T'*gh*gw, D) in (t', gy, gx) order
    w = conv.weight.permute(0, 2, 3, 4, 1).reshape(D, -1)  # (D, t, p, p, 3) -> (D, K)
    assert torch.equal(w, conv_weight_as_linear(conv.weight))
    tokens = tubelet_patchify(clip, t, p)  # (L, K) uint8
    out = tokens.double() @ w.T + conv.bias
    assert torch.allclose(out, ref, atol=1e-9)


def test_batched_and_image():
    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 32, 32, 3), dtype=np.uint8)  # (B, V, T, H, W, 3)
    tok = tubelet_patchify(clips, 2, 16)
    assert tok.shape == (2, 3, 8, 1536)
    assert (tok[1, 2] == tubelet_patchify(clips[1, 2], 2, 16)).all()
    img = clips[0, 0, :1]  # T = 1, t = 1: an image
    assert tubelet_patchify(img, 1, 16).shape == (4, 768)
    with pytest.raises(ValueError, match="not divisible"):
        tubelet_patchify(clips[0, 0, :3], 2, 16)
