"""The compute cascade: the accuracy of a large budget at about the cost of a small one, per video.

One set of MoNE weights serves every budget, so a video can be run at a cheap level first and sent on to a more
expensive level only when the cheap one is unsure of it. The numerics (confidences, running and calibrating a
cascade, splits, bootstrap intervals) live in models.budgets; this module composes them:

`mone tune cascade --checkpoint RUN --levels 0.2,0.4,1.0 [--max-drop 0.5]`
    1. `mone evaluate` (jobs.evaluate.run_evaluation: Ray Data, resumable) runs every level on every video of the
       split once -> OUT/levels.parquet;
    2. the videos are split per class (seeded) into a calibration part and a held-out part
       (OUT/calibration_videos.parquet, OUT/heldout_videos.parquet);
    3. on the calibration part, one threshold per level but the last is chosen for each confidence (max softmax
       probability, top-1/top-2 margin): the cheapest cascade in mean GFLOPs per video whose top-1 stays within
       --max-drop points of the last level's; --confidence auto keeps the one that is cheaper on calibration;
    4. on the held-out part: top-1 and mean GFLOPs of the cascade and of every fixed level (+ --compare budgets),
       with 95 % bootstrap intervals over videos, and cascade - last level top-1 (paired);
    -> OUT/cascade.json (what `mone evaluate --cascade` applies, plus those figures), OUT/cascade.png, a JSON line.
    The held-out cascade figures are computed from the per-level predictions of step 1: they are what the cascade
    does, video by video (each level's prediction of a video does not depend on the other videos of a batch).

`mone evaluate --cascade cascade.json`
    Each chunk of videos is decoded once (one decode task); the actor runs level 0 on all of them, keeps the
    answers whose confidence reaches the level's threshold and runs the next level on the same tokens of the rest,
    and so on (a level whose threshold is above 1 is not run). Rows: budget "cascade", `cascade_level` (which
    level answered), e_c/capacities of that level, `confidence` there, `gflops` spent on the video by every
    level it went through (`gflops_per_view` = that / views).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.evaluate import Budget, EvaluateError, Predictor, chunk_table

CASCADE_KEY = "cascade"  # the `budget` of cascade rows


# ============================================================================ the cascade file


@dataclass(frozen=True)
class Cascade:
    levels: tuple[Budget, ...]  # cheapest first
    thresholds: tuple[float, ...]  # one per level but the last; above 1 (math.inf): the level is not run
    confidence: str  # models.budgets.CONFIDENCES

    def to_json(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "levels": [
            {"e_c": b.e_c, "capacities": list(b.capacities),
             "threshold": None if i == len(self.levels) - 1 else _json_threshold(self.thresholds[i])}
            for i, b in enumerate(self.levels)]}

    def budget(self) -> Budget:
        """How the cascade is named in reports (e_c and capacities of its last level)."""
        last = self.levels[-1]
        return Budget(CASCADE_KEY, last.e_c, last.capacities, "cascade")


def _json_threshold(t: float) -> float | None:
    return None if math.isinf(t) else float(t)  # JSON has no infinity: null = every video goes on


def read_cascade(path: str | os.PathLike, num_experts: int = 4) -> Cascade:
    """cascade.json (from `mone tune cascade`) -> Cascade; EvaluateError naming what is wrong."""
    from jobs.evaluate import _fmt_ec, read_json_file
    from models.budgets import CONFIDENCES
    from models.capacity import effective_capacity, resolve_budget

    p, doc = read_json_file(path, "--cascade", "write one with `mone tune cascade --checkpoint RUN --levels "
                            "0.2,0.4,1.0`")
    levels = doc.get("levels") if isinstance(doc, dict) else None
    kind = doc.get("confidence") if isinstance(doc, dict) else None
    if not isinstance(levels, list) or len(levels) < 2:
        raise EvaluateError(f"--cascade {p}: expected {{\"confidence\": ..., \"levels\": [{{\"e_c\": 0.2, "
                            f"\"capacities\": [...], \"threshold\": 0.8}}, ...]}} with two levels or more")
    if kind not in CONFIDENCES:
        raise EvaluateError(f"--cascade {p}: confidence {kind!r} is not one of {', '.join(CONFIDENCES)}")
    budgets, thresholds = [], []
    for i, lv in enumerate(levels):
        try:
            caps = resolve_budget([float(c) for c in lv["capacities"]], num_experts)
            t = lv.get("threshold")
            t = math.inf if t is None else float(t)
            if i < len(levels) - 1 and not t >= 0:
                raise ValueError(f"threshold {t} must be >= 0 (null: every video goes on)")
        except (KeyError, TypeError, ValueError) as e:
            raise EvaluateError(f"--cascade {p}: level {i}: {e}") from None
        e_c = effective_capacity(caps)
        if isinstance(lv.get("e_c"), (int, float)):  # as named, when it is what the capacities give
            if abs(float(lv["e_c"]) - e_c) > 1e-4:
                raise EvaluateError(f"--cascade {p}: level {i}: e_c {lv['e_c']} does not match its capacities "
                                    f"(they give {e_c:.4f})")
            e_c = float(lv["e_c"])
        budgets.append(Budget(_fmt_ec(e_c), e_c, tuple(caps), "cascade"))
        if i < len(levels) - 1:
            thresholds.append(t)
    if any(b.e_c >= a.e_c - 1e-9 for b, a in zip(budgets, budgets[1:], strict=False)):
        raise EvaluateError(f"--cascade {p}: levels must grow in e_c, cheapest first "
                            f"(got {', '.join(b.key for b in budgets)})")
    return Cascade(tuple(budgets), tuple(thresholds), kind)


# ============================================================================ applying it (Ray Data actor)


class CascadePredictor(Predictor):
    """The evaluation actor, run as a cascade: one chunk's tokens (decoded once) go through the levels in turn;
    each level sees only the videos the previous ones did not answer. Every level's prediction is the plain
    Predictor's on those videos (same fusion of views, same top-k), so a video answered at level l gets exactly
    the prediction `mone evaluate --budget <level l>` gives it."""

    def __init__(self, meta: dict[str, Any], state: list, budgets: list[list[float]], thresholds: list[float],
                 confidence: str, gflops_view: list[float], **kwargs):
        super().__init__(meta, state, budgets, **kwargs)
        self.levels = list(self.budgets)
        self.thresholds = [math.inf if t is None else float(t) for t in thresholds]
        self.kind = confidence
        self.gflops_view = [float(g) for g in gflops_view]

    def _level(self, caps, tokens: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The plain Predictor at one budget on these videos: top ids, top probs (n, k)."""
        self.budgets = [tuple(caps)]
        res = Predictor.__call__(self, {"chunk": np.zeros(1, np.int64), "tokens": [tokens], "views": [views],
                                        "errors": ["[]"], "decode_s": np.zeros(1)})
        return res["top_ids"][0][:, 0], res["top_probs"][0][:, 0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from models.budgets import confidence, runs_level

        out: dict[str, list] = {k: [] for k in ("chunk", "top_ids", "top_probs", "views", "errors", "decode_s",
                                                "model_s", "cascade_level", "confidence", "spent_view")}
        L = len(self.levels)
        for r in range(len(batch["chunk"])):
            t0 = time.perf_counter()
            views = np.asarray(batch["views"][r], np.int64)  # (n,)
            n, k = len(views), self.topk
            top_ids = np.full((n, 1, k), -1, np.int32)
            top_probs = np.zeros((n, 1, k), np.float32)
            level = np.full(n, -1, np.int32)
            conf = np.full(n, np.nan, np.float32)
            spent_view = np.zeros(n)  # FLOPs per view of each video, summed over the levels it went through
            pending = np.flatnonzero(views > 0)  # videos that were read
            if len(pending):
                tokens = batch["tokens"][r]  # (M, L, K), M = sum(views)
                starts = np.concatenate([[0], np.cumsum(views)])  # (n+1,) each video's first view
                for lv, caps in enumerate(self.levels):
                    last = lv == L - 1
                    if not last and not runs_level(self.thresholds[lv]):
                        continue
                    sub = np.concatenate([tokens[starts[i] : starts[i + 1]] for i in pending])  # (M', L, K)
                    ids, probs = self._level(caps, sub, views[pending])  # (P, k) each
                    c = confidence(probs, self.kind)  # (P,)
                    spent_view[pending] += self.gflops_view[lv]
                    answer = np.ones(len(pending), bool) if last else c >= self.thresholds[lv]
                    done = pending[answer]
                    top_ids[done, 0], top_probs[done, 0] = ids[answer], probs[answer]
                    level[done], conf[done] = lv, c[answer]
                    pending = pending[~answer]
                    if not len(pending):
                        break
                self.budgets = self.levels
            out["chunk"].append(int(batch["chunk"][r]))
            out["top_ids"].append(top_ids)
            out["top_probs"].append(top_probs)
            out["views"].append(views.astype(np.int32))
            out["errors"].append(str(batch["errors"][r]))
            out["decode_s"].append(float(batch["decode_s"][r]))
            out["model_s"].append(time.perf_counter() - t0)
            out["cascade_level"].append(level)
            out["confidence"].append(conf)
            out["spent_view"].append(spent_view)
        return out


def actor_kwargs(cascade: Cascade, gflops_view: Sequence[float]) -> dict[str, Any]:
    """What jobs.evaluate passes to the CascadePredictor beyond the Predictor's own arguments."""
    return {"thresholds": [_json_threshold(t) for t in cascade.thresholds], "confidence": cascade.confidence,
            "gflops_view": list(gflops_view)}


def cascade_table(videos: list[dict[str, Any]], result: dict[str, Any], cascade: Cascade, labels: Sequence[str]):
    """One chunk's cascade result -> its rows (one per video): the prediction table's columns, with e_c,
    capacities of the level that answered and the GFLOPs spent on the way, plus cascade_level and confidence."""
    import pyarrow as pa

    t = chunk_table(videos, result, [cascade.budget()], [0.0], labels)
    level = np.asarray(result["cascade_level"])  # (n,) -1: unreadable
    per_view = np.asarray(result["spent_view"])  # (n,) FLOPs per view; 0 when unreadable
    views = np.asarray(result["views"])  # (n,)
    lv = [cascade.levels[i] if i >= 0 else None for i in level.tolist()]
    cols = {
        "e_c": pa.array([b.e_c if b else None for b in lv], pa.float64()),
        "capacities": pa.array([list(b.capacities) if b else [] for b in lv], pa.list_(pa.float64())),
        "gflops_per_view": pa.array(per_view / 1e9, pa.float64()),
        "gflops": pa.array(per_view * views / 1e9, pa.float64()),  # as chunk_table counts a fixed budget
    }
    ok = level >= 0
    for name, col in cols.items():
        t = t.set_column(t.column_names.index(name), name, col)
    t = t.append_column("cascade_level", pa.array(np.where(ok, level, 0), pa.int32(), mask=~ok))
    return t.append_column("confidence", pa.array(np.asarray(result["confidence"], np.float64), pa.float64(),
                                                  mask=~ok))


def cascade_summary(table, cascade: Cascade) -> dict[str, Any]:
    """Videos answered per level and GFLOPs per video, over the videos that could be read."""
    df = table.select(["cascade_level", "gflops", "error"]).to_pandas()
    ok = df[df["error"].isna()]
    return {"levels": [b.e_c for b in cascade.levels],
            "thresholds": [_json_threshold(t) for t in cascade.thresholds], "confidence": cascade.confidence,
            "answered": [int((ok["cascade_level"] == i).sum()) for i in range(len(cascade.levels))],
            "mean_gflops": float(ok["gflops"].mean()) if len(ok) else None}


# ============================================================================ calibration


@dataclass
class LevelScores:
    """Every level's predictions of the same videos, from a predictions table: (N,) and (N, L) arrays."""

    paths: list[str]
    labels: np.ndarray  # (N,)
    top_probs: np.ndarray  # (N, L, k) best first
    pred: np.ndarray  # (N, L)
    correct: np.ndarray  # (N, L) bool
    gflops: np.ndarray  # (N, L) spent on each video by each level alone

    def costs(self, idx: np.ndarray | None = None) -> list[float]:
        g = self.gflops if idx is None else self.gflops[idx]
        return g.mean(0).tolist()  # the same for every video but for the number of views


def level_scores(table, levels: Sequence[Budget]) -> LevelScores:
    """Rows of `mone evaluate` at each level -> LevelScores over the videos read at every level with a label."""
    df = table.select(["path", "budget", "label", "pred", "top5_probs", "top1_correct", "gflops", "error"]).to_pandas()
    df = df[df["error"].isna() & (df["label"] >= 0)]
    by_level = [df[df["budget"] == b.key].set_index("path") for b in levels]
    paths = sorted(set.intersection(*(set(d.index) for d in by_level)))
    if not paths:
        raise EvaluateError("no labelled video could be read at every level")
    k = min(len(d["top5_probs"].iloc[0]) for d in by_level)
    return LevelScores(
        paths=paths,
        labels=by_level[0].loc[paths, "label"].to_numpy(np.int64),
        top_probs=np.stack([np.stack([np.asarray(p[:k]) for p in d.loc[paths, "top5_probs"]]) for d in by_level],
                           1),  # (N, L, k)
        pred=np.stack([d.loc[paths, "pred"].to_numpy(np.int64) for d in by_level], 1),
        correct=np.stack([d.loc[paths, "top1_correct"].to_numpy(bool) for d in by_level], 1),
        gflops=np.stack([d.loc[paths, "gflops"].to_numpy(np.float64) for d in by_level], 1),
    )


def _interval(values, seed: int) -> dict[str, Any]:
    from models.budgets import bootstrap_mean

    iv = bootstrap_mean(values, seed=seed)
    return {"mean": iv.mean, "ci": [iv.low, iv.high]}


def fit_and_report(scores: LevelScores, calibration: np.ndarray, held_out: np.ndarray, max_drop: float,
                   kind: str, seed: int = 0) -> dict[str, Any]:
    """Calibrate one confidence's thresholds on the calibration videos; the cascade's figures on both parts (the
    held-out ones with 95 % bootstrap intervals: top-1, GFLOPs per video, and top-1 minus the last level's)."""
    from models.budgets import calibrate_cascade, confidence, run_cascade

    L = scores.correct.shape[1]
    conf = np.stack([confidence(scores.top_probs[:, lv], kind) for lv in range(L)], 1)  # (N, L)
    costs = scores.costs(calibration)
    fit = calibrate_cascade(conf[calibration], scores.correct[calibration], costs, max_drop / 100.0)
    held = run_cascade(conf[held_out], scores.correct[held_out], scores.costs(held_out), fit.thresholds)
    last = scores.correct[held_out, L - 1].astype(float)
    return {
        "confidence": kind, "thresholds": [_json_threshold(t) for t in fit.thresholds],
        "calibration": {"videos": int(len(calibration)), "top1": fit.top1, "gflops": fit.mean_cost,
                        "last_level_top1": fit.reference_top1, "last_level_gflops": fit.reference_cost,
                        "candidates": fit.candidates},
        "held_out": {"videos": int(len(held_out)), "top1": _interval(held.correct.astype(float), seed),
                     "gflops": _interval(held.cost, seed),
                     "minus_last_level_top1": _interval(held.correct.astype(float) - last, seed),
                     "answered": [int((held.level == lv).sum()) for lv in range(L)]},
    }


def fixed_report(scores: LevelScores, idx: np.ndarray, budgets: Sequence[Budget], seed: int = 0) -> list[dict]:
    """Top-1 (with its interval) and GFLOPs per video of every fixed budget on the videos `idx`."""
    return [{"e_c": b.e_c, "budget": b.key, "top1": _interval(scores.correct[idx, i].astype(float), seed),
             "gflops": float(scores.gflops[idx, i].mean())} for i, b in enumerate(budgets)]


def split_parts(scores: LevelScores, held_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from models.budgets import stratified_split

    if not 0.0 < held_fraction < 1.0:
        raise EvaluateError(f"--holdout-fraction {held_fraction:g}: must be in (0, 1), e.g. 0.5")
    cal, held = stratified_split(scores.labels, held_fraction, seed)
    if not len(cal) or not len(held):
        raise EvaluateError(f"{len(scores.paths)} videos are too few to split into calibration and held-out parts")
    return cal, held


def _write_part(table, paths: Sequence[str], dest: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.manifest import write_manifest

    write_manifest(table.filter(pc.is_in(table.column("path"), value_set=pa.array(list(paths), pa.string()))), dest)


def tune_cascade(checkpoint: str | os.PathLike, *, levels: str | Sequence[float] = "0.2,0.4,1.0",
                 max_drop: float = 0.5, confidence: str = "auto", data: str | None = None,
                 split: str | None = "validation", holdout_fraction: float = 0.5, compare: str | Sequence[float] = "",
                 seed: int = 0, out: str | os.PathLike | None = None, max_videos: int | None = None,
                 address: str | None = None, overwrite: bool = False, progress: bool = True,
                 echo=print) -> dict[str, Any]:
    """`mone tune cascade`; returns the summary (the CLI's final JSON line). Re-running the same command resumes
    the per-level evaluation (OUT/levels.parquet.parts)."""
    from jobs.checkpoint import find_inference_dir, load_inference
    from jobs.evaluate import load_archive, parse_budget_values, resolve_budgets, run_evaluation
    from jobs.tune import _dataset_root_for
    from models.budgets import CONFIDENCES

    t0 = time.time()
    try:
        ckpt_dir = find_inference_dir(checkpoint).resolve()
    except FileNotFoundError as e:
        raise EvaluateError(f"--checkpoint: {e}") from None
    ckpt = load_inference(ckpt_dir)
    cfg, labels = ckpt.model.cfg, list(ckpt.labels)
    E = cfg.num_experts
    level_values = sorted(set(parse_budget_values(levels, "--levels", E)))
    if len(level_values) < 2:
        raise EvaluateError(f"--levels {levels}: a cascade needs two levels or more, cheapest first, e.g. 0.2,0.4,1.0")
    compare_values = sorted(set(parse_budget_values(compare, "--compare", E)) - set(level_values)) if compare else []
    if max_drop < 0:
        raise EvaluateError(f"--max-drop {max_drop:g}: top-1 points the cascade may lose; must be >= 0, e.g. 0.5")
    kinds = list(CONFIDENCES) if confidence == "auto" else [confidence]
    if any(k not in CONFIDENCES for k in kinds):
        raise EvaluateError(f"--confidence {confidence}: one of auto, {', '.join(CONFIDENCES)}")
    root = data or _dataset_root_for(ckpt)
    if not root:
        raise EvaluateError(f"--data: {ckpt_dir} records no dataset; give --data DATASET_ROOT")
    if out is None:
        out = ckpt_dir.parent / "tune_cascade" if ckpt_dir.name == "inference" else Path("tune_cascade")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    table = load_archive(root, split, labels)
    if max_videos:
        table = table.slice(0, max_videos)
    manifest = out / "videos.parquet"
    from pipeline.manifest import write_manifest

    write_manifest(table, manifest)
    all_values = sorted(level_values + compare_values)
    budgets = resolve_budgets(cfg, len(labels), budget=",".join(map(str, all_values)))
    echo(f"[cascade] every budget ({', '.join(b.key for b in budgets)}) on {table.num_rows} videos of {root} "
         f"({split or 'all'})", file=sys.stderr, flush=True)
    def aside(*a, **k):  # evaluate's own table covers every video: keep stdout for the held-out figures
        echo(*a, **{**k, "file": sys.stderr})

    ev = run_evaluation(ckpt_dir, manifest, out / "levels.parquet", budget=",".join(map(str, all_values)),
                        overwrite=overwrite, progress=progress, address=address, echo=aside)
    import pyarrow.parquet as pq

    preds = pq.read_table(out / "levels.parquet")
    scores = level_scores(preds, budgets)
    is_level = [b.e_c in level_values for b in budgets]
    lv_idx = [i for i, x in enumerate(is_level) if x]
    level_budgets = [b for b in budgets if b.e_c in level_values]
    sub = LevelScores(scores.paths, scores.labels, scores.top_probs[:, lv_idx], scores.pred[:, lv_idx],
                      scores.correct[:, lv_idx], scores.gflops[:, lv_idx])
    cal, held = split_parts(sub, holdout_fraction, seed)
    _write_part(table, [sub.paths[i] for i in cal], out / "calibration_videos.parquet")
    _write_part(table, [sub.paths[i] for i in held], out / "heldout_videos.parquet")

    fits = {k: fit_and_report(sub, cal, held, max_drop, k, seed) for k in kinds}
    # auto: the confidence that is cheaper on the calibration videos (ties: higher top-1 there, then max-prob)
    chosen = min(kinds, key=lambda k: (round(fits[k]["calibration"]["gflops"], 12), -fits[k]["calibration"]["top1"]))
    fit = fits[chosen]
    spec = Cascade(tuple(level_budgets), tuple(math.inf if t is None else t for t in fit["thresholds"]), chosen)
    fixed = fixed_report(scores, held, budgets, seed)
    doc = {**spec.to_json(), "max_drop_points": max_drop, "checkpoint": str(ckpt_dir), "data": str(root),
           "split": split, "seed": seed, "holdout_fraction": holdout_fraction,
           "calibration_videos": str(out / "calibration_videos.parquet"),
           "heldout_videos": str(out / "heldout_videos.parquet"),
           "gflops": "per video (views x models.flops.model_flops at each level it went through)",
           "calibration": fit["calibration"], "held_out": fit["held_out"], "fixed_held_out": fixed,
           "by_confidence": fits}
    path = out / "cascade.json"
    path.write_text(json.dumps(doc, indent=1))
    plot = out / "cascade.png"
    plot_cascade(fixed, fits, chosen, plot, f"{cfg.name}: cascade {'/'.join(b.key for b in level_budgets)} vs fixed "
                 f"budgets, {len(held)} held-out videos")
    echo(format_cascade(fits, chosen, fixed, len(cal), len(held), max_drop))
    echo(f"[cascade] {path} (apply it: mone evaluate --cascade {path} ...), plot {plot}; outputs in {out}",
         file=sys.stderr, flush=True)
    return {"cascade": str(path), "plot": str(plot), "out": str(out), "checkpoint": str(ckpt_dir),
            "predictions": ev["out"], "videos": len(sub.paths), "calibration_videos": int(len(cal)),
            "heldout_videos": int(len(held)), "confidence": chosen, "thresholds": fit["thresholds"],
            "levels": level_values, "cascade_top1": fit["held_out"]["top1"]["mean"],
            "cascade_top1_ci": fit["held_out"]["top1"]["ci"], "cascade_gflops": fit["held_out"]["gflops"]["mean"],
            "cascade_gflops_ci": fit["held_out"]["gflops"]["ci"],
            "fixed": [{"e_c": f["e_c"], "top1": f["top1"]["mean"], "top1_ci": f["top1"]["ci"], "gflops": f["gflops"]}
                      for f in fixed],
            "by_confidence": {k: {"top1": v["held_out"]["top1"]["mean"], "gflops": v["held_out"]["gflops"]["mean"],
                                  "calibration_gflops": v["calibration"]["gflops"], "thresholds": v["thresholds"]}
                              for k, v in fits.items()},
            "wall_s": round(time.time() - t0, 1)}


def _pct(iv: dict[str, Any]) -> str:
    lo, hi = iv["ci"]
    band = "[  n/a ]" if lo != lo else f"[{100 * lo:5.1f},{100 * hi:5.1f}]"
    return f"{100 * iv['mean']:5.1f} {band}"


def format_cascade(fits: dict[str, Any], chosen: str, fixed: list[dict], n_cal: int, n_held: int,
                   max_drop: float) -> str:
    lines = [f"calibrated on {n_cal} videos (top-1 within {max_drop:g} points of the last level); "
             f"held-out: {n_held} videos; top-1 % [95 % bootstrap interval]",
             f"  {'':26} {'top-1':>19}  {'GFLOPs/video':>12} [95 %]"]
    for f in fixed:
        lines.append(f"  fixed e_c {f['e_c']:<16g} {_pct(f['top1'])}  {f['gflops']:12.4f}")
    for k, v in fits.items():
        h = v["held_out"]
        g = h["gflops"]
        th = ", ".join("off" if t is None else f"{t:.3f}" for t in v["thresholds"])
        lines.append(f"  cascade {k:<8}{'*' if k == chosen else ' '} {'':8} {_pct(h['top1'])}  {g['mean']:12.4f} "
                     f"[{g['ci'][0]:.4f},{g['ci'][1]:.4f}]  thresholds {th}; answered per level {h['answered']}; "
                     f"top-1 - last level {100 * h['minus_last_level_top1']['mean']:+.1f} "
                     f"[{100 * h['minus_last_level_top1']['ci'][0]:+.1f},"
                     f"{100 * h['minus_last_level_top1']['ci'][1]:+.1f}]")
    lines.append("  * the confidence kept (cheaper on the calibration videos)")
    return "\n".join(lines)


def plot_cascade(fixed: list[dict], fits: dict[str, Any], chosen: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=120)
    x = [f["gflops"] for f in fixed]
    y = [100 * f["top1"]["mean"] for f in fixed]
    yerr = [[100 * (f["top1"]["mean"] - f["top1"]["ci"][0]) for f in fixed],
            [100 * (f["top1"]["ci"][1] - f["top1"]["mean"]) for f in fixed]]
    ax.errorbar(x, y, yerr=np.nan_to_num(yerr), fmt="o-", color="C0", capsize=3, label="fixed budgets (95 % CI)")
    for f in fixed:
        ax.annotate(f"e_c={f['e_c']:g}", (f["gflops"], 100 * f["top1"]["mean"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    for i, (k, v) in enumerate(fits.items()):
        h = v["held_out"]
        t, g = h["top1"], h["gflops"]
        ax.errorbar([g["mean"]], [100 * t["mean"]],
                    xerr=np.nan_to_num([[g["mean"] - g["ci"][0]], [g["ci"][1] - g["mean"]]]),
                    yerr=np.nan_to_num([[100 * (t["mean"] - t["ci"][0])], [100 * (t["ci"][1] - t["mean"])]]),
                    fmt="D" if k == chosen else "v", ms=8, color=f"C{3 + i}", capsize=3,
                    label=f"cascade, {k} confidence" + (" (kept)" if k == chosen else ""))
    ax.set_xlabel("GFLOPs per video")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ============================================================================ CLI (`mone tune cascade`)


def register(tsub: argparse._SubParsersAction) -> None:
    c = tsub.add_parser(
        "cascade",
        help="calibrate a per-video compute cascade over budgets (for `mone evaluate --cascade`)",
        description="Calibrate a cascade of budgets on a trained checkpoint: each video is run at the cheapest "
        "level first and sent on to the next only when the level's confidence is below its threshold. Thresholds "
        "minimise mean GFLOPs per video with top-1 within --max-drop points of the last level, on a calibration "
        "part of the split; the cascade and every fixed level are then reported on the held-out part, with 95 % "
        "bootstrap intervals. Writes cascade.json (for `mone evaluate --cascade`), cascade.png and the parts' "
        "manifests.",
        epilog="Example:\n  mone tune cascade --checkpoint runs/tiny_cpu --levels 0.2,0.4,1.0 --max-drop 0.5\n"
        "  mone evaluate --checkpoint runs/tiny_cpu --videos runs/tiny_cpu/tune_cascade/heldout_videos.parquet "
        "--cascade runs/tiny_cpu/tune_cascade/cascade.json --out cascade_preds.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--checkpoint", required=True, help="a run directory (runs/NAME) or its inference/ directory")
    c.add_argument("--levels", default="0.2,0.4,1.0", help="the cascade's e_c, cheapest first (default 0.2,0.4,1.0)")
    c.add_argument("--max-drop", type=float, default=0.5,
                   help="top-1 points the cascade may lose against its last level on calibration (default 0.5)")
    c.add_argument("--confidence", default="auto", choices=("auto", "maxprob", "margin"),
                   help="max softmax probability, top-1 minus top-2 probability, or auto: both calibrated, the "
                   "cheaper on calibration kept (default)")
    c.add_argument("--data", default=None, help="dataset root or manifest .parquet (default: the run's dataset)")
    c.add_argument("--split", default="validation", help="split to calibrate and report on (default: validation)")
    c.add_argument("--holdout-fraction", type=float, default=0.5,
                   help="share of each class held out from calibration to report on (default 0.5)")
    c.add_argument("--compare", default="", help="more fixed e_c to report beside the levels, e.g. 0.3,0.5")
    c.add_argument("--max-videos", type=int, default=None, help="use at most this many videos of the split")
    c.add_argument("--seed", type=int, default=0, help="seed of the split and the bootstrap (default 0)")
    c.add_argument("--out", default=None, help="output folder (default: RUN_DIR/tune_cascade)")
    c.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    c.add_argument("--overwrite", action="store_true",
                   help="discard the per-level predictions of an earlier, different run in --out")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    c.set_defaults(func=run_cascade_cmd)


def run_cascade_cmd(args: argparse.Namespace) -> int:
    try:
        summary = tune_cascade(args.checkpoint, levels=args.levels, max_drop=args.max_drop,
                               confidence=args.confidence, data=args.data, split=args.split,
                               holdout_fraction=args.holdout_fraction, compare=args.compare, seed=args.seed,
                               out=args.out, max_videos=args.max_videos, address=args.address,
                               overwrite=args.overwrite, progress=args.progress)
    except (EvaluateError, FileNotFoundError) as e:
        print(f"mone tune cascade: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
