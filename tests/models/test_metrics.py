"""models.metrics: torchmetrics' counts equal a hand count, the confusion matrix adds up, views are fused by
softmax averaging, and two gloo ranks together report what one process reports over the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch

from models.metrics import ClassificationMetrics, fuse_views, rank_scores

# A fixed batch: 10 videos, 6 classes (class 5 never appears as a label, class 4 only once).
SCORES = torch.tensor([
    [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # label 0: top-1 hit
    [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # label 0: top-1 miss (-> 1), 0 is 2nd: top-5 hit
    [0.05, 0.10, 0.10, 0.15, 0.20, 0.40],  # label 0: 0 is last: top-5 miss (-> 5)
    [0.10, 0.70, 0.10, 0.05, 0.03, 0.02],  # label 1: hit
    [0.10, 0.20, 0.60, 0.05, 0.03, 0.02],  # label 1: miss (-> 2), top-5 hit
    [0.05, 0.05, 0.80, 0.05, 0.03, 0.02],  # label 2: hit
    [0.05, 0.05, 0.70, 0.10, 0.05, 0.05],  # label 3: miss (-> 2), top-5 hit
    [0.05, 0.05, 0.10, 0.70, 0.05, 0.05],  # label 3: hit
    [0.05, 0.05, 0.10, 0.60, 0.15, 0.05],  # label 3: hit
    [0.30, 0.04, 0.10, 0.10, 0.05, 0.41],  # label 4: miss (-> 5), 4 is 5th of 6: top-5 hit
])
LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 4])


def hand_count(scores: torch.Tensor, labels: torch.Tensor, k: int = 5):
    order = [sorted(range(scores.shape[1]), key=lambda c: -float(row[c])) for row in scores]
    top1 = sum(o[0] == int(y) for o, y in zip(order, labels, strict=True))
    top5 = sum(int(y) in o[:k] for o, y in zip(order, labels, strict=True))
    per_class = {}
    for o, y in zip(order, labels, strict=True):
        hit, n = per_class.get(int(y), (0, 0))
        per_class[int(y)] = (hit + (o[0] == int(y)), n + 1)
    mean_class = sum(h / n for h, n in per_class.values()) / len(per_class)
    confusion = torch.zeros(scores.shape[1], scores.shape[1], dtype=torch.long)
    for o, y in zip(order, labels, strict=True):
        confusion[int(y), o[0]] += 1
    return top1 / len(labels), top5 / len(labels), mean_class, confusion


def test_accuracy_equals_a_hand_count():
    m = ClassificationMetrics(num_classes=6)
    m.update(SCORES[:4], LABELS[:4])  # two batches: counts accumulate
    m.update(SCORES[4:], LABELS[4:])
    r = m.compute()
    top1, top5, mean_class, confusion = hand_count(SCORES, LABELS)
    assert (top1, top5) == (0.5, 0.9)  # the batch above, counted by eye
    assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5)
    # mean over the 5 classes that have videos: (1/3 + 1/2 + 1 + 2/3 + 0) / 5; class 5 has none and is left out
    assert r["mean_class"] == pytest.approx(mean_class) == pytest.approx((1 / 3 + 1 / 2 + 1 + 2 / 3 + 0) / 5)
    assert torch.equal(r["confusion"], confusion)
    assert r["support"].tolist() == [3, 2, 1, 3, 1, 0]


def test_confusion_matrix_sums_to_the_number_of_videos():
    g = torch.Generator().manual_seed(0)
    m = ClassificationMetrics(num_classes=400)
    n = 0
    for b in (7, 64, 1, 33):
        m.update(torch.randn(b, 400, generator=g), torch.randint(0, 400, (b,), generator=g))
        n += b
    r = m.compute()
    assert r["confusion"].shape == (400, 400) and r["confusion"].sum().item() == n == r["n"]
    assert r["confusion"].diagonal().sum().item() == round(r["top1"] * n)


def test_fewer_classes_than_five_and_reset():
    m = ClassificationMetrics(num_classes=3)
    m.update(torch.tensor([[0.1, 0.2, 0.7]]), torch.tensor([0]))
    assert m.compute()["top5"] == 1.0  # top-k is capped at the class count
    m.reset()
    m.update(torch.tensor([[0.9, 0.05, 0.05]]), torch.tensor([0]))
    assert m.compute()["n"] == 1


def test_views_are_fused_by_averaging_softmax_probabilities():
    # One very confident view for class 0 and two mild ones for class 1: logit averaging picks 0, softmax averaging
    # (VideoMAE's protocol) picks 1.
    logits = torch.tensor([[[9.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])  # (B=1, V=3, C=2)
    fused = fuse_views(logits)
    expected = torch.softmax(logits, -1).mean(1)
    assert torch.allclose(fused, expected) and fused.sum().item() == pytest.approx(1.0)
    assert fused.argmax(-1).item() == 1 and logits.mean(1).argmax(-1).item() == 0


def test_rank_scores_keep_the_ranking():
    ids = torch.tensor([[4, 0, 2], [1, 3, 0]])
    s = rank_scores(ids, 5)
    assert s.argsort(-1, descending=True)[:, :3].tolist() == ids.tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if dist.is_initialized():  # forked from a test session that holds a one-rank group (tests/jobs/conftest.py)
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    m = ClassificationMetrics(num_classes=6)
    half = slice(0, 6) if rank == 0 else slice(6, 10)  # unequal shards
    m.update(SCORES[half], LABELS[half])
    r = m.compute()  # collective: sums both ranks' counts
    if rank == 0:
        torch.save({k: r[k] for k in ("n", "top1", "top5", "mean_class", "confusion")}, out)
    dist.destroy_process_group()


def test_two_ranks_sum_their_counts(tmp_path):
    import multiprocessing as mp

    out = str(tmp_path / "r.pt")
    ClassificationMetrics(num_classes=6)  # torchmetrics imported once here; the forked ranks inherit it
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    r = torch.load(out)
    top1, top5, mean_class, confusion = hand_count(SCORES, LABELS)
    assert r["n"] == 10 and torch.equal(r["confusion"], confusion)
    assert (r["top1"], r["top5"]) == pytest.approx((top1, top5)) and r["mean_class"] == pytest.approx(mean_class)
