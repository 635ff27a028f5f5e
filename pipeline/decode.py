"""Decoding: decord first, PyAV as the fallback, typed errors.

`read_frames(path, index_fn, decoder=..., short_side=...)` opens a video, asks `index_fn(num_frames, fps)` which
frame indices it wants (any integer array), decodes just those and returns them as uint8 RGB `(*idx.shape, H, W, 3)`.

decord (default when installed): the file's size is read from the container header first, so decord can
decode straight to the reduced size (`width`/`height` given to `VideoReader`: scaled by ffmpeg while converting to
RGB, never a full-size RGB copy). Only the needed indices are read with one `get_batch` (decord seeks to the
keyframe before each sparse index and decodes forward; dense runs are decoded sequentially), one decoder thread
(we parallelise across processes), and the reader is dropped (`del`) as soon as the frames are copied out:
decord's readers hold the whole packet index and decoder buffers, and keeping them alive is the known source of
its memory growth. PyAV (`decoder="pyav"`, or the fallback under `"auto"` for files decord cannot read): decodes
forward from the start, or from a seek to the keyframe before the first wanted frame when that is far in,
and stops after the last wanted frame. Both number frames the same way (presentation order from 0), so the same
indices give the same frames.

Every failure is a `DecodeError` (with `path`, `reason`, `stage`): `MissingFileError` (no such file),
`EmptyVideoError` (zero bytes, no video stream or no frames), otherwise a plain `DecodeError`. A broken file
never loops: both readers stop at the end of the data and report what they could not decode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

DECODERS = ("auto", "decord", "pyav")
# PyAV seeks instead of decoding forward when the first wanted frame is at least this far in.
SEEK_MIN_FRAMES = 48

IndexFn = Callable[[int, float], np.ndarray]


class DecodeError(RuntimeError):
    """A video could not be decoded. `stage` goes to the errors table ('open' or 'decode')."""

    stage = "decode"

    def __init__(self, path: str, reason: str, stage: str | None = None):
        self.path, self.reason = str(path), reason
        if stage:
            self.stage = stage
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # picklable across Ray processes
        return (type(self), (self.path, self.reason, self.stage))


class MissingFileError(DecodeError):
    stage = "open"


class EmptyVideoError(DecodeError):
    stage = "open"


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    codec: str
    decoder: str

    def to_dict(self) -> dict:
        return asdict(self)


def have_decord() -> bool:
    # PyAV first: decord bundles its own ffmpeg/libvpx, and loaded first it breaks PyAV's libvpx-vp9 encoder.
    import av  # noqa: F401

    try:
        import decord  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


def reduced_size(width: int, height: int, short_side: int | None) -> tuple[int, int] | None:
    """(w, h) with the short side = `short_side`, aspect kept; None if the video is not larger (never upscale
    in the decoder: the transforms do that)."""
    if not short_side or min(width, height) <= short_side:
        return None
    s = short_side / min(width, height)
    w, h = (short_side, max(1, round(height * s))) if width <= height else (max(1, round(width * s)), short_side)
    return int(w), int(h)


def _check_file(path: str) -> None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise MissingFileError(path, "file not found") from None
    except OSError as e:
        raise DecodeError(path, f"cannot read file: {e}", stage="open") from None
    if size == 0:
        raise EmptyVideoError(path, "empty file (0 bytes)")


def _header(path: str) -> tuple[int, int, int, float, float, str]:
    """(width, height, frames or 0, fps, duration_s, codec) from the container header (PyAV, no decoding)."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as c:
            if not c.streams.video:
                raise EmptyVideoError(path, "no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or s.base_rate or 0) or 25.0
            dur = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
            return s.width, s.height, int(s.frames or 0), fps, dur, s.codec_context.name
    except DecodeError:
        raise
    except Exception as e:  # av.error.InvalidDataError, OSError, ...
        raise DecodeError(path, f"unreadable container: {_short(e)}", stage="open") from None


_HEADERS: dict[tuple[str, int, int], tuple] = {}
HEADER_CACHE_SIZE = 65536  # ~200 bytes each: the headers of a K400-sized archive's share of one decode process


def _header_cached(path: str) -> tuple[int, int, int, float, float, str]:
    """`_header`, remembered per (path, size, mtime): every epoch decodes the same files again, and opening the
    container with PyAV only for its size costs ~10 % of decoding a small clip."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    header = _HEADERS.get(key)
    if header is None:
        header = _header(path)
        if len(_HEADERS) >= HEADER_CACHE_SIZE:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[key] = header
    return header


def _short(e: BaseException) -> str:
    """One line, without the file name PyAV appends (the errors table has the path already)."""
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    fn = getattr(e, "filename", None)
    if fn:
        text = text.replace(f": '{fn}'", "").replace(f": {fn!r}", "")
    return f"{type(e).__name__}: {text[:300]}"


# --------------------------------------------------------------------------------------------------------- decord


def _read_decord(path: str, index_fn: IndexFn, short_side: int | None,
                 header: tuple | None) -> tuple[np.ndarray, VideoInfo]:
    import decord

    w0, h0, _, _, _, codec = header if header is not None else _header_cached(path)
    size = reduced_size(w0, h0, short_side)
    kw = {"width": size[0], "height": size[1]} if size else {}
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **kw)
    except Exception as e:
        raise DecodeError(path, f"decord could not open: {_short(e)}", stage="open") from None
    try:
        n = len(vr)
        if n <= 0:
            raise EmptyVideoError(path, "no frames")
        fps = float(vr.get_avg_fps() or 0) or 25.0
        idx = np.asarray(index_fn(n, fps), dtype=np.int64)
        uniq, inv = np.unique(idx, return_inverse=True)
        if uniq.size and (uniq[0] < 0 or uniq[-1] >= n):
            raise ValueError(f"frame indices {uniq[0]}..{uniq[-1]} outside 0..{n - 1}")
        try:
            frames = vr.get_batch(uniq.tolist()).asnumpy()
        except Exception as e:
            raise DecodeError(path, f"decord could not decode frames: {_short(e)}") from None
        h, w = frames.shape[1:3]
        info = VideoInfo(n, fps, w0, h0, n / fps, codec, "decord")
    finally:
        # Drop the reader now: it holds the packet index and decoder buffers (decord's known memory growth).
        # (A `vr.seek(0)` before this, sometimes advised, costs a keyframe decode and frees nothing more.)
        del vr
    out = frames[inv.reshape(-1)].reshape(*idx.shape, h, w, 3)
    return out, info


# ----------------------------------------------------------------------------------------------------------- PyAV


def open_pyav(path: str):
    """(container, first video stream) of `path` with PyAV, the stream decoded on one thread (frame threading is
    slower on 2 cores; we parallelise across processes). DecodeError (stage open) or EmptyVideoError otherwise; the
    caller closes the container (`with container:`)."""
    import av

    try:
        c = av.open(path, metadata_errors="ignore")
    except Exception as e:
        raise DecodeError(path, f"unreadable container: {_short(e)}", stage="open") from None
    if not c.streams.video:
        c.close()
        raise EmptyVideoError(path, "no video stream")
    s = c.streams.video[0]
    s.thread_type = "NONE"
    return c, s


def _read_pyav(path: str, index_fn: IndexFn, short_side: int | None) -> tuple[np.ndarray, VideoInfo]:
    c, s = open_pyav(path)
    with c:
        fps = float(s.average_rate or s.guessed_rate or s.base_rate or 0) or 25.0
        w0, h0, codec = s.width, s.height, s.codec_context.name
        n = int(s.frames or 0)
        exact = n > 0
        if n <= 0:  # webm/mkv headers do not store a frame count: count packets (demux only, no decoding)
            try:
                n = sum(1 for p in c.demux(s) if p.size)
                c.seek(0, stream=s)
            except Exception as e:
                raise DecodeError(path, f"unreadable packets: {_short(e)}") from None
        if n <= 0:
            raise EmptyVideoError(path, "no frames")
        idx = np.asarray(index_fn(n, fps), dtype=np.int64)
        uniq, inv = np.unique(idx, return_inverse=True)
        if uniq.size and (uniq[0] < 0 or uniq[-1] >= n):
            raise ValueError(f"frame indices {uniq[0]}..{uniq[-1]} outside 0..{n - 1}")
        size = reduced_size(w0, h0, short_side)
        # AREA: antialiased and fast; PyAV's default scaler (bicubic, rebuilt per frame) is 4-6x slower here.
        kw = {"width": size[0], "height": size[1], "interpolation": "AREA"} if size else {}
        want = {int(i): k for k, i in enumerate(uniq)}
        got: list[np.ndarray | None] = [None] * len(uniq)
        last = int(uniq[-1]) if uniq.size else -1
        decoded = _decode_forward(c, s, path, want, got, last, fps, kw)
    missing = [i for i, g in zip(uniq.tolist(), got, strict=True) if g is None]
    if missing:
        # Header frame counts can be off by a frame or two; a tail that is really absent is tolerated if small.
        tail_ok = decoded > 0 and min(missing) >= decoded and decoded >= 0.9 * n and exact
        if not tail_ok:
            raise DecodeError(path, f"decoded {decoded} of {n} frames; frames {missing[:4]} are unreadable "
                              "(truncated or corrupt file)")
        fill = next(g for g in reversed(got) if g is not None)
        got = [g if g is not None else fill for g in got]
    frames = np.stack(got) if got else np.zeros((0, h0, w0, 3), np.uint8)
    h, w = frames.shape[1:3] if got else (h0, w0)
    info = VideoInfo(n, fps, w0, h0, n / fps, codec, "pyav")
    return frames[inv.reshape(-1)].reshape(*idx.shape, h, w, 3), info


def _decode_forward(c, s, path: str, want: dict[int, int], got: list, last: int, fps: float, kw: dict) -> int:
    """Fills `got` with the wanted frames; returns how many frames were seen (the index after the last one)."""
    first = min(want) if want else 0
    i = 0
    use_pts = False
    if first >= SEEK_MIN_FRAMES and s.time_base:
        # Seek to the keyframe at or before the first wanted frame; number frames from their timestamps.
        start = s.start_time or 0
        target = start + int(first / fps / s.time_base)
        try:
            c.seek(target, stream=s, backward=True, any_frame=False)
            use_pts = True
        except Exception:
            c.seek(0, stream=s)
    try:
        for frame in c.decode(s):
            if use_pts:
                if frame.pts is None:
                    raise _Restart
                i = int(round((frame.pts - (s.start_time or 0)) * s.time_base * fps))
                if i > first and not any(g is not None for g in got):
                    raise _Restart  # the seek overshot: decode from the start instead
            if i in want:
                got[want[i]] = frame.to_ndarray(format="rgb24", **kw)
            i += 1
            if i > last:
                break
    except _Restart:
        c.seek(0, stream=s)
        return _decode_forward_plain(c, s, want, got, last, kw)
    except Exception as e:
        if not any(g is not None for g in got):
            raise DecodeError(path, f"pyav could not decode: {_short(e)}") from None
        log.debug("%s: decoding stopped at frame %d: %s", path, i, e)
    return i


class _Restart(Exception):
    pass


def _decode_forward_plain(c, s, want: dict[int, int], got: list, last: int, kw: dict) -> int:
    i = 0
    for frame in c.decode(s):
        if i in want:
            got[want[i]] = frame.to_ndarray(format="rgb24", **kw)
        i += 1
        if i > last:
            break
    return i


# ------------------------------------------------------------------------------------------------------- public


def read_frames(path: str | os.PathLike, index_fn: IndexFn, *, decoder: str = "auto",
                short_side: int | None = None) -> tuple[np.ndarray, VideoInfo]:
    """Decodes the frames `index_fn(num_frames, fps)` asks for: uint8 RGB `(*idx.shape, H, W, 3)`, and the
    video's info. `short_side`: decode straight to that short side when the video is larger (aspect kept).
    `decoder`: "auto" (decord, then PyAV if decord fails), "decord" or "pyav"."""
    path = os.fspath(path)
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: expected one of {', '.join(DECODERS)}")
    _check_file(path)
    if decoder == "pyav" or (decoder == "auto" and not have_decord()):
        return _read_pyav(path, index_fn, short_side)
    header = _header_cached(path) if decoder == "auto" else None  # auto: an unreadable header fails fast
    try:
        return _read_decord(path, index_fn, short_side, header)
    except (EmptyVideoError, ValueError):
        raise
    except DecodeError as e:
        if decoder == "decord":
            raise
        try:
            return _read_pyav(path, index_fn, short_side)
        except DecodeError as e2:
            raise type(e2)(path, f"{e2.reason} (decord: {e.reason})", e2.stage) from None


def probe(path: str | os.PathLike, decoder: str = "auto") -> VideoInfo:
    """Frame count, fps, size, duration, codec of a video (decodes nothing beyond what the header needs)."""
    path = os.fspath(path)
    _check_file(path)
    w, h, n, fps, dur, codec = _header(path)
    if decoder != "pyav" and have_decord():
        import decord

        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=16, height=16)
            n, fps = len(vr), float(vr.get_avg_fps() or fps)
            del vr
            return VideoInfo(n, fps, w, h, n / fps if fps else dur, codec, "decord")
        except Exception as e:
            if decoder == "decord":
                raise DecodeError(path, f"decord could not open: {_short(e)}", stage="open") from None
    if n <= 0:
        import av

        try:
            with av.open(path, metadata_errors="ignore") as c:
                n = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
        except Exception as e:
            raise DecodeError(path, f"unreadable packets: {_short(e)}") from None
    if n <= 0:
        raise EmptyVideoError(path, "no frames")
    return VideoInfo(n, fps, w, h, dur or n / fps, codec, "pyav")


def decode_all(path: str | os.PathLike, *, decoder: str = "auto", short_side: int | None = None) -> np.ndarray:
    """Every frame, (N, H, W, 3) uint8 (tests and small videos only)."""
    frames, _ = read_frames(path, lambda n, fps: np.arange(n), decoder=decoder, short_side=short_side)
    return frames
