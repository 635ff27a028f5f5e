"""Synthetic video datasets in the official Kinetics-400 and Something-Something-v2 layouts.

Each video shows a cluttered, static background (a random texture plus static distractor shapes, new for every
video) and a few objects (3-5, same shape) that move together in a straight line, wrapping around the frame edges
(a torus), so their positions in any single frame are uniform. The class is the direction of motion (8 directions;
with more than 8 classes also the speed: slow / fast). Colours, shape, size and start positions are random per video
and the distractors look just like the movers, so neither a single frame nor the mean colour tells the class: a
model has to find the moving objects and see their displacement. They move several pixels per frame, so a 2-frame
tubelet already sees motion, and the objects are brighter than the background, so a tubelet's frame difference
shows the direction with a consistent sign.

`scene="clutter"` is a harder, more realistic task (benchmarks/learnability.py): one small object, textured like
its surroundings, moves over a natural-looking background (1/f texture with textured shapes) that pans in a random
direction, like a handheld camera; only the object's motion against the background tells the class.

Videos are real files: H.264 in .mp4 (libx264) for K400, VP9 in .webm (libvpx-vp9) for SSv2, written with short
GOPs (keyframe every `gop` frames) so random access stays cheap. `corrupt=N` adds N broken files (truncated,
zero-byte, garbage bytes, in turn) that are still listed in the annotations, as in real archives.

Everything is deterministic given the seed (each video has its own seeded generator, so parallel generation gives
the same bytes). Layouts written:

K400 (`layout="k400"`)::

    ROOT/annotations/{train,validate,test}.csv        label,youtube_id,time_start,time_end,split,is_cc
    ROOT/videos/{split}/{label}/{ytid}_{start:06d}_{end:06d}.mp4      (video_layout="tree", default)
    ROOT/videos/{ytid}_{start:06d}_{end:06d}.mp4                      (video_layout="flat")
    ROOT/lists/{split}.txt                             "relative/path label_index" per line
    ROOT/labels.json, ROOT/synth.json

SSv2 (`layout="ssv2"`)::

    ROOT/labels/something-something-v2-{labels,train,validation,test}.json
    ROOT/20bn-something-something-v2/{id}.webm
    ROOT/synth.json
"""

from __future__ import annotations

import json
import math
import os
import string
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

# (name, unit vector (dx, dy)) with image coordinates: y grows downwards.
DIRECTIONS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("left", (-1.0, 0.0)),
    ("right", (1.0, 0.0)),
    ("up", (0.0, -1.0)),
    ("down", (0.0, 1.0)),
    ("up-left", (-1.0, -1.0)),
    ("up-right", (1.0, -1.0)),
    ("down-left", (-1.0, 1.0)),
    ("down-right", (1.0, 1.0)),
)
SPEEDS = ("slowly", "quickly")
SHAPES = ("square", "disc", "diamond", "cross")
COLOUR_NAMES = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple")
CORRUPT_KINDS = ("truncated", "empty", "garbage")
K400_SPLITS = ("train", "validate", "test")
SSV2_SPLITS = ("train", "validation", "test")
MAX_CLASSES = len(DIRECTIONS) * len(SPEEDS)


@dataclass(frozen=True)
class SynthClass:
    index: int
    name: str  # K400-style name, e.g. "moving up-right" (spaces on purpose: exercises CSV quoting)
    template: str  # SSv2-style template, e.g. "Moving [something] up-right"
    direction: tuple[float, float]
    speed: float  # fraction of the base speed


def synth_classes(num_classes: int) -> list[SynthClass]:
    """The exact class list: up to 8 = motion directions; 9..16 = 8 directions x 2 speeds."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"classes={num_classes}: the synthetic task has 1..{MAX_CLASSES} classes "
                         f"(8 motion directions, x2 speeds above 8)")
    out = []
    if num_classes <= len(DIRECTIONS):
        for i, (d, v) in enumerate(DIRECTIONS[:num_classes]):
            out.append(SynthClass(i, f"moving {d}", f"Moving [something] {d}", v, 1.0))
    else:
        combos = [(d, v, s) for s in SPEEDS for d, v in DIRECTIONS][:num_classes]
        for i, (d, v, s) in enumerate(combos):
            speed = 0.5 if s == "slowly" else 1.0
            out.append(SynthClass(i, f"moving {d} {s}", f"Moving [something] {d} {s}", v, speed))
    return out


@dataclass
class SynthResult:
    root: str
    layout: str
    classes: list[str]
    counts: dict[str, int]  # videos per split (good + corrupt)
    corrupt: list[dict] = field(default_factory=list)  # {"path", "kind", "split"}
    videos: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A cluttered static texture around a dark-to-mid base colour: coarse blocks plus fine noise. Kept below the
    objects' brightness, so an object's motion shows up with one sign in a tubelet's frame difference."""
    cell = int(rng.integers(3, 7))
    base = rng.integers(50, 110, size=3).astype(np.int16)
    coarse = rng.integers(-30, 31, size=(h // cell + 2, w // cell + 2, 3), dtype=np.int16)
    bg = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)
    oy, ox = rng.integers(0, cell, size=2)
    bg = bg[oy : oy + h, ox : ox + w] + base
    bg += rng.integers(-8, 9, size=(h, w, 1), dtype=np.int16)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright colour (one channel at 255, the others 150-255): every object and distractor."""
    c = rng.integers(150, 256, size=3)
    c[rng.integers(0, 3)] = 255
    return c.astype(np.uint8)


def _shape_mask(shape: str, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    if shape == "square":
        return np.ones((s, s), bool)
    if shape == "disc":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2
    if shape == "diamond":
        return np.abs(yy - c) + np.abs(xx - c) <= s / 2
    # cross
    k = max(1, s // 6)
    return (np.abs(yy - c) <= k) | (np.abs(xx - c) <= k)


def _paste(frame: np.ndarray, mask: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    """Draws `mask` at (y, x) with wrap-around (torus), in place."""
    h, w = frame.shape[:2]
    s = mask.shape[0]
    rows = (y + np.arange(s)) % h
    cols = (x + np.arange(s)) % w
    region = frame[np.ix_(rows, cols)]
    region[mask] = colour
    frame[np.ix_(rows, cols)] = region


def render_video(
    rng: np.random.Generator, cls: SynthClass, *, width: int, height: int, frames: int
) -> tuple[np.ndarray, dict]:
    """(frames, H, W, 3) uint8 RGB and a description (shape, colour, velocity).

    Three to five objects move together in the class's direction (like things carried on a conveyor) over static
    look-alike distractors: same shapes, sizes and brightness, they never move. So a single frame, or the mean
    colour, says nothing about the class, and only the moving part of each frame matters."""
    h, w = height, width
    bg = _background(rng, h, w)
    size = max(4, int(round(min(h, w) * rng.uniform(0.16, 0.22))))
    for _ in range(int(rng.integers(2, 5))):  # static distractors
        m = _shape_mask(str(rng.choice(SHAPES)), size)
        _paste(bg, m, _bright_colour(rng), int(rng.integers(0, h)), int(rng.integers(0, w)))
    shape = str(rng.choice(SHAPES))
    mask = _shape_mask(shape, size)
    colour_i = int(rng.integers(0, len(COLOUR_NAMES)))
    movers = [(_bright_colour(rng), rng.uniform(0, w), rng.uniform(0, h)) for _ in range(int(rng.integers(3, 6)))]
    # Speed: about 8 % of the short side per frame (>= 3 px), per-video jitter +-20 %: a 2-frame tubelet sees it.
    base = max(3.0, 0.08 * min(h, w)) * cls.speed * rng.uniform(0.8, 1.2)
    dx, dy = cls.direction
    norm = math.hypot(dx, dy)
    vx, vy = base * dx / norm, base * dy / norm
    video = np.empty((frames, h, w, 3), np.uint8)
    for f in range(frames):
        video[f] = bg
        for colour, x0, y0 in movers:
            _paste(video[f], mask, colour, int(round(y0 + vy * f)) % h, int(round(x0 + vx * f)) % w)
    info = {"shape": shape, "object": f"{COLOUR_NAMES[colour_i]} {shape}s", "size": size, "movers": len(movers),
            "velocity": [round(vx, 3), round(vy, 3)]}
    return video, info


def _natural_texture(rng: np.random.Generator, h: int, w: int, slope: float | None = None) -> np.ndarray:
    """(h, w, 3) float32 in [0, 1]: coloured 1/f^slope noise, the amplitude spectrum of natural images (slope ~1-1.5),
    a luminance field plus weaker colour fields around a random mean colour."""
    slope = rng.uniform(1.0, 1.6) if slope is None else slope
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** slope  # (h, w//2+1)
    amp[0, 0] = 0.0

    def field() -> np.ndarray:
        spec = amp * np.exp(2j * np.pi * rng.random(amp.shape))
        f = np.fft.irfft2(spec, s=(h, w))
        return (f - f.mean()) / (f.std() + 1e-9)  # (h, w) zero mean, unit std

    lum = field()
    colour = np.stack([field() for _ in range(3)], -1)  # (h, w, 3)
    mean = rng.uniform(0.25, 0.75, size=3)
    contrast = rng.uniform(0.10, 0.18)
    tex = mean + contrast * (lum[..., None] + 0.35 * colour)
    return np.clip(tex, 0.0, 1.0).astype(np.float32)


def _clutter_canvas(rng: np.random.Generator, h: int, w: int, size: int) -> np.ndarray:
    """(h, w, 3) float32: a natural texture with textured, hard-edged shapes on it (edges and parts, like a real
    scene), some the size of the moving object, so neither texture nor shape alone gives the object away."""
    canvas = _natural_texture(rng, h, w)
    for _ in range(int(rng.integers(6, 12))):
        r = rng.uniform(0.5, 2.5) * size / 2
        a = r * rng.uniform(0.5, 2.0)  # half-width
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        y0, y1 = max(0, int(cy - r)), min(h, int(np.ceil(cy + r)) + 1)
        x0, x1 = max(0, int(cx - a)), min(w, int(np.ceil(cx + a)) + 1)
        if y1 - y0 < 2 or x1 - x0 < 2:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        if rng.random() < 0.5:  # ellipse
            m = ((yy - cy) / r) ** 2 + ((xx - cx) / a) ** 2 <= 1
        else:  # rectangle
            m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= a)
        patch = canvas[y0:y1, x0:x1]
        patch[m] = _natural_texture(rng, y1 - y0, x1 - x0)[m]  # its own texture, only as large as the shape
    return canvas


def render_clutter_video(
    rng: np.random.Generator, cls: SynthClass, *, width: int, height: int, frames: int
) -> tuple[np.ndarray, dict]:
    """(frames, H, W, 3) uint8 RGB and a description: the `scene="clutter"` task.

    One small textured object (10-20 % of the short side) moves in the class's direction over a cluttered,
    natural-looking background (1/f texture with textured shapes) that itself pans in a random direction (a
    moving camera). The object is drawn from the same kind of texture as the background, so only its motion
    against the background finds it; it stays inside the frame (no wrap-around), as in real footage."""
    h, w = height, width
    size = max(4, int(round(min(h, w) * rng.uniform(0.10, 0.20))))
    speed = max(2.0, 0.06 * min(h, w)) * cls.speed * rng.uniform(0.8, 1.2)  # px per frame
    dx, dy = cls.direction
    norm = math.hypot(dx, dy)
    vx, vy = speed * dx / norm, speed * dy / norm
    # Camera pan: any direction, up to half the object's speed; the canvas is large enough for the whole pan.
    pan_speed = rng.uniform(0.0, 0.5) * speed
    pan_angle = rng.uniform(0, 2 * math.pi)
    px, py = pan_speed * math.cos(pan_angle), pan_speed * math.sin(pan_angle)
    margin = int(math.ceil(pan_speed * (frames - 1))) + 1
    canvas = _clutter_canvas(rng, h + 2 * margin, w + 2 * margin, size)  # (H+2m, W+2m, 3)
    shape = str(rng.choice(SHAPES[:3]))  # square, disc, diamond: a compact object
    mask = _shape_mask(shape, size)
    obj = _natural_texture(rng, size, size)
    obj = np.clip(obj + rng.choice([-1, 1]) * rng.uniform(0.3, 0.45), 0, 1)  # clearly lighter or darker
    # Start so that the whole path stays inside the frame.
    travel_x, travel_y = vx * (frames - 1), vy * (frames - 1)
    x0 = rng.uniform(max(0.0, -travel_x), max(0.0, -travel_x) + max(0.0, w - size - abs(travel_x)))
    y0 = rng.uniform(max(0.0, -travel_y), max(0.0, -travel_y) + max(0.0, h - size - abs(travel_y)))
    video = np.empty((frames, h, w, 3), np.uint8)
    for f in range(frames):
        oy, ox = int(round(margin + py * f)), int(round(margin + px * f))
        frame = canvas[oy : oy + h, ox : ox + w].copy()
        y, x = int(round(y0 + vy * f)), int(round(x0 + vx * f))
        y, x = min(max(y, 0), h - size), min(max(x, 0), w - size)
        region = frame[y : y + size, x : x + size]
        region[mask] = obj[mask]
        video[f] = np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)
    info = {"shape": shape, "object": f"textured {shape}", "size": size, "movers": 1,
            "velocity": [round(vx, 3), round(vy, 3)], "pan": [round(px, 3), round(py, 3)]}
    return video, info


SCENES: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {"objects": render_video, "clutter": render_clutter_video}


def encode_video(path: str, video: np.ndarray, *, fps: int, codec: str, gop: int) -> None:
    """Writes (T, H, W, 3) uint8 RGB with PyAV: codec 'h264' (-> libx264, .mp4) or 'vp9' (-> libvpx-vp9, .webm)."""
    if codec == "vp9" and _vpx_clash():
        return _in_fresh_python("encode", {"path": path, "fps": fps, "codec": codec, "gop": gop}, video)
    _encode(path, video, fps=fps, codec=codec, gop=gop)


def _vpx_clash() -> bool:
    """decord bundles its own ffmpeg/libvpx; once it is loaded (and has decoded), PyAV's libvpx-vp9 encoder can
    fail in this process ("avcodec_open2(libvpx-vp9) returned 22"). Then VP9 is encoded in a fresh interpreter."""
    return "decord" in sys.modules


def _in_fresh_python(what: str, kwargs: dict, video: np.ndarray | None = None):
    """Runs encode/generate in a new interpreter that imports nothing but this module (no decord)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if video is not None:
            np.save(Path(tmp) / "v.npy", video)
        code = ("import json, sys, numpy as np; from pipeline import synth; a = json.loads(sys.argv[1]); "
                "synth._encode(a.pop('path'), np.load(sys.argv[2]), **a) if sys.argv[3] == 'encode' "
                "else synth.generate(**a)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                             os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-c", code, json.dumps(kwargs), str(Path(tmp) / "v.npy"), what],
                       check=True, env=env)


def _encode(path: str, video: np.ndarray, *, fps: int, codec: str, gop: int) -> None:
    import av

    t, h, w, _ = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"video size {w}x{h}: width and height must be even for yuv420p")
    tmp = path + ".part"
    fmt = "mp4" if codec == "h264" else "webm"
    with av.open(tmp, "w", format=fmt) as c:
        if codec == "h264":
            opts = {"preset": "ultrafast", "crf": "18",
                    "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
            s = c.add_stream("libx264", rate=fps, options=opts)
        else:
            opts = {"deadline": "realtime", "cpu-used": "8", "g": str(gop), "crf": "20", "b": "0",
                    "lag-in-frames": "0", "row-mt": "1"}
            s = c.add_stream("libvpx-vp9", rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.thread_type = "NONE"
        s.codec_context.thread_count = 1
        for frame in video:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    os.replace(tmp, path)


def _corrupt_bytes(kind: str, rng: np.random.Generator, good: bytes) -> bytes:
    if kind == "empty":
        return b""
    if kind == "garbage":
        return rng.integers(0, 256, size=int(rng.integers(512, 8192)), dtype=np.uint8).tobytes()
    # truncated: keep the container header and at most part of the first keyframe, like an interrupted
    # download of a 0-9 KB Kinetics file. Cutting later can leave a playable shorter video, which is not corrupt.
    keep = int(len(good) * rng.uniform(0.02, 0.08))
    return good[: max(keep, 48)]


# -------------------------------------------------------------------------------------------------- job planning


@dataclass
class _Job:
    index: int
    path: str
    cls: int
    split: str
    corrupt: str  # "" = a good video
    seed: tuple[int, ...]


def _work(args: tuple) -> tuple[int, dict]:
    job, classes, width, height, frames, fps, codec, gop, scene = args
    rng = np.random.default_rng(list(job.seed))
    video, info = SCENES[scene](rng, classes[job.cls], width=width, height=height, frames=frames)
    if job.corrupt:
        tmp = job.path + ".good"
        _encode(tmp, video, fps=fps, codec=codec, gop=gop)
        good = Path(tmp).read_bytes()
        os.remove(tmp)
        Path(job.path).write_bytes(_corrupt_bytes(job.corrupt, rng, good))
    else:
        _encode(job.path, video, fps=fps, codec=codec, gop=gop)
    return job.index, info


def _youtube_id(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"  # real ids contain '-' and '_' (and start with them)
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=11))


def _split_counts(videos_per_class: int, val_per_class: int | None, test_per_class: int | None) -> tuple[int, ...]:
    if val_per_class is None:
        val_per_class = max(1, round(videos_per_class * 0.2)) if videos_per_class >= 3 else 0
    if test_per_class is None:
        test_per_class = max(1, round(videos_per_class * 0.1)) if videos_per_class >= 5 else 0
    return videos_per_class, val_per_class, test_per_class


def generate(
    out: str | os.PathLike,
    layout: str = "k400",
    *,
    classes: int = 8,
    videos_per_class: int = 20,
    val_videos_per_class: int | None = None,
    test_videos_per_class: int | None = None,
    corrupt: int = 0,
    width: int = 128,
    height: int = 96,
    frames: int = 16,
    fps: int = 8,
    gop: int = 8,
    seed: int = 0,
    video_layout: str = "tree",
    scene: str = "objects",
    workers: int | None = None,
    progress: bool | Callable = True,
) -> SynthResult:
    """Writes a synthetic dataset under `out` and returns a summary (also saved as `out/synth.json`).

    `videos_per_class` is the number of TRAINING videos per class; validation/test default to ~20 %/10 % of it
    (`val_videos_per_class`/`test_videos_per_class` override). `corrupt` broken files are added to the training
    split (truncated / zero-byte / garbage, in turn) and listed in the annotations like the good ones.
    `video_layout` (K400 only): "tree" = videos/{split}/{label}/, "flat" = videos/ directly.
    `scene`: "objects" (the demo's bright movers over static look-alikes, `render_video`) or "clutter" (one small
    textured object over a panning natural-looking background, `render_clutter_video`).
    """
    import time

    if layout == "ssv2" and _vpx_clash():
        kwargs = {k: v for k, v in locals().items() if k not in ("progress", "time")}
        kwargs["out"] = str(kwargs["out"])
        _in_fresh_python("generate", {**kwargs, "progress": False})
        meta = json.loads((Path(out).expanduser().resolve() / "synth.json").read_text())
        return SynthResult(**{k: meta[k] for k in ("root", "layout", "classes", "counts", "corrupt", "videos",
                                                   "seconds")})
    t0 = time.perf_counter()
    if layout not in ("k400", "ssv2"):
        raise ValueError(f"layout={layout!r}: expected 'k400' or 'ssv2'")
    if scene not in SCENES:
        raise ValueError(f"scene={scene!r}: expected one of {', '.join(SCENES)}")
    if video_layout not in ("tree", "flat"):
        raise ValueError(f"video_layout={video_layout!r}: expected 'tree' or 'flat'")
    if width % 2 or height % 2 or width < 16 or height < 16:
        raise ValueError(f"size {width}x{height}: width and height must be even and >= 16")
    if frames < 2:
        raise ValueError(f"frames={frames}: need at least 2 frames to show motion")
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    cls_list = synth_classes(classes)
    splits = K400_SPLITS if layout == "k400" else SSV2_SPLITS
    per_split = dict(zip(splits, _split_counts(videos_per_class, val_videos_per_class, test_videos_per_class),
                         strict=True))
    master = np.random.default_rng(seed)
    codec, ext = ("h264", "mp4") if layout == "k400" else ("vp9", "webm")
    video_dir = root / ("videos" if layout == "k400" else "20bn-something-something-v2")

    # Plan every video first (names, labels, splits), from one seeded stream: deterministic and parallel-safe.
    jobs: list[_Job] = []
    records: list[dict] = []
    used_ids: set[str] = set()
    next_ssv2_id = int(master.integers(1000, 5000))

    def add(split: str, c: int, kind: str) -> None:
        nonlocal next_ssv2_id
        i = len(jobs)
        if layout == "k400":
            while (yid := _youtube_id(master)) in used_ids:
                pass
            used_ids.add(yid)
            start = int(master.integers(0, 300))
            end = start + max(1, math.ceil(frames / fps))
            name = f"{yid}_{start:06d}_{end:06d}.{ext}"
            sub = video_dir / split / cls_list[c].name if video_layout == "tree" else video_dir
            path = sub / name
            rec = {"label": cls_list[c].name, "youtube_id": yid, "time_start": start, "time_end": end,
                   "split": split, "is_cc": int(master.integers(0, 2))}
        else:
            vid = str(next_ssv2_id)
            next_ssv2_id += int(master.integers(1, 40))
            path = video_dir / f"{vid}.{ext}"
            rec = {"id": vid}
        rec["_path"], rec["_class"], rec["_split"] = str(path), c, split
        records.append(rec)
        jobs.append(_Job(i, str(path), c, split, kind, (seed, i, 7919)))

    for split in splits:
        for c in range(classes):
            for _ in range(per_split[split]):
                add(split, c, "")
    for k in range(corrupt):
        add(splits[0], int(master.integers(0, classes)), CORRUPT_KINDS[k % len(CORRUPT_KINDS)])
    for j in jobs:
        Path(j.path).parent.mkdir(parents=True, exist_ok=True)

    # Render + encode, in parallel processes (each job seeds its own generator: same bytes for any worker count).
    workers = workers or min(len(jobs), os.cpu_count() or 1, 8) or 1
    args = [(j, cls_list, width, height, frames, fps, codec, gop, scene) for j in jobs]
    infos: dict[int, dict] = {}
    bar = _progress(progress, total=len(jobs), desc=f"synth {layout}")
    if (workers > 1 and len(jobs) > 8):
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as ex:
            for i, info in ex.map(_work, args, chunksize=4):
                infos[i] = info
                bar.update(1)
    else:
        for a in args:
            i, info = _work(a)
            infos[i] = info
            bar.update(1)
    bar.close()

    # Annotation files.
    if layout == "k400":
        _write_k400_annotations(root, records, cls_list, video_dir, splits)
    else:
        _write_ssv2_annotations(root, records, infos, cls_list, splits)
    # The label map a manifest of this dataset will use: sorted names (K400), the JSON's own indices (SSv2).
    if layout == "k400":
        labels = sorted(c.name for c in cls_list)
    else:
        labels = [c.template.replace("[", "").replace("]", "") for c in cls_list]
    from pipeline.manifest import write_labels

    write_labels(root / "labels.json", labels)
    result = SynthResult(
        root=str(root), layout=layout, classes=[c.name for c in cls_list],
        counts={s: sum(1 for r in records if r["_split"] == s) for s in splits},
        corrupt=[{"path": j.path, "kind": j.corrupt, "split": j.split} for j in jobs if j.corrupt],
        videos=len(jobs), seconds=round(time.perf_counter() - t0, 2),
    )
    meta = {**result.to_json(), "params": {"classes": classes, "videos_per_class": videos_per_class,
            "width": width, "height": height, "frames": frames, "fps": fps, "gop": gop, "seed": seed,
            "video_layout": video_layout, "corrupt": corrupt, "scene": scene}}
    (root / "synth.json").write_text(json.dumps(meta, indent=1))
    return result


def _write_k400_annotations(root: Path, records: list[dict], cls_list: list[SynthClass], video_dir: Path,
                            splits: tuple[str, ...]) -> None:
    ann = root / "annotations"
    ann.mkdir(exist_ok=True)
    cols = ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"]
    for split in splits:
        # Official files quote labels that contain spaces ("moving up-right"); csv.writer cannot quote one
        # column selectively, so rows are written by hand (every other field is plain).
        with open(ann / f"{split}.csv", "w", newline="") as f:
            f.write(",".join(cols) + "\n")
            for r in records:
                if r["_split"] == split:
                    f.write(",".join([_quote(r["label"])] + [str(r[c]) for c in cols[1:]]) + "\n")
    # "path label_index" list files, relative to the videos dir; label index = the sorted-name label map.
    sorted_names = sorted(c.name for c in cls_list)
    lists = root / "lists"
    lists.mkdir(exist_ok=True)
    for split in splits:
        with open(lists / f"{split}.txt", "w") as f:
            for r in records:
                if r["_split"] == split:
                    rel = os.path.relpath(r["_path"], video_dir)
                    f.write(f"{rel} {sorted_names.index(r['label'])}\n")


def _quote(label: str) -> str:
    if any(ch in label for ch in ' ,"'):
        return '"' + label.replace('"', '""') + '"'
    return label


def _write_ssv2_annotations(root: Path, records: list[dict], infos: dict[int, dict], cls_list: list[SynthClass],
                            splits: tuple[str, ...]) -> None:
    ann = root / "labels"
    ann.mkdir(exist_ok=True)
    labels = {c.template.replace("[", "").replace("]", ""): str(c.index) for c in cls_list}
    (ann / "something-something-v2-labels.json").write_text(json.dumps(labels, indent=1))
    for split in splits:
        items = []
        for i, r in enumerate(records):
            if r["_split"] != split:
                continue
            if split == "test":
                items.append({"id": r["id"]})
                continue
            c = cls_list[r["_class"]]
            obj = infos[i]["object"]
            items.append({"id": r["id"], "label": c.template.replace("[something]", obj),
                          "template": c.template, "placeholders": [obj]})
        (ann / f"something-something-v2-{split}.json").write_text(json.dumps(items, indent=1))


def _progress(progress: bool | Callable, total: int, desc: str):
    if callable(progress):
        return progress(total=total, desc=desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="video", disable=not progress, leave=False)
