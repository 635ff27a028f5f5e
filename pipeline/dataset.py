"""From a manifest to streams of uint8 token clips: Ray Data for training, a plain iterator for everything else.

One function does the work for both (`load_clips`): decode (reduced size) -> sample -> transform -> tokenize,
giving `tokens` uint8 `(V, L, K)` per clip (docs/interfaces.md); with `clips_per_video` k > 1 one decode feeds k
clips, each with its own crop/flip (repeated sampling, VideoMAE's num_sample).

Ray Data (`build_dataset`)::

    chunks of the epoch's order (start, stop; one tiny block each, a few hundred whatever the archive's size)
      --map_batches(ClipLoader: a generator class UDF in a task pool (default) or an actor pool, num_cpus
        fractional)--> one block of `batch_size` videos x k clips at a time, streamed out of each task
      --> ray.train.get_dataset_shard(...).iter_torch_batches(collate_fn=TorchCollate())

Where the CPU goes and why it is built so (benchmarks/pipeline_speed.py measures it by stage): decoding is nearly
all of it; Ray's own cost is per task, per block and per second of wall time (its processes poll), not per byte
(the uint8 tokens go to Arrow and the object store without a per-row conversion). So a task works through many
videos (`videos_per_task`, up to 64) but still emits a block every `batch_size` videos, and an epoch needs no
all-to-all shuffle: each task computes the epoch's permutation itself from (seed, epoch) and the manifest (put in
the object store once, read once per worker process).

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
the workers read it. Order: each epoch visits the videos in a permutation seeded with (seed, epoch) (`epoch_order`,
the same as `iter_clips`); blocks arrive in roughly that order (tasks run in parallel).

Resources (STACK.md deadlock 1): with Train workers holding CPUs, Ray Data needs some left. `num_cpus_per_task`
may be fractional (e.g. 0.25) and `concurrency` bounds the concurrent decode tasks (or actors); the defaults
(up to one task per cluster CPU) fit a 2-CPU machine and work unchanged on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
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
DEFAULT_UDF_BATCH = 4  # videos per decode task


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
    return load_clips(path, spec, decoder=decoder, rng=rng)[0]


def load_clips(path: str, spec: ClipSpec, *, decoder: str = "auto", rng: np.random.Generator | None = None,
               clips_per_video: int = 1, clock: StageClock | None = None) -> np.ndarray:
    """One decode, `clips_per_video` clips: uint8 tokens (k, V, L, K).

    Repeated sampling (VideoMAE's `num_sample`): the frames are sampled and decoded once, then each of the k clips
    gets its own spatial transform (crop, flip, ...) drawn from `rng` in turn, so clip j is a function of
    (rng's seed, j) alone. k = 1 draws exactly what `load_clip` always drew. `clock` accumulates CPU seconds by stage.
    """
    clock = clock or StageClock()

    def indices(n: int, fps: float) -> np.ndarray:
        with _stage("sample"):
            return sample_indices(n, spec, rng)  # (Vt, T)

    with clock("decode"):
        frames, _ = read_frames(path, indices, decoder=decoder, short_side=spec.short_side)  # (Vt, T, h, w, 3)
    out = np.empty((clips_per_video, *spec.tokens_shape), np.uint8)  # (k, V, L, K)
    for j in range(clips_per_video):
        with clock("transform"), _stage("transform"):
            views = [v for clip in frames for v in spatial_views(clip, spec, rng)]  # V x (T, crop, crop, 3)
            clips = np.stack(views)  # (V, T, crop, crop, 3)
        with clock("tokenize"), _stage("tokenize"):
            out[j] = tubelet_patchify(clips, spec.tubelet_t, spec.patch)  # (V, L, K)
    return out


class StageClock:
    """CPU seconds per pipeline stage, summed over calls (`with clock("decode"): ...`).

    decode is timed as process CPU (decord converts frames on a thread of its own, so the caller's thread time
    misses most of it); the numpy stages as the calling thread's CPU."""

    PROCESS_STAGES = ("decode",)

    def __init__(self):
        self.seconds: Counter = Counter()
        self._name = ""
        self._t0 = 0.0

    def __call__(self, name: str) -> StageClock:
        self._name = name
        return self

    def _now(self) -> float:
        return time.process_time() if self._name in self.PROCESS_STAGES else time.thread_time()

    def __enter__(self):
        self._t0 = self._now()
        return self

    def __exit__(self, *exc):
        self.seconds[self._name] += self._now() - self._t0
        return False


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
    order = epoch_order(len(paths), seed, epoch, spec.train if shuffle is None else shuffle)
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
    """The decode UDF of `build_dataset` (Ray Data, class UDF): chunks of an epoch's video order -> token clips.

    Batch in: rows {"start", "stop"}: positions in the epoch's order of the manifest (a permutation seeded with
    (seed, epoch) when shuffling, else manifest order), which each worker computes itself from the manifest (one
    object-store copy, read once per process) and the epoch (from the error log when `epoch=None`). Out: one batch
    per `batch_size` videos (a generator: blocks stream out of a long task as they are decoded):
    {"tokens": uint8 (b*k, V, L, K), "label": int64 (b*k,), "path": str (b*k,)}, k = clips_per_video rows per good
    video; bad videos dropped and logged (+ "error", "stage" columns with keep_errors; + "cpu_s" float64 (b*k, 4)
    with profile: CPU seconds per row in decode, sample/transform, tokenize and the whole UDF call, a video's cost
    shared by its k rows)."""

    def __init__(self, spec: ClipSpec | dict, manifest, decoder: str = "auto", seed: int = 0,
                 epoch: int | None = 0, shuffle: bool = False, batch_size: int = DEFAULT_UDF_BATCH,
                 error_log: ErrorLog | None = None, keep_errors: bool = False, guard: str = "default",
                 clips_per_video: int = 1, profile: bool = False):
        self.spec = spec if isinstance(spec, ClipSpec) else ClipSpec(**spec)
        self.manifest = manifest  # pa.Table (path, label) or an ObjectRef to one
        self.decoder, self.seed, self.fixed_epoch, self.shuffle = decoder, seed, epoch, shuffle
        self.batch_size = batch_size
        self.log = error_log
        self.keep_errors = keep_errors
        self.guard = _CrashGuard(guard)
        self.k = int(clips_per_video)
        self.profile = profile
        self._threads_set = False
        self._rows: tuple[list[str], np.ndarray] | None = None
        self._unreported_good = 0  # good videos not yet counted in the error log (sent once per chunk)
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch(self) -> int:
        if self.fixed_epoch is not None:
            return self.fixed_epoch
        if self.log is None:
            return 0
        import ray

        return ray.get(self.log.actor.get_epoch.remote())

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._rows is None:
            table = self.manifest
            if not isinstance(table, pa.Table):
                import ray

                table = ray.get(table)
            self._rows = (table.column("path").to_pylist(), table.column("label").to_numpy().astype(np.int64))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self._rows[0]), self.seed, epoch, self.shuffle))
        return self._order[1]

    def __call__(self, chunks: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        epoch = self._epoch()
        order = self._epoch_order(epoch)
        paths, labels = self._rows
        for start, stop in zip(chunks["start"], chunks["stop"], strict=True):
            rows = order[int(start):int(stop)]
            for i in range(0, len(rows), self.batch_size):
                sub = rows[i:i + self.batch_size]
                yield self.decode_batch([paths[j] for j in sub], labels[sub], epoch)
        if self.log is not None and self._unreported_good:
            self.log.actor.add.remote(epoch, self._unreported_good, [])  # fire and forget
        self._unreported_good = 0

    def decode_batch(self, all_paths: list[str], all_labels, epoch: int) -> dict[str, np.ndarray]:
        """Videos -> their clips (bad ones dropped and logged; see the class doc for the columns)."""
        t_call = time.process_time()
        died_on = self.guard.start(all_paths)
        skip = {died_on[1]} if died_on else set()
        k = self.k
        tokens = np.empty((len(all_paths) * k, *self.spec.tokens_shape), np.uint8)  # (B*k, V, L, K), filled in place
        labels, paths, errs, costs = [], [], [], []
        for path, label in zip(all_paths, all_labels, strict=True):
            clock = StageClock()
            try:
                if path in skip:
                    raise _Crashed(CRASH_ERROR)
                self.guard.begin(epoch, path)
                if _CRASH_MARKER and _CRASH_MARKER in path:
                    os.abort()
                clips = load_clips(path, self.spec, decoder=self.decoder, rng=clip_rng(self.seed, epoch, path),
                                   clips_per_video=k, clock=clock)  # (k, V, L, K)
                tokens[len(labels):len(labels) + k] = clips
            except Exception as e:  # noqa: BLE001 - one bad file never stops the stream
                errs.append((path, stage_of(e), CRASH_ERROR if isinstance(e, _Crashed) else _error_text(e)))
                if not self.keep_errors:
                    continue
                tokens[len(labels):len(labels) + k] = 0
            labels += [int(label)] * k
            paths += [path] * k
            costs += [[clock.seconds[s] / k for s in ("decode", "transform", "tokenize")]] * k
            if not self._threads_set and "torch" in sys.modules:  # torch is imported lazily (resizes only)
                _single_thread_torch()  # one clip per CPU: parallelism comes from the worker pool
                self._threads_set = True
        self.guard.clear()
        if self.log is not None:
            import ray

            good = len(paths) // k - (len(errs) if self.keep_errors else 0)
            if errs:  # report now and wait: the budget check may stop the run
                msg = ray.get(self.log.actor.add.remote(epoch, good + self._unreported_good, errs))
                self._unreported_good = 0
                if msg:
                    raise TooManyErrors(msg)
            else:  # counted when `__call__` ends the chunk (one call per task, not one per block)
                self._unreported_good += good
        out = {
            "tokens": tokens[:len(labels)],
            "label": np.asarray(labels, np.int64),
            "path": np.asarray(paths, dtype=object),
        }
        if self.keep_errors:
            bad = {p: (s, m) for p, s, m in errs}
            out["error"] = np.asarray([bad.get(p, ("", ""))[1] for p in paths], dtype=object)
            out["stage"] = np.asarray([bad.get(p, ("", ""))[0] for p in paths], dtype=object)
        if self.profile:
            call = (time.process_time() - t_call) / max(1, len(labels))
            out["cpu_s"] = np.asarray([[*c, call] for c in costs], np.float64).reshape(-1, 4)  # (B*k, 4)
        return out


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order an epoch visits the manifest's rows in: a permutation seeded with (seed, epoch), or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 1]).permutation(n)


_LOADERS: dict[str, ClipLoader] = {}


def _load_clips_task(chunks: dict[str, np.ndarray], *, key: str, loader_kwargs: dict) -> Iterator[dict]:
    """compute='tasks': runs the ClipLoader class inside pooled Ray worker processes. One instance per process
    and dataset, kept across tasks and epochs (the worker processes outlive an execution; actors do not)."""
    loader = _LOADERS.get(key)
    if loader is None:
        while len(_LOADERS) >= 4:  # datasets of the past (their error-log handles would stay alive)
            _LOADERS.pop(next(iter(_LOADERS)))
        loader = _LOADERS[key] = ClipLoader(**loader_kwargs)
    yield from loader(chunks)


class _Crashed(RuntimeError):
    stage = "decode"


def default_videos_per_task(n: int, slots: int, batch_size: int) -> int:
    """Videos per decode task: large enough that Ray's per-task cost is spread thin (up to 64 videos), small
    enough that every decode slot gets about 4 tasks an epoch (an even finish), a multiple of batch_size."""
    per = min(64, max(batch_size, -(-n // (4 * max(1, slots)))))
    return -(-per // batch_size) * batch_size


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
    batch_size: int = DEFAULT_UDF_BATCH,
    videos_per_task: int | None = None,
    error_log: ErrorLog | None = None,
    max_error_fraction: float | None = DEFAULT_MAX_ERROR_FRACTION,
    keep_errors: bool = False,
    compute: str = "tasks",
    clips_per_video: int = 1,
    profile: bool = False,
):
    """A streaming Ray Dataset of token clips: rows {tokens uint8 (V, L, K), label int64, path str}.

    manifest: the Arrow manifest (or a split of it). spec: ClipSpec. decoder: auto | decord | pyav.
    concurrency: decode tasks (or actors) at once, an int or (min, max) (default: (1, CPUs of the cluster)).
    num_cpus_per_task: CPUs each decode task reserves (fractional is fine; leave room for Train workers).
    seed/epoch: randomness per clip from (seed, epoch, path); epoch=None -> read from `error_log.set_epoch`.
    shuffle (default spec.train): each epoch visits the videos in a permutation seeded with (seed, epoch).
    batch_size: videos per output block (4: the first batch of an epoch arrives after a few decodes).
    videos_per_task: videos one decode task works through, streaming a block every `batch_size` (default:
    `default_videos_per_task`). clips_per_video: k clips per decode (repeated sampling, see `load_clips`): k rows
    per video, so an epoch has k x videos rows.
    error_log: where errors go (default: a new ErrorLog; get it back with `error_log_of(ds)`).
    max_error_fraction: per-epoch failure budget (None: unlimited). keep_errors: keep bad rows (see module doc).
    compute: how the ClipLoader class UDF runs. "tasks" (default): in pooled Ray worker processes, one instance
    per process kept across tasks and epochs; "actors": a Ray Data actor pool (concurrency = (min, max) actors),
    which Ray starts afresh for every execution, i.e. every epoch (imports + start-up: 1-10 s per epoch on a
    busy 2-core machine; negligible on a real epoch, dominant on tiny ones).
    profile: add a "cpu_s" column (CPU seconds by stage, see ClipLoader; benchmarks/pipeline_speed.py).
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
    if clips_per_video < 1 or batch_size < 1:
        raise ValueError(f"clips_per_video={clips_per_video} and batch_size={batch_size} must be >= 1")
    error_log = error_log or ErrorLog(n, max_error_fraction)
    if concurrency is None:  # from 1 task up to one per CPU of the cluster
        concurrency = (1, max(1, int(ray.cluster_resources().get("CPU", 1))))
    lo, hi = (concurrency, concurrency) if isinstance(concurrency, int) else concurrency
    per_task = videos_per_task or default_videos_per_task(n, hi, batch_size)
    # The input is only the epoch's chunks (start, stop), one block each: an execution (an epoch) plans a few
    # hundred tiny blocks, whatever the archive's size, and needs no all-to-all shuffle before the first clip.
    starts = np.arange(0, n, per_task)
    # from_items, not from_arrow: from_arrow computes block metadata in Ray tasks of 1 whole CPU each, which never
    # start on a cluster where no node has a whole CPU free (1-CPU nodes each holding a Tune trial's 0.01 CPU:
    # a Tune experiment hung for good after a node loss). from_items does it here, in this process.
    chunks = [{"start": int(a), "stop": int(min(a + per_task, n))} for a in starts]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    loader_kwargs = {"spec": spec, "manifest": ray.put(manifest.select(["path", "label"])), "decoder": decoder,
                     "seed": seed, "epoch": epoch, "shuffle": spec.train if shuffle is None else shuffle,
                     "batch_size": batch_size, "error_log": error_log, "keep_errors": keep_errors,
                     "guard": uuid.uuid4().hex[:12], "clips_per_video": clips_per_video, "profile": profile}
    # Retries are Ray Data's defaults (a crashed task is retried, a crashed actor restarted, without limit; Ray
    # 2.60 deprecates setting them through ray_remote_args(_fn) and names no successor): the crash guard turns a
    # video that kills its decoder into one retry and an error row, so the stream always moves on.
    if compute == "actors":
        ds = ds.map_batches(
            ClipLoader, fn_constructor_kwargs=loader_kwargs, batch_size=None, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_cpus=num_cpus_per_task,
        )
    elif compute == "tasks":
        ds = ds.map_batches(
            _load_clips_task, fn_kwargs={"key": loader_kwargs["guard"], "loader_kwargs": loader_kwargs},
            batch_size=None, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=hi),
            num_cpus=num_cpus_per_task,
        )
    else:
        raise ValueError(f"compute={compute!r}: expected 'tasks' or 'actors'")
    # One block per decoded batch (Ray would otherwise pack a task's whole output into blocks of up to 128 MiB,
    # and nothing of a task would reach the trainer before its last video).
    block_bytes = batch_size * clips_per_video * int(np.prod(spec.tokens_shape))
    ds.context.target_max_block_size = max(1 << 20, block_bytes)
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
    label = np.asarray(batch["label"], dtype=np.int64)  # from_numpy: CPU whatever torch's default device is
    return {"tokens": torch.from_numpy(tokens), "label": torch.from_numpy(label),
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
        """`ds.iter_torch_batches(batch_size=B, collate_fn=TorchCollate())` -> dicts as `torch_collate` gives.
        `pin=True` (a CUDA loop) puts the tensors in page-locked memory in Ray's prefetch threads, so the loop's
        `.to(device, non_blocking=True)` is an asynchronous copy (Ray pins only all-tensor batches; ours carry
        the paths too)."""

        def __init__(self, pin: bool = False) -> None:
            self.pin = pin

        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            out = torch_collate(batch)
            if self.pin:
                out["tokens"], out["label"] = out["tokens"].pin_memory(), out["label"].pin_memory()
            return out

    TorchCollate.__module__, TorchCollate.__qualname__ = __name__, "TorchCollate"
    return TorchCollate
