"""`mone visualize`: which expert the router gives each token of a clip, drawn over the frames.

    mone visualize --checkpoint runs/tiny_cpu --video clip.mp4 --budget 0.3 --out routing.png

The clip is decoded exactly as `mone evaluate` does (test mode, one centre view), the model runs once with
`forward_tokens(..., return_routing=True)`, and each tubelet slice t' (T' = frames / tubelet_t panels, showing the
first frame of each tubelet) gets every patch tinted with its expert's colour: pixel = round((1 - alpha) * frame
+ alpha * colour), colour per expert (smallest expert = blue ... full width = vermilion). A legend under the
panels gives each expert's width d_i and how many tokens it took. Like the paper's figure: the large experts
should sit on the moving object, the background should go to the small ones.

Writes, next to each other: `routing.png`, `routing.npy` (the expert map, int8 (T', gh, gw), 0 = smallest expert)
and `routing.json` (budget, capacities, counts, prediction, and where each panel sits in the PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Okabe-Ito colours (colour-blind safe), smallest expert first; more experts fall back to tab10.
PALETTE = ((0, 114, 178), (0, 158, 115), (230, 159, 0), (213, 94, 0))
PANEL_TARGET_PX = 192  # panels are upscaled (nearest, integer factor) to about this size
GAP = 6
MIN_WIDTH = 560  # room for the legend text


@dataclass
class RoutingFigure:
    expert: np.ndarray  # (T', gh, gw) int8, 0 = smallest expert
    frames: np.ndarray  # (T', H, W, 3) uint8: the frame drawn for each tubelet slice (model input pixels)
    overlay: np.ndarray  # (T', H, W, 3) uint8: frames with the expert colours blended in (before upscaling)
    image: np.ndarray  # (H_img, W_img, 3) uint8: the whole PNG
    colors: np.ndarray  # (E, 3) uint8
    alpha: float
    scale: int
    panels: list[dict[str, int]]  # {"t", "frame", "x", "y"}: top-left corner of each panel in the PNG
    info: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)


def expert_colors(num_experts: int) -> np.ndarray:
    if num_experts <= len(PALETTE):
        cols = PALETTE[:num_experts] if num_experts < len(PALETTE) else PALETTE
        return np.asarray(cols, np.uint8)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return np.asarray([[round(255 * c) for c in cmap(i % 10)[:3]] for i in range(num_experts)], np.uint8)


def blend(pixels: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """round((1 - alpha) * pixels + alpha * color), uint8; the exact rule used for every tinted pixel."""
    out = (1.0 - alpha) * pixels.astype(np.float64) + alpha * np.asarray(color, np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_experts(frames: np.ndarray, expert: np.ndarray, patch: int, colors: np.ndarray,
                    alpha: float) -> np.ndarray:
    """frames (T', H, W, 3) uint8, expert (T', gh, gw) -> every patch blended with its expert's colour."""
    tp, gh, gw = expert.shape
    color_map = colors[expert]  # (T', gh, gw, 3)
    color_px = np.repeat(np.repeat(color_map, patch, axis=1), patch, axis=2)  # (T', H, W, 3)
    return blend(frames, color_px, alpha)


def compose(panels: np.ndarray, scale: int, cols: int) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Panels (n, H, W, 3) upscaled by `scale` (nearest) on a white grid; returns the mosaic and panel corners."""
    n, h, w, _ = panels.shape
    rows = math.ceil(n / cols)
    ph, pw = h * scale, w * scale
    H = GAP + rows * (ph + GAP)
    W = GAP + cols * (pw + GAP)
    mosaic = np.full((H, W, 3), 255, np.uint8)
    where = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = GAP + r * (ph + GAP), GAP + c * (pw + GAP)
        mosaic[y : y + ph, x : x + pw] = np.repeat(np.repeat(panels[i], scale, axis=0), scale, axis=1)
        where.append({"x": x, "y": y})
    return mosaic, where


def legend_strip(width: int, title: list[str], colors: np.ndarray, entries: list[str], alpha: float) -> np.ndarray:
    """A white strip `width` px wide with the title lines and one coloured swatch + text per expert (matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    line = 20
    height = 12 + line * (len(title) + len(entries)) + 8
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    y = height - 10
    for t in title:
        fig.text(8 / width, (y - line / 2) / height, t, fontsize=10, va="center", ha="left", family="monospace")
        y -= line
    for c, text in zip(colors, entries, strict=True):
        rgb = tuple(float(v) / 255 for v in c)
        fig.patches.append(Rectangle((8 / width, (y - line + 4) / height), 26 / width, (line - 6) / height,
                                     transform=fig.transFigure, facecolor=(*rgb, alpha), edgecolor=rgb, lw=1.5))
        fig.text(42 / width, (y - line / 2) / height, text, fontsize=10, va="center", ha="left", family="monospace")
        y -= line
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (h, w, 3)
    out = np.full((height, width, 3), 255, np.uint8)
    h, w = min(img.shape[0], height), min(img.shape[1], width)
    out[:h, :w] = img[:h, :w]
    return out


def _save_png(path: Path, image: np.ndarray) -> None:
    import matplotlib.image as mpimg

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    mpimg.imsave(tmp, image)  # RGB uint8, written pixel for pixel
    os.replace(tmp, path)


def render_routing(ckpt, video: str | os.PathLike, budget, *, alpha: float = 0.5, scale: int | None = None,
                   decoder: str = "auto") -> RoutingFigure:
    """Runs the model on one clip and builds the figure (nothing written). `ckpt` from jobs.checkpoint.load_inference,
    `budget` a jobs.evaluate.Budget."""
    import torch

    from jobs.evaluate import video_tokens
    from pipeline.tokens import tubelet_unpatchify

    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"--alpha {alpha}: must be in (0, 1]")
    model = ckpt.model
    cfg = model.cfg
    spec = ckpt.clip_spec(temporal_views=1, spatial_views=1)
    tokens = video_tokens(os.fspath(video), spec, decoder)  # (1, L, K)
    tp, gh, gw = spec.grid
    with torch.inference_mode():
        logits, routing = model.forward_tokens(torch.from_numpy(tokens), budget=budget.capacities,
                                               return_routing=True)
    expert = routing.expert.reshape(tp, gh, gw).cpu().numpy().astype(np.int8)  # (T', gh, gw)
    clip = tubelet_unpatchify(tokens[0], (tp, gh, gw), spec.tubelet_t, spec.patch)  # (T, H, W, 3) model pixels
    frames = np.ascontiguousarray(clip[:: spec.tubelet_t])  # (T', H, W, 3): first frame of each tubelet
    E = cfg.num_experts
    colors = expert_colors(E)
    over = overlay_experts(frames, expert, spec.patch, colors, alpha)  # (T', H, W, 3)
    scale = scale or max(1, round(PANEL_TARGET_PX / max(spec.crop_size, 1)))
    cols = min(tp, 8)
    mosaic, where = compose(over, scale, cols)

    from models.capacity import expert_widths

    widths = expert_widths(cfg.dim, E)
    per_frame = [int((expert[0] == j).sum()) for j in range(E)]
    totals = [int((expert == j).sum()) for j in range(E)]
    probs = torch.softmax(logits.float(), -1)[0]
    k = min(3, probs.numel())
    top = torch.topk(probs, k)
    names = [ckpt.labels[int(i)] for i in top.indices]
    n_tok = expert.size
    title = [
        f"{Path(video).name}  |  e_c {budget.e_c:g}  capacities {', '.join(f'{c:.3f}' for c in budget.capacities)}",
        "pred: " + ", ".join(f"{n} {float(p):.2f}" for n, p in zip(names, top.values, strict=True))
        + f"  |  panels: tubelets t'=0..{tp - 1} (frame t'*{spec.tubelet_t})",
    ]
    entries = [f"expert {j + 1}: d={widths[j]:<4d} ({widths[j] / cfg.dim:.3g} D)  {per_frame[j]:3d} tokens/frame, "
               f"{totals[j]} of {n_tok} ({totals[j] / n_tok:.0%})" for j in range(E)]
    width = max(mosaic.shape[1], MIN_WIDTH)
    top_part = np.full((mosaic.shape[0], width, 3), 255, np.uint8)
    top_part[:, : mosaic.shape[1]] = mosaic
    image = np.concatenate([top_part, legend_strip(width, title, colors, entries, alpha)], axis=0)
    panels = [{"t": t, "frame": t * spec.tubelet_t, **w} for t, w in enumerate(where)]
    info = {
        "video": str(video), "budget": budget.key, "e_c": budget.e_c, "capacities": list(budget.capacities),
        "widths": list(widths), "tokens_per_frame": per_frame, "tokens_total": totals, "grid": [tp, gh, gw],
        "patch": spec.patch, "tubelet_t": spec.tubelet_t, "alpha": alpha, "scale": scale,
        "colors": colors.tolist(), "panels": panels,
        "pred": [{"label": n, "prob": round(float(p), 6)} for n, p in zip(names, top.values, strict=True)],
    }
    return RoutingFigure(expert, frames, over, image, colors, alpha, scale, panels, info)


def visualize(checkpoint: str | os.PathLike, video: str | os.PathLike, out: str | os.PathLike = "routing.png", *,
              budget: str | float = 0.3, budgets_file: str | None = None, alpha: float = 0.5,
              scale: int | None = None, decoder: str = "auto") -> RoutingFigure:
    """Writes OUT.png, OUT.npy (expert map) and OUT.json; returns the figure."""
    from jobs.checkpoint import find_inference_dir, load_inference
    from jobs.evaluate import EvaluateError, resolve_budgets

    out = Path(out).expanduser()
    if not 0.0 < alpha <= 1.0:
        raise EvaluateError(f"--alpha {alpha}: must be in (0, 1] (0.5: half frame, half expert colour)")
    if scale is not None and scale < 1:
        raise EvaluateError(f"--scale {scale}: must be an integer >= 1 (or leave it out: panels of ~192 px)")
    if out.suffix.lower() != ".png":
        raise EvaluateError(f"--out {out}: the figure is a PNG; give a path ending in .png")
    v = Path(video).expanduser()
    if not v.is_file():
        raise EvaluateError(f"--video {v}: no such file (give one video file, e.g. an .mp4 or .webm)")
    try:
        ckpt = load_inference(find_inference_dir(checkpoint))
    except FileNotFoundError as e:
        raise EvaluateError(f"--checkpoint: {e}") from None
    budgets = resolve_budgets(ckpt.model.cfg, len(ckpt.labels), budget=str(budget) if budget is not None else None,
                              budgets_file=budgets_file)
    if len(budgets) != 1:
        raise EvaluateError(f"--budget: give exactly one budget for a figure (got {', '.join(b.key for b in budgets)})")
    try:
        fig = render_routing(ckpt, v, budgets[0], alpha=alpha, scale=scale, decoder=decoder)
    except (OSError, RuntimeError, ValueError) as e:
        from pipeline.decode import DecodeError

        if isinstance(e, (DecodeError, OSError)):
            raise EvaluateError(f"--video {v}: cannot be read ({e}); check the file with `mone data check`") from None
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_png(out, fig.image)
    npy = out.with_suffix(".npy")
    tmp = npy.with_name(f".{npy.name}.tmp{os.getpid()}.npy")
    np.save(tmp, fig.expert)
    os.replace(tmp, npy)
    meta = out.with_suffix(".json")
    meta.write_text(json.dumps({**fig.info, "checkpoint": str(ckpt.path), "png": str(out), "expert_map": str(npy)},
                               indent=1))
    fig.paths = {"png": str(out), "expert_map": str(npy), "meta": str(meta)}
    return fig


# ============================================================================================ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run directory (runs/NAME) or its inference/ directory")
    p.add_argument("--video", required=True, help="one video file")
    p.add_argument("--budget", default="0.3", help="effective capacity e_c, 1.0 = dense (default 0.3)")
    p.add_argument("--budgets", dest="budgets_file", default=None,
                   help="budgets.json from `mone tune budgets`: use its capacities for --budget")
    p.add_argument("--out", default="routing.png", help="the PNG (default routing.png); the expert map goes next "
                                                        "to it as .npy, the numbers as .json")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the expert colours (default 0.5)")
    p.add_argument("--scale", type=int, default=None, help="integer upscaling of the panels (default: ~192 px)")
    p.add_argument("--decoder", default="auto", choices=("auto", "decord", "pyav"), help="default: auto")


def main(args: argparse.Namespace) -> int:
    from jobs.evaluate import EvaluateError

    try:
        fig = visualize(args.checkpoint, args.video, args.out, budget=args.budget, budgets_file=args.budgets_file,
                        alpha=args.alpha, scale=args.scale, decoder=args.decoder)
    except EvaluateError as e:
        print(f"mone visualize: error: {e}", file=sys.stderr)
        return 2
    i = fig.info
    for j, (d, n) in enumerate(zip(i["widths"], i["tokens_total"], strict=True)):
        print(f"expert {j + 1} (d={d}): {n} tokens", file=sys.stderr)
    print(json.dumps({**fig.paths, "budget": i["budget"], "e_c": i["e_c"], "tokens_per_expert": i["tokens_total"],
                      "pred": i["pred"][0]["label"] if i["pred"] else None}))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "visualize",
        help="draw which expert each token of a clip is routed to (PNG + expert map .npy)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="mone visualize")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
