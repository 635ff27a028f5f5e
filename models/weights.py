"""State-dict mapping from timm / plain ViT checkpoints into MoNE ViT and ViViT.

Our blocks keep timm's names (blocks.i.norm1, .attn.qkv, .attn.proj, .norm2, .mlp.fc1, .mlp.fc2), so a
timm `VisionTransformer` state_dict maps almost 1:1; at budget=None the MoNE ViT then computes exactly
timm's function. The router and alpha are MoNE's own and keep their initialisation (alpha = 0 leaves the
MLP branch unscaled). For ViViT the ViT becomes the spatial encoder: the 2-D patch kernel is inflated to the
tubelet (central-frame or averaging, as in ViViT), `norm` becomes the spatial encoder's final norm, and the
temporal encoder and head start fresh.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import ModelConfig


def resample_pos_embed(pos: Tensor, new_grid: int, num_prefix: int) -> Tensor:
    """(1, P + g*g, D) -> (1, num_prefix + new_grid^2, D), bicubic over the grid like timm; prefix kept or dropped."""
    P_old = pos.shape[1] - int(math.isqrt(pos.shape[1])) ** 2  # 1 with a CLS position, 0 without
    prefix, grid = pos[:, :P_old], pos[:, P_old:]
    g = math.isqrt(grid.shape[1])
    D = grid.shape[-1]
    if g != new_grid:
        grid = grid.float().reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos.dtype)  # (1, g'^2, D)
    if num_prefix == 0:
        return grid
    if P_old == 0:
        prefix = grid.new_zeros(1, num_prefix, D)
    return torch.cat([prefix[:, :num_prefix], grid], dim=1)


def resample_temporal_pos_embed(pos: Tensor, new_len: int, num_prefix: int) -> Tensor:
    """(1, P + T', D) -> (1, P + new_len, D): linear interpolation over time, prefix (temporal CLS) kept."""
    prefix, seq = pos[:, :num_prefix], pos[:, num_prefix:]
    seq = F.interpolate(seq.float().transpose(1, 2), size=new_len, mode="linear", align_corners=False)  # (1, D, T'')
    return torch.cat([prefix, seq.transpose(1, 2).to(pos.dtype)], dim=1)


def inflate_patch_kernel(w2d: Tensor, t: int, method: str = "central") -> Tensor:
    """(D, C, p, p) -> (D, C, t, p, p). 'central': the kernel on the central frame t//2, zeros elsewhere, so a
    static clip embeds like its frame; 'average': w/t on every frame (same response to a static clip)."""
    if method == "central":
        w = w2d.new_zeros(*w2d.shape[:2], t, *w2d.shape[2:])  # (D, C, t, p, p)
        w[:, :, t // 2] = w2d
        return w
    if method == "average":
        return w2d.unsqueeze(2).expand(-1, -1, t, -1, -1) / t  # (D, C, t, p, p)
    raise ValueError(f"inflation method {method!r} must be 'central' or 'average'")


def convert_timm_vit(state_dict: dict[str, Tensor], cfg: ModelConfig, inflate: str = "central") -> dict[str, Tensor]:
    """Map a timm VisionTransformer state_dict (cls_token, pos_embed, patch_embed.proj, blocks.*, norm, fc_norm,
    head) to a MoNE model built from cfg. Keys with no counterpart are dropped; the head is kept only for a ViT."""
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith("blocks."):
            out[k] = v
        elif k == "patch_embed.proj.weight":
            out[k] = inflate_patch_kernel(v, cfg.tubelet_t, inflate) if cfg.video else v
        elif k == "patch_embed.proj.bias" or (k == "cls_token" and cfg.pool == "cls"):
            out[k] = v
        elif k == "pos_embed":
            out[k] = resample_pos_embed(v, cfg.grid, cfg.num_prefix)
    # timm normalises the CLS token with `norm`, or the average with `fc_norm` (then `norm` is an identity).
    norm = "fc_norm" if "fc_norm.weight" in state_dict else "norm"
    if f"{norm}.weight" in state_dict:
        dst = "spatial_norm" if cfg.video else "head.norm"
        out[f"{dst}.weight"] = state_dict[f"{norm}.weight"]
        out[f"{dst}.bias"] = state_dict[f"{norm}.bias"]
    if not cfg.video and "head.weight" in state_dict:
        out["head.fc.weight"] = state_dict["head.weight"]
        out["head.fc.bias"] = state_dict["head.bias"]
    return out


def load_timm_vit(model: nn.Module, state_dict: dict[str, Tensor], inflate: str = "central") -> list[str]:
    """Load timm ViT weights into a MoNE ViT/ViViT; returns the model keys left at their initialisation.

    A head whose class count differs from the model's is skipped (fine-tuning to new classes)."""
    mapped = convert_timm_vit(state_dict, model.cfg, inflate)
    own = model.state_dict()
    for k in [k for k, v in mapped.items() if k not in own or own[k].shape != v.shape]:
        if not k.startswith("head."):
            raise ValueError(f"{k}: checkpoint shape {tuple(mapped[k].shape)} does not fit {tuple(own[k].shape)}")
        del mapped[k]
    model.load_state_dict(mapped, strict=False)
    return sorted(set(own) - set(mapped))


def _unwrap(sd: dict) -> dict[str, Tensor]:
    """Common checkpoint wrappers: {'model': sd}, {'state_dict': sd}, {'module': sd}; DDP's 'module.' prefix."""
    for key in ("model", "state_dict", "module"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from .pt/.pth/.bin (torch.load, tensors only), .safetensors (timm's or ours), or an inference
    checkpoint directory (its model.safetensors, or model.pt for checkpoints written before safetensors)."""
    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in ("model.safetensors", "model.pt") if (p / n).is_file()), p / "model.safetensors")
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return _unwrap(torch.load(p, map_location="cpu", weights_only=True))


def load_pretrained(
    model: nn.Module, source: str | os.PathLike | dict[str, Tensor], inflate: str = "central"
) -> list[str]:
    """Start a MoNE model from a checkpoint: a MoNE ViT/ViViT state dict (ours), or a timm/plain ViT one
    (mapped, and inflated into a ViViT's spatial encoder). Position embeddings are resampled to the model's
    grid; a head with another class count is skipped. Returns the model keys left at their initialisation."""
    sd = _unwrap(source) if isinstance(source, dict) else read_state_dict(source)
    cfg = model.cfg
    ours = "router.proj.weight" in sd
    same_kind = ours and (sd["patch_embed.proj.weight"].dim() == 5) == cfg.video
    if not same_kind:  # a plain/timm ViT, or our MoNE ViT going into a ViViT: the ViT path
        if ours:  # our ViT names -> timm names, then the timm mapping
            rename = {"head.norm.weight": "norm.weight", "head.norm.bias": "norm.bias"}
            rename |= {"head.fc.weight": "head.weight", "head.fc.bias": "head.bias"}
            sd = {rename.get(k, k): v for k, v in sd.items() if not k.startswith(("router.", "alpha"))}
        return load_timm_vit(model, sd, inflate)
    own = model.state_dict()
    sd = dict(sd)
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], cfg.grid, cfg.num_prefix)
    if cfg.video and sd.get("temporal_pos_embed", own["temporal_pos_embed"]).shape != own["temporal_pos_embed"].shape:
        sd["temporal_pos_embed"] = resample_temporal_pos_embed(
            sd["temporal_pos_embed"], cfg.temporal_tokens, cfg.num_prefix
        )
    for k in [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]:
        if not k.startswith("head."):
            raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} does not fit the model")
        del sd[k]  # a head for other classes
    model.load_state_dict(sd, strict=False)
    return sorted(set(own) - set(sd))
