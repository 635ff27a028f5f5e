"""`mone submit` / `mone jobs`: argument handling without Ray, then against a real local Ray head.

The head is started once for the module with its own --temp-dir and its own ports, in its own session, and
stopped by signalling that session (never `ray stop`, which would stop the other Ray instances on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs import submit

ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mone")
    submit.register(parser.add_subparsers(dest="command"))
    return parser


# --------------------------------------------------------------------------- no Ray needed


def test_passthrough_args_reach_the_job_verbatim():
    args = _parser().parse_args(
        [
            "submit",
            "train",
            "--address",
            "http://head:8265",
            "--",
            "--config",
            "k400_vivit_b16",
            "data.root=s3://bucket/kinetics 400",
            "run.storage_path=gs://bucket/runs",
            "mone.val_budgets=[0.3,1.0]",
            "--wait",  # after --: the job's, not ours
        ]
    )
    assert not args.wait
    job_args = submit.prepare_job_args(args.submit_command, args.args, ROOT, storage="s3://ignored/runs")
    entry = submit.build_entrypoint("train", job_args)
    assert shlex.split(entry) == [
        "python",
        "-u",
        "-m",
        "jobs.cli",
        "train",
        "--config",
        "k400_vivit_b16",
        "data.root=s3://bucket/kinetics 400",
        "run.storage_path=gs://bucket/runs",  # explicit storage wins over --storage / $MONE_STORAGE_PATH
        "mone.val_budgets=[0.3,1.0]",
        "--wait",
    ]


def test_job_args_must_follow_double_dash(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["submit", "train", "--config", "tiny_cpu"])
    assert "unrecognized arguments: --config" in capsys.readouterr().err


def test_storage_option_and_warning():
    assert submit.prepare_job_args("train", ["a=1"], ROOT, "s3://b/runs") == ["a=1", "run.storage_path=s3://b/runs"]
    assert submit.prepare_job_args("tune", ["a=1"], ROOT, "s3://b/runs") == ["a=1"]  # train only
    # tiny_cpu keeps runs under ./runs: on a cluster that is the job's temporary working dir.
    assert "relative" in submit.storage_warning("train", ["--config", "tiny_cpu"])
    assert submit.storage_warning("train", ["run.storage_path=s3://b/runs"]) is None
    assert submit.storage_warning("train", ["run.storage_path=/mnt/nfs/runs"]) is None


def test_prepare_is_submitted_as_mone_data_prepare():
    args = _parser().parse_args(
        ["submit", "prepare", "--address", "http://head:8265", "--", "/mnt/k400", "--out", "/mnt/k400_256",
         "--short-side", "256"]
    )  # fmt: skip
    job_args = submit.prepare_job_args(args.submit_command, args.args, ROOT, storage="s3://ignored/runs")
    assert shlex.split(submit.build_entrypoint("prepare", job_args)) == [
        "python", "-u", "-m", "jobs.cli", "data", "prepare", "/mnt/k400", "--out", "/mnt/k400_256", "--short-side",
        "256",
    ]  # fmt: skip
    assert submit.storage_warning("prepare", job_args) is None
    # Relative archive paths would resolve inside the job's temporary working directory on the cluster.
    warning = submit.storage_warning("prepare", ["data/k400", "--out", "/mnt/k400_256"])
    assert "SRC data/k400" in warning and "relative" in warning and "--out" not in warning


def test_local_config_file_is_made_relative_to_the_upload(tmp_path):
    inside = ROOT / "jobs" / "configs" / "tiny_cpu.yaml"
    assert submit.prepare_job_args("train", ["--config", str(inside)], ROOT, None) == [
        "--config",
        "jobs/configs/tiny_cpu.yaml",
    ]
    outside = tmp_path / "mine.yaml"
    outside.write_text("model: {variant: vivit_tiny}\n")
    with pytest.raises(submit.SubmitError, match="outside the uploaded directory"):
        submit.prepare_job_args("train", [f"--config={outside}"], ROOT, None)


def test_upload_excludes_runs_data_git_and_caches(tmp_path):
    for rel in (
        "jobs/cli.py",
        "jobs/data.py",  # a module named data is code, not the data/ folder
        "tests/data/clip.txt",
        "pyproject.toml",
        "runs/r1/model.pt",
        "data/k400/a.mp4",
        ".git/objects/x",
        ".cache/mone/y",
        "jobs/__pycache__/cli.cpython-311.pyc",
        "mone_video.egg-info/PKG-INFO",
        "secret.log",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x" * 10)
    (tmp_path / ".gitignore").write_text("*.log\n")
    env = submit.build_runtime_env(tmp_path, env={"A": "1"}, pip=["timm"], excludes=["tests/"])
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["timm"] and env["env_vars"]["A"] == "1"
    files, size = submit.estimate_upload(tmp_path, env["excludes"])
    # jobs/cli.py, jobs/data.py, pyproject.toml, .gitignore (tests/ excluded by --exclude)
    assert (files, size) == (4, 3 * 10 + len("*.log\n"))


def test_address_handling():
    assert submit.normalize_address("10.0.0.5:8265/") == "http://10.0.0.5:8265"
    with pytest.raises(submit.SubmitError, match="dashboard"):
        submit.normalize_address("ray://10.0.0.5:10001")
    with pytest.raises(submit.SubmitError, match="KEY=VALUE"):
        submit.parse_env(["NOEQUALS"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_a_clear_error(capsys):
    address = f"http://127.0.0.1:{_free_port()}"
    args = _parser().parse_args(["submit", "train", "--address", address, "--wait", "--", "--config", "tiny_cpu"])
    t0 = time.monotonic()
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert f"no Ray dashboard at {address}" in err and "ray start --head --dashboard-host 0.0.0.0" in err
    assert "ray up cluster.yaml" in err
    assert time.monotonic() - t0 < 15
    args = _parser().parse_args(["jobs", "list", "--address", address])
    assert args.func(args) == 2


def test_find_result_takes_the_last_json_line():
    logs = 'step 1\n{"not": "last"}\n[mone] note\n{"run_dir": "/r", "checkpoint": "/r/inference"}\n[mone] done\n'
    assert submit.find_result(logs) == {"run_dir": "/r", "checkpoint": "/r/inference"}
    assert submit.find_result("no json here\n{broken\n") is None


# --------------------------------------------------------------------------- a real local Ray head


def _cli_modules_missing() -> list[str]:
    from jobs.cli import COMMAND_MODULES

    return [m for m in COMMAND_MODULES if importlib.util.find_spec(m) is None]


# `mone` restricted to submit/jobs, for when the rest of the CLI is not importable (yet): same parser code.
_SUBMIT_ONLY = (
    "import argparse, os, sys; os.environ.setdefault('RAY_AUTH_MODE', 'disabled'); from jobs import submit; "
    "p = argparse.ArgumentParser(prog='mone'); submit.register(p.add_subparsers(dest='command')); "
    "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
)


def mone(*args: str, timeout: float = 240) -> tuple[int, str, str, dict | None]:
    """Runs `mone ARGS` as a user would; returns (exit code, stdout, stderr, final JSON summary line)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    prefix = ["-m", "jobs.cli"] if not _cli_modules_missing() else ["-c", _SUBMIT_ONLY]
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, *prefix, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    print(f"mone {' '.join(args[:3])}: {time.monotonic() - t0:.1f} s")
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    summary = json.loads(last) if last.startswith("{") else None
    return p.returncode, p.stdout, p.stderr, summary


def _kill_leftovers(marker: str) -> None:
    """SIGKILL, by pid, processes whose command line or cwd lies under our head's temp dir (job drivers)."""
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(pid_dir / "cwd")
        except OSError:
            continue
        if marker in cmdline or cwd.startswith(marker):
            with contextlib.suppress(OSError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on free ports with a dashboard; yields its http address."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    temp_dir = tempfile.mkdtemp(prefix="mone_rs_", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    ports = {
        "port": _free_port(),
        "dashboard-port": _free_port(),
        "ray-client-server-port": _free_port(),
        "dashboard-agent-listen-port": _free_port(),
        "dashboard-agent-grpc-port": _free_port(),
        "runtime-env-agent-port": _free_port(),
        "metrics-export-port": _free_port(),
        "node-manager-port": _free_port(),
        "object-manager-port": _free_port(),
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # a local test cluster, reachable from 127.0.0.1 only
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # on SIGTERM stop now, not after a 30 s drain
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # jobs run `python`
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",  # stays the parent of every Ray process: stopping it stops exactly this cluster
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--min-worker-port=0",  # 0: workers take free ports, not the shared default range
        "--max-worker-port=0",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 - open for the cluster's lifetime
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        import requests

        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}:\n{(Path(temp_dir) / 'ray_start.log').read_text()}")
            try:
                if requests.get(f"{address}/api/jobs/", timeout=2).status_code == 200:
                    break
            except requests.exceptions.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no dashboard at {address} after 120 s")
            time.sleep(0.5)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(OSError):
            os.killpg(head.pid, signal.SIGKILL)  # anything left in the cluster's session
        _kill_leftovers(temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


PY_OK = "import json, os; print('hello from', os.getcwd()); print(json.dumps({'answer': 42}))"


@pytest.mark.slow
def test_submit_follow_list_logs_fail_and_stop(ray_head):
    """The submission machinery with plain python entrypoints (seconds, independent of the training code)."""
    rc, out, err, summary = mone(
        "submit", "train", "--address", ray_head, "--follow", "--entrypoint", f"python -c {shlex.quote(PY_OK)}"
    )
    assert rc == 0, err
    sid = summary["submission_id"]
    assert summary["status"] == "SUCCEEDED" and summary["result"] == {"answer": 42}
    assert "hello from" in out  # followed logs went to stdout; the job ran in the uploaded working dir
    assert "working_dir_files" in out

    rc, out, err, summary = mone("jobs", "list", "--address", ray_head)
    assert rc == 0 and sid in out and summary["by_status"]["SUCCEEDED"] >= 1
    rc, out, err, _ = mone("jobs", "logs", sid, "--address", ray_head)
    assert rc == 0 and "hello from" in out

    boom = "import sys; print('boom: bad things'); sys.exit(3)"
    rc, out, err, summary = mone(
        "submit", "evaluate", "--address", ray_head, "--wait", "--entrypoint", f"python -c {shlex.quote(boom)}"
    )
    assert rc == 1 and summary["status"] == "FAILED" and summary["driver_exit_code"] == 3
    assert "boom: bad things" in summary["log_tail"] and "boom: bad things" in err  # the tail is printed

    # `--follow` interrupted by Ctrl-C (SIGINT): exit 130, the job keeps running, and the line says how to re-attach.
    sleeper = "import time; print('sleeper', 'up', flush=True); time.sleep(600)"  # prints a line not in the command
    log = Path(tempfile.mkdtemp(prefix="mone_follow_")) / "follow.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "submit", "tune", "--name", "sleeper", "--address", ray_head,
             "--follow", "--entrypoint", f"python -c {shlex.quote(sleeper)}"],
            cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "sleeper up" not in log.read_text().splitlines():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130, log.read_text()
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    sid = text.split("submitted ", 1)[1].split()[0]
    assert sid.startswith("sleeper-") and "Traceback" not in text
    assert f"{sid} keeps running on the cluster" in text and f"mone jobs logs {sid} --follow" in text
    rc, out, err, summary = mone("jobs", "status", sid, "--address", ray_head)
    assert rc == 0 and summary["status"] == "RUNNING"
    rc, out, err, summary = mone("jobs", "stop", sid, "--wait", "--address", ray_head)
    assert rc == 0 and summary["status"] == "STOPPED"
    rc, out, err, summary = mone("jobs", "status", sid, "--address", ray_head)
    assert rc == 1 and summary["status"] == "STOPPED"
    rc, out, err, _ = mone("jobs", "status", "no-such-job", "--address", ray_head)
    assert rc == 2 and "no job 'no-such-job'" in err


TINY = [
    "optim.epochs=1",
    "data.synth.videos_per_class=4",
    "data.synth.val_videos_per_class=2",
    "data.synth.classes=2",
    "data.synth.corrupt=0",
    "scaling.num_workers=1",
    "optim.batch_size=4",  # 8 training clips: at least one step
    "mone.val_budgets=[0.3,1.0]",
]


@pytest.mark.slow
def test_submit_tiny_train_then_a_failing_one(ray_head, tmp_path):
    missing = _cli_modules_missing()
    if missing:
        pytest.skip(f"the job runs `python -m jobs.cli train`, which needs every CLI module; missing: {missing}")
    storage = tmp_path / "runs"
    t0 = time.monotonic()
    rc, out, err, summary = mone(
        "submit", "train", "--address", ray_head, "--follow", "--name", "tiny",
        "--", "--config", "tiny_cpu", *TINY,
        f"run.storage_path={storage}", "run.name=submit_test", f"data.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    print(f"tiny train job: {time.monotonic() - t0:.0f} s")
    assert rc == 0, f"{err}\n{out[-4000:]}"
    assert summary["status"] == "SUCCEEDED"
    run_dir = storage / "submit_test"
    assert (run_dir / "inference" / "model.safetensors").is_file()
    assert Path(summary["result"]["checkpoint"]) == run_dir / "inference"
    rc, out, err, _ = mone("jobs", "logs", summary["submission_id"], "--address", ray_head)
    assert rc == 0 and str(run_dir) in out

    rc, out, err, summary = mone(
        "submit", "train", "--address", ray_head, "--wait",
        "--", "--config", "tiny_cpu", "model.variant=nope", f"run.storage_path={storage}",
    )  # fmt: skip
    assert rc == 1 and summary["status"] == "FAILED"
    assert "unknown variant 'nope'" in summary["log_tail"]  # config validation, reported from the cluster
    assert "last 40 log lines" in err and "unknown variant 'nope'" in err


@pytest.mark.slow
def test_submit_prepare_runs_on_the_cluster(ray_head, tmp_path):
    missing = _cli_modules_missing()
    if missing:
        pytest.skip(f"the job runs `python -m jobs.cli data prepare`, which needs every CLI module; missing: {missing}")
    from pipeline.synth import generate

    src = tmp_path / "k400"
    generate(src, "k400", classes=2, videos_per_class=2, val_videos_per_class=1, test_videos_per_class=0, corrupt=1,
             width=64, height=48, frames=8, workers=1, progress=False)
    dst = tmp_path / "k400_32"
    rc, out, err, summary = mone(
        "submit", "prepare", "--address", ray_head, "--wait",
        "--", str(src), "--out", str(dst), "--short-side", "32", "--max-error-fraction", "0.5", "--no-progress",
    )  # fmt: skip
    assert rc == 0, f"{err}\n{out[-4000:]}"
    assert summary["status"] == "SUCCEEDED" and summary["entrypoint"].startswith("python -u -m jobs.cli data prepare")
    result = summary["result"]  # the job's own final JSON line
    assert (result["out"], result["written"], result["failed"]) == (str(dst), 6, 1)
    assert len(list(dst.rglob("*.mp4"))) == 6 and (dst / "prepare_errors.parquet").is_file()
