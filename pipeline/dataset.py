"""From a manifest to streams of uint8 token clips: Ray Data for training, a plain iterator for everything else.

One function does the work for both (`load_clip`): decode (reduced size) -> sample -> transform -> tokenize,
giving `tokens` uint8 `(V, L, K)` per clip (docs/interfaces.md).

Ray Data (`build_dataset`)::

    manifest (Arrow) --from_arrow, many small blocks--> map_batches(ClipLoader: class UDF, batch_size 4,
    num_cpus configurable/fractional, in a task pool (default) or an actor pool) --streaming-->
    ray.train.get_dataset_shard(...).iter_torch_batches(collate_fn=TorchCollate())

Rows: `tokens` uint8 (V, L, K), `label` int64, `path` str. A bad video never stops the stream: the UDF drops
it from its output and records (path, stage, error) with an `ErrorLog` actor (a streaming dataset cannot be read
twice, so errors travel beside it, not inside it). When an epoch's errors exceed `max_error_fraction` of the
manifest (default 5 %), the UDF raises `TooManyErrors` naming the worst files, which stops the job with that
message. `ErrorLog.write(run_dir)` writes `errors.parquet` (path, stage, error). With `keep_errors=True` the
dataset instead keeps the bad rows (zero tokens) with `error`/`stage` columns, and `split_errors(ds)` separates
them (materialises; for offline checks, not for streaming).

Epochs: Ray Train re-executes the same dataset every epoch. Sampling offsets, crops and flips are seeded per clip
from (seed, epoch, path), so a clip is the same on any worker and in any order. Pass `epoch=` to fix it, or leave
`epoch=None` and call `error_log.set_epoch(e)` at the start of each epoch (like DistributedSampler.set_epoch);
the workers read it. Order: rows are permuted with (seed, epoch) when the dataset is built and the block order
is re-randomised on every execution (not seeded).

Resources (STACK.md deadlock 1): with Train workers holding CPUs, Ray Data needs some left. `num_cpus_per_task`
may be fractional (e.g. 0.25) and `concurrency` bounds the concurrent decode tasks (or actors); the defaults
(up to one task per cluster CPU) fit a 2-CPU machine and work unchanged on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.decode import DecodeError, read_frames
from pipeline.sampling import ClipSpec, sample_indices
from pipeline.tokens import tubelet_patchify
from pipeline.transforms import spatial_views

log = logging.getLogger(__name__)

ERRORS_FILE = "errors.parquet"
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("stage", pa.string()), ("error", pa.string())])
DEFAULT_MAX_ERROR_FRACTION = 0.05


class TooManyErrors(RuntimeError):
    """More videos failed than `max_error_fraction` allows; the message names the worst files."""


@dataclass
class ClipError:
    path: str
    stage: str  # open | decode | sample | transform | tokenize
    error: str


# ------------------------------------------------------------------------------------------------- the clip itself


def clip_rng(seed: int, epoch: int, path: str) -> np.random.Generator:
    """The generator for one clip: same (seed, epoch, path) -> same clip on any worker, in any order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, zlib.crc32(path.encode())])


def load_clip(path: str, spec: ClipSpec, *, decoder: str = "auto", rng: np.random.Generator | None = None
              ) -> np.ndarray:
    """decode -> sample -> transform -> tokenize: uint8 tokens (V, L, K) with V = spec.num_views.

    Raises DecodeError (stage 'open'/'decode') for bad files, and other exceptions tagged by `stage_of`.
    """
    def indices(n: int, fps: float) -> np.ndarray:
        with _stage("sample"):
            return sample_indices(n, spec, rng)  # (Vt, T)

    frames, _ = read_frames(path, indices, decoder=decoder, short_side=spec.short_side)  # (Vt, T, h, w, 3)
    with _stage("transform"):
        views = [v for clip in frames for v in spatial_views(clip, spec, rng)]  # V x (T, crop, crop, 3)
        clips = np.stack(views)  # (V, T, crop, crop, 3)
    with _stage("tokenize"):
        return tubelet_patchify(clips, spec.tubelet_t, spec.patch)  # (V, L, K)


class _stage:
    """Tags an exception escaping the block with the pipeline stage (for the errors table)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, tp, e, tb):
        if e is not None and not getattr(e, "stage", None):
            with contextlib.suppress(AttributeError):  # exceptions with __slots__
                e.stage = self.name
        return False


def stage_of(e: BaseException) -> str:
    return getattr(e, "stage", None) or "decode"


def _error_text(e: BaseException) -> str:
    if isinstance(e, DecodeError):
        return f"{type(e).__name__}: {e.reason}"
    return f"{type(e).__name__}: {e}"[:500]


def too_many_errors_message(errors: list[ClipError], total: int, max_fraction: float, where: str = "") -> str:
    stages = Counter(e.stage for e in errors)
    counts = Counter(e.path for e in errors)
    reason = {e.path: e.error for e in errors}
    worst = sorted(counts, key=lambda p: (-counts[p], p))[:10]
    lines = [f"{len(errors)} of {total} videos failed{where} ({len(errors) / max(total, 1):.1%} > max_error_fraction "
             f"{max_fraction:.1%}); by stage: {dict(stages)}. Worst files:"]
    lines += [f"  {p}: {reason[p]}" for p in worst]
    lines.append("Fix or remove these files (`mone data check DIR` lists them all), or raise max_error_fraction.")
    return "\n".join(lines)


def error_budget(total: int, max_fraction: float) -> int:
    """How many failures an epoch of `total` clips tolerates."""
    return int(np.floor(max_fraction * total + 1e-9))


# --------------------------------------------------------------------------------------- plain iterator (no Ray)


def iter_clips(manifest: pa.Table, spec: ClipSpec, *, decoder: str = "auto", seed: int = 0, epoch: int = 0,
               shuffle: bool | None = None, errors: list[ClipError] | None = None,
               max_error_fraction: float | None = DEFAULT_MAX_ERROR_FRACTION) -> Iterator[dict]:
    """The same decode+sample+tokenize in-process: yields {"tokens" (V, L, K) uint8, "label" int, "path" str}.

    Bad videos are skipped and appended to `errors`; more than `max_error_fraction` of the manifest raises
    TooManyErrors (None: never). `shuffle` (default: spec.train) shuffles the order with (seed, epoch).
    """
    errors = errors if errors is not None else []
    _single_thread_torch()
    paths = manifest.column("path").to_pylist()
    labels = manifest.column("label").to_pylist()
    order = np.arange(len(paths))
    if spec.train if shuffle is None else shuffle:
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(paths))
    budget = error_budget(len(paths), max_error_fraction) if max_error_fraction is not None else None
    mine: list[ClipError] = []
    for i in order:
        path = paths[i]
        try:
            tokens = load_clip(path, spec, decoder=decoder, rng=clip_rng(seed, epoch, path))
        except Exception as e:  # noqa: BLE001 - any failure of one file is recorded, never fatal
            err = ClipError(path, stage_of(e), _error_text(e))
            mine.append(err)
            errors.append(err)
            if budget is not None and len(mine) > budget:
                raise TooManyErrors(too_many_errors_message(mine, len(paths), max_error_fraction)) from None
            continue
        yield {"tokens": tokens, "label": int(labels[i]), "path": path}


def _single_thread_torch() -> None:
    """Resizing small clips gains nothing from intra-op threads and loses a lot on a busy machine."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def errors_table(errors: list[ClipError] | list[dict]) -> pa.Table:
    rows = [e if isinstance(e, dict) else e.__dict__ for e in errors]
    return pa.Table.from_pylist([{k: r[k] for k in ERRORS_SCHEMA.names} for r in rows], schema=ERRORS_SCHEMA)


def write_errors(errors: list[ClipError] | list[dict] | pa.Table, out: str | os.PathLike) -> Path:
    """Writes the errors table (path, stage, error), one row per file; `out` a directory gets errors.parquet."""
    import pyarrow.parquet as pq

    table = errors if isinstance(errors, pa.Table) else errors_table(errors)
    seen, keep = set(), []
    for i, p in enumerate(table.column("path").to_pylist()):
        if p not in seen:
            seen.add(p)
            keep.append(i)
    table = table.take(pa.array(keep, pa.int64())) if len(keep) < table.num_rows else table
    out = Path(out)
    if out.suffix != ".parquet":
        out = out / ERRORS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def read_errors(path: str | os.PathLike) -> pa.Table:
    import pyarrow.parquet as pq

    p = Path(path)
    return pq.read_table(p / ERRORS_FILE if p.is_dir() else p)


# ----------------------------------------------------------------------------------------------------- Ray Data


class _ErrorLogActor:
    """Collects clip errors and per-epoch counts; holds the current epoch (set by the training loop)."""

    def __init__(self, total: int, max_fraction: float | None):
        self.total, self.max_fraction = total, max_fraction
        self.epoch = 0
        self.errors: list[tuple[int, str, str, str]] = []  # (epoch, path, stage, error)
        self.good: Counter = Counter()
        self.bad: Counter = Counter()
        self.seen: set[tuple[int, str]] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def get_epoch(self) -> int:
        return self.epoch

    def add(self, epoch: int, good: int, errors: list[tuple[str, str, str]]) -> str | None:
        """Records a batch's outcome; returns the TooManyErrors message once the epoch is over budget.

        A file is counted once per epoch number: a dataset re-read with a fixed epoch (validation every round)
        or a retried batch reports the same failures again, which must not add up to a false alarm."""
        self.good[epoch] += good
        for path, stage, msg in errors:
            if (epoch, path) in self.seen:
                continue
            self.seen.add((epoch, path))
            self.bad[epoch] += 1
            self.errors.append((epoch, path, stage, msg))
        if self.max_fraction is not None and self.bad[epoch] > error_budget(self.total, self.max_fraction):
            errs = [ClipError(p, s, m) for ep, p, s, m in self.errors if ep == epoch]
            return too_many_errors_message(errs, self.total, self.max_fraction, where=f" in epoch {epoch}")
        return None

    def get(self, epoch: int | None = None) -> list[dict]:
        return [{"epoch": ep, "path": p, "stage": s, "error": m} for ep, p, s, m in self.errors
                if epoch is None or ep == epoch]

    def counts(self) -> dict:
        return {"good": dict(self.good), "bad": dict(self.bad), "total_per_epoch": self.total}


class ErrorLog:
    """Driver-side handle on the error-collecting actor; picklable (pass it to the training loop).

    `set_epoch(e)`: the epoch the decode workers seed with when the dataset was built with `epoch=None`.
    `errors(epoch=None)`: list of {epoch, path, stage, error}; `write(dir)`: errors.parquet (path, stage, error,
    one row per file); `counts()`: good/bad clips per epoch.
    """

    def __init__(self, total: int, max_error_fraction: float | None = DEFAULT_MAX_ERROR_FRACTION):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the node of the process that creates it (the driver, or a Tune trial), as Ray Train pins its own
        # controller and dataset coordinator: the loss of another node never takes it (nor the epoch it holds),
        # and the loss of this one ends its owner anyway (the driver; a trial that Tune then restarts).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ray.remote(num_cpus=0, max_restarts=0)(_ErrorLogActor).options(
            scheduling_strategy=here).remote(total, max_error_fraction)
        self.total, self.max_error_fraction = total, max_error_fraction

    def set_epoch(self, epoch: int) -> None:
        import ray

        ray.get(self.actor.set_epoch.remote(epoch))

    def errors(self, epoch: int | None = None) -> list[dict]:
        import ray

        return ray.get(self.actor.get.remote(epoch))

    def counts(self) -> dict:
        import ray

        return ray.get(self.actor.counts.remote())

    def write(self, out: str | os.PathLike) -> Path:
        return write_errors(self.errors(), out)


class _CrashGuard:
    """Remembers, in a node-local file named after the batch, which video is being decoded. If a native decoder
    kills the process (segfault, abort), Ray retries the batch; the retry finds the file, reports that video as
    an error and skips it: one crashing file costs one retry, never an endless retry loop (Ray Data retries
    crashed tasks and restarts crashed actors forever by default).

    The file also names the Ray node: a file another node left (several Ray nodes on one host, or a node that
    restarted) means that node was lost with the batch, not that the video crashed a decoder; it is ignored."""

    def __init__(self, namespace: str):
        import tempfile

        self.dir = Path(tempfile.gettempdir()) / f"mone-inflight-{namespace}"
        self.file: Path | None = None
        self.node = _ray_node_id()

    def start(self, paths: list[str]) -> tuple[int, str] | None:
        """Opens the batch; returns (epoch, path) a previous attempt of this same batch died on, if any."""
        key = zlib.crc32("\n".join(paths).encode())
        self.file = self.dir / f"{key:08x}-{len(paths)}"
        try:
            epoch, node, path = self.file.read_text().split("\t", 2)
            return (int(epoch), path) if node == self.node else None
        except (OSError, ValueError):
            return None

    def begin(self, epoch: int, path: str) -> None:
        try:
            self.dir.mkdir(exist_ok=True)
            self.file.write_text(f"{epoch}\t{self.node}\t{path}")
        except OSError:  # a read-only /tmp only costs the guard
            pass

    def clear(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.unlink()


def _ray_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - no Ray here: one node
        return ""


CRASH_ERROR = "CrashError: the decoder process died while reading this file (native crash); skipped"
# Tests only: a path containing this marker kills the decode worker (exercises the crash guard).
_CRASH_MARKER = os.environ.get("MONE_TEST_CRASH_MARKER", "")


class ClipLoader:
    """Ray Data class UDF: a batch of manifest rows -> a batch of token clips (bad rows dropped and logged).

    Batch in: {"path": str, "label": int}. Batch out: {"tokens": uint8 (B, V, L, K), "label": int64 (B,),
    "path": str (B,)} (+ "error", "stage" with keep_errors)."""

    def __init__(self, spec: ClipSpec | dict, decoder: str = "auto", seed: int = 0, epoch: int | None = 0,
                 error_log: ErrorLog | None = None, keep_errors: bool = False, guard: str = "default"):
        self.spec = spec if isinstance(spec, ClipSpec) else ClipSpec(**spec)
        self.decoder, self.seed, self.fixed_epoch = decoder, seed, epoch
        self.log = error_log
        self.keep_errors = keep_errors
        self.guard = _CrashGuard(guard)
        self._threads_set = False

    def _epoch(self) -> int:
        if self.fixed_epoch is not None:
            return self.fixed_epoch
        if self.log is None:
            return 0
        import ray

        return ray.get(self.log.actor.get_epoch.remote())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = self._epoch()
        all_paths = [str(p) for p in batch["path"]]
        died_on = self.guard.start(all_paths)
        skip = {died_on[1]} if died_on else set()
        tokens, labels, paths, errs = [], [], [], []
        for path, label in zip(all_paths, batch["label"], strict=True):
            try:
                if path in skip:
                    raise _Crashed(CRASH_ERROR)
                self.guard.begin(epoch, path)
                if _CRASH_MARKER and _CRASH_MARKER in path:
                    os.abort()
                tokens.append(load_clip(path, self.spec, decoder=self.decoder, rng=clip_rng(self.seed, epoch, path)))
                labels.append(int(label))
                paths.append(path)
            except Exception as e:  # noqa: BLE001 - one bad file never stops the stream
                errs.append((path, stage_of(e), CRASH_ERROR if isinstance(e, _Crashed) else _error_text(e)))
                if self.keep_errors:
                    tokens.append(np.zeros(self.spec.tokens_shape, np.uint8))
                    labels.append(int(label))
                    paths.append(path)
            if not self._threads_set and "torch" in sys.modules:  # torch is imported lazily (resizes only)
                _single_thread_torch()  # one clip per CPU: parallelism comes from the worker pool
                self._threads_set = True
        self.guard.clear()
        if self.log is not None:
            import ray

            ref = self.log.actor.add.remote(epoch, len(paths) - (len(errs) if self.keep_errors else 0), errs)
            if errs:  # only wait when something failed (the budget check); otherwise fire and forget
                msg = ray.get(ref)
                if msg:
                    raise TooManyErrors(msg)
        out = {
            "tokens": np.stack(tokens) if tokens else np.zeros((0, *self.spec.tokens_shape), np.uint8),
            "label": np.asarray(labels, np.int64),
            "path": np.asarray(paths, dtype=object),
        }
        if self.keep_errors:
            bad = {p: (s, m) for p, s, m in errs}
            out["error"] = np.asarray([bad.get(p, ("", ""))[1] for p in paths], dtype=object)
            out["stage"] = np.asarray([bad.get(p, ("", ""))[0] for p in paths], dtype=object)
        return out


_LOADERS: dict[str, ClipLoader] = {}


def _load_clips_task(batch: dict[str, np.ndarray], *, key: str, loader_kwargs: dict) -> dict[str, np.ndarray]:
    """compute='tasks': runs the ClipLoader class inside pooled Ray worker processes. One instance per process
    and dataset, kept across tasks and epochs (the worker processes outlive an execution; actors do not)."""
    loader = _LOADERS.get(key)
    if loader is None:
        while len(_LOADERS) >= 4:  # datasets of the past (their error-log handles would stay alive)
            _LOADERS.pop(next(iter(_LOADERS)))
        loader = _LOADERS[key] = ClipLoader(**loader_kwargs)
    return loader(batch)


MAX_RETRIES = 8


def _actor_options() -> dict:
    return {"max_restarts": MAX_RETRIES, "max_task_retries": MAX_RETRIES}


def _task_options() -> dict:
    return {"max_retries": MAX_RETRIES}


class _Crashed(RuntimeError):
    stage = "decode"


def manifest_blocks(manifest: pa.Table, rows_per_block: int) -> list[pa.Table]:
    return [manifest.slice(i, rows_per_block) for i in range(0, manifest.num_rows, rows_per_block)] or [manifest]


def build_dataset(
    manifest: pa.Table,
    spec: ClipSpec,
    *,
    decoder: str = "auto",
    concurrency: int | tuple[int, int] | None = None,
    num_cpus_per_task: float = 1.0,
    seed: int = 0,
    epoch: int | None = 0,
    shuffle: bool | None = None,
    batch_size: int = 4,
    rows_per_block: int | None = None,
    error_log: ErrorLog | None = None,
    max_error_fraction: float | None = DEFAULT_MAX_ERROR_FRACTION,
    keep_errors: bool = False,
    compute: str = "tasks",
):
    """A streaming Ray Dataset of token clips: rows {tokens uint8 (V, L, K), label int64, path str}.

    manifest: the Arrow manifest (or a split of it). spec: ClipSpec. decoder: auto | decord | pyav.
    concurrency: decode actors, an int or (min, max) for autoscaling (default: (1, CPUs of the cluster)).
    num_cpus_per_task: CPUs each decode actor reserves (fractional is fine; leave room for Train workers).
    seed/epoch: randomness per clip from (seed, epoch, path); epoch=None -> read from `error_log.set_epoch`.
    shuffle (default spec.train): row order shuffled with (seed, epoch) here, block order re-randomised per
    execution. batch_size: clips per UDF call (small: 4-8, keeps blocks small and memory flat).
    rows_per_block: manifest rows per input block (default: batch_size, capped to ~2000 blocks).
    error_log: where errors go (default: a new ErrorLog; get it back with `error_log_of(ds)`).
    max_error_fraction: per-epoch failure budget (None: unlimited). keep_errors: keep bad rows (see module doc).
    compute: how the ClipLoader class UDF runs. "tasks" (default): in pooled Ray worker processes, one instance
    per process kept across tasks and epochs; "actors": a Ray Data actor pool (concurrency = (min, max) actors),
    which Ray starts afresh for every execution, i.e. every epoch (imports + start-up: 1-10 s per epoch on a
    busy 2-core machine; negligible on a real epoch, dominant on tiny ones).
    """
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    n = manifest.num_rows
    if n == 0:
        raise ValueError("the manifest is empty: no videos to load (check the split name and the dataset root)")
    missing = [c for c in ("path", "label") if c not in manifest.column_names]
    if missing:
        raise ValueError(f"manifest lacks columns {missing} (build it with pipeline.manifest.build_manifest)")
    error_log = error_log or ErrorLog(n, max_error_fraction)
    table = manifest.select(["path", "label"])
    do_shuffle = spec.train if shuffle is None else shuffle
    if do_shuffle:
        perm = np.random.default_rng([seed, epoch or 0, 1]).permutation(n)
        table = table.take(pa.array(perm))
    # Many small blocks so decoding spreads over every actor from the first second (one block = one task).
    rows_per_block = rows_per_block or max(batch_size, -(-n // 2000))
    ds = ray.data.from_arrow(manifest_blocks(table, rows_per_block))
    if do_shuffle:
        ds = ds.randomize_block_order()
    if concurrency is None:  # autoscale from 1 actor up to one per CPU of the cluster
        concurrency = (1, max(1, int(ray.cluster_resources().get("CPU", 1))))
    lo, hi = (concurrency, concurrency) if isinstance(concurrency, int) else concurrency
    loader_kwargs = {"spec": spec, "decoder": decoder, "seed": seed, "epoch": epoch, "error_log": error_log,
                     "keep_errors": keep_errors, "guard": uuid.uuid4().hex[:12]}
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args_fn (removal planned for 2.64) without a named parameter for retries
        # yet; without it the crash guard alone still guarantees progress.
        warnings.simplefilter("ignore", DeprecationWarning)
        if compute == "actors":
            ds = ds.map_batches(
                ClipLoader, fn_constructor_kwargs=loader_kwargs, batch_size=batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_cpus=num_cpus_per_task,
                ray_remote_args_fn=_actor_options,
            )
        elif compute == "tasks":
            ds = ds.map_batches(
                _load_clips_task, fn_kwargs={"key": loader_kwargs["guard"], "loader_kwargs": loader_kwargs},
                batch_size=batch_size, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=hi),
                num_cpus=num_cpus_per_task, ray_remote_args_fn=_task_options,
            )
        else:
            raise ValueError(f"compute={compute!r}: expected 'tasks' or 'actors'")
    ds._mone_error_log = error_log
    return ds


def error_log_of(ds) -> ErrorLog:
    """The ErrorLog `build_dataset` used for `ds` (only on the Dataset object it returned)."""
    log_ = getattr(ds, "_mone_error_log", None)
    if log_ is None:
        raise ValueError("this dataset was not returned by build_dataset (pass error_log= to keep a handle)")
    return log_


def split_errors(ds) -> tuple:
    """(good rows, error rows) of a `keep_errors=True` dataset. Materialises it (offline use only)."""
    m = ds.materialize()
    good = m.filter(lambda r: not r["error"]).drop_columns(["error", "stage"])
    bad = m.filter(lambda r: bool(r["error"])).select_columns(["path", "stage", "error"])
    return good, bad


def torch_collate(batch: dict[str, np.ndarray]) -> dict:
    """Batch of rows -> {"tokens": uint8 tensor (B, V, L, K), "label": int64 (B,), "path": list[str]}.
    (Ray's default conversion fails on the string column: use `TorchCollate()` as iter_torch_batches' collate_fn.)"""
    import torch

    tokens = np.require(batch["tokens"], requirements="W")  # Ray hands out read-only arrays; torch wants writable
    return {"tokens": torch.from_numpy(tokens), "label": torch.as_tensor(batch["label"], dtype=torch.int64),
            "path": [str(p) for p in batch["path"]]}


def __getattr__(name: str):
    # TorchCollate subclasses a ray.data class; importing ray.data costs seconds, so it is built on first use
    # (the decode workers import this module and never need it).
    if name == "TorchCollate":
        global TorchCollate
        TorchCollate = _make_torch_collate()
        return TorchCollate
    raise AttributeError(name)


def _make_torch_collate():
    try:
        from ray.data.collate_fn import NumpyBatchCollateFn as base
    except ImportError:  # older Ray: a plain callable works there
        base = object

    class TorchCollate(base):
        """`ds.iter_torch_batches(batch_size=B, collate_fn=TorchCollate())` -> dicts as `torch_collate` gives."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            return torch_collate(batch)

    TorchCollate.__module__, TorchCollate.__qualname__ = __name__, "TorchCollate"
    return TorchCollate
