"""Surviving a cluster: a training run's attempt log, the nodes it lost, and what to say when it gives up.

Ray Train restarts the worker group from the latest checkpoint when a worker or its node dies (FailureConfig
with `run.max_failures`). To make that visible, rank 0 appends to `RUN_DIR/attempts.jsonl` when an attempt starts
(the nodes its ranks run on, the epoch it resumes from) and when it takes its first step. The driver counts the
restarts of its own invocation from that file, and when Ray Train gives up it names the lost node(s), the last
good checkpoint and the command that resumes.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from jobs import run_files

ATTEMPTS_FILE = "attempts.jsonl"


def new_invocation() -> str:
    """An id for one `mone train` (or Tune trial) invocation: its attempts share it."""
    return uuid.uuid4().hex[:12]


def here() -> dict[str, str]:
    """The Ray node this process runs on: {"node_id", "ip"}."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


def record(run_dir: str, event: dict[str, Any]) -> None:
    """Appends one event to the attempt log (rank 0 only: read + rewrite, atomic per write)."""
    path = run_files.join(run_dir, ATTEMPTS_FILE)
    old = run_files.read_text(path) if run_files.exists(path) else ""
    run_files.write_text(path, old + json.dumps({"time": time.time(), **event}) + "\n")


def attempts(run_dir: str, invocation: str | None = None) -> list[dict[str, Any]]:
    path = run_files.join(run_dir, ATTEMPTS_FILE)
    if not run_files.exists(path):
        return []
    events = [json.loads(line) for line in run_files.read_text(path).splitlines() if line.strip()]
    return [e for e in events if invocation is None or e.get("invocation") == invocation]


def restarts(run_dir: str, invocation: str) -> int:
    """How many times Ray Train restarted the workers during this invocation (attempts started - 1)."""
    starts = [e for e in attempts(run_dir, invocation) if e.get("event") == "start"]
    return max(0, len(starts) - 1)


def alive_nodes() -> dict[str, str]:
    """{node id: IP} of the cluster's live nodes."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def lost_nodes(before: dict[str, str], error: BaseException | None = None, wait_s: float = 20.0
               ) -> list[tuple[str, str]]:
    """Nodes alive in `before` and dead now. Ray marks a node dead after missed health checks, which can come
    after the workers' deaths surface: when `error` speaks of a node, wait up to `wait_s` for one to show."""
    if error is not None and "node" not in short_reason(error).lower():
        wait_s = 0.0
    deadline = time.monotonic() + wait_s
    while True:
        now = alive_nodes()
        lost = [(nid, ip) for nid, ip in before.items() if nid not in now]
        if lost or time.monotonic() > deadline:
            return lost
        time.sleep(1.0)


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it committed


def last_checkpoint(run_dir: str) -> tuple[str, int] | None:
    """(path, epoch) of the newest checkpoint Ray Train committed (every rank's shards uploaded, so it restores
    from it), read from its snapshot; without one, the newest checkpoint folder holding our training state."""
    from jobs.train import STATE_FILE

    snapshot = run_files.join(run_dir, RAY_TRAIN_SNAPSHOT)
    if run_files.exists(snapshot):
        try:
            latest = json.loads(run_files.read_text(snapshot))["latest_checkpoint_result"]
            if latest is None:
                return None
            return run_files.join(run_dir, latest["checkpoint_dir_name"]), int(latest["metrics"]["epoch"])
        except (ValueError, KeyError, TypeError):  # another Ray version's format: look at the folders instead
            pass
    found: list[tuple[int, str]] = []
    if run_files.is_remote(run_dir):
        import pyarrow.fs as pafs

        fs, base = pafs.FileSystem.from_uri(run_dir)
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    else:
        names = [p.name for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()]
    for name in names:
        if not name.startswith("checkpoint_"):
            continue
        state = run_files.join(run_dir, name, STATE_FILE)
        if run_files.exists(state):
            found.append((int(json.loads(run_files.read_text(state))["epoch"]), run_files.join(run_dir, name)))
    if not found:
        return None
    epoch, path = max(found)
    return path, epoch


def short_reason(error: BaseException) -> str:
    """The first line of what killed the workers (Ray's messages run to dozens of lines)."""
    failures = getattr(error, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) or getattr(error, "controller_failure", None) or error
    lines = [x.strip() for x in str(inner).splitlines() if x.strip()]
    died = [x for x in lines if "node" in x.lower() and ("died" in x.lower() or "terminated" in x.lower())]
    text = died[0] if died else (lines[0] if lines else "")
    return f"{type(inner).__name__}: {text}"[:300]


def data_error(error: BaseException) -> str | None:
    """The message of a TooManyErrors behind a training failure (too many unreadable videos), if that is it:
    restarts do not fix data, so it is said as it is."""
    texts = [str(error), *(str(e) for e in (getattr(error, "worker_failures", None) or {}).values())]
    for text in texts:
        at = text.rfind("TooManyErrors: ")
        if at >= 0:
            return text[at + len("TooManyErrors: "):].strip()
    return None


def failure_message(error: BaseException, *, run_dir: str, lost: list[tuple[str, str]], restarts: int,
                    max_failures: int, resume_command: str) -> str:
    """What `mone train` prints when Ray Train gives up: why, which node, the last good checkpoint, how to resume."""
    ckpt = last_checkpoint(run_dir)
    where = (", ".join(f"{ip} (node {nid[:12]})" for nid, ip in lost) if lost
             else "no node was lost (the workers themselves failed)")
    lines = [
        f"training failed after {restarts} restart(s) (run.max_failures={max_failures}): {short_reason(error)}",
        f"  lost node(s): {where}",
        f"  last good checkpoint: {ckpt[0]} (epoch {ckpt[1] + 1} done)" if ckpt
        else "  last good checkpoint: none yet (the run starts over)",
        f"  resume with: {resume_command}   (same run name: it continues from that checkpoint; raise "
        "run.max_failures to survive more losses)",
    ]
    return "\n".join(lines)
