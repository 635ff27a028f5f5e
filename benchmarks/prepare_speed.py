"""What `mone data prepare` buys: clip decoding on a raw 720p archive vs its prepared copy, same clips.

    python benchmarks/prepare_speed.py [--quick] [--videos 8] [--size 1280x720] [--frames 300] [--short-side 256]

1. Builds (or reuses, under --data) a generated K400-layout archive of 720p H.264 videos: 10 s at 30 fps, a keyframe
   every 250 frames (x264's default interval), written with pipeline.synth. Its libx264 `ultrafast` streams (CAVLC,
   no deblocking) are cheaper to decode per frame than CABAC + deblocking streams of usual downloads, so the raw
   side is, if anything, favoured here. Real footage measured on this project: ~400 ms per clip raw, ~80 ms at 256.
2. Prepares it with jobs.prepare.run_prepare (local Ray) to a short side of 256 (gop 16, crf 23), twice: with the
   default x264 tune (fastdecode) and with x264's own (`--tune none`), the contender the default must beat.
3. Times clip decoding through pipeline.decode.read_frames (decord, as training uses it; PyAV beside it) on the same
   clips in the three archives: 16 frames at stride 2, at seeded positions, asked for at the short side training
   would use. The archives take turns clip by clip, in rounds (order rotated every round), so all see the same load;
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


def measure(archives: dict[str, list[str]], *, clips: int, rounds: int, short_side: int, decoder: str,
            seed: int = 0) -> dict[str, dict]:
    """archives: name -> the same videos' paths in each archive ("raw" first). Per round, every clip is decoded
    from every archive back to back (order rotated each round); ratios raw / archive are taken within a round."""
    names = list(archives)
    n_videos = len(archives["raw"])
    rng = np.random.default_rng(seed)
    positions = [[float(u) for u in rng.uniform(size=clips)] for _ in range(n_videos)]
    per_round: list[dict[str, dict]] = []
    for r in range(rounds):
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        order = names[r % len(names):] + names[: r % len(names)]
        n = 0
        for i in range(n_videos):
            for pos in positions[i]:
                for name in order:
                    w, c = time_clip(archives[name][i], pos, short_side, decoder)
                    wall[name] += w
                    cpu[name] += c
                n += 1
        per_round.append({k: {"ms": 1000 * wall[k] / n, "speedup": wall["raw"] / wall[k],
                              "cpu_speedup": cpu["raw"] / cpu[k]} for k in names})
        print(f"  {decoder} round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v['ms']:.1f} ms" + (f" ({v['speedup']:.2f}x, CPU {v['cpu_speedup']:.2f}x)" if k != "raw" else "")
            for k, v in per_round[-1].items()) + " per clip", file=sys.stderr)
    out = {}
    for k in names:
        sp = [x[k]["speedup"] for x in per_round]
        out[k] = {"ms": round(statistics.median(x[k]["ms"] for x in per_round), 2),
                  "speedup": round(statistics.median(sp), 2), "speedup_range": [round(min(sp), 2), round(max(sp), 2)],
                  "cpu_speedup": round(statistics.median(x[k]["cpu_speedup"] for x in per_round), 2)}
    out["clips_per_round"] = sum(len(p) for p in positions)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 videos of 5 s, 2 rounds (about 3 minutes)")
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
    paths = sorted(build_manifest(raw).table.column("path").to_pylist())
    archives: dict[str, list[str]] = {"raw": paths}
    prep: dict[str, dict] = {}
    # The default (tune fastdecode) and x264's own tuning, prepared from the same raw archive.
    for key, tune in (("prepared", "fastdecode"), ("prepared_tune_none", "none")):
        out = raw.with_name(f"{raw.name}-s{args.short_side}-g{args.gop}-crf{args.crf}-{tune}")
        t0 = time.perf_counter()
        summary = run_prepare(raw, out, short_side=args.short_side, gop=args.gop, crf=args.crf, tune=tune,
                              speed_sample=0, progress=False)
        prep[key] = {"seconds": round(time.perf_counter() - t0, 1), "bytes": summary["bytes_after"],
                     "videos_per_s": summary["videos_per_s"], "written": summary["written"],
                     "bytes_raw": summary["bytes_before"]}
        archives[key] = [str((out / Path(p).relative_to(raw)).with_suffix(".mp4")) for p in paths]
    import ray

    ray.shutdown()

    print(f"timing {len(paths)} videos x {args.clips} clips (16 frames, stride 2) at short side {args.short_side}",
          file=sys.stderr)
    decord = measure(archives, clips=args.clips, rounds=rounds, short_side=args.short_side, decoder="auto")
    pyav = measure(archives, clips=args.clips, rounds=rounds, short_side=args.short_side, decoder="pyav")
    result = {
        "decode_ms_per_clip_raw": decord["raw"]["ms"],
        "decode_ms_per_clip_prepared": decord["prepared"]["ms"],
        "speedup": decord["prepared"]["speedup"],
        "speedup_range": decord["prepared"]["speedup_range"],
        "cpu_speedup": decord["prepared"]["cpu_speedup"],
        "meets_target": decord["prepared"]["speedup"] >= TARGET_SPEEDUP, "target_speedup": TARGET_SPEEDUP,
        "decode_ms_per_clip_prepared_tune_none": decord["prepared_tune_none"]["ms"],
        "speedup_tune_none": decord["prepared_tune_none"]["speedup"],
        "cpu_speedup_tune_none": decord["prepared_tune_none"]["cpu_speedup"],
        "pyav_decode_ms_per_clip_raw": pyav["raw"]["ms"],
        "pyav_decode_ms_per_clip_prepared": pyav["prepared"]["ms"],
        "pyav_speedup": pyav["prepared"]["speedup"], "pyav_cpu_speedup": pyav["prepared"]["cpu_speedup"],
        "pyav_speedup_tune_none": pyav["prepared_tune_none"]["speedup"],
        "clips_per_round": decord["clips_per_round"], "rounds": rounds, "videos": len(paths),
        "raw": f"{width}x{height}, {frames} frames at {args.fps} fps, keyframe every {args.raw_gop}",
        "prepared": f"short side {args.short_side}, keyframe every {args.gop}, crf {args.crf}",
        "bytes_raw": prep["prepared"]["bytes_raw"], "bytes_prepared": prep["prepared"]["bytes"],
        "bytes_prepared_tune_none": prep["prepared_tune_none"]["bytes"],
        "prepare_seconds": prep["prepared"]["seconds"], "prepare_videos_per_s": prep["prepared"]["videos_per_s"],
        "prepare_written": prep["prepared"]["written"], "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
