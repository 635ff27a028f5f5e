"""`mone data prepare SRC --out DST`: re-encode a raw video archive into a training-ready copy, on Ray, resumably.

    mone data prepare /data/kinetics400 --out /data/k400_256 --short-side 256
    mone submit prepare --follow -- /mnt/data/kinetics400 --out /mnt/data/k400_256 --short-side 256

Why: on a 720p source, decoding one 16-frame clip costs ~400 ms whatever short side the decoder is asked for; at a
short side of 256 with short keyframe intervals it costs ~80 ms. A GPU node cannot be fed from the raw archive.

Data flow: SRC's manifest (pipeline.manifest: K400 CSVs, SSv2 JSON, list files, class folders) -> one row per video
file -> a Ray Data `map` task per video (spread over every node; each decodes, resizes and encodes one file with
pipeline.reencode and writes it straight to DST) -> the driver, which counts, shows progress and, at the end,
writes the annotation files (pipeline.annotations) and the errors table.

DST mirrors SRC: the same relative paths, every video as .mp4 (H.264 yuv420p; SSv2's {id}.webm becomes {id}.mp4,
which the SSv2 reader finds by id), the dataset's own annotation files with the rows of videos that could not be
read (or were missing) left out, and list files pointing at the new names. So DST is a drop-in `data.root`.
Also in DST: `prepare.json` (the settings; a re-run with other settings is refused) and `prepare_errors.parquet`
(path, stage, error: unreadable sources, and files the annotations list but SRC lacks).

Nothing is lost: each video is written to a temporary name and renamed; a re-run skips the videos already in DST
and retries the failed ones; encoding is deterministic, so an interrupted run that is run again ends with the same
DST as an uninterrupted one. A video whose worker process dies (a native crash) is tried twice per run, then
recorded as an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLAN_FILE = "prepare.json"
ERRORS_FILE = "prepare_errors.parquet"
ATTEMPTS_SUFFIX = ".prepare-attempts"
MAX_ATTEMPTS = 2  # worker deaths on one video, per run, before it is recorded as an error
MAX_BLOCKS = 100_000  # beyond this many videos, a task handles several (one Ray Data block each)
DEFAULT_MAX_ERROR_FRACTION = 0.05
# Tests only: seconds each task waits between writing its temporary file and renaming it (an interrupted run then
# leaves temporary files behind), and a path marker that makes the worker process abort (a native crash).
THROTTLE_ENV = "MONE_PREPARE_THROTTLE_S"
CRASH_ENV = "MONE_TEST_CRASH_MARKER"
CRASH_ERROR = "CrashError: the worker process died while preparing this video ({n} times); skipped"
MISSING_ERROR = "MissingFileError: listed in the annotations, not on disk"


class PrepareError(ValueError):
    """Bad input to `mone data prepare`: the one-line message names the input and the fix."""


class TooManyFailures(RuntimeError):
    """More videos failed than --max-error-fraction allows; the message names the worst files. `summary`: what the
    CLI prints as its JSON line."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Video:
    src: str  # absolute path in SRC
    dst: str  # absolute path in DST (.mp4)


# ============================================================================================ planning (driver)


def check_arguments(src: str | os.PathLike, out: str | os.PathLike, settings, layout: str,
                    max_error_fraction: float) -> tuple[Path, Path]:
    """The (SRC, DST) roots, or a PrepareError naming the first bad argument. Nothing is read beyond SRC's root."""
    from pipeline.manifest import LAYOUTS

    problems = settings.problems()
    if problems:
        raise PrepareError(problems[0])
    if layout not in LAYOUTS:
        raise PrepareError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if not 0 <= max_error_fraction <= 1:
        raise PrepareError(f"--max-error-fraction {max_error_fraction:g}: must be in [0, 1] (e.g. 0.05)")
    src_root = Path(src).expanduser()
    if not src_root.is_dir():
        raise PrepareError(f"SRC {src}: no such folder (give the dataset root: the folder with the annotation files "
                           "and the videos)")
    src_root = src_root.resolve()
    dst_root = Path(out).expanduser().resolve()
    if dst_root == src_root:
        raise PrepareError(f"--out {out}: is SRC itself; give a new folder, e.g. {src_root}_{settings.short_side}")
    if src_root in dst_root.parents:
        raise PrepareError(f"--out {out}: is inside SRC {src_root}, so it would become part of the dataset; "
                           f"put it beside SRC, e.g. {src_root}_{settings.short_side}")
    if dst_root in src_root.parents:
        raise PrepareError(f"--out {out}: SRC {src_root} is inside it; give a folder outside SRC, e.g. "
                           f"{src_root}_{settings.short_side}")
    if dst_root.exists() and not dst_root.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a folder")
    return src_root, dst_root


def mirror_paths(paths: list[str], src_root: Path, dst_root: Path) -> list[Video]:
    """SRC video -> DST path: the same relative path with the .mp4 extension. Refuses videos outside SRC (a list
    file may point there) and two sources that would land on one file (a.webm and a.mp4 in one folder)."""
    from pipeline.reencode import OUTPUT_EXT

    videos, seen = [], {}
    for p in sorted(set(paths)):
        try:
            rel = Path(p).relative_to(src_root)
        except ValueError:
            raise PrepareError(f"video {p} lies outside SRC {src_root}; DST mirrors SRC's tree, so give the folder "
                               "that holds both the annotation files and the videos") from None
        dst = str((dst_root / rel).with_suffix(OUTPUT_EXT))
        if dst in seen:
            raise PrepareError(f"{seen[dst]} and {p} would both become {dst}; keep one of them (rename or remove "
                               "the other) and run again")
        seen[dst] = p
        videos.append(Video(p, dst))
    return videos


def existing_outputs(dst_root: Path) -> dict[str, int]:
    """Every finished output under DST (path -> bytes). Temporary files have another suffix and are not listed."""
    from pipeline.reencode import OUTPUT_EXT

    out: dict[str, int] = {}
    if not dst_root.is_dir():
        return out
    stack = [str(dst_root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith("."):
                        stack.append(e.path)
                elif e.name.endswith(OUTPUT_EXT):
                    out[e.path] = e.stat().st_size
    return out


def sweep_leftovers(dst_root: Path) -> int:
    """Removes temporary files and attempt markers that interrupted tasks left behind; returns how many."""
    from pipeline.reencode import TMP_SUFFIX

    n = 0
    for dirpath, dirnames, filenames in os.walk(dst_root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.endswith((TMP_SUFFIX, ATTEMPTS_SUFFIX)):
                try:
                    os.remove(os.path.join(dirpath, fn))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def check_plan_file(dst_root: Path, record: dict, *, write: bool) -> None:
    """DST/prepare.json holds the settings DST was made with: a re-run with other settings would mix two kinds
    of video in one archive, so it is refused."""
    path = dst_root / PLAN_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        diff = [f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}" for k, v in record["settings"].items()
                if old.get("settings", {}).get(k) != v]
        if old.get("layout") != record["layout"]:
            diff.append(f"layout: {old.get('layout')!r} -> {record['layout']!r}")
        if diff:
            raise PrepareError(f"--out {dst_root} was prepared with other settings ({'; '.join(diff)}); give another "
                               "--out, or delete it to start over")
        return
    if dst_root.is_dir() and any(dst_root.iterdir()):
        raise PrepareError(f"--out {dst_root} is not empty and was not made by `mone data prepare` (no {PLAN_FILE}); "
                           "give a new or empty folder")
    if write:
        from pipeline.annotations import write_atomic

        dst_root.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


# ============================================================================================ one video (Ray task)


def _result(video: dict, status: str, **kw) -> dict[str, Any]:
    row = {"src": video["src"], "dst": video["dst"], "status": status, "action": "", "reason": "", "why": "",
           "stage": "", "error": "", "src_size": "", "dst_size": "", "frames_in": 0, "frames_out": 0,
           "bytes_in": 0, "bytes_out": 0, "seconds": 0.0}
    row.update(kw)
    return row


class _Attempts:
    """Counts, in a marker file beside the output (visible from every node), how often this run started on a
    video. Ray re-runs a task whose worker died; after MAX_ATTEMPTS starts the video is recorded as an error
    instead of crashing the worker again (Ray Data retries dead tasks forever). Removed when the task ends."""

    def __init__(self, path: str, run_id: str):
        self.path, self.run_id = path, run_id

    def start(self) -> int:
        """Records a start; returns how many earlier starts of this run died."""
        try:
            earlier = Path(self.path).read_text().split().count(self.run_id)
        except OSError:
            earlier = 0
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(self.run_id + "\n")
        except OSError:  # a read-only folder fails the write itself, with a clearer error
            pass
        return earlier

    def done(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.path)


def _attempts_path(dst: str, src: str, run_id: str, dry_run: bool) -> str:
    """Beside the output (shared storage: seen by a retry on any node); --dry-run writes nothing to DST, so its
    markers go to the node's temp folder (a best effort: a retry on another node does not see them)."""
    if not dry_run:
        return dst + ATTEMPTS_SUFFIX
    import tempfile
    import zlib

    return os.path.join(tempfile.gettempdir(), f"mone-prepare-{run_id}-{zlib.crc32(src.encode()):08x}{ATTEMPTS_SUFFIX}")


def prepare_row(video: dict, *, settings: dict, run_id: str, dry_run: bool = False, throttle_s: float = 0.0,
                crash_marker: str = "") -> dict[str, Any]:
    """Ray Data map function: one video -> one result row (never raises for a bad video)."""
    from pipeline.decode import DecodeError
    from pipeline.reencode import EncodeSettings, needs_keyframe_check, plan_video, prepare_video, probe_source

    s = EncodeSettings(**settings)
    src, dst = video["src"], video["dst"]
    t0 = time.perf_counter()
    attempts = None
    try:
        if not dry_run and os.path.exists(dst):  # an earlier attempt of this task (several videos per block) did it
            return _result(video, "skipped", bytes_in=os.path.getsize(src), bytes_out=os.path.getsize(dst))
        # Before anything opens the file: a native crash can happen as early as reading its header.
        attempts = _Attempts(_attempts_path(dst, src, run_id, dry_run), run_id)
        died = attempts.start()
        if died >= MAX_ATTEMPTS:
            return _result(video, "failed", stage="crash", error=CRASH_ERROR.format(n=died))
        if crash_marker and crash_marker in src:
            os.abort()
        info = probe_source(src)
        if needs_keyframe_check(info, s):
            info = probe_source(src, keyframes=True)
        plan = plan_video(src, info, s)
        if dry_run:
            return _result(video, "planned", action=plan.action, reason=plan.reason, why=",".join(plan.why),
                           src_size=f"{info.width}x{info.height}", dst_size=f"{plan.width}x{plan.height}",
                           bytes_in=os.path.getsize(src), seconds=time.perf_counter() - t0)

        def pause(tmp: str) -> None:
            time.sleep(throttle_s)

        r = prepare_video(src, dst, s, plan=plan, info=info, before_commit=pause if throttle_s else None)
        out = _result(video, "written", action=r.action, reason=r.reason, src_size=r.src_size,
                      dst_size=r.dst_size, frames_in=r.frames_in, frames_out=r.frames_out, bytes_in=r.bytes_in,
                      bytes_out=r.bytes_out, why=",".join(plan.why) if r.action == "encode" else "")
    except DecodeError as e:
        out = _result(video, "failed", stage=e.stage, error=f"{type(e).__name__}: {e.reason}")
    except Exception as e:  # noqa: BLE001 - one bad video never stops the job
        out = _result(video, "failed", stage="encode", error=f"{type(e).__name__}: {e}"[:500])
    finally:
        if attempts is not None:
            attempts.done()
    out["seconds"] = time.perf_counter() - t0
    return out


# ============================================================================================ decode speed


def clip_indices(n: int, position: float, num_frames: int = 16, stride: int = 2):
    """`num_frames` frame indices `stride` apart, starting at `position` (0..1) of the room the video leaves."""
    import numpy as np

    span = (num_frames - 1) * stride + 1
    start = int(round(position * max(0, n - span)))
    return np.minimum(start + np.arange(num_frames) * stride, n - 1)


def decode_speed(pairs: list[tuple[str, str]], short_side: int, *, clips_per_video: int = 1, num_frames: int = 16,
                 stride: int = 2, decoder: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Times clip decoding with pipeline.decode.read_frames on (source, prepared) pairs: the same clip positions
    in both, asked for at `short_side` as training does, source and copy alternating clip by clip so both see
    the same machine load. Returns ms per clip (wall and process CPU) for each and their ratio."""
    import numpy as np

    from pipeline.decode import read_frames

    rng = np.random.default_rng(seed)
    wall = {"src": 0.0, "dst": 0.0}
    cpu = {"src": 0.0, "dst": 0.0}
    clips = 0
    for src, dst in pairs:
        for _ in range(clips_per_video):
            pos = float(rng.uniform()) if clips_per_video > 1 else 0.5
            def index_fn(n: int, fps: float, pos: float = pos):
                return clip_indices(n, pos, num_frames, stride)

            for key, path in (("src", src), ("dst", dst)):
                t, c = time.perf_counter(), time.process_time()
                read_frames(path, index_fn, decoder=decoder, short_side=short_side)
                wall[key] += time.perf_counter() - t
                cpu[key] += time.process_time() - c
            clips += 1
    if not clips:
        return {"clips": 0}
    return {
        "clips": clips,
        "decode_ms_per_clip_src": round(1000 * wall["src"] / clips, 2),
        "decode_ms_per_clip_dst": round(1000 * wall["dst"] / clips, 2),
        "decode_speedup": round(wall["src"] / max(wall["dst"], 1e-9), 2),
        "decode_cpu_speedup": round(cpu["src"] / max(cpu["dst"], 1e-9), 2),
    }


# ============================================================================================ the job


def _ray_init(address: str | None) -> None:
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)


def _stream(todo: list[Video], fn_kwargs: dict, *, cpus_per_video: float, concurrency: int | None,
            address: str | None):
    """Yields one result row per video as the tasks finish (any order)."""
    import logging

    import ray.data

    _ray_init(address)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own progress bar replaces Ray Data's chatter
    logging.getLogger("ray.data._internal.progress").addFilter(
        lambda record: "Progress bars disabled" not in record.getMessage())  # ours is on
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    items = [{"src": v.src, "dst": v.dst} for v in todo]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    ds = ds.map(prepare_row, fn_kwargs=fn_kwargs, num_cpus=cpus_per_video, concurrency=concurrency)
    yield from ds.iter_rows()


def run_prepare(src: str | os.PathLike, out: str | os.PathLike, *, short_side: int = 320, fps: float | None = None,
                gop: int = 16, crf: int = 23, preset: str = "veryfast", tune: str | None = "fastdecode",
                layout: str = "auto",
                max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION, dry_run: bool = False,
                cpus_per_video: float = 1.0, concurrency: int | None = None, speed_sample: int = 8,
                address: str | None = None, progress: bool = True, echo=print) -> dict[str, Any]:
    """Prepares SRC into `out`; returns the summary (the CLI prints it as its last line). Raises PrepareError
    for bad input (before any task starts) and TooManyFailures past --max-error-fraction."""
    from tqdm import tqdm

    from pipeline.manifest import ManifestError, build_manifest
    from pipeline.reencode import EncodeSettings

    t_start = time.perf_counter()
    tune = None if tune in (None, "", "none") else tune
    settings = EncodeSettings(short_side=short_side, fps=fps, gop=gop, crf=crf, preset=preset, tune=tune)
    src_root, dst_root = check_arguments(src, out, settings, layout, max_error_fraction)
    try:
        m = build_manifest(src_root, layout)
    except ManifestError as e:
        raise PrepareError(f"SRC {src}: {e}") from None
    if len(m) == 0:
        raise PrepareError(f"SRC {src}: the annotations list no video that is on disk ({len(m.missing)} missing)")
    videos = mirror_paths(m.table.column("path").to_pylist(), src_root, dst_root)
    record = {"settings": settings.to_json(), "layout": m.layout, "output": "H.264 yuv420p .mp4",
              "src": str(src_root)}
    check_plan_file(dst_root, record, write=not dry_run)
    done = existing_outputs(dst_root)
    todo = [v for v in videos if v.dst not in done]
    skipped = [v for v in videos if v.dst in done]
    echo(f"prepare: {len(videos)} videos ({m.layout}, {len(m.missing)} listed but missing) in {src_root}; "
         f"{len(skipped)} already in DST, {len(todo)} to {'plan' if dry_run else 'prepare'}; short side "
         f"{short_side}, fps {fps or 'kept'}, keyframe every {gop}, crf {crf} -> {dst_root}", file=sys.stderr)

    run_id = uuid.uuid4().hex[:12]
    throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)
    fn_kwargs = {"settings": settings.to_json(), "run_id": run_id, "dry_run": dry_run, "throttle_s": throttle,
                 "crash_marker": os.environ.get(CRASH_ENV, "")}
    tally = _Tally()
    budget = int(max_error_fraction * len(videos) + 1e-9)
    if todo:
        _ray_init(address)
    t_run = time.perf_counter()  # after Ray's start-up: videos/s and the ETA count the work alone
    if todo:
        bar = tqdm(total=len(todo), unit="video", desc="plan" if dry_run else "prepare", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
        try:
            for row in _stream(todo, fn_kwargs, cpus_per_video=cpus_per_video, concurrency=concurrency,
                               address=address):
                tally.add(row, keep_plan=dry_run)
                if row["status"] == "failed":
                    bar.set_postfix(failed=len(tally.failures), refresh=False)
                bar.update(1)
                if len(tally.failures) > budget and not dry_run:
                    break
        finally:
            bar.close()
    run_s = time.perf_counter() - t_run
    failures = tally.failures
    missing = [{"path": p, "stage": "open", "error": MISSING_ERROR} for p in m.missing]
    errors = sorted([{"path": r["src"], "stage": r["stage"], "error": r["error"]} for r in failures] + missing,
                    key=lambda e: e["path"])

    if dry_run:
        return _dry_run_summary(tally, videos, skipped, m, dst_root, settings, t_start, echo)

    if len(failures) > budget:
        _write_errors(errors, dst_root)
        sweep_leftovers(dst_root)
        from pipeline.dataset import ClipError, too_many_errors_message

        msg = too_many_errors_message([ClipError(r["src"], r["stage"], r["error"]) for r in failures], len(videos),
                                      max_error_fraction, where=" to prepare")
        raise TooManyFailures(msg.replace("max_error_fraction", "--max-error-fraction") +
                              f"\nFinished videos are kept in {dst_root}; the errors so far are in "
                              f"{dst_root / ERRORS_FILE}. Re-run the same command to continue.",
                              {"src": str(src_root), "out": str(dst_root), "error": "too many unreadable videos",
                               "videos": len(videos), "written": tally.written, "failed": len(failures),
                               "max_error_fraction": max_error_fraction, "errors_file": str(dst_root / ERRORS_FILE)})

    swept = sweep_leftovers(dst_root)
    final = existing_outputs(dst_root)
    kept = [v for v in videos if v.dst in final]
    ann = _write_annotations(m, src_root, dst_root, kept)
    errors_path = _write_errors(errors, dst_root)

    bytes_before = tally.bytes_in + sum(os.path.getsize(v.src) for v in skipped)
    bytes_after = sum(final[v.dst] for v in kept)
    sample = _speed_sample(kept, speed_sample)
    speed = decode_speed(sample, short_side) if sample else {"clips": 0}
    summary: dict[str, Any] = {
        "src": str(src_root), "out": str(dst_root), "layout": m.layout,
        "videos": len(videos), "written": tally.written, "skipped": len(skipped) + tally.skipped,
        "failed": len(failures), "missing": len(m.missing),
        "encoded": tally.actions.get("encode", 0), "remuxed": tally.actions.get("remux", 0),
        "copied": tally.actions.get("copy", 0), "encoded_because": dict(sorted(tally.why.items())),
        "bytes_before": bytes_before, "bytes_after": bytes_after,
        "size_ratio": round(bytes_after / bytes_before, 4) if bytes_before else None,
        "decode_sample": speed.get("clips", 0),
        "decode_ms_per_clip_src": speed.get("decode_ms_per_clip_src"),
        "decode_ms_per_clip_dst": speed.get("decode_ms_per_clip_dst"),
        "decode_speedup": speed.get("decode_speedup"),
        "annotations_rewritten": ann.rewritten, "annotation_rows_dropped": ann.dropped_rows,
        "files_not_copied": ann.skipped, "leftovers_removed": swept,
        "errors_file": str(errors_path), "settings": settings.to_json(),
        "seconds": round(time.perf_counter() - t_start, 2),
        "videos_per_s": round(tally.results / run_s, 3) if tally.results and run_s > 0 else None,
    }
    echo(format_summary(summary), file=sys.stderr)
    return summary


@dataclass
class _Tally:
    """What the driver keeps of the result rows: counts and sums, the failures (and, for --dry-run, each plan);
    never every row (an archive has up to ~10^6 videos)."""

    results: int = 0
    written: int = 0
    skipped: int = 0  # finished by an earlier attempt of the same block
    bytes_in: int = 0  # sources of the videos written or skipped here
    actions: Counter = field(default_factory=Counter)
    why: Counter = field(default_factory=Counter)
    failures: list[dict] = field(default_factory=list)
    plans: dict[str, tuple[str, str]] = field(default_factory=dict)  # src -> (action or "fail", why)

    def add(self, row: dict, keep_plan: bool) -> None:
        self.results += 1
        status = row["status"]
        if status == "failed":
            self.failures.append({k: row[k] for k in ("src", "stage", "error")})
        elif status in ("written", "skipped", "planned"):
            self.written += status == "written"
            self.skipped += status == "skipped"
            self.bytes_in += row["bytes_in"]
            if status != "skipped":
                self.actions[row["action"]] += 1
                self.why.update(w for w in row["why"].split(",") if w and row["action"] == "encode")
        if keep_plan:
            self.plans[row["src"]] = (("fail", f"{row['stage']}: {row['error']}") if status == "failed"
                                      else (row["action"], row["reason"]))


def _speed_sample(kept: list[Video], k: int) -> list[tuple[str, str]]:
    """Up to k (source, prepared) pairs, evenly spread over the sorted archive (whatever was done to them: the
    figure is the archive's, copies included)."""
    if k <= 0 or not kept:
        return []
    step = max(1, len(kept) // k)
    return [(v.src, v.dst) for v in kept[::step][:k]]


def _write_annotations(m, src_root: Path, dst_root: Path, kept: list[Video]):
    from pipeline.annotations import k400_key_of_row, write_annotations

    kept_src = {v.src for v in kept}
    rows = [r for r in m.table.select(["path", "video_id", "start_s", "end_s"]).to_pylist() if r["path"] in kept_src]
    return write_annotations(
        src_root, dst_root,
        kept_k400={k400_key_of_row(r) for r in rows} if m.layout == "k400" else set(),
        kept_ssv2={r["video_id"] for r in rows} if m.layout == "ssv2" else set(),
        renamed={str(Path(v.src).resolve()): os.path.basename(v.dst) for v in kept},
        exclude=(PLAN_FILE, ERRORS_FILE),
    )


def _write_errors(errors: list[dict], dst_root: Path) -> Path:
    """prepare_errors.parquet (path, stage, error), sorted by path; written every run (empty when all is well)."""
    import tempfile

    import pyarrow.parquet as pq

    from pipeline.annotations import write_atomic
    from pipeline.dataset import errors_table

    path = dst_root / ERRORS_FILE
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(errors_table(errors), Path(tmp) / ERRORS_FILE)
        write_atomic(path, (Path(tmp) / ERRORS_FILE).read_bytes())
    return path


def _dry_run_summary(tally: _Tally, videos, skipped, m, dst_root, settings, t_start, echo) -> dict[str, Any]:
    """--dry-run: one line per video on stdout (ACTION<TAB>SRC<TAB>DST<TAB>WHY), sorted by source path."""
    out = sys.stdout
    for v in videos:
        action, why = tally.plans.get(v.src, ("done", "already in DST"))
        out.write(f"{action}\t{v.src}\t{v.dst}\t{why}\n")
    out.flush()
    summary = {
        "src": m.root, "out": str(dst_root), "layout": m.layout, "dry_run": True, "videos": len(videos),
        "done": len(skipped), "encode": tally.actions.get("encode", 0), "remux": tally.actions.get("remux", 0),
        "copy": tally.actions.get("copy", 0), "encoded_because": dict(sorted(tally.why.items())),
        "unreadable": len(tally.failures), "missing": len(m.missing), "bytes_to_read": tally.bytes_in,
        "settings": settings.to_json(), "seconds": round(time.perf_counter() - t_start, 2),
    }
    why = summary["encoded_because"]
    echo(f"dry run: {summary['encode']} to encode ({', '.join(f'{k} {v}' for k, v in why.items()) or '-'}), "
         f"{summary['remux']} to remux, {summary['copy']} to copy, {summary['done']} already done, "
         f"{summary['unreadable']} unreadable, {summary['missing']} missing; nothing was written", file=sys.stderr)
    return summary


def _mib(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"prepared {s['src']} -> {s['out']} ({s['layout']}) in {s['seconds']:.1f} s",
        f"  videos in {s['videos']}: written {s['written']}, skipped (already done) {s['skipped']}, "
        f"failed {s['failed']}; listed but missing {s['missing']}",
        f"  written as: re-encoded {s['encoded']} ("
        + (", ".join(f"{k} {v}" for k, v in s["encoded_because"].items()) or "-")
        + f"), remuxed {s['remuxed']}, copied {s['copied']} (already small: not re-encoded)",
        f"  bytes before {_mib(s['bytes_before'])}, after {_mib(s['bytes_after'])}"
        + (f" ({s['size_ratio']:.1%})" if s["size_ratio"] is not None else ""),
    ]
    if s["decode_sample"]:
        lines.append(f"  decode on {s['decode_sample']} sample clips: {s['decode_ms_per_clip_src']:.1f} ms -> "
                     f"{s['decode_ms_per_clip_dst']:.1f} ms per clip, {s['decode_speedup']:.2f}x faster")
    if s["failed"] or s["missing"]:
        lines.append(f"  left out of the annotations ({s['annotation_rows_dropped']} rows): see {s['errors_file']}")
    if s["files_not_copied"]:
        lines.append(f"  not copied (too large): {', '.join(s['files_not_copied'][:5])}")
    lines.append(f"  data.root={s['out']} works for mone train / evaluate / data check")
    return "\n".join(lines)


# ============================================================================================ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="the raw archive: a dataset root in any layout `mone data check` reads")
    p.add_argument("--out", required=True, metavar="DST",
                   help="the prepared archive (created; outside SRC). Re-run the same command to resume")
    p.add_argument("--short-side", type=int, default=320,
                   help="short side in pixels, aspect kept, >= 32 (default %(default)s)")
    p.add_argument("--fps", type=float, default=None, help="constant frame rate (default: keep each video's)")
    p.add_argument("--gop", type=int, default=16,
                   help="keyframe interval in frames; short = cheap seeking (default %(default)s)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality: 0 lossless .. 51 worst (default %(default)s)")
    p.add_argument("--preset", default="veryfast",
                   help="x264 preset, ultrafast .. veryslow: encoding speed vs size (default %(default)s)")
    p.add_argument("--tune", default="fastdecode",
                   help="x264 tune; fastdecode (default) costs ~7%% more bytes for ~a third less decoding time; "
                        "none for x264's default")
    p.add_argument("--layout", default="auto",
                   help="auto | k400 | ssv2 | folders | list (default %(default)s: detected)")
    p.add_argument("--max-error-fraction", type=float, default=DEFAULT_MAX_ERROR_FRACTION,
                   help="stop when more than this fraction of the videos cannot be read, naming the worst files "
                        "(default %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="probe every video and print ACTION SRC DST WHY per line; write nothing")
    p.add_argument("--cpus-per-video", type=float, default=1.0, help="CPUs each task reserves (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=None, help="at most this many videos at once (default: all "
                   "the CPUs of the cluster)")
    p.add_argument("--speed-sample", type=int, default=8,
                   help="videos whose clip decoding is timed before and after, for the summary; 0 skips it "
                        "(default %(default)s)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        summary = run_prepare(
            args.src, args.out, short_side=args.short_side, fps=args.fps, gop=args.gop, crf=args.crf,
            preset=args.preset, tune=args.tune, layout=args.layout, max_error_fraction=args.max_error_fraction,
            dry_run=args.dry_run, cpus_per_video=args.cpus_per_video, concurrency=args.concurrency,
            speed_sample=args.speed_sample, address=args.address, progress=args.progress,
        )
    except PrepareError as e:
        print(f"mone data prepare: error: {e}", file=sys.stderr)
        return 2
    except TooManyFailures as e:
        print(f"mone data prepare: {e}", file=sys.stderr)
        print(json.dumps(e.summary), flush=True)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":  # `python -m jobs.prepare SRC --out DST` works without the rest of the CLI
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(prog="mone data prepare")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
