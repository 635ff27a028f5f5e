"""The router and Expert Preferred Routing (EPR).

One router sits before the first block and its assignment is reused by every block. EPR runs per group
of N tokens (a frame of a video, or a whole image): the largest expert picks its top floor(c_j N) tokens
by router score first, then the next largest among the rest, and whatever is left stays on the smallest.

Since every group has the same N, every group gives expert j the same count k_j, so after one stable sort
by expert the tokens of expert j are rows [offset_j, offset_j + k_j) of every group. The blocks work on
that permuted order throughout; the assignment is carried as a `Routing` (order, counts, inverse), never as
masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import expert_counts


@dataclass(frozen=True)
class Routing:
    """One assignment for G = B*T' groups of N tokens each (T' = 1 for images).

    order[g, p] is the token at permuted position p of group g; positions are grouped by expert, smallest
    expert first, so expert j owns positions [offsets[j], offsets[j+1]). inverse is its inverse permutation.
    """

    expert: Tensor  # (B, T', N) int64, expert index per token in original order (0 = smallest)
    order: Tensor  # (G, N) int64
    inverse: Tensor  # (G, N) int64
    counts: tuple[int, ...]  # (E,) tokens per expert in every group
    capacities: tuple[float, ...]  # (E,) the capacities asked for
    probs: Tensor  # (G, N, E) router softmax, original token order
    gate: Tensor  # (N, G) router prob of each token's own expert, permuted order (sequence-first)

    @property
    def offsets(self) -> tuple[int, ...]:
        out = [0]
        for k in self.counts:
            out.append(out[-1] + k)
        return tuple(out)


def expert_preferred_routing(probs: Tensor, counts: Sequence[int]) -> Tensor:
    """EPR on router probabilities probs (G, N, E) with per-group counts k_j (sum N).

    Returns expert (G, N) int64. Expert E-1 picks first: its top-k_{E-1} tokens by probs[..., E-1]; then each
    smaller expert j >= 1 takes its top-k_j by probs[..., j] among tokens not yet picked; the rest stay on 0.
    """
    G, N, E = probs.shape
    if len(counts) != E or sum(counts) != N:
        raise ValueError(f"counts {tuple(counts)} must have {E} entries summing to N={N}")
    scores = probs.detach().float().clone()  # (G, N, E); picked tokens get -inf so later experts skip them
    expert = torch.zeros(G, N, dtype=torch.long, device=probs.device)  # (G, N) everyone starts on expert 0
    for j in range(E - 1, 0, -1):
        k = int(counts[j])
        if k == 0:
            continue
        picked = scores[..., j].topk(k, dim=1, sorted=False).indices  # (G, k)
        expert.scatter_(1, picked, j)
        scores.scatter_(1, picked.unsqueeze(-1).expand(G, k, E), float("-inf"))
    return expert


class Router(nn.Module):
    """r = softmax(W_r x + b_r) over E experts, per token."""

    def __init__(self, dim: int, num_experts: int = 4) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.proj = nn.Linear(dim, num_experts)

    def forward(self, x: Tensor, capacities: Sequence[float], batch: int) -> Routing:
        """x (G, N, D) tokens (position embeddings added) in G = batch*T' groups -> Routing."""
        G, N, _ = x.shape
        # FLOPs: 2*N*D*E per group for the projection (softmax is not counted: no matmul).
        probs = F.softmax(self.proj(x).float(), dim=-1)  # (G, N, E)
        counts = expert_counts(capacities, N)
        if counts[-1] == N:  # dense: everyone on the full expert, identity order, no sort
            expert = torch.full((G, N), self.num_experts - 1, dtype=torch.long, device=x.device)  # (G, N)
            order = torch.arange(N, device=x.device).expand(G, N)  # (G, N)
            inverse = order
        else:
            expert = expert_preferred_routing(probs, counts)  # (G, N)
            order = torch.argsort(expert, dim=1, stable=True)  # (G, N) grouped by expert, smallest first
            inverse = torch.argsort(order, dim=1)  # (G, N)
        gate = probs.gather(2, expert.unsqueeze(-1)).squeeze(-1)  # (G, N) prob of own expert
        gate = gate.gather(1, order).t()  # (N, G) permuted, sequence-first like the blocks
        return Routing(
            expert=expert.view(batch, G // batch, N),
            order=order,
            inverse=inverse,
            counts=counts,
            capacities=tuple(capacities),
            probs=probs,
            gate=gate.to(x.dtype),
        )
