"""Training throughput, MoNE vs dense at equal model, data pipeline included.

The same Ray Data stream (decode -> sample -> tokens, pipeline.dataset.build_dataset) feeds one training process
(forward + backward + AdamW step). Three contenders run in interleaved rounds over the same clips, so machine load
hits them alike: dense (e_c = 1), MoNE at e_c = 0.3, and MoNE with e_c drawn per step from the paper's training set
{0.15, ..., 0.95}. Prints clips/s per contender, the FLOPs ratio (analytic, fwd+bwd = 3x forward) and the ratio of
measured speed-up to FLOPs ratio, then one JSON line. It also times how long each step waited for its batch: when
that data-wait exceeds 30 % of step time (`jobs.progress.INPUT_BOUND_FRACTION`, the threshold training warns at)
for a contender, the run was input-bound, its clips/s measure the pipeline rather than the model, and the JSON line
says so (`input_bound`, `data_wait_fraction_*`).

    python benchmarks/train_speed.py                # vivit_s16 at 112 px, 8 frames (CPU-sized)
    python benchmarks/train_speed.py --quick        # fewer steps
    python benchmarks/train_speed.py --device cuda --img-size 224 --frames 16 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.capacity import capacities_for_budget
from models.flops import model_flops
from models.vit import create_model

PAPER_BUDGETS = [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="vivit_s16")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="steps per contender per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores but the decoder's)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 3
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from jobs.progress import INPUT_BOUND_FRACTION
    from pipeline.dataset import TorchCollate, build_dataset
    from pipeline.manifest import build_manifest, select_split
    from pipeline.sampling import ClipSpec
    from pipeline.synth import generate

    device = torch.device(args.device)
    cpus = os.cpu_count() or 2
    torch.set_num_threads(args.threads or max(1, cpus - 1))
    amp = torch.bfloat16 if device.type == "cuda" else None  # bf16 on GPU; fp32 on CPU (no bf16 units)

    n_clips = args.batch * args.steps * 3 * args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "k400"
        side = args.img_size + args.img_size // 7
        generate(root, layout="k400", classes=8, videos_per_class=max(2, n_clips // 8 // 2 + 1), val_videos_per_class=0,
                 test_videos_per_class=0, width=side, height=side, frames=args.frames * 2, seed=0, progress=False)
        manifest = select_split(build_manifest(root, "k400").table, "train")
        spec = ClipSpec(num_frames=args.frames, sampling="dense", stride=2, short_side=args.img_size,
                        crop_size=args.img_size, tubelet_t=2, patch=16, train=True, flip=True)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ds = build_dataset(manifest, spec, num_cpus_per_task=0.5, concurrency=1, epoch=None)

        model = create_model(args.variant, num_classes=8, img_size=args.img_size, num_frames=args.frames).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)
        contenders = {
            "dense": lambda: None,
            "mone_ec0.3": lambda: capacities_for_budget(0.3),
            "mone_sampled": lambda: capacities_for_budget(float(rng.choice(PAPER_BUDGETS))),
        }

        def batches():
            while True:  # the stream re-executes each pass (an epoch)
                yield from ds.iter_torch_batches(batch_size=args.batch, drop_last=True, prefetch_batches=2,
                                                 collate_fn=TorchCollate())

        stream = batches()

        def step(budget) -> float:
            """One training step; returns the seconds it waited for its batch."""
            t = time.perf_counter()
            b = next(stream)
            wait = time.perf_counter() - t
            tokens = b["tokens"][:, 0].to(device, non_blocking=True)  # (B, L, K) uint8
            label = b["label"].to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model.forward_tokens(tokens, budget=budget).float(), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return wait

        for budget in contenders.values():  # warm-up: allocator, first decodes
            step(budget())
        rates: dict[str, list[float]] = {k: [] for k in contenders}
        waits: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            for name, budget in contenders.items():
                t = time.perf_counter()
                waited = sum(step(budget()) for _ in range(args.steps))
                dt = time.perf_counter() - t
                rates[name].append(args.steps * args.batch / dt)
                waits[name].append(waited / dt)
                print(f"round {r + 1}/{args.rounds} {name:13s} {rates[name][-1]:7.2f} clips/s, data-wait "
                      f"{100 * waits[name][-1]:.0f}%", flush=True)
        stream.close()  # stop the open Ray Data iterator before Ray goes away (else its threads log errors)
        ray.shutdown()

    cfg = model.cfg
    dense_f = model_flops(cfg)
    f03 = model_flops(cfg, capacities=capacities_for_budget(0.3))
    f_sampled = statistics.mean(model_flops(cfg, capacities=capacities_for_budget(b)) for b in PAPER_BUDGETS)
    med = {k: statistics.median(v) for k, v in rates.items()}
    flops_ratio, flops_ratio_s = dense_f / f03, dense_f / f_sampled
    wait = {k: sum(v) / len(v) for k, v in waits.items()}  # mean data-wait fraction over rounds
    input_bound = sorted(k for k, v in wait.items() if v > INPUT_BOUND_FRACTION)
    speed, speed_s = med["mone_ec0.3"] / med["dense"], med["mone_sampled"] / med["dense"]
    print(f"\n{args.variant} {args.img_size}px x {args.frames} frames, batch {args.batch}, {device.type}; "
          f"train step GFLOPs/clip (3x forward): dense {3 * dense_f / 1e9:.2f}, e_c 0.3 {3 * f03 / 1e9:.2f}")
    print(f"  dense          {med['dense']:7.2f} clips/s")
    print(f"  MoNE e_c 0.3   {med['mone_ec0.3']:7.2f} clips/s   speed-up {speed:.2f}x for {flops_ratio:.2f}x "
          f"fewer FLOPs ({speed / flops_ratio:.2f} of the FLOPs ratio; target >= 0.5)")
    print(f"  MoNE sampled   {med['mone_sampled']:7.2f} clips/s   speed-up {speed_s:.2f}x for {flops_ratio_s:.2f}x "
          f"fewer FLOPs ({speed_s / flops_ratio_s:.2f})")
    print("  data-wait: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in wait.items()) + (
        f" -> INPUT-BOUND ({', '.join(input_bound)}): these clips/s measure the data pipeline, not the model; give "
        "decoding more CPUs or use clips_per_video" if input_bound else " -> not input-bound"))
    print(json.dumps({
        "benchmark": "train_speed", "variant": args.variant, "img_size": args.img_size, "frames": args.frames,
        "batch": args.batch, "device": device.type, "dense_clips_per_s": round(med["dense"], 3),
        "mone_ec0.3_clips_per_s": round(med["mone_ec0.3"], 3),
        "mone_sampled_clips_per_s": round(med["mone_sampled"], 3),
        "flops_ratio_ec0.3": round(flops_ratio, 3), "speedup_ec0.3": round(speed, 3),
        "speedup_over_flops_ratio_ec0.3": round(speed / flops_ratio, 3), "flops_ratio_sampled": round(flops_ratio_s, 3),
        "speedup_sampled": round(speed_s, 3), "input_bound": bool(input_bound), "input_bound_contenders": input_bound,
        **{f"data_wait_fraction_{k}": round(v, 3) for k, v in wait.items()},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
