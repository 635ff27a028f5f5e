"""Spatial transforms on uint8 clips `(T, H, W, 3)` (numpy or torch; the result has the input's type).

Clips stay uint8 end to end (4x less memory and object-store traffic than float32); normalisation to the
model's mean/std happens in the model. Resizing is bilinear with antialiasing (torch's uint8 kernel), rounded
to uint8. Crops and flips are views/copies in numpy: torch is imported only when something must be resized
(the decoder already delivers the short side, so test-time views and plain random crops never import it: a fresh
decode worker starts seconds faster on a busy machine).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Clip = Any  # np.ndarray | torch.Tensor


def _as_torch(clip: Clip):
    import torch

    if isinstance(clip, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(clip)), True
    return clip, False


def _back(x, was_numpy: bool) -> Clip:
    return x.numpy() if was_numpy else x


def resize(clip: Clip, height: int, width: int) -> Clip:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) uint8."""
    if clip.shape[1] == height and clip.shape[2] == width:
        return clip
    import torch
    import torch.nn.functional as F

    x, was_np = _as_torch(clip)
    # uint8 in, uint8 out: torch's channels-last uint8 bilinear+antialias kernel (7x faster than a float
    # round trip, within 1 of it). (T, H, W, 3) viewed as (T, 3, H, W) is already channels-last.
    y = x.permute(0, 3, 1, 2)  # (T, 3, H, W)
    if y.dtype != torch.uint8:
        raise TypeError(f"clips are uint8, got {y.dtype}")
    y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    y = y.permute(0, 2, 3, 1).contiguous()  # (T, h, w, 3)
    return _back(y, was_np)


def short_side_resize(clip: Clip, size: int) -> Clip:
    """Resizes so that min(H, W) == size, keeping the aspect ratio."""
    h, w = clip.shape[1:3]
    if min(h, w) == size:
        return clip
    if h <= w:
        return resize(clip, size, max(1, round(w * size / h)))
    return resize(clip, max(1, round(h * size / w)), size)


def crop(clip: Clip, y: int, x: int, h: int, w: int) -> Clip:
    return clip[:, y : y + h, x : x + w]


def center_crop(clip: Clip, size: int) -> Clip:
    h, w = clip.shape[1:3]
    _check(h, w, size)
    return crop(clip, (h - size) // 2, (w - size) // 2, size, size)


def three_crop(clip: Clip, size: int) -> list[Clip]:
    """Three square crops along the long side: start, centre, end (the usual 3 spatial test views)."""
    h, w = clip.shape[1:3]
    _check(h, w, size)
    if w >= h:
        xs = [0, (w - size) // 2, w - size]
        y = (h - size) // 2
        return [crop(clip, y, x, size, size) for x in xs]
    ys = [0, (h - size) // 2, h - size]
    x = (w - size) // 2
    return [crop(clip, y, x, size, size) for y in ys]


def random_crop(clip: Clip, size: int, rng: np.random.Generator) -> Clip:
    h, w = clip.shape[1:3]
    _check(h, w, size)
    return crop(clip, int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)), size, size)


def random_resized_crop(clip: Clip, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Clip:
    """Inception-style crop (same box for every frame), resized to size x size."""
    h, w = clip.shape[1:3]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return resize(crop(clip, y, x, ch, cw), size, size)
    s = min(h, w)  # fallback: the central square
    return resize(crop(clip, (h - s) // 2, (w - s) // 2, s, s), size, size)


def hflip(clip: Clip) -> Clip:
    if isinstance(clip, np.ndarray):
        return np.ascontiguousarray(clip[:, :, ::-1])
    return clip.flip(2)


def _check(h: int, w: int, size: int) -> None:
    if h < size or w < size:
        raise ValueError(f"crop {size} larger than the frame {w}x{h}: resize the short side first")


def scale_jitter(clip: Clip, scale: tuple[float, float], min_side: int, rng: np.random.Generator) -> Clip:
    """Resizes the clip by one factor drawn from [min, max] (ViViT's scale jitter), keeping its short side at least
    `min_side` (the crop that follows must fit)."""
    lo, hi = scale
    if lo == hi == 1.0:
        return clip
    f = rng.uniform(lo, hi)
    h, w = clip.shape[1:3]
    f = max(f, min_side / min(h, w))
    return resize(clip, max(min_side, round(h * f)), max(min_side, round(w * f)))


def spatial_views(clip: Clip, spec, rng: np.random.Generator | None) -> list[Clip]:
    """The spatial views of one temporal view, `spec` a ClipSpec: short-side resize, then
    training: scale jitter, `spec.train_crop` (+ random flip if `spec.flip`), `spec.augment` -> 1 view;
    test: centre crop (1) or three crops (3)."""
    clip = short_side_resize(clip, spec.short_side)
    if spec.train:
        if rng is None:
            raise ValueError("training transforms are random: pass a seeded numpy Generator")
        clip = scale_jitter(clip, spec.augment.scale_jitter, spec.crop_size, rng)
        if spec.train_crop == "random_resized":
            out = random_resized_crop(clip, spec.crop_size, rng)
        elif spec.train_crop == "random":
            out = random_crop(clip, spec.crop_size, rng)
        else:
            out = center_crop(clip, spec.crop_size)
        if spec.flip and rng.random() < 0.5:
            out = hflip(out)
        if spec.augment.active:
            from pipeline.augment import augment_clip

            out = augment_clip(out, spec.augment, rng)
        return [out]
    if spec.spatial_views == 1:
        return [center_crop(clip, spec.crop_size)]
    return three_crop(clip, spec.crop_size)
