"""Mixup and CutMix on tubelet tokens, with soft targets.

Tokens are the clip's pixels rearranged (pipeline/tokens.py), and the patch embedding is linear, so both mixes can
run on the `(B, L, K)` token batch instead of on pixels, with the same result:

- mixup: `lam * a + (1 - lam) * b` on normalised float tokens is, element for element, the same blend of the
  normalised pixels; and since the embedding is affine with lam + (1 - lam) = 1, it also equals mixing the two
  clips' embeddings.
- cutmix: a box on the patch grid `(gh, gw)`, the same box at every temporal position, swaps whole tubelets; that is
  pixel cutmix with a patch-aligned box over every frame. lam is the exact kept fraction of tubelets.

One lam per batch, the partner of sample i is sample B-1-i (the batch reversed), as timm's `Mixup` in its default
"batch" mode; timm's class itself is not used because `import timm` loads torchvision, which cannot load beside the
CPU torch here. The targets are the mixed one-hot vectors; label smoothing is left to
`F.cross_entropy(logits, soft_target, label_smoothing=s)`, which smooths probability targets the same way timm's
`mixup_target` does (smoothing is linear, so smoothing before or after mixing is the same).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for mixup's lam; 0 = off
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) for cutmix's box area; 0 = off
    prob: float = 1.0  # probability that a batch is mixed
    switch_prob: float = 0.5  # with both on: probability of cutmix for a batch

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def one_hot(target: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(target, num_classes).float()  # (B, C)


def mixup_tokens(tokens: Tensor, lam: float) -> Tensor:
    """(B, L, K) float -> (B, L, K): each clip blended with its partner (the batch reversed)."""
    return tokens * lam + tokens.flip(0) * (1.0 - lam)


def cutmix_box(lam: float, grid_hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box (y0, y1, x0, x1) on the patch grid covering about 1 - lam of it (timm's `rand_bbox`, in patches)."""
    gh, gw = grid_hw
    ratio = np.sqrt(1.0 - lam)
    ch, cw = int(round(gh * ratio)), int(round(gw * ratio))
    cy, cx = int(rng.integers(0, gh)), int(rng.integers(0, gw))
    y0, y1 = np.clip(cy - ch // 2, 0, gh), np.clip(cy + ch - ch // 2, 0, gh)
    x0, x1 = np.clip(cx - cw // 2, 0, gw), np.clip(cx + cw - cw // 2, 0, gw)
    return int(y0), int(y1), int(x0), int(x1)


def cutmix_tokens(tokens: Tensor, box: tuple[int, int, int, int], grid: tuple[int, int, int]) -> tuple[Tensor, float]:
    """(B, L, K) tokens in (t', gy, gx) order -> (B, L, K) with the box's tubelets (every t') taken from the partner;
    returns the tokens and lam, the fraction of each clip's own tubelets kept."""
    tt, gh, gw = grid
    B, L, K = tokens.shape
    if tt * gh * gw != L:
        raise ValueError(f"{L} tokens do not make the grid {grid}")
    y0, y1, x0, x1 = box
    out = tokens.clone()
    g = out.view(B, tt, gh, gw, K)  # (B, T', gh, gw, K)
    g[:, :, y0:y1, x0:x1] = tokens.view(B, tt, gh, gw, K).flip(0)[:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (gh * gw)
    return out, lam


def mix_batch(tokens: Tensor, target: Tensor, num_classes: int, cfg: MixConfig, grid: tuple[int, int, int],
              rng: np.random.Generator, normalize: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, dict]:
    """One training batch mixed: tokens (B, L, K) uint8 and labels (B,) -> model-ready tokens (B, L, K) and soft
    targets (B, C). `normalize` maps uint8 tokens to the model's normalised floats (`model.normalize_tokens`); the
    model takes float tokens as normalised. Returns also {"mix": "none"|"mixup"|"cutmix", "lam": float}.

    All randomness comes from `rng` (seed it with (seed, step, rank) to make a resumed run draw the same)."""
    soft = one_hot(target, num_classes)  # (B, C)
    use = cfg.active and rng.random() < cfg.prob
    if not use:
        return tokens, soft, {"mix": "none", "lam": 1.0}
    cut = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
    if cut:
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        tokens, lam = cutmix_tokens(tokens, cutmix_box(lam, grid[1:], rng), grid)  # uint8 stays uint8
    else:
        lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        tokens = mixup_tokens(normalize(tokens), lam)  # (B, L, K) float
    soft = soft * lam + soft.flip(0) * (1.0 - lam)  # (B, C)
    return tokens, soft, {"mix": "cutmix" if cut else "mixup", "lam": lam}


__all__ = ["MixConfig", "cutmix_box", "cutmix_tokens", "mix_batch", "mixup_tokens", "one_hot"]
