"""Re-encoding one video into a training-friendly copy: short side N, optional constant fps, short keyframe
interval, H.264 yuv420p in .mp4 (PyAV + libx264).

Why: decoding cost grows with the source's pixels and with the distance to the previous keyframe. A 720p source
costs ~400 ms per 16-frame clip however small a short side the decoder is asked for (it scales after decoding
full frames); the same clip re-encoded at a short side of 256 with a keyframe every 16 frames costs ~80 ms.

`plan_video(info, settings)` decides, from the container header (and, for small H.264 files, the keyframe flags of
the packets: demuxing, no decoding), what a video needs:

- ``encode``: decode -> (resample to constant fps) -> resize (AREA, aspect kept, even dimensions) -> libx264
  yuv420p. Whenever the video is larger than the target, or its fps, codec, pixel format or keyframe interval
  is not the requested one. A video that is already small is encoded at its own size (never upscaled).
- ``remux``: already small H.264 yuv420p with short keyframe intervals, in another container (.mkv, .avi, .mov,
  ...): the packets are copied into .mp4, nothing is decoded.
- ``copy``: already small H.264 yuv420p .mp4 with short keyframe intervals: the bytes are copied.

x264 runs with `tune=fastdecode` by default (cheaper decoding for a few % more bytes; `EncodeSettings.tune`).
Encoding is deterministic: one x264 thread, fixed parameters, no scene-cut keyframes, frames numbered by their
output index, no timestamps in the container. The same source and settings give the same bytes, so an
interrupted and resumed run gives the same output as an uninterrupted one. Audio is dropped (training reads
video only), except in byte copies.

Every output goes to a temporary name next to the destination (`dst + ".<random>" + TMP_SUFFIX`, not a video
extension, so no dataset reader ever sees it) and is renamed into place once complete and flushed.

Failures raise `DecodeError` (pipeline.decode) with the stage for the errors table: ``open`` (no readable
container or video stream), ``decode`` (frames could not be decoded, or far fewer than the header promised),
``encode`` (the encoder or muxer failed), ``write`` (the destination could not be written).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from pipeline.decode import DecodeError, EmptyVideoError, _check_file, _short, open_pyav

OUTPUT_EXT = ".mp4"
TMP_SUFFIX = ".prepare-tmp"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
X264_TUNES = ("fastdecode", "film", "animation", "grain", "stillimage", "psnr", "ssim", "zerolatency")
MIN_SHORT_SIDE = 32
ACTIONS = ("encode", "remux", "copy")
# A header frame count is trusted to within this fraction: fewer decoded frames means a truncated file.
MIN_DECODED_FRACTION = 0.9


@dataclass(frozen=True)
class EncodeSettings:
    """What the prepared copy should be. `fps=None` keeps each video's own frame rate (and frame count)."""

    short_side: int = 320
    fps: float | None = None
    gop: int = 16  # keyframe interval, frames
    crf: int = 23  # x264 constant rate factor: 0 lossless, 23 default, 51 worst
    preset: str = "veryfast"  # x264 speed/size trade-off; decoding speed does not depend on it much
    # fastdecode (no CABAC, no deblocking, no weighted prediction): on generated 720p videos prepared at 256, about
    # a third less decoding time per clip for ~7 % more bytes (benchmarks/prepare_speed.py). None: x264's default.
    tune: str | None = "fastdecode"

    def problems(self) -> list[str]:
        """Human-readable problems with these settings (empty = valid), each naming the option and the fix."""
        out = []
        if self.short_side < MIN_SHORT_SIDE:
            out.append(f"--short-side {self.short_side}: must be >= {MIN_SHORT_SIDE} (e.g. 256 or 320)")
        if self.fps is not None and not 0 < self.fps <= 240:
            out.append(f"--fps {self.fps:g}: must be in (0, 240], or left out to keep each video's frame rate")
        if not 1 <= self.gop <= 600:
            out.append(f"--gop {self.gop}: the keyframe interval must be 1..600 frames (e.g. 16)")
        if not 0 <= self.crf <= 51:
            out.append(f"--crf {self.crf}: must be 0..51 (x264: 0 lossless, 23 default, 51 worst)")
        if self.preset not in X264_PRESETS:
            out.append(f"--preset {self.preset!r}: expected one of {', '.join(X264_PRESETS)}")
        if self.tune is not None and self.tune not in X264_TUNES:
            out.append(f"--tune {self.tune!r}: expected none or one of {', '.join(X264_TUNES)}")
        return out

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SourceInfo:
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str
    container: str  # PyAV's format name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "matroska,webm"
    frames: int  # from the header; 0 = unknown (webm/mkv)
    keyframe_interval: int = 0  # longest run of packets from one keyframe to the next; 0 = not measured


@dataclass
class Plan:
    action: str  # encode | remux | copy
    reason: str  # why, for the summary and --dry-run ("resize 1280x720 -> 456x256", "codec vp9 -> h264", ...)
    width: int  # output size
    height: int
    why: tuple[str, ...] = ()  # encode only: resize | fps | codec | pix_fmt | keyframes | odd_size


@dataclass
class Result:
    action: str
    reason: str
    src_size: str  # "WxH"
    dst_size: str
    frames_in: int  # decoded (encode), packets (remux), header count (copy)
    frames_out: int
    bytes_in: int
    bytes_out: int

    def to_json(self) -> dict:
        return asdict(self)


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side = `short_side` and the aspect kept, both even (yuv420p); never larger than the
    source (a small source keeps its size, rounded down to even)."""
    if min(width, height) <= short_side:
        return max(2, width - width % 2), max(2, height - height % 2)
    s = short_side / min(width, height)

    def even(x: float) -> int:
        return max(2, 2 * round(x / 2))

    if width <= height:
        return even(short_side), even(height * s)
    return even(width * s), even(short_side)


def _rate(stream) -> Fraction:
    r = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(r) if r else Fraction(25)


def probe_source(path: str | os.PathLike, *, keyframes: bool = False) -> SourceInfo:
    """Header facts of a video (no decoding); `keyframes=True` also demuxes every packet to measure the longest
    keyframe interval (reads the whole file)."""
    import av

    path = os.fspath(path)
    _check_file(path)
    try:
        with av.open(path, metadata_errors="ignore") as c:
            if not c.streams.video:
                raise EmptyVideoError(path, "no video stream")
            s = c.streams.video[0]
            cc = s.codec_context
            info = SourceInfo(width=int(s.width), height=int(s.height), fps=float(_rate(s)), codec=cc.name,
                              pix_fmt=str(cc.pix_fmt or ""), container=c.format.name, frames=int(s.frames or 0))
            if keyframes:
                info.keyframe_interval = _keyframe_interval(c, s)
    except DecodeError:
        raise
    except Exception as e:  # av.error.InvalidDataError, OSError, ...
        raise DecodeError(path, f"unreadable container: {_short(e)}", stage="open") from None
    if info.width <= 0 or info.height <= 0:
        raise DecodeError(path, f"video stream without a size ({info.width}x{info.height})", stage="open")
    return info


def _keyframe_interval(container, stream) -> int:
    n, last_key, longest = 0, 0, 0
    for pkt in container.demux(stream):
        if not pkt.size:
            continue
        if pkt.is_keyframe:
            longest = max(longest, n - last_key)
            last_key = n
        n += 1
    return max(longest, n - last_key)


def needs_keyframe_check(info: SourceInfo, settings: EncodeSettings) -> bool:
    """Whether the plan depends on the keyframe interval (only small H.264 yuv420p at the right fps could be kept)."""
    return (min(info.width, info.height) <= settings.short_side and info.codec == "h264"
            and info.pix_fmt == "yuv420p" and not _fps_differs(info.fps, settings.fps))


def _fps_differs(src: float, want: float | None) -> bool:
    return want is not None and abs(src - want) > 1e-3 * want


def plan_video(path: str, info: SourceInfo, settings: EncodeSettings) -> Plan:
    """What `path` needs (see the module doc). `info.keyframe_interval` must be measured when
    `needs_keyframe_check` says so."""
    w, h = target_size(info.width, info.height, settings.short_side)
    if min(info.width, info.height) > settings.short_side:
        return Plan("encode", f"resize {info.width}x{info.height} -> {w}x{h}", w, h, ("resize",))
    why: dict[str, str] = {}
    if _fps_differs(info.fps, settings.fps):
        why["fps"] = f"fps {info.fps:.4g} -> {settings.fps:g}"
    if info.codec != "h264":
        why["codec"] = f"codec {info.codec} -> h264"
    if info.pix_fmt != "yuv420p":
        why["pix_fmt"] = f"pixel format {info.pix_fmt or '?'} -> yuv420p"
    if not why and info.keyframe_interval > settings.gop:
        why["keyframes"] = f"keyframe interval {info.keyframe_interval} > {settings.gop}"
    if why:
        if (w, h) != (info.width, info.height):
            why["odd_size"] = f"odd size {info.width}x{info.height} -> {w}x{h}"
        return Plan("encode", "small, but " + ", ".join(why.values()), w, h, tuple(why))
    if os.path.splitext(path)[1].lower() == OUTPUT_EXT and "mp4" in info.container.split(","):
        return Plan("copy", "already small H.264 .mp4 with short keyframe intervals", info.width, info.height)
    fmt = info.container.split(",")[0]
    return Plan("remux", f"already small H.264 with short keyframe intervals; container {fmt} -> mp4",
                info.width, info.height)


# ------------------------------------------------------------------------------------------------------- actions


def encode(src: str, out: str, settings: EncodeSettings, width: int, height: int) -> tuple[int, int]:
    """Decodes `src` and writes H.264 yuv420p .mp4 to `out` (`out` is written directly: callers use a temporary
    name). Returns (frames decoded, frames written)."""
    import av

    ic, s = open_pyav(src)  # one decode thread: one task = one CPU, parallelism comes from many videos at once
    with ic:
        src_rate = _rate(s)
        out_rate = Fraction(settings.fps).limit_denominator(1001) if settings.fps else src_rate
        resample = _fps_differs(float(src_rate), settings.fps)
        header_frames = int(s.frames or 0)
        try:
            oc = av.open(out, "w", format="mp4", options={"movflags": "+faststart"})
        except Exception as e:
            raise DecodeError(src, f"cannot create {out}: {_short(e)}", stage="write") from None
        with oc:
            o = _x264_stream(oc, settings, out_rate, width, height)
            decoded, written = _transcode(ic, s, o, oc, src, src_rate, out_rate, resample, width, height,
                                          header_frames)
    if decoded == 0:
        raise EmptyVideoError(src, "no decodable frames")
    if header_frames and decoded < MIN_DECODED_FRACTION * header_frames:
        raise DecodeError(src, f"decoded {decoded} of {header_frames} frames (truncated or corrupt file)")
    return decoded, written


def _x264_stream(oc, settings: EncodeSettings, rate: Fraction, width: int, height: int):
    # scenecut=0: keyframes exactly every `gop` frames (regular, cheap seeking, and no content-dependent choice).
    params = f"keyint={settings.gop}:min-keyint={settings.gop}:scenecut=0"
    opts = {"crf": str(settings.crf), "preset": settings.preset, "x264-params": params}
    if settings.tune:
        opts["tune"] = settings.tune
    o = oc.add_stream("libx264", rate=rate, options=opts)
    o.width, o.height, o.pix_fmt = width, height, "yuv420p"
    o.thread_type = "NONE"
    o.codec_context.thread_count = 1  # single-threaded x264: deterministic bytes, one CPU per task
    return o


def _transcode(ic, s, o, oc, src: str, src_rate: Fraction, out_rate: Fraction, resample: bool,
               width: int, height: int, header_frames: int) -> tuple[int, int]:
    import av

    half = 0.5 / float(src_rate)
    tb = 1 / out_rate
    decoded = written = 0
    origin = None

    def emit(frame) -> None:
        nonlocal written
        # AREA: antialiased downscaling; also converts any pixel format to yuv420p.
        vf = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
        vf.pts, vf.time_base = written, tb
        try:
            for pkt in o.encode(vf):
                oc.mux(pkt)
        except av.error.FFmpegError as e:
            raise DecodeError(src, f"encoder failed: {_short(e)}", stage="encode") from None
        written += 1

    try:
        for frame in ic.decode(s):
            if resample:
                # Constant output rate: output frame k shows the source frame nearest to time k / fps.
                if frame.pts is not None and frame.time_base:
                    origin = frame.pts if origin is None else origin
                    t = float((frame.pts - origin) * frame.time_base)
                else:
                    t = decoded / float(src_rate)
                while written * float(tb) < t + half:
                    emit(frame)
            else:
                emit(frame)
            decoded += 1
    except DecodeError:
        raise
    except Exception as e:
        # A damaged tail (the last few frames of what the header promised) is tolerated, as pipeline.decode does.
        if not (header_frames and decoded >= MIN_DECODED_FRACTION * header_frames):
            raise DecodeError(src, f"decoding stopped after {decoded} frames: {_short(e)}") from None
    try:
        for pkt in o.encode():
            oc.mux(pkt)
    except Exception as e:
        raise DecodeError(src, f"encoder failed at the end: {_short(e)}", stage="encode") from None
    return decoded, written


def remux(src: str, out: str) -> int:
    """Copies the video packets of `src` into an .mp4 at `out` (no decoding). Returns the packet count."""
    import av

    try:
        with av.open(src, metadata_errors="ignore") as ic, \
                av.open(out, "w", format="mp4", options={"movflags": "+faststart"}) as oc:
            s = ic.streams.video[0]
            o = oc.add_stream_from_template(s)
            n = 0
            for pkt in ic.demux(s):
                if pkt.dts is None or not pkt.size:
                    continue
                pkt.stream = o
                oc.mux(pkt)
                n += 1
    except Exception as e:
        raise DecodeError(src, f"remux to mp4 failed: {_short(e)}", stage="encode") from None
    if n == 0:
        raise EmptyVideoError(src, "no video packets")
    return n


# ------------------------------------------------------------------------------------------------- one video


def temp_path(dst: str) -> str:
    """A fresh temporary name beside `dst` (unique per attempt: two writers never share one)."""
    return f"{dst}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def _commit(tmp: str, dst: str) -> None:
    """Flushes the finished temporary file to disk and renames it into place (atomic on POSIX file systems)."""
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        raise DecodeError(dst, f"cannot write the output: {e}", stage="write") from None


def prepare_video(src: str, dst: str, settings: EncodeSettings, *, plan: Plan | None = None,
                  info: SourceInfo | None = None, before_commit=None) -> Result:
    """Makes `dst` (an .mp4 path) the training-friendly copy of `src`. Nothing appears at `dst` unless it is
    complete. `before_commit` (tests) is called with the temporary path just before the rename."""
    src, dst = os.fspath(src), os.fspath(dst)
    if info is None:
        info = probe_source(src)
        if needs_keyframe_check(info, settings):
            info = probe_source(src, keyframes=True)
    plan = plan or plan_video(src, info, settings)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    action, reason = plan.action, plan.reason
    try:
        if action == "copy":
            try:
                shutil.copyfile(src, tmp)
            except OSError as e:
                raise DecodeError(src, f"copy failed: {e}", stage="write") from None
            frames_in = frames_out = info.frames
        elif action == "remux":
            try:
                frames_in = frames_out = remux(src, tmp)
            except DecodeError as e:  # e.g. a stream the mp4 muxer refuses: encoding still works
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                action, reason = "encode", f"{reason}; remux failed ({e.reason}), encoded instead"
                frames_in, frames_out = encode(src, tmp, settings, plan.width, plan.height)
        else:
            frames_in, frames_out = encode(src, tmp, settings, plan.width, plan.height)
        if before_commit is not None:
            before_commit(tmp)
        _commit(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return Result(action, reason, f"{info.width}x{info.height}", f"{plan.width}x{plan.height}", frames_in,
                  frames_out, os.path.getsize(src), os.path.getsize(dst))
