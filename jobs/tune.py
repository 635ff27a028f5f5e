"""`mone tune`: Ray Tune searches over a trained checkpoint's budgets, and over training hyper-parameters.

`mone tune budgets`  On a trained checkpoint (no retraining): which capacity vector c gives the best top-1 at a
                     given effective capacity e_c = sum_i c_i d_i / D? The validation clips are decoded once and
                     split per class (seeded) into a search part and a report part (--report-fraction, 0.5). The
                     search part goes to Ray's object store; every trial only runs forward passes on it. Two search
                     spaces per target e_c: any point of the feasible polytope {c >= 0, sum c = 1, c . d/D = e_c}
                     (models.budgets: a convex mixture of its vertices, so every sample is feasible), and the paper's
                     heuristic with free (delta, beta). Optuna's multi-objective sampler maximises top-1 and
                     minimises GFLOPs; the paper's heuristic (delta=2, beta=10) at each target is evaluated first
                     (points_to_evaluate), so the tuned choice is never worse than it on the search part. The front
                     and each target's choice are picked on the search part, then measured on the report part with
                     95 % bootstrap intervals over clips, as are the heuristic and the dense model; tuned minus
                     heuristic gets a paired interval, and "tuned beats heuristic" is said only where it excludes 0.
                     Writes frontier.parquet (front + heuristic + dense; top1 = report part), trials.parquet (search
                     part), frontier.png, budgets.json (for `mone evaluate --budgets`), and search_videos.parquet /
                     report_videos.parquet (manifests of the parts: `mone evaluate --videos` reproduces the figures).
`mone tune train`    Training-time search (optim.lr, mone.delta, ...): Tune drives a function that builds and fits one
                     TorchTrainer per trial (jobs.train.build_trainer with Tune's Train report callback), ASHA stops
                     the weak trials early, and re-running the same command resumes the experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HEURISTIC = {"delta": 2.0, "beta": 10.0}  # the paper's (MONE.md)
DELTA_RANGE = (1.0, 8.0)  # heuristic search space (log-uniform)
BETA_RANGE = (0.3, 100.0)
SPACES = ("simplex", "heuristic")
_EPS = 1e-6
TRIAL_RETRIES = 3  # Tune's FailureConfig: restarts of a trial that died (its node lost)


class TuneError(ValueError):
    """A user mistake (paths, budgets, search space); the message says what to change."""


# =========================================================================== CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune: capacity search on a trained checkpoint (budgets) or hyper-parameter search (train)",
        description="Search with Ray Tune. `budgets`: the best capacity split per compute budget on a trained "
        "checkpoint (an accuracy-vs-GFLOPs frontier). `train`: a training-time search with ASHA early stopping.",
    )
    tsub = p.add_subparsers(dest="tune_command", metavar="SUBCOMMAND")

    b = tsub.add_parser(
        "budgets",
        help="search capacity vectors per target e_c on a trained checkpoint (no retraining)",
        description="Search capacity vectors c (smallest expert first) at each target effective capacity e_c on a "
        "trained checkpoint, with Optuna's multi-objective sampler (max top-1, min GFLOPs). The clips are split per "
        "class into a search part (trials are scored and choices made on it) and a report part (the choices, the "
        "heuristic and the dense model are measured on it, with 95 % bootstrap intervals; tuned - heuristic is "
        "reported with its paired interval). Writes frontier.parquet, trials.parquet, frontier.png, budgets.json "
        "(use it with `mone evaluate --budgets`) and the two parts' manifests.",
        epilog="Example:\n  mone tune budgets --checkpoint runs/tiny_cpu --budgets 0.2,0.3,0.4 --trials 30",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--checkpoint", required=True, help="a run directory (runs/NAME) or its inference/ directory")
    b.add_argument("--data", default=None,
                   help="dataset root or manifest .parquet (default: the dataset the run was trained on, "
                   "from inference.json or the run's config.yaml)")
    b.add_argument("--split", default="validation", help="split to search on (default: validation)")
    b.add_argument("--budgets", default="0.2,0.3,0.4,0.5", help="target e_c values (default: 0.2,0.3,0.4,0.5)")
    b.add_argument("--trials", type=int, default=40,
                   help="Tune trials in all (default 40; the heuristic point of each target is one of them)")
    b.add_argument("--out", default=None, help="output folder (default: RUN_DIR/tune_budgets, else ./tune_budgets)")
    b.add_argument("--max-videos", type=int, default=None, help="use at most this many videos of the split")
    b.add_argument("--concurrent", type=int, default=None,
                   help="trials at once (default: the cluster's CPUs, at most 2; each holds 1 CPU)")
    b.add_argument("--report-fraction", type=float, default=0.5,
                   help="share of each class held out to report on; the search never sees it (default 0.5)")
    b.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler, the search/report split and the bootstrap (default 0)")
    b.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    b.set_defaults(func=run_budgets_cmd)

    t = tsub.add_parser(
        "train",
        help="hyper-parameter search over training runs (ASHA early stopping, resumable)",
        description="Training-time search: each trial is one `mone train` run (a TorchTrainer) with values from the "
        "search space; ASHA stops weak trials after each epoch. Re-running the same command resumes the "
        "experiment. The search space YAML maps config paths to domains: {loguniform: [a, b]}, {uniform: [a, b]}, "
        "{choice: [...]}, {randint: [a, b]} (or a plain value: fixed).",
        epilog="Example:\n  mone tune train --config tiny_cpu --search-space jobs/configs/search_spaces/tiny_cpu.yaml "
        "--trials 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", default="tiny_cpu", help="config name under jobs/configs/ or a YAML path")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every trial")
    t.add_argument("--search-space", required=True,
                   help="YAML: config path -> domain (e.g. jobs/configs/search_spaces/tiny_cpu.yaml)")
    t.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    t.add_argument("--name", default=None, help="experiment name (default: tune_<run name>); its folder is resumed")
    t.add_argument("--resume", action="store_true", help="resume the experiment (also automatic when it exists)")
    t.add_argument("--metric", default=None,
                   help="metric to rank and stop on (default: top1_ec<first validation budget>, e.g. top1_ec0.3)")
    t.add_argument("--mode", default="max", choices=("max", "min"))
    t.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs at least (default 1)")
    t.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster's CPUs/GPUs fit)")
    t.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    t.set_defaults(func=run_train_cmd)

    from jobs.cascade import register as register_cascade

    register_cascade(tsub)  # `mone tune cascade`
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_budgets_cmd(args: argparse.Namespace) -> int:
    try:
        summary = tune_budgets(args.checkpoint, data=args.data, split=args.split, budgets=args.budgets,
                               trials=args.trials, out=args.out, max_videos=args.max_videos,
                               concurrent=args.concurrent, seed=args.seed, report_fraction=args.report_fraction,
                               address=args.address)
    except (TuneError, FileNotFoundError) as e:
        print(f"mone tune budgets: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def run_train_cmd(args: argparse.Namespace) -> int:
    from jobs.config import ConfigError

    try:
        summary = tune_train(args.config, args.overrides, args.search_space, trials=args.trials, name=args.name,
                             resume=args.resume, metric=args.metric, mode=args.mode, grace_period=args.grace_period,
                             max_concurrent=args.max_concurrent, address=args.address)
    except (TuneError, ConfigError, FileNotFoundError) as e:
        print(f"mone tune train: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _ray_init(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    from jobs.ray_connect import init_ray, requested_address

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    local = requested_address(address) == "local"
    init_ray(address, command="mone tune", num_cpus=num_cpus if local else None, include_dashboard=False,
             log_to_driver=True)


# =========================================================================== capacities


def trial_capacities(config: dict[str, Any], num_experts: int = 4) -> tuple[float, ...]:
    """The capacities a budget-search trial's config stands for (raises ValueError if the heuristic has none)."""
    from models.budgets import simplex_capacities
    from models.capacity import capacities_for_budget

    e_c = float(config["e_c"])
    if config["space"] == "heuristic":
        return tuple(capacities_for_budget(e_c, num_experts, delta=float(config["delta"]), beta=float(config["beta"])))
    k = sum(1 for key in config if key.startswith("v") and key[1:].isdigit())
    return simplex_capacities(e_c, [config[f"v{i}"] for i in range(k)], num_experts)


def clip_gflops(model_cfg, capacities: Sequence[float], views: int = 1) -> float:
    """GFLOPs per clip, as `mone train` reports them (views x models.flops.model_flops, classifier excluded)."""
    from models.flops import model_flops

    return views * model_flops(model_cfg, capacities=tuple(capacities)) / 1e9


def video_hits(model, tokens, labels, capacities, batch_size: int = 32):
    """Per clip, whether the top-1 / top-5 prediction of `model` at explicit capacities (None: dense) is right:
    two bool arrays (N,). `tokens` (N, V, L, K) uint8; multi-view clips average their logits."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays from the object store: never written
        x = torch.as_tensor(tokens)  # (N, V, L, K)
        y = torch.as_tensor(labels).long()  # (N,)
    n, views = x.shape[:2]
    top1, top5 = np.zeros(n, bool), np.zeros(n, bool)
    budget = None if capacities is None else tuple(float(c) for c in capacities)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            xb = x[s : s + batch_size]
            b = xb.shape[0]
            logits = model.forward_tokens(xb.flatten(0, 1), budget=budget).float()  # (b*V, classes)
            logits = logits.view(b, views, -1).mean(1)  # (b, classes)
            k = min(5, logits.shape[-1])
            hit = (logits.topk(k, dim=-1).indices == y[s : s + b, None]).numpy()  # (b, k)
            top1[s : s + b] = hit[:, 0]
            top5[s : s + b] = hit.any(-1)
    return top1, top5


def evaluate_capacities(model, tokens, labels, capacities, batch_size: int = 32) -> tuple[float, float]:
    """Top-1 / top-5 of `model` on decoded clips `tokens` (N, V, L, K) uint8 at explicit capacities."""
    top1, top5 = video_hits(model, tokens, labels, capacities, batch_size)
    return float(top1.mean()) if len(top1) else 0.0, float(top5.mean()) if len(top5) else 0.0


# =========================================================================== budget search


_MODEL_CACHE: dict[str, Any] = {}


def _load_model(path: str):
    """One model per trial process (Tune reuses actors between trials)."""
    if path not in _MODEL_CACHE:
        from jobs.checkpoint import load_inference

        _MODEL_CACHE.clear()
        _MODEL_CACHE[path] = load_inference(path).model
    return _MODEL_CACHE[path]


def budget_trial(config: dict[str, Any], *, checkpoint: str, data: dict[str, Any], batch_size: int = 32) -> None:
    """One Tune trial: capacities from the config -> top-1/top-5 on the shared decoded clips of the search part
    + GFLOPs.

    `data` arrives through tune.with_parameters: put in the object store once by the driver, fetched here."""
    import torch
    from ray import tune

    torch.set_num_threads(1)  # one CPU per trial; a second thread on a shared 2-core box only spins
    model = _load_model(checkpoint)
    E = model.cfg.num_experts
    try:
        caps = trial_capacities(config, E)
    except ValueError:  # the heuristic's solver found no point for this (delta, beta): an infeasible trial
        tune.report({"top1": 0.0, "top5": 0.0, "gflops": clip_gflops(model.cfg, (0.0,) * (E - 1) + (1.0,),
                                                                    data["views"]), "feasible": 0})
        return
    t = time.perf_counter()
    top1, top5 = evaluate_capacities(model, data["tokens"], data["labels"], caps, batch_size)
    from models.capacity import effective_capacity

    tune.report({"top1": top1, "top5": top5, "gflops": clip_gflops(model.cfg, caps, data["views"]),
                 "e_c_actual": effective_capacity(caps), "feasible": 1, "eval_s": time.perf_counter() - t,
                 **{f"c{i}": c for i, c in enumerate(caps)}})


def _dataset_root_for(ckpt) -> str | None:
    """The dataset a checkpoint was trained on: inference.json's "data" if recorded, else the run's config.yaml."""
    meta = ckpt.meta
    for key in ("data", "dataset"):
        v = meta.get(key)
        root = v.get("root") if isinstance(v, dict) else v
        if isinstance(root, str) and root:
            return root
    for cand in (ckpt.path / "config.yaml", ckpt.path.parent / "config.yaml", ckpt.path.parent.parent / "config.yaml"):
        if cand.is_file():
            from jobs.config import config_from_dict, load_config
            from jobs.data import synthetic_root

            try:
                cfg = load_config(str(cand))
            except Exception:  # noqa: BLE001 - a config of another version: try it raw
                import yaml

                try:
                    cfg = config_from_dict(yaml.safe_load(cand.read_text()))
                except Exception:  # noqa: BLE001
                    return None
            if cfg.data.root:
                return cfg.data.root
            root = synthetic_root(cfg)
            return str(root) if root.exists() else None
    return None


def decode_split(table, spec, *, decoder: str = "auto", paths: list[str] | None = None) -> tuple[Any, Any, list]:
    """Decodes every labelled clip once: tokens (N, V, L, K) uint8, labels (N,) int64, errors; the clips' paths
    are appended to `paths` when given."""
    import numpy as np

    from pipeline.dataset import iter_clips

    errors: list = []
    xs, ys = [], []
    for row in iter_clips(table, spec, decoder=decoder, shuffle=False, errors=errors, max_error_fraction=None):
        if row["label"] < 0:
            continue
        xs.append(row["tokens"])
        ys.append(row["label"])
        if paths is not None:
            paths.append(row["path"])
    if not xs:
        raise TuneError("no readable labelled clips in the split (see the errors above)")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), errors


def _parse_targets(text: str | Sequence[float]) -> list[float]:
    from models.budgets import ec_range, parse_budget_list

    lo, hi = ec_range()
    try:
        out = parse_budget_list(text, what="--budgets", low=lo, high=hi, include_high=False,
                                hint="1.0, the dense model, is always reported")
    except ValueError as e:
        raise TuneError(str(e)) from None
    if not out:
        raise TuneError("--budgets: give at least one target e_c, e.g. 0.3")
    return sorted({round(e, 6) for e in out})


def _fmt(e: float) -> str:
    return f"{e:.4f}".rstrip("0").rstrip(".")


def split_search_report(table, ys, paths: list[str], report_fraction: float, seed: int, out: Path):
    """The seeded class-stratified split of the decoded clips: (search indices, report indices); writes each
    part's manifest (`search_videos.parquet`, `report_videos.parquet`, for `mone evaluate --videos`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from models.budgets import stratified_split
    from pipeline.manifest import write_manifest

    if not 0.0 < report_fraction < 1.0:
        raise TuneError(f"--report-fraction {report_fraction:g}: must be in (0, 1), e.g. 0.5")
    search, report = stratified_split(ys, report_fraction, seed)
    if len(search) == 0 or len(report) == 0:
        raise TuneError(f"{len(ys)} clips are too few to hold out {report_fraction:g} of each class; give more "
                        f"videos (--max-videos, --split) or another --report-fraction")
    for name, idx in (("search", search), ("report", report)):
        keep = pa.array([paths[i] for i in idx], pa.string())
        write_manifest(table.filter(pc.is_in(table.column("path"), value_set=keep)), out / f"{name}_videos.parquet")
    return search, report


def tune_budgets(checkpoint: str | os.PathLike, *, data: str | None = None, split: str | None = "validation",
                 budgets: str | Sequence[float] = "0.2,0.3,0.4,0.5", trials: int = 40,
                 out: str | os.PathLike | None = None, max_videos: int | None = None, concurrent: int | None = None,
                 seed: int = 0, report_fraction: float = 0.5, address: str | None = None, decoder: str = "auto",
                 verbose: int = 1, echo=print) -> dict[str, Any]:
    """Runs the budget search; returns the summary (the CLI prints it as the final JSON line).

    The decoded clips are split (per class, seeded) into a search part, on which every trial is scored and the
    front and each target's choice are picked, and a report part, on which those choices, the heuristic and the
    dense model are then measured with 95 % bootstrap intervals over videos."""
    import numpy as np
    import pandas as pd
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from jobs.checkpoint import find_inference_dir, load_inference
    from jobs.evaluate import EvaluateError, load_archive
    from models.budgets import bootstrap_mean, max_vertices, pareto_mask
    from models.capacity import capacities_for_budget, dense_capacities, effective_capacity

    t0 = time.time()
    targets = _parse_targets(budgets)
    ckpt_dir = find_inference_dir(checkpoint).resolve()  # trials run in their own working directories
    ckpt = load_inference(ckpt_dir)
    model, labels = ckpt.model, list(ckpt.labels)
    E = model.cfg.num_experts
    root = data or _dataset_root_for(ckpt)
    if not root:
        raise TuneError(f"--data: {ckpt_dir} records no dataset (no data root in inference.json, no config.yaml in "
                        f"its run directory); give --data DATASET_ROOT")
    if trials < len(targets):
        raise TuneError(f"--trials {trials}: need at least one per target budget ({len(targets)})")
    if not 0.0 < report_fraction < 1.0:
        raise TuneError(f"--report-fraction {report_fraction:g}: must be in (0, 1), e.g. 0.5")
    from jobs.ray_connect import check_address

    check_address(address)  # before the split is decoded
    if out is None:
        out = ckpt_dir.parent / "tune_budgets" if ckpt_dir.name == "inference" else Path("tune_budgets")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    # ---- decode the split once, then hold out the report part
    try:
        table = load_archive(root, split, labels)
    except EvaluateError as e:
        raise TuneError(str(e).replace("--videos", "--data")) from None
    if max_videos:
        table = table.slice(0, max_videos)
    spec = ckpt.clip_spec()
    t_dec = time.time()
    paths: list[str] = []
    tokens, ys, errors = decode_split(table, spec, decoder=decoder, paths=paths)
    echo(f"[tune] decoded {len(ys)} clips of {root} ({split or 'all'}) once in {time.time() - t_dec:.1f} s "
         f"({len(errors)} unreadable); {spec.num_views} view(s), tokens {tuple(tokens.shape[1:])}", flush=True)
    views = int(tokens.shape[1])
    search, report = split_search_report(table, ys, paths, report_fraction, seed, out)
    echo(f"[tune] {len(search)} clips to search on, {len(report)} held out to report on (stratified by class, "
         f"seed {seed}); manifests in {out}", flush=True)

    def interval(values):
        return bootstrap_mean(values, seed=seed)  # 95 % percentile bootstrap over clips

    # ---- references: the paper's heuristic at each target, and the dense model (per clip, both parts)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref_rows, ref_hits = [], {}
    for e in [*targets, 1.0]:
        caps = dense_capacities(E) if e >= 1.0 else capacities_for_budget(e, E, **HEURISTIC)
        h1, h5 = video_hits(model, tokens, ys, caps)
        ref_hits[e] = h1[report]
        iv = interval(h1[report].astype(float))
        ref_rows.append({"e_c_target": e, "e_c": effective_capacity(caps), "capacities": list(caps),
                         "gflops": clip_gflops(model.cfg, caps, views), **iv.to_dict("top1"),
                         "top5": float(h5[report].mean()), "top1_search": float(h1[search].mean()),
                         "top5_search": float(h5[search].mean()),
                         "source": "dense" if e >= 1.0 else "heuristic", "space": "heuristic",
                         "delta": HEURISTIC["delta"], "beta": HEURISTIC["beta"], "on_front": False})
    torch.set_num_threads(threads)

    # ---- the search, on the search part only
    K = max_vertices(targets, E)
    space: dict[str, Any] = {"e_c": tune.choice(targets), "space": tune.choice(list(SPACES)),
                             "delta": tune.loguniform(*DELTA_RANGE), "beta": tune.loguniform(*BETA_RANGE),
                             **{f"v{k}": tune.uniform(0.0, 1.0) for k in range(K)}}
    seeds = [{"e_c": e, "space": "heuristic", **HEURISTIC, **{f"v{k}": 0.5 for k in range(K)}} for e in targets]
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(len(targets) + 4, min(10, trials // 3)))
    searcher = OptunaSearch(metric=["top1", "gflops"], mode=["max", "min"], points_to_evaluate=seeds,
                            sampler=sampler)
    _ray_init(address)
    if concurrent is None:
        concurrent = max(1, min(2, int(ray.cluster_resources().get("CPU", 1))))
    search_data = {"tokens": tokens[search], "labels": ys[search], "views": views}
    trainable = tune.with_resources(
        tune.with_parameters(budget_trial, checkpoint=str(ckpt_dir), data=search_data),  # one ray.put for all
        {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials, max_concurrent_trials=concurrent),
        # Tune's own progress table (Ray 2.60's output engine ignores a custom ProgressReporter)
        # A trial lost with its node is run again (a pure function of its config and the shared clips).
        run_config=tune.RunConfig(name="search", storage_path=str(out), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)),
    )
    t_search = time.time()
    grid = tuner.fit()
    search_s = time.time() - t_search

    rows = []
    for r in grid:
        m, c = r.metrics or {}, r.config or {}
        if not m.get("feasible"):
            continue
        caps = [float(m[f"c{i}"]) for i in range(E)]
        rows.append({"e_c_target": float(c["e_c"]), "e_c": float(m["e_c_actual"]), "capacities": caps,
                     "gflops": float(m["gflops"]), "top1_search": float(m["top1"]), "top5_search": float(m["top5"]),
                     "source": "tuned", "space": c["space"],
                     "delta": float(c["delta"]) if c["space"] == "heuristic" else float("nan"),
                     "beta": float(c["beta"]) if c["space"] == "heuristic" else float("nan"),
                     "trial_id": r.path and Path(r.path).name})
    if not rows:
        raise TuneError("no trial finished; see the Tune output above")
    trials_df = pd.DataFrame(rows)
    trials_df["on_front"] = pareto_mask(trials_df["top1_search"].tolist(), trials_df["gflops"].tolist())
    trials_df.to_parquet(out / "trials.parquet", index=False)

    # ---- choices, all made on the search part: the front, and per target the best top-1 within e_c <= target
    # (tie -> fewer GFLOPs). Then each choice is measured once on the report part.
    torch.set_num_threads(1)
    report_hits: dict[tuple[float, ...], Any] = {}

    def on_report(caps) -> Any:
        key = tuple(round(float(x), 12) for x in caps)
        if key not in report_hits:
            report_hits[key] = video_hits(model, tokens[report], ys[report], caps)
        return report_hits[key]

    front = trials_df[trials_df["on_front"]].sort_values("gflops").drop(columns=["trial_id"]).copy()
    front_report = [on_report(c) for c in front["capacities"]]
    front_iv = [interval(h1.astype(float)) for h1, _ in front_report]
    front["top1"] = [iv.mean for iv in front_iv]
    front["top1_low"] = [iv.low for iv in front_iv]
    front["top1_high"] = [iv.high for iv in front_iv]
    front["top5"] = [float(h5.mean()) for _, h5 in front_report]
    frontier = pd.concat([front, pd.DataFrame(ref_rows)], ignore_index=True)
    frontier.to_parquet(out / "frontier.parquet", index=False)

    chosen: dict[str, Any] = {}
    per_target = []
    refs = {r["e_c_target"]: r for r in ref_rows}
    for e in targets:
        within = trials_df[trials_df["e_c"] <= e + _EPS].sort_values(["top1_search", "gflops"],
                                                                     ascending=[False, True])
        best = within.iloc[0] if len(within) else None
        h = refs[e]
        if best is None or best["top1_search"] < h["top1_search"]:  # not with the seeds; keep the file complete
            best = pd.Series({**h, "space": "heuristic"})
        caps = [float(x) for x in best["capacities"]]
        t1, t5 = on_report(caps)
        tuned = interval(t1.astype(float))
        diff = interval(t1.astype(float) - ref_hits[e].astype(float))  # paired: the same report clips
        same = np.allclose(caps, h["capacities"], atol=1e-9)
        verdict = (f"tuned beats heuristic at e_c {_fmt(e)}" if diff.low > 0 else
                   f"heuristic beats tuned at e_c {_fmt(e)}" if diff.high < 0 else
                   f"no difference shown at e_c {_fmt(e)}" + (" (tuned = heuristic)" if same else ""))
        entry = {"capacities": caps, "e_c": float(best["e_c"]), **tuned.to_dict("top1"), "top5": float(t5.mean()),
                 "top1_search": float(best["top1_search"]), "gflops": float(best["gflops"]),
                 "space": str(best["space"]),
                 "heuristic": {"capacities": h["capacities"], "top1": h["top1"], "top1_low": h["top1_low"],
                               "top1_high": h["top1_high"], "gflops": h["gflops"]},
                 **diff.to_dict("diff_top1"), "verdict": verdict}
        chosen[_fmt(e)] = entry
        per_target.append({"e_c": e, "tuned_top1": tuned.mean, "tuned_top1_ci": [tuned.low, tuned.high],
                           "heuristic_top1": h["top1"], "heuristic_top1_ci": [h["top1_low"], h["top1_high"]],
                           "diff_top1": diff.mean, "diff_top1_ci": [diff.low, diff.high], "verdict": verdict,
                           "tuned_top1_search": float(best["top1_search"]), "heuristic_top1_search": h["top1_search"],
                           "gflops": float(best["gflops"]), "heuristic_gflops": h["gflops"],
                           "capacities": [round(x, 4) for x in caps],
                           "heuristic_capacities": [round(x, 4) for x in h["capacities"]]})
    torch.set_num_threads(threads)
    budgets_path = out / "budgets.json"
    budgets_path.write_text(json.dumps({
        "budgets": chosen, "checkpoint": str(ckpt_dir), "data": str(root), "split": split,
        "clips": int(len(ys)), "search_clips": int(len(search)), "report_clips": int(len(report)),
        "report_fraction": report_fraction, "seed": seed, "report_videos": str(out / "report_videos.parquet"),
        "objective": "chosen on the search part: max top-1 within e_c <= target, tie -> fewer GFLOPs",
        "figures": "top1/top5 on the report part, with 95 % percentile bootstrap intervals over its clips; "
                   "diff_top1 = tuned - heuristic on the same clips (paired bootstrap); top1_search: search part",
        "gflops": "per clip (views x models.flops.model_flops)",
    }, indent=1))
    plot = out / "frontier.png"
    _plot_frontier(trials_df, front, ref_rows, plot, model.cfg.name, len(search), len(report))

    echo(_summary_table(per_target, refs[1.0], len(report)))
    summary = {
        "out": str(out), "frontier": str(out / "frontier.parquet"), "budgets": str(budgets_path),
        "trials_table": str(out / "trials.parquet"), "plot": str(plot), "checkpoint": str(ckpt_dir),
        "clips": int(len(ys)), "search_clips": int(len(search)), "report_clips": int(len(report)),
        "report_videos": str(out / "report_videos.parquet"),
        "trials": int(len(trials_df)), "search_s": round(search_s, 1), "wall_s": round(time.time() - t0, 1),
        "dense": {"top1": refs[1.0]["top1"], "top1_ci": [refs[1.0]["top1_low"], refs[1.0]["top1_high"]],
                  "gflops": refs[1.0]["gflops"]},
        "targets": per_target, "verdicts": [p["verdict"] for p in per_target],
    }
    return summary


def _pct(x: float) -> str:
    return "  n/a" if x != x else f"{100 * x:5.1f}"


def _summary_table(per_target: list[dict[str, Any]], dense: dict[str, Any], n_report: int) -> str:
    rows = [f"  report part: {n_report} held-out clips; top-1 in %, [95 % bootstrap interval]",
            "  e_c    tuned top-1          heuristic top-1      tuned - heuristic     GFLOPs tuned/heur.   "
            "tuned capacities (smallest expert first)"]
    for p in per_target:
        tl, th = p["tuned_top1_ci"]
        hl, hh = p["heuristic_top1_ci"]
        dl, dh = p["diff_top1_ci"]
        rows.append(f"  {p['e_c']:<5}  {_pct(p['tuned_top1'])} [{_pct(tl)},{_pct(th)}]  "
                    f"{_pct(p['heuristic_top1'])} [{_pct(hl)},{_pct(hh)}]  "
                    f"{100 * p['diff_top1']:+5.1f} [{100 * dl:+5.1f},{100 * dh:+5.1f}]  "
                    f"{p['gflops']:8.4f} / {p['heuristic_gflops']:<8.4f}  {p['capacities']}")
    rows.append(f"  dense  {_pct(dense['top1'])} [{_pct(dense['top1_low'])},{_pct(dense['top1_high'])}]"
                f"{'':44}{dense['gflops']:8.4f}")
    rows += [f"  {p['verdict']}" for p in per_target]
    return "\n".join(rows)


def _plot_frontier(trials_df, front, ref_rows, path: Path, model_name: str, n_search: int, n_report: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(rows_top1, lows, highs):
        return [[100 * (t - lo) for t, lo in zip(rows_top1, lows, strict=True)],
                [100 * (hi - t) for t, hi in zip(rows_top1, highs, strict=True)]]

    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=120)
    # Plotted as the paper counts (a multiply-add = 1 FLOP): half of the tables' `gflops` (multiply-add = 2).
    ax.scatter(trials_df["gflops"] / 2, 100 * trials_df["top1_search"], s=12, alpha=0.25, color="C0",
               label=f"trials (search part, {n_search} clips)")
    if len(front):
        ax.errorbar(front["gflops"] / 2, 100 * front["top1"], yerr=err(front["top1"], front["top1_low"],
                                                                   front["top1_high"]),
                    fmt="o-", color="C0", capsize=3, zorder=4, label="tuned front (report part, 95 % CI)")
    heur = [r for r in ref_rows if r["source"] == "heuristic"]
    ax.errorbar([r["gflops"] / 2 for r in heur], [100 * r["top1"] for r in heur],
                yerr=err([r["top1"] for r in heur], [r["top1_low"] for r in heur], [r["top1_high"] for r in heur]),
                fmt="s--", color="C1", capsize=3, zorder=5, label="heuristic δ=2, β=10 (report part)")
    for r in heur:
        ax.annotate(f"e_c={r['e_c_target']:g}", (r["gflops"] / 2, 100 * r["top1"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    dense = [r for r in ref_rows if r["source"] == "dense"][0]
    ax.errorbar([dense["gflops"] / 2], [100 * dense["top1"]],
                yerr=err([dense["top1"]], [dense["top1_low"]], [dense["top1_high"]]), fmt="*", ms=12, color="C3",
                capsize=3, label="dense e_c=1 (report part)")
    ax.set_xlabel("GFLOPs per clip (multiply-add = 1, as the paper counts)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{model_name}: chosen on {n_search} clips, measured on {n_report} held-out clips", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# =========================================================================== training-time search


def load_search_space(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The YAML as {config path: {kind: args}}; a plain value becomes {"value": v}. Validated, no Ray needed."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        here = Path(__file__).parent / "configs" / "search_spaces"
        for cand in (here / str(path), here / f"{path}.yaml"):
            if cand.is_file():
                p = cand
                break
        else:
            raise TuneError(f"--search-space {path}: no such file")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise TuneError(f"--search-space {p}: expected a mapping of config paths to domains, e.g. "
                        "'optim.lr: {loguniform: [1.0e-4, 3.0e-3]}'")
    space: dict[str, dict[str, Any]] = {}
    kinds = {"loguniform": 2, "uniform": 2, "randint": 2, "quniform": 3, "choice": None, "grid": None}
    for key, v in raw.items():
        if not isinstance(v, dict):
            space[key] = {"value": v}
            continue
        if len(v) != 1 or next(iter(v)) not in kinds:
            raise TuneError(f"--search-space {p}: '{key}': expected one of {', '.join(kinds)} "
                            f"(e.g. {{loguniform: [1.0e-4, 3.0e-3]}}), got {v!r}")
        kind, args = next(iter(v.items()))
        if not isinstance(args, list) or (kinds[kind] and len(args) != kinds[kind]) or not args:
            raise TuneError(f"--search-space {p}: '{key}': {kind} takes a list"
                            + (f" of {kinds[kind]} values" if kinds[kind] else " of values") + f", got {args!r}")
        space[key] = {kind: args}
    return space


def _domain(spec: dict[str, Any]):
    from ray import tune

    kind, args = next(iter(spec.items()))
    if kind == "value":
        return args
    if kind == "choice":
        return tune.choice(args)
    if kind == "grid":
        return tune.grid_search(args)
    if kind == "loguniform":
        return tune.loguniform(float(args[0]), float(args[1]))
    if kind == "uniform":
        return tune.uniform(float(args[0]), float(args[1]))
    if kind == "quniform":
        return tune.quniform(float(args[0]), float(args[1]), float(args[2]))
    return tune.randint(int(args[0]), int(args[1]))


def _overrides_from(values: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _check_space_against_config(config: str, overrides: list[str], space: dict[str, dict[str, Any]]) -> None:
    """Every path must be a config key and every value a valid one: load the config at each domain's ends."""
    from jobs.config import ConfigError, load_config

    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        probes = [args] if kind == "value" else (args[:2] if kind not in ("choice", "grid") else args)
        for v in probes:
            try:
                load_config(config, [*overrides, *_overrides_from({key: v})])
            except ConfigError as e:
                raise TuneError(f"search space '{key}' = {v!r}: {e}") from None


def train_trial(config: dict[str, Any], *, base: dict[str, Any], trials_dir: str) -> None:
    """One Tune trial: the config with the sampled values -> a TorchTrainer (jobs.train.build_trainer) fit with
    Tune's Train report callback, so every epoch's metrics reach Tune (and ASHA) as they are reported."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs import data as job_data
    from jobs import run_files
    from jobs.config import _merge, _set_dotted, config_from_dict
    from jobs.train import STATE_FILE, _yaml, build_trainer

    tree: dict[str, Any] = {}
    for k, v in config.items():
        _set_dotted(tree, k, v)
    trial_id = tune.get_context().get_trial_id()
    raw = _merge(base, tree)
    raw["run"] = {**raw.get("run", {}), "name": trial_id, "storage_path": trials_dir}
    cfg = config_from_dict(raw)
    storage = run_files.storage_uri(trials_dir)
    run_dir = run_files.join(storage, trial_id)
    data = job_data.prepare(cfg)
    run_files.makedirs(run_dir)
    run_files.write_text(run_files.join(run_dir, "config.yaml"), _yaml(cfg))
    datasets, logs = job_data.ray_datasets(cfg, data)
    trainer = build_trainer(cfg, data, datasets, logs["train"], storage, run_dir, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    job_data.write_errors(logs, run_dir)
    if result.error:
        raise result.error
    if result.checkpoint:  # the trial's inference checkpoint where `mone tune budgets` / evaluate look for it
        with result.checkpoint.as_directory() as local:
            if (Path(local) / "inference").is_dir():
                run_files.upload_dir(Path(local) / "inference", run_files.join(run_dir, "inference"))
            if (Path(local) / STATE_FILE).is_file():
                hist = json.loads((Path(local) / STATE_FILE).read_text())["history"]
                run_files.write_text(run_files.join(run_dir, "metrics.jsonl"),
                                     "".join(json.dumps(m) + "\n" for m in hist))


def _epochs_done(metrics: dict[str, Any]) -> int | None:
    """Epochs a trial has finished: from its own epoch counter (Tune's training_iteration restarts at 1 when a
    failed trial is run again and resumes from its checkpoint)."""
    if metrics.get("epoch") is not None:
        return int(metrics["epoch"]) + 1
    return metrics.get("training_iteration")


def _publish_inference(checkpoint_path: str | None, run_dir: str) -> None:
    """Copies a trial's latest inference checkpoint to RUN_DIR/inference (where `mone tune budgets`, evaluate and
    visualize look). Done by the driver: Tune ends a trial at its last report (ASHA's max_t), before the trial
    function's own code after `fit()` runs. TuneReportCallback puts the checkpoint's path in the metrics."""
    from jobs import run_files

    if not checkpoint_path or run_files.is_remote(run_dir):
        return
    src = Path(checkpoint_path) / "inference"
    if src.is_dir():
        run_files.upload_dir(src, run_files.join(run_dir, "inference"))


def trials_that_fit(cfg, resources: dict[str, float]) -> int:
    """How many trials (each: its Train workers + its decode tasks) the cluster runs at once."""
    s = cfg.scaling
    cpu_need = s.num_workers * s.cpus_per_worker + cfg.data.decode_cpus * max(1, cfg.data.decode_concurrency)
    n = int((resources.get("CPU", 0.0) + 1e-9) // (cpu_need + 0.01))  # + the trial's own 0.01 CPU
    if s.use_gpu:
        n = min(n, int(resources.get("GPU", 0.0) // (s.num_workers * s.gpus_per_worker)))
    return max(1, n)


def tune_train(config: str, overrides: list[str] | None, search_space: str | os.PathLike, *, trials: int = 8,
               name: str | None = None, resume: bool = False, metric: str | None = None, mode: str = "max",
               grace_period: int = 1, max_concurrent: int | None = None, address: str | None = None,
               seed: int = 0, verbose: int = 1, echo=print) -> dict[str, Any]:
    """Runs (or resumes) a training-time search; returns the summary (the CLI's final JSON line)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from jobs import data as job_data
    from jobs import run_files
    from jobs.config import load_config

    t0 = time.time()
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # validated before Ray starts
    space = load_search_space(search_space)
    _check_space_against_config(config, overrides, space)
    from jobs.ray_connect import check_address

    check_address(address)
    if trials < 1:
        raise TuneError(f"--trials {trials}: must be >= 1")
    if metric is None:
        vb = cfg.mone.val_budgets
        metric = f"top1_ec{0.3 if 0.3 in vb else vb[0]}"
    per_budget = ("top1", "top5", "mean_class", "gflops")
    known = {f"{k}_ec{b}" for b in cfg.mone.val_budgets for k in per_budget} | {"train_loss"}
    if metric not in known:
        raise TuneError(f"--metric {metric}: not reported by training; one of {', '.join(sorted(known))}")
    name = name or f"tune_{cfg.run_name}"
    storage = run_files.storage_uri(cfg.run.storage_path)
    exp_dir = run_files.join(storage, name)
    trials_dir = run_files.join(exp_dir, "trials")
    job_data.prepare(cfg)  # generate the synthetic dataset once, before trials race for it

    from jobs.train import _worker_env

    for k, v in _worker_env(cfg).items():
        os.environ.setdefault(k, v)
    _ray_init(address)
    from jobs.preflight import check_resources, cluster_capacity

    capacity = cluster_capacity()  # on an autoscaling cluster: what it can grow to
    for warning in check_resources(cfg, capacity):  # one trial must fit, or it would wait forever
        echo(f"[tune] {warning}", flush=True)
    most = {r: capacity.most(r) for r in {*capacity.now, *(capacity.ceiling or {})}}
    concurrent = max_concurrent or trials_that_fit(cfg, most)

    base = cfg.to_dict()
    trainable = tune.with_resources(  # ~0 CPU for the trial itself: its TorchTrainer takes the CPUs (deadlock 2)
        tune.with_parameters(train_trial, base=base, trials_dir=trials_dir), {"cpu": 0.01})
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.optim.epochs,
                              grace_period=max(1, min(grace_period, cfg.optim.epochs)), reduction_factor=2)
    sampled = [k for k, s in space.items() if "value" not in s]
    # Tune's own progress table (Ray 2.60's output engine ignores a custom ProgressReporter)
    # A trial whose function dies (its node lost) is started again by Tune; its TorchTrainer has the same run name,
    # so it resumes from the trial's latest checkpoint. Worker losses inside a trial are Ray Train's own restarts.
    run_config = tune.RunConfig(name=name, storage_path=storage, verbose=verbose,
                                failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES))

    resumed = False
    if tune.Tuner.can_restore(exp_dir):
        echo(f"[tune] resuming experiment {exp_dir} (its own search space and trial count apply; give --name for "
             f"a new experiment)", flush=True)
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
        resumed = True
    else:
        if resume:
            echo(f"[tune] --resume: nothing to resume at {exp_dir}; starting it", flush=True)
        grid = any("grid" in s for s in space.values())
        # Optuna's categorical values must be scalars: a choice among lists (e.g. budget sets) -> random search.
        scalar = all(isinstance(v, (int, float, str, bool)) or v is None
                     for s in space.values() if "choice" in s for v in s["choice"])
        searcher = OptunaSearch(metric=metric, mode=mode, seed=seed) if scalar and not grid else None
        tuner = tune.Tuner(
            trainable,
            param_space={k: _domain(s) for k, s in space.items()},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=trials, max_concurrent_trials=concurrent),
            run_config=run_config,
        )
    echo(f"[tune] {trials} trial(s), {concurrent} at a time, ASHA on {metric} ({mode}); experiment {exp_dir}",
         flush=True)
    results = tuner.fit()

    rows = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or (Path(r.path).name if r.path else None)
        _publish_inference(m.get("checkpoint_path"), run_files.join(trials_dir, str(tid)))
        rows.append({"trial_id": tid, **{k: (r.config or {}).get(k) for k in sampled},
                     metric: m.get(metric), "epochs": _epochs_done(m),
                     "train_loss": m.get("train_loss"), "run_dir": run_files.join(trials_dir, str(tid)),
                     "error": repr(r.error)[:300] if r.error else None})
    # Ties (common for tiny models) go to the trial that ran more epochs, then the lower trial id: result order
    # differs between a fresh and a restored experiment, and the best trial must not.
    done = sorted((x for x in rows if x[metric] is not None), key=lambda x: (-(x["epochs"] or 0), str(x["trial_id"])))
    best = (max if mode == "max" else min)(done, key=lambda x: x[metric]) if done else None
    if rows:
        import pandas as pd

        df = pd.DataFrame(rows).sort_values(metric, ascending=mode == "min", na_position="last")
        echo(df.drop(columns=["run_dir"]).to_string(index=False))
        with run_files.local_copy_for_write(run_files.join(exp_dir, "trials.parquet")) as local:
            df.to_parquet(local, index=False)
    summary: dict[str, Any] = {
        "experiment": exp_dir, "resumed": resumed, "trials": len(rows), "metric": metric, "mode": mode,
        "errors": sum(1 for x in rows if x["error"]), "wall_s": round(time.time() - t0, 1),
        "best": best and {**{k: best[k] for k in sampled}, metric: best[metric], "epochs": best["epochs"],
                          "trial_id": best["trial_id"], "run_dir": best["run_dir"],
                          "checkpoint": run_files.join(best["run_dir"], "inference")},
    }
    if best:
        echo(f"[tune] best: {metric}={best[metric]:.4f} with "
             + ", ".join(f"{k}={best[k]}" for k in sampled) + f" ({best['run_dir']})")
    return summary
