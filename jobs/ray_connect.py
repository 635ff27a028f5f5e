"""How every `mone` command reaches Ray: its own local Ray unless told to join one, and never an endless wait.

Plain `ray.init()` joins whatever local cluster it finds, including the address file a dead cluster left behind,
and, given an address nobody answers at, retries forever ("Failed to connect to GCS ..." every ~40 s). So:

- no `--address` and no `RAY_ADDRESS`: a new local Ray for this command (`ray.init(address="local")`);
- `--address auto`: join the cluster `ray start` recorded on this machine (Ray's own lookup);
- `--address HOST:PORT` (or `ray://HOST:PORT`, or `RAY_ADDRESS`): join it, if it answers within
  `CONNECT_TIMEOUT_S` (30 s; `MONE_RAY_CONNECT_TIMEOUT_S` changes it) and lets the command join within as long
  again; otherwise `ClusterUnreachable`, whose one-line message names the address and the fix.

A job started by `mone submit` has RAY_ADDRESS set by Ray, so it joins its cluster.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

CONNECT_TIMEOUT_S = 30.0
TIMEOUT_ENV = "MONE_RAY_CONNECT_TIMEOUT_S"
EXIT_UNREACHABLE = 2

_FIX = "start it (`ray start --head`), fix --address / RAY_ADDRESS, or leave both unset to run on a local Ray"


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the address a command was given; the message names it and the fix."""


def requested_address(address: str | None) -> str:
    """What a command joins: its --address, else $RAY_ADDRESS, else "local" (a new local Ray of its own)."""
    return (address or os.environ.get("RAY_ADDRESS") or "").strip() or "local"


def connect_timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, CONNECT_TIMEOUT_S))
    except ValueError:
        return CONNECT_TIMEOUT_S


def _where(address: str, given: str | None) -> str:
    if given:
        return f"--address {address}"
    return f"RAY_ADDRESS={address}"


def bootstrap_address(address: str, given: str | None = None) -> tuple[str, int]:
    """HOST, PORT of the cluster `address` names ("auto": the one `ray start` recorded on this machine)."""
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachable(
            f"{_where(address, given)} is a dashboard (job submission) address: submit the command with "
            f"`mone submit ... --address {address}`, or give the cluster's GCS address (HEAD:6379)")
    target = address.removeprefix("ray://")
    if target == "auto":
        from ray._private import services  # Ray's own lookup of the cluster `ray start` recorded

        try:
            target = services.canonicalize_bootstrap_address("auto") or ""
        except ConnectionError:
            target = ""
        if not target:
            raise ClusterUnreachable(
                "--address auto: no Ray cluster was started on this machine; start one with `ray start --head`, "
                "or leave --address unset to run on a local Ray")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachable(f"{_where(address, given)}: expected HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT "
                                 "or auto")
    return host.strip("[]") or "127.0.0.1", int(port)


def probe(host: str, port: int, timeout_s: float) -> str | None:
    """None when something accepts a TCP connection at host:port within `timeout_s`, else why not."""
    deadline = time.monotonic() + timeout_s
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
                return None
        except OSError as e:
            reason = e.strerror or type(e).__name__
        if time.monotonic() + 1.0 > deadline:
            return reason
        time.sleep(1.0)


def check_address(address: str | None = None) -> None:
    """Fails fast (ClusterUnreachable) when the cluster a command is asked to join does not answer; called before
    a command's slow preparations (decoding, dataset generation), and again by `init_ray`."""
    target = requested_address(address)
    if target == "local":
        return
    host, port = bootstrap_address(target, address)
    timeout_s = connect_timeout()
    why = probe(host, port, timeout_s)
    if why:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {host}:{port} ({_where(target, address)}; {why} within {timeout_s:.0f} s): "
            f"{_FIX}")


def init_ray(address: str | None = None, *, command: str = "mone", **init_kwargs: Any) -> None:
    """`ray.init` for a command (see the module doc); a no-op when Ray is already initialised.

    Raises ClusterUnreachable when the requested cluster does not answer in time. If the port answers but Ray's
    own connection still hangs past the deadline, the process ends with that one-line message (exit code 2):
    ray.init cannot be interrupted from Python."""
    import ray

    if ray.is_initialized():
        return
    target = requested_address(address)
    if target == "local":
        ray.init(address="local", **init_kwargs)
        return
    timeout_s = connect_timeout()
    check_address(address)  # something accepts connections there within timeout_s ...
    host, port = bootstrap_address(target, address)
    message = (f"{command}: error: the Ray cluster at {host}:{port} ({_where(target, address)}) accepted the "
               f"connection but did not let this command join within {timeout_s:.0f} s: {_FIX}")

    def give_up() -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(EXIT_UNREACHABLE)

    watchdog = threading.Timer(timeout_s, give_up)  # ... and Ray joins it within timeout_s more
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=target, **init_kwargs)
    finally:
        watchdog.cancel()
