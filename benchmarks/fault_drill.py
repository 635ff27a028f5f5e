"""Fault drill: `mone train` on a real multi-node Ray cluster loses nodes mid-run and must finish by itself.

The cluster runs on this machine (tests/jobs/helpers_cluster.py): a head with no CPUs, one worker node with 2 CPUs
and three with 1 CPU, each its own `ray start` with its own raylet. Two workers of 0.75 CPU first pack onto the
2-CPU node. The drill then
1. waits for the first checkpoint and kills that node (SIGKILL to its raylet, then its process group): the node
   holding all the workers;
2. waits for Ray Train to restart the workers, necessarily on two 1-CPU nodes, and for the restored run's first
   training step, then kills one of those two nodes;
3. waits for the same command to finish (run.max_failures=2), and checks its outputs.

Ends with one JSON line: node_killed_at_epoch (the epoch in progress at each kill), restarts (from the run's final
JSON line), epochs_completed / epochs_expected (metrics.jsonl, each epoch once), clips_per_epoch_min /
clips_per_epoch_expected (clips trained on per epoch, summed over workers, vs what the manifest gives: every clip
once), recovery_s (kill -> the restored attempt's first training step, per kill), wall_s.

    python benchmarks/fault_drill.py                 # ~2-4 min on a 2-core machine (wall_s 127-157 s in the tests)
    python benchmarks/fault_drill.py --kills 1       # only the loss of the node holding all workers

Node deaths are detected faster than with Ray's defaults (GCS health checks every 1 s, 3 misses; Ray's: 3 s, 5;
Ray Train's worker poll every 1 s; Ray's: 2 s); pass --ray-default-detection to measure with Ray's defaults. Ray
Train's PreemptionWatcher (it acts on drain notices, which a killed raylet never sends) is off in the drills.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "jobs"))
sys.path.insert(0, str(ROOT))

from helpers_cluster import LocalCluster  # noqa: E402

EPOCHS = 3  # kill 1 after the first checkpoint (epoch 0), kill 2 at the restored attempt's first step: both
#            land in epoch 1 or 2 even when a checkpoint is seen an epoch late; the guard below says if not
WORKERS, BATCH = 2, 4
SYNTH = {"classes": 4, "videos_per_class": 8, "val_videos_per_class": 2, "corrupt": 0, "frames": 8, "width": 64,
         "height": 64}


def train_args(storage: Path, cache: Path, name: str, *, epochs: int = EPOCHS, max_failures: int = 2,
               cpus_per_worker: float = 0.75) -> list[str]:
    """`mone train` arguments of the drills: a tiny MoNE ViViT, 32 training clips, a checkpoint every epoch."""
    return [
        "--config", "tiny_cpu", f"optim.epochs={epochs}", f"optim.batch_size={BATCH}", "optim.warmup_epochs=0.5",
        *(f"data.synth.{k}={v}" for k, v in SYNTH.items()),
        f"scaling.num_workers={WORKERS}", f"scaling.cpus_per_worker={cpus_per_worker}", "data.decode_cpus=0.25",
        "data.decode_concurrency=2", "mone.val_budgets=[0.3,1.0]", "run.checkpoint_every=1",
        f"run.max_failures={max_failures}", "run.record_shards=true", f"data.cache_dir={cache}",
        f"run.storage_path={storage}", f"run.name={name}",
    ]


def clips_per_epoch_expected(num_clips: int, workers: int = WORKERS, batch: int = BATCH) -> int:
    """Clips one epoch trains on: the stream is split into equal shards (remainder dropped), each worker drops its
    last partial batch."""
    return workers * batch * ((num_clips // workers) // batch)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def wait_for(cond, proc: subprocess.Popen, log: Path, timeout_s: float, what: str):
    """Polls `cond()` until it returns something truthy; fails if the command ended or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the command ended (rc {proc.returncode}) while waiting for {what}:\n"
                               + log.read_text()[-4000:])
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n" + log.read_text()[-4000:])


def starts(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(run_dir / "attempts.jsonl") if e.get("event") == "start"]


def checkpoint_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has committed, from its own snapshot (-1: none yet). A folder
    on storage is not enough: a checkpoint uploaded but not yet registered when its node dies is not restored."""
    from jobs.faults import RAY_TRAIN_SNAPSHOT

    try:
        latest = json.loads((run_dir / RAY_TRAIN_SNAPSHOT).read_text())["latest_checkpoint_result"]
        return int(latest["metrics"]["epoch"]) if latest else -1
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or being replaced right now
        return -1


def training_drill(work: Path, *, kills: int = 2, fast_detection: bool = True, timeout_s: float = 900,
                   echo=print, cluster: LocalCluster | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Runs the drill in `work`; returns the figures plus what a test needs to check the outputs. `cluster`: a
    running LocalCluster to add the drill's nodes to (the tests share one); default: a cluster of its own.
    `cache`: where the generated dataset is kept (default: in `work`)."""
    t0 = time.time()
    storage, cache, name = work / "runs", cache or work / "cache", "drill"
    run_dir = storage / name
    log, out_file = work / "train.log", work / "train.out"  # stderr (Ray's logs, progress) / stdout (ours)
    with contextlib.nullcontext(cluster) if cluster else LocalCluster(fast_detection=fast_detection) as cluster:
        if cluster.head is None:
            cluster.start_head()
        cluster.add_nodes(2, 1, 1, 1)
        echo(f"[drill] cluster up in {time.time() - t0:.0f} s: head (0 CPU) + 1 x 2 CPU + 3 x 1 CPU nodes at "
             f"{cluster.address}", flush=True)
        cmd = [sys.executable, "-m", "jobs.cli", "train", "--address", cluster.address,
               *train_args(storage, cache, name, max_failures=kills)]
        env = {**cluster.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
               "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        with open(log, "w") as f, open(out_file, "w") as o:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=f, start_new_session=True)
        kills_done: list[dict[str, Any]] = []
        try:
            for k in range(kills):
                # the attempt that is running now
                attempt = wait_for(lambda k=k: starts(run_dir)[k] if len(starts(run_dir)) > k else None,
                                   proc, log, 600, f"attempt {k + 1} to start")
                if k == 0:  # after the first checkpoint
                    wait_for(lambda a=attempt: checkpoint_epoch(run_dir) >= a["epoch"], proc, log, 600,
                             "the first checkpoint")
                else:  # a restored attempt, once it trains again (it may restore from the same checkpoint)
                    wait_for(lambda a=attempt: any(e.get("event") == "first_step" and e["time"] > a["time"]
                                                   for e in read_jsonl(run_dir / "attempts.jsonl")),
                             proc, log, 600, f"attempt {k + 1}'s first step")
                nodes = sorted({w["node_id"] for w in attempt["workers"]})
                victim = cluster.node(nodes[0])
                done = [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")]
                committed = checkpoint_epoch(run_dir)
                killed_at = time.time()
                cluster.kill_node(victim)
                kills_done.append({"time": killed_at, "epoch": max(done) + 1 if done else 0,
                                   "checkpoint_epoch": committed, "workers_on": len(nodes), "node": victim.node_id})
                echo(f"[drill] kill {k + 1}: node {victim.node_id[:12]} ({victim.num_cpus} CPU, "
                     f"{'all' if len(nodes) == 1 else 'one of the'} {len(attempt['workers'])} workers' node"
                     f"{'' if len(nodes) == 1 else 's'}) during epoch {kills_done[-1]['epoch']}", flush=True)
                if kills_done[-1]["epoch"] >= EPOCHS:
                    raise RuntimeError("the run finished its last epoch before the kill: nothing to recover")
            rc = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    out = out_file.read_text()
    last = out.strip().splitlines()[-1] if out.strip() else ""
    summary = json.loads(last) if rc == 0 and last.startswith("{") else None
    out += "\n---- stderr ----\n" + log.read_text()[-20000:]
    history = read_jsonl(run_dir / "metrics.jsonl")
    events = read_jsonl(run_dir / "attempts.jsonl")
    recovery = []
    for kill in kills_done:
        after = [e["time"] for e in events if e.get("event") == "first_step" and e["time"] > kill["time"]]
        recovery.append(round(min(after) - kill["time"], 1) if after else None)
    clips = [m.get("train_clips") for m in history]
    expected = clips_per_epoch_expected(SYNTH["classes"] * SYNTH["videos_per_class"])
    return {
        "node_killed_at_epoch": [k["epoch"] for k in kills_done],
        "workers_on_killed_nodes": [k["workers_on"] for k in kills_done],
        "restarts": summary.get("restarts") if summary else None,
        "epochs_completed": len({m["epoch"] for m in history}),
        "epochs_listed": len(history),
        "epochs_expected": EPOCHS,
        "clips_per_epoch_min": min((c for c in clips if c is not None), default=None),
        "clips_per_epoch_expected": expected,
        "recovery_s": recovery,
        "wall_s": round(time.time() - t0, 1),
        "rc": rc,
        "_summary": summary, "_run_dir": str(run_dir), "_log": out, "_kills": kills_done, "_history": history,
        "_events": events,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=2, choices=(1, 2), help="node losses during the run (default 2)")
    ap.add_argument("--ray-default-detection", action="store_true",
                    help="Ray's default node health checks (slower detection) instead of the drill's faster ones")
    ap.add_argument("--workdir", default=None, help="keep the run here (default: a temporary directory)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="fault_drill_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = training_drill(work, kills=args.kills, fast_detection=not args.ray_default_detection)
    if res["rc"] != 0:
        print(res["_log"][-3000:], file=sys.stderr)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}))
    return 0 if res["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
