"""Nested attention, MLP and transformer block on expert-grouped tokens.

Layout: sequence-first `(S, G, D)` with G = B*T' groups (frames or images) and the S rows of every group
permuted once so that expert j owns rows [s_j, s_{j+1}) of each group (see routing.py). Then the tokens of
expert j are the contiguous block `x[s_j:s_{j+1}]`, i.e. rows [s_j*G, s_{j+1}*G) of the 2-D view (S*G, D),
and each nested projection is one 2-D matmul per expert on that block with a weight slice:

- "in" projections (Q/K/V, MLP fc1) read the first d_j input channels:  y = x[:, :d_j] @ W[:, :d_j].T + b
- "out" projections (attention proj, MLP fc2) write only the first d_j output channels, added to the residual
  in place of a zero-padded D-wide result:  out[:, :d_j] = x[:, :d_j] + s * (h @ W[:d_j].T + b[:d_j]),
  out[:, d_j:] = x[:, d_j:]

Both are custom autograd Functions so that forward can write into preallocated buffers (`out=`) and backward
accumulates the gradient of each weight slice straight into one weight-gradient buffer instead of letting
autograd build a full-size zero tensor per slice. Attention (scores and mixing) runs at full width D over
all S tokens of a group with F.scaled_dot_product_attention; token order does not matter to it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Bounds = tuple[tuple[int, int, int], ...]  # (row_start, row_end, width) per non-empty expert, in (S*G) rows


@dataclass(frozen=True)
class ExpertRows:
    """What every block needs to know about the grouping; built once per forward by the model."""

    bounds: Bounds
    gate: Tensor | None = None  # (S, G) MLP branch scale alpha*r + 1 per row; None = 1
    batch: int = 1  # B, for per-sample drop path (the G groups are B samples x T' frames)
    # Inference scratch buffers (qkv, hidden, attention out) shared by the blocks of one forward: fresh
    # buffers of tens of MB cost page faults on every allocation, which a small expert's matmul cannot hide.
    workspace: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or like.dtype
        buf = self.workspace.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
            buf = self.workspace[name] = like.new_empty(shape, dtype=dtype)
        return buf

    @staticmethod
    def dense(num_rows: int, dim: int, batch: int = 1) -> ExpertRows:
        return ExpertRows(bounds=((0, num_rows, dim),), gate=None, batch=batch)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's (bf16 on CUDA) when it is on, else the tensor's own."""
    dev = t.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _no_autocast(t: Tensor):
    """Inside the Functions we cast by hand; autocast must not re-cast the `out=` matmuls."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else nullcontext()


def _nested_in_into(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, bounds: Bounds) -> Tensor:
    for a, b, d in bounds:
        # FLOPs: 2 * (b-a) * d * Dout
        torch.addmm(bias, x[a:b, :d], weight[:, :d].t(), out=y[a:b])  # (k, d) @ (d, Dout) -> (k, Dout)
    return y


class _NestedIn(torch.autograd.Function):
    """y[r] = x[r, :d] @ W[:, :d].T + b for the rows r of each expert (width d)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, bounds: Bounds) -> Tensor:
        dt = _compute_dtype(x)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        with _no_autocast(x):
            x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
            y = _nested_in_into(x.new_empty(x.shape[0], weight.shape[0]), x, weight, bias, bounds)  # (M, Dout)
        ctx.save_for_backward(x, weight)
        ctx.bounds = bounds
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, weight = ctx.saved_tensors  # (M, Din), (Dout, Din), in compute dtype
        bounds: Bounds = ctx.bounds
        gy = gy.to(x.dtype)  # (M, Dout)
        gx = gw = gb = None
        din = x.shape[1]
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x)  # (M, Din)
            for a, b, d in bounds:
                torch.mm(gy[a:b], weight[:, :d], out=gx[a:b, :d])  # (k, Dout) @ (Dout, d) -> (k, d)
                if d < din:
                    gx[a:b, d:].zero_()  # channels this expert never read
            gx = gx.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gw = _accumulate_slices(
                weight.shape, x.dtype, x.device, ((gy[a:b].t(), x[a:b, :d], d) for a, b, d in bounds), cols=True
            )
            gw = gw.to(ctx.dtypes[1])
        if ctx.needs_input_grad[2]:
            gb = gy.sum(0, dtype=torch.promote_types(gy.dtype, torch.float32)).to(ctx.dtypes[2])  # (Dout,)
        return gx, gw, gb, None


class _NestedOutResidual(torch.autograd.Function):
    """out[r, :d] = x[r, :d] + s[r] * (h[r] @ W[:d].T + b[:d]);  out[r, d:] = x[r, d:]."""

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, bounds: Bounds):
        dt = _compute_dtype(h)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype, None if scale is None else scale.dtype)
        # (M, D) residual stream keeps its own dtype (fp32 under autocast). One contiguous copy carries every
        # expert's untouched channels [d:], instead of one strided copy per expert.
        out = x.clone()
        ys = []
        with _no_autocast(x):
            h, weight, bias = h.to(dt), weight.to(dt), bias.to(dt)
            for a, b, d in bounds:
                # FLOPs: 2 * (b-a) * Din * d
                y = torch.addmm(bias[:d], h[a:b], weight[:d].t())  # (k, Din) @ (Din, d) -> (k, d)
                if scale is None:
                    out[a:b, :d].add_(y)  # (k, d)
                else:
                    out[a:b, :d].addcmul_(y, scale[a:b, None].to(y.dtype))  # (k, d)
                    ys.append(y)
        ctx.save_for_backward(h, weight, scale, *ys)
        ctx.bounds = bounds
        return out

    @staticmethod
    def backward(ctx, gout: Tensor):
        h, weight, scale, *ys = ctx.saved_tensors
        bounds: Bounds = ctx.bounds
        dt = h.dtype
        need_h, need_w, need_b, need_s = (ctx.needs_input_grad[i] for i in (1, 2, 3, 4))
        gbranch = []  # per expert: d loss / d y, (k, d)
        for a, b, d in bounds:
            g = gout[a:b, :d].to(dt)  # (k, d)
            gbranch.append(g if scale is None else g * scale[a:b, None].to(dt))
        acc = torch.promote_types(dt, torch.float32)  # sums in at least fp32 (bf16 under autocast)
        gh = gw = gb = gs = None
        if need_h:
            gh = torch.empty_like(h)  # (M, Din)
            for (a, b, d), g in zip(bounds, gbranch, strict=True):
                torch.mm(g, weight[:d], out=gh[a:b])  # (k, d) @ (d, Din) -> (k, Din)
            gh = gh.to(ctx.dtypes[0])
        if need_w:
            parts = ((g.t(), h[a:b], d) for (a, b, d), g in zip(bounds, gbranch, strict=True))
            gw = _accumulate_slices(weight.shape, dt, h.device, parts, cols=False).to(ctx.dtypes[1])
        if need_b:
            gb = torch.zeros(weight.shape[0], dtype=acc, device=h.device)  # (D,)
            for (_, _, d), g in zip(bounds, gbranch, strict=True):
                gb[:d] += g.sum(0, dtype=acc)
            gb = gb.to(ctx.dtypes[2])
        if need_s:
            gs = torch.zeros(gout.shape[0], dtype=acc, device=gout.device)  # (M,)
            for (a, b, d), y in zip(bounds, ys, strict=True):
                gs[a:b] = (gout[a:b, :d].to(y.dtype) * y).sum(-1, dtype=acc)
            gs = gs.to(ctx.dtypes[3])
        return gout, gh, gw, gb, gs, None


def _accumulate_slices(shape, dtype, device, parts, cols: bool) -> Tensor:
    """Sum of A_j @ B_j into the [:, :d_j] (cols) or [:d_j, :] (rows) slice of one (Dout, Din) buffer.

    The widest slice is written first (mm into the buffer, zeros only where it does not reach), the rest are
    added in place: no full-size zero tensor per expert.
    """
    parts = sorted(parts, key=lambda p: -p[2])
    gw = torch.empty(shape, dtype=dtype, device=device)
    full = shape[1] if cols else shape[0]
    for i, (lhs, rhs, d) in enumerate(parts):
        dst = gw[:, :d] if cols else gw[:d]
        if i == 0:
            torch.mm(lhs, rhs, out=dst)
            if d < full:
                (gw[:, d:] if cols else gw[d:]).zero_()
        else:
            dst.addmm_(lhs, rhs)
    if not parts:
        gw.zero_()
    return gw


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def nested_in(x: Tensor, weight: Tensor, bias: Tensor, bounds: Bounds, out: Tensor | None = None) -> Tensor:
    """(M, Din) -> (M, Dout); expert rows read only their first d channels. `out` (inference only) is filled."""
    if out is None:
        return _NestedIn.apply(x, weight, bias, bounds)
    if _needs_grad(x, weight, bias):
        raise RuntimeError("nested_in(out=...) is for inference")
    dt = _compute_dtype(x)
    with _no_autocast(x):
        return _nested_in_into(out, x.to(dt), weight.to(dt), bias.to(dt), bounds)


def nested_out_residual(
    x: Tensor, h: Tensor, weight: Tensor, bias: Tensor, bounds: Bounds, scale: Tensor | None = None
) -> Tensor:
    """x (M, D) + [scale *] nested projection of h (M, Din) written into each row's first d channels."""
    return _NestedOutResidual.apply(x, h, weight, bias, scale, bounds)


def nested_out_residual_(
    x: Tensor, h: Tensor, weight: Tensor, bias: Tensor, bounds: Bounds, scale: Tensor | None = None
) -> Tensor:
    """In-place nested_out_residual for inference: adds into x's first d channels and never touches the rest,
    so the residual stream is not copied (the out-of-place version copies all D channels of every row)."""
    if _needs_grad(x, h, weight, bias, scale):
        raise RuntimeError("nested_out_residual_ is for inference; use nested_out_residual under autograd")
    dt = _compute_dtype(h)
    with _no_autocast(x):
        h, weight, bias = h.to(dt), weight.to(dt), bias.to(dt)
        for a, b, d in bounds:
            dst = x[a:b, :d]  # (k, d) strided view into the residual
            if scale is None and dt == x.dtype:
                dst.add_(bias[:d]).addmm_(h[a:b], weight[:d].t())  # x += b; x += h @ W^T (GEMM with beta = 1)
            else:
                y = torch.addmm(bias[:d], h[a:b], weight[:d].t())  # (k, d)
                if scale is None:
                    dst.add_(y)
                else:
                    dst.addcmul_(y, scale[a:b, None].to(y.dtype))
    return x


class NestedAttention(nn.Module):
    """timm-compatible names (qkv, proj); Q/K/V read d_j channels, proj writes d_j channels."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def mix(self, h: Tensor, S: int, G: int, bounds: Bounds, rows: ExpertRows | None = None) -> Tensor:
        """h (S*G, D) normed tokens -> attention output before proj, (S*G, D). With rows (inference), the qkv
        and output buffers come from its workspace."""
        H, hd = self.num_heads, self.head_dim
        D = H * hd
        qkv_buf = None if rows is None else rows.buffer("qkv", (S * G, 3 * D), h, _compute_dtype(h))
        qkv = nested_in(h, self.qkv.weight, self.qkv.bias, bounds, out=qkv_buf)  # (S*G, 3D)
        q, k, v = qkv.view(S, G, 3, H, hd).permute(2, 1, 3, 0, 4).unbind(0)  # 3 x (G, H, S, hd)
        # FLOPs: 2*S*S*D for q@k^T plus 2*S*S*D for attn@v, per group, at full width for every expert
        o = F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3)  # (G, H, S, hd) -> (S, G, H, hd)
        if rows is None:
            return o.reshape(S * G, D)  # (S*G, D)
        out = rows.buffer("attn", (S * G, D), o)
        out.view(S, G, H, hd).copy_(o)
        return out  # (S*G, D)


class NestedMlp(nn.Module):
    """timm-compatible names (fc1, fc2); hidden width stays mlp_ratio*D for every expert."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class NestedBlock(nn.Module):
    """Pre-norm transformer block; with one full-width group it is the plain ViT block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = NestedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = NestedMlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _keep(self, rows: ExpertRows, G: int, like: Tensor) -> Tensor | None:
        """Per-sample stochastic depth as a (1, G) row scale (0 or 1/keep), or None when off."""
        if not self.training or self.drop_path == 0.0:
            return None
        keep = 1.0 - self.drop_path
        mask = torch.empty(rows.batch, 1, device=like.device).bernoulli_(keep) / keep  # (B, 1)
        return mask.expand(rows.batch, G // rows.batch).reshape(1, G)  # (1, G): frames of one clip share it

    def forward(self, x: Tensor, rows: ExpertRows, inplace: bool = False) -> Tensor:
        """x (S, G, D) expert-grouped, sequence-first -> (S, G, D).

        Without autograd the residual updates go into x's own memory: with inplace=True the caller hands x
        over (the model does, for the buffer it owns), otherwise x is copied once first."""
        S, G, D = x.shape
        bounds = rows.bounds
        keep = self._keep(rows, G, x)
        x2 = x.reshape(S * G, D)  # (S*G, D)
        if keep is None and not _needs_grad(x, *self.parameters(), rows.gate):
            return self._forward_inference(x2 if inplace else x2.clone(), S, G, rows).view(S, G, D)

        h = F.layer_norm(x2, (D,), self.norm1.weight, self.norm1.bias, self.norm1.eps)  # (S*G, D)
        o = self.attn.mix(h, S, G, bounds)  # (S*G, D)
        s_attn = None if keep is None else keep.expand(S, G).reshape(S * G)  # (S*G,)
        x2 = nested_out_residual(x2, o, self.attn.proj.weight, self.attn.proj.bias, bounds, s_attn)  # (S*G, D)

        h = F.layer_norm(x2, (D,), self.norm2.weight, self.norm2.bias, self.norm2.eps)  # (S*G, D)
        a = F.gelu(nested_in(h, self.mlp.fc1.weight, self.mlp.fc1.bias, bounds))  # (S*G, 4D)
        s_mlp = rows.gate if keep is None else (keep if rows.gate is None else rows.gate * keep)  # (S, G)
        s_mlp = None if s_mlp is None else s_mlp.expand(S, G).reshape(S * G)  # (S*G,)
        x2 = nested_out_residual(x2, a, self.mlp.fc2.weight, self.mlp.fc2.bias, bounds, s_mlp)  # (S*G, D)
        return x2.view(S, G, D)

    def _forward_inference(self, x2: Tensor, S: int, G: int, rows: ExpertRows) -> Tensor:
        """The same block, residual updated in place in x2 (S*G, D); no drop path (eval)."""
        D, bounds = x2.shape[1], rows.bounds
        h = F.layer_norm(x2, (D,), self.norm1.weight, self.norm1.bias, self.norm1.eps)  # (S*G, D)
        o = self.attn.mix(h, S, G, bounds, rows)  # (S*G, D)
        nested_out_residual_(x2, o, self.attn.proj.weight, self.attn.proj.bias, bounds)  # (S*G, D) in place
        h = F.layer_norm(x2, (D,), self.norm2.weight, self.norm2.bias, self.norm2.eps)  # (S*G, D)
        hidden = rows.buffer("hidden", (S * G, self.mlp.fc1.out_features), h, _compute_dtype(h))
        a = torch.ops.aten.gelu_(nested_in(h, self.mlp.fc1.weight, self.mlp.fc1.bias, bounds, out=hidden))  # (S*G, 4D)
        gate = None if rows.gate is None else rows.gate.reshape(S * G)  # (S*G,)
        nested_out_residual_(x2, a, self.mlp.fc2.weight, self.mlp.fc2.bias, bounds, gate)  # (S*G, D) in place
        return x2
