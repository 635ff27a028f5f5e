"""pipeline.reencode (one video -> a training-friendly copy) and pipeline.annotations (annotation files of the copy).
No Ray: tiny videos written here with PyAV."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.annotations import rewrite_k400_csv, rewrite_list_file, rewrite_ssv2_json
from pipeline.decode import DecodeError, decode_all
from pipeline.reencode import (
    TMP_SUFFIX,
    EncodeSettings,
    plan_video,
    prepare_video,
    probe_source,
    target_size,
)


def _frames(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: a smooth gradient moving one pixel per frame, plus a flat grey level = 8 * index in the
    top-left block (so a test can tell which source frame an output frame shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx + i) * 255 // (w + n)
        out[i, ..., 1] = yy * 255 // h
        out[i, ..., 2] = 128
        out[i, : h // 2, : w // 2] = (8 * i) % 256
    return out


def write_video(path: Path, frames: np.ndarray, *, fps: int = 10, codec: str = "libx264", gop: int = 8,
                fmt: str | None = None) -> Path:
    with av.open(str(path), "w", format=fmt) as c:
        opts = {"g": str(gop)}
        if codec == "libx264":
            opts = {"preset": "ultrafast", "crf": "10", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        elif codec == "libvpx-vp9":
            opts = {"deadline": "realtime", "cpu-used": "8", "g": str(gop), "crf": "10", "b": "0"}
        s = c.add_stream(codec, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_target_size_keeps_aspect_even_and_never_upscales():
    assert target_size(1280, 720, 256) == (456, 256)  # 455.1 -> nearest even
    assert target_size(720, 1280, 256) == (256, 456)  # portrait
    assert target_size(340, 256, 256) == (340, 256)  # exactly the target: kept
    assert target_size(63, 47, 256) == (62, 46)  # small and odd: own size, rounded down to even (yuv420p)
    assert target_size(1920, 1080, 320) == (568, 320)


def test_settings_problems_name_the_option():
    assert EncodeSettings().problems() == []
    assert "--short-side 16: must be >= 32" in EncodeSettings(short_side=16).problems()[0]
    assert "--crf 60" in EncodeSettings(crf=60).problems()[0]
    assert "--preset 'quick'" in EncodeSettings(preset="quick").problems()[0]
    assert "--fps 0" in EncodeSettings(fps=0).problems()[0]
    assert "--tune 'fast': expected none or one of fastdecode" in EncodeSettings(tune="fast").problems()[0]
    assert EncodeSettings(tune=None).problems() == []


def test_large_video_is_resized_deterministically_with_short_keyframe_intervals(tmp_path):
    src = write_video(tmp_path / "big.mp4", _frames(40, 160, 120), gop=40)
    s = EncodeSettings(short_side=64, gop=8)
    plan = plan_video(str(src), probe_source(src), s)
    assert (plan.action, plan.why, plan.width, plan.height) == ("encode", ("resize",), 86, 64)
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    r = prepare_video(src, a, s)
    prepare_video(src, b, s)
    assert a.read_bytes() == b.read_bytes()  # deterministic: an interrupted + resumed run equals an uninterrupted one
    assert (r.action, r.frames_in, r.frames_out, r.dst_size) == ("encode", 40, 40, "86x64")
    info = probe_source(a, keyframes=True)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.frames) == ("h264", "yuv420p", 86, 64, 40)
    assert info.keyframe_interval == 8
    # The content is the source's, downscaled (the decoder's own resize gives 85 px: an odd width; compare the rest).
    ref = decode_all(src, decoder="pyav", short_side=64).astype(int)  # (40, 64, 85, 3)
    out = decode_all(a, decoder="pyav").astype(int)  # (40, 64, 86, 3)
    assert out.shape == (40, 64, 86, 3) and np.abs(out[:, :, :85] - ref).mean() < 6
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def test_constant_fps_takes_the_nearest_source_frame(tmp_path):
    src = write_video(tmp_path / "30fps.mp4", _frames(30, 64, 48), fps=30, gop=30)
    dst = tmp_path / "10fps.mp4"
    r = prepare_video(src, dst, EncodeSettings(short_side=48, fps=10))
    assert r.action == "encode" and "fps 30 -> 10" in r.reason and r.frames_out == 10
    info = probe_source(dst)
    assert info.fps == pytest.approx(10) and info.frames == 10
    grey = decode_all(dst, decoder="pyav")[:, 4:20, 4:28].mean(axis=(1, 2, 3))  # the index-coded block
    assert np.abs(grey - 8 * 3 * np.arange(10)).max() < 4  # output k = source frame 3k


def test_small_videos_are_copied_or_remuxed_unless_codec_or_keyframes_need_encoding(tmp_path):
    s = EncodeSettings(short_side=64, gop=16)
    frames = _frames(20, 64, 48)
    # H.264 .mp4, short GOP: the bytes are copied.
    mp4 = write_video(tmp_path / "ok.mp4", frames, gop=8)
    r = prepare_video(mp4, tmp_path / "out" / "ok.mp4", s)
    assert r.action == "copy" and (tmp_path / "out" / "ok.mp4").read_bytes() == mp4.read_bytes()
    # The same stream in Matroska: packets copied into .mp4, nothing decoded, the same frames.
    mkv = write_video(tmp_path / "ok.mkv", frames, gop=8, fmt="matroska")
    r = prepare_video(mkv, tmp_path / "out" / "mkv.mp4", s)
    assert r.action == "remux" and "matroska -> mp4" in r.reason and r.frames_out == 20
    assert np.array_equal(decode_all(tmp_path / "out" / "mkv.mp4", decoder="pyav"), decode_all(mkv, decoder="pyav"))
    # Small but a keyframe only every 20 frames: encoded at its own size.
    long_gop = write_video(tmp_path / "long.mp4", frames, gop=20)
    r = prepare_video(long_gop, tmp_path / "out" / "long.mp4", s)
    assert r.action == "encode" and r.reason == "small, but keyframe interval 20 > 16" and r.dst_size == "64x48"
    # VP9 (SSv2's webm): H.264 at its own size.
    webm = write_video(tmp_path / "vp9.webm", frames, codec="libvpx-vp9", fmt="webm")
    plan = plan_video(str(webm), probe_source(webm), s)
    assert plan.action == "encode" and plan.why == ("codec",) and (plan.width, plan.height) == (64, 48)
    r = prepare_video(webm, tmp_path / "out" / "vp9.mp4", s)
    assert probe_source(tmp_path / "out" / "vp9.mp4").codec == "h264" and r.frames_out == 20


@pytest.mark.parametrize("kind, stage", [("empty", "open"), ("garbage", "open"), ("truncated", "open")])
def test_unreadable_sources_raise_with_a_stage_and_leave_nothing(tmp_path, kind, stage):
    good = write_video(tmp_path / "good.mp4", _frames(20, 64, 48)).read_bytes()
    data = {"empty": b"", "garbage": bytes(range(256)) * 20, "truncated": good[:200]}[kind]
    src = tmp_path / f"{kind}.mp4"
    src.write_bytes(data)
    dst = tmp_path / "out" / f"{kind}.mp4"
    with pytest.raises(DecodeError) as e:
        prepare_video(src, dst, EncodeSettings(short_side=32))
    assert e.value.stage == stage
    assert not dst.exists() and not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))


def test_truncated_after_the_header_is_a_decode_error(tmp_path):
    good = write_video(tmp_path / "good.mp4", _frames(60, 64, 48), gop=60).read_bytes()
    src = tmp_path / "cut.mp4"
    # Keep the header (moov at the end of a non-faststart file is lost): write a faststart copy, then cut it.
    tmp = tmp_path / "fast.mp4"
    with av.open(str(tmp_path / "good.mp4")) as ic, av.open(str(tmp), "w", format="mp4",
                                                            options={"movflags": "+faststart"}) as oc:
        o = oc.add_stream_from_template(ic.streams.video[0])
        for pkt in ic.demux(ic.streams.video[0]):
            if pkt.dts is not None:
                pkt.stream = o
                oc.mux(pkt)
    src.write_bytes(tmp.read_bytes()[: len(good) // 2])
    with pytest.raises(DecodeError) as e:
        prepare_video(src, tmp_path / "out.mp4", EncodeSettings(short_side=32))
    assert e.value.stage == "decode" and "decoding stopped after" in e.value.reason
    assert not (tmp_path / "out.mp4").exists()


# ------------------------------------------------------------------------------------------------ annotations


def test_k400_csv_rows_are_dropped_and_kept_lines_stay_verbatim():
    text = ('label,youtube_id,time_start,time_end,split,is_cc\n'
            '"moving up, fast",abc,10,20,train,0\n'
            'jumping,def,0,10,train,1\n'
            '"moving up, fast",ghi,5,15,train,0\n')
    out, dropped = rewrite_k400_csv(text, {("abc", 10.0, 20.0), ("ghi", 5.0, 15.0)})
    assert dropped == 1
    assert out == ('label,youtube_id,time_start,time_end,split,is_cc\n"moving up, fast",abc,10,20,train,0\n'
                   '"moving up, fast",ghi,5,15,train,0\n')


def test_ssv2_items_are_dropped_and_untouched_files_stay_verbatim():
    text = json.dumps([{"id": "1", "template": "a"}, {"id": "2", "template": "b"}])
    assert rewrite_ssv2_json(text, {"1", "2"}) == (text, 0)
    out, dropped = rewrite_ssv2_json(text, {"2"})
    assert dropped == 1 and json.loads(out) == [{"id": "2", "template": "b"}]


def test_list_file_paths_get_the_new_name_and_keep_their_separator(tmp_path):
    (tmp_path / "videos" / "a b").mkdir(parents=True)
    for name in ("x.webm", "y.avi", "z.webm"):
        (tmp_path / "videos" / "a b" / name).write_bytes(b"v")
    lst = tmp_path / "train.txt"
    text = "videos/a b/x.webm\t3\nvideos/a b/y.avi 4\n# comment\nvideos/a b/z.webm 5\n"
    renamed = {str((tmp_path / "videos" / "a b" / n).resolve()): n.rsplit(".", 1)[0] + ".mp4" for n in ("x.webm",
                                                                                                      "y.avi")}
    out, dropped = rewrite_list_file(lst, tmp_path, text, renamed)
    assert dropped == 1  # z is not in DST
    assert out == "videos/a b/x.mp4\t3\nvideos/a b/y.mp4 4\n# comment\n"
