"""What `mone data prepare` buys: clip decoding on a raw 720p archive vs its prepared copy, same clips.

    python benchmarks/prepare_speed.py [--quick] [--videos 8] [--size 1280x720] [--frames 300] [--short-side 256]

1. Builds (or reuses, under --data) a generated K400-layout archive of 720p H.264 videos: 10 s at 30 fps, a keyframe
   every 250 frames (x264's default, as in most downloaded footage), written with pipeline.synth (libx264
   ultrafast: CAVLC, no deblocking, so the raw files are cheaper to decode than typical footage; the speed-up
   measured here is, if anything, an underestimate).
2. Prepares it with jobs.prepare.run_prepare (local Ray) to a short side of 256 (default gop 16, crf 23).
3. Times clip decoding through pipeline.decode.read_frames (decord, as training uses it; PyAV beside it) on the same
   clips in both archives: 16 frames at stride 2, at seeded positions, asked for at the short side training would
   use. Raw and prepared clips alternate, in rounds (order flipped every round), so both see the same machine load;
   the speed-up is taken within each round, and the median over rounds is reported with its range. Process CPU
   time ratios are reported beside wall-clock ones (robust to other load on a shared machine).

Ends with ONE JSON line: decode_ms_per_clip_raw, decode_ms_per_clip_prepared, speedup (target >= 3), and more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.prepare import clip_indices, run_prepare  # noqa: E402
from pipeline.decode import read_frames  # noqa: E402
from pipeline.manifest import build_manifest  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
TARGET_SPEEDUP = 3.0


def build_archive(root: Path, *, videos: int, width: int, height: int, frames: int, fps: int, gop: int) -> Path:
    """The raw archive (reused when it exists with the same parameters)."""
    from pipeline.synth import generate

    name = f"raw-{width}x{height}-{videos}v-{frames}f-{fps}fps-gop{gop}"
    path = root.expanduser() / name
    if (path / "synth.json").is_file():
        print(f"reusing the raw archive {path}", file=sys.stderr)
        return path
    print(f"generating {videos} videos {width}x{height}, {frames} frames, keyframe every {gop} -> {path}",
          file=sys.stderr)
    classes = min(videos, 8)
    generate(path, "k400", classes=classes, videos_per_class=-(-videos // classes), val_videos_per_class=0,
             test_videos_per_class=0, width=width, height=height, frames=frames, fps=fps, gop=gop, seed=0)
    return path


def time_clip(path: str, pos: float, short_side: int, decoder: str) -> tuple[float, float]:
    def index_fn(n: int, fps: float):
        return clip_indices(n, pos, 16, 2)

    t, c = time.perf_counter(), time.process_time()
    frames, _ = read_frames(path, index_fn, decoder=decoder, short_side=short_side)
    assert frames.shape[0] == 16
    return time.perf_counter() - t, time.process_time() - c


def measure(pairs: list[tuple[str, str]], *, clips: int, rounds: int, short_side: int, decoder: str,
            seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    positions = [[float(u) for u in rng.uniform(size=clips)] for _ in pairs]
    per_round = []
    for r in range(rounds):
        wall = {"raw": 0.0, "prepared": 0.0}
        cpu = {"raw": 0.0, "prepared": 0.0}
        n = 0
        for (raw, prep), pos_list in zip(pairs, positions, strict=True):
            for pos in pos_list:
                order = (("raw", raw), ("prepared", prep)) if r % 2 == 0 else (("prepared", prep), ("raw", raw))
                for key, path in order:
                    w, c = time_clip(path, pos, short_side, decoder)
                    wall[key] += w
                    cpu[key] += c
                n += 1
        per_round.append({"raw_ms": 1000 * wall["raw"] / n, "prepared_ms": 1000 * wall["prepared"] / n,
                          "speedup": wall["raw"] / wall["prepared"], "cpu_speedup": cpu["raw"] / cpu["prepared"]})
        print(f"  {decoder} round {r + 1}/{rounds}: raw {per_round[-1]['raw_ms']:.1f} ms, prepared "
              f"{per_round[-1]['prepared_ms']:.1f} ms per clip, {per_round[-1]['speedup']:.2f}x "
              f"(CPU {per_round[-1]['cpu_speedup']:.2f}x)", file=sys.stderr)

    def med(key: str) -> float:
        return statistics.median(x[key] for x in per_round)

    return {
        "decode_ms_per_clip_raw": round(med("raw_ms"), 2),
        "decode_ms_per_clip_prepared": round(med("prepared_ms"), 2),
        "speedup": round(med("speedup"), 2),
        "speedup_range": [round(min(x["speedup"] for x in per_round), 2),
                          round(max(x["speedup"] for x in per_round), 2)],
        "cpu_speedup": round(med("cpu_speedup"), 2),
        "clips_per_round": sum(len(p) for p in positions),
        "rounds": rounds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 videos of 5 s, 2 rounds (about 2 minutes)")
    ap.add_argument("--videos", type=int, default=None, help="videos in the raw archive (default 8; quick 4)")
    ap.add_argument("--size", default="1280x720", help="raw video size WxH (720p or larger)")
    ap.add_argument("--frames", type=int, default=None, help="frames per raw video (default 300; quick 150)")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--raw-gop", type=int, default=250, help="keyframe interval of the raw videos")
    ap.add_argument("--short-side", type=int, default=256, help="short side of the prepared copy")
    ap.add_argument("--gop", type=int, default=16, help="keyframe interval of the prepared copy")
    ap.add_argument("--crf", type=int, default=23)
    ap.add_argument("--clips", type=int, default=4, help="clips per video per round")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5; quick 2)")
    ap.add_argument("--data", default="~/.cache/mone/bench", help="where the archives are generated")
    args = ap.parse_args()
    videos = args.videos or (4 if args.quick else 8)
    frames = args.frames or (150 if args.quick else 300)
    rounds = args.rounds or (2 if args.quick else 5)
    width, height = (int(v) for v in args.size.lower().split("x"))

    raw = build_archive(Path(args.data), videos=videos, width=width, height=height, frames=frames, fps=args.fps,
                        gop=args.raw_gop)
    prepared = raw.with_name(f"{raw.name}-s{args.short_side}-g{args.gop}-crf{args.crf}")
    t0 = time.perf_counter()
    summary = run_prepare(raw, prepared, short_side=args.short_side, gop=args.gop, crf=args.crf, speed_sample=0,
                          progress=False)
    prepare_s = time.perf_counter() - t0
    import ray

    ray.shutdown()

    m = build_manifest(raw)
    pairs = []
    for p in sorted(m.table.column("path").to_pylist()):
        out = (prepared / Path(p).relative_to(raw)).with_suffix(".mp4")
        pairs.append((p, str(out)))
    print(f"timing {len(pairs)} videos x {args.clips} clips (16 frames, stride 2) at short side {args.short_side}",
          file=sys.stderr)
    decord = measure(pairs, clips=args.clips, rounds=rounds, short_side=args.short_side, decoder="auto")
    pyav = measure(pairs, clips=args.clips, rounds=rounds, short_side=args.short_side, decoder="pyav")
    result = {
        **decord,
        "meets_target": decord["speedup"] >= TARGET_SPEEDUP, "target_speedup": TARGET_SPEEDUP,
        "pyav_decode_ms_per_clip_raw": pyav["decode_ms_per_clip_raw"],
        "pyav_decode_ms_per_clip_prepared": pyav["decode_ms_per_clip_prepared"],
        "pyav_speedup": pyav["speedup"], "pyav_cpu_speedup": pyav["cpu_speedup"],
        "videos": len(pairs), "raw": f"{width}x{height}, {frames} frames at {args.fps} fps, keyframe every "
                                     f"{args.raw_gop}",
        "prepared": f"short side {args.short_side}, keyframe every {args.gop}, crf {args.crf}",
        "bytes_raw": summary["bytes_before"], "bytes_prepared": summary["bytes_after"],
        "prepare_seconds": round(prepare_s, 1), "prepare_videos_per_s": summary["videos_per_s"],
        "prepare_written": summary["written"], "prepare_skipped": summary["skipped"],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
