"""The recipe's pure-torch parts: nested-stage sub-models, parameter groups (no_weight_decay, layer-wise lr decay)
and the EMA of the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.training import ema_model, lr_layer, nested_loss, param_groups, width_capacities, width_names
from models.vit import create_model

torch.set_num_threads(1)  # tiny models: threads only add overhead (and CI has 2 cores)


def _tiny(**kw):
    torch.manual_seed(0)
    # 2 spatial + 1 temporal blocks, D = 64: widths 8, 16, 32, 64
    return create_model("vivit_tiny", num_classes=4, dim=64, depth=2, temporal_depth=1, pool="gap", **kw)


def _batch(model, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    tokens = torch.randint(0, 256, (n, cfg.temporal_tokens * cfg.num_patches, cfg.token_dim), generator=g,
                           dtype=torch.uint8)
    return tokens, torch.arange(n) % 4


def test_width_capacities_are_the_four_standalone_widths():
    assert width_capacities(4) == [(1.0, 0, 0, 0), (0, 1.0, 0, 0), (0, 0, 1.0, 0), (0, 0, 0, 1.0)]
    assert width_names(4) == ["0.125", "0.25", "0.5", "1.0"]


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_one_width_step_trains_exactly_that_sub_model(j):
    """Drawing width j: gradients reach the first d_j input columns of every in-projection and the first d_j
    output rows of every out-projection of the spatial blocks, and nothing beyond (it is the D*2^(j-3) model)."""
    model = _tiny()
    tokens, target = _batch(model)
    loss = nested_loss(lambda t, c: model.forward_tokens(t, budget=c), tokens,
                       lambda logits: F.cross_entropy(logits, target), [j])
    loss.backward()
    d = model.widths[j]
    for blk in model.blocks:
        for lin in (blk.attn.qkv, blk.mlp.fc1):  # in-projections read d_j channels
            assert lin.weight.grad[:, :d].abs().sum() > 0
            assert torch.all(lin.weight.grad[:, d:] == 0)
        for lin in (blk.attn.proj, blk.mlp.fc2):  # out-projections write d_j channels
            assert lin.weight.grad[:d].abs().sum() > 0 and lin.bias.grad[:d].abs().sum() > 0
            assert torch.all(lin.weight.grad[d:] == 0) and torch.all(lin.bias.grad[d:] == 0)


def test_summed_nested_loss_is_the_mean_of_the_four_widths():
    model = _tiny()
    tokens, target = _batch(model)

    def crit(logits):
        return F.cross_entropy(logits, target)

    def fwd(t, c):
        return model.forward_tokens(t, budget=c)

    total = nested_loss(fwd, tokens, crit, range(4))
    each = [nested_loss(fwd, tokens, crit, [j]) for j in range(4)]
    torch.testing.assert_close(total, torch.stack(each).mean())


@pytest.mark.parametrize("mode", ["sum", "draw"])
def test_nested_stage_trains_every_width(mode):
    """A few nested-stage steps on one batch lower the loss of every width's sub-model (sum: all four each step;
    draw: one per step, in turn)."""
    model = _tiny()
    tokens, target = _batch(model, n=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def crit(logits):
        return F.cross_entropy(logits, target)

    def fwd(t, c):
        return model.forward_tokens(t, budget=c)

    def width_losses():
        with torch.no_grad():
            return [nested_loss(fwd, tokens, crit, [j]).item() for j in range(4)]

    before = width_losses()
    for step in range(8 if mode == "sum" else 16):
        loss = nested_loss(fwd, tokens, crit, range(4) if mode == "sum" else [step % 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = width_losses()
    assert all(a < 0.8 * b for a, b in zip(after, before, strict=True)), (before, after)


def test_param_groups_follow_no_weight_decay_and_layer_decay():
    model = _tiny()
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}  # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name in model.no_weight_decay():
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["blocks.0.norm1.weight"]["weight_decay"] == 0.0  # 1-D: norms and biases
    assert by_name["blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    # layers: 0 embeddings, 1-2 spatial blocks, 3 temporal block (and its input), 4 head / router / alpha
    expected = {"patch_embed.proj.weight": 0.5**4, "pos_embed": 0.5**4, "blocks.0.mlp.fc1.weight": 0.5**3,
                "blocks.1.mlp.fc1.weight": 0.5**2, "spatial_norm.weight": 0.5, "temporal_blocks.0.attn.qkv.weight": 0.5,
                "head.fc.weight": 1.0, "router.proj.weight": 1.0, "alpha": 1.0}
    for name, scale in expected.items():
        assert by_name[name]["lr"] == pytest.approx(scale), name
    assert lr_layer("temporal_pos_embed", depth=2, temporal_depth=1) == 3
    flat = param_groups(model, lr=2e-3, weight_decay=0.05)  # no layer decay: one lr everywhere
    assert {g["lr"] for g in flat} == {2e-3} and len(flat) == 2


def test_ema_follows_the_formula_and_stays_fp32():
    model = torch.nn.Linear(3, 2)
    ema = ema_model(model, decay=0.9, warmup=False)
    w0 = model.weight.detach().clone()
    expected = w0.clone()
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        # the first update copies (AveragedModel), then ema = 0.9 ema + 0.1 w
        expected = model.weight.detach().clone() if step == 0 else 0.9 * expected + 0.1 * model.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    model.to(torch.bfloat16)  # DeepSpeed bf16 casts the trained weights; the average stays fp32
    ema.update_parameters(model)
    assert ema.module.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_keeps_a_short_run_from_its_initialisation():
    model = torch.nn.Linear(3, 2)
    ema = ema_model(model, decay=0.9999)  # warm-up: decay (1+n)/(10+n) at first
    with torch.no_grad():
        model.weight.zero_()
    ema.update_parameters(model)  # copy
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # n = 1: decay 2/11
    torch.testing.assert_close(ema.module.weight, torch.full((2, 3), 9 / 11))
    with pytest.raises(ValueError, match="decay"):
        ema_model(model, decay=1.0)
