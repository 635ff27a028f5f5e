import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference import naive_forward

from models.flops import count_flops, model_flops
from models.vit import VARIANTS, MoNEViT, MoNEViViT, create_model


def pixels_for(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (
        (batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size) if cfg.video else (batch, 3, cfg.img_size, cfg.img_size)
    )
    return torch.randn(*shape, generator=g)


def patchify(clip: torch.Tensor, t: int, p: int) -> torch.Tensor:
    """Local reference of the documented layout: clip (T, H, W, C) -> (L, t*p*p*C); tubelets (t', gy, gx),
    inside a tubelet (dt, py, px, c) with c fastest."""
    T, H, W, C = clip.shape
    x = clip.reshape(T // t, t, H // p, p, W // p, p, C)  # (t', dt, gy, py, gx, px, c)
    x = x.permute(0, 2, 4, 1, 3, 5, 6)  # (t', gy, gx, dt, py, px, c)
    return x.reshape(-1, t * p * p * C)


def small_overrides(name: str) -> dict:
    """Small inputs (4 patches per frame, 2 tubelet frames); everything else is the variant's own, except that the
    L variants keep 4 of their 24 blocks: 300M parameters and their gradients take ~30 s to stream through memory
    on a loaded 2-core machine, and depth adds no code path (full-size L is covered by the FLOPs test on meta)."""
    cfg = VARIANTS[name]
    if name.endswith("tiny"):
        return {}
    out = {"img_size": 32, **({"num_frames": 4} if cfg.video else {})}
    if name.endswith("l16"):
        out["depth"] = 4
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_backward_every_variant(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **small_overrides(name))
    assert isinstance(model, MoNEViViT if model.cfg.video else MoNEViT)
    x = pixels_for(model.cfg, batch=2)
    for budget in (None, 0.3):
        with torch.no_grad():
            flops = count_flops(lambda b=budget: model(x[:1], b))  # real CPU forward, attention included
        assert abs(flops / model_flops(model.cfg, budget, num_classes=5) - 1) < 0.02, (name, budget)
    model.alpha.data.fill_(0.5)  # the router gets gradient only through alpha * r
    logits, routing = model(x, 0.3, return_routing=True)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert routing.expert.shape == (2, model.cfg.temporal_tokens, model.cfg.num_patches)
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], missing
    assert model.router.proj.weight.grad.abs().sum() > 0 and model.alpha.grad != 0


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("budget", [None, 0.3])
def test_analytic_flops_match_flop_counter_full_size(name, budget):
    """Every variant at its real size (vivit_l16: 32 x 224 x 224), counted on the meta device."""
    with torch.device("meta"):
        model = create_model(name, num_classes=400)
    cfg = model.cfg
    shape = (1, 3, cfg.num_frames, cfg.img_size, cfg.img_size) if cfg.video else (1, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        counted = count_flops(lambda: model(torch.empty(shape, device="meta"), budget))
    assert abs(counted / model_flops(name, budget, num_classes=400) - 1) < 0.02


@pytest.mark.parametrize("name", ["vit_tiny", "vivit_tiny"])
@pytest.mark.parametrize("pool", ["cls", "gap", "max"])
@pytest.mark.parametrize("budget", [None, 0.3, 0.5, (0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.0, 0.0)])
def test_fast_model_equals_naive_reference(name, pool, budget):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, pool=pool).double().eval()
    model.alpha.data.fill_(0.7)
    x = pixels_for(model.cfg).double()
    with torch.no_grad():
        got, r1 = model(x, budget, return_routing=True)
        want, r2 = naive_forward(model, x, budget)
    assert torch.equal(r1.expert, r2.expert)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["vit_tiny", "vivit_tiny"])
def test_blocks_touch_only_first_d_i_channels(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    seen, inputs = [], {}

    def pre_hook(blk, args):
        inputs[blk] = args[0].clone()  # the model hands blocks its buffer to update in place

    def hook(blk, args, out):
        rows = args[1]
        delta = (out - inputs[blk]).flatten(0, 1)  # (S*G, D)
        for a, b, d in rows.bounds:
            seen.append(d)
            assert torch.all(delta[a:b, d:] == 0)
            assert torch.all(delta[a:b, :d].abs().sum(-1) > 0)

    for blk in model.blocks:
        blk.register_forward_pre_hook(pre_hook)
        blk.register_forward_hook(hook)
    with torch.no_grad():
        model(pixels_for(model.cfg), 0.4)
    assert set(seen) == set(model.widths)


@pytest.mark.parametrize("name", ["vit_tiny", "vivit_tiny", "vit_b16", "vivit_s16"])
def test_embed_tokens_equals_conv_on_pixels(name):
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=3, **small_overrides(name), pixel_mean=(0.4, 0.5, 0.6), pixel_std=(0.2, 0.25, 0.3)
    )
    cfg = model.cfg
    B, T = 2, cfg.num_frames
    clips = torch.randint(0, 256, (B, T, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8)  # (B, T, H, W, C)
    tokens = torch.stack([patchify(c, cfg.tubelet_t, cfg.patch_size) for c in clips])  # (B, L, K)
    assert tokens.shape == (B, cfg.temporal_tokens * cfg.num_patches, cfg.token_dim)
    mean, std = torch.tensor(cfg.pixel_mean), torch.tensor(cfg.pixel_std)
    pixels = ((clips.float() / 255 - mean) / std).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
    if not cfg.video:
        pixels = pixels[:, :, 0]  # (B, C, H, W)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_tokens(tokens), model.embed_pixels(pixels), rtol=1e-4, atol=1e-4)
        normed = patchify(((clips[0].float() / 255 - mean) / std), cfg.tubelet_t, cfg.patch_size)[None]
        torch.testing.assert_close(model.embed_tokens(normed), model.embed_pixels(pixels[:1]), rtol=1e-4, atol=1e-4)
        a = model.forward_tokens(tokens, 0.3)
        b = model(pixels, 0.3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_one_model_serves_every_budget():
    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=4).eval()
    x = pixels_for(model.cfg)
    with torch.no_grad():
        outs = {b: model(x, b) for b in (None, 1.0, 0.9, 0.5, 0.3, 0.2, 0.15)}
    assert torch.equal(outs[None], outs[1.0])
    assert not torch.allclose(outs[1.0], outs[0.3])
    with pytest.raises(ValueError, match="outside the valid range"):
        model(x, 0.1)


def test_routing_is_per_frame_and_permutes_with_tokens():
    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=4).eval()
    cfg = model.cfg
    tokens = torch.randint(0, 256, (2, cfg.temporal_tokens * cfg.num_patches, cfg.token_dim), dtype=torch.uint8)
    with torch.no_grad():
        logits, routing = model.forward_tokens(tokens, 0.3, return_routing=True)
    assert routing.expert.shape == (2, cfg.temporal_tokens, cfg.num_patches)
    per_frame = torch.stack([(routing.expert == j).sum(-1) for j in range(4)], -1)  # (B, T', E)
    assert torch.all(per_frame == torch.tensor(routing.counts))


def test_overrides_and_errors():
    m = create_model("vivit_tiny", 3, num_frames=4, img_size=32, pool="gap", drop_path=0.1)
    assert m.cfg.num_frames == 4 and m.cfg.temporal_tokens == 2 and m.cfg.num_patches == 16
    assert m.cls_token is None and m.temporal_cls_token is None
    assert dataclasses.is_dataclass(m.cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.cfg.dim = 3
    with pytest.raises(ValueError, match="unknown model variant"):
        create_model("vit_xxl", 3)
    with pytest.raises(ValueError, match="pool"):
        create_model("vit_tiny", 3, pool="attn")


def test_training_reduces_loss_and_reaches_router():
    """A few steps on a synthetic task (class = which quadrant is bright), a random budget per step."""
    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=4)
    cfg = model.cfg
    B = 8
    labels = torch.arange(B) % 4
    x = torch.randn(B, 3, cfg.num_frames, cfg.img_size, cfg.img_size) * 0.1
    h = cfg.img_size // 2
    for i, y in enumerate(labels.tolist()):
        x[i, :, :, (y // 2) * h : (y // 2 + 1) * h, (y % 2) * h : (y % 2 + 1) * h] += 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    budgets = [0.25, 0.55, 0.35, 0.95, 0.45, 0.25, 0.75, 0.35, 0.55, 0.45] * 2  # 20 steps
    with torch.no_grad():
        before = F.cross_entropy(model(x, 0.5), labels).item()
    router0 = model.router.proj.weight.detach().clone()
    for b in budgets:
        opt.zero_grad()
        F.cross_entropy(model(x, b), labels).backward()
        assert model.alpha.grad is not None
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x, 0.5), labels).item()
    assert after < 0.7 * before, (before, after)
    assert model.alpha.item() != 0  # alpha learns (straight-through clamp keeps it movable at 0)
    assert not torch.equal(router0, model.router.proj.weight)  # the router learnt through alpha * r


@pytest.mark.parametrize("name", ["vit_tiny", "vivit_tiny"])
def test_bf16_autocast_forward_and_backward(name):
    """The CUDA recipe runs under bf16 autocast; CPU autocast takes the same code path (matmuls in bf16 inside
    the nested Functions, residual stream and weights' gradients in fp32)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4)
    model.alpha.data.fill_(0.5)
    x = pixels_for(model.cfg)
    with torch.no_grad():
        ref = model(x, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            inf = model(x, 0.3)
        out = model(x, 0.3)
    torch.testing.assert_close(inf.float(), ref, rtol=0.1, atol=0.1)
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert model.router.proj.weight.grad.abs().sum() > 0
