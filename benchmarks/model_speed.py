"""Dense vs MoNE: FLOPs and measured wall-clock, side by side in one process.

    python benchmarks/model_speed.py            # full: vivit_b16 32x224 and vit_b16 224, batch 1 and 8
    python benchmarks/model_speed.py --quick    # fewer repeats, no vivit_b16 batch-8 training
    python benchmarks/model_speed.py --device cuda

For each case, dense (budget=None) and MoNE at e_c in {0.3, 0.5} run interleaved (the order rotates every
round) and the median is taken, so load from other processes hits all of them alike. Then a training step
(forward + backward) dense vs e_c = 0.3, and a torch.profiler breakdown of where MoNE's forward time goes.
fp32 on CPU (no bf16 units here), bf16 autocast on CUDA. Ends with one JSON line; ratios are dense / MoNE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.flops import model_flops  # noqa: E402
from models.vit import create_model  # noqa: E402

BUDGETS = (0.3, 0.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and process-CPU seconds per call; the calls of one round run back to back in a rotating
    order. CPU time leaves out the time other processes held the cores (with one thread it is the load-robust
    figure; with two it also counts spin-waiting)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            _sync(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()}


def make_input(cfg, batch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (
        (batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size) if cfg.video else (batch, 3, cfg.img_size, cfg.img_size)
    )
    return torch.randn(shape, generator=g).to(device)


def bench_inference(
    model, batch: int, rounds: int, device: torch.device, warm_all: bool = True, budgets_ec=BUDGETS
) -> dict:
    cfg = model.cfg
    x = make_input(cfg, batch, device)
    budgets: dict[str, float | None] = {"dense": None, **{f"ec{b}": b for b in budgets_ec}}
    fns = {k: (lambda b=b: model(x, b)) for k, b in budgets.items()}
    with torch.inference_mode(), _autocast(device):
        for f in list(fns.values()) if warm_all else [fns[f"ec{BUDGETS[0]}"]]:  # allocator, BLAS plans, cache
            f()
        med, cpu = interleaved(fns, rounds, device)
    dense_flops = model_flops(cfg, None, num_classes=model.head.fc.out_features) * batch
    out = {
        "batch": batch,
        "rounds": rounds,
        "dense_ms": round(med["dense"] * 1e3, 1),
        "dense_gflops": dense_flops / 1e9,
    }
    for k, b in budgets.items():
        if b is None:
            continue
        fl = model_flops(cfg, b, num_classes=model.head.fc.out_features) * batch
        out[f"{k}_ms"] = round(med[k] * 1e3, 1)
        out[f"{k}_gflops"] = round(fl / 1e9, 2)
        out[f"flops_ratio_{k}"] = round(dense_flops / fl, 3)
        out[f"wall_ratio_{k}"] = round(med["dense"] / med[k], 3)
        out[f"wall_over_flops_{k}"] = round(out[f"wall_ratio_{k}"] / out[f"flops_ratio_{k}"], 3)
        out[f"cpu_ratio_{k}"] = round(cpu["dense"] / cpu[k], 3)
    out["dense_gflops"] = round(dense_flops / 1e9, 2)
    out["dense_gflops_per_s"] = round(dense_flops / 1e9 / med["dense"], 1)
    return out


def bench_train(model, batch: int, rounds: int, device: torch.device, budget: float = 0.3) -> dict:
    """Forward + backward (no optimiser step: that cost is the same dense or MoNE)."""
    cfg = model.cfg
    x = make_input(cfg, batch, device)
    y = torch.arange(batch, device=device) % model.head.fc.out_features
    model.train()

    def step(b):
        model.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x, b), y)
        loss.backward()

    fns = {"dense": lambda: step(None), f"ec{budget}": lambda: step(budget)}
    for f in fns.values():
        f()
    med, cpu = interleaved(fns, rounds, device)
    model.zero_grad(set_to_none=True)
    model.eval()
    n = model.head.fc.out_features
    return {
        "batch": batch,
        "rounds": rounds,
        "dense_ms": round(med["dense"] * 1e3, 1),
        f"ec{budget}_ms": round(med[f"ec{budget}"] * 1e3, 1),
        f"flops_ratio_ec{budget}": round(
            model_flops(cfg, None, num_classes=n) / model_flops(cfg, budget, num_classes=n), 3
        ),
        f"wall_ratio_ec{budget}": round(med["dense"] / med[f"ec{budget}"], 3),
        f"cpu_ratio_ec{budget}": round(cpu["dense"] / cpu[f"ec{budget}"], 3),
    }


GROUPS = (  # first match wins; self time of each op, so nothing is counted twice
    ("attention", ("scaled_dot_product", "attention")),
    ("routing", ("topk", "sort", "scatter", "gather", "softmax", "index")),
    ("projections", ("addmm", "aten::mm", "aten::bmm", "matmul", "linear", "gemm")),
    ("embed", ("convolution", "conv2d", "conv3d")),
    ("norm", ("layer_norm",)),
    ("activation", ("gelu",)),
    ("residual/scale", ("aten::add", "addcmul", "aten::mul")),
    ("copies", ("copy_", "clone", "cat", "contiguous", "empty", "zero", "fill")),
)


def profile_forward(model, batch: int, budget: float | None, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    x = make_input(model.cfg, batch, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), _autocast(device):
        model(x, budget)
        with profile(activities=acts) as prof:
            model(x, budget)
            _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        group = next((g for g, keys in GROUPS if any(k in ev.key for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + getattr(ev, attr)
    total = sum(totals.values()) or 1.0
    return {g: round(v / total, 3) for g, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and never trim it, so buffers freed by one forward are reused
    by the next instead of being unmapped and faulted in again (costly on these VMs). Linux/glibc only."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**62)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats; skips the vivit_b16 batch-8 train step")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip-batch8", action="store_true", help="only batch 1 (for a very loaded machine)")
    ap.add_argument("--smoke", action="store_true", help="vit_tiny / vivit_tiny instead of B/16: checks the script")
    ap.add_argument("--malloc-keep", action="store_true", help="glibc: never return freed memory (no page faults)")
    args = ap.parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_keep:
        keep_freed_memory()
    torch.manual_seed(0)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load0 is not None and load0 > 1.5 and torch.get_num_threads() > 1:
        print(
            f"note: load average {load0:.1f} on {os.cpu_count()} cores; a descheduled 2nd OpenMP thread slows "
            "small ops (MoNE has more of them) far more than big ones. Compare with --threads 1.",
            flush=True,
        )
    t_start = time.time()
    q = args.quick
    # (variant, batch, inference rounds, train rounds or 0); vivit_b16 at batch 8 is ~4.5 TFLOP per dense
    # forward (about a minute on 2 idle cores): one round of dense and e_c = 0.3.
    vivit, vit = ("vivit_tiny", "vit_tiny") if args.smoke else ("vivit_b16", "vit_b16")
    plan = [
        (vivit, 1, 3 if q else 5, 2 if q else 3),
        (vit, 1, 5 if q else 9, 3 if q else 5),
        (vit, 8, 3 if q else 5, 2 if q else 3),
    ]
    if not args.skip_batch8:
        plan.append((vivit, 8, 1 if q else 2, 0))
    results: dict[str, dict] = {}
    models = {}
    for name, batch, rounds, train_rounds in plan:
        if name not in models:
            models[name] = create_model(name, num_classes=400).to(device).eval()
        model = models[name]
        key = f"{name}_b{batch}"
        print(f"[{time.time() - t_start:6.0f}s] {key}: inference, {rounds} interleaved rounds", flush=True)
        big = name == vivit and batch > 1  # dense and e_c = 0.3 only, warmed up by the cheaper one
        bud = BUDGETS[:1] if big else BUDGETS
        results[key] = {"inference": bench_inference(model, batch, rounds, device, not big, bud)}
        print("   ", results[key]["inference"], flush=True)
        if train_rounds:
            print(f"[{time.time() - t_start:6.0f}s] {key}: train step, {train_rounds} rounds", flush=True)
            results[key]["train"] = bench_train(model, batch, train_rounds, device)
            print("   ", results[key]["train"], flush=True)
    print(f"[{time.time() - t_start:6.0f}s] profile {vivit}_b1", flush=True)
    prof = {
        "mone_ec0.3": profile_forward(models[vivit], 1, 0.3, device),
        "dense": profile_forward(models[vivit], 1, None, device),
    }
    print("    where the time goes (share of op self-time):", prof, flush=True)

    main_inf, main_train = results[f"{vivit}_b1"]["inference"], results[f"{vivit}_b1"]["train"]
    summary = {
        "benchmark": "model_speed",
        "variant": vivit,
        "malloc_keep": args.malloc_keep,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "flops_ratio_ec0.3": main_inf["flops_ratio_ec0.3"],
        "wall_ratio_ec0.3": main_inf["wall_ratio_ec0.3"],
        "train_wall_ratio_ec0.3": main_train["wall_ratio_ec0.3"],
        "cpu_ratio_ec0.3": main_inf["cpu_ratio_ec0.3"],
        "train_cpu_ratio_ec0.3": main_train["cpu_ratio_ec0.3"],
        "flops_ratio_ec0.5": main_inf["flops_ratio_ec0.5"],
        "wall_ratio_ec0.5": main_inf["wall_ratio_ec0.5"],
        "inference_target_met": main_inf["wall_ratio_ec0.3"] >= 0.7 * main_inf["flops_ratio_ec0.3"],
        "train_target_met": main_train["wall_ratio_ec0.3"] >= 0.6 * main_train["flops_ratio_ec0.3"],
        "cases": results,
        f"profile_{vivit}_b1": prof,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
