"""`mone submit` and `mone jobs`: run train / tune / evaluate / prepare on a Ray cluster (Ray's Job Submission API).

    mone submit train --address http://HEAD:8265 --follow -- --config k400_vivit_b16 data.root=s3://bucket/k400
    mone jobs list | status ID [--wait] | logs ID [--follow] | stop ID

`submit` uploads the project directory as the job's `runtime_env.working_dir` (runs/, data/, .git and caches
excluded) and runs `python -m jobs.cli COMMAND ARGS...` on the head node, so the cluster needs the
dependencies (cluster.yaml installs them) but not this checkout. The arguments after `--` are passed verbatim:
they are the same as for a local run. Results go to `run.storage_path`, which on a multi-node cluster must be
shared storage (s3://, gs://, or an NFS mount): `--storage` / $MONE_STORAGE_PATH sets it for `train`.

Exit codes: 0 the job was submitted (or SUCCEEDED, with --wait/--follow); 1 it FAILED or was STOPPED (its last
log lines are printed); 2 no dashboard at the address, unknown job id, or bad arguments; 130 interrupted (the
job keeps running). Progress goes to stderr; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import getpass
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBMIT_COMMANDS = ("train", "tune", "evaluate", "prepare", "smoke")
# Submitted names whose `mone` command is longer (`mone submit prepare` runs `mone data prepare`).
COMMAND_WORDS = {"prepare": ("data", "prepare")}
# Not `mone` commands: scripts of the project a job runs the same way (`mone submit smoke`: benchmarks/gpu_smoke.py).
SCRIPT_COMMANDS = {"smoke": "benchmarks/gpu_smoke.py"}
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_LINES = 40
# Never uploaded with the job (gitwildmatch patterns, relative to the working dir, as Ray applies them).
# Ray also honours the project's .gitignore and a .rayignore file.
DEFAULT_EXCLUDES = (
    ".git",
    "/runs/",
    "/data/",
    ".cache/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    ".venv/",
    "/build/",
    "/dist/",
)
# The dashboard accepts request bodies up to 100 MiB (ray_constants.DASHBOARD_CLIENT_MAX_SIZE), so that bounds
# the zipped working dir; the GCS package store itself allows 512 MiB (the gRPC message limit).
UPLOAD_LIMIT_BYTES = 100 * 1024**2
STORAGE_ENV = "MONE_STORAGE_PATH"
NO_DASHBOARD_HELP = (
    "no Ray dashboard at {address}: start one with `ray start --head --dashboard-host 0.0.0.0` "
    "or `ray up cluster.yaml` (then `ray dashboard cluster.yaml` forwards it to http://127.0.0.1:8265), "
    "or pass --address / set RAY_ADDRESS"
)


class SubmitError(Exception):
    """A problem the user can fix (address, job id, arguments); reported in one message, exit code 2."""


# --------------------------------------------------------------------------- small helpers


def _say(msg: str) -> None:
    """Progress and diagnostics: stderr, so stdout stays logs + the JSON summary."""
    print(msg, file=sys.stderr, flush=True)


def _summary(data: dict[str, Any]) -> None:
    print(json.dumps(data, default=str), flush=True)


def _fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def normalize_address(address: str) -> str:
    """The dashboard's HTTP address: adds http:// when no scheme is given, drops trailing slashes."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise SubmitError(
            f"--address {address}: jobs are submitted to the dashboard (http://HEAD:8265), not to the Ray Client "
            "port (ray://HEAD:10001)"
        )
    if "://" not in address:
        address = "http://" + address
    return address


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE, e.g. --env NCCL_DEBUG=INFO")
        env[key.strip()] = value
    return env


def project_root() -> Path:
    """The directory holding pyproject.toml and jobs/: the parent of this package in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here, Path.cwd()):
        if (candidate / "jobs" / "cli.py").is_file() and (candidate / "pyproject.toml").is_file():
            return candidate
    raise SubmitError(
        "cannot find the project checkout to upload (a directory with pyproject.toml and jobs/cli.py): "
        "run from the checkout or pass --working-dir"
    )


def _override_value(args: list[str], key: str) -> str | None:
    """The value of the last `key=value` override in `args`, if any."""
    value = None
    for a in args:
        if a.startswith(key + "="):
            value = a.split("=", 1)[1]
    return value


def _config_option(args: list[str]) -> tuple[int, str] | None:
    """(index of the value, value) of `--config X` / `--config=X` in `args`."""
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return i + 1, args[i + 1]
        if a.startswith("--config="):
            return i, a.split("=", 1)[1]
    return None


def prepare_job_args(command: str, args: list[str], working_dir: Path, storage: str | None) -> list[str]:
    """The job's own arguments, as the cluster must see them.

    - `--config some/file.yaml` given as a local file inside the uploaded directory becomes a path relative to it
      (the job's cwd is the uploaded directory); a file outside it would not exist on the cluster: refused.
    - `storage` (from --storage or $MONE_STORAGE_PATH) becomes `run.storage_path=...` for `train`, unless the
      arguments set run.storage_path themselves.
    Everything else (data.root=s3://..., run.storage_path=gs://..., lists) passes through verbatim.
    """
    args = list(args)
    found = _config_option(args)
    if found:
        idx, value = found
        p = Path(value).expanduser()
        is_file = p.is_file() and (p.suffix in (".yaml", ".yml") or os.sep in value)
        if is_file:
            try:
                rel = p.resolve().relative_to(working_dir.resolve()).as_posix()
            except ValueError:
                raise SubmitError(
                    f"--config {value}: this file is outside the uploaded directory {working_dir}, so the cluster "
                    "would not see it; copy it under the project (e.g. jobs/configs/) and submit again"
                ) from None
            args[idx] = rel if args[idx] == value else f"--config={rel}"
    if storage and command == "train" and _override_value(args, "run.storage_path") is None:
        args.append(f"run.storage_path={storage}")
    return args


def storage_warning(command: str, args: list[str]) -> str | None:
    """A warning when `train` would write its run (or `prepare` read or write an archive) under the job's
    temporary working dir on the cluster."""
    if command == "prepare":
        return _prepare_paths_warning(args)
    if command != "train":
        return None
    storage = _override_value(args, "run.storage_path")
    if storage is None:
        try:
            import yaml

            from jobs.config import DEFAULT_CONFIG, resolve_config_path

            found = _config_option(args)
            raw = yaml.safe_load(resolve_config_path(found[1] if found else DEFAULT_CONFIG).read_text()) or {}
            storage = str((raw.get("run") or {}).get("storage_path", "runs"))
        except Exception:  # the job itself reports a bad config; this is only a hint
            return None
    if "://" in storage or Path(storage).expanduser().is_absolute() or storage.startswith("~"):
        return None
    return (
        f"run.storage_path={storage} is relative: on the cluster it resolves inside the job's temporary working "
        "directory, which Ray deletes. Use shared storage: s3://bucket/runs, gs://bucket/runs or an NFS path "
        f"(--storage URI, ${STORAGE_ENV}, or run.storage_path=... after --)"
    )


def _prepare_paths_warning(args: list[str]) -> str | None:
    import contextlib
    import io

    from jobs.prepare import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            ns, _ = parser.parse_known_args(args)
        except SystemExit:  # the job itself reports bad arguments; this is only a hint
            return None
    relative = [f"{name} {value}" for name, value in (("SRC", ns.src), ("--out", ns.out))
                if "://" not in value and not value.startswith("~") and not Path(value).is_absolute()]
    if not relative:
        return None
    return (f"{' and '.join(relative)}: relative paths resolve inside the job's temporary working directory on the "
            "cluster; give absolute paths on storage that every node mounts at the same place (NFS, EFS, ...)")


def build_entrypoint(command: str, args: list[str]) -> str:
    """`python -u -m jobs.cli COMMAND ARGS...`, shell-quoted: works where the deps are installed but `mone` is not.

    -u: unbuffered, so `mone jobs logs --follow` shows progress as it is printed."""
    if command in SCRIPT_COMMANDS:
        return shlex.join(["python", "-u", SCRIPT_COMMANDS[command], *args])
    return shlex.join(["python", "-u", "-m", "jobs.cli", *COMMAND_WORDS.get(command, (command,)), *args])


def build_runtime_env(
    working_dir: Path,
    *,
    env: dict[str, str] | None = None,
    pip: list[str] | None = None,
    excludes: list[str] | None = None,
) -> dict[str, Any]:
    # Ray refuses to merge a driver's ray.init(runtime_env=...) with this job's when both name a variable, unless
    # told that the driver's wins: kept so user scripts that pass their own runtime_env still run.
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 would otherwise print every worker line twice (see jobs/train.py).
    env_vars = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env or {})}
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": [*DEFAULT_EXCLUDES, *(excludes or [])],
        "env_vars": env_vars,
    }
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def estimate_upload(working_dir: Path, excludes: list[str]) -> tuple[int, int]:
    """(files, bytes before compression) Ray will zip: `excludes` plus the root .gitignore / .rayignore.

    An estimate for the progress line and the size check (Ray also reads nested .gitignore files)."""
    try:
        from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray itself uses for excludes
    except ImportError:  # pragma: no cover - a Ray without the vendored copy
        return 0, 0
    lines = list(excludes)
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1" and (working_dir / ".gitignore").is_file():
        lines += (working_dir / ".gitignore").read_text().splitlines()
    if (working_dir / ".rayignore").is_file():
        lines += (working_dir / ".rayignore").read_text().splitlines()
    spec = PathSpec.from_lines("gitwildmatch", lines)
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(working_dir):
        rel_dir = Path(dirpath).relative_to(working_dir)
        dirnames[:] = [
            d
            for d in dirnames
            if not spec.match_file((rel_dir / d).as_posix()) and not spec.match_file((rel_dir / d).as_posix() + "/")
        ]
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if spec.match_file(rel):
                continue
            try:
                size += (Path(dirpath) / f).stat().st_size
            except OSError:
                continue
            files += 1
    return files, size


def find_result(log_text: str) -> dict[str, Any] | None:
    """The job's own final JSON summary line (every mone command ends with one), if it printed one."""
    for line in reversed(log_text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _tail(text: str, n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


# --------------------------------------------------------------------------- talking to the cluster


def _token_headers(prefer_default_file: bool) -> dict[str, str]:
    """An Authorization header for clusters with Ray token authentication.

    Sources, as Ray reads them: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token (the
    last only when RAY_AUTH_MODE=token or the dashboard asked for a token)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    paths = [os.environ.get("RAY_AUTH_TOKEN_PATH", "")]
    if prefer_default_file or os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        paths.append(str(Path("~/.ray/auth_token").expanduser()))
    for p in paths:
        if token:
            break
        if p and Path(p).is_file():
            token = Path(p).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _quiet_ray_logs() -> None:
    """Keep Ray's per-file packaging chatter out of the progress display (its warnings still show)."""
    import logging

    for name in (
        "ray._private.runtime_env.packaging",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    # We exclude .git ourselves; Ray's notice that it now does so by default is noise here.
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(
        lambda record: "is now ignored by default" not in record.getMessage()
    )


def connect(address: str, timeout_s: float = 10.0):
    """A JobSubmissionClient for the dashboard at `address`, or a SubmitError that says how to get one."""
    import requests

    url = normalize_address(address)
    headers = _token_headers(prefer_default_file=False)

    def probe(h: dict[str, str]) -> requests.Response:
        try:
            return requests.get(f"{url}/api/version", headers=h, timeout=timeout_s)
        except requests.exceptions.RequestException:
            hint = ""
            port = url.rsplit(":", 1)[-1]
            if port in ("6379", "10001"):
                hint = f" (port {port} is Ray's GCS/client port; the dashboard listens on 8265)"
            raise SubmitError(NO_DASHBOARD_HELP.format(address=url) + hint) from None

    r = probe(headers)
    if r.status_code == 401 and not headers:
        headers = _token_headers(prefer_default_file=True)
        if headers:
            r = probe(headers)
    if r.status_code in (401, 403):
        raise SubmitError(
            f"the Ray dashboard at {url} requires token authentication ({r.status_code}): set RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH) to the cluster's token, e.g. from `ray get-auth-token` on the head node"
        )
    if r.status_code != 200:
        raise SubmitError(
            NO_DASHBOARD_HELP.format(address=url) + f" (GET /api/version answered {r.status_code}: {r.text[:200]})"
        )

    from ray.job_submission import JobSubmissionClient

    _quiet_ray_logs()
    try:
        return JobSubmissionClient(url, headers=headers or None)
    except ConnectionError:
        raise SubmitError(NO_DASHBOARD_HELP.format(address=url)) from None


def _job_error(exc: Exception, job_id: str, address: str) -> SubmitError:
    text = str(exc)
    if "404" in text or "does not exist" in text:
        return SubmitError(f"no job '{job_id}' on {address}: see `mone jobs list --address {address}`")
    return SubmitError(f"job '{job_id}' on {address}: {text}")


def _info(client, job_id: str, address: str):
    try:
        return client.get_job_info(job_id)
    except (RuntimeError, ValueError) as exc:
        raise _job_error(exc, job_id, address) from None


def _status_str(status: Any) -> str:
    return getattr(status, "value", str(status))


def _short_message(message: str | None) -> str:
    """Ray's status message without the copy of the logs it appends to a failure (we print our own tail)."""
    first = (message or "").split("\n", 1)[0]
    return first.split(", last available logs", 1)[0]


def _job_summary(info, address: str) -> dict[str, Any]:
    start, end = info.start_time, info.end_time
    duration = None
    if start:
        duration = round(((end or time.time() * 1000) - start) / 1000, 1)
    return {
        "submission_id": info.submission_id or info.job_id,
        "status": _status_str(info.status),
        "message": _short_message(info.message),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "entrypoint": info.entrypoint,
        "start_time": _fmt_time(start),
        "end_time": _fmt_time(end),
        "duration_s": duration,
        "address": address,
    }


def _fmt_time(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None


def wait_for_job(client, job_id: str, address: str, *, heartbeat_s: float = 30.0) -> str:
    """Poll until the job is terminal, printing status changes and a heartbeat; returns the final status."""
    t0 = time.monotonic()
    last_status, last_print, delay = None, 0.0, 0.5
    while True:
        try:
            status = _status_str(client.get_job_status(job_id))
        except (RuntimeError, ValueError) as exc:
            raise _job_error(exc, job_id, address) from None
        now = time.monotonic()
        if status != last_status or now - last_print >= heartbeat_s:
            _say(f"[{_fmt_elapsed(now - t0):>8}] {job_id}: {status}")
            last_status, last_print = status, now
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def follow_logs(client, job_id: str, keep_lines: int = 400) -> str:
    """Stream the job's logs to stdout until it ends; returns the last `keep_lines` lines seen."""
    kept: collections.deque[str] = collections.deque(maxlen=keep_lines)
    partial = ""

    async def stream() -> None:
        nonlocal partial
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()
            kept.extend(lines)

    try:
        asyncio.run(stream())
    except Exception as exc:  # the websocket dropped (RuntimeError, aiohttp errors): the caller polls instead
        _say(f"log stream interrupted ({exc}); waiting for the job's status instead")
    if partial:
        kept.append(partial)
    return "\n".join(kept)


def finish(client, job_id: str, address: str, *, followed_text: str | None, extra: dict[str, Any]) -> int:
    """After a terminal status: report failure with the log tail, print the JSON summary, return the exit code."""
    info = _info(client, job_id, address)
    summary = {**_job_summary(info, address), **extra}
    status = summary["status"]
    try:
        logs = client.get_job_logs(job_id)
    except Exception:  # logs are a courtesy here; the status is what matters
        logs = followed_text or ""
    result = find_result(logs)
    if result is not None:
        summary["result"] = result
    if status != "SUCCEEDED":
        tail = _tail(logs)
        summary["log_tail"] = tail
        _say(f"job {job_id} {status}: {summary['message'] or ''}".rstrip())
        if followed_text is None and tail:
            _say(f"---- last {LOG_TAIL_LINES} log lines ----\n{tail}\n----")
        _say(f"full logs: mone jobs logs {job_id} --address {address}")
    _summary(summary)
    return 0 if status == "SUCCEEDED" else 1


# --------------------------------------------------------------------------- commands


def run_submit(args: argparse.Namespace) -> int:
    try:
        return _run_submit(args)
    except SubmitError as exc:
        _say(f"mone submit: {exc}")
        return 2


def _run_submit(args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    working_dir = Path(args.working_dir).expanduser().resolve() if args.working_dir else project_root()
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {working_dir} is not a directory")
    job_args = prepare_job_args(
        args.submit_command, args.args, working_dir, args.storage or os.environ.get(STORAGE_ENV)
    )
    entrypoint = args.entrypoint or build_entrypoint(args.submit_command, job_args)
    if args.submit_command == "smoke" and args.num_gpus is None:
        args.num_gpus = 1  # the smoke test's driver checks CUDA and benchmarks on a GPU of its own
    runtime_env = build_runtime_env(working_dir, env=parse_env(args.env), pip=args.pip, excludes=args.exclude)
    _say(f"connecting to {address} ...")  # after the arguments are checked: their mistakes come first
    client = connect(address)
    if not args.entrypoint:
        warning = storage_warning(args.submit_command, job_args)
        if warning:
            _say(f"warning: {warning}")

    files, size = estimate_upload(working_dir, runtime_env["excludes"])
    _say(f"packaging {working_dir}: ~{files} files, {size / 2**20:.1f} MiB before compression")
    if size > UPLOAD_LIMIT_BYTES:
        _say(
            f"warning: the working dir is over {UPLOAD_LIMIT_BYTES // 2**20} MiB; Ray refuses a zipped upload above "
            "that: add --exclude PATTERN or a .rayignore, and keep data and checkpoints on shared storage"
        )

    prefix = args.name or f"mone-{args.submit_command}"
    submission_id = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    metadata = {
        "mone_command": args.submit_command,
        "mone_args": shlex.join(job_args),
        "submitted_by": getpass.getuser(),
    }
    if args.name:
        metadata["name"] = args.name
    _say(f"uploading and submitting: {entrypoint}")
    t0 = time.monotonic()
    try:
        client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata=metadata,
            entrypoint_num_cpus=args.num_cpus,
            entrypoint_num_gpus=args.num_gpus,
        )
    except (RuntimeError, ValueError) as exc:
        raise SubmitError(f"the cluster refused the job: {exc}") from None
    _say(f"submitted {submission_id} in {time.monotonic() - t0:.1f}s; dashboard: {address}/#/jobs/{submission_id}")
    extra = {"entrypoint": entrypoint, "working_dir": str(working_dir), "upload_mib": round(size / 2**20, 2)}

    if not (args.wait or args.follow):
        _say(f"follow it: mone jobs logs {submission_id} --follow --address {address}")
        _summary({"submission_id": submission_id, "status": "PENDING", "address": address, **extra})
        return 0
    try:
        followed = None
        if args.follow:
            followed = follow_logs(client, submission_id)
        wait_for_job(client, submission_id, address)
        return finish(client, submission_id, address, followed_text=followed, extra=extra)
    except KeyboardInterrupt:
        _say(
            f"\ninterrupted; {submission_id} keeps running on the cluster. "
            f"Follow: mone jobs logs {submission_id} --follow --address {address}; "
            f"stop: mone jobs stop {submission_id} --address {address}"
        )
        return 130


def run_jobs(args: argparse.Namespace) -> int:
    try:
        address = normalize_address(args.address)
        client = connect(address)
        return args.jobs_func(client, address, args)
    except SubmitError as exc:
        _say(f"mone jobs: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("\ninterrupted (the job is unaffected)")
        return 130


def _jobs_list(client, address: str, args: argparse.Namespace) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [("SUBMISSION ID", "STATUS", "START", "DURATION", "ENTRYPOINT")]
    for j in jobs:
        s = _job_summary(j, address)
        dur = _fmt_elapsed(s["duration_s"]) if s["duration_s"] is not None else "-"
        entry = (j.entrypoint or f"({_status_str(j.type).lower()} job)")[:70]
        rows.append((s["submission_id"], s["status"], s["start_time"] or "-", dur, entry))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    counts = collections.Counter(_status_str(j.status) for j in jobs)
    _summary({"address": address, "jobs": len(jobs), "by_status": dict(counts)})
    return 0


def _jobs_status(client, address: str, args: argparse.Namespace) -> int:
    info = _info(client, args.job_id, address)
    if args.wait and _status_str(info.status) not in TERMINAL_STATUSES:
        wait_for_job(client, args.job_id, address)
        return finish(client, args.job_id, address, followed_text=None, extra={})
    summary = _job_summary(info, address)
    for key in ("submission_id", "status", "message", "entrypoint", "start_time", "end_time", "duration_s"):
        _say(f"{key:>14}: {summary[key]}")
    _summary(summary)
    return 1 if summary["status"] in ("FAILED", "STOPPED") else 0


def _jobs_logs(client, address: str, args: argparse.Namespace) -> int:
    _info(client, args.job_id, address)  # a clear error for an unknown id
    if args.follow:
        follow_logs(client, args.job_id)
        status = wait_for_job(client, args.job_id, address)
        return 0 if status == "SUCCEEDED" else 1
    logs = client.get_job_logs(args.job_id)
    text = _tail(logs, args.tail) if args.tail else logs.rstrip("\n")
    if text:
        print(text, flush=True)
    return 0


def _jobs_stop(client, address: str, args: argparse.Namespace) -> int:
    info = _info(client, args.job_id, address)
    if _status_str(info.status) in TERMINAL_STATUSES:
        _say(f"{args.job_id} already {_status_str(info.status)}")
    else:
        client.stop_job(args.job_id)
        _say(f"stop requested for {args.job_id}")
        if args.wait:
            wait_for_job(client, args.job_id, address)
    summary = _job_summary(_info(client, args.job_id, address), address)
    _summary(summary)
    return 0


# --------------------------------------------------------------------------- argparse


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=default_address(),
        help="the Ray dashboard, http://HEAD:8265 (default: $RAY_ADDRESS or %(default)s)",
    )


def register(subparsers) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="run train / tune / evaluate / prepare (or the GPU smoke test) on a Ray cluster (Ray Job Submission)",
        description=(
            "Upload this project and run `mone COMMAND ARGS...` as a Ray job on a cluster. Everything after `--` "
            "is passed to the command exactly as for a local run."
        ),
        epilog="e.g. mone submit train --address http://HEAD:8265 --follow -- --config k400_vivit_b16 "
        "data.root=s3://bucket/k400 run.storage_path=s3://bucket/runs",
    )
    sub = submit.add_subparsers(dest="submit_command", metavar="COMMAND", required=True)
    for command in SUBMIT_COMMANDS:
        words = " ".join(COMMAND_WORDS.get(command, (command,)))
        what = f"python {SCRIPT_COMMANDS[command]}" if command in SCRIPT_COMMANDS else f"mone {words}"
        p = sub.add_parser(
            command,
            help=f"submit `{what} ...`" + (" (the GPU smoke test; its driver takes 1 GPU)" if command == "smoke"
                                           else ""),
            usage=f"mone submit {command} [options] -- [{what} arguments ...]",
            description=f"Submit `{build_entrypoint(command, ['ARGS...'])}` to a Ray cluster; ARGS come after `--`.",
        )
        _add_address(p)
        p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it FAILED/STOPPED")
        p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends (implies --wait)")
        p.add_argument("--name", help="a readable prefix for the submission id (default mone-COMMAND)")
        p.add_argument(
            "--env", action="append", metavar="KEY=VAL", help="an environment variable for the job (repeatable)"
        )
        p.add_argument(
            "--pip", action="append", metavar="PKG", help="an extra pip requirement installed for the job (repeatable)"
        )
        p.add_argument(
            "--storage",
            metavar="URI",
            help=f"shared run storage for train, e.g. s3://bucket/runs (default: ${STORAGE_ENV}); "
            "adds run.storage_path=URI unless the arguments set it",
        )
        p.add_argument("--working-dir", help="the directory to upload (default: this project's root)")
        p.add_argument(
            "--exclude", action="append", metavar="PATTERN", help="another gitignore-style pattern not to upload"
        )
        p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver (default 0)")
        p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the job's driver (default 0)")
        # Escape hatch for debugging a cluster (and for tests): run this shell command instead of `mone COMMAND`.
        p.add_argument("--entrypoint", help=argparse.SUPPRESS)
        p.add_argument("args", nargs="*", metavar="ARGS", help=f"arguments of `{what}` (after --)")
        p.set_defaults(func=run_submit)

    jobs = subparsers.add_parser(
        "jobs",
        help="list, inspect, follow and stop jobs on a Ray cluster",
        description="Jobs on the Ray cluster at --address (submitted with `mone submit` or `ray job submit`).",
    )
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    p = jsub.add_parser("list", help="every job on the cluster")
    _add_address(p)
    p.set_defaults(func=run_jobs, jobs_func=_jobs_list)
    p = jsub.add_parser("status", help="a job's status (exit 1 if it FAILED or was STOPPED)")
    p.add_argument("job_id", metavar="ID")
    _add_address(p)
    p.add_argument("--wait", action="store_true", help="wait until the job ends")
    p.set_defaults(func=run_jobs, jobs_func=_jobs_status)
    p = jsub.add_parser("logs", help="a job's logs")
    p.add_argument("job_id", metavar="ID")
    _add_address(p)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines")
    p.set_defaults(func=run_jobs, jobs_func=_jobs_logs)
    p = jsub.add_parser("stop", help="stop a running job")
    p.add_argument("job_id", metavar="ID")
    _add_address(p)
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    p.set_defaults(func=run_jobs, jobs_func=_jobs_stop)
