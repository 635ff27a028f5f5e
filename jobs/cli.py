"""`mone`: the command line of the MoNE video pipeline.

Each command group lives in its own module, which exposes `register(subparsers)`; the module adds its
parser(s) and sets `func` to the function that runs it (returning an exit code). Heavy imports (ray,
deepspeed) happen inside those functions so `mone --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order is the order in `mone --help`.
COMMAND_MODULES = (
    "jobs.train",
    "jobs.tune",
    "jobs.evaluate",
    "jobs.visualize",
    "jobs.data_cmd",
    "jobs.flops_cmd",
    "jobs.submit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mone",
        description=(
            "Mixture of Nested Experts for video on Ray: train a MoNE ViViT (Ray Train + DeepSpeed), "
            "search budget allocations (Ray Tune), batch-evaluate archives, and submit all of it to a cluster."
        ),
        epilog="Run `mone COMMAND --help` for a command's options. With no arguments, `mone train` runs a "
        "small demo on local Ray with a generated dataset.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command group not installed in this checkout
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user gave something wrong (a config value, a path, an address): their message
    names the input and the fix, so the CLI prints it on one line instead of a traceback."""
    found: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError, IsADirectoryError]
    for module, name in (("jobs.config", "ConfigError"), ("jobs.ray_connect", "ClusterUnreachable"),
                         ("jobs.evaluate", "EvaluateError"), ("jobs.tune", "TuneError"),
                         ("jobs.submit", "SubmitError"), ("pipeline.manifest", "ManifestError"),
                         ("pipeline.dataset", "TooManyErrors")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _prog(args: argparse.Namespace) -> str:
    words = ["mone", getattr(args, "command", None)]
    words += [getattr(args, k, None) for k in ("tune_command", "data_command", "submit_command", "jobs_command")]
    return " ".join(w for w in words if isinstance(w, str))


def main(argv: list[str] | None = None) -> int:
    # Local Ray 2.60 turns token authentication on by default; a local run needs none. A cluster the user
    # exposes should keep it: set RAY_AUTH_MODE yourself there.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:  # whatever a command did not catch itself: one line, never a traceback
        print(f"{_prog(args)}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{_prog(args)}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
