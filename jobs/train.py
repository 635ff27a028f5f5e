"""`mone train`: the MoNE training recipe on Ray Train (V2) + DeepSpeed.

Driver:  config -> dataset (generated if none) -> manifests -> Ray Data streams -> TorchTrainer.fit -> run summary.
Worker:  DeepSpeed engine (ZeRO from config; bf16 on GPU, fp32 on CPU over gloo) fed by its Ray Data shard;
         e_c drawn per step so one model serves every budget; validation at several budgets each epoch;
         a DeepSpeed checkpoint from every rank + a consolidated inference checkpoint from rank 0, reported
         through `ray.train.report`. Re-running the same command (same run name) resumes from the latest one.

Same code on a laptop and on a GPU cluster: only scaling.num_workers, scaling.use_gpu and run.storage_path change.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs import report, run_files, tracking
from jobs.checkpoint import BEST_DIRNAME
from jobs.config import ConfigError, TrainConfig, config_from_dict, dump_config, load_config
from jobs.preflight import check_resources, cluster_capacity  # noqa: F401 - check_resources: tune/tests import it here

# The paper and ViViT count a multiply-add as one FLOP and give GFLOPs per view; torch's flop counter counts two.
FLOPS_CONVENTION = ("gmacs_*: GFLOPs per view as the paper counts them (a multiply-add = 1); gflops_*: per clip "
                    "over views_per_clip views with a multiply-add = 2 (torch.utils.flop_counter)")
DS_SUBDIR = "deepspeed"  # inside a Ray checkpoint: DeepSpeed's own files (every rank's shards)
DS_TAG = "state"
STATE_FILE = "train_state.json"  # epoch, global step, metric history (rank 0)
EMA_FILE = "ema.pt"  # the EMA of the weights (optim.ema_decay > 0), for resuming
RAW_WEIGHTS_FILE = "model_raw.safetensors"  # with EMA on, beside the EMA weights


# =========================================================================== driver


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a MoNE ViViT with Ray Train + DeepSpeed (no arguments: a small demo on generated data)",
        description=(
            "Train a MoNE model on Ray Train workers running DeepSpeed. With no arguments this runs the embedded "
            "default (jobs/configs/tiny_cpu.yaml): local Ray, a tiny ViViT, a synthetic SSv2-layout dataset that "
            "is generated on first use. Re-running with the same run name resumes from its latest checkpoint."
        ),
        epilog="Examples:\n  mone train\n"
        "  mone train --config ssv2_vivit_b16 data.root=/data/ssv2 scaling.num_workers=8\n"
        "  mone train --dense run.name=tiny_dense        # the dense baseline from the same config\n"
        "  mone train --config ssv2_vivit_b16 --dry-run   # check config and model shapes, start nothing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="tiny_cpu", help="config name under jobs/configs/ or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.epochs=3")
    p.add_argument("--dense", action="store_true", help="train the dense baseline (e_c = 1 every step)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print it resolved (YAML) and the plan (stages, global batch, scaled "
                        "lr, steps per epoch, GFLOPs per view at each validation budget), and run the model once on "
                        "the meta device on tokens of the configured clip shape; starts nothing (no Ray, no data read)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-resource-check", action="store_true",
                   help="skip the check that the cluster has (or, when it autoscales, can grow to) the CPUs/GPUs "
                        "the workers need")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["mone.dense=true"] if args.dense else [])
    try:
        cfg = load_config(args.config, overrides, check_paths=not args.dry_run)
        if not args.dry_run:
            tracking.preflight(cfg)  # an MLflow server named in the config must answer before Ray starts
    except (ConfigError, FileNotFoundError) as e:
        print(f"mone train: {e}")
        return 2
    if args.dry_run:  # no Ray, no data generation, no GPU
        from jobs.plan import describe, format_plan
        from jobs.preflight import meta_forward

        try:
            shapes = meta_forward(cfg)
        except (ValueError, RuntimeError) as e:
            print(f"mone train: config {cfg.name}: the model cannot take its clips: {e}")
            return 2
        plan = describe(cfg)
        print(_yaml(cfg) + "\n" + format_plan(plan))
        print(f"[mone] config {cfg.name} OK: model {cfg.model.variant} ({shapes['params'] / 1e6:.1f} M parameters) "
              f"takes train tokens {shapes['train_tokens']} and eval tokens {shapes['eval_tokens']} per clip "
              "(views, tokens, values); nothing was started")
        print(json.dumps({**plan, "ok": True, **shapes}))
        return 0
    try:
        summary = train(cfg, address=args.address, resource_check=not args.no_resource_check,
                        resume_command=_resume_command(args))
    except (ConfigError, FileNotFoundError) as e:  # also the checks that need Ray (resources): no traceback
        print(f"mone train: {e}")
        return 2
    except TrainingGaveUp as e:
        print(f"mone train: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


class TrainingGaveUp(RuntimeError):
    """Ray Train ran out of restarts (or the data is unusable); the message says why and how to resume."""


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run (same config, overrides and run name): as the user ran it, also when
    it runs as a job of `mone submit` (whose metadata Ray hands the job in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        meta = {}
    if meta.get("mone_command") == "train" and "mone_args" in meta:
        return f"mone submit train -- {meta['mone_args']}"
    words = ["mone", "train", "--config", args.config, *args.overrides]
    words += ["--dense"] if args.dense else []
    words += ["--address", args.address] if args.address else []
    return shlex.join(words)


def train(cfg: TrainConfig, *, address: str | None = None, resource_check: bool = True,
          resume_command: str | None = None) -> dict[str, Any]:
    """Runs (or resumes) one training run; returns the summary printed as the final JSON line."""
    import ray
    from ray.train import TrainingFailedError

    from jobs import data as job_data
    from jobs import faults
    from jobs.ray_connect import check_address, init_ray, requested_address

    t0 = time.time()
    check_address(address)  # a cluster that does not answer: one line now, not after the data is prepared
    if resource_check and not ray.is_initialized() and requested_address(address) == "local":
        # A local Ray gets this machine's CPUs: a request that cannot fit is refused before it starts (GPUs are
        # counted once Ray has detected them, below).
        from ray._private.utils import get_num_cpus

        check_resources(cfg, {"CPU": float(get_num_cpus()), "GPU": math.inf})
    storage = run_files.storage_uri(cfg.run.storage_path)
    run_dir = run_files.join(storage, cfg.run_name)
    init = cfg.model.init_from  # e.g. tiny_cpu_mone's runs/tiny_cpu_nested: the workers need it absolute too
    if init and not run_files.is_remote(init) and Path(init).expanduser().exists():
        cfg.model.init_from = str(Path(init).expanduser().resolve())
    data = job_data.prepare(cfg)  # generate (cached) + manifests + label map; no Ray needed

    if not ray.is_initialized():
        # Worker settings travel as environment: a local Ray started here inherits the driver's; a job
        # submitted with `mone submit` gets them in its runtime_env (a second runtime_env here would clash).
        for k, v in _worker_env(cfg).items():
            os.environ.setdefault(k, v)
        init_ray(address, command="mone train", log_to_driver=True)
    if resource_check:
        for warning in check_resources(cfg, cluster_capacity()):  # autoscaling clusters: what they can grow to
            print(f"[mone] {warning}", flush=True)

    run_files.makedirs(run_dir)
    run_files.write_text(run_files.join(run_dir, "config.yaml"), _yaml(cfg))
    run_files.write_text(run_files.join(run_dir, "labels.json"), json.dumps(data.labels, indent=1))
    if data.missing:
        print(f"[mone] {len(data.missing)} video file(s) listed in the annotations are missing; "
              f"see {run_files.join(run_dir, 'missing.txt')}")
        run_files.write_text(run_files.join(run_dir, "missing.txt"), "\n".join(data.missing) + "\n")

    datasets, error_logs = job_data.ray_datasets(cfg, data)
    invocation, nodes_at_start = faults.new_invocation(), faults.alive_nodes()
    trainer = build_trainer(cfg, data, datasets, error_logs["train"], storage, run_dir, invocation=invocation)
    print(f"[mone] run {cfg.run_name!r}: {data.num_train} train / {data.num_val} val clips, "
          f"{len(data.labels)} classes, {cfg.scaling.num_workers} worker(s), model {cfg.model.variant}; "
          f"run directory {run_dir}")
    try:
        result, failure = trainer.fit(), None
    except TrainingFailedError as e:  # out of restarts: named below, after the errors table is written
        result, failure = None, e
    n_errors = job_data.write_errors(error_logs, run_dir)  # also when the run failed: say which files were bad
    if n_errors:
        print(f"[mone] {n_errors} unreadable video(s) skipped; see {run_files.join(run_dir, 'errors.parquet')}")
    restarts = faults.restarts(run_dir, invocation)
    if failure is not None or result.error:
        failure = failure or result.error
        bad_data = faults.data_error(failure)
        raise TrainingGaveUp(bad_data or faults.failure_message(
            failure, run_dir=run_dir, lost=faults.lost_nodes(nodes_at_start, failure), restarts=restarts,
            max_failures=cfg.run.max_failures, resume_command=resume_command or "the same command again")) from None

    # Consolidated outputs next to Ray's own: inference checkpoint, metric history, errors, plot.
    ckpt_dir = result.checkpoint.path if result.checkpoint else None
    history: list[dict[str, Any]] = []
    inference_dir = run_files.join(run_dir, "inference")
    if result.checkpoint:
        with result.checkpoint.as_directory() as local:
            state = json.loads((Path(local) / STATE_FILE).read_text())
            history = state["history"]
            run_files.upload_dir(Path(local) / "inference", inference_dir)
    plot = None
    if history:
        plot = run_files.join(run_dir, "accuracy_vs_gflops.png")
        _plot_accuracy_vs_gflops(history, plot, cfg)
    best_dir = run_files.join(run_dir, BEST_DIRNAME)
    best_dir = best_dir if cfg.run.keep_best and run_files.exists(best_dir) else None
    report_path = report.write_run_report(cfg, run_dir, history, data, best_dir=best_dir,
                                          inference_dir=inference_dir if result.checkpoint else None)
    last = history[-1] if history else {}
    summary: dict[str, Any] = {
        "run_dir": run_dir,
        "checkpoint": inference_dir,
        "best_checkpoint": best_dir,
        "ray_checkpoint": ckpt_dir,
        "plot": plot,
        "report": report_path,
        "tensorboard": run_files.join(run_dir, tracking.TB_DIRNAME),
        "num_classes": len(data.labels),
        "epochs": last.get("epoch", -1) + 1,
        "global_step": last.get("global_step", 0),
        "wall_s": round(time.time() - t0, 1),
        "train_loss": last.get("train_loss"),
        "data_wait_fraction": last.get("data_wait_fraction"),
        "bad_videos": n_errors,
        "val_views": cfg.data.val_views,  # the per-epoch validation below (last epoch)
        "restarts": restarts,  # worker-group restarts Ray Train made during this command (node or worker losses)
    }
    for b in cfg.mone.val_budgets:
        for key in (f"top1_ec{b}", f"top5_ec{b}", f"mean_class_ec{b}", f"gmacs_ec{b}", f"gflops_ec{b}",
                    f"clips_per_s_ec{b}", f"top1_ema_ec{b}"):
            if key in last or not key.startswith("top1_ema"):
                summary[key] = last.get(key)
    summary.update({k: v for k, v in last.items() if k.startswith(("top1_width", "gmacs_width"))})  # nested stage
    summary["views_per_clip"] = last.get("views_per_clip")
    summary["flops_convention"] = FLOPS_CONVENTION
    if best_dir:
        best = json.loads(run_files.read_text(run_files.join(best_dir, "inference.json")))
        summary["best"] = {"metric": cfg.run.keep_best, "epoch": best["run"]["epoch"],
                           "value": best.get("metrics", {}).get(cfg.run.keep_best)}
    if last.get(job_data.FINAL_EVAL):  # the full view protocol, once over the final weights
        summary[job_data.FINAL_EVAL] = last[job_data.FINAL_EVAL]
    print(f"[mone] done in {summary['wall_s']} s. run directory: {run_dir}\n"
          f"[mone] inference checkpoint: {inference_dir}" + (f" (best {cfg.run.keep_best}: {best_dir})" if best_dir
                                                              else "") + f"\n[mone] plot: {plot}\n"
          f"[mone] report: {report_path}\n[mone] TensorBoard: tensorboard --logdir {summary['tensorboard']}\n"
          f"[mone] metrics: {run_files.join(run_dir, 'metrics.jsonl')}")
    print(_budget_table(last, cfg.mone.val_budgets))
    return summary


def build_trainer(cfg: TrainConfig, data, datasets: dict[str, Any], train_error_log, storage: str, run_dir: str,
                  callbacks: list | None = None, invocation: str | None = None):
    """The TorchTrainer of one run (also built inside each `mone tune train` trial, with Tune's callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs import data as job_data
    from jobs import faults

    loop_config = {
        "config": cfg.to_dict(),
        "labels": data.labels,
        "num_train": data.num_train,
        "num_val": data.num_val,
        "run_dir": run_dir,
        "eval_clip": data.final_clip or data.eval_clip,  # what `mone evaluate` decodes by default
        "final_views": cfg.data.final_views if data.final_clip else None,
        "train_error_log": train_error_log,
        "invocation": invocation or faults.new_invocation(),  # groups this command's attempts in attempts.jsonl
        "driver": faults.here(),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=_worker_resources(cfg),
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=job_data.split_config(),
    )


def _yaml(cfg: TrainConfig) -> str:
    with tempfile.TemporaryDirectory() as d:
        dump_config(cfg, Path(d) / "c.yaml")
        return (Path(d) / "c.yaml").read_text()


def _worker_resources(cfg: TrainConfig) -> dict[str, float]:
    res = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        res["GPU"] = cfg.scaling.gpus_per_worker
    return res


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    env = {
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "PYTHONUNBUFFERED": "1",
        # Train V2 reroutes worker print() through a logger that here also tees to stdout: every line twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator, explicitly (no Intel extensions needed)
    return env


def _budget_table(metrics: dict[str, Any], budgets: list[float]) -> str:
    rows = ["  e_c    GFLOPs/view*  top-1    top-5   clips/s"]
    for b in budgets:
        g, t1, t5, cps = (metrics.get(f"{k}_ec{b}") for k in ("gmacs", "top1", "top5", "clips_per_s"))
        if t1 is None:
            continue
        ema = metrics.get(f"top1_ema_ec{b}")
        rows.append(f"  {b:<5}  {g:>12.4g}  {100 * t1:6.1f}%  {100 * t5:6.1f}%  {cps:8.1f}"
                    + ("" if ema is None else f"   EMA top-1 {100 * ema:.1f}%"))
    rows.append(f"  * the paper's convention (a multiply-add = 1 FLOP), per view; {metrics.get('views_per_clip', 1)} "
                "view(s) per clip")
    return "\n".join(rows)


def _plot_accuracy_vs_gflops(history: list[dict[str, Any]], path: str, cfg: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(cfg.mone.val_budgets)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    shown = history[-3:]
    for i, m in enumerate(shown):
        xs = [m.get(f"gmacs_ec{b}", m.get(f"gflops_ec{b}", 0) / 2) for b in budgets]
        ys = [100 * m[f"top1_ec{b}"] for b in budgets if m.get(f"top1_ec{b}") is not None]
        if len(ys) != len(budgets):
            continue
        last = i == len(shown) - 1
        ax.plot(xs, ys, "o-" if last else ".--", alpha=1.0 if last else 0.35, color="C0",
                label=f"epoch {m['epoch'] + 1}" + (" (final)" if last else ""))
        if last:
            for b, x, y in zip(budgets, xs, ys, strict=True):
                ax.annotate(f"e_c={b}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    views = shown[-1].get("views_per_clip", 1)
    ax.set_xlabel(f"GFLOPs per view (multiply-add = 1, as in the paper; {views} view(s)/clip)")
    ax.set_ylabel("top-1 accuracy (%)")
    kind = "dense-trained" if cfg.mone.dense else "MoNE"
    ax.set_title(f"{cfg.model.variant} ({kind}): accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with run_files.local_copy_for_write(path) as local:
        fig.savefig(local)
    plt.close(fig)


# =========================================================================== worker


def _import_deepspeed():
    """`import deepspeed` without MLflow. DeepSpeed's autotuner imports MLflow when it is installed (it is here, for
    tracking), which doubles the import: 7.3 -> 3.6 s per process measured, paid by every worker at every start and
    every restart after a node loss. We never run DeepSpeed's autotuner; our own tracking imports MLflow later, as
    usual (the block is lifted right after)."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    block = "mlflow" not in sys.modules
    if block:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner sets has_mlflow = False
    try:
        return importlib.import_module("deepspeed")
    finally:
        if block and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]


def _disable_deepspeed_shm_comm() -> None:
    """DeepSpeed JIT-compiles its shared-memory comm op on CPU at initialize (60-80 s, needs g++/ninja).
    Ray already gives us a gloo process group, so mark the op incompatible. Not a documented switch;
    it is kept here, in one place. `importlib` because a literal `deepspeed.ops...` inside a function
    Ray pickles breaks cloudpickle (STACK.md)."""
    ops = importlib.import_module("deepspeed.ops")
    compatible = getattr(ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _tokens_classifier_cls():
    import torch

    class TokensClassifier(torch.nn.Module):
        """DeepSpeed's engine calls `forward`; the model's token entry point is `forward_tokens`."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, tokens, budget=None):  # (B, L, K) uint8 -> (B, classes)
            return self.model.forward_tokens(tokens, budget=budget)

    return TokensClassifier


def TokensClassifier(model):  # noqa: N802 - a class built lazily so importing jobs.train needs no torch
    return _tokens_classifier_cls()(model)


def deepspeed_config(cfg: TrainConfig, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a run; `scaling.deepspeed` (any DeepSpeed keys) is merged over it last."""
    bf16 = cfg.scaling.precision == "bf16" or (cfg.scaling.precision == "auto" and use_gpu)
    zero: dict[str, Any] = {"stage": cfg.scaling.zero_stage}
    if cfg.scaling.zero_stage >= 1:
        # Reduce (ZeRO-1/2) or reduce-scatter (ZeRO-3) gradient buckets while backward is still running.
        zero.update(overlap_comm=True, contiguous_gradients=True)
    base = {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # DeepSpeed whitelists Adam-type optimizers for ZeRO; torch's SGD works under ZeRO-1/2 (tests/jobs/test_optim)
        "zero_allow_untested_optimizer": cfg.optim.optimizer == "sgd",
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }
    return _merged(base, cfg.scaling.deepspeed)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import torch
    import torch.nn.functional as F

    from jobs import data as job_data
    from jobs import faults
    from jobs import optim as recipe
    from jobs.checkpoint import find_inference_dir, is_best, save_inference
    from jobs.progress import RunPace, format_duration
    from models.capacity import capacities_for_budget, width_fractions
    from models.flops import model_flops
    from models.mix import MixConfig, mix_batch
    from models.training import ema_model, nested_loss, width_capacities, width_names
    from models.vit import create_model

    cfg = config_from_dict(loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu
    if use_gpu:  # never a silent CPU fallback next to an NCCL group: say which node, build and driver
        from jobs.preflight import require_cuda

        require_cuda()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.run.seed)
    if not use_gpu:
        torch.set_num_threads(max(1, int(round(cfg.scaling.cpus_per_worker * 2)) // 1))

    labels: list[str] = loop["labels"]
    model = create_model(cfg.model.variant, num_classes=len(labels), drop_path=cfg.model.drop_path,
                         **cfg.model.overrides)
    if cfg.model.init_from:
        from models.weights import load_pretrained

        init = cfg.model.init_from  # a run directory (the previous stage's run) means its inference checkpoint
        load_pretrained(model, find_inference_dir(init) if Path(init).expanduser().is_dir() else init)
    model.to(device)
    net = TokensClassifier(model)
    ema = ema_model(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # fp32, before DeepSpeed casts
    ema_net = None if ema is None else TokensClassifier(ema.module)  # validated like the trained net

    if not use_gpu:  # also when the cluster was started without our environment (`ray start`, a job)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = _import_deepspeed()
    _disable_deepspeed_shm_comm()
    train_clips = job_data.train_clips(cfg, loop["num_train"])  # clips per epoch (data.clips_per_video each)
    steps_per_epoch = max(1, train_clips // (cfg.optim.batch_size * world))  # micro-batches per worker
    optimizer = recipe.build_optimizer(model, cfg)  # groups: no_weight_decay(), layer-wise lr, lr x batch scale
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # DeepSpeed steps it once per optimizer step
        optimizer, recipe.lr_lambda(cfg, recipe.steps_per_epoch(cfg, train_clips)))
    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, use_gpu),
        dist_init_required=False,
    )
    # Mixed precision is DeepSpeed's bf16 mode, not torch.autocast: DeepSpeed holds the module's parameters in
    # bf16 (fp32 masters in the ZeRO optimizer; buffers stay fp32) and its engine.forward switches a caller's CUDA
    # autocast off anyway. So the model runs in its parameters' dtype with no autocast, in training and validation,
    # on GPU and CPU alike (on CPU DeepSpeed would leave a caller's autocast on and hide dtype bugs).

    # ---- resume
    start_epoch, global_step, history = 0, 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, DS_SUBDIR), tag=DS_TAG)
            state = json.loads(Path(d, STATE_FILE).read_text())
            if ema is not None:
                ema.load_state_dict(torch.load(Path(d, EMA_FILE), map_location=device, weights_only=True))
        start_epoch, global_step, history = state["epoch"] + 1, state["global_step"], state["history"]
        if rank == 0:
            print(f"[mone] resumed from epoch {start_epoch} (global step {global_step})", flush=True)
    tracker = tracking.open_tracker(cfg, loop["run_dir"], rank=rank, start_step=global_step)  # no-op off rank 0
    _record_attempt(loop, rank, world, start_epoch, global_step)

    aug = cfg.data.augment  # mixup / cutmix on the token batch (models/mix.py); off by default
    mix_cfg = MixConfig(aug.mixup, aug.cutmix, aug.mix_prob, aug.switch_prob)
    mix_grid = (model.cfg.temporal_tokens, model.cfg.grid, model.cfg.grid)  # (T', gh, gw)
    budgets = [1.0] if cfg.mone.dense else list(cfg.mone.train_budgets)
    from models.budgets import budget_probabilities

    probs = budget_probabilities(budgets, cfg.mone.isoflops_target if cfg.mone.isoflops else None)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    final_shard = ray.train.get_dataset_shard(job_data.FINAL_EVAL) if loop.get("final_views") else None
    pace = RunPace(cfg.optim.epochs, start_epoch)  # data-wait and ETAs
    val_cache: dict = {}  # the decoded val batches, kept after the first validation when small (data.val_cache_mb)

    def budget_arg(e_c: float):
        return None if e_c >= 1.0 else capacities_for_budget(e_c, delta=cfg.mone.delta, beta=cfg.mone.beta)

    n_widths = model.cfg.num_experts
    width_fracs = width_fractions(n_widths)  # d_j / D: a width's sub-model is e_c = d_j / D

    first_step = True
    for epoch in range(start_epoch, cfg.optim.epochs):
        loop["train_error_log"].set_epoch(epoch)  # decode workers seed sampling/crops with it
        engine.train()
        t_epoch, n_clips, n_steps = time.time(), 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per step
        seen: list[str] = []
        ep = pace.epoch(epoch, steps_per_epoch)
        for batch in ep.wrap(job_data.iter_batches(train_shard, cfg.optim.batch_size, device, train=True)):
            seen += batch["path"]
            tokens, target = batch["tokens"][:, 0], batch["label"]  # (B, L, K) uint8, (B,)
            if mix_cfg.active:  # -> mixed tokens (float after mixup) and soft targets (B, classes)
                tokens, target, _ = mix_batch(tokens, target, len(labels), mix_cfg, mix_grid,
                                              np.random.default_rng([cfg.run.seed, global_step, rank, 1]),
                                              model.normalize_tokens)
            # Same e_c (or width) on every worker for a step (seeded by the step): no rank waits on a slower one.
            step_rng = np.random.default_rng([cfg.run.seed, global_step])
            stage = recipe.stage_of(cfg, epoch)

            def criterion(logits, target=target):  # (B, classes) -> scalar
                return F.cross_entropy(logits.float(), target, label_smoothing=cfg.optim.label_smoothing)

            if stage == "nested":  # every width a standalone sub-model: all four summed, or one drawn
                widths = range(n_widths) if cfg.mone.nested_mode == "sum" else [int(step_rng.integers(n_widths))]
                loss = nested_loss(lambda t, c: engine(t, budget=c), tokens, criterion, widths)
                e_c = sum(width_fracs[j] for j in widths) / len(widths)
            else:
                e_c = 1.0 if stage == "dense" else float(step_rng.choice(budgets, p=probs))
                loss = criterion(engine(tokens, budget=budget_arg(e_c)))  # logits (B, classes)
            boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch ends an optimizer step
            engine.backward(loss)
            engine.step()
            if ema is not None and boundary:
                ema.update_parameters(model)
            global_step += 1
            if first_step:  # the attempt is live again (a restore's recovery time ends here)
                first_step = False
                if rank == 0:
                    faults.record(loop["run_dir"], {"invocation": loop["invocation"], "event": "first_step",
                                                    "epoch": epoch, "global_step": global_step})
            n_steps += 1
            n_clips += tokens.shape[0]
            loss_sum += loss.detach()
            if rank == 0 and (n_steps % cfg.run.log_every == 0 or n_steps == 1):
                rate = n_clips * world / (time.time() - t_epoch)
                print(f"[mone] epoch {epoch + 1}/{cfg.optim.epochs} step {n_steps}/~{steps_per_epoch} "
                      f"[{stage}] loss {loss.item():.3f} e_c {e_c:.2f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"{rate:.1f} clips/s {ep.status()}", flush=True)
                ep.warn_if_input_bound(lambda msg: print(msg, flush=True))
                tracker.log_step(global_step, loss=loss.item(), lr=scheduler.get_last_lr()[0], e_c=e_c,
                                 clips_per_s=rate, data_wait_s=ep.last_wait_s,
                                 data_wait_fraction=ep.wait_fraction)
        train_time = time.time() - t_epoch
        if rank == 0:
            ep.warn_if_input_bound(lambda msg: print(msg, flush=True), force=True)
        if cfg.run.record_shards:
            run_files.write_text(run_files.join(loop["run_dir"], "shards", f"epoch{epoch}_rank{rank}.txt"),
                                 "".join(p + "\n" for p in seen))
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "global_step": global_step,
            "train_clips": _sum_over_ranks(n_clips, device),  # clips trained on in this epoch, all ranks
            "train_loss": loss_sum.item() / max(1, n_steps),
            "train_clips_per_s": n_clips * world / max(train_time, 1e-9),
            "lr": scheduler.get_last_lr()[0],
            **ep.summary(),
        }
        extra = []  # nested stage: each width's sub-model; EMA on: its weights at every budget
        if recipe.stage_of(cfg, epoch) == "nested":
            extra += [(f"width{n}", net, c) for n, c in zip(width_names(n_widths), width_capacities(n_widths),
                                                             strict=True)]
        ema_entries = [] if ema is None else [(f"ema_ec{b}", ema_net, budget_arg(b)) for b in cfg.mone.val_budgets]
        val_metrics, confusions = _validate(net, val_shard, cfg, device, budget_arg, model_flops, len(labels),
                                            extra + ema_entries, cache=val_cache)
        metrics.update(val_metrics)
        last_epoch = epoch == cfg.optim.epochs - 1
        if last_epoch and final_shard is not None:  # the full view protocol, once, over the final weights (+ EMA)
            metrics[job_data.FINAL_EVAL] = {"views": loop["final_views"], "weights": f"final (epoch {epoch + 1})",
                                            **_validate(net, final_shard, cfg, device, budget_arg, model_flops,
                                                        len(labels), ema_entries)[0]}
        history.append(metrics)
        if rank == 0:
            run_files.write_text(run_files.join(loop["run_dir"], "metrics.jsonl"),
                                 "".join(json.dumps(m) + "\n" for m in history))
            print(epoch_line(epoch, cfg, metrics), flush=True)
            report.write_confusion(run_files.join(loop["run_dir"], report.VAL_CONFUSION_FILE), confusions, labels,
                                   epoch=epoch)
            tracker.log_epoch(global_step, metrics, functools.partial(
                report.epoch_figures, history, cfg, confusions if last_epoch else None, labels))
            if last_epoch:  # before the last report: Tune may end a trial's workers right after it
                tracker.close()

        # A best epoch (run.keep_best) is checkpointed too; rank 0 decides (train metrics differ between ranks).
        best = _rank0_decides(bool(cfg.run.keep_best) and is_best(history, cfg.run.keep_best), device)
        if (epoch + 1) % cfg.run.checkpoint_every == 0 or last_epoch or best:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(os.path.join(tmp, DS_SUBDIR), tag=DS_TAG)  # every rank: its own shards
                weights = full_fp32_state_dict(engine, keep=rank == 0)  # a collective: every rank takes part
                if rank == 0:
                    Path(tmp, STATE_FILE).write_text(json.dumps(
                        {"epoch": epoch, "global_step": global_step, "history": history}))
                    raw = weights
                    if ema is not None:  # EMA on: it is the inference model; the raw weights go beside it
                        torch.save(ema.state_dict(), Path(tmp, EMA_FILE))
                    save_inference(
                        Path(tmp, "inference"), weights if ema is None else ema.module.state_dict(),
                        variant=cfg.model.variant, num_classes=len(labels), labels=labels,
                        clip=loop["eval_clip"], overrides=cfg.model.overrides,
                        extra={"train_budgets": budgets, "val_budgets": list(cfg.mone.val_budgets),
                               "dense": cfg.mone.dense, "run": {"name": cfg.run_name, "epoch": epoch,
                                                                 "global_step": global_step}, "metrics": metrics,
                               "weights": "raw" if ema is None else f"ema (decay {cfg.optim.ema_decay})"},
                        extra_weights=None if ema is None else {RAW_WEIGHTS_FILE: raw},
                    )
                    if best:  # best/ beside the latest inference/: the same files, kept until a better epoch
                        run_files.upload_dir(Path(tmp, "inference"), run_files.join(loop["run_dir"], BEST_DIRNAME))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        pace.end_epoch()
        if rank == 0 and not last_epoch:
            print(f"[mone] ETA run {format_duration(pace.eta_s())}", flush=True)
    tracker.close()


def _record_attempt(loop: dict[str, Any], rank: int, world: int, start_epoch: int, global_step: int) -> None:
    """Rank 0 logs this attempt's start and where every rank runs (attempts.jsonl: restarts, lost nodes)."""
    import torch.distributed as dist

    from jobs import faults

    me = {"rank": rank, **faults.here()}
    ranks = [me]
    if world > 1 and dist.is_available() and dist.is_initialized():
        ranks = [None] * world
        dist.all_gather_object(ranks, me)
    if rank == 0:
        faults.record(loop["run_dir"], {"invocation": loop["invocation"], "event": "start", "epoch": start_epoch,
                                        "global_step": global_step, "workers": ranks, "driver": loop["driver"]})


def _rank0_decides(flag: bool, device) -> bool:
    """Rank 0's value of `flag` on every rank (a decision that leads to collectives must be the same everywhere)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _sum_over_ranks(n: int, device) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return int(n)
    t = torch.tensor([n], dtype=torch.int64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return int(t.item())


def full_fp32_state_dict(engine, keep: bool = True) -> dict[str, Any] | None:
    """The plain model's full weights in fp32 (keys without the wrapper's `model.` prefix), taken from the fp32
    master copies the optimizer holds under bf16, not from the bf16 working copies.

    Under ZeRO each rank holds a slice of the masters (ZeRO-3: of the parameters too), so each parameter is
    assembled by a collective: every rank must call this, in the same order. Only a rank with `keep` copies the
    result to host memory and gets the dict; the others get None."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _unpartitioned_masters(engine)
    out: dict[str, Any] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # ZeRO 1-3: all-reduce / all-gather of the fp32 slices, else None
        if full is None:
            full = masters.get(id(p), p)  # no ZeRO: the mixed-precision optimizer's master copy, or p (fp32)
        if keep:
            out[name.removeprefix("model.")] = full.detach().to("cpu", torch.float32)
    if not keep:
        return None
    for mod_name, mod in engine.module.named_modules():  # persistent buffers are part of the state dict too
        for b_name, buf in mod.named_buffers(recurse=False):
            if buf is not None and b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}".removeprefix("model.")] = buf.detach().cpu()
    return out


def _unpartitioned_masters(engine) -> dict[int, Any]:
    """id(low-precision param) -> its fp32 master, for DeepSpeed's fp16/bf16 optimizers without ZeRO (stage 0),
    which keep the masters as per-parameter lists parallel to the model's parameter groups."""
    opt = engine.optimizer
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if not low or not high or len(low) != len(high):
        return {}
    return {id(p): m for lg, hg in zip(low, high, strict=True) if len(lg) == len(hg)
            for p, m in zip(lg, hg, strict=True) if m.numel() == p.numel()}


def epoch_line(epoch: int, cfg: TrainConfig, metrics: dict[str, Any]) -> str:
    """The log line of a finished epoch: loss, speed, data-wait, top-1 at each validation budget, then each nested
    width's and the EMA weights' top-1 when they were validated."""
    line = "[mone] epoch {}/{}: loss {:.3f}, {:.1f} clips/s, data-wait {:.0f}%, ".format(
        epoch + 1, cfg.optim.epochs, metrics["train_loss"], metrics["train_clips_per_s"],
        100 * metrics["data_wait_fraction"])
    line += ", ".join(f"top-1@{b} {100 * metrics[f'top1_ec{b}']:.1f}%" for b in cfg.mone.val_budgets)
    for key, v in metrics.items():
        if key.startswith("top1_width"):
            line += f", width {key.removeprefix('top1_width')}xD {100 * v:.1f}%"
        elif key.startswith("top1_ema_ec"):
            line += f", EMA@{key.removeprefix('top1_ema_ec')} {100 * v:.1f}%"
    return line


def _val_batches(val_shard, cfg: TrainConfig, device, cache: dict | None):
    """The worker's val batches: decoded from its shard, or, from the second validation on, replayed from host
    memory when every rank's batches fit in data.val_cache_mb (val clips do not change between epochs). Whether to
    keep them is decided by all ranks together: a rank that skipped its shard while another iterated its own
    would leave the streaming split waiting for it."""
    import torch
    import torch.distributed as dist

    from jobs import data as job_data

    if cache is not None and "batches" in cache:
        for b in cache["batches"]:
            yield {"tokens": b["tokens"].to(device, non_blocking=True), "label": b["label"].to(device),
                   "path": b["path"]}
        return
    limit = (cfg.data.val_cache_mb * 2**20) if cache is not None else 0
    kept: list[dict] | None = [] if limit else None
    size = 0
    for batch in job_data.iter_batches(val_shard, cfg.optim.batch_size, device, train=False):
        if kept is not None:
            size += batch["tokens"].numel() * batch["tokens"].element_size()
            if size > limit:
                kept = None
            else:
                kept.append({"tokens": batch["tokens"].cpu(), "label": batch["label"].cpu(), "path": batch["path"]})
        yield batch
    if not limit:
        return
    fits = torch.tensor(int(kept is not None), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    if fits.item():
        cache["batches"] = kept


def _validate(net, val_shard, cfg: TrainConfig, device, budget_arg, model_flops, num_classes: int,
              extra: list[tuple[str, Any, Any]] | None = None,
              cache: dict | None = None) -> tuple[dict[str, Any], dict[float, Any]]:
    """Top-1/top-5/mean-class accuracy (torchmetrics, every rank's counts summed), FLOPs and clips/s at each
    validation budget, on one decode of the val set; also the confusion matrix (C, C) of each budget. `extra`:
    more (key, net, capacities) entries on the same decode (nested widths, the EMA weights). Views are fused by
    averaging their softmax probabilities (models.metrics.fuse_views).

    `net` is the module DeepSpeed wraps (engine.module): calling it runs DeepSpeed's hooks, which gather ZeRO-3's
    partitioned parameters, and it computes in the parameters' dtype (bf16 under DeepSpeed's bf16 mode).
    FLOPs: `gmacs_<key>` per view in the paper's convention (a multiply-add is one FLOP: what the paper and ViViT
    call GFLOPs), `views_per_clip` views; `gflops_<key>` per clip over all views with a multiply-add as two."""
    import torch
    import torch.distributed as dist

    from models.metrics import ClassificationMetrics, fuse_views

    budgets = list(cfg.mone.val_budgets)
    entries = [(f"ec{b}", net, budget_arg(b)) for b in budgets] + list(extra or [])
    for m in {id(m): m for _, m, _ in entries}.values():
        m.eval()
    meters = [ClassificationMetrics(num_classes, device=device) for _ in entries]
    seconds = torch.zeros(len(entries), dtype=torch.float64, device=device)  # on the device: NCCL can reduce it
    views = 1
    with torch.no_grad():
        for batch in _val_batches(val_shard, cfg, device, cache):
            tokens, target = batch["tokens"], batch["label"]  # (B, V, L, K), (B,)
            B, views = tokens.shape[:2]
            flat = tokens.flatten(0, 1)  # (B*V, L, K)
            for i, (_, m, caps) in enumerate(entries):
                t = time.perf_counter()
                logits = m(flat, budget=caps)  # (B*V, C)
                probs = fuse_views(logits.float().view(B, views, -1))  # (B, C)
                if device.type == "cuda":
                    torch.cuda.synchronize()  # clips/s needs the real end of the forward
                seconds[i] += time.perf_counter() - t
                meters[i].update(probs, target)
    results = [m.compute() for m in meters]  # collective: sums the counts of every rank
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(seconds)
        world = dist.get_world_size()
    else:
        world = 1
    seconds = seconds.cpu()
    out: dict[str, Any] = {"val_clips": results[0]["n"], "views_per_clip": views}
    for i, ((key, m, caps), r) in enumerate(zip(entries, results, strict=True)):
        n = max(1, r["n"])
        out[f"top1_{key}"] = r["top1"]
        out[f"top5_{key}"] = r["top5"]
        out[f"mean_class_{key}"] = r["mean_class"]
        flops = model_flops(m.model.cfg, capacities=caps)  # per view, a multiply-add = 2
        out[f"gmacs_{key}"] = flops / 2e9
        out[f"gflops_{key}"] = views * flops / 1e9
        # Workers ran in parallel: clips per second of the whole group = n / mean worker time.
        out[f"clips_per_s_{key}"] = n / max(seconds[i].item() / world, 1e-9)
    return out, {b: r["confusion"] for b, r in zip(budgets, results, strict=False)}
