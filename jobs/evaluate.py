"""`mone evaluate`: run a trained MoNE model over a whole archive at one or more compute budgets.

    mone evaluate --checkpoint runs/tiny_cpu --videos data/k400 --split validate \\
        --budget 0.2,0.3,0.5,1.0 --views 4x3 --out preds.parquet

Data flow (Ray Data, streaming): the archive's manifest is cut into fixed chunks of `--batch-videos` videos
(sorted by path) -> decode tasks (decode, test-mode views, tubelet tokens; a video that cannot be read becomes an
error, never a crash) -> an actor pool (`map_batches` with a callable class; one GPU per actor when the cluster has
GPUs) that runs the model on every view of the chunk once per requested budget, fuses the views by averaging their
softmax probabilities (VideoMAE's protocol, models.metrics.fuse_views) and keeps the top-5 (with `--save-scores`
the whole class-score vector) -> the driver, which writes one Parquet part per chunk as it arrives.

Output, next to `--out`:
- `OUT.parts/part-XXXXX.parquet` (one per chunk, written to a temporary name and renamed: never half a file)
  and `OUT.parts/_meta.json` (what the parts were computed with). Re-running the same command skips the chunks
  already written; an interrupted run loses at most the chunks in flight. A chunk is always the same videos and
  is run as the same model batch, so a resumed run gives the same numbers as an uninterrupted one.
- `OUT` (e.g. preds.parquet): all parts, one row per video and budget, sorted by (path, video_id, e_c); written
  atomically at the end. Columns: path, video_id, label, label_name, budget, e_c, capacities, gflops_per_view,
  gflops (spent on the video, all views), views, pred, pred_label, top5, top5_labels, top5_probs,
  top1_correct, top5_correct (null when the label is unknown), error_stage, error (null when the video was read);
  with `--save-scores` also `scores`, the fused class probabilities (a fixed-size list of C float32; C nulls for a
  video that could not be read), for ensembling.
  A video that could not be read has one row per budget with `error` set, no predictions and 0 GFLOPs.
- When labels are known (counted with torchmetrics, models.metrics): `OUT_STEM.report.json` (top-1, top-5 and
  mean-class accuracy per budget), `OUT_STEM.per_class.parquet`, `OUT_STEM.confusion.parquet` (budget, true, pred,
  count; non-zero cells) and `OUT_STEM.confusion_<budget>.png` (classes sorted by accuracy; readable with 400).
- With `--cascade cascade.json` (jobs/cascade.py): one row per video, budget "cascade", which level answered
  (`cascade_level`, its e_c and capacities, its `confidence`) and the GFLOPs spent by every level it went through.

Numerics stay in models/ and pipeline/: this module only composes them. Evaluation is deterministic: test-mode
sampling (centre / middle of segments, fixed views), no randomness anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
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

TOPK = 5
PARTS_SUFFIX = ".parts"
META_NAME = "_meta.json"
# Env knob: seconds the driver waits after writing each part. Only for demos/tests of interruption and resume.
THROTTLE_ENV = "MONE_EVAL_THROTTLE_S"


class EvaluateError(ValueError):
    """Bad input to `mone evaluate` / `mone visualize`; the message names the input and the fix."""


# ============================================================================================ budgets


@dataclass(frozen=True)
class Budget:
    key: str  # how the budget is named in the output ("0.3", or the budgets.json key)
    e_c: float  # effective capacity (1.0 = dense)
    capacities: tuple[float, ...]  # per expert, smallest first
    source: str = "e_c"  # e_c | gflops | file

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.key, "e_c": self.e_c, "capacities": list(self.capacities), "source": self.source}


def _fmt_ec(e: float) -> str:
    return f"{e:.4f}".rstrip("0").rstrip(".") if not float(e).is_integer() else f"{e:.1f}"


def parse_budget_values(text: str | float | Sequence[float] | None, what: str = "--budget",
                        num_experts: int = 4) -> list[float]:
    """e_c values from a list such as "0.2,0.3,1.0" (models.budgets.parse_budget_list over (1/2^(E-1), 1])."""
    from models.budgets import ec_range, parse_budget_list

    lo, hi = ec_range(num_experts)
    try:
        return parse_budget_list(text, what=what, low=lo, high=hi,
                                 hint=f"1.0 = dense; below {lo:g} every token already sits on the smallest expert; "
                                 f"e.g. {what} 0.3")
    except ValueError as e:
        raise EvaluateError(str(e)) from None


def budget_from_ec(e_c: float, num_experts: int = 4, *, what: str = "--budget") -> Budget:
    from models.capacity import capacities_for_budget

    (e_c,) = parse_budget_values(float(e_c), what, num_experts)
    try:
        caps = capacities_for_budget(e_c, num_experts)
    except ValueError as e:
        raise EvaluateError(f"{what} {e_c:g}: {e}") from None
    return Budget(_fmt_ec(e_c), e_c, tuple(caps), "e_c")


def read_json_file(path: str | os.PathLike, flag: str, hint: str) -> tuple[Path, Any]:
    """(path, parsed JSON) of a file a flag names; EvaluateError naming the flag when it is missing or not JSON."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvaluateError(f"{flag} {p}: no such file ({hint})")
    try:
        return p, json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EvaluateError(f"{flag} {p}: not valid JSON ({e})") from None


def read_budgets_file(path: str | os.PathLike, num_experts: int = 4) -> list[Budget]:
    """A tune job's budgets file: `{"0.3": [c1, .., cE], ...}` (smallest expert first), possibly with metadata keys,
    or wrapped as `{"budgets": {...}}`; a value may also be `{"capacities": [...], ...}`. Sorted by e_c."""
    from models.capacity import resolve_budget

    p, data = read_json_file(path, "--budgets", "a JSON file from `mone tune budgets`, e.g. "
                             "{\"0.3\": [0.4, 0.3, 0.2, 0.1]}")
    if isinstance(data, dict) and isinstance(data.get("budgets"), (dict, list)):
        data = data["budgets"]
    if isinstance(data, list):  # [{"e_c": 0.3, "capacities": [...]}, ...]
        data = {str(d.get("e_c")): d for d in data if isinstance(d, dict)}
    if not isinstance(data, dict):
        raise EvaluateError(f"--budgets {p}: expected a mapping e_c -> capacities, e.g. {{\"0.3\": [c1, c2, c3, c4]}}")
    out: list[Budget] = []
    for key, value in data.items():
        try:
            e_c = float(key)
        except (TypeError, ValueError):
            continue  # metadata (e.g. "model", "created")
        caps = value.get("capacities") if isinstance(value, dict) else value
        if caps is None:
            raise EvaluateError(f"--budgets {p}: entry '{key}' has no capacities list")
        try:
            caps = resolve_budget([float(c) for c in caps], num_experts)
        except (TypeError, ValueError) as e:
            raise EvaluateError(f"--budgets {p}: entry '{key}': {e}") from None
        out.append(Budget(_fmt_ec(e_c), e_c, tuple(caps), "file"))
    if not out:
        raise EvaluateError(f"--budgets {p}: no budgets found; expected keys that are effective capacities, "
                            f"e.g. {{\"0.3\": [c1, c2, c3, c4]}} or {{\"budgets\": {{...}}}}")
    return sorted(out, key=lambda b: b.e_c)


def flops_per_view(cfg, capacities: Sequence[float], num_classes: int) -> float:
    from models.flops import model_flops

    return float(model_flops(cfg, tuple(capacities), num_classes=num_classes))


def ec_for_gflops(cfg, gflops: float, num_classes: int = 0) -> float:
    """The e_c whose FLOPs per view (models.flops.model_flops) come closest to `gflops`.

    FLOPs grow monotonically with e_c (affinely, up to the flooring of per-frame token counts floor(c_j N)), so a
    bisection finds where they cross the target; of the two sides the closer one is taken."""
    from models.capacity import capacities_for_budget, dense_capacities

    E = cfg.num_experts
    lo_ec = 2.0 ** -(E - 1)
    target = gflops * 1e9
    dense = flops_per_view(cfg, dense_capacities(E), num_classes)
    low = flops_per_view(cfg, (1.0,) + (0.0,) * (E - 1), num_classes)
    if not low * (1 - 1e-9) <= target <= dense * (1 + 1e-9):
        raise EvaluateError(
            f"--gflops {gflops:g}: outside this model's range [{low / 1e9:.4g}, {dense / 1e9:.4g}] GFLOPs per view "
            f"({cfg.name}, {cfg.num_frames} frames, {cfg.img_size} px; e_c {lo_ec:g}..1.0). Pick a value inside it"
        )

    def f(e: float) -> float:
        return flops_per_view(cfg, capacities_for_budget(e, E), num_classes)

    a, b = lo_ec + 1e-4, 1.0  # f(a) ~ low (exactly lo_ec has no split left to choose), f(b) = dense
    if f(a) >= target:
        return a
    for _ in range(40):  # invariant f(a) < target <= f(b)
        m = round(0.5 * (a + b), 6)
        if m in (a, b):
            break
        if f(m) < target:
            a = m
        else:
            b = m
    return b if f(b) - target <= target - f(a) else a


def resolve_budgets(model_cfg, num_classes: int, *, budget: str | None = None, gflops: str | None = None,
                    budgets_file: str | None = None, default: Sequence[float] = (0.3,)) -> list[Budget]:
    """The budgets to evaluate, from --budget (e_c list), --gflops (GFLOPs list) or --budgets (a file; with
    --budget: the file's entries for those e_c)."""
    E = model_cfg.num_experts
    if gflops and budget and not budgets_file:
        raise EvaluateError("--budget and --gflops are alternatives: give one of them")
    if gflops:
        if budgets_file:
            raise EvaluateError("--gflops picks e_c from the model's FLOPs; it cannot be combined with --budgets")
        out = []
        from models.budgets import parse_budget_list

        try:
            values = parse_budget_list(gflops, what="--gflops", low=0.0, high=math.inf, include_high=False,
                                       quantity="GFLOPs", range_name="a compute budget")
        except ValueError as e:
            raise EvaluateError(str(e)) from None
        for g in values:
            e = ec_for_gflops(model_cfg, g, num_classes)
            b = budget_from_ec(e, E, what="--gflops")
            out.append(Budget(b.key, b.e_c, b.capacities, "gflops"))
        return _dedupe(out)
    if budgets_file:
        table = read_budgets_file(budgets_file, E)
        if not budget:
            return table
        picked = []
        for e in parse_budget_values(budget, "--budget", E):
            hit = [b for b in table if abs(b.e_c - e) < 1e-6]
            if not hit:
                raise EvaluateError(f"--budget {e:g} is not in --budgets {budgets_file} (it has "
                                    f"{', '.join(b.key for b in table)}); drop --budget to run them all")
            picked.append(hit[0])
        return _dedupe(picked)
    values = parse_budget_values(budget, "--budget", E) if budget else list(default)
    return _dedupe([budget_from_ec(e, E) for e in values])


def _dedupe(bs: list[Budget]) -> list[Budget]:
    seen, out = set(), []
    for b in sorted(bs, key=lambda b: b.e_c):
        if b.key not in seen:
            seen.add(b.key)
            out.append(b)
    return out


def parse_views(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        t, s = (int(v) for v in text.lower().split("x"))
        if t < 1 or s not in (1, 3):
            raise ValueError
    except ValueError:
        raise EvaluateError(
            f"--views '{text}': expected TEMPORALxSPATIAL with spatial 1 or 3, e.g. 1x1 or 4x3") from None
    return t, s


# ============================================================================================ archive


def load_archive(videos: str | os.PathLike, split: str | None = None, labels: Sequence[str] | None = None):
    """The manifest of what to evaluate, as a pyarrow Table (pipeline's schema), sorted by path.

    `videos`: a manifest parquet, a dataset root (K400 / SSv2 / list files / class folders, via
    pipeline.manifest.build_manifest) or a plain folder of videos (labels unknown). Labels are re-indexed to the
    checkpoint's label map by class name; classes the model does not know become -1 (unknown)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline import manifest as pm

    p = Path(videos).expanduser()
    if not p.exists():
        raise EvaluateError(f"--videos {p}: no such file or folder (give a dataset root, a folder of videos or a "
                            f"manifest .parquet)")
    if p.is_file():
        if p.suffix.lower() != ".parquet":
            if p.suffix.lower() in pm.VIDEO_EXTS:
                table = _plain_table(pm, [str(p.resolve())])
            else:
                raise EvaluateError(f"--videos {p}: a file must be a manifest .parquet (from `mone data check` or "
                                    f"pipeline.manifest.write_manifest) or a video")
        else:
            table = _read_any_manifest(pm, p)
    else:
        try:
            table = pm.build_manifest(p).table
        except pm.ManifestError as e:
            found = pm.index_videos(p)
            if not found:
                raise EvaluateError(f"--videos {p}: no videos found ({', '.join(pm.VIDEO_EXTS[:3])}, ...) and no "
                                    f"dataset layout ({e})") from None
            table = _plain_table(pm, sorted(x for paths in found.values() for x in paths))
    if split and table.num_rows:
        if set(table.column("split").to_pylist()) - {""}:
            try:
                table = pm.select_split(table, split)
            except pm.ManifestError as e:
                raise EvaluateError(f"--split {split}: {e}; pick one of those or drop --split") from None
        else:
            print(f"warning: --split {split} ignored: {p} has no splits (every video is evaluated)", file=sys.stderr)
    if table.num_rows == 0:
        raise EvaluateError(f"--videos {p}: the archive is empty" + (f" for split '{split}'" if split else "")
                            + " (no videos listed or found on disk)")
    if labels is not None:
        table = _relabel(table, labels)
    idx = pc.sort_indices(table, sort_keys=[("path", "ascending"), ("video_id", "ascending"),
                                            ("start_s", "ascending")])
    table = table.take(idx)
    return table.combine_chunks() if isinstance(table, pa.Table) else table


def _read_any_manifest(pm, p: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(p)
    if "path" not in t.column_names:
        raise EvaluateError(f"--videos {p}: a manifest needs at least a 'path' column (has {t.column_names})")
    n = t.num_rows
    defaults = {"label": pa.array([-1] * n, pa.int32()), "label_name": pa.array([""] * n, pa.string()),
                "video_id": pa.array([Path(x).stem for x in t.column("path").to_pylist()], pa.string()),
                "start_s": pa.array([0.0] * n, pa.float64()), "end_s": pa.array([math.nan] * n, pa.float64()),
                "split": pa.array([""] * n, pa.string())}
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else defaults[f.name] for f in pm.SCHEMA]
    t = pa.Table.from_arrays(cols, schema=pm.SCHEMA)
    # Relative paths: relative to the manifest's folder when they do not exist from the working directory.
    paths = [x if os.path.isabs(x) or os.path.exists(x) else str((p.parent / x).resolve())
             for x in t.column("path").to_pylist()]
    return t.set_column(0, "path", pa.array(paths, pa.string()))


def _plain_table(pm, paths: list[str]):
    import pyarrow as pa

    n = len(paths)
    return pa.Table.from_arrays([
        pa.array(paths, pa.string()), pa.array([-1] * n, pa.int32()), pa.array([""] * n, pa.string()),
        pa.array([Path(x).stem for x in paths], pa.string()), pa.array([0.0] * n, pa.float64()),
        pa.array([math.nan] * n, pa.float64()), pa.array([""] * n, pa.string())], schema=pm.SCHEMA)


def _relabel(table, labels: Sequence[str]):
    import pyarrow as pa

    lookup = {n: i for i, n in enumerate(labels)}
    names = table.column("label_name").to_pylist()
    ids = table.column("label").to_pylist()
    out, unknown = [], set()
    for name, i in zip(names, ids, strict=True):
        if name:
            if name in lookup:
                out.append(lookup[name])
            else:
                unknown.add(name)
                out.append(-1)
        else:  # no class name: trust an index only if it fits the model
            out.append(i if i is not None and 0 <= i < len(labels) else -1)
    if unknown:
        print(f"warning: {len(unknown)} classes of the archive are not in the checkpoint's label map "
              f"(e.g. {sorted(unknown)[:3]}); their videos count as unlabelled", file=sys.stderr)
    return table.set_column(table.column_names.index("label"), "label", pa.array(out, pa.int32()))


# ============================================================================================ one video


def video_tokens(path: str, spec, decoder: str = "auto") -> np.ndarray:
    """uint8 tokens (V, L, K) of one video's evaluation views: pipeline's decode -> sample -> transform -> tokenize
    (the same function the training data path and `pipeline.dataset.iter_clips` use)."""
    from pipeline.dataset import load_clip

    if spec.train:
        raise ValueError("evaluation needs a test-mode ClipSpec (train=False): deterministic views")
    return load_clip(path, spec, decoder=decoder)  # (V, L, K)


def error_of(e: BaseException) -> tuple[str, str]:
    """(stage, message) for the error columns; the path is in its own column."""
    from pipeline.dataset import stage_of
    from pipeline.decode import DecodeError

    msg = e.reason if isinstance(e, DecodeError) else str(e)
    return stage_of(e), f"{type(e).__name__}: {msg}"[:500]


# ============================================================================================ Ray stages


def decode_chunk(row: dict[str, Any], spec: dict[str, Any], decoder: str = "auto") -> dict[str, Any]:
    """Ray Data `map`: one chunk of videos -> their tokens stacked (sum of views, L, K) and per-video errors."""
    from pipeline.sampling import ClipSpec

    cs = ClipSpec(**spec)
    paths = json.loads(row["videos"])
    toks, views, errors = [], [], []
    t0 = time.perf_counter()
    for p in paths:
        try:
            t = video_tokens(p, cs, decoder)  # (V, L, K)
            toks.append(t)
            views.append(t.shape[0])
            errors.append(None)
        except Exception as e:  # noqa: BLE001 -- any unreadable video becomes an error row, never a crash
            views.append(0)
            errors.append(error_of(e))
    tokens = np.concatenate(toks) if toks else np.zeros((1, 1, 1), np.uint8)  # (M, L, K); a stub when all failed
    return {"chunk": int(row["chunk"]), "tokens": tokens, "views": np.asarray(views, np.int32),
            "errors": json.dumps(errors), "decode_s": time.perf_counter() - t0}


class Predictor:
    """Ray Data actor (callable class): the model, run on one chunk at every budget; views fused (softmax mean)."""

    def __init__(self, meta: dict[str, Any], state: list, budgets: list[list[float]], topk: int = TOPK,
                 threads: int | None = None, device: str = "auto", max_clips: int = 64, keep_scores: bool = False):
        import ray
        import torch

        from models.vit import create_model

        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        sd = state[0]
        if isinstance(sd, ray.ObjectRef):
            sd = ray.get(sd)
        m = meta["model"]
        model = create_model(m["variant"], num_classes=m["num_classes"], **m.get("overrides", {}))
        model.load_state_dict(sd)
        self.model = model.to(self.device).eval()
        self.budgets = [tuple(b) for b in budgets]
        self.topk = min(topk, m["num_classes"])
        self.max_clips = max_clips
        self.keep_scores = keep_scores
        self.num_classes = int(m["num_classes"])

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """uint8 tokens (M, L, K) -> logits (budgets, M, C). The chunk goes to the device once (on CUDA through
        page-locked memory, an asynchronous copy) and every budget runs on that copy, `max_clips` clips per
        forward; the logits come back to the host once, after the last budget."""
        import torch

        cuda = self.device.type == "cuda"
        if cuda:  # one copy, from the object store's read-only view straight into pinned memory
            x = torch.empty(tokens.shape, dtype=torch.uint8, pin_memory=True)  # (M, L, K)
            x.numpy()[...] = tokens
            x = x.to(self.device, non_blocking=True)
        else:
            if not tokens.flags.writeable:  # a read-only view of the object store; torch wants to own it
                tokens = tokens.copy()
            x = torch.from_numpy(np.ascontiguousarray(tokens))  # (M, L, K) uint8
        per_budget = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for capacities in self.budgets:
                outs = [self.model.forward_tokens(x[s : s + self.max_clips], budget=capacities).float()
                        for s in range(0, x.shape[0], self.max_clips)]  # (<= max_clips, C) each
                per_budget.append(torch.cat(outs))  # (M, C), still on the device
        return torch.stack(per_budget).cpu().numpy()  # (budgets, M, C)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from models.metrics import fuse_views

        out: dict[str, list] = {"chunk": [], "top_ids": [], "top_probs": [], "views": [], "errors": [],
                                "decode_s": [], "model_s": []}
        if self.keep_scores:
            out["scores"] = []
        C = self.num_classes
        for r in range(len(batch["chunk"])):
            views = np.asarray(batch["views"][r], np.int64)  # (n,)
            n, B, k = len(views), len(self.budgets), self.topk
            top_ids = np.full((n, B, k), -1, np.int32)
            top_probs = np.zeros((n, B, k), np.float32)
            scores = np.zeros((n, B, C), np.float32) if self.keep_scores else None
            t0 = time.perf_counter()
            ok = views > 0
            if ok.any():
                tokens = batch["tokens"][r]  # (M, L, K), M = sum(views)
                bounds = np.concatenate([[0], np.cumsum(views[ok])])
                all_logits = torch.from_numpy(self.logits(tokens))  # (budgets, M, C)
                for b in range(B):
                    lg = all_logits[b]  # (M, C)
                    p = torch.cat([fuse_views(lg[bounds[i] : bounds[i + 1]][None])
                                   for i in range(len(bounds) - 1)]).numpy()  # (n_ok, C) mean of view softmaxes
                    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]  # (n_ok, k)
                    top_ids[ok, b] = idx
                    top_probs[ok, b] = np.take_along_axis(p, idx, 1)
                    if scores is not None:
                        scores[ok, b] = p
            out["chunk"].append(int(batch["chunk"][r]))
            out["top_ids"].append(top_ids)
            out["top_probs"].append(top_probs)
            if scores is not None:
                out["scores"].append(scores)
            out["views"].append(views.astype(np.int32))
            out["errors"].append(str(batch["errors"][r]))
            out["decode_s"].append(float(batch["decode_s"][r]))
            out["model_s"].append(time.perf_counter() - t0)
        return out


# ============================================================================================ output


def _schema(num_classes: int | None = None):
    """The predictions table; with num_classes (--save-scores) also `scores`, a fixed-size list of C float32."""
    import pyarrow as pa

    schema = pa.schema([
        pa.field("path", pa.string()), pa.field("video_id", pa.string()), pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()), pa.field("budget", pa.string()), pa.field("e_c", pa.float64()),
        pa.field("capacities", pa.list_(pa.float64())), pa.field("gflops_per_view", pa.float64()),
        pa.field("gflops", pa.float64()), pa.field("views", pa.int32()), pa.field("pred", pa.int32()),
        pa.field("pred_label", pa.string()), pa.field("top5", pa.list_(pa.int32())),
        pa.field("top5_labels", pa.list_(pa.string())), pa.field("top5_probs", pa.list_(pa.float32())),
        pa.field("top1_correct", pa.bool_()), pa.field("top5_correct", pa.bool_()),
        pa.field("error_stage", pa.string()), pa.field("error", pa.string()),
    ])
    return schema.append(pa.field("scores", pa.list_(pa.float32(), num_classes))) if num_classes else schema


def chunk_table(videos: list[dict[str, Any]], result: dict[str, Any], budgets: list[Budget],
                gflops_view: list[float], labels: Sequence[str]):
    """One chunk's result -> its rows (one per video and budget)."""
    import pyarrow as pa

    errors = json.loads(result["errors"])
    top_ids, top_probs, views = result["top_ids"], result["top_probs"], result["views"]
    scores = result.get("scores")  # (n, budgets, C) with --save-scores
    schema = _schema(len(labels) if scores is not None else None)
    rows: dict[str, list] = {f.name: [] for f in schema}
    for i, v in enumerate(videos):
        err = errors[i]
        for b, bud in enumerate(budgets):
            rows["path"].append(v["path"])
            rows["video_id"].append(v["video_id"])
            rows["label"].append(v["label"])
            rows["label_name"].append(v["label_name"])
            rows["budget"].append(bud.key)
            rows["e_c"].append(bud.e_c)
            rows["capacities"].append(list(bud.capacities))
            rows["gflops_per_view"].append(gflops_view[b] / 1e9)
            if err:
                for name in ("pred", "pred_label", "top1_correct", "top5_correct"):
                    rows[name].append(None)
                for name in ("top5", "top5_labels", "top5_probs"):
                    rows[name].append([])
                rows["gflops"].append(0.0)
                rows["views"].append(0)
                rows["error_stage"].append(err[0])
                rows["error"].append(err[1])
                if scores is not None:  # C null items (a null fixed-size list does not read back in pyarrow 25)
                    rows["scores"].append([None] * len(labels))
                continue
            ids = [int(x) for x in top_ids[i, b]]
            rows["pred"].append(ids[0])
            rows["pred_label"].append(labels[ids[0]])
            rows["top5"].append(ids)
            rows["top5_labels"].append([labels[x] for x in ids])
            rows["top5_probs"].append([float(x) for x in top_probs[i, b]])
            known = v["label"] is not None and v["label"] >= 0
            rows["top1_correct"].append(ids[0] == v["label"] if known else None)
            rows["top5_correct"].append(v["label"] in ids if known else None)
            rows["gflops"].append(gflops_view[b] * int(views[i]) / 1e9)
            rows["views"].append(int(views[i]))
            rows["error_stage"].append(None)
            rows["error"].append(None)
            if scores is not None:
                rows["scores"].append(scores[i, b])
    return pa.Table.from_pydict(rows, schema=schema)


def write_parquet_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def consolidate(parts_dir: Path, out: Path):
    """All parts -> one table sorted by (path, video_id, e_c), written atomically to `out`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(parts_dir.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else _schema().empty_table()
    idx = pc.sort_indices(table, sort_keys=[("path", "ascending"), ("video_id", "ascending"),
                                            ("e_c", "ascending"), ("budget", "ascending")])
    table = table.take(idx).combine_chunks()
    write_parquet_atomic(table, out)
    return table


def accuracy_report(table, budgets: list[Budget], labels: Sequence[str]) -> tuple[dict[str, Any], Any, dict] | None:
    """Top-1, top-5 and mean-class accuracy per budget, per class, and the confusion matrix (torchmetrics, via
    models.metrics), over videos with a known label that could be read. The top-5 ranking each row kept is what
    is scored (models.metrics.rank_scores). Returns (report dict, per-class pyarrow Table, {budget key: (C, C)
    counts}), or None when no video has a known label."""
    import pyarrow as pa
    import torch

    from models.metrics import ClassificationMetrics, rank_scores

    df = table.select(["budget", "e_c", "label", "top5", "error", "gflops"]).to_pandas()
    labelled = df[df["label"] >= 0]
    if labelled.empty:
        return None
    C = len(labels)
    rep: dict[str, Any] = {"budgets": []}
    confusions: dict[str, Any] = {}
    pc_rows: dict[str, list] = {k: [] for k in ("budget", "e_c", "class_id", "class_name", "videos", "top1", "top5")}
    for bud in budgets:
        d = labelled[labelled["budget"] == bud.key]
        ok = d[d["error"].isna()]
        entry = {**bud.to_json(), "videos": int(len(ok)), "errors": int(d["error"].notna().sum()),
                 "top1": None, "top5": None, "mean_class": None, "gflops_total": float(d["gflops"].sum())}
        if len(ok):
            meter = ClassificationMetrics(C)
            top = torch.tensor(np.stack(ok["top5"].to_numpy()), dtype=torch.long)  # (N, k), best first
            meter.update(rank_scores(top, C), torch.tensor(ok["label"].to_numpy(), dtype=torch.long))
            r = meter.compute()
            entry.update(top1=r["top1"], top5=r["top5"], mean_class=r["mean_class"])
            confusions[bud.key] = r["confusion"].numpy()  # (C, C)
            for c in torch.nonzero(r["support"]).flatten().tolist():
                pc_rows["budget"].append(bud.key)
                pc_rows["e_c"].append(bud.e_c)
                pc_rows["class_id"].append(c)
                pc_rows["class_name"].append(labels[c])
                pc_rows["videos"].append(int(r["support"][c]))
                pc_rows["top1"].append(float(r["per_class_top1"][c]))
                pc_rows["top5"].append(float(r["per_class_top5"][c]))
        rep["budgets"].append(entry)
    per_class = pa.Table.from_pydict(pc_rows, schema=pa.schema([
        ("budget", pa.string()), ("e_c", pa.float64()), ("class_id", pa.int32()), ("class_name", pa.string()),
        ("videos", pa.int64()), ("top1", pa.float64()), ("top5", pa.float64())]))
    return rep, per_class, confusions


def write_confusions(confusions: dict[str, Any], labels: Sequence[str], out: Path) -> dict[str, Any]:
    """OUT_STEM.confusion.parquet and one OUT_STEM.confusion_<budget>.png per budget; returns their paths."""
    from jobs.report import confusion_png, confusion_table

    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    table_path = out.with_name(f"{stem}.confusion.parquet")
    write_parquet_atomic(confusion_table(confusions, list(labels)), table_path)
    pngs = {}
    for key, m in confusions.items():
        png = out.with_name(f"{stem}.confusion_{key}.png")
        tmp = png.with_name(f".{png.name}.tmp{os.getpid()}")
        tmp.write_bytes(confusion_png(m, list(labels), f"{stem}: e_c = {key}"))
        os.replace(tmp, png)
        pngs[key] = str(png)
    return {"table": str(table_path), "png": pngs}


def format_report(rep: dict[str, Any], gflops_view: dict[str, float]) -> str:
    head = (f"{'budget':>8} {'e_c':>6} {'GFLOPs/view':>12} {'videos':>7} {'errors':>7} {'top-1':>7} {'top-5':>7} "
            f"{'mean-class':>10}")
    lines = [head, "-" * len(head)]
    for b in rep["budgets"]:
        t1, t5, mc = (f"{100 * b[k]:6.2f}%" if b.get(k) is not None else "     -" for k in ("top1", "top5",
                                                                                          "mean_class"))
        lines.append(f"{b['budget']:>8} {b['e_c']:6.3f} {gflops_view[b['budget']]:12.4g} {b['videos']:7d} "
                     f"{b['errors']:7d} {t1:>7} {t5:>7} {mc:>10}")
    return "\n".join(lines)


def report_paths(out: Path) -> tuple[Path, Path]:
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(f"{stem}.report.json"), out.with_name(f"{stem}.per_class.parquet")


# ============================================================================================ the job


def _checkpoint_identity(ckpt_dir: Path) -> dict[str, Any]:
    from jobs.checkpoint import META_FILE, weights_path

    st = weights_path(ckpt_dir).stat()
    return {"path": str(ckpt_dir.resolve()), "weights_bytes": st.st_size, "weights_mtime_ns": st.st_mtime_ns,
            "meta_sha1": hashlib.sha1((ckpt_dir / META_FILE).read_bytes()).hexdigest()}


def _signature(ckpt_dir: Path, spec: dict[str, Any], budgets: list[Budget], paths: list[str],
               batch_videos: int) -> dict[str, Any]:
    return {
        "checkpoint": _checkpoint_identity(ckpt_dir),
        "clip": spec,
        "budgets": [b.to_json() for b in budgets],
        "batch_videos": batch_videos,
        "videos": len(paths),
        "videos_sha1": hashlib.sha1("\n".join(paths).encode()).hexdigest(),
    }


def _prepare_parts(parts_dir: Path, sig: dict[str, Any], overwrite: bool, out: Path) -> set[int]:
    """Creates or validates the parts folder; returns the chunk ids already done."""
    import shutil

    meta = parts_dir / META_NAME
    sig = json.loads(json.dumps(sig))  # as read back from META_NAME: tuples (e.g. the clip's scale_jitter) as lists
    if parts_dir.exists() and overwrite:
        shutil.rmtree(parts_dir)
    if parts_dir.exists() and meta.exists():
        old = json.loads(meta.read_text())
        if old != sig:
            diff = [k for k in sig if old.get(k) != sig[k]]
            raise EvaluateError(
                f"--out {out}: {parts_dir} holds results of a different evaluation (differs in: {', '.join(diff)}). "
                f"Re-run with --overwrite to start over, or choose another --out"
            )
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not meta.exists():
        write_text_atomic(meta, json.dumps(sig, indent=1))
    for stale in parts_dir.glob(".part-*.tmp*"):  # a killed run's unfinished temporary file
        stale.unlink(missing_ok=True)
    done = set()
    for f in parts_dir.glob("part-*.parquet"):
        try:
            done.add(int(f.stem.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return done


def _ray_init(address: str | None) -> None:
    import logging

    import ray

    from jobs.ray_connect import init_ray, requested_address

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if requested_address(address) == "local":
        kwargs["include_dashboard"] = False
    init_ray(address, command="mone evaluate", **kwargs)


def run_evaluation(
    checkpoint: str | os.PathLike,
    videos: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    budget: str | None = None,
    gflops: str | None = None,
    budgets_file: str | None = None,
    views: str | None = None,
    batch_videos: int = 8,
    actors: int | None = None,
    actor_cpus: float | None = None,
    threads: int | None = None,
    decode_cpus: float = 0.5,
    decoder: str = "auto",
    device: str = "auto",
    max_clips: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    address: str | None = None,
    save_scores: bool = False,
    cascade: str | os.PathLike | None = None,
    echo=print,
) -> dict[str, Any]:
    """Runs the evaluation; returns the summary dict (also printed as the final JSON line by the CLI)."""
    from jobs.checkpoint import find_inference_dir, load_inference

    t_start = time.perf_counter()
    out = Path(out).expanduser().resolve()
    if out.suffix != ".parquet":
        raise EvaluateError(f"--out {out}: the predictions table is Parquet; give a path ending in .parquet")
    if batch_videos < 1:
        raise EvaluateError(f"--batch-videos {batch_videos}: must be >= 1")
    for flag, value, low in (("--actors", actors, 1), ("--actor-cpus", actor_cpus, 0),
                             ("--decode-cpus", decode_cpus, 0), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise EvaluateError(f"{flag} {value}: must be >= {low}")
    try:
        ckpt_dir = find_inference_dir(checkpoint)
    except FileNotFoundError as e:
        raise EvaluateError(f"--checkpoint: {e}") from None
    from jobs.ray_connect import check_address

    check_address(address)  # a cluster that does not answer: one line before any decoding
    ckpt = load_inference(ckpt_dir)
    cfg, labels = ckpt.model.cfg, list(ckpt.labels)
    vt_vs = parse_views(views)
    spec = ckpt.clip_spec(**({"temporal_views": vt_vs[0], "spatial_views": vt_vs[1]} if vt_vs else {}))
    if spec.crop_size != cfg.img_size or spec.num_frames != cfg.num_frames:
        raise EvaluateError(f"--checkpoint {ckpt_dir}: its clip spec ({spec.num_frames} frames, {spec.crop_size} px) "
                            f"does not match the model ({cfg.num_frames} frames, {cfg.img_size} px); re-export it")
    default = _default_budgets(ckpt.meta)
    casc = None
    if cascade:  # jobs/cascade.py: the budgets are the cascade's levels, chosen per video
        from jobs.cascade import read_cascade

        if budget or gflops or budgets_file:
            raise EvaluateError("--cascade chooses the budget of each video; drop --budget/--gflops/--budgets")
        if save_scores:
            raise EvaluateError("--save-scores keeps the scores of fixed budgets; with --cascade drop it, or evaluate "
                                "the cascade's levels with --budget to keep their scores")
        casc = read_cascade(cascade, cfg.num_experts)
    budgets = list(casc.levels) if casc else resolve_budgets(cfg, len(labels), budget=budget, gflops=gflops,
                                                             budgets_file=budgets_file, default=default)
    gflops_view = [flops_per_view(cfg, b.capacities, len(labels)) for b in budgets]

    table = load_archive(videos, split, labels)
    rows = table.select(["path", "video_id", "label", "label_name"]).to_pylist()
    paths = [r["path"] for r in rows]
    chunks = [rows[i : i + batch_videos] for i in range(0, len(rows), batch_videos)]
    spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else dict(vars(spec))

    parts_dir = out.with_name(out.name + PARTS_SUFFIX)
    sig = _signature(ckpt_dir, spec_dict, budgets, paths, batch_videos)
    if save_scores:  # parts with and without the score column must not mix (absent: older parts stay valid)
        sig["save_scores"] = True
    if casc:
        sig["cascade"] = casc.to_json()
    done = _prepare_parts(parts_dir, sig, overwrite, out)
    todo = [i for i in range(len(chunks)) if i not in done]
    n_done_before = sum(len(chunks[i]) for i in done if i < len(chunks))
    echo(f"evaluate: {len(rows)} videos in {len(chunks)} chunks ({len(done)} done before), "
         f"budgets {', '.join(b.key for b in budgets)}, {spec.num_views} view(s)/video, checkpoint {ckpt_dir}",
         file=sys.stderr)

    stats = {"videos": 0, "errors": 0, "decode_s": 0.0, "model_s": 0.0, "run_s": 0.0, "first_s": 0.0,
             "first_videos": 0, "results": 0}
    if todo:
        _stream(ckpt, ckpt_dir, spec_dict, budgets, chunks, todo, parts_dir, gflops_view, labels, stats,
                batch_videos=batch_videos, actors=actors, actor_cpus=actor_cpus, threads=threads,
                decode_cpus=decode_cpus, decoder=decoder, device=device, max_clips=max_clips, progress=progress,
                total=len(rows), initial=n_done_before, address=address, save_scores=save_scores, cascade=casc)
    run_s = stats["run_s"]  # from the first task submitted to the last part written (Ray start-up excluded)
    lost = [i for i in range(len(chunks)) if not (parts_dir / f"part-{i:05d}.parquet").exists()]
    if lost:  # never a table with videos silently missing (a stream that ended early, a part removed meanwhile)
        raise RuntimeError(f"{len(lost)} of {len(chunks)} chunks have no results in {parts_dir} (first: {lost[:5]}); "
                           "re-run the same command: it computes only those")

    final = consolidate(parts_dir, out)
    summary: dict[str, Any] = {
        "out": str(out), "checkpoint": str(ckpt_dir), "videos": len(rows),
        "videos_this_run": stats["videos"], "resumed_videos": n_done_before,
        "errors": _count_errors(final),
        "budgets": [b.key for b in budgets], "e_c": [b.e_c for b in budgets],
        "gflops_per_view": {b.key: round(g / 1e9, 6) for b, g in zip(budgets, gflops_view, strict=True)},
        "views": spec.num_views,
        "gflops_total": round(float(np.nansum(final.column("gflops").to_numpy(zero_copy_only=False))), 6),
        "seconds": round(time.perf_counter() - t_start, 3),
        "videos_per_s": round(stats["videos"] / run_s, 3) if stats["videos"] and run_s > 0 else None,
        # after each actor's first result: without actor start-up and model loading (None if too few chunks)
        "videos_per_s_steady": round((stats["videos"] - stats["first_videos"]) / (run_s - stats["first_s"]), 3)
        if stats["videos"] > stats["first_videos"] and run_s > stats["first_s"] else None,
        "decode_s": round(stats["decode_s"], 3),  # summed over decode tasks (they overlap with the model)
        "model_s": round(stats["model_s"], 3),  # summed over model actors
        "device": stats.get("device"), "actors": stats.get("actors"),  # None when every chunk was done before
    }
    reported = [casc.budget()] if casc else budgets
    gflops_shown = {b.key: g / 1e9 for b, g in zip(budgets, gflops_view, strict=True)}
    if casc:
        from jobs.cascade import cascade_summary

        summary["cascade"] = cascade_summary(final, casc)
        gflops_shown[reported[0].key] = (summary["cascade"]["mean_gflops"] or 0.0) / spec.num_views
    res = accuracy_report(final, reported, labels)
    if res is not None:
        rep, per_class, confusions = res
        rep_path, pc_path = report_paths(out)
        rep.update({"checkpoint": str(ckpt_dir), "videos": str(videos), "split": split, "views": spec.num_views,
                    "num_videos": len(rows), "num_errors": summary["errors"], "predictions": str(out),
                    "accuracy_over": "videos with a known label that could be read"})
        write_text_atomic(rep_path, json.dumps(rep, indent=1))
        write_parquet_atomic(per_class, pc_path)
        echo(format_report(rep, gflops_shown))
        summary["report"] = str(rep_path)
        summary["per_class"] = str(pc_path)
        summary["top1"] = {b["budget"]: b["top1"] for b in rep["budgets"]}
        summary["top5"] = {b["budget"]: b["top5"] for b in rep["budgets"]}
        summary["mean_class"] = {b["budget"]: b["mean_class"] for b in rep["budgets"]}
        summary["confusion"] = write_confusions(confusions, labels, out)
    else:
        summary["report"] = None
    echo(f"evaluate: {summary['videos_this_run']} videos this run in {run_s:.1f}s "
         f"({summary['videos_per_s'] or 0:.2f} videos/s), {summary['errors']} unreadable, "
         f"{summary['gflops_total']:.4g} GFLOPs in total -> {out}", file=sys.stderr)
    return summary


def _count_errors(table) -> int:
    """Unreadable videos (each has one error row per budget)."""
    paths = table.column("path").to_pylist()
    errs = table.column("error").to_pylist()
    return len({p for p, e in zip(paths, errs, strict=True) if e is not None})


def _default_budgets(meta: dict[str, Any]) -> list[float]:
    """No --budget: the checkpoint's validation budgets if it recorded them, 1.0 for a dense baseline, else 0.3."""
    for key in ("val_budgets", "eval_budgets"):
        v = meta.get(key) or (meta.get("run") or {}).get(key)
        if v:
            return [float(x) for x in v]
    tb = meta.get("train_budgets") or []
    if tb and all(float(x) >= 1.0 for x in tb):
        return [1.0]
    return [0.3]


def _model_actors(device: str, actors: int | None, chunks: int, echo=print):
    """(use GPUs, actor count, Ray Data actor pool). `--device auto` uses GPUs when the cluster has them or, when
    it autoscales, can grow to them (GPU nodes that scale from 0 are down until asked for). `--actors` defaults to
    one per GPU (capped by the chunks to run); on an autoscaling cluster the pool starts with one actor and grows
    as GPU nodes join."""
    import ray

    from jobs.preflight import cluster_capacity

    capacity = cluster_capacity()
    gpus_now, gpus_most = capacity.now.get("GPU", 0.0), capacity.most("GPU")
    with_gpu = device == "cuda" or (device == "auto" and gpus_most >= 1)
    if actors is None:
        actors = int(gpus_most) if with_gpu else 1
    actors = max(1, min(actors, chunks))
    if with_gpu and gpus_now < min(actors, gpus_most):
        echo(f"evaluate: {gpus_now:g} GPU(s) up now, the cluster can grow to {gpus_most:g} ({capacity.source}); "
             f"{actors} model actor(s) wait for GPU nodes", file=sys.stderr)
    elastic = capacity.autoscaling and with_gpu and actors > gpus_now
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=actors) if elastic else ray.data.ActorPoolStrategy(
        size=actors)
    return with_gpu, actors, pool


def _stream(ckpt, ckpt_dir, spec_dict, budgets, chunks, todo, parts_dir, gflops_view, labels, stats, *,
            batch_videos, actors, actor_cpus, threads, decode_cpus, decoder, device, max_clips, progress,
            total, initial, address, save_scores=False, cascade=None) -> None:
    import logging

    import ray
    from tqdm import tqdm

    _ray_init(address)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own progress line replaces its chatter
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours: videos done / total, videos/s
    with_gpu, actors, pool = _model_actors(device, actors, len(todo), echo=print)
    stats["device"], stats["actors"] = "cuda" if with_gpu else "cpu", actors
    if actor_cpus is None:
        actor_cpus = 1.0
    if threads is None:
        threads = max(1, int(actor_cpus))
    state_ref = ray.put(ckpt.model.state_dict())
    items = [{"chunk": i, "videos": json.dumps([v["path"] for v in chunks[i]])} for i in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(decode_chunk, fn_kwargs={"spec": spec_dict, "decoder": decoder}, num_cpus=decode_cpus)
    predictor, extra = Predictor, {}
    if cascade is not None:
        from jobs import cascade as jc

        predictor, extra = jc.CascadePredictor, jc.actor_kwargs(cascade, gflops_view)
    ds = ds.map_batches(
        predictor,
        compute=pool,
        fn_constructor_kwargs={"meta": ckpt.meta, "state": [state_ref],
                               "budgets": [list(b.capacities) for b in budgets], "threads": threads,
                               "device": "cuda" if with_gpu else "cpu", "max_clips": max_clips,
                               **(extra if cascade is not None else {"keep_scores": save_scores})},
        batch_size=1,
        batch_format="numpy",
        num_cpus=actor_cpus,
        num_gpus=1 if with_gpu else 0,
    )
    throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=initial, unit="video", desc="evaluate", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for r in range(len(batch["chunk"])):
                cid = int(batch["chunk"][r])
                res = {k: batch[k][r] for k in batch}
                t = (chunk_table(chunks[cid], res, budgets, gflops_view, labels) if cascade is None
                     else jc.cascade_table(chunks[cid], res, cascade, labels))
                write_parquet_atomic(t, parts_dir / f"part-{cid:05d}.parquet")
                n_err = int(sum(1 for e in json.loads(res["errors"]) if e))
                stats["videos"] += len(chunks[cid])
                stats["results"] += 1
                if stats["results"] == pool.min_size:  # every actor has started, loaded the model, returned once
                    stats["first_s"], stats["first_videos"] = time.perf_counter() - t0, stats["videos"]
                stats["errors"] += n_err
                stats["decode_s"] += float(batch["decode_s"][r])
                stats["model_s"] += float(batch["model_s"][r])
                bar.update(len(chunks[cid]))
                bar.set_postfix(errors=stats["errors"], refresh=False)
                if throttle:
                    time.sleep(throttle)
    finally:
        bar.close()
        stats["run_s"] = time.perf_counter() - t0


# ============================================================================================ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run directory (runs/NAME) or its inference/ directory")
    p.add_argument("--videos", required=True,
                   help="a dataset root (K400 CSV / SSv2 JSON / list files / class folders), a folder of videos "
                        "(no labels) or a manifest .parquet")
    p.add_argument("--split", default=None, help="keep one split of the archive (e.g. validation, validate, val)")
    g = p.add_argument_group("budget (default: the checkpoint's validation budgets)")
    g.add_argument("--budget", default=None,
                   help="effective capacities e_c, comma-separated, e.g. 0.2,0.3,0.5,1.0 (1.0 = dense); all are run "
                        "in one pass over the decoded clips")
    g.add_argument("--gflops", default=None,
                   help="GFLOPs per view (clip), comma-separated: the e_c whose FLOPs match is used")
    g.add_argument("--budgets", dest="budgets_file", default=None,
                   help="budgets.json from `mone tune budgets` ({\"0.3\": [c1..c4], ...}): capacities used as given; "
                        "with --budget, only those e_c")
    g.add_argument("--cascade", default=None,
                   help="cascade.json from `mone tune cascade`: each video runs the cheapest level first and goes on "
                        "to the next only while the level is unsure of it (decoded once; rows say which level "
                        "answered and the GFLOPs spent)")
    p.add_argument("--views", default=None, help="TEMPORALxSPATIAL test views, e.g. 4x3 (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="predictions table, e.g. preds.parquet")
    p.add_argument("--batch-videos", type=int, default=8,
                   help="videos per chunk: one model batch, one part file (default 8)")
    p.add_argument("--actors", type=int, default=None,
                   help="model actors, one GPU each when GPUs are used (default: one per GPU the cluster has or can "
                        "grow to, at most one per chunk; 1 on CPU)")
    p.add_argument("--actor-cpus", type=float, default=None, help="CPUs reserved per model actor (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per actor (default: its CPUs)")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per decode task (default 0.5)")
    p.add_argument("--decoder", default="auto", choices=("auto", "decord", "pyav"), help="default: auto")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: one GPU per actor when the Ray cluster has GPUs or, autoscaling, can grow to them; "
                        "else CPU")
    p.add_argument("--save-scores", action="store_true",
                   help="keep each video's whole class-score vector per budget (column `scores`: the fused softmax "
                        "probabilities, C float32) for ensembling")
    p.add_argument("--overwrite", action="store_true", help="discard parts of an earlier, different evaluation")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        summary = run_evaluation(
            args.checkpoint, args.videos, args.out, split=args.split, budget=args.budget, gflops=args.gflops,
            budgets_file=args.budgets_file, views=args.views, batch_videos=args.batch_videos, actors=args.actors,
            actor_cpus=args.actor_cpus, threads=args.threads, decode_cpus=args.decode_cpus, decoder=args.decoder,
            device=args.device, overwrite=args.overwrite, progress=args.progress, address=args.address,
            save_scores=args.save_scores, cascade=args.cascade,
        )
    except EvaluateError as e:
        print(f"mone evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="run a trained model over an archive at chosen budgets; predictions as Parquet",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=main)


if __name__ == "__main__":  # `python -m jobs.evaluate ...` works without the other commands
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(prog="mone evaluate")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
