"""MoNE models: pure PyTorch, no Ray, no files. Tensors in, tensors out; the budget is a forward argument."""

from .capacity import capacities_for_budget, effective_capacity, expert_counts, expert_widths, resolve_budget
from .flops import count_flops, model_flops
from .routing import Router, Routing, expert_preferred_routing
from .vit import VARIANTS, ModelConfig, MoNEViT, MoNEViViT, create_model, get_config
from .weights import convert_timm_vit, inflate_patch_kernel, load_timm_vit

__all__ = [
    "VARIANTS",
    "ModelConfig",
    "MoNEViT",
    "MoNEViViT",
    "Router",
    "Routing",
    "capacities_for_budget",
    "convert_timm_vit",
    "count_flops",
    "create_model",
    "effective_capacity",
    "expert_counts",
    "expert_preferred_routing",
    "expert_widths",
    "get_config",
    "inflate_patch_kernel",
    "load_timm_vit",
    "model_flops",
    "resolve_budget",
]
