"""MoNE ViT (images) and MoNE ViViT factorised encoder (video), and the named-variant table.

Both share one spatial encoder: patch/tubelet embedding, position embedding, one router before the first
block (EPR per frame), the tokens permuted once into expert-grouped, sequence-first order (S, G, D), nested
blocks, and a per-frame pool (CLS, GAP or max) that never needs the original order back. ViViT then runs a
full-width temporal encoder over the T' pooled frame vectors. Every forward takes the budget, so one
trained model serves any e_c. At e_c = 1 (budget=None) the ViT is numerically timm's VisionTransformer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import Budget, expert_widths, resolve_budget
from .nested import ExpertRows, NestedBlock
from .routing import Router, Routing


@dataclass(frozen=True)
class ModelConfig:
    name: str
    video: bool  # ViViT factorised encoder (True) or ViT (False)
    dim: int
    depth: int  # (spatial) blocks; MoNE runs here
    num_heads: int
    temporal_depth: int = 0  # full-width temporal blocks (ViViT only)
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 1  # input frames T (1 for images)
    tubelet_t: int = 1  # frames per tubelet t (1 for images)
    mlp_ratio: float = 4.0
    num_experts: int = 4
    # Per-frame pooling: "cls" (class token), "gap" (mean over tokens) or "max" (max over tokens, per channel).
    # The temporal encoder then pools with its own class token ("cls") or the mean over frames ("gap", "max").
    pool: str = "cls"
    drop_path: float = 0.0
    in_chans: int = 3
    pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "gap", "max"):
            raise ValueError(f"pool={self.pool!r} must be 'cls', 'gap' or 'max'")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.num_frames % self.tubelet_t:
            raise ValueError(f"num_frames={self.num_frames} is not a multiple of tubelet_t={self.tubelet_t}")
        if not self.video and (self.num_frames != 1 or self.tubelet_t != 1):
            raise ValueError("an image ViT has num_frames = tubelet_t = 1")
        if self.video and self.temporal_depth < 1:
            raise ValueError("a ViViT factorised encoder needs temporal_depth >= 1")
        expert_widths(self.dim, self.num_experts)  # raises if D is not divisible

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N: tokens per frame (per tubelet slice in time)."""
        return self.grid * self.grid

    @property
    def temporal_tokens(self) -> int:
        """T' = T / t: frames after tubelet embedding."""
        return self.num_frames // self.tubelet_t

    @property
    def token_dim(self) -> int:
        """K = t * p * p * C: one flattened tubelet."""
        return self.tubelet_t * self.patch_size * self.patch_size * self.in_chans

    @property
    def num_prefix(self) -> int:
        return 1 if self.pool == "cls" else 0


def _vit(name: str, dim: int, depth: int, heads: int, **kw) -> ModelConfig:
    return ModelConfig(name=name, video=False, dim=dim, depth=depth, num_heads=heads, **kw)


def _vivit(name: str, dim: int, depth: int, heads: int, temporal_depth: int = 4, **kw) -> ModelConfig:
    kw = {"num_frames": 32, "tubelet_t": 2, **kw}
    return ModelConfig(
        name=name, video=True, dim=dim, depth=depth, num_heads=heads, temporal_depth=temporal_depth, **kw
    )


VARIANTS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _vit("vit_tiny", 64, 4, 2, img_size=64, patch_size=8, pool="max"),  # CPU tests; vivit_tiny's spatial encoder
        _vit("vit_ti16", 192, 12, 3),
        _vit("vit_s16", 384, 12, 6),
        _vit("vit_b16", 768, 12, 12),
        _vit("vit_l16", 1024, 24, 16),
        # ViViT-FE (Arnab et al. 2021): ViT spatial encoder + 4 temporal layers, tubelet 2x16x16, 32 frames.
        # Trains on 2 CPU cores. 8-px tubelets (an 8x8 grid per 64-px frame) at width 64 cost the FLOPs of 16-px
        # tubelets at width 128, but resolve small objects and their motion; max pooling per frame keeps one
        # token's evidence from being averaged away (benchmarks/learnability.py: learnable vs. chance). 2 heads of
        # 32: attention over 64 tokens ran ~12 % faster per train step than 4 heads of 16, accuracy alike.
        _vivit("vivit_tiny", 64, 4, 2, temporal_depth=2, img_size=64, num_frames=8, patch_size=8, pool="max"),
        _vivit("vivit_ti16", 192, 12, 3),
        _vivit("vivit_s16", 384, 12, 6),
        _vivit("vivit_b16", 768, 12, 12),
        _vivit("vivit_l16", 1024, 24, 16),
    )
}


def get_config(name_or_cfg: str | ModelConfig, **overrides) -> ModelConfig:
    if isinstance(name_or_cfg, ModelConfig):
        cfg = name_or_cfg
    elif name_or_cfg in VARIANTS:
        cfg = VARIANTS[name_or_cfg]
    else:
        raise ValueError(f"unknown model variant {name_or_cfg!r}; known: {', '.join(VARIANTS)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


class Head(nn.Module):
    """LayerNorm + Linear on a pooled vector."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))  # (B, D) -> (B, classes)


class PatchEmbed(nn.Module):
    """Conv2d (images) or Conv3d (tubelets) with kernel = stride = patch; timm name `proj`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        p, t = cfg.patch_size, cfg.tubelet_t
        if cfg.video:
            self.proj = nn.Conv3d(cfg.in_chans, cfg.dim, kernel_size=(t, p, p), stride=(t, p, p))
        else:
            self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=p, stride=p)

    def token_weight(self) -> Tensor:
        """The conv kernel as a (D, K) matrix over tubelets flattened (dt, py, px, c), c fastest."""
        w = self.proj.weight  # (D, C, [t,] p, p)
        if w.dim() == 4:
            w = w.unsqueeze(2)  # (D, C, 1, p, p)
        return w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)  # (D, t*p*p*C)


class _MoNEEncoder(nn.Module):
    """Shared spatial part: embedding, router, nested blocks, per-frame pooling."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, N = cfg.dim, cfg.num_patches
        self.widths = expert_widths(D, cfg.num_experts)
        self.patch_embed = PatchEmbed(cfg)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, dtype=torch.float32), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix + N, D))  # like timm: prefix first
        self.router = Router(D, cfg.num_experts)
        # Shape (1,), not (): DeepSpeed broadcasts parameters as bytes and cannot view a 0-dim tensor.
        self.alpha = nn.Parameter(torch.zeros(1))  # router scaling of the MLP branch, learnable from 0
        n = cfg.depth + cfg.temporal_depth
        dpr = [cfg.drop_path * i / max(n - 1, 1) for i in range(n)]  # linear stochastic-depth schedule, like timm
        self.blocks = nn.ModuleList(NestedBlock(D, cfg.num_heads, cfg.mlp_ratio, dpr[i]) for i in range(cfg.depth))
        self._dpr_temporal = dpr[cfg.depth :]

    def _init_weights(self) -> None:
        # The patch/tubelet embedding as a linear layer (MAE, VideoMAE), not the conv default: that one
        # (std 1/sqrt(3K), 0.015 for K = 1536) is small next to AdamW's first updates (~lr per weight), and a
        # from-scratch demo run sat at chance for ~80 steps while they scrambled its filters (docs/recipe.md).
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (D, K) view of the (D, C, [t,] p, p) kernel
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def router_alpha(self) -> Tensor:
        """alpha kept in [0, 1) in the forward; straight-through gradient, so an optimiser step that overshoots
        below 0 (the init) is not stuck there the way a plain clamp's zero gradient would leave it."""
        a = self.alpha
        return a + (a.clamp(0.0, 1.0 - 1e-6) - a).detach()

    def no_weight_decay(self) -> set[str]:
        """Parameters a recipe should not decay (timm convention): embeddings, tokens and alpha."""
        names = {"pos_embed", "cls_token", "alpha", "temporal_pos_embed", "temporal_cls_token"}
        return {n for n, _ in self.named_parameters() if n in names}

    # --- embedding -------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, L, K) flattened tubelets (dt, py, px, c) -> (B, L, D): the patch conv as a linear.

        uint8 tokens are normalised here, (x/255 - mean_c) / std_c; float tokens are taken as normalised.
        The result has the weight's dtype whatever the buffers' dtype: DeepSpeed's bf16 mode casts parameters
        to bf16 but keeps buffers (pixel_mean/std) in fp32, and runs without autocast.
        """
        w = self.patch_embed.token_weight()  # (D, K)
        x = self.normalize_tokens(tokens).to(w.dtype)  # (B, L, K)
        # FLOPs: 2 * L * K * D
        return F.linear(x, w, self.patch_embed.proj.bias)  # (B, L, D)

    def normalize_tokens(self, tokens: Tensor) -> Tensor:
        """uint8 tokens (B, L, K) -> normalised fp32 (x/255 - mean_c) / std_c; float tokens are returned as they are
        (taken as normalised already, e.g. mixed by models.mix). embed_tokens casts to the weight's dtype."""
        cfg = self.cfg
        if tokens.shape[-1] != cfg.token_dim:
            raise ValueError(f"tokens have K={tokens.shape[-1]}, {cfg.name} expects K={cfg.token_dim}")
        if tokens.dtype != torch.uint8:
            return tokens
        reps = cfg.token_dim // cfg.in_chans
        std, mean = self.pixel_std.float(), self.pixel_mean.float()  # fp32 even if a caller cast the buffers
        scale = (1.0 / (255.0 * std)).repeat(reps)  # (K,) channel c = k % C
        shift = (mean / std).repeat(reps)  # (K,)
        return torch.addcmul(-shift, tokens.float(), scale)  # (B, L, K) fp32

    def embed_pixels(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, [T,] H, W) normalised -> (B, L, D), tubelets in (t', gy, gx) order."""
        x = self.patch_embed.proj(pixels.to(self.patch_embed.proj.weight.dtype))  # (B, D, [T',] gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)

    # --- spatial encoder -------------------------------------------------------------------------------
    def encode_frames(self, x: Tensor, budget: Budget) -> tuple[Tensor, Routing]:
        """x (B, L, D) embedded tubelets, L = T' * N -> per-frame pooled features (B*T', D) and the routing."""
        cfg = self.cfg
        B, L, D = x.shape
        N, P = cfg.num_patches, cfg.num_prefix
        if L % N:
            raise ValueError(f"{L} tokens are not whole frames of N={N} patches (img_size={cfg.img_size})")
        G = B * (L // N)  # groups: one per frame
        S = P + N  # rows per group
        x = x.reshape(G, N, D) + self.pos_embed[:, P:]  # (G, N, D)

        capacities = resolve_budget(budget, cfg.num_experts)
        routing = self.router(x, capacities, B)  # assignment per frame, shared by every block

        order = routing.order  # (G, N)
        if P:
            cls = (self.cls_token + self.pos_embed[:, :P]).expand(G, P, D)  # (G, P, D)
            x = torch.cat([cls, x], dim=1)  # (G, S, D) prefix first, like timm
            prefix = torch.arange(P, device=x.device).expand(G, P)  # (G, P)
            order = torch.cat([order + P, prefix], dim=1)  # (G, S): prefix rows go last, in the full group
        # One gather into expert-grouped, sequence-first order; blocks never leave it.
        index = order.t().unsqueeze(-1).expand(S, G, D)  # (S, G, D)
        x = torch.gather(x.transpose(0, 1), 0, index)  # (S, G, D)

        rows = self._expert_rows(routing, G, S, B, x)
        for blk in self.blocks:
            x = blk(x, rows, inplace=True)  # (S, G, D); x is ours (made by the gather)

        # (G, D): the CLS row, or the mean / max over the frame's tokens (order does not matter)
        pooled = x[N] if P else x.amax(0) if cfg.pool == "max" else x.mean(0)
        return pooled, routing

    def _expert_rows(self, routing: Routing, G: int, S: int, B: int, like: Tensor) -> ExpertRows:
        N = S - self.cfg.num_prefix
        bounds = []
        offsets = routing.offsets  # (E+1,) row offsets per group
        for j, d in enumerate(self.widths):
            if offsets[j + 1] > offsets[j]:
                bounds.append((offsets[j] * G, offsets[j + 1] * G, d))
        if S > N:  # prefix rows (CLS) are always on the full expert, right after its tokens
            if bounds and bounds[-1][2] == self.widths[-1] and bounds[-1][1] == N * G:
                bounds[-1] = (bounds[-1][0], S * G, self.widths[-1])
            else:
                bounds.append((N * G, S * G, self.widths[-1]))
        # MLP scale alpha*r + 1, prefix rows are not routed and keep scale 1.
        gate = self.router_alpha() * routing.gate + 1.0  # (N, G)
        if S > N:
            gate = torch.cat([gate, gate.new_ones(S - N, G)], dim=0)  # (S, G)
        return ExpertRows(bounds=tuple(bounds), gate=gate.to(like.dtype), batch=B)

    def forward_tokens(self, tokens: Tensor, budget: Budget = None, return_routing: bool = False):
        """tokens (B, L, K) uint8 or float -> logits (B, classes) [, routing]."""
        logits, routing = self.forward_features(self.embed_tokens(tokens), budget)
        return (logits, routing) if return_routing else logits

    def forward(self, pixels: Tensor, budget: Budget = None, return_routing: bool = False):
        """pixels (B, C, H, W) [ViT] or (B, C, T, H, W) [ViViT], normalised -> logits (B, classes) [, routing]."""
        logits, routing = self.forward_features(self.embed_pixels(pixels), budget)
        return (logits, routing) if return_routing else logits


class MoNEViT(_MoNEEncoder):
    """Image ViT with nested experts in every block."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__(cfg)
        self.head = Head(cfg.dim, num_classes)
        self._init_weights()

    def forward_features(self, x: Tensor, budget: Budget) -> tuple[Tensor, Routing]:
        pooled, routing = self.encode_frames(x, budget)  # (B, D)
        return self.head(pooled), routing  # (B, classes)


class MoNEViViT(_MoNEEncoder):
    """ViViT factorised encoder: MoNE spatial encoder per frame, full-width temporal encoder, head."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__(cfg)
        D, Tp = cfg.dim, cfg.temporal_tokens
        self.spatial_norm = nn.LayerNorm(D, eps=1e-6)  # the spatial encoder's final norm (ViT `norm`)
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.temporal_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix + Tp, D))
        self.temporal_blocks = nn.ModuleList(
            NestedBlock(D, cfg.num_heads, cfg.mlp_ratio, self._dpr_temporal[i]) for i in range(cfg.temporal_depth)
        )
        self.head = Head(D, num_classes)
        self._init_weights()
        nn.init.trunc_normal_(self.temporal_pos_embed, std=0.02)
        if self.temporal_cls_token is not None:
            nn.init.normal_(self.temporal_cls_token, std=1e-6)

    def forward_features(self, x: Tensor, budget: Budget) -> tuple[Tensor, Routing]:
        cfg = self.cfg
        B, _, D = x.shape
        pooled, routing = self.encode_frames(x, budget)  # (B*T', D)
        f = self.spatial_norm(pooled).view(B, -1, D)  # (B, T', D)
        Tp, P = f.shape[1], cfg.num_prefix
        if Tp != cfg.temporal_tokens:
            raise ValueError(f"{Tp} frames after tubelets; {cfg.name} was built for T'={cfg.temporal_tokens}")
        if P:
            f = torch.cat([self.temporal_cls_token.expand(B, P, D), f], dim=1)  # (B, 1+T', D)
        f = (f + self.temporal_pos_embed).transpose(0, 1).contiguous()  # (S_t, B, D) sequence-first
        rows = ExpertRows.dense(f.shape[0] * B, D, batch=B)
        for blk in self.temporal_blocks:
            f = blk(f, rows, inplace=True)  # (S_t, B, D)
        pooled = f[0] if P else f.mean(0)  # (B, D)
        return self.head(pooled), routing  # (B, classes)


def create_model(name: str | ModelConfig, num_classes: int, **overrides) -> MoNEViT | MoNEViViT:
    """Build a variant by name, e.g. create_model('vivit_b16', 400, num_frames=16, img_size=256)."""
    cfg = get_config(name, **overrides)
    return MoNEViViT(cfg, num_classes) if cfg.video else MoNEViT(cfg, num_classes)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VARIANTS", "ModelConfig", "MoNEViT", "MoNEViViT", "create_model", "get_config", "num_params"]
