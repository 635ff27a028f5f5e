"""The compute cascade against fixed budgets, on held-out videos of a trained checkpoint (trains nothing).

    python benchmarks/cascade.py --checkpoint runs/tiny_cpu [--data ROOT] [--split validation] \\
        [--levels 0.2,0.4,1.0] [--fixed 0.2,0.3,0.5,1.0] [--max-drop 0.5] [--seeds 5]

1. `mone tune cascade` (jobs.cascade.tune_cascade, seed 0): every level and fixed budget runs once over the split
   (`mone evaluate`); the videos are split per class into halves; thresholds are calibrated on the calibration half
   for both confidences (max softmax probability, top-1/top-2 margin) and the one cheaper there is kept.
2. `mone evaluate --cascade` on the held-out half: the cascade applied for real (each video decoded once, the
   levels run in turn on its tokens). Its top-1 and mean GFLOPs per video are the headline, with 95 % bootstrap
   intervals over the held-out videos, beside every fixed budget's on the same videos.
3. Which confidence works better is judged on more than one split: the halves are redrawn with seeds
   0..S-1 and both confidences calibrated and scored on each (from step 1's per-level predictions, which is what
   the cascade does video by video); means and ranges over the seeds.

Ends with ONE JSON line: cascade_top1, cascade_gflops, fixed [{e_c, top1, gflops}], ... (GFLOPs per video as the
rest of the project counts them: models.flops.model_flops x views.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a run directory or its inference/ directory")
    ap.add_argument("--data", default=None, help="dataset root or manifest (default: the run's dataset)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--levels", default="0.2,0.4,1.0", help="the cascade's e_c, cheapest first")
    ap.add_argument("--fixed", default="0.2,0.3,0.5,1.0", help="fixed budgets to report beside it")
    ap.add_argument("--max-drop", type=float, default=0.5, help="top-1 points the cascade may lose (calibration)")
    ap.add_argument("--seeds", type=int, default=5, help="calibration/held-out splits to compare confidences on")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import numpy as np
    import pyarrow.parquet as pq

    from jobs.cascade import fit_and_report, level_scores, split_parts, tune_cascade
    from jobs.checkpoint import find_inference_dir, load_inference
    from jobs.evaluate import parse_budget_values, resolve_budgets, run_evaluation

    t0 = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="cascade_bench_")).resolve()
    levels = sorted(set(parse_budget_values(args.levels, "--levels")))
    fixed = sorted(set(parse_budget_values(args.fixed, "--fixed")))
    quiet = lambda *a, **k: None  # noqa: E731

    # 1. every budget once over the split; calibrate on one half (seed 0)
    tuned = tune_cascade(args.checkpoint, levels=levels, compare=fixed, max_drop=args.max_drop, data=args.data,
                         split=args.split, seed=0, out=out / "tune", progress=False, echo=quiet)
    print(f"[cascade] calibrated on {tuned['calibration_videos']} videos: {tuned['confidence']} confidence, "
          f"thresholds {tuned['thresholds']}", file=sys.stderr, flush=True)

    # 2. the cascade applied for real on the held-out half
    applied = run_evaluation(args.checkpoint, out / "tune" / "heldout_videos.parquet", out / "applied.parquet",
                             cascade=tuned["cascade"], progress=False, echo=quiet)
    from models.budgets import bootstrap_mean

    rows = pq.read_table(out / "applied.parquet").to_pandas()
    rows = rows[rows["error"].isna() & (rows["label"] >= 0)]
    top1 = bootstrap_mean(rows["top1_correct"].astype(float))
    gflops = bootstrap_mean(rows["gflops"].astype(float))

    # 3. both confidences over several splits, from the per-level predictions of step 1
    ckpt = load_inference(find_inference_dir(args.checkpoint))
    budgets = resolve_budgets(ckpt.model.cfg, len(ckpt.labels), budget=",".join(map(str, levels)))
    scores = level_scores(pq.read_table(out / "tune" / "levels.parquet"), budgets)
    by_kind: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        cal, held = split_parts(scores, 0.5, seed)
        for kind in ("maxprob", "margin"):
            r = fit_and_report(scores, cal, held, args.max_drop, kind, seed)
            d = by_kind.setdefault(kind, {"top1": [], "gflops": [], "minus_last_level_top1": []})
            d["top1"].append(r["held_out"]["top1"]["mean"])
            d["gflops"].append(r["held_out"]["gflops"]["mean"])
            d["minus_last_level_top1"].append(r["held_out"]["minus_last_level_top1"]["mean"])
    confidences = {k: {f"{m}_mean": float(np.mean(v)) for m, v in d.items()}
                   | {f"{m}_range": [float(np.min(v)), float(np.max(v))] for m, v in d.items()}
                   for k, d in by_kind.items()}

    fixed_rows = [{"e_c": f["e_c"], "top1": f["top1"], "top1_ci": f["top1_ci"], "gflops": f["gflops"]}
                  for f in tuned["fixed"]]
    width = max(len(f"{f['e_c']:g}") for f in fixed_rows)
    print(f"held-out videos: {top1.n}; top-1 % [95 % bootstrap], GFLOPs per video", file=sys.stderr)
    for f in fixed_rows:
        print(f"  fixed e_c {f['e_c']:<{width}g}  {100 * f['top1']:5.1f} [{100 * f['top1_ci'][0]:5.1f}, "
              f"{100 * f['top1_ci'][1]:5.1f}]  {f['gflops']:.4f}", file=sys.stderr)
    print(f"  cascade {'/'.join(f'{e:g}' for e in levels)}  {100 * top1.mean:5.1f} [{100 * top1.low:5.1f}, "
          f"{100 * top1.high:5.1f}]  {gflops.mean:.4f} [{gflops.low:.4f}, {gflops.high:.4f}]  "
          f"answered per level {applied['cascade']['answered']}", file=sys.stderr)
    for k, v in confidences.items():
        print(f"  over {args.seeds} splits, {k:7}: top-1 {100 * v['top1_mean']:5.1f}  GFLOPs {v['gflops_mean']:.4f}"
              f"  top-1 - last level {100 * v['minus_last_level_top1_mean']:+.1f}", file=sys.stderr)
    print(f"[cascade] outputs in {out}", file=sys.stderr, flush=True)
    print(json.dumps({
        "cascade_top1": top1.mean, "cascade_gflops": gflops.mean, "fixed": fixed_rows,
        "cascade_top1_ci": [top1.low, top1.high], "cascade_gflops_ci": [gflops.low, gflops.high],
        "cascade_top1_simulated": tuned["cascade_top1"], "cascade_gflops_simulated": tuned["cascade_gflops"],
        "levels": levels, "confidence": tuned["confidence"], "thresholds": tuned["thresholds"],
        "max_drop_points": args.max_drop, "answered": applied["cascade"]["answered"],
        "heldout_videos": top1.n, "calibration_videos": tuned["calibration_videos"],
        "confidences_over_seeds": confidences, "seeds": args.seeds, "checkpoint": tuned["checkpoint"],
        "out": str(out), "wall_s": round(time.time() - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
