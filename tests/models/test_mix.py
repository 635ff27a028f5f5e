"""Mixup / CutMix on tokens (models/mix.py) equal their pixel-space definitions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.mix import MixConfig, cutmix_box, cutmix_tokens, mix_batch, mixup_tokens
from models.vit import create_model
from pipeline.tokens import tubelet_patchify

T, S, P, TT = 4, 32, 8, 2  # frames, frame size, patch, tubelet_t
GRID = (T // TT, S // P, S // P)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vivit_tiny", 5, num_frames=T, img_size=S, patch_size=P).eval()


def _clips(b=4, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, T, S, S, 3), dtype=np.uint8))


def _pixels(clips, model):
    """uint8 (B, T, H, W, 3) -> the model's normalised pixels (B, 3, T, H, W)."""
    x = clips.float() / 255.0
    x = (x - model.pixel_mean) / model.pixel_std
    return x.permute(0, 4, 1, 2, 3)


def test_token_mixup_equals_pixel_mixup(model):
    clips = _clips()
    tokens = tubelet_patchify(clips, TT, P)  # (B, L, K) uint8
    lam = 0.3
    pix = _pixels(clips, model)
    pix_mixed = lam * pix + (1 - lam) * pix.flip(0)  # the pixel-space definition
    tok_mixed = mixup_tokens(model.normalize_tokens(tokens), lam)
    # Tokens are the same numbers as the mixed pixels, rearranged ...
    assert torch.allclose(tok_mixed, tubelet_patchify(pix_mixed.permute(0, 2, 3, 4, 1), TT, P), atol=1e-6)
    # ... so the embedding, and every logit after it, is the pixel path's, at any budget.
    assert torch.allclose(model.embed_tokens(tok_mixed), model.embed_pixels(pix_mixed), atol=1e-4)
    with torch.no_grad():
        for budget in (None, 0.3):
            assert torch.allclose(model.forward_tokens(tok_mixed, budget), model(pix_mixed, budget), atol=1e-4)
    # The embedding is affine and lam + (1 - lam) = 1: mixing tokens is mixing embeddings.
    e = model.embed_tokens(tokens)
    assert torch.allclose(model.embed_tokens(tok_mixed), lam * e + (1 - lam) * e.flip(0), atol=1e-4)


def test_tubelet_cutmix_equals_patch_aligned_pixel_cutmix(model):
    clips = _clips(b=3, seed=1)
    tokens = tubelet_patchify(clips, TT, P)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        box = cutmix_box(float(rng.uniform(0.2, 0.9)), GRID[1:], rng)
        y0, y1, x0, x1 = box
        pixel = clips.clone()  # the pixel-space definition: the patch-aligned box over every frame
        pixel[:, :, y0 * P : y1 * P, x0 * P : x1 * P] = clips.flip(0)[:, :, y0 * P : y1 * P, x0 * P : x1 * P]
        mixed, lam = cutmix_tokens(tokens, box, GRID)
        assert mixed.dtype == torch.uint8 and torch.equal(mixed, tubelet_patchify(pixel, TT, P))
        kept = (pixel == clips).all(-1).float().mean((1, 2, 3))  # exact fraction of own pixels kept
        assert torch.allclose(kept[0], torch.tensor(lam), atol=1e-6)
        with torch.no_grad():
            assert torch.allclose(model.forward_tokens(mixed, 0.3), model(_pixels(pixel, model), 0.3), atol=1e-4)


def test_soft_targets_and_label_smoothing_match_timm():
    """mix_batch's soft targets with F.cross_entropy(label_smoothing=s) give timm's smoothed mixup loss."""
    tokens = torch.zeros(4, 8, 3, dtype=torch.uint8)
    tokens[1] = 255
    target = torch.tensor([0, 2, 1, 2])
    cfg = MixConfig(mixup_alpha=0.8)
    mixed, soft, info = mix_batch(tokens, target, 3, cfg, (2, 2, 2), np.random.default_rng(0),
                                  normalize=lambda t: t.float() / 255)
    lam = info["lam"]
    assert info["mix"] == "mixup" and 0 < lam < 1
    assert torch.allclose(soft.sum(-1), torch.ones(4))
    assert torch.allclose(soft[0], lam * F.one_hot(target[0], 3) + (1 - lam) * F.one_hot(target[3], 3))
    assert torch.allclose(mixed[1], torch.full((8, 3), lam))  # lam * 1 (white) + (1 - lam) * 0 (its black partner)
    # timm's mixup_target: smooth each one-hot (off = s/C, on = 1 - s + off), then mix; SoftTargetCrossEntropy.
    s, C = 0.1, 3
    off = s / C

    def smooth(y):
        return F.one_hot(y, C).float() * (1 - s) + off

    timm_target = lam * smooth(target) + (1 - lam) * smooth(target.flip(0))
    logits = torch.randn(4, 3)
    timm_loss = (-timm_target * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(F.cross_entropy(logits, soft, label_smoothing=s), timm_loss, atol=1e-6)


def test_mix_batch_modes_and_determinism():
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 8, 12), dtype=np.uint8))
    target = torch.tensor([0, 1, 2, 3])
    grid = (2, 2, 2)
    norm = lambda t: t.float()  # noqa: E731
    off = mix_batch(tokens, target, 4, MixConfig(), grid, np.random.default_rng(0), norm)
    assert off[0] is tokens and off[2]["mix"] == "none" and torch.equal(off[1], F.one_hot(target, 4).float())
    cut = MixConfig(cutmix_alpha=1.0)
    a = mix_batch(tokens, target, 4, cut, grid, np.random.default_rng(5), norm)
    b = mix_batch(tokens, target, 4, cut, grid, np.random.default_rng(5), norm)
    assert a[2]["mix"] == "cutmix" and a[0].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    both = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = {mix_batch(tokens, target, 4, both, grid, np.random.default_rng(s), norm)[2]["mix"] for s in range(20)}
    assert kinds == {"mixup", "cutmix"}
    never = MixConfig(mixup_alpha=0.8, prob=0.0)
    assert mix_batch(tokens, target, 4, never, grid, np.random.default_rng(0), norm)[2]["mix"] == "none"
