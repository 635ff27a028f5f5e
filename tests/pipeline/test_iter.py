"""The plain (no Ray) iterator: same decode+sample+tokenize code the Ray UDF runs."""

import json

import numpy as np
import pytest

from pipeline import dataset as D
from pipeline.manifest import build_manifest
from pipeline.sampling import ClipSpec

SPEC = ClipSpec(num_frames=4, sampling="segment", short_side=32, crop_size=32, patch=16, tubelet_t=2)


def test_segment_clips_from_ssv2_and_errors(ssv2, tmp_path):
    m = build_manifest(ssv2)
    train = m.split("train")
    errors = []
    out = list(D.iter_clips(train, SPEC, seed=0, epoch=0, errors=errors, max_error_fraction=0.5))
    corrupt = {c["path"] for c in json.loads((ssv2 / "synth.json").read_text())["corrupt"]}
    assert {e.path for e in errors} == corrupt
    assert {o["path"] for o in out} == set(train.column("path").to_pylist()) - corrupt
    assert all(o["tokens"].shape == (1, 8, 1536) and o["tokens"].dtype == np.uint8 for o in out)
    assert {e.stage for e in errors} <= {"open", "decode"}
    p = D.write_errors(errors, tmp_path)
    t = D.read_errors(p)
    assert t.column_names == ["path", "stage", "error"] and t.num_rows == 3


def test_reproducible_and_epoch_dependent(k400_tree):
    m = build_manifest(k400_tree).split("validate")
    spec = ClipSpec(num_frames=4, stride=2, short_side=32, crop_size=32, patch=16, flip=True)
    a = {o["path"]: o["tokens"] for o in D.iter_clips(m, spec, seed=3, epoch=1)}
    b = {o["path"]: o["tokens"] for o in D.iter_clips(m, spec, seed=3, epoch=1)}
    c = {o["path"]: o["tokens"] for o in D.iter_clips(m, spec, seed=3, epoch=2)}
    assert a.keys() == b.keys() == c.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)  # new epoch, new crops


def test_multi_view_eval(k400_tree):
    m = build_manifest(k400_tree).split("test")
    spec = ClipSpec(num_frames=4, stride=2, short_side=32, crop_size=32, patch=16, train=False,
                    temporal_views=2, spatial_views=3)
    outs = list(D.iter_clips(m, spec))
    assert len(outs) == 4 and all(o["tokens"].shape == (6, 8, 1536) for o in outs)
    assert outs[0]["label"] >= 0


def test_max_error_fraction(k400_tree):
    m = build_manifest(k400_tree).split("train")  # 16 good + 3 corrupt
    with pytest.raises(D.TooManyErrors) as e:
        list(D.iter_clips(m, SPEC, max_error_fraction=0.05))
    msg = str(e.value)
    assert "max_error_fraction" in msg and "Worst files" in msg and ".mp4" in msg
    assert len(list(D.iter_clips(m, SPEC, max_error_fraction=0.2))) == 16
    assert len(list(D.iter_clips(m, SPEC, max_error_fraction=None))) == 16


def test_error_log_counts_a_file_once_per_epoch():
    # Validation re-reads the same dataset (fixed epoch) every round; retried batches report again.
    log = D._ErrorLogActor(total=10, max_fraction=0.2)  # budget: 2 bad files per epoch
    for _ in range(5):
        assert log.add(0, 8, [("a.mp4", "open", "x"), ("b.mp4", "decode", "y")]) is None
    assert log.counts()["bad"] == {0: 2} and len(log.get(0)) == 2
    msg = log.add(0, 0, [("c.mp4", "open", "z")])
    assert msg and "3 of 10 videos failed in epoch 0" in msg and "c.mp4" in msg
    assert log.add(1, 0, [("a.mp4", "open", "x")]) is None  # a new epoch counts afresh


def test_torch_collate_is_a_ray_collate_class_and_keeps_the_paths():
    """Ray 2.47+ deprecates plain collate functions (a warning on every epoch of every worker): the training loop
    and the pipeline hand Ray this class. Read-only arrays (as Ray hands them out) become writable tensors."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    tokens = np.arange(2 * 1 * 3 * 4, dtype=np.uint8).reshape(2, 1, 3, 4)
    tokens.flags.writeable = False
    batch = {"tokens": tokens, "label": np.array([3, 1]), "path": np.array(["a.mp4", "b.mp4"], dtype=object)}
    collate = D.TorchCollate()
    assert isinstance(collate, NumpyBatchCollateFn) and not collate.pin
    out = collate(batch)
    assert out["tokens"].dtype == torch.uint8 and torch.equal(out["tokens"], torch.from_numpy(tokens.copy()))
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == [3, 1]
    assert out["path"] == ["a.mp4", "b.mp4"]
