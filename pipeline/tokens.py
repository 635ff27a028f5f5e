"""Tubelet patchify: uint8 clips -> uint8 tokens, the layout the model's patch embedding expects.

`tubelet_patchify(clip (T, H, W, 3), t, p) -> (L, t*p*p*3)`, `L = (T/t) * (H/p) * (W/p)`.
Tubelet order (t', gy, gx) with gx fastest; inside a tubelet (dt, py, px, c) with c fastest (docs/interfaces.md).
A Conv3d(3, D, kernel=(t,p,p), stride=(t,p,p)) with weight W (D, 3, t, p, p) equals
`tokens @ W.permute(0, 2, 3, 4, 1).reshape(D, -1).T` (+ bias) on the same pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is optional here: importing it costs seconds in every fresh decode worker
    import torch

Clip = Any  # np.ndarray | torch.Tensor


def tubelet_patchify(clip: Clip, t: int = 2, p: int = 16) -> Clip:
    """(T, H, W, C) -> (L, t*p*p*C); also batched (..., T, H, W, C) -> (..., L, t*p*p*C). numpy or torch."""
    *lead, T, H, W, C = clip.shape
    if T % t or H % p or W % p:
        raise ValueError(f"clip {T}x{H}x{W} is not divisible into {t}x{p}x{p} tubelets")
    x = clip.reshape(*lead, T // t, t, H // p, p, W // p, p, C)
    n = len(lead)
    perm = (*range(n), n + 0, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)  # (..., T', gy, gx, dt, py, px, C)
    x = x.transpose(perm) if isinstance(x, np.ndarray) else x.permute(perm)
    out = x.reshape(*lead, (T // t) * (H // p) * (W // p), t * p * p * C)
    return np.ascontiguousarray(out) if isinstance(out, np.ndarray) else out.contiguous()


def tubelet_unpatchify(tokens: Clip, grid: tuple[int, int, int], t: int = 2, p: int = 16, c: int = 3) -> Clip:
    """Inverse of `tubelet_patchify`: (..., L, t*p*p*c) with grid (T', gh, gw) -> (..., T, H, W, c)."""
    *lead, n_tok, k_dim = tokens.shape
    tt, gh, gw = grid
    if n_tok != tt * gh * gw or k_dim != t * p * p * c:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match grid {grid} and tubelet {t}x{p}x{p}x{c}")
    x = tokens.reshape(*lead, tt, gh, gw, t, p, p, c)
    n = len(lead)
    perm = (*range(n), n + 0, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)  # (..., T', dt, gy, py, gx, px, c)
    x = x.transpose(perm) if isinstance(x, np.ndarray) else x.permute(perm)
    return x.reshape(*lead, tt * t, gh * p, gw * p, c)


def conv_weight_as_linear(weight: torch.Tensor) -> torch.Tensor:  # noqa: F821
    """A Conv3d patch-embedding weight (D, 3, t, p, p) as the (D, t*p*p*3) matrix that acts on our tokens."""
    return weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
