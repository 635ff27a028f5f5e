"""`mone flops`: analytic GFLOPs per clip of a variant, dense vs MoNE at one or more budgets.

mone flops vivit_b16 --frames 32 --budget 0.3
mone flops vit_b16 --img-size 384 --budget 0.2,0.3,0.5 --json
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "flops",
        help="GFLOPs per clip, dense vs MoNE, for a model variant",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Analytic forward FLOPs per clip (multiply-add = 2, as torch.utils.flop_counter counts) of a "
        "model variant at its dense budget and at MoNE effective capacities e_c, with the dense/MoNE ratio. "
        "Capacities come from the SLSQP allocation (models.capacity.capacities_for_budget).",
    )
    p.add_argument("variant", help="model variant, e.g. vivit_b16, vit_s16, vivit_tiny")
    p.add_argument("--budget", default="0.3", help="effective capacity e_c in (0.125, 1], or a comma list")
    p.add_argument(
        "--frames", type=int, default=None, help="input frames per clip (video variants; default: variant's)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the variant's)")
    p.add_argument("--num-classes", type=int, default=0, help="add the classifier for this many classes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def flops_table(
    variant: str, budgets: list[float], frames: int | None = None, img_size: int | None = None, num_classes: int = 0
) -> dict:
    """The figures `mone flops` prints, as a dict (also used by tests and benchmarks)."""
    from models.capacity import effective_capacity, expert_counts, resolve_budget
    from models.flops import model_flops
    from models.vit import get_config

    overrides = {k: v for k, v in (("num_frames", frames), ("img_size", img_size)) if v is not None}
    cfg = get_config(variant, **overrides)
    dense = model_flops(cfg, None, num_classes=num_classes)
    rows = []
    for e_c in budgets:
        caps = resolve_budget(e_c, cfg.num_experts)
        counts = expert_counts(caps, cfg.num_patches)
        gflops = model_flops(cfg, caps, num_classes=num_classes)
        rows.append(
            {
                "e_c": e_c,
                "capacities": [round(c, 6) for c in caps],
                "tokens_per_expert": list(counts),  # per frame, smallest expert first
                "realised_e_c": round(effective_capacity([k / cfg.num_patches for k in counts]), 4),
                "gflops": round(gflops / 1e9, 3),
                "ratio": round(dense / gflops, 3),
            }
        )
    return {
        "variant": cfg.name,
        "frames": cfg.num_frames,
        "img_size": cfg.img_size,
        "tokens_per_frame": cfg.num_patches,
        "temporal_tokens": cfg.temporal_tokens,
        "dense_gflops": round(dense / 1e9, 3),
        "budgets": rows,
    }


def _parse_budgets(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--budget {text!r} must be a number or a comma list of numbers, e.g. 0.2,0.3,0.5") from None


def run(args: argparse.Namespace) -> int:
    from models.vit import VARIANTS

    if args.variant not in VARIANTS:
        print(f"mone flops: unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.frames is not None and not VARIANTS[args.variant].video and args.frames != 1:
        print(f"mone flops: {args.variant} is an image model; --frames does not apply", file=sys.stderr)
        return 2
    for flag, value in (("--frames", args.frames), ("--img-size", args.img_size)):
        if value is not None and value < 1:
            print(f"mone flops: {flag} {value}: must be a positive integer", file=sys.stderr)
            return 2
    try:
        table = flops_table(args.variant, _parse_budgets(args.budget), args.frames, args.img_size, args.num_classes)
    except ValueError as e:
        print(f"mone flops: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table))
        return 0
    t = table
    print(
        f"{t['variant']}: {t['frames']} frames x {t['img_size']} px, {t['temporal_tokens']} x {t['tokens_per_frame']} "
        f"tokens; GFLOPs per clip (multiply-add = 2)"
    )
    print(f"{'budget':>8}  {'capacities (smallest expert first)':<34}  {'GFLOPs':>10}  {'dense/MoNE':>10}")
    print(f"{'dense':>8}  {'[0, 0, 0, 1]':<34}  {t['dense_gflops']:>10.2f}  {1.0:>10.2f}")
    for r in t["budgets"]:
        caps = "[" + ", ".join(f"{c:.3f}" for c in r["capacities"]) + "]"
        print(f"{r['e_c']:>8g}  {caps:<34}  {r['gflops']:>10.2f}  {r['ratio']:>10.2f}")
    return 0
