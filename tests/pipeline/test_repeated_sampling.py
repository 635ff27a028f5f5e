"""Repeated sampling (data.clips_per_video, VideoMAE's num_sample) and the per-epoch order, without Ray."""

import numpy as np
import pyarrow as pa

from pipeline import dataset as D
from pipeline import decode
from pipeline.manifest import build_manifest
from pipeline.sampling import ClipSpec

# Frames larger than the crop: the random crop really moves, so two clips of one decode differ.
SPEC = ClipSpec(num_frames=4, stride=2, short_side=40, crop_size=32, patch=16, tubelet_t=2, flip=True,
                train_crop="random")


def _good_videos(root, n=3):
    m = build_manifest(root).split("validate")
    return m.slice(0, n)


def _count_decodes(monkeypatch):
    calls = []
    real = decode.read_frames

    def counting(path, *a, **kw):
        calls.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(D, "read_frames", counting)
    return calls


def test_two_clips_per_decode_differ_and_are_deterministic(k400_tree, monkeypatch):
    calls = _count_decodes(monkeypatch)
    path = _good_videos(k400_tree).column("path")[0].as_py()
    a = D.load_clips(path, SPEC, rng=D.clip_rng(7, 3, path), clips_per_video=2)  # (2, V, L, K)
    assert calls == [path]  # one decode fed both clips
    assert a.shape == (2, *SPEC.tokens_shape) and a.dtype == np.uint8
    assert (a[0] != a[1]).any()  # each clip drew its own crop / flip
    b = D.load_clips(path, SPEC, rng=D.clip_rng(7, 3, path), clips_per_video=2)
    assert (a == b).all()  # the same (seed, epoch, path, k): the same two clips
    one = D.load_clip(path, SPEC, rng=D.clip_rng(7, 3, path))
    assert (one == a[0]).all()  # k = 1 draws what clip 0 of k = 2 draws: k changes nothing for the first clip
    c = D.load_clips(path, SPEC, rng=D.clip_rng(7, 4, path), clips_per_video=2)
    assert (c != a).any()  # a new epoch, new clips


def test_decode_udf_gives_k_rows_per_video_from_one_decode(k400_tree, monkeypatch):
    table = _good_videos(k400_tree).select(["path", "label"])
    paths, labels = table.column("path").to_pylist(), table.column("label").to_pylist()
    loader = D.ClipLoader(SPEC, table, seed=1, epoch=2, clips_per_video=2, profile=True)
    calls = _count_decodes(monkeypatch)
    out = loader.decode_batch(paths, labels, epoch=2)
    assert sorted(calls) == sorted(paths)  # each video decoded once
    assert out["tokens"].shape == (2 * len(paths), *SPEC.tokens_shape)
    assert list(out["path"]) == [p for p in paths for _ in range(2)]
    assert list(out["label"]) == [lab for lab in labels for _ in range(2)]
    assert all((out["tokens"][2 * i] != out["tokens"][2 * i + 1]).any() for i in range(len(paths)))
    assert out["cpu_s"].shape == (2 * len(paths), 4) and (out["cpu_s"][:, 0] > 0).all()  # decode CPU, per row
    again = D.ClipLoader(SPEC, table, seed=1, epoch=2, clips_per_video=2).decode_batch(paths, labels, epoch=2)
    assert (again["tokens"] == out["tokens"]).all() and "cpu_s" not in again


def test_bad_video_drops_all_its_clips(k400_tree):
    table = _good_videos(k400_tree, 1).select(["path", "label"])
    good = table.column("path")[0].as_py()
    out = D.ClipLoader(SPEC, table, clips_per_video=3).decode_batch([good, good + ".missing.mp4"], [0, 1], epoch=0)
    assert list(out["path"]) == [good] * 3 and out["tokens"].shape[0] == 3  # 3 clips of the good one, none else


def test_chunks_follow_a_per_epoch_permutation(k400_tree):
    table = build_manifest(k400_tree).split("train").select(["path", "label"])
    n = table.num_rows
    order0, order1 = D.epoch_order(n, 5, 0, True), D.epoch_order(n, 5, 1, True)
    assert sorted(order0) == list(range(n)) and (order0 != order1).any()  # every video once, a new order
    assert (D.epoch_order(n, 5, 0, True) == order0).all()  # seeded: the same on every worker
    assert (D.epoch_order(n, 5, 3, False) == np.arange(n)).all()  # no shuffle: manifest order
    # The UDF walks the chunk's slice of that order, batch_size videos per output block.
    loader = D.ClipLoader(SPEC, pa.Table.from_pylist([{"path": p, "label": 0} for p in ["a", "b", "c", "d", "e"]]),
                          seed=5, epoch=1, shuffle=True, batch_size=2)
    seen = []
    loader.decode_batch = lambda paths, labels, epoch: seen.append((paths, epoch)) or {}
    list(loader({"start": np.array([0, 3]), "stop": np.array([3, 5])}))
    want = [["a", "b", "c", "d", "e"][i] for i in D.epoch_order(5, 5, 1, True)]
    assert [p for p, _ in seen] == [want[0:2], want[2:3], want[3:5]] and {e for _, e in seen} == {1}


def test_videos_per_task_spreads_work_and_stays_a_multiple_of_the_batch():
    assert D.default_videos_per_task(128, 2, 4) == 16  # about 4 tasks per decode slot
    assert D.default_videos_per_task(240_000, 64, 4) == 64  # capped: blocks keep streaming out of long tasks
    assert D.default_videos_per_task(10, 2, 4) == 4  # never below one output block
    assert D.default_videos_per_task(100, 2, 8) % 8 == 0
