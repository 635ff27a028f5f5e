"""A real multi-node Ray cluster on this one machine, for fault drills (tests/jobs/test_faults.py,
benchmarks/fault_drill.py).

Every node is its own `ray start --block` process with its own raylet, started in its own session (process group):
- a head with no CPUs (nothing but the GCS, the dashboard and drivers: work lands on the worker nodes). It runs
  the dashboard as real clusters do: Ray Train's placement-group cleaner asks its State API whether a Train
  controller died (a Tune trial lost with its node, one Tune ended at its last report); without it their
  placement groups stay reserved and later work can starve;
- worker nodes with a few logical CPUs each.
`kill_node` simulates the loss of a host: SIGKILL to the node's raylet by pid, then to everything left in its
process group. `stop` ends the whole cluster the same way, by process group: never `ray stop`, which would stop
every Ray on the machine (other people's included). The cluster has one short temp dir of its own; each worker
node has a folder of its own in it, as separate hosts have (see `add_node`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Faster node-death detection than Ray's defaults (health check every 3 s, 5 misses): the drills measure
# recovery, not Ray's detection delay. Applied to the GCS (head) through Ray's RAY_<config> environment.
# Ray Train's controller polls its workers' health every 2 s by default: every 1 s here.
FAST_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                  "RAY_health_check_failure_threshold": "3", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}
# Ray Train starts a PreemptionWatcher actor at every (re)start of a run: it acts on a node's drain notice (a cloud's
# preemption warning). A SIGKILLed raylet sends none, so in these drills it is only one more Ray process to start
# per restart on 2 cores.
NO_DRAIN_NOTICES = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


_HANDED_OUT: set[int] = set()  # ports given to some node already: a released port can come back from bind(0)


def free_port() -> int:
    """A free TCP port not handed out before in this process."""
    held = []
    try:
        while True:
            s = socket.socket()
            held.append(s)  # kept bound until we return: the kernel cannot give the same port twice meanwhile
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    finally:
        for s in held:
            s.close()


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(d.name))
    return pids


def kill_session(sid: int, timeout_s: float = 15.0) -> None:
    """SIGKILL every process of session `sid` (a `start_new_session=True` child) until none is left. Killing its
    process group is not enough: Ray puts each worker in a process group of its own, and those workers go on (and
    persist checkpoints) for seconds after their raylet died."""
    deadline = time.time() + timeout_s
    while True:
        live = [p for p in _session_pids(sid) if not _is_zombie(p)]
        if not live or time.time() > deadline:
            return
        for pid in live:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    num_cpus: int
    node_id: str = ""
    raylet_pid: int = 0
    log: Path | None = None
    alive: bool = True
    extra: dict = field(default_factory=dict)


class LocalCluster:
    """`with LocalCluster() as c: c.add_node(1); ... c.kill_node(node); ...` (see the module doc)."""

    def __init__(self, *, dashboard: bool = True, fast_detection: bool = True, env: dict[str, str] | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="rtf", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        self.dashboard = dashboard
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                         "RAY_TMPDIR": self.temp_dir, "RAY_USAGE_STATS_ENABLED": "0",
                         # every node's log monitor forwards the shared session's logs (on one host): keep them short
                         "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        if fast_detection:
            self.env.update(FAST_DETECTION)
        self.env.update(NO_DRAIN_NOTICES)
        self.env.update(env or {})
        self.port = free_port()
        self.dashboard_port = free_port()
        self.nodes: list[Node] = []
        self.head: Node | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def address(self) -> str:
        """The GCS address (for `--address` / RAY_ADDRESS)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """Environment for a command that joins this cluster through RAY_ADDRESS."""
        return {**self.env, "RAY_ADDRESS": self.address}

    # ------------------------------------------------------------------ nodes

    def _agent_ports(self) -> list[str]:
        ports = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
        return [f"--{p}={free_port()}" for p in ports] + ["--min-worker-port=0", "--max-worker-port=0"]

    def _launch(self, name: str, args: list[str], num_cpus: int) -> Node:
        log = Path(self.temp_dir) / f"{name}.log"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--num-cpus={num_cpus}",
               "--disable-usage-stats", *args, *self._agent_ports()]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, num_cpus, log=log)
        self.nodes.append(node)
        return node

    def _start(self, name: str, args: list[str], num_cpus: int, attempts: int = 2) -> Node:
        """One node, up before the next starts. On a loaded 2-core machine `ray start` can time out waiting for the
        GCS to register it ("Failed to get node info: Deadline Exceeded"): such a node is dropped and started again."""
        for attempt in range(attempts):
            node = self._launch(name, args, num_cpus)
            try:
                self._wait_for_raylet(node)
                return node
            except RuntimeError:
                self.kill_node(node)
                self.nodes.remove(node)
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _wait_for_raylet(self, node: Node, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start ({node.name}) exited {node.proc.returncode}:\n{node.log.read_text()}")
            for pid in _session_pids(node.proc.pid):
                cmd = _cmdline(pid)
                if "raylet/raylet" in cmd and "--node_id=" in cmd:
                    node.raylet_pid = pid
                    node.node_id = cmd.split("--node_id=", 1)[1].split()[0]
            if node.raylet_pid and "Ray runtime started" in node.log.read_text():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{node.name}: no raylet after {timeout_s} s:\n{node.log.read_text()}")

    def start_head(self, num_cpus: int = 0) -> Node:
        """The head; with no CPUs by default (work lands on the worker nodes). A one-node cluster: give it some."""
        args = ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1",
                f"--include-dashboard={'true' if self.dashboard else 'false'}",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        self.head = self._start("head", args, num_cpus)
        if self.dashboard:
            self._wait_for_dashboard()
        return self.head

    def _wait_for_dashboard(self, timeout_s: float = 120) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.exceptions.RequestException):
                if requests.get(f"{self.dashboard_url}/api/jobs/", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"no dashboard at {self.dashboard_url} after {timeout_s} s")

    def add_node(self, num_cpus: int = 1) -> Node:
        # Each worker node gets a temp dir of its own, as separate hosts have: sharing the head's, the nodes'
        # runtime-env agents unpacked a job's working_dir into one folder and removed it under each other, and
        # a worker started there hung 60 s (Ray's worker registration timeout) on every `mone submit`.
        name = f"node{len(self.nodes)}"
        return self._start(name, [f"--address={self.address}", f"--temp-dir={self.temp_dir}/{name}"], num_cpus)

    def add_nodes(self, *num_cpus: int) -> list[Node]:
        """Several worker nodes, one after the other: started together, they overload the GCS of a 2-core machine
        and `ray start` times out."""
        return [self.add_node(n) for n in num_cpus]

    def ensure_workers(self, count: int, num_cpus: int = 1) -> list[Node]:
        """At least `count` live worker nodes of `num_cpus` CPUs (a test sharing the cluster tops up what earlier
        tests killed); returns those nodes."""
        live = [n for n in self.nodes if n.alive and n is not self.head and n.num_cpus == num_cpus]
        return live + self.add_nodes(*[num_cpus] * max(0, count - len(live)))

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def nodes_running(self, marker: str) -> list[Node]:
        """Live worker nodes with a process whose command line (Ray's process title, e.g. `ray::ImplicitFunc`)
        contains `marker`: the raylet starts its workers inside the node's session."""
        return [n for n in self.nodes if n.alive and n is not self.head
                and any(marker in _cmdline(pid) for pid in _session_pids(n.proc.pid))]

    def kill_node(self, node: Node) -> float:
        """A host lost: SIGKILL its raylet by pid, then everything left in its process group. Returns the time."""
        t = time.time()
        if node.raylet_pid > 0:  # 0: the node never got a raylet, and os.kill(0, ...) would hit our own group
            with contextlib.suppress(OSError):
                os.kill(node.raylet_pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)
        node.alive = False
        return t

    def stop(self) -> None:
        """The whole cluster gone at once (workers first, the head last), then its temp dir."""
        for node in reversed(self.nodes):
            if node.alive:
                self.kill_node(node)
        for node in self.nodes:  # its workers sit in process groups of their own: kill the session until empty
            kill_session(node.proc.pid, timeout_s=5.0)
        for d in Path("/proc").glob("[0-9]*"):  # e.g. job drivers, which run in a working dir under it
            pid = int(d.name)
            try:
                cwd = os.readlink(d / "cwd")
            except OSError:
                cwd = ""
            if pid != os.getpid() and (self.temp_dir in _cmdline(pid) or cwd.startswith(self.temp_dir)):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
