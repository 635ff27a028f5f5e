import csv
import hashlib
import json
import time

import numpy as np
import pytest

from pipeline import synth
from pipeline.decode import decode_all


def synth_info(root) -> dict:
    return json.loads((root / "synth.json").read_text())


def test_class_names_are_exact_and_k400_style():
    names = [c.name for c in synth.synth_classes(8)]
    assert names[:2] == ["moving left", "moving right"]
    assert "moving up-right" in names and len(set(names)) == 8
    sixteen = synth.synth_classes(16)
    assert len({c.name for c in sixteen}) == 16 and sixteen[8].name == "moving left quickly"
    with pytest.raises(ValueError, match="1..16"):
        synth.synth_classes(17)


def test_motion_defines_the_class_not_a_single_frame():
    rng = np.random.default_rng(0)
    for cls in synth.synth_classes(8):
        video, info = synth.render_video(rng, cls, width=96, height=96, frames=8)
        vx, vy = info["velocity"]
        dx, dy = cls.direction
        assert np.sign(vx) == np.sign(dx) and np.sign(vy) == np.sign(dy)
        assert np.hypot(vx, vy) >= 3  # several pixels per frame: a 2-frame tubelet sees motion
        # Only part of each frame changes between frames (the 3-5 moving objects; background and distractors are
        # static): measured over 480 videos, 11 % of the pixels on average and at most 21 %.
        changed = (np.abs(video[1].astype(int) - video[0].astype(int)).sum(-1) > 0).mean()
        assert 0 < changed < 0.3
        assert 3 <= info["movers"] <= 5
    # Mean colour carries no class signal: object colour / background are random per video.
    means = {c.index: [synth.render_video(np.random.default_rng([c.index, k]), c, width=64, height=64,
                                          frames=2)[0].mean() for k in range(6)] for c in synth.synth_classes(4)}
    spreads = [np.std(v) for v in means.values()]
    centres = [np.mean(v) for v in means.values()]
    assert np.std(centres) < 2 * np.mean(spreads)


def test_clutter_scene_object_moves_over_a_panning_background(tmp_path):
    """scene="clutter": one object moves in the class direction, staying in the frame; the textured background pans
    in a direction that has nothing to do with the class; neither object nor background is a flat colour."""
    pans = []
    for k, cls in enumerate(synth.synth_classes(4) * 3):
        rng = np.random.default_rng([k, 1])
        video, info = synth.render_clutter_video(rng, cls, width=64, height=64, frames=8)
        again, _ = synth.render_clutter_video(np.random.default_rng([k, 1]), cls, width=64, height=64, frames=8)
        assert video.shape == (8, 64, 64, 3) and video.dtype == np.uint8 and np.array_equal(video, again)
        vx, vy = info["velocity"]
        dx, dy = cls.direction
        assert np.sign(vx) == np.sign(dx) and np.sign(vy) == np.sign(dy) and np.hypot(vx, vy) >= 2
        assert info["movers"] == 1 and 6 <= info["size"] <= 13  # small: 10-20 % of the short side
        assert np.hypot(*info["pan"]) <= 0.5 * np.hypot(vx, vy) + 1e-6
        pans.append(info["pan"])
        # Textured, not flat: the background has many distinct colours in every frame.
        assert len(np.unique(video[0].reshape(-1, 3), axis=0)) > 500
    pans = np.array(pans)
    assert (pans[:, 0] > 0).any() and (pans[:, 0] < 0).any()  # the camera pans both ways, whatever the class
    res = synth.generate(tmp_path / "c", "k400", scene="clutter", classes=2, videos_per_class=1,
                         val_videos_per_class=0, test_videos_per_class=0, width=32, height=32, frames=4,
                         workers=1, progress=False)
    assert res.videos == 2 and synth_info(tmp_path / "c")["params"]["scene"] == "clutter"
    with pytest.raises(ValueError, match="scene='forest'"):
        synth.generate(tmp_path / "d", "k400", scene="forest", progress=False)


def test_k400_files_and_annotations(k400_tree):
    info = synth_info(k400_tree)
    assert info["counts"] == {"train": 4 * 4 + 3, "validate": 4 * 2, "test": 4}
    with open(k400_tree / "annotations" / "train.csv", newline="") as f:
        text = f.read()
    assert text.splitlines()[0] == "label,youtube_id,time_start,time_end,split,is_cc"
    assert '"moving left",' in text  # labels with spaces are quoted, as in the official files
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 19 and {r["split"] for r in rows} == {"train"}
    r = rows[0]
    name = f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}.mp4"
    f = k400_tree / "videos" / "train" / r["label"] / name
    assert f.is_file()
    frames = decode_all(f)
    assert frames.shape == (12, 48, 64, 3)
    kinds = sorted(c["kind"] for c in info["corrupt"])
    assert kinds == ["empty", "garbage", "truncated"]
    sizes = {c["kind"]: (k400_tree / c["path"]).stat().st_size for c in info["corrupt"]}
    assert sizes["empty"] == 0 and sizes["truncated"] > 0
    assert (k400_tree / "lists" / "train.txt").read_text().count("\n") == 19


def test_ssv2_files_and_annotations(ssv2):
    ann = ssv2 / "labels"
    labels = json.loads((ann / "something-something-v2-labels.json").read_text())
    assert labels["Moving something left"] == "0"
    train = json.loads((ann / "something-something-v2-train.json").read_text())
    item = train[0]
    assert set(item) == {"id", "label", "template", "placeholders"}
    assert item["template"].replace("[", "").replace("]", "") in labels
    assert item["placeholders"][0] in item["label"]
    test = json.loads((ann / "something-something-v2-test.json").read_text())
    assert all(set(t) == {"id"} for t in test)
    video = ssv2 / "20bn-something-something-v2" / f"{item['id']}.webm"
    assert video.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # EBML (webm)


def test_deterministic_given_seed(tmp_path):
    kw = dict(classes=2, videos_per_class=2, val_videos_per_class=1, test_videos_per_class=0, corrupt=1,
              width=32, height=32, frames=4, seed=7, progress=False)
    a = synth.generate(tmp_path / "a", "k400", workers=1, **kw)
    b = synth.generate(tmp_path / "b", "k400", workers=2, **kw)

    def digest(root):
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "synth.json")
        return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert a.counts == b.counts


@pytest.mark.slow
def test_fast_enough(tmp_path):
    t0 = time.perf_counter()
    synth.generate(tmp_path, "k400", classes=8, videos_per_class=10, width=96, height=96, frames=12,
                   progress=False)
    # ~500 videos must take well under a minute on 2 cores: 80+ videos here in a few seconds.
    assert time.perf_counter() - t0 < 30


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="even"):
        synth.generate(tmp_path, "k400", width=33, height=32, progress=False)
    with pytest.raises(ValueError, match="layout"):
        synth.generate(tmp_path, "ucf", progress=False)
