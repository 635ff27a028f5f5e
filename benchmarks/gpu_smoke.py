"""GPU smoke test: the real training, checkpoint and evaluation paths on one GPU, then dense vs MoNE step times.

    python benchmarks/gpu_smoke.py                      # one CUDA GPU: ~3-5 min on an H200 (dataset included)
    python benchmarks/gpu_smoke.py --out /tmp/smoke     # where the run, predictions and gpu_smoke.json go
    python benchmarks/gpu_smoke.py --cpu-test           # the same stages, tiny, on CPU (fp32, gloo): a rehearsal

Without a usable CUDA GPU (and without --cpu-test) it prints one line saying it skipped and exits 0.

Stages; each prints one `[gpu_smoke] PASS|FAIL|SKIPPED <stage>: ...` line and the run goes on after a failure:
  env       versions, the GPU, whether ray / deepspeed / a video decoder import; batches pinned by the collate
  data      a generated K400-layout dataset (pipeline.synth, H.264): 4 classes, 32 frames at 224 px; train clips are
            deterministic (centre crop, all frames), so the model can memorise them
  train     jobs.train.train(cfg): Ray Train with 1 GPU worker, NCCL, DeepSpeed bf16 ZeRO-2, vivit_b16 at 32 x 224,
            e_c drawn from {0.3, 1.0} per step, >= 20 steps, validation every epoch, one checkpoint at the end.
            Checks: every epoch's loss finite, the last below the first; validation top-1 at both budgets; the
            DeepSpeed module weights are bf16 and the inference checkpoint holds the fp32 masters (values bf16
            cannot hold); the checkpoint loads and runs on the GPU
  evaluate  `mone evaluate` (jobs.evaluate, in this process, same Ray) on the validation videos with that checkpoint:
            one GPU actor, both budgets, every video read
  bench     in this process, the plain model: training step (fwd + bwd + AdamW) and inference, dense vs e_c 0.3,
            bf16 autocast, warm-up, CUDA-event timing, median of repeats, interleaved; FLOPs ratio (models.flops)

Without ray or deepspeed the train and evaluate stages report SKIPPED. Heavy files (DeepSpeed checkpoints, weights)
are deleted at the end unless --keep. Ends with one JSON line (also written to OUT/gpu_smoke.json): gpu,
train_step_ms_dense, train_step_ms_ec0.3, infer_ms_dense, infer_ms_ec0.3, flops_ratio, per-stage status, and the
training run's steps, losses and top-1. Exit code 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Ray workers (Train, Data) start from this environment: they must import the project without an install.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PYTHONUNBUFFERED", "1")

CLASSES = 4
VAL_PER_CLASS = 2
BUDGETS = (0.3, 1.0)
MIN_STEPS = 20


class Skip(Exception):
    """The stage cannot run here (a missing package, no checkpoint); not a failure."""


class Check(Exception):
    """A check of the smoke test failed."""


class StageTimeout(Exception):
    pass


def log(msg: str) -> None:
    print(f"[gpu_smoke] {msg}", flush=True)


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise Check(msg)


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises StageTimeout in the main thread after `seconds` (a hung NCCL call or a stuck worker group would
    otherwise eat the whole device budget without a result)."""

    def on_alarm(signum, frame):
        raise StageTimeout(f"no result after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_stage(name: str, fn, results: dict, timeout: float) -> dict | None:
    t0 = time.perf_counter()
    try:
        with deadline(timeout):
            info, msg = fn()
        status = "PASS"
    except Skip as e:
        info, msg, status = None, str(e), "SKIPPED"
    except (Check, StageTimeout) as e:
        info, msg, status = None, str(e), "FAIL"
    except Exception as e:  # noqa: BLE001 - any error is this stage's failure; the next stages still run
        traceback.print_exc()
        info, msg, status = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", \
            "FAIL"
    results["stages"][name] = status
    log(f"{status} {name}: {msg} ({time.perf_counter() - t0:.1f} s)")
    return info


def importable(name: str) -> str | None:
    """The module's version if it imports, else None."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return None
    return str(getattr(mod, "__version__", "?"))


# =========================================================================== settings


def settings(args) -> dict:
    """Sizes for the GPU run, or the tiny CPU rehearsal."""
    if args.cpu_test:
        s = {"variant": "vivit_tiny", "frames": 8, "img": 64, "batch": args.batch or 4, "precision": "fp32",
             "lr": 2e-3, "workers_cpus": 0.5, "decode_cpus": 0.25, "decode_concurrency": 2}
    else:
        s = {"variant": "vivit_b16", "frames": 32, "img": 224, "batch": args.batch or 8, "precision": "bf16",
             "lr": 2e-4, "workers_cpus": 4, "decode_cpus": 1, "decode_concurrency": 8}
    s["train_per_class"] = s["batch"]  # 4 classes x batch videos: 4 steps per epoch on one worker
    steps_per_epoch = CLASSES * s["train_per_class"] // s["batch"]
    s["epochs"] = max(2, math.ceil(MIN_STEPS / steps_per_epoch)) + (0 if args.quick else 1)
    s["repeats"] = 5 if args.quick else 10
    return s


def train_config(s: dict, data_root: Path, out: Path, use_gpu: bool) -> dict:
    from models.vit import get_config

    return {
        "name": "gpu_smoke",
        "data": {"layout": "k400", "root": str(data_root), "train_split": "train", "val_split": "validate",
                 "num_frames": s["frames"], "sampling": "dense", "stride": 1, "short_side": s["img"],
                 "crop_size": s["img"], "tubelet_t": 2, "patch": get_config(s["variant"]).patch_size, "flip": False,
                 "train_crop": "center",
                 "decoder": "auto", "decode_cpus": s["decode_cpus"], "decode_concurrency": s["decode_concurrency"],
                 "val_views": "1x1"},
        "model": {"variant": s["variant"], "overrides": {"img_size": s["img"], "num_frames": s["frames"]}},
        "optim": {"epochs": s["epochs"], "batch_size": s["batch"], "lr": s["lr"], "min_lr": s["lr"] / 20,
                  "weight_decay": 0.0, "warmup_epochs": 1.0, "label_smoothing": 0.0},
        "mone": {"train_budgets": list(BUDGETS), "val_budgets": list(BUDGETS), "dense_epochs": 0},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu, "cpus_per_worker": s["workers_cpus"], "gpus_per_worker": 1,
                    "zero_stage": 2, "precision": s["precision"]},
        "run": {"name": "smoke", "storage_path": str(out / "runs"), "max_failures": 0, "checkpoint_every": s["epochs"],
                "num_to_keep": 1, "log_every": 4},
    }


# =========================================================================== stages


def stage_env(args, s, res):
    import torch

    cuda = torch.cuda.is_available()
    res["torch"], res["cuda"] = torch.__version__, torch.version.cuda
    res["ray"], res["deepspeed"] = importable("ray"), importable("deepspeed")
    decoders = [m for m in ("decord", "av") if importable(m)]
    res["decoders"] = decoders
    parts = [f"torch {torch.__version__} (CUDA build {torch.version.cuda})", f"ray {res['ray']}",
             f"deepspeed {res['deepspeed']}", f"decoders {decoders or 'none'}"]
    if cuda:
        p = torch.cuda.get_device_properties(0)
        res["gpu"] = p.name
        res["gpu_memory_gb"] = round(p.total_memory / 2**30, 1)
        check(torch.cuda.is_bf16_supported(), f"{p.name} has no bf16 support: the training recipe needs it")
        # The training loop's collate pins batches (so non_blocking copies overlap); check it really does here.
        import numpy as np

        from pipeline.dataset import TorchCollate

        b = TorchCollate(pin=True)({"tokens": np.zeros((2, 1, 4, 8), np.uint8), "label": np.zeros(2),
                                    "path": ["a", "b"]})
        check(b["tokens"].is_pinned() and b["label"].is_pinned(), "the collate did not pin the batch")
        parts.insert(0, f"{p.name}, {res['gpu_memory_gb']} GiB, capability {p.major}.{p.minor}; batches pinned")
    else:
        res["gpu"] = None
        parts.insert(0, "CPU rehearsal (--cpu-test)")
    return None, "; ".join(parts)


def stage_data(args, s, res, out: Path):
    if "av" not in res["decoders"]:
        raise Skip("PyAV is needed to write the videos (pip install av)")
    from pipeline.synth import generate

    root = out / "data"
    if (root / "synth.json").is_file():
        shutil.rmtree(root)
    t = time.perf_counter()
    side = s["img"]
    r = generate(root, "k400", classes=CLASSES, videos_per_class=s["train_per_class"],
                 val_videos_per_class=VAL_PER_CLASS, test_videos_per_class=0, corrupt=0, width=side, height=side,
                 frames=s["frames"], fps=8, seed=0, workers=min(8, os.cpu_count() or 1), progress=False)
    res["data"] = {"root": str(root), "train_videos": r.counts["train"], "val_videos": r.counts["validate"],
                   "seconds": round(time.perf_counter() - t, 1)}
    return root, (f"{r.counts['train']} train + {r.counts['validate']} val videos, {s['frames']} frames at "
                  f"{side} px, in {res['data']['seconds']} s -> {root}")


def stage_train(args, s, res, out: Path, data_root: Path | None, use_gpu: bool):
    if data_root is None:
        raise Skip("no dataset (data stage did not pass)")
    if res["ray"] is None or res["deepspeed"] is None:
        raise Skip(f"needs ray and deepspeed (ray {res['ray']}, deepspeed {res['deepspeed']})")
    import torch
    import yaml

    from jobs.checkpoint import load_inference
    from jobs.config import load_config
    from jobs.train import train

    cfg_path = out / "smoke_config.yaml"
    cfg_path.write_text(yaml.safe_dump(train_config(s, data_root, out, use_gpu), sort_keys=False))
    cfg = load_config(str(cfg_path))
    run_dir = out / "runs" / "smoke"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume of an older one
    summary = train(cfg)
    print(json.dumps(summary), flush=True)
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in history]
    res["train"] = {"steps": summary["global_step"], "epochs": summary["epochs"], "wall_s": summary["wall_s"],
                    "epoch_losses": [round(x, 4) for x in losses],
                    "val_top1": {str(b): summary.get(f"top1_ec{b}") for b in BUDGETS},
                    "val_clips_per_s": {str(b): summary.get(f"clips_per_s_ec{b}") for b in BUDGETS},
                    "train_clips_per_s": [round(m["train_clips_per_s"], 2) for m in history]}
    check(summary["epochs"] == cfg.optim.epochs, f"{summary['epochs']} epochs of {cfg.optim.epochs} finished")
    check(summary["global_step"] >= MIN_STEPS, f"only {summary['global_step']} steps (want >= {MIN_STEPS})")
    check(summary["bad_videos"] == 0, f"{summary['bad_videos']} videos could not be decoded")
    check(all(math.isfinite(x) for x in losses), f"a loss is not finite: {losses}")
    check(losses[-1] < losses[0], f"the loss did not fall: per epoch {losses}")
    for b in BUDGETS:
        check(summary.get(f"top1_ec{b}") is not None, f"no validation top-1 at e_c {b}")

    # The DeepSpeed checkpoint's module weights are the training dtype; the inference weights the fp32 masters.
    ds_states = list(Path(summary["ray_checkpoint"]).glob("deepspeed/*/mp_rank_00_model_states.pt"))
    check(len(ds_states) == 1, f"no DeepSpeed model states under {summary['ray_checkpoint']}")
    module = torch.load(ds_states[0], map_location="cpu", weights_only=False)["module"]
    module_dtypes = sorted({str(v.dtype) for v in module.values() if v.is_floating_point()})
    want = "torch.bfloat16" if s["precision"] == "bf16" else "torch.float32"
    check(module_dtypes == [want], f"DeepSpeed trained in {module_dtypes}, expected {want}")
    from jobs.checkpoint import weights_path
    from models.weights import read_state_dict

    weights = read_state_dict(weights_path(summary["checkpoint"]))
    check(all(v.dtype == torch.float32 for v in weights.values()), "inference weights are not all fp32")
    beyond_bf16 = sum(not torch.equal(v, v.bfloat16().float()) for v in weights.values())
    check(beyond_bf16 > 0, "every inference weight is bf16-representable: saved from bf16 copies, not fp32 masters")
    ck = load_inference(summary["checkpoint"], device="cuda" if use_gpu else "cpu")
    m = ck.model.cfg
    tokens = torch.randint(0, 256, (2, m.temporal_tokens * m.num_patches, m.token_dim), dtype=torch.uint8,
                           device="cuda" if use_gpu else "cpu")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_gpu):
        logits = ck.model.forward_tokens(tokens, budget=0.3)
    check(bool(torch.isfinite(logits.float()).all()), "the loaded checkpoint gives non-finite logits")
    del ck
    res["train"]["checkpoint"] = summary["checkpoint"]
    top1 = ", ".join(f"top-1@{b} {100 * summary[f'top1_ec{b}']:.0f}%" for b in BUDGETS)
    msg = (f"{summary['global_step']} steps in {summary['epochs']} epochs ({summary['wall_s']} s with Ray start-up); "
           f"loss per epoch {' '.join(f'{x:.3f}' for x in losses)}; {top1} on {history[-1]['val_clips']} val clips; "
           f"DeepSpeed weights {want.split('.')[1]}, inference checkpoint fp32 masters "
           f"({beyond_bf16}/{len(weights)} tensors beyond bf16)")
    return summary["checkpoint"], msg


def stage_evaluate(args, s, res, out: Path, data_root: Path | None, checkpoint: str | None, use_gpu: bool):
    if checkpoint is None or data_root is None:
        raise Skip("no checkpoint (train stage did not pass)")
    if res["ray"] is None:
        raise Skip("needs ray")
    from jobs.cli import main as mone

    preds = out / "preds.parquet"
    argv = ["evaluate", "--checkpoint", checkpoint, "--videos", str(data_root), "--split", "validate",
            "--budget", ",".join(str(b) for b in BUDGETS), "--out", str(preds), "--overwrite", "--no-progress"]
    log("mone " + " ".join(argv))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = mone(argv)
    sys.stdout.write(buf.getvalue())
    check(rc == 0, f"mone evaluate exited {rc}")
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    n_val = res["data"]["val_videos"]
    res["evaluate"] = {k: summary.get(k) for k in ("videos", "errors", "device", "actors", "top1", "videos_per_s",
                                                    "seconds")}
    check(summary["videos"] == n_val and summary["errors"] == 0,
          f"{summary['videos']} videos, {summary['errors']} errors (want {n_val}, 0)")
    want_device = "cuda" if use_gpu else "cpu"
    check(summary.get("device") == want_device, f"evaluated on {summary.get('device')}, expected {want_device}")
    check(set(summary.get("top1") or {}) == {str(b) for b in BUDGETS}, f"top-1 per budget: {summary.get('top1')}")
    return None, (f"{summary['videos']} videos x {len(BUDGETS)} budgets on {summary['device']} "
                  f"({summary['actors']} actor(s)), top-1 {summary['top1']}, {summary['seconds']} s")


def stage_bench(args, s, res, use_gpu: bool):
    import torch
    import torch.nn.functional as F

    from models.capacity import capacities_for_budget
    from models.flops import model_flops
    from models.vit import create_model

    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    model = create_model(s["variant"], num_classes=400, img_size=s["img"], num_frames=s["frames"]).to(device)
    cfg = model.cfg
    B = s["batch"]
    tokens = torch.randint(0, 256, (B, cfg.temporal_tokens * cfg.num_patches, cfg.token_dim), dtype=torch.uint8,
                           device=device)  # (B, L, K)
    labels = torch.randint(0, 400, (B,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    caps = {"dense": None, "ec0.3": capacities_for_budget(0.3)}
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=use_gpu)

    def train_step(budget):
        with torch.autocast(**amp):
            loss = F.cross_entropy(model.forward_tokens(tokens, budget=budget).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def infer(budget):
        with torch.inference_mode(), torch.autocast(**amp):
            return model.forward_tokens(tokens, budget=budget)

    def timed_ms(fn) -> float:
        if use_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)

    out: dict[str, float] = {}
    for kind, fn in (("train_step", train_step), ("infer", infer)):
        model.train(kind == "train_step")
        peak = {}
        for name, c in caps.items():  # warm-up (allocator, kernels' autotuning), peak memory per contender
            if use_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                r = fn(c)
            check(bool(torch.isfinite(r.float()).all()), f"{kind} at {name} is not finite")
            if use_gpu:
                torch.cuda.synchronize()
                peak[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        times: dict[str, list[float]] = {k: [] for k in caps}
        names = list(caps)
        for r in range(s["repeats"]):  # interleaved, order alternating: drift hits both alike
            for name in names[r % 2 :] + names[: r % 2]:
                times[name].append(timed_ms(lambda c=caps[name], f=fn: f(c)))
        for name in caps:
            out[f"{kind}_ms_{name}"] = round(statistics.median(times[name]), 3)
        if peak:
            out[f"{kind}_peak_gib"] = peak
    f_dense, f_03 = model_flops(cfg), model_flops(cfg, capacities=caps["ec0.3"])
    out["flops_ratio"] = round(f_dense / f_03, 3)
    out["train_speedup_ec0.3"] = round(out["train_step_ms_dense"] / out["train_step_ms_ec0.3"], 3)
    out["infer_speedup_ec0.3"] = round(out["infer_ms_dense"] / out["infer_ms_ec0.3"], 3)
    res.update(out)
    res["bench"] = {"variant": s["variant"], "frames": s["frames"], "img_size": s["img"], "batch": B,
                    "repeats": s["repeats"], "dtype": "bf16 autocast" if use_gpu else "fp32"}
    return None, (f"{s['variant']} {s['frames']}x{s['img']} batch {B}: train step {out['train_step_ms_dense']:.1f} "
                  f"vs {out['train_step_ms_ec0.3']:.1f} ms ({out['train_speedup_ec0.3']:.2f}x), inference "
                  f"{out['infer_ms_dense']:.1f} vs {out['infer_ms_ec0.3']:.1f} ms ({out['infer_speedup_ec0.3']:.2f}x), "
                  f"FLOPs ratio {out['flops_ratio']:.2f}x (dense vs e_c 0.3, median of {s['repeats']})")


# =========================================================================== main


def cleanup(out: Path) -> list[str]:
    """Deletes the heavy files (DeepSpeed checkpoints, weights) so OUT stays small enough to copy around."""
    removed = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.stat().st_size > 20 * 2**20:
            removed.append(f"{p.relative_to(out)} ({p.stat().st_size / 2**20:.0f} MiB)")
            p.unlink()
    return removed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_smoke", help="output directory (default: runs/gpu_smoke)")
    ap.add_argument("--batch", type=int, default=None,
                    help="clips per training step and per benchmark call (default 8; 4 with --cpu-test)")
    ap.add_argument("--quick", action="store_true", help="5 benchmark repeats instead of 10, one epoch fewer")
    ap.add_argument("--cpu-test", action="store_true",
                    help="rehearse every stage on CPU: vivit_tiny, 8 frames at 64 px, fp32, gloo")
    ap.add_argument("--stages", default="data,train,evaluate,bench",
                    help="comma-separated stages to run after env (default: all)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per stage before it counts as hung (default 300 GPU, 900 CPU)")
    ap.add_argument("--data", default=None,
                    help="use this dataset instead of generating one (the data stage needs PyAV to write videos): "
                         "pipeline.synth.generate(DIR, 'k400', classes=4, videos_per_class=8, val_videos_per_class=2, "
                         "test_videos_per_class=0, corrupt=0, width=224, height=224, frames=32, fps=8, seed=0)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and weights (deleted by default)")
    args = ap.parse_args()

    import torch

    use_gpu = torch.cuda.is_available() and not args.cpu_test
    if not use_gpu and not args.cpu_test:
        print(json.dumps({"benchmark": "gpu_smoke", "skipped": True,
                          "reason": f"no usable CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                                    "nothing to test here (--cpu-test rehearses the stages on CPU)"}))
        return 0
    t0 = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = settings(args)
    timeout = args.timeout or (300 if use_gpu else 900)
    stages = {x.strip() for x in args.stages.split(",") if x.strip()}
    res: dict = {"benchmark": "gpu_smoke", "device": "cuda" if use_gpu else "cpu", "stages": {}, "out": str(out)}
    log(f"output directory {out}; {s['variant']} {s['frames']} frames x {s['img']} px, batch {s['batch']}, "
        f"{s['epochs']} epochs of {CLASSES * s['train_per_class'] // s['batch']} steps")

    run_stage("env", lambda: stage_env(args, s, res), res, 120)
    data_root = checkpoint = None
    if args.data:  # a dataset generated elsewhere (a machine without PyAV cannot write the videos)
        data_root = Path(args.data).expanduser().resolve()
        if not (data_root / "synth.json").is_file():
            ap.error(f"--data {data_root}: no synth.json there; generate it with pipeline.synth.generate (see --help)")
        res["data"] = {"root": str(data_root), "val_videos": CLASSES * VAL_PER_CLASS, "pregenerated": True}
    elif "data" in stages:
        data_root = run_stage("data", lambda: stage_data(args, s, res, out), res, timeout)
    elif (out / "data" / "synth.json").is_file():
        data_root = out / "data"
        res["data"] = {"root": str(data_root), "val_videos": CLASSES * VAL_PER_CLASS}
    if "train" in stages:
        checkpoint = run_stage("train", lambda: stage_train(args, s, res, out, data_root, use_gpu), res, timeout)
    elif (out / "runs" / "smoke" / "inference" / "inference.json").is_file():
        checkpoint = str(out / "runs" / "smoke" / "inference")
    if "evaluate" in stages:
        run_stage("evaluate", lambda: stage_evaluate(args, s, res, out, data_root, checkpoint, use_gpu), res, timeout)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # the Train/Data workers give back their GPU memory before the benchmark
    if "bench" in stages:
        run_stage("bench", lambda: stage_bench(args, s, res, use_gpu), res, timeout)

    if not args.keep:
        removed = cleanup(out)
        if removed:
            log(f"deleted {len(removed)} heavy file(s) (--keep keeps them): {', '.join(removed)}")
    res["ok"] = all(v != "FAIL" for v in res["stages"].values())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    for key in ("train_step_ms_dense", "train_step_ms_ec0.3", "infer_ms_dense", "infer_ms_ec0.3", "flops_ratio"):
        res.setdefault(key, None)
    line = json.dumps(res)
    (out / "gpu_smoke.json").write_text(line + "\n")
    failed = [k for k, v in res["stages"].items() if v == "FAIL"]
    log(f"{'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'} in {res['wall_s']} s; "
        f"summary {out / 'gpu_smoke.json'}")
    print(line, flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
