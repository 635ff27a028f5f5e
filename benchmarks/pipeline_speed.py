"""Data pipeline speed: our Ray Data stream vs a plain DataLoader + PyAV baseline, same files, same clip spec.

    python benchmarks/pipeline_speed.py [--quick] [--epochs 10] [--videos 160]

Measured side by side in one run, with equal cores (2 by default):
- decode-only limit: our decoder alone (pipeline.decode.read_frames with the clip's frame indices, reduced-size
  decode), no Ray, no transforms/tokens, in `cores` processes. The ceiling for any pipeline built on it.
- ours: `pipeline.dataset.build_dataset` (decord, uint8 all the way, the ClipLoader UDF in a Ray Data task pool:
  `cores + 1` tasks sharing `cores` logical CPUs of a local Ray) read with `iter_torch_batches`, one epoch per
  round (10 by default); RSS of every Ray process (workers + raylet/GCS, object store pages included) and of the
  driver sampled every 0.25 s, peak per epoch.
- baseline: a PyTorchVideo/PySlowFast-style `torch.utils.data.Dataset` whose `__getitem__` opens the file with
  PyAV, decodes every frame of the clip window to full-size RGB, subsamples, short-side resizes (float), crops and
  tokenizes; `DataLoader(num_workers=cores)`.
The machine may be shared and its load drifts, so the contenders run in rounds (one epoch of each per round) and
speed ratios are taken within a round, then the median over rounds after the first (which also starts Ray's
worker processes). Ends with ONE JSON line of figures. Figures on a shared CPU are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.sampling import ClipSpec, sample_indices  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# ------------------------------------------------------------------------------------------------------ baseline


class PyAVClipDataset:
    """The usual map-style video dataset (PyTorchVideo EncodedVideoPyAV / PySlowFast pyav decode, simplified)."""

    def __init__(self, paths: list[str], labels: list[int], spec: ClipSpec, seed: int = 0):
        self.paths, self.labels, self.spec, self.seed = paths, labels, spec, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import av
        import torch
        import torch.nn.functional as F

        spec = self.spec
        rng = np.random.default_rng([self.seed, i])
        with av.open(self.paths[i]) as c:
            s = c.streams.video[0]
            n = s.frames
            idx = sample_indices(n, spec, rng)[0]  # (T,)
            lo, hi = int(idx.min()), int(idx.max())
            window = []
            for k, frame in enumerate(c.decode(s)):  # decode from the start, convert the clip window to RGB
                if k >= lo:
                    window.append(frame.to_ndarray(format="rgb24"))
                if k >= hi:
                    break
        clip = torch.from_numpy(np.stack(window)[idx - lo])  # (T, H, W, 3) uint8
        x = clip.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        h, w = x.shape[-2:]
        scale = spec.short_side / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
        y0 = int(rng.integers(0, h - spec.crop_size + 1))
        x0 = int(rng.integers(0, w - spec.crop_size + 1))
        x = x[..., y0 : y0 + spec.crop_size, x0 : x0 + spec.crop_size].round().clamp(0, 255).to(torch.uint8)
        t, p = spec.tubelet_t, spec.patch
        T, _, H, W = x.shape
        tok = x.permute(0, 2, 3, 1).reshape(T // t, t, H // p, p, W // p, p, 3)
        tok = tok.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, t * p * p * 3)  # (L, K)
        return {"tokens": tok[None], "label": self.labels[i]}


# --------------------------------------------------------------------------------------------------- decode only


def _decode_only(args) -> int:
    from pipeline.decode import read_frames

    paths, spec, seed = args
    n = 0
    for p in paths:
        rng = np.random.default_rng([seed, len(p)])
        read_frames(p, lambda nf, fps, rng=rng: sample_indices(nf, spec, rng), short_side=spec.short_side)
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------- ours


def _ray_rss_mb() -> tuple[float, float]:
    """(RSS of this run's Ray processes, RSS of this driver) in MB. Only descendants of this driver count (ray.init
    starts raylet/GCS as its children, workers are theirs): other people's Ray on a shared machine is not ours.
    DataLoader workers (forks of the driver) and the decode-only pool (multiprocessing.spawn) are excluded."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in me.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            name = p.name()
            if "ray::" in name or "ray::" in cmd or any(k in cmd for k in ("raylet", "gcs_server", "default_worker",
                                                                           "dashboard", "runtime_env", "ray/")):
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20, me.memory_info().rss / 2**20


class _Sampler:
    def __init__(self, every: float = 0.25):
        self.every, self.peak, self.driver_peak = every, 0.0, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            r, d = _ray_rss_mb()
            self.peak, self.driver_peak = max(self.peak, r), max(self.driver_peak, d)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class Ours:
    """Our pipeline on a local Ray with `cores` CPUs; `epoch()` reads one epoch and samples memory."""

    def __init__(self, manifest, spec, cores: int, batch_size: int, tasks: int, udf_batch: int):
        import ray

        from pipeline.dataset import ErrorLog, TorchCollate, build_dataset

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.log = ErrorLog(manifest.num_rows, None)
        # `tasks` decode tasks share the `cores` logical CPUs (one more than cores by default: it hides the gaps
        # while a task waits on Ray's scheduler / object store; the machine still has `cores` CPUs in all).
        self.ds = build_dataset(manifest, spec, concurrency=tasks, num_cpus_per_task=round(cores / tasks, 3),
                                seed=0, epoch=None, error_log=self.log, batch_size=udf_batch)
        self.collate, self.batch_size, self.e = TorchCollate(), batch_size, 0

    def epoch(self) -> dict:
        self.log.set_epoch(self.e)
        with _Sampler() as s:
            t0, n, first = time.perf_counter(), 0, None
            for b in self.ds.iter_torch_batches(batch_size=self.batch_size, collate_fn=self.collate,
                                                prefetch_batches=2):
                n += b["tokens"].shape[0]
                first = first or time.perf_counter() - t0
            dt = time.perf_counter() - t0
        out = {"epoch": self.e, "clips": n, "seconds": round(dt, 2), "clips_per_s": round(n / dt, 2),
               "startup_s": round(first or 0, 2),
               "steady_clips_per_s": round(max(n - self.batch_size, 1) / max(dt - (first or 0), 1e-6), 2),
               "ray_rss_peak_mb": round(s.peak), "driver_rss_peak_mb": round(s.driver_peak)}
        self.e += 1
        return out

    def close(self):
        import ray

        ray.shutdown()


class DecodeOnly:
    def __init__(self, paths, spec, cores: int):
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        self.chunks = [paths[i::cores] for i in range(cores)]
        self.spec, self.r = spec, 0
        self.ex = ProcessPoolExecutor(cores, mp_context=get_context("spawn"))
        list(self.ex.map(_decode_only, [(c[:2], spec, 0) for c in self.chunks]))  # imports, page cache

    def epoch(self) -> float:
        self.r += 1
        t0 = time.perf_counter()
        n = sum(self.ex.map(_decode_only, [(c, self.spec, self.r) for c in self.chunks]))
        return n / (time.perf_counter() - t0)

    def close(self):
        self.ex.shutdown()


class Baseline:
    def __init__(self, paths, labels, spec, cores: int, batch_size: int):
        import torch

        self.dl = torch.utils.data.DataLoader(PyAVClipDataset(paths, labels, spec), batch_size=batch_size,
                                              shuffle=True, num_workers=cores, persistent_workers=True)

    def epoch(self) -> float:
        t0, n = time.perf_counter(), 0
        for b in self.dl:
            n += b["tokens"].shape[0]
        return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer videos and epochs (about a minute)")
    ap.add_argument("--videos", type=int, default=None, help="videos (default 256; quick 96)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="rounds: one epoch of each contender per round (default 10; quick 3)")
    ap.add_argument("--cores", type=int, default=2, help="CPUs for each contender")
    ap.add_argument("--size", default="320x240", help="video size WxH (K400-like by default)")
    ap.add_argument("--frames", type=int, default=64, help="frames per video")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch (iter_torch_batches / DataLoader)")
    ap.add_argument("--tasks", type=int, default=None, help="concurrent decode tasks in Ray (default cores + 1)")
    ap.add_argument("--udf-batch", type=int, default=8, help="clips per map_batches call")
    ap.add_argument("--data", default="~/.cache/mone/bench", help="where the benchmark videos are generated")
    args = ap.parse_args(argv)
    n_videos = args.videos or (96 if args.quick else 256)
    epochs = args.epochs or (3 if args.quick else 10)
    w, h = (int(v) for v in args.size.split("x"))

    from pipeline.manifest import build_manifest
    from pipeline.synth import generate

    root = Path(args.data).expanduser() / f"k400-{n_videos}-{w}x{h}-{args.frames}"
    if not (root / "synth.json").exists():
        print(f"generating {n_videos} videos {w}x{h}x{args.frames} in {root} ...", flush=True)
        generate(root, "k400", classes=8, videos_per_class=n_videos // 8, val_videos_per_class=0,
                 test_videos_per_class=0, width=w, height=h, frames=args.frames, fps=25, gop=16, seed=0)
    manifest = build_manifest(root).split("train")
    paths = manifest.column("path").to_pylist()
    labels = manifest.column("label").to_pylist()
    # K400-style dense clip scaled to the CPU: 16 frames, stride 2, short side 128, 112 crop, 2x16x16 tubelets.
    spec = ClipSpec(num_frames=16, sampling="dense", stride=2, short_side=128, crop_size=112, tubelet_t=2,
                    patch=16, train=True, flip=False, train_crop="random")
    print(f"{len(paths)} videos {w}x{h}, {args.frames} frames; clip {spec.num_frames}x{spec.crop_size}^2 stride "
          f"{spec.stride} -> tokens {spec.tokens_shape}; {args.cores} cores each", flush=True)
    # The machine may be shared and its load drifts: the three contenders run in rounds, one epoch each per round,
    # and ratios are taken within a round (paired), then the median over rounds.
    dec = DecodeOnly(paths, spec, args.cores)
    base = Baseline(paths, labels, spec, args.cores, args.batch_size)
    ours = Ours(manifest, spec, args.cores, args.batch_size, args.tasks or args.cores + 1, args.udf_batch)
    rounds = []
    for r in range(epochs):
        d, bl = dec.epoch(), base.epoch()
        o = ours.epoch()
        rounds.append({"decode_only": round(d, 2), "baseline": round(bl, 2), **o})
        print(f"round {r}: decode-only {d:.1f} | baseline {bl:.1f} | ours {o['clips_per_s']:.1f} clips/s "
              f"(first batch after {o['startup_s']:.1f} s) | peak RSS Ray {o['ray_rss_peak_mb']} MB, driver "
              f"{o['driver_rss_peak_mb']} MB", flush=True)
    ours.close()
    dec.close()
    later = rounds[1:] or rounds  # round 0 also starts Ray's worker processes (imports): a one-off
    med = lambda key: float(np.median([x[key] for x in later]))  # noqa: E731
    ratio = lambda a, b: float(np.median([x[a] / x[b] for x in later]))  # noqa: E731
    tokens = spec.num_views * spec.num_tokens
    peaks = [x["ray_rss_peak_mb"] for x in rounds]
    result = {
        "ours_clips_per_s": round(med("clips_per_s"), 2),
        "ours_steady_clips_per_s": round(med("steady_clips_per_s"), 2),
        "baseline_clips_per_s": round(med("baseline"), 2),
        "decode_only_clips_per_s": round(med("decode_only"), 2),
        "ours_tokens_per_s": round(med("clips_per_s") * tokens),
        "baseline_tokens_per_s": round(med("baseline") * tokens),
        "speedup_vs_baseline": round(ratio("clips_per_s", "baseline"), 2),
        "fraction_of_decode_only": round(ratio("clips_per_s", "decode_only"), 2),
        "steady_fraction_of_decode_only": round(ratio("steady_clips_per_s", "decode_only"), 2),
        "ours_first_round_clips_per_s": rounds[0]["clips_per_s"],
        "peak_ray_rss_mb_per_epoch": peaks,
        "peak_driver_rss_mb_per_epoch": [x["driver_rss_peak_mb"] for x in rounds],
        "rss_growth_mb_after_epoch0": round(max(peaks[1:] or peaks) - min(peaks[1:] or peaks), 1),
        "epoch_startup_s": [x["startup_s"] for x in rounds],
        "rounds": [{k: x[k] for k in ("decode_only", "baseline", "clips_per_s")} for x in rounds],
        "videos": len(paths), "epochs": epochs, "cores": args.cores, "ray_decode_tasks": args.tasks or args.cores + 1,
        "udf_batch": args.udf_batch, "video_size": args.size, "frames": args.frames, "clip": spec.to_dict(),
        "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
