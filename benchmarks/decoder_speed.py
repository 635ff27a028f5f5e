"""Decoder backends on the same clips: CPU time per clip of `pipeline.decode.read_frames`, decord vs PyAV (vs the
decord build of another interpreter, e.g. decord2, which installs under the same `decord` import name).

    python benchmarks/decoder_speed.py [--videos 64] [--rounds 3]
    python benchmarks/decoder_speed.py --also-python /tmp/venv-decord2/bin/python   # + that interpreter's decord

One process, one thread of ours (the pipeline parallelises across processes): each backend decodes the same clips
(the training clip's frame indices, reduced-size decode) `rounds` times; the first round warms the page cache.
CPU time is process time (decord decodes on a thread of its own), which a loaded machine distorts less than wall.
A backend that is not installed is reported as such. Ends with ONE JSON line: cpu_ms_per_clip and wall_ms_per_clip
per backend (median over rounds after the first), and whether the frames each backend returned equal decord's.

decord2 installs its own `decord` module over decord's, so it is measured through a second interpreter (a venv with
`--system-site-packages` and `pip install decord2`). torchcodec is not among the contenders: its PyPI wheels need
FFmpeg's shared libraries from the system and a torch build with CUDA (the CPU machines here have neither),
so it does not install without hand steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.sampling import ClipSpec, sample_indices  # noqa: E402

SPEC = ClipSpec(num_frames=16, sampling="dense", stride=2, short_side=128, crop_size=112, tubelet_t=2, patch=16,
                train=True, flip=False, train_crop="random")


def measure(paths: list[str], decoder: str, rounds: int) -> dict:
    """CPU and wall ms per clip of read_frames(decoder=...), and a checksum of the frames (for equality)."""
    from pipeline.decode import have_decord, read_frames

    if decoder == "decord" and not have_decord():
        return {"available": False}
    cpu, wall, sums = [], [], []
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        sums = []
        for i, p in enumerate(paths):
            rng = np.random.default_rng([0, i])
            frames, _ = read_frames(p, lambda n, fps, rng=rng: sample_indices(n, SPEC, rng), decoder=decoder,
                                    short_side=SPEC.short_side)
            sums.append(int(frames.astype(np.int64).sum()))
        cpu.append(1e3 * (time.process_time() - c0) / len(paths))
        wall.append(1e3 * (time.perf_counter() - w0) / len(paths))
    later = slice(1, None) if rounds > 1 else slice(None)
    version = None
    if decoder == "decord":
        import decord

        version = getattr(decord, "__version__", None)
    else:
        import av

        version = av.__version__
    return {"available": True, "version": version, "cpu_ms_per_clip": round(float(np.median(cpu[later])), 2),
            "wall_ms_per_clip": round(float(np.median(wall[later])), 2), "checksums": sums}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the clips per backend (first is warm-up)")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--data", default="~/.cache/mone/bench")
    ap.add_argument("--also-python", default=None,
                    help="another interpreter whose `decord` (e.g. decord2) is measured on the same clips")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: measure one backend, print JSON
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from pipeline.manifest import build_manifest
    from pipeline.synth import generate

    w, h = (int(v) for v in args.size.split("x"))
    n_gen = max(128, args.videos)
    root = Path(args.data).expanduser() / f"k400-{n_gen}-{w}x{h}-{args.frames}"
    if not (root / "synth.json").exists():
        generate(root, "k400", classes=8, videos_per_class=n_gen // 8, val_videos_per_class=0,
                 test_videos_per_class=0, width=w, height=h, frames=args.frames, fps=25, gop=16, seed=0)
    paths = build_manifest(root).split("train").column("path").to_pylist()[: args.videos]
    if args.worker:
        print(json.dumps(measure(paths, args.worker, args.rounds)))
        return 0

    results = {"pyav": measure(paths, "pyav", args.rounds), "decord": measure(paths, "decord", args.rounds)}
    if args.also_python:
        out = subprocess.run([args.also_python, __file__, "--worker", "decord", "--videos", str(args.videos),
                              "--rounds", str(args.rounds), "--size", args.size, "--frames", str(args.frames),
                              "--data", args.data], capture_output=True, text=True, env=dict(os.environ))
        other = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
            "available": False, "error": out.stderr.strip().splitlines()[-1:]}
        results[f"decord@{other.get('version')}"] = other
    ref = results["decord"].get("checksums") or results["pyav"].get("checksums")
    summary = {}
    for name, r in results.items():
        sums = r.pop("checksums", None)
        if sums is not None:
            r["same_frames_as_decord"] = sums == ref
        summary[name] = r
        if r.get("available"):
            print(f"{name:18s} {r['version']!s:10s} {r['cpu_ms_per_clip']:7.2f} CPU ms/clip  "
                  f"{r['wall_ms_per_clip']:7.2f} wall ms/clip  same frames: {r['same_frames_as_decord']}")
        else:
            print(f"{name:18s} not available {r.get('error', '')}")
    print(json.dumps({"benchmark": "decoder_speed", "videos": len(paths), "video_size": args.size,
                      "clip": f"{SPEC.num_frames}x stride {SPEC.stride}, short side {SPEC.short_side}",
                      "backends": summary, "load_avg_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
