"""What a real cluster does to a job: nodes lost mid-run, the whole cluster restarted, a dead address, bad input.

The Ray tests run on a real multi-node Ray cluster on 127.0.0.1 (tests/jobs/helpers_cluster.py): a head with no
CPUs and worker nodes, each its own `ray start` with its own raylet; a host loss is a SIGKILL to a node's raylet
(and its process group). Every command runs as a user runs it (`python -m jobs.cli ...`, or `mone submit`), and
every test asserts on what the command leaves: metrics.jsonl, the predictions table, the Tune trials, exit codes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(Path(__file__).parent))

from helpers_cluster import LocalCluster, free_port, kill_session  # noqa: E402

from jobs import faults  # noqa: E402
from jobs.ray_connect import ClusterUnreachable, bootstrap_address, requested_address  # noqa: E402


def _drill():
    """benchmarks/fault_drill.py as a module: the training drill and its tiny run settings."""
    spec = importlib.util.spec_from_file_location("fault_drill", ROOT / "benchmarks" / "fault_drill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mone(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str, str, dict | None]:
    """`mone ARGS` as a user runs it: (exit code, stdout, stderr, its final JSON line)."""
    env = env or {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    print(f"mone {' '.join(args[:2])}: rc {p.returncode}, {time.monotonic() - t0:.0f} s")
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    return p.returncode, p.stdout, p.stderr, json.loads(last) if last.startswith("{") else None


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`mone ARGS` in the background, in its own process group, output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def last_json(text: str) -> dict | None:
    """A command's final JSON line, also when a progress display left cursor codes in front of it."""
    for line in reversed(text.splitlines()):
        at = line.find('{"')
        if at >= 0:
            with contextlib.suppress(ValueError):
                return json.loads(line[at:])
    return None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


# =========================================================================== no Ray


def test_commands_start_their_own_local_ray_unless_asked_to_join(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert requested_address(None) == "local"  # never the address file a dead cluster left behind
    assert requested_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert requested_address(None) == "10.0.0.1:6379" and requested_address("10.0.0.2:6379") == "10.0.0.2:6379"
    assert bootstrap_address("ray://10.0.0.1:10001") == ("10.0.0.1", 10001)
    with pytest.raises(ClusterUnreachable, match=r"is a dashboard .*`mone submit"):
        bootstrap_address("http://10.0.0.1:8265", "http://10.0.0.1:8265")
    with pytest.raises(ClusterUnreachable, match="expected HOST:PORT"):
        bootstrap_address("head", "head")


def test_out_of_restarts_message_names_node_checkpoint_and_command(tmp_path):
    run = tmp_path / "run"
    for epoch in (0, 1):
        (run / f"checkpoint_00000{epoch}").mkdir(parents=True)
        (run / f"checkpoint_00000{epoch}" / "train_state.json").write_text(json.dumps({"epoch": epoch}))
    (run / "checkpoint_000002").mkdir()  # an unfinished one: no state file
    assert faults.last_checkpoint(str(run)) == (str(run / "checkpoint_000001"), 1)
    for event in ("start", "first_step", "start", "start"):
        faults.record(str(run), {"invocation": "a", "event": event})
    faults.record(str(run), {"invocation": "b", "event": "start"})
    assert faults.restarts(str(run), "a") == 2 and faults.restarts(str(run), "b") == 0

    class Died(Exception):
        pass

    class GroupError(Exception):
        worker_failures = {0: Died("The actor died unexpectedly.\nThe actor's node was terminated unexpectedly.\n...")}

    msg = faults.failure_message(GroupError("x"), run_dir=str(run), lost=[("abcdef0123456789", "10.0.0.7")],
                                 restarts=2, max_failures=2, resume_command="mone train run.name=x")
    lines = msg.splitlines()
    assert "after 2 restart(s) (run.max_failures=2)" in lines[0] and "node was terminated" in lines[0]
    assert "10.0.0.7 (node abcdef012345)" in lines[1]
    assert f"last good checkpoint: {run / 'checkpoint_000001'} (epoch 2 done)" in lines[2]
    assert "resume with: mone train run.name=x" in lines[3]
    assert faults.data_error(GroupError("ray.exceptions.RayTaskError(TooManyErrors): TooManyErrors: 3 of 9 videos "
                                        "failed")) == "3 of 9 videos failed"


def test_a_batch_lost_with_its_node_is_not_a_decoder_crash():
    """The crash guard skips the video a decoder died on when Ray retries the batch on the same node; a batch whose
    node was lost (its file left by another node: several nodes on one host, a restarted node) is decoded again."""
    import uuid

    from pipeline.dataset import _CrashGuard

    ns = uuid.uuid4().hex[:12]
    paths = ["/v/a.mp4", "/v/b.mp4"]
    lost = _CrashGuard(ns)
    lost.node = "node-lost"
    assert lost.start(paths) is None
    lost.begin(3, paths[1])  # ... and then the node dies in the middle of b.mp4
    elsewhere, same = _CrashGuard(ns), _CrashGuard(ns)
    elsewhere.node, same.node = "node-alive", "node-lost"
    assert elsewhere.start(paths) is None  # decoded again, nothing skipped
    assert same.start(paths) == (3, "/v/b.mp4")  # the process died on b.mp4 and its node lives: a crash
    same.clear()
    assert same.start(paths) is None


BAD_INPUTS = [  # (argv, what the one line must say); none of these may start Ray
    (["train", "scaling.num_workers=1000"], "needs 500.25 CPUs"),
    (["train", "model.variant=nope"], "unknown variant 'nope'"),
    (["train", "optim.lr=[1,2"], "optim.lr: expected float"),
    (["train", "--address", "http://127.0.0.1:8265"], "is a dashboard (job submission) address"),
    (["tune", "train", "--search-space", "/nope.yaml"], "--search-space /nope.yaml: no such file"),
    (["tune", "budgets", "--checkpoint", "/nope"], "checkpoint '/nope' does not exist"),
    (["evaluate", "--checkpoint", "/nope", "--videos", "/nope", "--out", "p.parquet"], "--checkpoint"),
    (["visualize", "--checkpoint", "/nope", "--video", "/nope", "--alpha", "0"], "--alpha 0.0: must be in (0, 1]"),
    (["flops", "vivit_b16", "--img-size", "0"], "--img-size 0: must be a positive integer"),
    (["data", "check", "/nope"], "/nope does not exist"),
    (["submit", "train", "--env", "FOO", "--address", "http://127.0.0.1:1"], "--env 'FOO': expected KEY=VALUE"),
    (["jobs", "status", "x", "--address", "http://127.0.0.1:1"], "no Ray dashboard at http://127.0.0.1:1"),
]


@pytest.mark.parametrize("argv, says", BAD_INPUTS, ids=[" ".join(a[:2]) for a, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_a_nonzero_exit(argv, says, capsys, monkeypatch):
    import ray

    from jobs.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(argv)  # an uncaught exception (a traceback for the user) fails the test here
    out, err = capsys.readouterr()
    lines = [x for x in (out + err).splitlines() if x.strip() and not x.startswith("connecting to")]
    assert rc != 0 and len(lines) == 1 and says in lines[0], (rc, out, err)
    assert not ray.is_initialized()


# =========================================================================== dead addresses (no cluster)


def test_a_refused_address_ends_every_command_in_one_line(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """--address or RAY_ADDRESS naming a port nobody listens on: train, tune (both), evaluate end at once, in one
    line naming the address and the fix, before any data is prepared or decoded."""
    from helpers_eval import assets

    from jobs.cli import main

    archive, ckpt = assets(tmp_path_factory)
    dead = f"127.0.0.1:{free_port()}"
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {choice: [0.001, 0.002]}\n")
    monkeypatch.setenv("MONE_RAY_CONNECT_TIMEOUT_S", "1")
    commands = [["train", "--address", dead], ["tune", "train", "--search-space", str(space), "--address", dead],
                ["tune", "budgets", "--checkpoint", str(ckpt), "--data", str(archive), "--address", dead],
                ["evaluate", "--checkpoint", str(ckpt), "--videos", str(archive), "--out", str(tmp_path / "p.parquet"),
                 "--address", dead]]
    for argv in [*commands, ["train"]]:
        if argv == ["train"]:
            monkeypatch.setenv("RAY_ADDRESS", dead)
        t0 = time.monotonic()
        rc = main(argv)
        out, err = capsys.readouterr()
        lines = [x for x in (out + err).splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and f"no Ray cluster answers at {dead}" in lines[0], (argv, out, err)
        assert "ray start --head" in lines[0] and time.monotonic() - t0 < 30


@pytest.mark.slow
def test_an_address_that_accepts_but_never_answers_ends_in_one_line(tmp_path):
    """Something accepts TCP connections at the address but is not a Ray cluster (or hangs): Ray's own connect
    would retry forever; the command ends after the bound with one line (exit code 2)."""
    tiny = [f"data.cache_dir={tmp_path / 'cache'}", *(f"data.synth.{k}={v}" for k, v in _drill().SYNTH.items())]
    mute = socket.socket()  # the kernel completes the handshakes (backlog); nobody ever reads or answers
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    silent = f"127.0.0.1:{mute.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MONE_RAY_CONNECT_TIMEOUT_S"] = "5"
    try:
        t0 = time.monotonic()
        rc, out, err, _ = mone("train", "--address", silent, *tiny, env=env, timeout=180)
        took = time.monotonic() - t0
    finally:
        mute.close()
    lines = [x for x in (out + err).splitlines() if x.strip()]
    assert rc == 2 and silent in lines[-1] and "did not let this command join within 5 s" in lines[-1], out + err
    assert "Traceback" not in out + err and took < 150  # the bound, plus start-up and tiny data on a loaded box


@pytest.mark.slow
def test_a_stale_local_address_file_is_ignored(tmp_path):
    """A local Ray that died without `ray stop` leaves its address file behind. With no --address and no
    RAY_ADDRESS a command starts a Ray of its own (plain ray.init() would join the dead one and wait forever);
    `--address auto` asks to join it, and ends in one line."""
    tmp = Path(f"/tmp/rts{os.getpid()}")  # short: Ray's socket paths
    (tmp / "ray").mkdir(parents=True, exist_ok=True)
    stale = f"127.0.0.1:{free_port()}"
    (tmp / "ray" / "ray_current_cluster").write_text(stale)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), MONE_RAY_CONNECT_TIMEOUT_S="2")
    code = ("import sys, ray; from jobs.ray_connect import init_ray; "
            "init_ray(sys.argv[1] if len(sys.argv) > 1 else None, command='mone x', include_dashboard=False, "
            "num_cpus=1); print('joined', ray.get_runtime_context().gcs_address); ray.shutdown()")
    try:
        auto = subprocess.run([sys.executable, "-c", code, "auto"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        t0 = time.monotonic()
        own = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        took = time.monotonic() - t0
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    joined = [x for x in own.stdout.splitlines() if x.startswith("joined ")]
    assert own.returncode == 0 and joined and stale.split(":")[1] not in joined[0], own.stderr[-2000:]
    assert took < 90, took
    # Ray may name the host by this machine's IP instead of 127.0.0.1: the port identifies the stale cluster.
    port = stale.split(":")[1]
    assert auto.returncode != 0 and "no Ray cluster answers at " in auto.stderr and f":{port} " in auto.stderr, \
        auto.stderr[-2000:]


# =========================================================================== one multi-node cluster, shared


@pytest.fixture(scope="module")
def cluster():
    """The multi-node cluster the node-loss tests share (a head with a dashboard and no CPUs; each test adds the
    worker nodes it needs and kills some): starting Ray nodes is most of these tests' cost on 2 cores. The tests
    that stop a whole cluster start one of their own."""
    with LocalCluster() as c:
        c.start_head()
        yield c


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory):
    """One data.cache_dir for the module's training runs: they train on the same generated dataset (its folder is
    keyed by its parameters), generated once."""
    return tmp_path_factory.mktemp("synth_cache")


@pytest.fixture(scope="module")
def eval_reference(cluster, tmp_path_factory):
    """(archive, checkpoint, the predictions table of an uninterrupted `mone evaluate`) on the shared cluster."""
    from helpers_eval import assets

    archive, ckpt = assets(tmp_path_factory)
    cluster.ensure_workers(2)
    out = tmp_path_factory.mktemp("eval_ref") / "ref.parquet"
    rc, _, err, ref = mone(*_eval_base(archive, ckpt), "--out", str(out), env=cluster.client_env())
    assert rc == 0, err[-3000:]
    table = _table(out)
    keys = list(zip(table["path"].to_pylist(), table["budget"].to_pylist(), strict=True))
    assert ref["videos"] == 27 and len(keys) == len(set(keys)) == 27 * 2  # every video once per budget
    return archive, ckpt, table


# =========================================================================== training on a multi-node cluster


@pytest.mark.slow
def test_training_survives_losing_the_workers_node_then_one_of_two(cluster, synth_cache, tmp_path):
    """Kill 1: the node holding both workers, after the first checkpoint. Kill 2: one of the two nodes the
    restored workers then spread over, once they train again. The same command finishes by itself: every epoch
    once, every clip of every epoch once, restarts counted, each restore from the latest checkpoint."""
    drill = _drill()
    res = drill.training_drill(tmp_path, kills=2, cluster=cluster, cache=synth_cache)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}))
    assert res["rc"] == 0, res["_log"][-5000:]
    assert res["workers_on_killed_nodes"] == [1, 2]  # first all workers on the lost node, then one of two nodes
    assert res["_summary"]["restarts"] == 2
    history = res["_history"]
    assert [m["epoch"] for m in history] == list(range(drill.EPOCHS))  # every epoch exactly once
    steps = [m["global_step"] for m in history]
    assert steps == [steps[0] * (e + 1) for e in range(drill.EPOCHS)]  # no step counted twice across restores
    assert [m["train_clips"] for m in history] == [res["clips_per_epoch_expected"]] * drill.EPOCHS
    run_dir = Path(res["_run_dir"])
    all_clips = None
    for epoch in range(drill.EPOCHS):  # the clips each rank trained on, as recorded by the surviving attempt
        ranks = [(run_dir / "shards" / f"epoch{epoch}_rank{r}.txt").read_text().split() for r in range(2)]
        seen = ranks[0] + ranks[1]
        assert len(seen) == len(set(seen)) == res["clips_per_epoch_expected"], f"epoch {epoch}"
        all_clips = all_clips or set(seen)
        assert set(seen) == all_clips  # the same clips every epoch: none dropped with the lost decode tasks
    starts = [e for e in res["_events"] if e["event"] == "start"]
    assert len(starts) == 3 and starts[0]["epoch"] == 0
    for kill, restored in zip(res["_kills"], starts[1:], strict=True):
        # From the latest checkpoint: the one committed when the node was killed, or the one of the epoch then
        # running if its commit was already on its way (seen: killed during epoch 2, resumed at epoch 3).
        assert kill["checkpoint_epoch"] + 1 <= restored["epoch"] <= kill["epoch"] + 1, (kill, restored)
        assert restored["epoch"] >= 1
        assert kill["node"] not in {w["node_id"] for w in restored["workers"]}
    assert all(r is not None and r > 0 for r in res["recovery_s"])


TRAIN_SUBMIT_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _submit(dashboard: str, args: list[str], *extra: str) -> tuple[int, str, str, dict | None]:
    return mone("submit", "train", "--address", dashboard, *extra, "--", *args)


@pytest.mark.slow
def test_whole_cluster_restart_then_out_of_restarts(cluster, eval_reference, synth_cache, tmp_path):
    """Stop the whole cluster mid-run (a submitted training job and a `mone evaluate`); on another cluster that
    never saw them, `mone evaluate` picks up the parts already written and `mone submit` with the same run name
    resumes the training from storage. Then a node dies with no restarts left: the job fails naming the node, the
    last good checkpoint and the command that resumes (the very command that just resumed it)."""
    archive, ckpt, reference = eval_reference
    base = _eval_base(archive, ckpt)
    restarted = tmp_path / "restarted.parquet"
    drill = _drill()
    storage, name = tmp_path / "runs", "again"
    run_dir = storage / name
    # 6 epochs: the run must still be going on the second cluster (the first may train on past its checkpoint)
    args = drill.train_args(storage, synth_cache, name, epochs=6, max_failures=0, cpus_per_worker=0.5)

    def wait_checkpoint(proc: subprocess.Popen, log: Path, epoch: int, timeout_s: float = 420) -> None:
        deadline = time.monotonic() + timeout_s
        while drill.checkpoint_epoch(run_dir) < epoch:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} in {timeout_s:.0f} s"
            time.sleep(0.5)

    with LocalCluster() as first:
        # One node (starting nodes is what costs here): the job's 2 workers + decoding, the evaluation's 2 actors +
        # decoding. It goes whole, as a multi-node cluster would: nothing carries over but the storage path.
        first.start_head(num_cpus=3)
        # The first run's driver joins from outside (no job submission: a job's supervisor and runtime env cost a
        # 2-core machine ~10 s); it goes with the cluster, as a job's driver on the head would.
        train = start(["train", "--address", first.address, *args], first.env, tmp_path / "first_train.log")
        proc = start([*base, "--out", str(restarted)], dict(first.client_env(), MONE_EVAL_THROTTLE_S=EVAL_THROTTLE),
                      tmp_path / "restarted.log")
        try:
            _wait_parts(proc, restarted, 3, tmp_path / "restarted.log")
        finally:  # this evaluation's driver dies here, as with its cluster
            stop(proc)
        try:
            wait_checkpoint(train, tmp_path / "first_train.log", 0)
        finally:
            kill_session(train.pid)
            train.wait()
        # the whole cluster goes, head and workers at once: nothing survives but storage
    before = read_jsonl(run_dir / "metrics.jsonl")
    assert before and before[0]["epoch"] == 0
    done_before = len(list(Path(str(restarted) + ".parts").glob("part-*.parquet")))

    second = cluster  # a cluster that never saw this run or this evaluation
    second.ensure_workers(3)
    rc, out, err, summary = _submit(second.dashboard_url, args, "--name", "faults")
    assert rc == 0, err
    sid = summary["submission_id"]
    resume_eval = start([*base, "--out", str(restarted)], second.client_env(), tmp_path / "resumed.log")  # meanwhile
    try:
        deadline = time.monotonic() + 300
        while len(attempts := drill.starts(run_dir)) < 2:
            assert time.monotonic() < deadline, "the resubmitted run did not start in 300 s"
            time.sleep(0.5)
        attempt = attempts[-1]
        assert attempt["epoch"] >= 1  # resumed from storage alone, on a cluster that never saw the run
        victim = second.node(attempt["workers"][0]["node_id"])
        second.kill_node(victim)
        rc, out, err, summary = mone("jobs", "status", sid, "--wait", "--address", second.dashboard_url)
        assert rc == 1 and summary["status"] == "FAILED", err
        tail = summary["log_tail"].splitlines()
        at = [i for i, line in enumerate(tail) if "mone train: training failed after" in line]
        assert at, summary["log_tail"]
        said = "\n".join(tail[at[-1] : at[-1] + 4])
        assert "training failed after 0 restart(s) (run.max_failures=0)" in said, said
        assert f"(node {victim.node_id[:12]})" in said
        assert f"last good checkpoint: {run_dir}/checkpoint_" in said
        good = int(said.split("last good checkpoint: ", 1)[1].split("(epoch ", 1)[1].split(" done)")[0])
        assert good >= attempt["epoch"]  # the checkpoint it resumed from, or a later one the kill came after
        resume = said.split("resume with: ", 1)[1].split("   (")[0]
        assert resume == f"mone submit train -- {shlex.join(args)}"  # what resumed it on this fresh cluster
        assert resume_eval.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    finally:
        stop(resume_eval)
    summary = last_json((tmp_path / "resumed.log").read_text())
    assert summary["resumed_videos"] >= 2 * done_before and summary["videos_this_run"] < 27
    assert _table(restarted).equals(reference)  # the parts from the stopped cluster + the rest, as uninterrupted
    history = read_jsonl(run_dir / "metrics.jsonl")
    # Each epoch once over two clusters, the run unfinished. metrics.jsonl is written at an epoch's end, just
    # before its checkpoint: it may hold one epoch more than the last good checkpoint (redone on resume).
    assert [m["epoch"] for m in history] == list(range(len(history))) and good <= len(history) <= good + 1 < 7
    assert history[0] == before[0]


# =========================================================================== evaluation


EVAL_ARGS = ["--budget", "0.3,1.0", "--batch-videos", "2", "--actors", "2", "--actor-cpus", "0.5", "--decode-cpus",
             "0.25", "--no-progress"]
EVAL_THROTTLE = "0.5"  # s the driver waits after each part it writes (tests only): time to kill a node mid-run


def _eval_base(archive: Path, ckpt: Path) -> list[str]:
    return ["evaluate", "--checkpoint", str(ckpt), "--videos", str(archive), *EVAL_ARGS]


def _table(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _wait_parts(proc: subprocess.Popen, out: Path, n: int, log: Path, timeout_s: float = 300) -> None:
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + timeout_s
    while len(list(parts.glob("part-*.parquet"))) < n:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)


@pytest.mark.slow
def test_evaluation_survives_a_node_loss(cluster, eval_reference, tmp_path):
    """Model actors on two nodes, one node killed mid-run: the table equals an uninterrupted run's, every video once
    per budget. (The whole cluster stopped mid-run: test_whole_cluster_restart_then_out_of_restarts.)"""
    archive, ckpt, reference = eval_reference
    lost = tmp_path / "lost.parquet"
    cluster.ensure_workers(3)
    env = dict(cluster.client_env(), MONE_EVAL_THROTTLE_S=EVAL_THROTTLE)
    proc = start([*_eval_base(archive, ckpt), "--out", str(lost)], env, tmp_path / "lost.log")
    try:
        _wait_parts(proc, lost, 2, tmp_path / "lost.log")
        hosts = cluster.nodes_running("Predictor")
        assert hosts, "no node runs a model actor"
        cluster.kill_node(hosts[0])
        assert proc.wait(timeout=420) == 0, (tmp_path / "lost.log").read_text()[-4000:]
    finally:
        stop(proc)
    assert _table(lost).equals(reference)  # the same predictions, every video exactly once per budget


# =========================================================================== budget search


@pytest.mark.slow
def test_tune_trial_is_restored_from_its_checkpoint_after_its_node_dies(cluster, synth_cache, tmp_path):
    """The node running a trial's worker dies after the trial's first checkpoint. Tune runs the trial again
    (FailureConfig), which resumes from that checkpoint; the experiment completes with its trial finished. (One
    trial: the loss that hung two concurrent trials, every node then holding a fraction of a CPU, has its own
    deterministic test, tests/pipeline/test_dataset_ray.py.)"""
    drill = _drill()
    storage, cache = tmp_path / "runs", synth_cache
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [0.002]}\n")
    overrides = [a for a in drill.train_args(storage, cache, "unused", epochs=3, max_failures=0)
                 if not a.startswith(("run.name=", "scaling.", "data.decode_concurrency", "--config", "tiny_cpu"))]
    overrides += ["scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "data.decode_concurrency=1"]
    cluster.ensure_workers(2)
    exp = storage / "exp"
    proc = start(["tune", "train", "--config", "tiny_cpu", *overrides, "--search-space", str(space), "--trials",
                  "1", "--grace-period", "3", "--name", "exp", "--address", cluster.address], cluster.env,
                 tmp_path / "tune.log")
    try:
        deadline = time.monotonic() + 480
        trial = victim = None
        while victim is None:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "tune.log").read_text()[-4000:]
            for t in (exp / "trials").glob("*"):
                starts = drill.starts(t)
                if starts and drill.checkpoint_epoch(t) >= 0:
                    trial, victim = t, cluster.node(starts[-1]["workers"][0]["node_id"])
            time.sleep(0.5)
        cluster.kill_node(victim)
        assert proc.wait(timeout=600) == 0, (tmp_path / "tune.log").read_text()[-5000:]
    finally:
        stop(proc)
    summary = last_json((tmp_path / "tune.log").read_text())
    assert summary["trials"] == 1 and summary["errors"] == 0
    import pandas as pd

    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 1 and trials["error"].isna().all() and (trials["epochs"] == 3).all()  # finished
    starts = drill.starts(trial)
    assert len(starts) >= 2 and starts[-1]["epoch"] >= 1  # run again by Tune, from its checkpoint
    assert victim.node_id not in {w["node_id"] for w in starts[-1]["workers"]}
    assert [m["epoch"] for m in read_jsonl(trial / "metrics.jsonl")] == [0, 1, 2]
