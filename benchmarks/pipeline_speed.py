"""Data pipeline speed and CPU cost: our Ray Data stream vs a DataLoader + PyAV baseline vs decode-only.

    python benchmarks/pipeline_speed.py [--quick] [--epochs 6] [--videos 256]

Same files, same clip spec, equal cores (2 by default), measured side by side in one run:
- decode-only: our decoder alone (`pipeline.decode.read_frames` with the clip's frame indices, reduced-size
  decode) in `cores` processes; no Ray, no transforms, no tokens. The floor any pipeline built on it pays.
- baseline: a PyTorchVideo/PySlowFast-style `torch.utils.data.Dataset` whose `__getitem__` opens the file with
  PyAV, decodes every frame of the clip window to full-size RGB, subsamples, short-side resizes (float), crops and
  tokenizes; `DataLoader(num_workers=cores)`.
- ours: `pipeline.dataset.build_dataset` read with `iter_torch_batches` on a local Ray with `cores` CPUs.
- ours k=2: the same with `clips_per_video=2` (one decode feeds two differently cropped clips). Its clips/s and
  videos/s are reported separately.

Speed: the contenders run in rounds, one epoch of each per round, so load drift hits them alike; the figures are
medians over rounds after the first (which also starts Ray's workers), ratios are taken within a round.
CPU cost: process CPU time (user + system) of every process a contender uses, divided by the clips it delivered:
the driver plus its DataLoader workers / its decode processes / every Ray process of this run (workers, raylet,
GCS, ...). Unlike clips/s this holds up on a loaded machine. Ours is broken down by stage: decode, sample/transform
and tokenize (timed inside the decode UDF), collate (timed on the consumer), the rest of the UDF (batch assembly,
error log), and Ray Data transport: the Ray workers' CPU outside the UDF (task start, Arrow conversion, object
store put), the driver's outside collate (streaming executor, block fetch, batching) and Ray's system processes.
RSS of every Ray process and of the driver is sampled every 0.5 s (its own CPU is left out of the driver's).
Ends with ONE JSON line of figures.
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

STAGES = ("decode", "sample_transform", "tokenize", "udf_other", "collate", "ray_worker_other", "driver_other",
          "ray_system")


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


# ----------------------------------------------------------------------------------------------- CPU accounting


def _kind(p) -> str | None:
    """'ray_worker' | 'ray_system' for this run's Ray processes, None otherwise. Only descendants of this driver
    are looked at (ray.init starts raylet/GCS as its children, workers are theirs): other people's Ray on a shared
    machine is not ours."""
    try:
        name, cmd = p.name(), " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return None
    if "default_worker" in cmd or name.startswith("ray::") or cmd.startswith("ray::"):
        return "ray_worker"
    if any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "ray/")):
        return "ray_system"
    return None


class ProcessCPU:
    """CPU seconds (user + system) of process groups: the driver, its Ray processes by kind, or given pids.

    `snapshot()` -> {pid: (group, cpu_s)}; `delta(a, b)` -> {group: seconds} spent between two snapshots (a process
    born in between counts from zero; one that died in between is lost, which none of ours does mid-epoch)."""

    def __init__(self):
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.kinds: dict[int, str | None] = {}
        self.extra: dict[int, str] = {}  # pid -> group, for processes that are not Ray's (decode pool, DataLoader)

    def snapshot(self) -> dict[int, tuple[str, float]]:
        out = {self.me.pid: ("driver", _cpu(self.me.cpu_times()))}
        for p in self.me.children(recursive=True):
            group = self.extra.get(p.pid)
            if group is None:
                if p.pid not in self.kinds:
                    self.kinds[p.pid] = _kind(p)
                group = self.kinds[p.pid]
            if group is None:
                continue
            try:
                out[p.pid] = (group, _cpu(p.cpu_times()))
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
        return out

    @staticmethod
    def delta(a: dict, b: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (group, cpu) in b.items():
            out[group] = out.get(group, 0.0) + cpu - a.get(pid, (group, 0.0))[1]
        return out


def _cpu(t) -> float:
    return t.user + t.system


def _ray_rss_mb() -> tuple[float, float]:
    import psutil

    me = psutil.Process()
    total = 0
    for p in me.children(recursive=True):
        try:
            if _kind(p):
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20, me.memory_info().rss / 2**20


class _Sampler:
    """Peak RSS of Ray's processes and of the driver while an epoch runs; knows its own CPU (left out of ours)."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self.driver_peak, self.cpu_s = every, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.thread_time()
        while not self._stop.is_set():
            r, d = _ray_rss_mb()
            self.peak, self.driver_peak = max(self.peak, r), max(self.driver_peak, d)
            self._stop.wait(self.every)
        self.cpu_s = time.thread_time() - t0

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ---------------------------------------------------------------------------------------------------- contenders


def _decode_only(args) -> int:
    from pipeline.decode import read_frames

    paths, spec, seed = args
    n = 0
    for p in paths:
        rng = np.random.default_rng([seed, len(p)])
        read_frames(p, lambda nf, fps, rng=rng: sample_indices(nf, spec, rng), short_side=spec.short_side)
        n += 1
    return n


class DecodeOnly:
    def __init__(self, paths, spec, cores: int, cpu: ProcessCPU):
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        self.chunks = [paths[i::cores] for i in range(cores)]
        self.spec, self.r, self.cpu = spec, 0, cpu
        self.ex = ProcessPoolExecutor(cores, mp_context=get_context("spawn"))
        list(self.ex.map(_decode_only, [(c[:2], spec, 0) for c in self.chunks]))  # imports, page cache
        for pid in self.ex._processes:
            cpu.extra[pid] = "decode_pool"

    def epoch(self) -> dict:
        self.r += 1
        s0, t0 = self.cpu.snapshot(), time.perf_counter()
        n = sum(self.ex.map(_decode_only, [(c, self.spec, self.r) for c in self.chunks]))
        dt, d = time.perf_counter() - t0, ProcessCPU.delta(s0, self.cpu.snapshot())
        return {"clips_per_s": n / dt, "cpu_s_per_clip": (d.get("driver", 0) + d.get("decode_pool", 0)) / n}

    def close(self):
        self.ex.shutdown()


class Baseline:
    def __init__(self, paths, labels, spec, cores: int, batch_size: int, cpu: ProcessCPU):
        import torch

        self.cpu = cpu
        self.dl = torch.utils.data.DataLoader(PyAVClipDataset(paths, labels, spec), batch_size=batch_size,
                                              shuffle=True, num_workers=cores, persistent_workers=True)

    def epoch(self) -> dict:
        t0, n = time.perf_counter(), 0
        it = iter(self.dl)  # persistent workers: started by the first epoch, reused after
        for worker in it._workers:
            self.cpu.extra[worker.pid] = "dataloader"
        s0 = self.cpu.snapshot()
        for b in it:
            n += b["tokens"].shape[0]
        dt, d = time.perf_counter() - t0, ProcessCPU.delta(s0, self.cpu.snapshot())
        return {"clips_per_s": n / dt, "cpu_s_per_clip": (d.get("driver", 0) + d.get("dataloader", 0)) / n}


class Ours:
    """Our pipeline on a local Ray with `cores` CPUs (one dataset per clips_per_video); `epoch(k)` reads one epoch,
    with CPU by stage and peak RSS."""

    def __init__(self, manifest, spec, cores: int, batch_size: int, tasks: int, udf_batch: int, prefetch: int,
                 cpu: ProcessCPU, ks=(1, 2)):
        import ray

        from pipeline.dataset import ErrorLog, build_dataset

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.cpu, self.batch_size, self.prefetch = cpu, batch_size, prefetch
        self.videos = manifest.num_rows
        self.logs, self.ds, self.e = {}, {}, {}
        for k in ks:
            self.logs[k] = ErrorLog(manifest.num_rows, None)
            # `tasks` decode tasks share the `cores` logical CPUs.
            self.ds[k] = build_dataset(manifest, spec, concurrency=tasks, num_cpus_per_task=round(cores / tasks, 3),
                                       seed=0, epoch=None, error_log=self.logs[k], batch_size=udf_batch,
                                       clips_per_video=k, profile=True)
            self.e[k] = 0

    def epoch(self, k: int = 1) -> dict:
        from pipeline.dataset import torch_collate

        self.logs[k].set_epoch(self.e[k])
        collate_s = [0.0]
        udf = np.zeros(4)

        def collate(batch):
            t = time.thread_time()
            udf[:] += batch["cpu_s"].sum(0)
            out = torch_collate(batch)
            collate_s[0] += time.thread_time() - t
            return out

        s0 = self.cpu.snapshot()
        with _Sampler() as sampler:
            t0, n, first = time.perf_counter(), 0, None
            for b in self.ds[k].iter_torch_batches(batch_size=self.batch_size, collate_fn=collate,
                                                   prefetch_batches=self.prefetch):
                n += b["tokens"].shape[0]
                first = first or time.perf_counter() - t0
            dt = time.perf_counter() - t0
        d = ProcessCPU.delta(s0, self.cpu.snapshot())
        driver = d.get("driver", 0.0) - sampler.cpu_s
        decode, transform, tokenize, call = udf.tolist()
        stages = {
            "decode": decode, "sample_transform": transform, "tokenize": tokenize,
            "udf_other": call - decode - transform - tokenize, "collate": collate_s[0],
            "ray_worker_other": d.get("ray_worker", 0.0) - call, "driver_other": driver - collate_s[0],
            "ray_system": d.get("ray_system", 0.0),
        }
        total = sum(stages.values())
        self.e[k] += 1
        return {"epoch": self.e[k] - 1, "clips": n, "seconds": dt, "clips_per_s": n / dt,
                "videos_per_s": n / k / dt, "startup_s": first or 0.0,
                "steady_clips_per_s": max(n - self.batch_size, 1) / max(dt - (first or 0), 1e-6),
                "cpu_s_per_clip": total / max(n, 1),
                "stage_cpu_s_per_clip": {s: v / max(n, 1) for s, v in stages.items()},
                "ray_rss_peak_mb": round(sampler.peak), "driver_rss_peak_mb": round(sampler.driver_peak)}

    def close(self):
        import ray

        ray.shutdown()


# ---------------------------------------------------------------------------------------------------------- main


def _median(xs) -> float:
    return float(np.median(xs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer videos and rounds (about two minutes)")
    ap.add_argument("--videos", type=int, default=None, help="videos (default 256; quick 128)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="rounds: one epoch of each contender per round (default 6; quick 3)")
    ap.add_argument("--cores", type=int, default=2, help="CPUs for each contender")
    ap.add_argument("--size", default="320x240", help="video size WxH (K400-like by default)")
    ap.add_argument("--frames", type=int, default=64, help="frames per video")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch (iter_torch_batches / DataLoader)")
    ap.add_argument("--tasks", type=int, default=None, help="concurrent decode tasks in Ray (default cores)")
    ap.add_argument("--udf-batch", type=int, default=None, help="videos per decode task (default build_dataset's)")
    ap.add_argument("--prefetch", type=int, default=2, help="iter_torch_batches prefetch_batches")
    ap.add_argument("--only-ours", action="store_true", help="skip decode-only and the baseline (tuning runs)")
    ap.add_argument("--data", default="~/.cache/mone/bench", help="where the benchmark videos are generated")
    args = ap.parse_args(argv)
    n_videos = args.videos or (128 if args.quick else 256)
    epochs = args.epochs or (3 if args.quick else 6)
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
    cpu = ProcessCPU()
    dec = None if args.only_ours else DecodeOnly(paths, spec, args.cores, cpu)
    base = None if args.only_ours else Baseline(paths, labels, spec, args.cores, args.batch_size, cpu)
    from pipeline.dataset import DEFAULT_UDF_BATCH

    udf_batch = args.udf_batch or DEFAULT_UDF_BATCH
    tasks = args.tasks or args.cores
    ours = Ours(manifest, spec, args.cores, args.batch_size, tasks, udf_batch, args.prefetch, cpu)
    rounds = []
    for r in range(epochs):
        d = dec.epoch() if dec else {"clips_per_s": float("nan"), "cpu_s_per_clip": float("nan")}
        bl = base.epoch() if base else {"clips_per_s": float("nan"), "cpu_s_per_clip": float("nan")}
        o, o2 = ours.epoch(1), ours.epoch(2)
        rounds.append({"decode_only": d, "baseline": bl, "ours": o, "ours_k2": o2})
        print(f"round {r}: clips/s decode-only {d['clips_per_s']:.1f} | baseline {bl['clips_per_s']:.1f} | ours "
              f"{o['clips_per_s']:.1f} (first batch {o['startup_s']:.1f} s) | ours k=2 {o2['clips_per_s']:.1f} "
              f"({o2['videos_per_s']:.1f} videos/s); CPU ms/clip decode-only {1e3 * d['cpu_s_per_clip']:.1f} | "
              f"baseline {1e3 * bl['cpu_s_per_clip']:.1f} | ours {1e3 * o['cpu_s_per_clip']:.1f} | k=2 "
              f"{1e3 * o2['cpu_s_per_clip']:.1f}; peak RSS Ray {o['ray_rss_peak_mb']} MB", flush=True)
        print("   ours CPU ms/clip by stage: " + ", ".join(
            f"{s} {1e3 * v:.2f}" for s, v in o["stage_cpu_s_per_clip"].items()), flush=True)
    ours.close()
    if dec:
        dec.close()
    later = rounds[1:] or rounds  # round 0 also starts Ray's worker processes (imports): a one-off

    def med(who: str, key: str) -> float:
        return _median([x[who][key] for x in later])

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        return _median([x[a[0]][a[1]] / x[b[0]][b[1]] for x in later])

    stage = {s: round(1e3 * _median([x["ours"]["stage_cpu_s_per_clip"][s] for x in later]), 3) for s in STAGES}
    stage_k2 = {s: round(1e3 * _median([x["ours_k2"]["stage_cpu_s_per_clip"][s] for x in later]), 3)
                for s in STAGES}
    transport = ("ray_worker_other", "driver_other", "ray_system")
    peaks = [x["ours"]["ray_rss_peak_mb"] for x in rounds]
    result = {
        "ours_clips_per_s": round(med("ours", "clips_per_s"), 2),
        "baseline_clips_per_s": round(med("baseline", "clips_per_s"), 2),
        "decode_only_clips_per_s": round(med("decode_only", "clips_per_s"), 2),
        "ours_cpu_s_per_clip": round(med("ours", "cpu_s_per_clip"), 4),
        "decode_only_cpu_s_per_clip": round(med("decode_only", "cpu_s_per_clip"), 4),
        "baseline_cpu_s_per_clip": round(med("baseline", "cpu_s_per_clip"), 4),
        "ours_clips_per_s_k2": round(med("ours_k2", "clips_per_s"), 2),
        "ours_videos_per_s_k2": round(med("ours_k2", "videos_per_s"), 2),
        "ours_cpu_s_per_clip_k2": round(med("ours_k2", "cpu_s_per_clip"), 4),
        "speedup_vs_baseline": round(ratio(("ours", "clips_per_s"), ("baseline", "clips_per_s")), 2),
        "cpu_per_clip_vs_decode_only": round(ratio(("ours", "cpu_s_per_clip"), ("decode_only", "cpu_s_per_clip")), 2),
        "k2_clips_speedup": round(ratio(("ours_k2", "clips_per_s"), ("ours", "clips_per_s")), 2),
        "fraction_of_decode_only": round(ratio(("ours", "clips_per_s"), ("decode_only", "clips_per_s")), 2),
        "ours_stage_cpu_ms_per_clip": stage,
        "ours_transport_cpu_ms_per_clip": round(sum(stage[s] for s in transport), 3),
        "ours_k2_stage_cpu_ms_per_clip": stage_k2,
        "ours_steady_clips_per_s": round(med("ours", "steady_clips_per_s"), 2),
        "ours_first_round_clips_per_s": round(rounds[0]["ours"]["clips_per_s"], 2),
        "epoch_startup_s": [round(x["ours"]["startup_s"], 2) for x in rounds],
        "peak_ray_rss_mb_per_epoch": peaks,
        "peak_driver_rss_mb_per_epoch": [x["ours"]["driver_rss_peak_mb"] for x in rounds],
        "rss_growth_mb_after_epoch0": round(max(peaks[1:] or peaks) - min(peaks[1:] or peaks), 1),
        "rounds": [{who: {"clips_per_s": round(x[who]["clips_per_s"], 2),
                          "cpu_ms_per_clip": round(1e3 * x[who]["cpu_s_per_clip"], 2)} for who in x}
                   for x in rounds],
        "videos": len(paths), "epochs": epochs, "cores": args.cores, "ray_decode_tasks": tasks,
        "udf_batch": udf_batch, "prefetch_batches": args.prefetch, "video_size": args.size, "frames": args.frames,
        "clip": spec.to_dict(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
