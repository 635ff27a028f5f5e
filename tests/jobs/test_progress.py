"""Data-wait and ETA bookkeeping of the training loop (jobs/progress.py), on a fake clock."""

import pytest

from jobs.progress import INPUT_BOUND_FRACTION, RunPace, format_duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _slow_input(clock, waits):
    """Batches whose arrival takes `waits[i]` seconds each."""
    for i, w in enumerate(waits):
        clock.t += w
        yield i


def test_data_wait_fraction_and_etas():
    clock = Clock()
    run = RunPace(total_epochs=3, clock=clock)
    ep = run.epoch(0, steps_per_epoch=4)
    for _ in ep.wrap(_slow_input(clock, [1.0, 1.0, 1.0, 1.0])):
        clock.t += 3.0  # compute
    assert ep.steps == 4 and ep.wait_s == pytest.approx(4.0)
    assert ep.wait_fraction == pytest.approx(4.0 / 16.0)  # 1 s of every 4 s step waited on data
    assert ep.summary()["data_wait_fraction"] == pytest.approx(0.25)
    clock.t += 4.0  # validation + checkpoint
    run.end_epoch()
    assert run.mean_epoch_s == pytest.approx(20.0) and run.eta_s() == pytest.approx(40.0)

    ep = run.epoch(1, steps_per_epoch=4)
    batches = ep.wrap(_slow_input(clock, [0.5] * 4))
    next(batches)  # step 1: 0.5 s wait
    clock.t += 1.5  # its compute
    next(batches)  # step 2 starts: 0.5 s wait -> 2 steps begun in 2.5 s
    assert ep.eta_epoch_s() == pytest.approx(2 * 1.25)  # 2 of 4 steps left at 1.25 s a step
    assert ep.eta_run_s() == pytest.approx(2 * 1.25 + 20.0)  # + one more epoch at the measured epoch time
    assert "data-wait" in ep.status() and "ETA epoch 0:03, run 0:23" in ep.status()


def test_input_bound_warning_once_per_epoch_names_the_knobs():
    clock = Clock()
    run = RunPace(total_epochs=2, clock=clock)
    said = []
    for epoch in range(2):
        ep = run.epoch(epoch, steps_per_epoch=8)
        for _ in ep.wrap(_slow_input(clock, [2.0] * 8)):
            clock.t += 1.0  # 2/3 of each step is data-wait
            ep.warn_if_input_bound(said.append)
        ep.warn_if_input_bound(said.append, force=True)
        run.end_epoch()
    assert len(said) == 2  # once per epoch, not once per step
    msg = said[0]
    assert "epoch 1" in msg and "67%" in msg and f"{100 * INPUT_BOUND_FRACTION:.0f}%" in msg
    for knob in ("data.decode_cpus", "data.clips_per_video", "mone data prepare"):
        assert knob in msg


def test_fed_run_does_not_warn_and_short_epochs_warn_at_the_end():
    clock = Clock()
    ep = RunPace(total_epochs=1, clock=clock).epoch(0, steps_per_epoch=3)
    said = []
    for _ in ep.wrap(_slow_input(clock, [0.01] * 3)):
        clock.t += 1.0
        assert not ep.warn_if_input_bound(said.append)
    assert not ep.warn_if_input_bound(said.append, force=True) and not said
    ep = RunPace(total_epochs=1, clock=clock).epoch(0, steps_per_epoch=2)
    for _ in ep.wrap(_slow_input(clock, [5.0] * 2)):
        assert not ep.warn_if_input_bound(said.append)  # too few steps to judge mid-epoch
    assert ep.warn_if_input_bound(said.append, force=True) and len(said) == 1


def test_format_duration():
    assert [format_duration(s) for s in (None, float("nan"), 5, 65, 3725)] == ["?", "?", "0:05", "1:05", "1:02:05"]
