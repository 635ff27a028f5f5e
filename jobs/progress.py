"""How a training run is paced: time blocked on the input pipeline (data-wait), step times, ETAs.

`RunPace` lives for a run on each worker; `RunPace.epoch(...)` gives an `EpochPace` that wraps the batch iterator:

    pace = RunPace(total_epochs=cfg.optim.epochs, start_epoch=start_epoch)
    ep = pace.epoch(epoch, steps_per_epoch)
    for batch in ep.wrap(batches):            # time inside next() = data-wait
        ...train step...
        print(..., ep.status())               # "data-wait 12% | ETA epoch 0:35, run 5:10"
        ep.warn_if_input_bound(print)         # once per epoch, when data-wait > 30 % of step time
    ...validation...
    pace.end_epoch()                          # the whole epoch (validation included) feeds the run ETA

A step's time runs from the end of the previous step to the end of this one, so it holds the wait for its batch
plus the compute on it; data-wait fraction = sum of waits / sum of step times. With several workers each measures
its own; a slow rank's wait shows on the others as compute (they wait for it in the gradient all-reduce).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

INPUT_BOUND_FRACTION = 0.30  # data-wait above this share of step time: the run is input-bound

INPUT_BOUND_HINT = (
    "the input pipeline is not keeping up. Knobs, cheapest first: give decoding more CPUs "
    "(data.decode_cpus per task, data.decode_concurrency tasks, or fewer scaling.cpus_per_worker), "
    "decode once for several clips (data.clips_per_video=2), or re-encode the archive to a small short side "
    "and short keyframe interval (`mone data prepare`)"
)


def format_duration(seconds: float | None) -> str:
    """0:35, 12:04, 3:02:10; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds + 0.5)  # half up
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class EpochPace:
    """Step and data-wait timing of one epoch (see the module doc)."""

    def __init__(self, run: RunPace, epoch: int, steps_per_epoch: int, clock: Callable[[], float] = time.perf_counter):
        self.run, self.epoch, self.steps_per_epoch, self.clock = run, epoch, max(1, steps_per_epoch), clock
        self.steps = 0
        self.wait_s = 0.0
        self.step_s = 0.0
        self.last_wait_s = 0.0
        self.warned = False
        self._t_last: float | None = None
        self.t_start = clock()

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yields the batches; times each wait for one and each step (until the next batch is asked for)."""
        it = iter(batches)
        while True:
            t0 = self.clock()
            if self._t_last is not None:  # the step in progress ended when its successor was asked for
                self.step_s += t0 - self._t_last
                self._t_last = None
            try:
                batch = next(it)
            except StopIteration:
                return
            t1 = self.clock()
            self.last_wait_s = t1 - t0
            self.wait_s += self.last_wait_s
            self.step_s += self.last_wait_s
            self._t_last = t1
            self.steps += 1
            yield batch

    @property
    def wait_fraction(self) -> float:
        """Data-wait / step time, the step in progress included."""
        busy = self.step_s + (self.clock() - self._t_last if self._t_last is not None else 0.0)
        return self.wait_s / busy if busy > 0 else 0.0

    @property
    def seconds_per_step(self) -> float | None:
        if not self.steps:
            return None
        return (self.clock() - self.t_start) / self.steps

    def eta_epoch_s(self) -> float | None:
        per = self.seconds_per_step
        return None if per is None else max(0, self.steps_per_epoch - self.steps) * per

    def eta_run_s(self) -> float | None:
        left = self.eta_epoch_s()
        if left is None:
            return None
        later = self.run.total_epochs - self.epoch - 1
        per_epoch = self.run.mean_epoch_s
        if per_epoch is None:  # first epoch: its training time so far, scaled up (validation not known yet)
            per_epoch = self.steps_per_epoch * (self.seconds_per_step or 0.0)
        return left + later * per_epoch

    def status(self) -> str:
        return (f"data-wait {100 * self.wait_fraction:.0f}% | ETA epoch {format_duration(self.eta_epoch_s())}, "
                f"run {format_duration(self.eta_run_s())}")

    def input_bound(self) -> bool:
        return self.wait_fraction > INPUT_BOUND_FRACTION

    def warn_if_input_bound(self, emit: Callable[[str], Any], *, min_steps: int = 5, force: bool = False) -> bool:
        """Emits the input-bound warning once per epoch, after `min_steps` steps (or at once with `force`, e.g.
        at the end of a short epoch). Returns whether it did now."""
        if self.warned or not (force or self.steps >= min_steps) or not self.steps or not self.input_bound():
            return False
        self.warned = True
        emit(f"[mone] WARNING epoch {self.epoch + 1}: data-wait is {100 * self.wait_fraction:.0f}% of step time "
             f"(> {100 * INPUT_BOUND_FRACTION:.0f}%): {INPUT_BOUND_HINT}")
        return True

    def summary(self) -> dict[str, float]:
        """Per-epoch figures for metrics.jsonl."""
        return {"data_wait_fraction": round(self.wait_fraction, 4), "data_wait_s": round(self.wait_s, 3),
                "train_steps": self.steps}


class RunPace:
    """Epoch durations (validation and checkpointing included) for the run's ETA."""

    def __init__(self, total_epochs: int, start_epoch: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.total_epochs, self.clock = total_epochs, clock
        self.epoch_s: list[float] = []
        self.current: EpochPace | None = None
        self.start_epoch = start_epoch

    def epoch(self, epoch: int, steps_per_epoch: int) -> EpochPace:
        self.current = EpochPace(self, epoch, steps_per_epoch, self.clock)
        return self.current

    def end_epoch(self) -> None:
        if self.current is not None:
            self.epoch_s.append(self.clock() - self.current.t_start)
            self.current = None

    @property
    def mean_epoch_s(self) -> float | None:
        return sum(self.epoch_s) / len(self.epoch_s) if self.epoch_s else None

    def eta_s(self) -> float | None:
        """Seconds left after the last finished epoch."""
        if not self.epoch_s:
            return None
        done = self.start_epoch + len(self.epoch_s)
        return max(0, self.total_epochs - done) * self.mean_epoch_s
