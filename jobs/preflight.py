"""Checks that run before the expensive part starts, so a mistake costs seconds, not a cluster start-up.

- `meta_forward(cfg)`: builds the config's model on the meta device (no memory, no FLOPs) and runs one forward on
  tokens of the exact shape the pipeline will cut from the config's clips. A config whose crop, frames or tubelet
  do not fit the model fails here, in CI and in `mone train --dry-run`, instead of on every GPU worker.
- `cluster_capacity()` / `check_resources(cfg, capacity)`: do the Train workers fit the Ray cluster? On a cluster
  that autoscales (the launcher's cluster.yaml: a 0-CPU head, GPU nodes from 0 workers) the answer is about what the
  cluster can grow to, not what is up right now.
- `require_cuda()`: a worker told to use a GPU that cannot use CUDA stops at start-up and says why, instead of
  silently training on CPU next to an NCCL process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, TrainConfig

LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # written on the head node by `ray up` (the autoscaler reads it)


# =========================================================================== config vs model


def meta_forward(cfg: TrainConfig, num_classes: int = 2, batch: int = 2) -> dict[str, Any]:
    """One training and one evaluation forward of the config's model on the meta device, on uint8 tokens shaped as
    the pipeline delivers them (`ClipSpec.tokens_shape` of the config's train and eval clips). Raises what the model
    raises on a mismatch; returns the shapes for a summary."""
    import torch

    from jobs.data import clip_spec_dict
    from models.capacity import capacities_for_budget
    from models.vit import create_model, num_params
    from pipeline.sampling import ClipSpec

    with torch.device("meta"):
        model = create_model(cfg.model.variant, num_classes=num_classes, **cfg.model.overrides)
    budgets = [None] + [capacities_for_budget(b, delta=cfg.mone.delta, beta=cfg.mone.beta)
                        for b in sorted({*cfg.mone.train_budgets, *cfg.mone.val_budgets}) if b < 1.0][:1]
    out: dict[str, Any] = {"variant": cfg.model.variant, "params": num_params(model)}
    for train in (True, False):
        V, L, K = ClipSpec(**clip_spec_dict(cfg, train=train)).tokens_shape  # (views, tokens, tubelet values)
        tokens = torch.empty(batch * V, L, K, dtype=torch.uint8, device="meta")  # (B*V, L, K)
        model.train(train)
        for b in budgets:
            with torch.set_grad_enabled(train):
                logits = model.forward_tokens(tokens, budget=b)  # (B*V, classes)
            if tuple(logits.shape) != (batch * V, num_classes):
                raise ValueError(f"model {cfg.model.variant} returned logits {tuple(logits.shape)} for "
                                 f"{batch * V} clips of {num_classes} classes")
        out["train_tokens" if train else "eval_tokens"] = [V, L, K]
    return out


# =========================================================================== cluster resources


@dataclass
class ClusterCapacity:
    """What the Ray cluster has now, and what it can grow to when an autoscaler runs."""

    now: dict[str, float]
    ceiling: dict[str, float] | None = None  # None: fixed cluster, or an autoscaler whose limits are unknown
    autoscaling: bool = False
    source: str = "ray.cluster_resources()"

    def most(self, resource: str) -> float:
        """The most of `resource` the cluster can have (now, or after scaling up)."""
        have = self.now.get(resource, 0.0)
        return max(have, self.ceiling.get(resource, 0.0)) if self.ceiling is not None else have


def launcher_max_resources(config: dict[str, Any]) -> dict[str, float] | None:
    """The most of each resource a cluster-launcher config (cluster.yaml after `ray up`) can reach: the head plus
    each worker type at its max_workers, within the global max_workers (node types richest in a resource first).
    None when a node type does not declare its resources (then only the autoscaler knows)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if not types or head not in types or any("resources" not in t for t in types.values()):
        return None
    cap = int(config.get("max_workers", sum(int(t.get("max_workers", 0)) for n, t in types.items() if n != head)))
    names = {r for t in types.values() for r in t["resources"]}
    out = {}
    for r in names:
        total = float(types[head]["resources"].get(r, 0))
        left = cap
        workers = sorted((t for n, t in types.items() if n != head), key=lambda t: -float(t["resources"].get(r, 0)))
        for t in workers:
            n = min(int(t.get("max_workers", 0)), left)
            total += n * float(t["resources"].get(r, 0))
            left -= n
        out[r] = total
    return out


def cluster_capacity() -> ClusterCapacity:
    """The connected Ray cluster's resources now and, when it autoscales, the most it can grow to.

    Sources, in order: the cluster config the autoscaler publishes in the GCS (KubeRay, autoscaler v2; Ray Train
    reads the same to refuse impossible worker groups), then the launcher's config on the head node
    (~/ray_bootstrap_config.yaml, where `mone submit` runs the driver; limits unknown when a node type leaves its
    resources to Ray: then warn, never refuse). Otherwise the cluster is taken as fixed (a local Ray also runs
    a read-only autoscaler monitor, so "a monitor runs" says nothing). Elsewhere: `--no-resource-check`."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        from ray._private.state import state

        gcs = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - private API (the one Ray Train uses); absent on some versions
        gcs = None
    if gcs:
        return ClusterCapacity(now, {k: float(v) for k, v in gcs.items()}, True, "the autoscaler's cluster config")
    path = Path(LAUNCHER_CONFIG).expanduser()
    if path.is_file():
        import yaml

        try:
            ceiling = launcher_max_resources(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError, TypeError, ValueError):
            ceiling = None
        return ClusterCapacity(now, ceiling, True, str(path))
    return ClusterCapacity(now)


def check_resources(cfg: TrainConfig, capacity: ClusterCapacity | dict[str, float]) -> list[str]:
    """Fails before any worker starts when the workers (plus one decode task) can never fit the cluster.

    On an autoscaling cluster the comparison is with what it can grow to; when that is unknown, or more than is up
    now, the returned warnings say so (the caller prints them) and the job waits for the autoscaler."""
    if not isinstance(capacity, ClusterCapacity):
        capacity = ClusterCapacity({k: float(v) for k, v in capacity.items()})
    s = cfg.scaling
    needs = {"CPU": s.num_workers * s.cpus_per_worker + cfg.data.decode_cpus}
    if s.use_gpu:
        needs["GPU"] = s.num_workers * s.gpus_per_worker
    what = {"CPU": (f"{s.num_workers} workers x {s.cpus_per_worker} CPU + {cfg.data.decode_cpus} CPU for decoding",
                    "lower scaling.num_workers or scaling.cpus_per_worker (fractions are fine), or add nodes"),
            "GPU": (f"{s.num_workers} workers x {s.gpus_per_worker} GPU",
                    "lower scaling.num_workers or set scaling.use_gpu=false")}
    warnings = []
    for r, need in needs.items():
        have = capacity.now.get(r, 0.0)
        if need <= have + 1e-9:
            continue
        desc, fix = what[r]
        if not capacity.autoscaling:
            raise ConfigError(f"scaling: {desc} needs {need:g} {r}s, the Ray cluster has {have:g}; {fix}")
        if capacity.ceiling is None:
            warnings.append(f"scaling: {desc} needs {need:g} {r}s, the cluster has {have:g} now; it autoscales "
                            f"({capacity.source}), so the job waits for nodes to join")
            continue
        most = capacity.most(r)
        if need > most + 1e-9:
            raise ConfigError(f"scaling: {desc} needs {need:g} {r}s, the autoscaling cluster can grow to {most:g} "
                              f"(from {capacity.source}); {fix.replace('add nodes', 'raise max_workers')}")
        warnings.append(f"scaling: {need:g} {r}s needed, {have:g} up now, the cluster can grow to {most:g}: "
                        "waiting for the autoscaler to add nodes")
    return warnings


# =========================================================================== CUDA on a worker


def _driver_version() -> str:
    """The NVIDIA kernel driver's version, from the kernel module or nvidia-smi; a sentence when there is none."""
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return " ".join(line.split()[:8])
    except (OSError, IndexError):
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
        return f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}"
    except (OSError, subprocess.TimeoutExpired):
        return "no NVIDIA driver found (no /proc/driver/nvidia/version, no nvidia-smi)"


def cuda_problem() -> str | None:
    """None when this process can use CUDA; otherwise why not, naming the node, torch's CUDA build and the driver."""
    import torch

    if torch.cuda.is_available():
        return None
    reason = ""
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the message is what we want (driver too old, no device, CPU wheel)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda \
        else f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"scaling.use_gpu=true but CUDA is unusable on node {socket.gethostname()}: {build}; NVIDIA driver: "
            f"{_driver_version()}; CUDA_VISIBLE_DEVICES={visible!r}" + (f"; torch says: {reason}" if reason else "")
            + ". Install the torch wheel for this driver's CUDA version (or update the driver), "
              "or set scaling.use_gpu=false")


def require_cuda() -> None:
    """Raises RuntimeError with `cuda_problem()` when CUDA cannot be used here."""
    problem = cuda_problem()
    if problem:
        print(f"[mone] {problem}", file=sys.stderr, flush=True)
        raise RuntimeError(problem)
