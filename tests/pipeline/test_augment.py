"""Clip-consistent augmentation (pipeline/augment.py): one parameter draw per clip, the same on every frame."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import augment as A
from pipeline import transforms as T
from pipeline.sampling import ClipSpec

ROOT = Path(__file__).resolve().parents[2]
STRONG = A.ClipAugment(randaugment_layers=3, randaugment_magnitude=12, color_jitter=0.4, random_erasing=1.0)


def _still_clip(t=6, h=48, w=64, seed=0):
    """T copies of one textured frame: any per-frame difference after augmentation means per-frame parameters."""
    rng = np.random.default_rng(seed)
    frame = np.clip(rng.normal(120, 50, (h, w, 3)), 0, 255).astype(np.uint8)
    frame[10:30, 20:40] = (230, 40, 40)  # an edge-rich shape: geometric ops move it visibly
    return np.repeat(frame[None], t, axis=0)


def test_parameters_identical_across_frames_for_every_op():
    """Every RandAugment op, the colour jitter and the erase box leave identical frames identical (so each frame got
    the same op, magnitude, sign and box), and they do change the clip."""
    seen: set[str] = set()
    for seed in range(60):
        clip = _still_clip(seed=seed % 3)
        rng = np.random.default_rng(seed)
        params = A.sample_params(STRONG, np.random.default_rng(seed), clip.shape[1], clip.shape[2])
        out = A.augment_clip(clip, STRONG, rng)
        assert out.shape == clip.shape and out.dtype == np.uint8
        assert all(np.array_equal(out[0], out[t]) for t in range(1, len(out))), f"frames differ (seed {seed})"
        assert not np.array_equal(out, clip)
        seen |= {name for name, _ in params.ops}
    ra_ops = set(A.timm_auto_augment()._RAND_INCREASING_TRANSFORMS)
    assert ra_ops <= seen, f"never drawn: {sorted(ra_ops - seen)}"
    assert {"Brightness", "Contrast", "Color"} <= seen


def test_same_parameters_applied_to_a_moving_clip():
    """A clip whose frames differ gets, frame by frame, exactly what one parameter draw does to each frame alone."""
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    params = A.sample_params(STRONG, np.random.default_rng(7), 40, 40)
    whole = A.apply_params(clip, params)
    per_frame = np.concatenate([A.apply_params(clip[t : t + 1], params) for t in range(4)])
    assert np.array_equal(whole, per_frame)
    assert not np.array_equal(whole[0], whole[1])  # the content still moves


def test_erasing_box_and_probability():
    clip = np.full((3, 32, 32, 3), 100, np.uint8)
    out = A.augment_clip(clip, A.ClipAugment(random_erasing=1.0), np.random.default_rng(0))
    changed = (out != 100).any(-1)  # (T, H, W)
    assert changed.any() and (changed == changed[0]).all()  # one box, in every frame
    ys, xs = np.nonzero(changed[0])
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert 0.02 * 32 * 32 * 0.5 <= area <= 32 * 32 / 3 * 1.5
    never = A.ClipAugment(random_erasing=0.0)
    assert A.augment_clip(clip, never, np.random.default_rng(0)) is clip


def test_off_by_default_and_draws_nothing():
    """Defaults change nothing and consume no random numbers: clips of runs without augmentation are unchanged."""
    spec = ClipSpec(num_frames=4, short_side=48, crop_size=32, train_crop="random")
    assert not spec.augment.active and spec.augment.scale_jitter == (1.0, 1.0)
    clip = _still_clip(t=4)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    out = T.spatial_views(clip, spec, a)[0]
    y, x = int(b.integers(0, 48 - 32 + 1)), int(b.integers(0, 64 - 32 + 1))
    assert np.array_equal(out, clip[:, y : y + 32, x : x + 32])
    assert a.random() == b.random()


def test_scale_jitter_same_scale_every_frame_and_crop_fits():
    spec = ClipSpec(num_frames=4, short_side=48, crop_size=48, train_crop="random",
                    augment={"scale_jitter": [0.9, 1.33]})
    clip = _still_clip(t=4)
    for seed in range(5):
        out = T.spatial_views(clip, spec, np.random.default_rng(seed))[0]
        assert out.shape == (4, 48, 48, 3)
        assert all(np.array_equal(out[0], out[t]) for t in range(4))
    up = T.scale_jitter(clip, (1.5, 1.5), 48, np.random.default_rng(0))
    assert up.shape == (4, 72, 96, 3)
    down = T.scale_jitter(clip, (0.5, 0.5), 48, np.random.default_rng(0))
    assert down.shape[1] == 48  # never below the crop


def test_deterministic_per_seed_epoch_path(ssv2):
    """Through load_clip: same (seed, epoch, path) -> same tokens; another epoch -> another augmentation."""
    from pipeline.dataset import clip_rng, load_clip
    from pipeline.manifest import build_manifest, select_split

    m = select_split(build_manifest(str(ssv2), "ssv2").table, "validation")
    path = m.column("path")[0].as_py()
    spec = ClipSpec(num_frames=4, sampling="segment", short_side=48, crop_size=48, train_crop="random", augment=STRONG)
    a = load_clip(path, spec, rng=clip_rng(0, 1, path))
    b = load_clip(path, spec, rng=clip_rng(0, 1, path))
    c = load_clip(path, spec, rng=clip_rng(0, 2, path))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_clip_spec_round_trip():
    spec = ClipSpec(augment={"randaugment_layers": 2, "randaugment_magnitude": 20, "scale_jitter": [0.9, 1.33]})
    again = ClipSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and hash(again) == hash(spec)
    with pytest.raises(ValueError, match="scale_jitter"):
        A.ClipAugment(scale_jitter=(1.2, 0.9))


def test_decode_worker_stays_torch_free():
    """RandAugment, colour jitter and erasing import neither torch nor torchvision (timm's op file loads alone)."""
    code = ("import sys, numpy as np; from pipeline import augment as A; "
            "c = np.zeros((2, 32, 32, 3), np.uint8); "
            "a = A.ClipAugment(randaugment_layers=4, color_jitter=0.4, random_erasing=1.0); "
            "[A.augment_clip(c, a, np.random.default_rng(s)) for s in range(20)]; "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
