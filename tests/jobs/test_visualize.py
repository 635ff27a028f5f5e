"""`mone visualize`: the saved expert map is the model's routing for the clip, and every pixel of every patch in
the PNG is the frame blended with that expert's colour. No Ray."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_eval import assets  # noqa: E402

from jobs.evaluate import EvaluateError  # noqa: E402
from jobs.visualize import blend, expert_colors, visualize  # noqa: E402


@pytest.fixture(scope="module")
def archive_ckpt(tmp_path_factory):
    return assets(tmp_path_factory)


@pytest.fixture(scope="module")
def good_video(archive_ckpt):
    archive, _ = archive_ckpt
    return sorted(archive.glob("videos/validate/*/*.mp4"))[0]


def model_routing(ckpt_dir, video, e_c):
    """Straight from the model: the same clip (pipeline.dataset.load_clip, one centre view) -> routing.expert."""
    import torch

    from jobs.checkpoint import load_inference
    from models.capacity import capacities_for_budget
    from pipeline.dataset import load_clip
    from pipeline.tokens import tubelet_unpatchify

    ckpt = load_inference(ckpt_dir)
    spec = ckpt.clip_spec(temporal_views=1, spatial_views=1)
    tokens = load_clip(str(video), spec)  # (1, L, K)
    with torch.inference_mode():
        _, routing = ckpt.model.forward_tokens(torch.from_numpy(tokens), budget=capacities_for_budget(e_c),
                                               return_routing=True)
    clip = tubelet_unpatchify(tokens[0], spec.grid, spec.tubelet_t, spec.patch)  # (T, H, W, 3)
    return routing.expert[0].numpy(), clip, spec


def read_png(path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)  # float in [0, 1] for PNG
    return np.rint(img[..., :3] * 255).astype(np.uint8)


@pytest.mark.parametrize("e_c", [0.3, 1.0])
def test_png_and_expert_map_match_the_models_routing(archive_ckpt, good_video, tmp_path, e_c):
    _, ckpt = archive_ckpt
    out = tmp_path / "routing.png"
    fig = visualize(ckpt, good_video, out, budget=e_c, alpha=0.5)
    expert, clip, spec = model_routing(ckpt, good_video, e_c)  # (T', N), (T, H, W, 3)
    tp, gh, gw = spec.grid
    saved = np.load(out.with_suffix(".npy"))
    assert saved.shape == (tp, gh, gw)
    np.testing.assert_array_equal(saved, expert.reshape(tp, gh, gw))
    # Token counts: EPR gives every frame floor(c_j N) tokens on expert j >= 1.
    from models.capacity import capacities_for_budget, expert_counts

    counts = expert_counts(capacities_for_budget(e_c), gh * gw)
    for t in range(tp):
        assert tuple(np.bincount(saved[t].ravel(), minlength=4)) == counts
    if e_c == 1.0:
        assert (saved == 3).all()
    # Every pixel of every patch in the PNG: frame (first of its tubelet) blended with the expert's colour.
    png = read_png(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    s, p = meta["scale"], spec.patch
    colors = expert_colors(4)
    assert meta["colors"] == colors.tolist()
    assert meta["tokens_total"] == np.bincount(saved.ravel(), minlength=4).tolist()
    for panel in meta["panels"]:
        t, x0, y0 = panel["t"], panel["x"], panel["y"]
        frame = clip[t * spec.tubelet_t]  # (H, W, 3)
        for gy in range(gh):
            for gx in range(gw):
                got = png[y0 + gy * p * s : y0 + (gy + 1) * p * s, x0 + gx * p * s : x0 + (gx + 1) * p * s]
                src = frame[gy * p : (gy + 1) * p, gx * p : (gx + 1) * p]
                want = blend(np.repeat(np.repeat(src, s, 0), s, 1), colors[saved[t, gy, gx]], 0.5)
                np.testing.assert_array_equal(got, want, err_msg=f"panel {t} patch ({gy}, {gx})")
    assert fig.image.shape == png.shape and (fig.image == png).all()


def ck_tokens(ckpt) -> int:
    """Tokens of one clip of the checkpoint's model: temporal tokens x patches per frame."""
    from jobs.checkpoint import load_inference

    m = load_inference(ckpt).model.cfg
    return m.temporal_tokens * m.num_patches


def test_cli_prints_one_json_line(archive_ckpt, good_video, tmp_path, capsys):
    from jobs import visualize as vis

    _, ckpt = archive_ckpt
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    vis.register(sub)
    args = parser.parse_args(["visualize", "--checkpoint", str(ckpt.parent), "--video", str(good_video),
                              "--budget", "0.5", "--out", str(tmp_path / "r.png")])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line)
    assert summary["e_c"] == 0.5 and sum(summary["tokens_per_expert"]) == ck_tokens(ckpt)
    assert Path(summary["png"]).is_file() and Path(summary["expert_map"]).is_file()


def test_bad_input_is_named(archive_ckpt, good_video, tmp_path):
    archive, ckpt = archive_ckpt
    with pytest.raises(EvaluateError, match="--checkpoint: checkpoint .* does not exist"):
        visualize(tmp_path / "nope", good_video, tmp_path / "r.png")
    with pytest.raises(EvaluateError, match="--video .*no such file"):
        visualize(ckpt, tmp_path / "missing.mp4", tmp_path / "r.png")
    empty = next(p for p in archive.rglob("*.mp4") if p.stat().st_size == 0)
    with pytest.raises(EvaluateError, match=f"--video {empty}: cannot be read"):
        visualize(ckpt, empty, tmp_path / "r.png")
    with pytest.raises(EvaluateError, match="effective capacity must be in"):
        visualize(ckpt, good_video, tmp_path / "r.png", budget=2.0)
    with pytest.raises(EvaluateError, match="exactly one budget"):
        visualize(ckpt, good_video, tmp_path / "r.png", budget="0.3,0.5")
    assert not (tmp_path / "r.png").exists()
