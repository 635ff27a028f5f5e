"""`mone flops`: analytic GFLOPs per view of a variant, dense vs MoNE at one or more budgets.

GFLOPs are given in the paper's (and ViViT's) convention, a multiply-add = 1 FLOP (`gmacs` in the JSON), per view;
`--views 4x3` adds the total for a multi-view protocol. The torch.utils.flop_counter convention (a multiply-add =
2 FLOPs) stays beside it under `gflops`.

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
        help="GFLOPs per view (the paper's convention), dense vs MoNE, for a model variant",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Analytic forward FLOPs per view of a model variant at its dense budget and at MoNE effective "
        "capacities e_c, with the dense/MoNE ratio. GFLOPs as the MoNE paper and ViViT count them (a multiply-add = "
        "1 FLOP), and beside them as torch.utils.flop_counter counts (a multiply-add = 2). Capacities come from the "
        "SLSQP allocation (models.capacity.capacities_for_budget).",
    )
    p.add_argument("variant", help="model variant, e.g. vivit_b16, vit_s16, vivit_tiny")
    p.add_argument("--budget", default="0.3", help="effective capacity e_c in (0.125, 1], or a comma list")
    p.add_argument(
        "--frames", type=int, default=None, help="input frames per clip (video variants; default: variant's)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the variant's)")
    p.add_argument("--num-classes", type=int, default=0, help="add the classifier for this many classes")
    p.add_argument("--views", default="1x1", help="evaluation views per clip, temporal x spatial (e.g. 4x3): adds "
                   "the per-clip total")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


FLOPS_CONVENTION = ("gmacs: GFLOPs per view as the paper and ViViT count them (a multiply-add = 1 FLOP); "
                    "gflops: per view with a multiply-add = 2 (torch.utils.flop_counter); *_per_clip: x views")


def flops_table(
    variant: str, budgets: list[float], frames: int | None = None, img_size: int | None = None, num_classes: int = 0,
    views: int = 1,
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
                "gmacs": round(gflops / 2e9, 3),
                "gmacs_per_clip": round(views * gflops / 2e9, 3),
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
        "views": views,
        "flops_convention": FLOPS_CONVENTION,
        "dense_gmacs": round(dense / 2e9, 3),
        "dense_gmacs_per_clip": round(views * dense / 2e9, 3),
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
        t_views, s_views = (int(v) for v in args.views.lower().split("x"))
        if t_views < 1 or s_views < 1:
            raise ValueError
    except ValueError:
        print(f"mone flops: --views {args.views!r} must look like 1x1 or 4x3 (temporal x spatial)", file=sys.stderr)
        return 2
    try:
        table = flops_table(args.variant, _parse_budgets(args.budget), args.frames, args.img_size, args.num_classes,
                            views=t_views * s_views)
    except ValueError as e:
        print(f"mone flops: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table))
        return 0
    t = table
    v = t["views"]
    print(
        f"{t['variant']}: {t['frames']} frames x {t['img_size']} px, {t['temporal_tokens']} x {t['tokens_per_frame']} "
        f"tokens; GFLOPs per view, as the paper counts them (a multiply-add = 1 FLOP); {v} view(s) per clip"
    )
    total = f"  {'x ' + str(v) + ' views':>12}" if v > 1 else ""
    print(f"{'budget':>8}  {'capacities (smallest expert first)':<34}  {'GFLOPs':>10}  {'dense/MoNE':>10}  "
          f"{'(MAC = 2)':>10}" + total)
    rows = [("dense", "[0, 0, 0, 1]", t["dense_gmacs"], 1.0, t["dense_gflops"], t["dense_gmacs_per_clip"])]
    rows += [(f"{r['e_c']:g}", "[" + ", ".join(f"{c:.3f}" for c in r["capacities"]) + "]", r["gmacs"], r["ratio"],
              r["gflops"], r["gmacs_per_clip"]) for r in t["budgets"]]
    for name, caps, gmacs, ratio, gflops, per_clip in rows:
        print(f"{name:>8}  {caps:<34}  {gmacs:>10.2f}  {ratio:>10.2f}  {gflops:>10.2f}"
              + (f"  {per_clip:>12.2f}" if v > 1 else ""))
    return 0
