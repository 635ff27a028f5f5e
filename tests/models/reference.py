"""A naive MoNE forward for tests: original token order, (G, S, D) layout, masks instead of grouping.

It follows MONE.md literally: a token on expert i reads its first d_i channels (zeros elsewhere) in Q/K/V and
MLP-in, writes its first d_i channels in attention-out and MLP-out, and attention runs over all tokens at full
width. The fast model must compute the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.capacity import resolve_budget


def naive_block(blk, x, width, gate):
    """x (G, S, D), width (G, S) channels per token, gate (G, S) MLP scale -> (G, S, D)."""
    G, S, D = x.shape
    H = blk.attn.num_heads
    mask = (torch.arange(D) < width[..., None]).to(x.dtype)  # (G, S, D)
    h = blk.norm1(x) * mask
    q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(G, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)  # (G, H, S, S)
    o = (att @ v).transpose(1, 2).reshape(G, S, D)
    x = x + F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias) * mask
    h = blk.norm2(x) * mask
    a = F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    return x + gate[..., None] * F.linear(a, blk.mlp.fc2.weight, blk.mlp.fc2.bias) * mask


def naive_forward(model, pixels, budget=None):
    cfg = model.cfg
    x = model.embed_pixels(pixels)  # (B, L, D)
    B, L, D = x.shape
    N, P = cfg.num_patches, cfg.num_prefix
    G = B * L // N
    x = x.reshape(G, N, D) + model.pos_embed[:, P:]
    routing = model.router(x, resolve_budget(budget, cfg.num_experts), B)
    expert = routing.expert.reshape(G, N)
    width = torch.tensor(model.widths)[expert]  # (G, N)
    alpha = model.alpha.clamp(0, 1 - 1e-6)  # the forward value; model.router_alpha() adds the gradient path
    gate = alpha * routing.probs.gather(2, expert[..., None])[..., 0].to(x.dtype) + 1  # (G, N)
    if P:
        x = torch.cat([(model.cls_token + model.pos_embed[:, :P]).expand(G, P, D), x], dim=1)
        width = torch.cat([torch.full((G, P), D), width], dim=1)
        gate = torch.cat([gate.new_ones(G, P), gate], dim=1)
    for blk in model.blocks:
        x = naive_block(blk, x, width, gate)
    pooled = x[:, 0] if P else x.amax(1) if cfg.pool == "max" else x.mean(1)  # (G, D)
    if not cfg.video:
        return model.head(pooled), routing
    f = model.spatial_norm(pooled).view(B, -1, D)
    if P:
        f = torch.cat([model.temporal_cls_token.expand(B, P, D), f], dim=1)
    f = f + model.temporal_pos_embed
    full = torch.full(f.shape[:2], D)
    for blk in model.temporal_blocks:
        f = naive_block(blk, f, full, torch.ones(f.shape[:2], dtype=f.dtype))
    return model.head(f[:, 0] if P else f.mean(1)), routing
