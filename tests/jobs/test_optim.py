"""The optimisation recipe: lr scaled to the global batch, optimizer choice and groups, stages, and gradient
accumulation through DeepSpeed's own gradient_accumulation_steps."""

from __future__ import annotations

import socket

import pytest
import torch

from jobs import optim as recipe
from jobs.config import ConfigError, load_config
from jobs.train import deepspeed_config


def test_lr_is_given_per_256_clips_and_scaled_to_the_global_batch():
    cfg = load_config("tiny_cpu", ["optim.lr=0.016", "optim.min_lr=1.6e-4", "optim.batch_size=16",
                                   "scaling.num_workers=2", "optim.grad_accum=3"])
    assert recipe.global_batch(cfg) == 16 * 2 * 3
    lr, floor = recipe.scaled_lr(cfg)
    assert lr == pytest.approx(0.016 * 96 / 256) and floor == pytest.approx(1.6e-4 * 96 / 256)
    # the optimizer the job builds runs at the scaled lr, and the schedule peaks there after warm-up
    from models.vit import create_model

    model = create_model("vivit_tiny", num_classes=4)
    opt = recipe.build_optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr] * len(opt.param_groups))
    f = recipe.lr_lambda(cfg, steps=10)
    warmup = int(cfg.optim.warmup_epochs * 10)
    assert f(warmup - 1) == pytest.approx(1.0) and f(cfg.optim.epochs * 10) == pytest.approx(floor / lr)
    # lr_reference_batch = 0: optim.lr is taken as it is
    raw = load_config("tiny_cpu", ["optim.lr=0.016", "optim.lr_reference_batch=0"])
    assert recipe.scaled_lr(raw)[0] == 0.016


def test_sgd_with_momentum_and_weight_decay_groups():
    from models.vit import create_model

    cfg = load_config("tiny_cpu", ["optim.optimizer=sgd", "optim.momentum=0.9", "optim.weight_decay=0.1",
                                   "optim.layer_decay=0.75"])
    model = create_model("vivit_tiny", num_classes=4)
    opt = recipe.build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    no_decay = {id(p) for n, p in model.named_parameters() if n in model.no_weight_decay()}
    assert no_decay  # pos_embed, alpha, ...
    for g in opt.param_groups:
        if any(id(p) in no_decay for p in g["params"]):
            assert g["weight_decay"] == 0.0
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert len(lrs) == len(model.blocks) + len(model.temporal_blocks) + 2  # one lr per layer
    assert lrs[-1] / lrs[0] == pytest.approx(0.75 ** -(len(lrs) - 1))


@pytest.mark.parametrize("override, message", [
    ("optim.optimizer=lamb", "optim.optimizer: 'lamb' is not one of adamw, sgd"),
    ("optim.grad_accum=0", "optim.grad_accum=0 must be >= 1"),
    ("optim.layer_decay=1.5", "optim.layer_decay=1.5 must be in (0, 1]"),
    ("mone.nested_mode=both", "mone.nested_mode: 'both' is not one of sum, draw"),
])
def test_bad_recipe_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny_cpu", [override])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config("tiny_cpu", ["optim.ema_decay=0.999", "scaling.zero_stage=3"])


def test_stages_run_nested_then_dense_then_mone():
    cfg = load_config("tiny_cpu", ["optim.epochs=10", "mone.nested_epochs=2", "mone.dense_epochs=3"])
    assert [(s.name, s.first_epoch, s.last_epoch) for s in recipe.stages(cfg)] == [
        ("nested", 0, 2), ("dense", 2, 5), ("mone", 5, 10)]
    assert [recipe.stage_of(cfg, e) for e in (0, 1, 2, 4, 5, 9)] == ["nested"] * 2 + ["dense"] * 2 + ["mone"] * 2
    dense = load_config("tiny_cpu", ["optim.epochs=4", "mone.nested_epochs=1", "mone.dense=true"])
    assert [s.name for s in recipe.stages(dense)] == ["nested", "dense"]


# --------------------------------------------------------------------------- DeepSpeed gradient accumulation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_accumulated_half_batches_give_the_gradients_of_one_full_batch(gloo_world_of_one, zero_stage):
    """DeepSpeed's gradient_accumulation_steps=2 with micro-batches of 4 takes the same optimizer step as one batch
    of 8: plain SGD (lr 1, no momentum), so the weight change is exactly the gradient."""
    import deepspeed
    import torch.nn.functional as F

    from models.vit import create_model

    torch.manual_seed(0)
    base = create_model("vivit_tiny", num_classes=4, dim=64, depth=1, temporal_depth=1, pool="gap")
    L, K = base.cfg.temporal_tokens * base.cfg.num_patches, base.cfg.token_dim
    tokens = torch.randint(0, 256, (8, L, K), dtype=torch.uint8)
    target = torch.arange(8) % 4

    def step(accum: int) -> dict[str, torch.Tensor]:
        cfg = load_config("tiny_cpu", [f"optim.batch_size={8 // accum}", f"optim.grad_accum={accum}",
                                       "scaling.num_workers=1", f"scaling.zero_stage={zero_stage}",
                                       "optim.grad_clip=0", "optim.optimizer=sgd", "optim.momentum=0",
                                       "optim.lr=1", "optim.lr_reference_batch=0", "optim.weight_decay=0"])
        model = create_model("vivit_tiny", num_classes=4, dim=64, depth=1, temporal_depth=1, pool="gap")
        model.load_state_dict(base.state_dict())
        opt = recipe.build_optimizer(model, cfg)  # the job's own: plain SGD at lr 1 here
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, use_gpu=False),
                                          dist_init_required=False)
        mb = 8 // accum
        for i in range(accum):
            part = slice(i * mb, (i + 1) * mb)
            loss = F.cross_entropy(engine.module.forward_tokens(tokens[part]), target[part])
            engine.backward(loss)
            engine.step()
        assert engine.global_steps == 1  # one optimizer step for the accumulated batch
        return {k: base.state_dict()[k] - v for k, v in model.state_dict().items() if v.is_floating_point()}

    full, accumulated = step(1), step(2)
    assert max(g.abs().max().item() for g in full.values()) > 1e-4  # the step did move the weights
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-4, atol=1e-6, msg=k)
