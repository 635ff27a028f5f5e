"""Video classification metrics: multi-view fusion, and the accuracies papers report, on torchmetrics.

View fusion follows VideoMAE's test protocol (the MoNE paper does not state its own): each view's logits go
through a softmax and the per-view probabilities are averaged; the prediction is the class of highest mean
probability. Averaging logits instead lets one over-confident view outvote the others.

`ClassificationMetrics` wraps torchmetrics so that counting is done by the maintained library: top-1, top-5,
per-class and mean-class accuracy (the mean over classes that have videos, as mmaction2 and PySlowFast report it),
and the confusion matrix. Under torch.distributed (Ray Train workers) `compute()` sums every rank's counts.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from torch import Tensor

_torchvision_ops: list = []  # keeps the operator schemas below alive


def import_torchmetrics():
    """`import torchmetrics`, also where the installed torchvision wheel was built for another torch.

    torchmetrics imports torchvision whenever it is installed; a torchvision built against another torch fails
    registering fake kernels for `torchvision::nms`/`qnms` (the CPU torch + PyPI torchvision of our CI, STACK.md).
    Declaring those two operator schemas first lets torchvision import without its C ops, which no metric here
    uses. On a machine whose torchvision loads, this is a plain import."""
    try:
        return importlib.import_module("torchmetrics")
    except RuntimeError as e:
        if "torchvision" not in str(e):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "torchmetrics")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_ops.append(lib)
    return importlib.import_module("torchmetrics")


def fuse_views(logits: Tensor) -> Tensor:
    """(B, V, C) per-view logits -> (B, C): the mean over views of each view's softmax probabilities."""
    return logits.float().softmax(dim=-1).mean(dim=1)  # (B, C)


def rank_scores(top_ids: Tensor, num_classes: int) -> Tensor:
    """(N, k) class ids, best first -> (N, C) scores whose descending order is that ranking (k, k-1, .., 1 at the
    ids, 0 elsewhere). Lets top-k metrics run on tables that kept only the top-k of each video."""
    k = top_ids.shape[1]
    scores = torch.zeros(top_ids.shape[0], num_classes)  # (N, C)
    scores.scatter_(1, top_ids.long(), torch.arange(k, 0, -1, dtype=torch.float32).expand(top_ids.shape[0], k))
    return scores


class ClassificationMetrics:
    """Top-1, top-5, per-class / mean-class accuracy and the confusion matrix of per-video class scores.

    `update(scores (B, C), target (B,))` with scores of any monotone kind (probabilities, logits, rank scores);
    `compute()` returns plain numbers and tensors, summed over ranks when torch.distributed is initialised
    (every rank must call it). One instance per budget."""

    def __init__(self, num_classes: int, top_k: int = 5, device: torch.device | str | None = None):
        import_torchmetrics()
        from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

        self.num_classes = num_classes
        k = min(top_k, num_classes)
        # The counters are made on `device` directly (NCCL reduces device tensors only), not made elsewhere and moved.
        with torch.device(device if device is not None else "cpu"):
            self.metrics = {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes, top_k=k, average="micro"),
                "per_class_top1": MulticlassAccuracy(num_classes, top_k=1, average="none"),
                "per_class_top5": MulticlassAccuracy(num_classes, top_k=k, average="none"),
                "confusion": MulticlassConfusionMatrix(num_classes),
            }
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> ClassificationMetrics:
        for m in self.metrics.values():
            m.to(device)
        return self

    def update(self, scores: Tensor, target: Tensor) -> None:
        scores = scores.float()  # (B, C)
        for m in self.metrics.values():
            m.update(scores, target)

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def compute(self) -> dict[str, Any]:
        """{"n", "top1", "top5", "mean_class"} as floats, {"per_class_top1", "per_class_top5", "support"} (C,) and
        "confusion" (C, C) (rows: true class, columns: predicted) as CPU tensors."""
        out = {k: m.compute().cpu() for k, m in self.metrics.items()}
        confusion = out["confusion"].long()  # (C, C)
        support = confusion.sum(1)  # (C,) videos per true class
        present = support > 0
        mean_class = out["per_class_top1"][present].mean().item() if present.any() else float("nan")
        return {
            "n": int(support.sum().item()),
            "top1": out["top1"].item(),
            "top5": out["top5"].item(),
            "mean_class": mean_class,
            "per_class_top1": out["per_class_top1"],
            "per_class_top5": out["per_class_top5"],
            "support": support,
            "confusion": confusion,
        }
