"""`mone data synth`, `mone data check` and `mone data prepare`: make a synthetic dataset; audit a real one before
training; re-encode a raw archive into a training-ready copy (jobs/prepare.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

DURATION_BINS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, float("inf"))


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data", help="synthetic datasets, dataset checks, re-encoding an archive for training",
        description="Generate a synthetic video dataset in the official Kinetics-400 / Something-Something-v2 "
                    "layouts, check a dataset folder (files found, missing, unreadable; durations, fps, sizes), or "
                    "prepare a raw archive for training (re-encoded to a short side on Ray, resumably).",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    s = sub.add_parser(
        "synth", help="write a synthetic dataset (real video files + official annotation files)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Writes videos of a small object moving over a cluttered static background; the class is the "
                    "direction of motion (8 directions; x2 speeds above 8 classes), so a single frame or the mean "
                    "colour cannot tell it. K400: H.264 .mp4 + annotations/{train,validate,test}.csv + "
                    "videos/{split}/{label}/ (or flat) + lists/{split}.txt. SSv2: VP9 .webm + labels/something-"
                    "something-v2-{labels,train,validation,test}.json. Deterministic given --seed.",
    )
    s.add_argument("--layout", choices=("k400", "ssv2"), default="k400", help="which official layout to write")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--classes", type=int, default=8, help="number of classes (1-16)")
    s.add_argument("--videos-per-class", type=int, default=20, help="training videos per class")
    s.add_argument("--val-videos-per-class", type=int, default=None,
                   help="validation videos per class (default: 20%% of --videos-per-class)")
    s.add_argument("--test-videos-per-class", type=int, default=None,
                   help="test videos per class (default: 10%% of --videos-per-class)")
    s.add_argument("--corrupt", type=int, default=0,
                   help="extra broken files (truncated, zero-byte, garbage) listed in the training annotations")
    s.add_argument("--size", default=None, help="WxH, even numbers (default: 128x96 for k400, 320x240 for ssv2, "
                   "which is 240 px high like the real SSv2; use e.g. 96x96 for fast CPU runs)")
    s.add_argument("--frames", type=int, default=16, help="frames per video")
    s.add_argument("--fps", type=int, default=8, help="frame rate written in the files")
    s.add_argument("--gop", type=int, default=8, help="keyframe interval (short = cheap random access)")
    s.add_argument("--video-layout", choices=("tree", "flat"), default="tree",
                   help="k400 only: videos/{split}/{label}/ (tree) or all in videos/ (flat)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPU count)")
    s.set_defaults(func=run_synth)

    c = sub.add_parser(
        "check", help="report per split: files found, missing, unreadable; duration/fps/size histograms",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Builds the manifest of DIR (layout auto-detected), then opens every video and decodes one frame. "
                    "Prints a table per split; --json prints one JSON object instead. Exit code 0: all good, "
                    "1: missing or unreadable files, 2: DIR is not a dataset.",
    )
    c.add_argument("dir", help="dataset root")
    c.add_argument("--layout", default="auto", choices=("auto", "k400", "ssv2", "folders", "list"))
    c.add_argument("--decoder", default="auto", choices=("auto", "decord", "pyav"))
    c.add_argument("--limit", type=int, default=0, help="check at most N videos per split (0 = all)")
    c.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    c.add_argument("--errors-out", default=None, help="also write the unreadable files as errors.parquet here")
    c.add_argument("--json", action="store_true", help="machine-readable output (one JSON object)")
    c.set_defaults(func=run_check)

    from jobs import prepare

    p = sub.add_parser(
        "prepare", help="re-encode a raw archive into a training-ready copy (short side N, H.264), on Ray",
        description="A Ray Data job, one task per video, on every node of the cluster: each video is decoded, "
                    "resized to --short-side (aspect kept), optionally resampled to --fps, and encoded as H.264 "
                    "yuv420p .mp4 with a keyframe every --gop frames; videos already small are copied or remuxed. "
                    "DST keeps SRC's layout and annotation files (rows of unreadable videos left out, listed in "
                    "DST/prepare_errors.parquet), so it is a drop-in data.root. Re-run the same command to resume.",
        epilog="e.g. mone data prepare /data/kinetics400 --out /data/k400_256 --short-side 256; on a cluster: "
               "mone submit prepare --follow -- /mnt/k400 --out /mnt/k400_256 --short-side 256",
    )
    prepare.add_arguments(p)
    p.set_defaults(func=prepare.main)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])


# ------------------------------------------------------------------------------------------------------- synth


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"mone data synth: --size {text!r}: expected WxH, e.g. 128x96") from None
    return w, h


def run_synth(args) -> int:
    from pipeline.synth import generate

    default = "128x96" if args.layout == "k400" else "320x240"
    w, h = _parse_size(args.size or default)
    try:
        r = generate(args.out, args.layout, classes=args.classes, videos_per_class=args.videos_per_class,
                     val_videos_per_class=args.val_videos_per_class, test_videos_per_class=args.test_videos_per_class,
                     corrupt=args.corrupt, width=w, height=h, frames=args.frames, fps=args.fps, gop=args.gop,
                     seed=args.seed, video_layout=args.video_layout, workers=args.workers)
    except ValueError as e:
        print(f"mone data synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r.videos} {args.layout} videos ({', '.join(f'{k} {v}' for k, v in r.counts.items())}; "
          f"{len(r.corrupt)} corrupt) to {r.root} in {r.seconds:.1f} s", file=sys.stderr)
    print(json.dumps({"root": r.root, "layout": r.layout, "videos": r.videos, "splits": r.counts,
                      "corrupt": len(r.corrupt), "classes": r.classes, "seconds": r.seconds}))
    return 0


# ------------------------------------------------------------------------------------------------------- check


def _probe_one(args: tuple[str, str]) -> dict:
    path, decoder = args
    import numpy as np

    from pipeline.decode import DecodeError, read_frames

    try:
        # Header + index + one decoded frame (the middle one): catches files that open but do not decode.
        _, info = read_frames(path, lambda n, fps: np.array([n // 2]), decoder=decoder, short_side=32)
        return {"path": path, "ok": True, "frames": info.num_frames, "fps": round(info.fps, 2),
                "width": info.width, "height": info.height, "duration_s": info.num_frames / info.fps}
    except DecodeError as e:
        return {"path": path, "ok": False, "stage": e.stage, "error": f"{type(e).__name__}: {e.reason}"}
    except Exception as e:  # noqa: BLE001 - a check reports, it never stops on one file
        return {"path": path, "ok": False, "stage": "decode", "error": f"{type(e).__name__}: {e}"}


def _hist_duration(values: list[float]) -> dict[str, int]:
    out = {}
    for lo, hi in zip(DURATION_BINS[:-1], DURATION_BINS[1:], strict=True):
        key = f"{lo:g}-{hi:g}s" if hi != float("inf") else f">={lo:g}s"
        out[key] = sum(1 for v in values if lo <= v < hi)
    return {k: v for k, v in out.items() if v}


def check_dataset(root: str, layout: str = "auto", decoder: str = "auto", limit: int = 0,
                  workers: int | None = None, progress: bool = True) -> dict:
    """The report `mone data check` prints (a dict: per split counts and histograms, plus bad files)."""
    from tqdm import tqdm

    from pipeline.manifest import build_manifest

    t0 = time.perf_counter()
    m = build_manifest(root, layout)
    paths = m.table.column("path").to_pylist()
    splits = m.table.column("split").to_pylist()
    by_split: dict[str, list[str]] = {}
    for p, s in zip(paths, splits, strict=True):
        by_split.setdefault(s, []).append(p)
    if limit:
        by_split = {s: ps[:limit] for s, ps in by_split.items()}
    missing_by_split: Counter = Counter()
    for mp in m.missing:
        parts = mp.split(os.sep)
        hit = next((s for s in by_split if s in parts), None)
        missing_by_split[hit or "?"] += 1
    todo = [(p, decoder) for ps in by_split.values() for p in ps]
    workers = workers or min(os.cpu_count() or 1, 8)
    results: dict[str, dict] = {}
    bar = tqdm(total=len(todo), desc="check", unit="video", disable=not progress, leave=False, file=sys.stderr)
    if workers > 1 and len(todo) > 16:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            for r in ex.map(_probe_one, todo, chunksize=8):
                results[r["path"]] = r
                bar.update(1)
    else:
        for t in todo:
            r = _probe_one(t)
            results[r["path"]] = r
            bar.update(1)
    bar.close()
    report = {"root": m.root, "layout": m.layout, "classes": m.num_classes, "splits": {}, "unreadable": [],
              "missing": m.missing, "seconds": 0.0}
    for split, ps in by_split.items():
        rs = [results[p] for p in ps]
        ok = [r for r in rs if r["ok"]]
        bad = [r for r in rs if not r["ok"]]
        report["unreadable"] += [{"path": r["path"], "split": split, "stage": r["stage"], "error": r["error"]}
                                 for r in bad]
        report["splits"][split] = {
            "listed": len(ps) + missing_by_split.get(split, 0),
            "found": len(ps),
            "missing": missing_by_split.get(split, 0),
            "unreadable": len(bad),
            "ok": len(ok),
            "duration_s": _hist_duration([r["duration_s"] for r in ok]),
            "fps": dict(Counter(f"{r['fps']:g}" for r in ok).most_common(8)),
            "resolution": dict(Counter(f"{r['width']}x{r['height']}" for r in ok).most_common(8)),
            "frames": _stats([r["frames"] for r in ok]),
        }
    if missing_by_split.get("?"):
        report["splits"].setdefault("?", {"listed": 0, "found": 0, "missing": 0, "unreadable": 0, "ok": 0})
        report["splits"]["?"]["missing"] = missing_by_split["?"]
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _stats(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]}


def format_report(rep: dict) -> str:
    lines = [f"dataset {rep['root']}  layout {rep['layout']}  classes {rep['classes']}", ""]
    cols = ("split", "listed", "found", "missing", "unreadable", "ok", "frames min/med/max")
    rows = []
    for split, s in rep["splits"].items():
        fr = s.get("frames") or {}
        rows.append((split, s["listed"], s["found"], s["missing"], s["unreadable"], s["ok"],
                     f"{fr.get('min', '-')}/{fr.get('median', '-')}/{fr.get('max', '-')}"))
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    lines.append("  ".join(str(c).ljust(w) for c, w in zip(cols, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    for key, title in (("duration_s", "duration"), ("fps", "fps"), ("resolution", "resolution")):
        lines += ["", f"{title}:"]
        for split, s in rep["splits"].items():
            hist = s.get(key) or {}
            total = max(1, sum(hist.values()))
            cells = "  ".join(f"{k}: {v} ({v / total:.0%})" for k, v in hist.items())
            lines.append(f"  {split:<12} {cells or '-'}")
    if rep["missing"]:
        lines += ["", f"missing files ({len(rep['missing'])}), first ones:"]
        lines += [f"  {p}" for p in rep["missing"][:10]]
    if rep["unreadable"]:
        lines += ["", f"unreadable files ({len(rep['unreadable'])}), first ones:"]
        lines += [f"  {u['path']}: {u['error'][:160]}" for u in rep["unreadable"][:10]]
    lines += ["", f"checked in {rep['seconds']:.1f} s"]
    return "\n".join(lines)


def run_check(args) -> int:
    from pipeline.manifest import ManifestError

    try:
        rep = check_dataset(args.dir, args.layout, args.decoder, args.limit, args.workers,
                            progress=not args.json)
    except ManifestError as e:
        print(f"mone data check: {e}", file=sys.stderr)
        return 2
    if args.errors_out:
        from pipeline.dataset import write_errors

        out = write_errors([{k: u[k] for k in ("path", "stage", "error")} for u in rep["unreadable"]],
                           args.errors_out)
        print(f"wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(rep))
    else:
        print(format_report(rep))
    return 1 if rep["missing"] or rep["unreadable"] else 0


def main(argv: list[str] | None = None) -> int:
    """Runs `data ...` without the rest of the `mone` CLI (python -m jobs.data_cmd check DIR)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(prog="mone")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
