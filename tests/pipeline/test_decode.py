import json

import numpy as np
import pytest

from pipeline import decode as D
from pipeline.synth import encode_video, render_video, synth_classes


def _a_video(root, ext):
    return sorted(root.rglob(f"*.{ext}"), key=lambda p: p.stat().st_size)[-1]  # a good one (largest)


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """100-frame videos (GOP 8) with a frame counter burnt in, so indices can be checked exactly."""
    d = tmp_path_factory.mktemp("long")
    video, _ = render_video(np.random.default_rng(0), synth_classes(1)[0], width=64, height=48, frames=100)
    for i in range(100):  # frame index as a bright bar of width i % 64 in the top rows
        video[i, :4] = 0
        video[i, :4, : 1 + i % 60] = 255
    out = {}
    for codec, ext in (("h264", "mp4"), ("vp9", "webm")):
        encode_video(str(d / f"long.{ext}"), video, fps=25, codec=codec, gop=8)
        out[ext] = d / f"long.{ext}"
    return out, video


def _bar(frame):
    return int((frame[1, :, :].mean(-1) > 128).sum())  # bar width (rows 0-3 are the bar)


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_decord_and_pyav_agree(ext, k400_tree, ssv2):
    path = _a_video(k400_tree if ext == "mp4" else ssv2, ext)
    idx = np.array([[0, 3, 5, 11], [2, 2, 7, 9]])
    a, ia = D.read_frames(path, lambda n, fps: idx, decoder="decord")
    b, ib = D.read_frames(path, lambda n, fps: idx, decoder="pyav")
    assert a.shape == b.shape == (2, 4, 48, 64, 3) and a.dtype == np.uint8
    assert ia.num_frames == ib.num_frames == 12
    assert ia.fps == pytest.approx(ib.fps)
    assert np.abs(a.astype(int) - b).max() <= 2  # same frames, same colour conversion
    assert ia.codec == ("h264" if ext == "mp4" else "vp9")


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_same_indices_on_a_long_video_with_seeking(ext, long_videos):
    files, truth = long_videos
    want = np.array([60, 61, 70, 97, 99])  # far in: PyAV seeks to the keyframe before 60
    for dec in ("decord", "pyav"):
        frames, info = D.read_frames(files[ext], lambda n, fps: want, decoder=dec)
        assert info.num_frames == 100
        assert [_bar(f) for f in frames] == [1 + i % 60 for i in want], dec
    a, _ = D.read_frames(files[ext], lambda n, fps: want, decoder="decord")
    b, _ = D.read_frames(files[ext], lambda n, fps: want, decoder="pyav")
    assert np.abs(a.astype(int) - b).max() <= 2


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_reduced_size_decode(ext, long_videos):
    files, _ = long_videos
    want = np.arange(0, 20, 4)
    full, _ = D.read_frames(files[ext], lambda n, fps: want, decoder="decord")
    for dec in ("decord", "pyav"):
        small, info = D.read_frames(files[ext], lambda n, fps: want, decoder=dec, short_side=24)
        assert small.shape == (5, 24, 32, 3) and (info.width, info.height) == (64, 48)
        # close to a 2x downscale of the full frames (different scalers: loose tolerance)
        ref = full.reshape(5, 24, 2, 32, 2, 3).mean((2, 4))
        assert np.abs(small.astype(float) - ref).mean() < 12
    # never upscaled by the decoder
    same, _ = D.read_frames(files[ext], lambda n, fps: want, short_side=200)
    assert same.shape[1:3] == (48, 64)


def test_reduced_size_math():
    assert D.reduced_size(320, 240, 120) == (160, 120)
    assert D.reduced_size(240, 320, 120) == (120, 160)
    assert D.reduced_size(320, 240, 240) is None and D.reduced_size(320, 240, None) is None


@pytest.mark.parametrize("decoder", ["auto", "decord", "pyav"])
def test_typed_errors(decoder, tmp_path, k400_tree, ssv2):
    with pytest.raises(D.MissingFileError) as e:
        D.read_frames(tmp_path / "nope.mp4", lambda n, f: [0], decoder=decoder)
    assert e.value.stage == "open" and "nope.mp4" in e.value.path
    for root in (k400_tree, ssv2):
        info = json.loads((root / "synth.json").read_text())
        for c in info["corrupt"]:
            with pytest.raises(D.DecodeError) as e:
                D.read_frames(c["path"], lambda n, f: np.arange(n), decoder=decoder)
            if c["kind"] == "empty":
                assert isinstance(e.value, D.EmptyVideoError)
            assert e.value.path == c["path"] and e.value.reason
    with pytest.raises(ValueError, match="decoder="):
        D.read_frames(tmp_path / "x.mp4", lambda n, f: [0], decoder="opencv")


def test_error_pickles_across_processes():
    import pickle

    e = pickle.loads(pickle.dumps(D.EmptyVideoError("/a.mp4", "empty file")))
    assert isinstance(e, D.EmptyVideoError) and e.path == "/a.mp4" and e.stage == "open"


def test_probe(long_videos):
    files, _ = long_videos
    for ext in ("mp4", "webm"):
        for dec in ("decord", "pyav"):
            info = D.probe(files[ext], dec)
            assert (info.num_frames, info.width, info.height) == (100, 64, 48)
            assert info.fps == pytest.approx(25)


def test_header_is_read_once_per_file_version(long_videos, tmp_path, monkeypatch):
    import os
    import shutil

    src = long_videos[0]["mp4"]
    path = tmp_path / "v.mp4"
    shutil.copy(src, path)
    opened = []
    real = D._header
    monkeypatch.setattr(D, "_header", lambda p: opened.append(p) or real(p))
    first = D.read_frames(path, lambda n, fps: np.arange(4), short_side=32)[0]
    again = D.read_frames(path, lambda n, fps: np.arange(4), short_side=32)[0]
    assert len(opened) == 1 and (first == again).all()  # the second epoch's decode skips the container header
    shutil.copy(long_videos[0]["webm"], path)  # a new file under the same name: read afresh
    os.utime(path, ns=(1, 1))
    D.read_frames(path, lambda n, fps: np.arange(4), short_side=32)
    assert len(opened) == 2
