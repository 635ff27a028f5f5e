"""Pure-torch pieces of the training recipe: the nested stage's sub-models, parameter groups (weight decay from
`model.no_weight_decay()`, layer-wise lr decay) and an exponential moving average (EMA) of the weights.

Nested stage (MatViT / MatFormer): the widths D/8, D/4, D/2, D are each trained as a standalone sub-model. A
one-hot capacity vector (every token on expert j) *is* that sub-model in our MoNE blocks: every projection reads
and writes the first d_j channels only, attention and the temporal encoder stay full width, as in MoNE.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from .capacity import width_fractions

# --------------------------------------------------------------------------------------------- nested stage


def width_capacities(num_experts: int = 4) -> list[tuple[float, ...]]:
    """One-hot capacity vectors, smallest width first: every token on expert j = the width-d_j sub-model."""
    return [tuple(1.0 if i == j else 0.0 for i in range(num_experts)) for j in range(num_experts)]


def width_names(num_experts: int = 4) -> list[str]:
    """'0.125', '0.25', '0.5', '1.0' for E = 4: the width as a fraction of D (= the sub-model's e_c)."""
    return [f"{f:g}" if f < 1 else "1.0" for f in width_fractions(num_experts)]


def nested_loss(
    forward: Callable[[Tensor, Sequence[float]], Tensor],
    tokens: Tensor,
    criterion: Callable[[Tensor], Tensor],
    widths: Iterable[int],
    num_experts: int = 4,
) -> Tensor:
    """Mean loss of the width sub-models `widths` (indices, 0 = D/8) on one batch: `forward(tokens, capacities)`
    gives (B, classes) logits, `criterion(logits)` the loss. All four widths = MatFormer's summed loss (one backward
    through four forwards); one index = one width per step (the caller draws it)."""
    caps = width_capacities(num_experts)
    return torch.stack([criterion(forward(tokens, caps[j])) for j in widths]).mean()


# --------------------------------------------------------------------------------------------- parameter groups

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_TEMPORAL_BLOCK = re.compile(r"^temporal_blocks\.(\d+)\.")
_EMBEDDING = ("patch_embed.", "pos_embed", "cls_token")


def lr_layer(name: str, depth: int, temporal_depth: int = 0) -> int:
    """Layer index of a parameter for layer-wise lr decay: 0 = embeddings, 1..depth = spatial blocks,
    depth+1.. = the temporal encoder (its input norm, tokens and position first), last = head.

    MoNE's own router and alpha, new in every fine-tuning, sit with the head (full lr)."""
    last = depth + temporal_depth + 1
    if name.startswith(_EMBEDDING):
        return 0
    if m := _BLOCK.match(name):
        return int(m.group(1)) + 1
    if m := _TEMPORAL_BLOCK.match(name):
        return depth + 1 + int(m.group(1))
    if name.startswith(("spatial_norm.", "temporal_pos_embed", "temporal_cls_token")):
        return depth + 1
    return last  # head, router, alpha


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups: no weight decay for `model.no_weight_decay()` and every 1-D parameter (biases, norms),
    lr * layer_decay^(last - layer) per layer (layer_decay = 1: one lr). Each group keeps its `names`."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth = len(getattr(model, "blocks", ()))
    temporal = len(getattr(model, "temporal_blocks", ()))
    last = depth + temporal + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = name not in skip and p.ndim > 1
        layer = lr_layer(name, depth, temporal) if layer_decay != 1.0 else last
        g = groups.setdefault((layer, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr": lr * layer_decay ** (last - layer), "lr_scale": layer_decay ** (last - layer),
        })
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------------------------- EMA of the weights


def ema_model(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An fp32 EMA of `model` (torch's AveragedModel): after each optimizer step call `.update_parameters(model)`;
    `.module` is the averaged model. Kept in fp32 even when the trained weights are bf16 (DeepSpeed bf16), where
    a 1e-4 update would round away. With `warmup`, the decay ramps as min(decay, (1+n)/(10+n)) over the first
    updates (timm's ModelEma warm-up), so a short run's EMA is not dominated by the initial weights."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay {decay} must be in (0, 1)")

    @torch.no_grad()
    def update(ema: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        n = float(n_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
        torch._foreach_lerp_(ema, [c.to(e.dtype) for e, c in zip(ema, current, strict=True)], 1.0 - d)

    avg = AveragedModel(model, multi_avg_fn=update, use_buffers=True)  # a deep copy of model
    avg.module.float().requires_grad_(False)
    return avg


__all__ = ["ema_model", "lr_layer", "nested_loss", "param_groups", "width_capacities", "width_names"]
