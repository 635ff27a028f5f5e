"""Analytic FLOPs of a MoNE ViT / ViViT forward pass, per clip (or image). A multiply-add counts 2, as in
torch.utils.flop_counter; only matmuls, convolutions and attention are counted (norms, GELU, softmax and the
routing sort are not), which is also what FlopCounterMode counts. Tested against FlopCounterMode.

Per group (a frame, or an image) of N patch tokens plus P prefix (CLS) tokens, S = N + P, with n_j tokens on
expert j of width d_j (the prefix on the full expert), one nested block costs

    qkv   2 * n_j * d_j * 3D      (reads d_j channels, writes all 3D)
    attn  4 * S^2 * D             (q @ k^T and attn @ v at full width over all tokens)
    proj  2 * n_j * D * d_j       (writes d_j channels)
    fc1   2 * n_j * d_j * 4D      (hidden stays 4D)
    fc2   2 * n_j * 4D * d_j
    ----  24 * D * sum_j n_j d_j + 4 * S^2 * D     (mlp_ratio 4; in general (8 + 4r) D sum_j n_j d_j)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from .capacity import Budget, expert_counts, expert_widths, resolve_budget
from .vit import ModelConfig, get_config


def block_flops(dim: int, mlp_ratio: float, rows: Sequence[tuple[int, int]], seq: int) -> int:
    """One transformer block over one group: rows = [(n_j, d_j)] tokens per input/output width, seq = S."""
    D, Hd = dim, int(dim * mlp_ratio)
    total = 0
    for n, d in rows:
        total += 2 * n * d * 3 * D  # qkv: (n, d) @ (d, 3D)
        total += 2 * n * D * d  # attention out-proj: (n, D) @ (D, d)
        total += 2 * n * d * Hd  # fc1: (n, d) @ (d, 4D)
        total += 2 * n * Hd * d  # fc2: (n, 4D) @ (4D, d)
    total += 2 * seq * seq * D  # scores q @ k^T: H heads of (S, hd) @ (hd, S)
    total += 2 * seq * seq * D  # mixing attn @ v: H heads of (S, S) @ (S, hd)
    return total


def model_flops(
    cfg_or_name: str | ModelConfig,
    capacities: Budget = None,
    num_frames: int | None = None,
    img_size: int | None = None,
    num_classes: int = 0,
) -> float:
    """Forward FLOPs per clip for a variant at a budget (None = dense, e_c float, or E capacities).

    num_classes > 0 adds the classifier (2 * D * classes); the rest does not depend on it."""
    overrides = {k: v for k, v in (("num_frames", num_frames), ("img_size", img_size)) if v is not None}
    cfg = get_config(cfg_or_name, **overrides)
    c = resolve_budget(capacities, cfg.num_experts)
    D, N, P, E = cfg.dim, cfg.num_patches, cfg.num_prefix, cfg.num_experts
    Tp = cfg.temporal_tokens  # frames after tubelets (1 for images)
    K = cfg.token_dim  # t * p * p * C

    counts = expert_counts(c, N)  # tokens per expert in each frame; CLS rides on the full expert
    rows = [(n + (P if j == E - 1 else 0), d) for j, (n, d) in enumerate(zip(counts, expert_widths(D, E), strict=True))]

    flops = 2 * Tp * N * K * D  # patch/tubelet embedding: L = T' N tubelets of K values -> D
    flops += Tp * 2 * N * D * E  # router: (N, D) @ (D, E) per frame
    flops += Tp * cfg.depth * block_flops(D, cfg.mlp_ratio, rows, N + P)  # spatial (MoNE) encoder, per frame
    if cfg.video:
        St = Tp + P  # temporal tokens: T' pooled frames (+ temporal CLS)
        flops += cfg.temporal_depth * block_flops(D, cfg.mlp_ratio, [(St, D)], St)  # full-width temporal encoder
    flops += 2 * D * num_classes  # head: (1, D) @ (D, classes)
    return float(flops)


def _register_missing_formulas() -> None:
    """torch's flop counter has no formula for the CPU flash-attention kernel F.scaled_dot_product_attention
    dispatches to, nor for in-place addmm_ (our inference residual update); register the same formulas it uses
    for the CUDA attention kernels and for addmm."""
    from torch.utils.flop_counter import mm_flop, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if aten.addmm_ not in flop_registry:

        @register_flop_formula(aten.addmm_)
        def _addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            return mm_flop(a_shape, b_shape)

    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_registry:

        @register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in flop_registry:

        @register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch actually dispatches while running fn() (attention on CPU included)."""
    _register_missing_formulas()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
