"""The optimisation recipe of a run, resolved from its config: global batch, lr scaled to it, steps, the
optimizer (AdamW or SGD with momentum) over the model's parameter groups, the lr schedule and the training
stages. Gradient accumulation is DeepSpeed's own (`gradient_accumulation_steps` in jobs.train.deepspeed_config).
The numerics (parameter groups, layer-wise lr decay, EMA, nested losses) live in models/training.py; this module
only chooses from the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.config import TrainConfig


def global_batch(cfg: TrainConfig) -> int:
    """Clips per optimizer step over all workers: micro-batch x workers x accumulated micro-batches."""
    return cfg.optim.batch_size * cfg.scaling.num_workers * cfg.optim.grad_accum


def lr_scale(cfg: TrainConfig) -> float:
    """Linear scaling rule: optim.lr is given per `optim.lr_reference_batch` clips (256 by default)."""
    ref = cfg.optim.lr_reference_batch
    return global_batch(cfg) / ref if ref else 1.0


def scaled_lr(cfg: TrainConfig) -> tuple[float, float]:
    """(peak lr, floor lr) actually used for this run's global batch."""
    s = lr_scale(cfg)
    return cfg.optim.lr * s, cfg.optim.min_lr * s


def steps_per_epoch(cfg: TrainConfig, num_train: int) -> int:
    """Optimizer steps per epoch (every worker takes num_train / workers clips, drop_last)."""
    return max(1, num_train // global_batch(cfg))


def micro_steps_per_epoch(cfg: TrainConfig, num_train: int) -> int:
    return max(1, num_train // (cfg.optim.batch_size * cfg.scaling.num_workers))


def lr_lambda(cfg: TrainConfig, steps: int):
    """Linear warm-up then cosine to optim.min_lr, as a factor of the peak lr, per optimizer step."""
    warmup = max(1, int(cfg.optim.warmup_epochs * steps))
    total = max(warmup + 1, cfg.optim.epochs * steps)
    floor = cfg.optim.min_lr / cfg.optim.lr

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model, cfg: TrainConfig):
    """AdamW or SGD (momentum) over models.training.param_groups: no decay for model.no_weight_decay() and 1-D
    parameters, layer-wise lr decay when optim.layer_decay < 1, lr scaled to the global batch."""
    import torch

    from models.training import param_groups

    o = cfg.optim
    lr, _ = scaled_lr(cfg)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, lr, o.weight_decay,
                                                                                   o.layer_decay)]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


# --------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    name: str  # nested | dense | mone
    first_epoch: int
    last_epoch: int  # exclusive

    @property
    def epochs(self) -> int:
        return self.last_epoch - self.first_epoch


def stages(cfg: TrainConfig) -> list[Stage]:
    """The run's stages in order: nested (mone.nested_epochs), dense (mone.dense_epochs), then MoNE (e_c drawn per
    step) for the rest. `--dense` (mone.dense) makes every epoch after the nested stage dense."""
    m, total = cfg.mone, cfg.optim.epochs
    out, start = [], 0
    nested_end = min(total, m.nested_epochs)
    dense_end = total if m.dense else min(total, nested_end + m.dense_epochs)
    for name, end in (("nested", nested_end), ("dense", dense_end), ("mone", total)):
        if end > start:
            out.append(Stage(name, start, end))
            start = end
    return out


def stage_of(cfg: TrainConfig, epoch: int) -> str:
    for s in stages(cfg):
        if s.first_epoch <= epoch < s.last_epoch:
            return s.name
    return "mone"
