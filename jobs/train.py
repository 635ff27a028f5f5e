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

from jobs import run_files
from jobs.config import ConfigError, TrainConfig, config_from_dict, dump_config, load_config

DS_SUBDIR = "deepspeed"  # inside a Ray checkpoint: DeepSpeed's own files (every rank's shards)
DS_TAG = "state"
STATE_FILE = "train_state.json"  # epoch, global step, metric history (rank 0)


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
        "  mone train --dense run.name=tiny_dense        # the dense baseline from the same config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="tiny_cpu", help="config name under jobs/configs/ or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.epochs=3")
    p.add_argument("--dense", action="store_true", help="train the dense baseline (e_c = 1 every step)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-resource-check", action="store_true",
                   help="skip the check that the cluster has the CPUs/GPUs the workers need (autoscaling clusters)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["mone.dense=true"] if args.dense else [])
    try:
        cfg = load_config(args.config, overrides)
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


def check_resources(cfg: TrainConfig, resources: dict[str, float]) -> None:
    """Fails before any worker starts when the workers (plus one decode task) cannot fit the cluster."""
    s = cfg.scaling
    cpus_needed = s.num_workers * s.cpus_per_worker + cfg.data.decode_cpus
    cpus = resources.get("CPU", 0.0)
    if cpus_needed > cpus + 1e-9:
        raise ConfigError(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPU + {cfg.data.decode_cpus} CPU for decoding "
            f"needs {cpus_needed:g} CPUs, the Ray cluster has {cpus:g}; lower scaling.num_workers or "
            "scaling.cpus_per_worker (fractions are fine), or add nodes"
        )
    if s.use_gpu:
        gpus = resources.get("GPU", 0.0)
        if s.num_workers * s.gpus_per_worker > gpus + 1e-9:
            raise ConfigError(
                f"scaling: {s.num_workers} workers x {s.gpus_per_worker} GPU needs "
                f"{s.num_workers * s.gpus_per_worker:g} GPUs, the Ray cluster has {gpus:g}; lower scaling.num_workers "
                "or set scaling.use_gpu=false"
            )


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
    data = job_data.prepare(cfg)  # generate (cached) + manifests + label map; no Ray needed

    if not ray.is_initialized():
        # Worker settings travel as environment: a local Ray started here inherits the driver's; a job
        # submitted with `mone submit` gets them in its runtime_env (a second runtime_env here would clash).
        for k, v in _worker_env(cfg).items():
            os.environ.setdefault(k, v)
        init_ray(address, command="mone train", log_to_driver=True)
    if resource_check:
        check_resources(cfg, ray.cluster_resources())

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
    last = history[-1] if history else {}
    summary: dict[str, Any] = {
        "run_dir": run_dir,
        "checkpoint": inference_dir,
        "ray_checkpoint": ckpt_dir,
        "plot": plot,
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
        for key in (f"top1_ec{b}", f"top5_ec{b}", f"gflops_ec{b}", f"clips_per_s_ec{b}"):
            summary[key] = last.get(key)
    if last.get(job_data.FINAL_EVAL):  # the full view protocol, once over the final weights
        summary[job_data.FINAL_EVAL] = last[job_data.FINAL_EVAL]
    print(f"[mone] done in {summary['wall_s']} s. run directory: {run_dir}\n"
          f"[mone] inference checkpoint: {inference_dir}\n[mone] plot: {plot}\n"
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
    rows = ["  e_c    GFLOPs/clip   top-1    top-5   clips/s"]
    for b in budgets:
        g, t1, t5, cps = (metrics.get(f"{k}_ec{b}") for k in ("gflops", "top1", "top5", "clips_per_s"))
        if t1 is None:
            continue
        rows.append(f"  {b:<5}  {g:>11.3f}  {100 * t1:6.1f}%  {100 * t5:6.1f}%  {cps:8.1f}")
    return "\n".join(rows)


def _plot_accuracy_vs_gflops(history: list[dict[str, Any]], path: str, cfg: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(cfg.mone.val_budgets)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    shown = history[-3:]
    for i, m in enumerate(shown):
        xs = [m.get(f"gflops_ec{b}") for b in budgets]
        ys = [100 * m[f"top1_ec{b}"] for b in budgets if m.get(f"top1_ec{b}") is not None]
        if len(ys) != len(budgets):
            continue
        last = i == len(shown) - 1
        ax.plot(xs, ys, "o-" if last else ".--", alpha=1.0 if last else 0.35, color="C0",
                label=f"epoch {m['epoch'] + 1}" + (" (final)" if last else ""))
        if last:
            for b, x, y in zip(budgets, xs, ys, strict=True):
                ax.annotate(f"e_c={b}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("GFLOPs per clip")
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
    bf16 = cfg.scaling.precision == "bf16" or (cfg.scaling.precision == "auto" and use_gpu)
    return {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    warmup = max(1, int(cfg.optim.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, cfg.optim.epochs * steps_per_epoch)
    floor = cfg.optim.min_lr / cfg.optim.lr

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import torch
    import torch.nn.functional as F

    from jobs import data as job_data
    from jobs import faults
    from jobs.checkpoint import save_inference
    from jobs.progress import RunPace, format_duration
    from models.capacity import capacities_for_budget
    from models.flops import model_flops
    from models.vit import create_model

    cfg = config_from_dict(loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.run.seed)
    if not use_gpu:
        torch.set_num_threads(max(1, int(round(cfg.scaling.cpus_per_worker * 2)) // 1))

    labels: list[str] = loop["labels"]
    model = create_model(cfg.model.variant, num_classes=len(labels), **cfg.model.overrides)
    if cfg.model.init_from:
        from models.weights import load_pretrained

        load_pretrained(model, cfg.model.init_from)
    model.to(device)
    net = TokensClassifier(model)

    if not use_gpu:  # also when the cluster was started without our environment (`ray start`, a job)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _disable_deepspeed_shm_comm()
    steps_per_epoch = max(1, job_data.train_clips(cfg, loop["num_train"]) // (cfg.optim.batch_size * world))
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim < 2 or "pos_embed" in name or "token" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=(0.9, 0.999),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, use_gpu),
        dist_init_required=False,
    )
    amp_dtype = torch.bfloat16 if engine.bfloat16_enabled() else None

    # ---- resume
    start_epoch, global_step, history = 0, 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, DS_SUBDIR), tag=DS_TAG)
            state = json.loads(Path(d, STATE_FILE).read_text())
        start_epoch, global_step, history = state["epoch"] + 1, state["global_step"], state["history"]
        if rank == 0:
            print(f"[mone] resumed from epoch {start_epoch} (global step {global_step})")
    _record_attempt(loop, rank, world, start_epoch, global_step)

    budgets = [1.0] if cfg.mone.dense else list(cfg.mone.train_budgets)
    probs = job_data.budget_probabilities(budgets, cfg.mone.isoflops_target if cfg.mone.isoflops else None)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    final_shard = ray.train.get_dataset_shard(job_data.FINAL_EVAL) if loop.get("final_views") else None
    pace = RunPace(cfg.optim.epochs, start_epoch)  # data-wait and ETAs

    def budget_arg(e_c: float):
        return None if e_c >= 1.0 else capacities_for_budget(e_c, delta=cfg.mone.delta, beta=cfg.mone.beta)

    first_step = True
    for epoch in range(start_epoch, cfg.optim.epochs):
        loop["train_error_log"].set_epoch(epoch)  # decode workers seed sampling/crops with it
        engine.train()
        t_epoch, n_clips, loss_sum, n_steps = time.time(), 0, 0.0, 0
        seen: list[str] = []
        ep = pace.epoch(epoch, steps_per_epoch)
        for batch in ep.wrap(job_data.iter_batches(train_shard, cfg.optim.batch_size, device, train=True)):
            seen += batch["path"]
            tokens, target = batch["tokens"][:, 0], batch["label"]  # (B, L, K) uint8, (B,)
            # Same e_c on every worker for a step (seeded by the step): no rank waits on a slower budget.
            e_c = 1.0 if epoch < cfg.mone.dense_epochs else float(
                np.random.default_rng([cfg.run.seed, global_step]).choice(budgets, p=probs))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = engine(tokens, budget=budget_arg(e_c))  # (B, classes)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.optim.label_smoothing)
            engine.backward(loss)
            engine.step()
            global_step += 1
            if first_step:  # the attempt is live again (a restore's recovery time ends here)
                first_step = False
                if rank == 0:
                    faults.record(loop["run_dir"], {"invocation": loop["invocation"], "event": "first_step",
                                                    "epoch": epoch, "global_step": global_step})
            n_steps += 1
            n_clips += tokens.shape[0]
            loss_sum += loss.item()
            if rank == 0 and (n_steps % cfg.run.log_every == 0 or n_steps == 1):
                rate = n_clips * world / (time.time() - t_epoch)
                print(f"[mone] epoch {epoch + 1}/{cfg.optim.epochs} step {n_steps}/~{steps_per_epoch} "
                      f"loss {loss.item():.3f} e_c {e_c:.2f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"{rate:.1f} clips/s {ep.status()}", flush=True)
                ep.warn_if_input_bound(lambda msg: print(msg, flush=True))
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
            "train_loss": loss_sum / max(1, n_steps),
            "train_clips_per_s": n_clips * world / max(train_time, 1e-9),
            "lr": scheduler.get_last_lr()[0],
            **ep.summary(),
        }
        metrics.update(_validate(model, val_shard, cfg, device, amp_dtype, budget_arg, model_flops))
        last_epoch = epoch == cfg.optim.epochs - 1
        if last_epoch and final_shard is not None:  # the full view protocol, once, over the final weights
            metrics[job_data.FINAL_EVAL] = {"views": loop["final_views"], "weights": f"final (epoch {epoch + 1})",
                                            **_validate(model, final_shard, cfg, device, amp_dtype, budget_arg,
                                                        model_flops)}
        history.append(metrics)
        if rank == 0:
            run_files.write_text(run_files.join(loop["run_dir"], "metrics.jsonl"),
                                 "".join(json.dumps(m) + "\n" for m in history))
            print("[mone] epoch {}/{}: loss {:.3f}, {:.1f} clips/s, data-wait {:.0f}%, ".format(
                epoch + 1, cfg.optim.epochs, metrics["train_loss"], metrics["train_clips_per_s"],
                100 * metrics["data_wait_fraction"])
                + ", ".join(f"top-1@{b} {100 * metrics[f'top1_ec{b}']:.1f}%" for b in cfg.mone.val_budgets),
                flush=True)

        if (epoch + 1) % cfg.run.checkpoint_every == 0 or last_epoch:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(os.path.join(tmp, DS_SUBDIR), tag=DS_TAG)  # every rank: its own shards
                if rank == 0:
                    Path(tmp, STATE_FILE).write_text(json.dumps(
                        {"epoch": epoch, "global_step": global_step, "history": history}))
                    save_inference(
                        Path(tmp, "inference"), _full_state_dict(engine),
                        variant=cfg.model.variant, num_classes=len(labels), labels=labels,
                        clip=loop["eval_clip"], overrides=cfg.model.overrides,
                        extra={"train_budgets": budgets, "val_budgets": list(cfg.mone.val_budgets),
                               "dense": cfg.mone.dense, "run": {"name": cfg.run_name, "epoch": epoch,
                                                                 "global_step": global_step}},
                    )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        pace.end_epoch()
        if rank == 0 and not last_epoch:
            print(f"[mone] ETA run {format_duration(pace.eta_s())}", flush=True)


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


def _sum_over_ranks(n: int, device) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return int(n)
    t = torch.tensor([n], dtype=torch.int64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return int(t.item())


def _full_state_dict(engine) -> dict[str, Any]:
    """The plain model's state dict (keys without the wrapper's `model.` prefix)."""
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gather the partitioned parameters
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    return {k.removeprefix("model."): v for k, v in sd.items()}


def _validate(model, val_shard, cfg: TrainConfig, device, amp_dtype, budget_arg, model_flops) -> dict[str, Any]:
    """Top-1/top-5, GFLOPs per clip and clips/s at each validation budget, on one decode of the val set."""
    import torch
    import torch.distributed as dist

    from jobs import data as job_data

    budgets = list(cfg.mone.val_budgets)
    model.eval()
    counts = torch.zeros(len(budgets), 3, dtype=torch.float64)  # (budget, [top1, top5, n])
    seconds = torch.zeros(len(budgets), dtype=torch.float64)
    views = 1
    with torch.no_grad():
        for batch in job_data.iter_batches(val_shard, cfg.optim.batch_size, device, train=False):
            tokens, target = batch["tokens"], batch["label"]  # (B, V, L, K), (B,)
            B, views = tokens.shape[:2]
            flat = tokens.flatten(0, 1)  # (B*V, L, K)
            for i, b in enumerate(budgets):
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model.forward_tokens(flat, budget=budget_arg(b))
                logits = logits.float().view(B, views, -1).mean(1)  # multi-view: average logits
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[i] += time.perf_counter() - t
                top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
                hit = top5 == target[:, None]
                counts[i, 0] += hit[:, 0].sum().item()
                counts[i, 1] += hit.any(-1).sum().item()
                counts[i, 2] += B
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        dist.all_reduce(seconds)
        world = dist.get_world_size()
    else:
        world = 1
    out: dict[str, Any] = {"val_clips": int(counts[0, 2].item())}
    for i, b in enumerate(budgets):
        n = max(1.0, counts[i, 2].item())
        caps = budget_arg(b)
        out[f"top1_ec{b}"] = counts[i, 0].item() / n
        out[f"top5_ec{b}"] = counts[i, 1].item() / n
        out[f"gflops_ec{b}"] = views * model_flops(model.cfg, capacities=caps) / 1e9
        # Workers ran in parallel: clips per second of the whole group = n / mean worker time.
        out[f"clips_per_s_ec{b}"] = n / max(seconds[i].item() / world, 1e-9)
    return out


