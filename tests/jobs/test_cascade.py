"""The compute cascade: cascade.json checks (no Ray), then `mone tune cascade` and `mone evaluate --cascade` on a
synthetic archive with corrupt files (one Ray instance for the module, its workers counting every decode): the
calibration's figures come from the per-level predictions; applied, each video is decoded once, answered by the
level the calibration's simulation says, with that level's exact prediction and the GFLOPs of every level it went
through; a cascade that sends everything on is the last fixed level."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import helpers_eval  # noqa: E402
from helpers_eval import assets  # noqa: E402

from jobs.cascade import read_cascade  # noqa: E402
from jobs.evaluate import EvaluateError, run_evaluation  # noqa: E402

LEVELS = [0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def archive_ckpt(tmp_path_factory):
    return assets(tmp_path_factory)


def write_cascade(path: Path, thresholds, kind="maxprob", levels=LEVELS) -> Path:
    from models.capacity import capacities_for_budget

    path.write_text(json.dumps({"confidence": kind, "levels": [
        {"e_c": e, "capacities": list(capacities_for_budget(e)), "threshold": t}
        for e, t in zip(levels, [*thresholds, None], strict=True)]}))
    return path


# ------------------------------------------------------------------------------------------------ no Ray


def test_cascade_file_is_checked(archive_ckpt, tmp_path):
    c = read_cascade(write_cascade(tmp_path / "c.json", [0.8, None]))
    assert [b.e_c for b in c.levels] == LEVELS and c.thresholds == (0.8, float("inf")) and c.confidence == "maxprob"
    assert read_cascade(write_cascade(tmp_path / "c.json", [0.8, 0.5])).to_json()["levels"][1]["threshold"] == 0.5
    with pytest.raises(EvaluateError, match="no such file"):
        read_cascade(tmp_path / "missing.json")
    with pytest.raises(EvaluateError, match="levels must grow in e_c"):
        read_cascade(write_cascade(tmp_path / "c.json", [0.8, 0.5], levels=[0.5, 0.25, 1.0]))
    with pytest.raises(EvaluateError, match="confidence 'entropy' is not one of maxprob, margin"):
        read_cascade(write_cascade(tmp_path / "c.json", [0.8, 0.5], kind="entropy"))
    with pytest.raises(EvaluateError, match="level 0: threshold -1.0 must be >= 0"):
        read_cascade(write_cascade(tmp_path / "c.json", [-1.0, 0.5]))
    doc = json.loads(write_cascade(tmp_path / "c.json", [0.8, 0.5]).read_text())
    doc["levels"][0]["e_c"] = 0.3
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(EvaluateError, match="level 0: e_c 0.3 does not match its capacities"):
        read_cascade(tmp_path / "bad.json")
    archive, ckpt = archive_ckpt
    with pytest.raises(EvaluateError, match="--cascade chooses the budget of each video; drop --budget"):
        run_evaluation(ckpt, archive, tmp_path / "p.parquet", budget="0.3", cascade=tmp_path / "c.json")


# ------------------------------------------------------------------------------------------------ with Ray


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray
    from ray import cloudpickle

    log = tmp_path_factory.mktemp("decodes") / "decodes.txt"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cloudpickle.register_pickle_by_value(helpers_eval)  # the hook travels by value: workers need not import it
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": helpers_eval.count_decodes,
                          "env_vars": {helpers_eval.DECODE_LOG_ENV: str(log)}})
    yield log
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(helpers_eval)


def decodes(log: Path) -> Counter:
    counts = Counter(log.read_text().splitlines()) if log.exists() else Counter()  # class folders have spaces
    log.write_text("")
    return counts


@pytest.fixture(scope="module")
def tuned(ray_cluster, archive_ckpt, tmp_path_factory):
    from jobs.cli import main

    archive, ckpt = archive_ckpt
    out = tmp_path_factory.mktemp("tune_cascade")
    argv = ["tune", "cascade", "--checkpoint", str(ckpt.parent), "--data", str(archive), "--split", "",
            "--levels", ",".join(map(str, LEVELS)), "--compare", "0.35", "--max-drop", "0", "--out", str(out),
            "--no-progress"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    decodes(ray_cluster)
    return out, summary


def test_tune_cascade_reports_held_out_figures_from_every_level(tuned):
    from jobs.cascade import level_scores
    from jobs.evaluate import resolve_budgets
    from models.budgets import confidence, run_cascade
    from models.vit import get_config
    from pipeline.manifest import read_manifest

    out, s = tuned
    doc = json.loads((out / "cascade.json").read_text())
    c = read_cascade(out / "cascade.json")
    assert [b.e_c for b in c.levels] == LEVELS and s["levels"] == LEVELS
    assert (out / "cascade.png").is_file()
    cal = read_manifest(out / "calibration_videos.parquet").to_pandas()
    held = read_manifest(out / "heldout_videos.parquet").to_pandas()
    assert not set(cal["path"]) & set(held["path"]) and len(cal) + len(held) == s["videos"] == 24  # 27 - 3 corrupt
    assert cal["label"].value_counts().to_dict() == held["label"].value_counts().to_dict() == {0: 4, 1: 4, 2: 4}

    # the held-out figures are what the cascade does on the per-level predictions of those videos
    budgets = resolve_budgets(get_config("vivit_tiny"), 3, budget="0.25,0.35,0.5,1.0")
    scores = level_scores(pq.read_table(out / "levels.parquet"), budgets)
    h = np.flatnonzero(np.isin(scores.paths, held["path"]))
    lv = [0, 2, 3]  # the levels among the four budgets
    conf = np.stack([confidence(scores.top_probs[h, i], c.confidence) for i in lv], 1)
    sim = run_cascade(conf, scores.correct[h][:, lv], scores.gflops[h][:, lv].mean(0), c.thresholds)
    assert s["cascade_top1"] == pytest.approx(sim.top1) and s["cascade_gflops"] == pytest.approx(sim.mean_cost)
    lo, hi = s["cascade_top1_ci"]
    assert lo <= s["cascade_top1"] <= hi
    assert doc["held_out"]["answered"] == [int((sim.level == i).sum()) for i in range(3)]
    fixed = {f["e_c"]: f for f in s["fixed"]}
    assert sorted(fixed) == [0.25, 0.35, 0.5, 1.0]
    for i, b in enumerate(budgets):
        assert fixed[b.e_c]["top1"] == pytest.approx(scores.correct[h, i].mean())
        assert fixed[b.e_c]["gflops"] == pytest.approx(scores.gflops[h, i].mean())
    # calibration kept top-1 at the last level's (--max-drop 0) on the calibration videos
    cal_fig = doc["calibration"]
    assert cal_fig["top1"] >= cal_fig["last_level_top1"] - 1e-9 and cal_fig["gflops"] <= cal_fig["last_level_gflops"]
    assert set(s["by_confidence"]) == {"maxprob", "margin"} and s["confidence"] in s["by_confidence"]


def test_evaluate_cascade_decodes_each_video_once_and_answers_as_calibrated(tuned, ray_cluster, archive_ckpt,
                                                                           tmp_path):
    from models.budgets import confidence

    archive, ckpt = archive_ckpt
    out, _ = tuned
    fixed = pd.read_parquet(out / "levels.parquet")
    fixed = fixed[fixed.budget.isin(["0.25", "0.5", "1.0"])]
    # thresholds at the median confidences: some videos answer at each level
    good = fixed[fixed.error.isna()]
    med = [float(np.median(confidence(np.stack(good[good.budget == k].top5_probs), "margin"))) for k in ("0.25", "0.5")]
    casc = write_cascade(tmp_path / "c.json", med, kind="margin")
    summary = run_evaluation(ckpt, archive, tmp_path / "c.parquet", cascade=casc, batch_videos=4, progress=False,
                             echo=lambda *a, **k: None)
    counts = decodes(ray_cluster)
    df = pd.read_parquet(tmp_path / "c.parquet")
    assert len(df) == 27 and (df.budget == "cascade").all() and df.path.is_unique
    assert set(counts) == set(df.path) and set(counts.values()) == {1}  # every video decoded once, corrupt ones too

    ok = df[df.error.isna()].set_index("path")
    assert ok.cascade_level.nunique() >= 2, ok.cascade_level.value_counts()
    keys = ["0.25", "0.5", "1.0"]
    per_level = {k: fixed[fixed.budget == k].set_index("path") for k in keys}
    for path, row in ok.iterrows():
        lv = int(row.cascade_level)
        # the levels before the answering one were unsure, the answering one sure (or last)
        for i in range(lv):
            assert confidence(np.asarray([per_level[keys[i]].loc[path, "top5_probs"]]), "margin")[0] < med[i]
        ref = per_level[keys[lv]].loc[path]
        assert list(row.top5) == list(ref.top5) and row.pred == ref.pred  # that level's own prediction
        np.testing.assert_allclose(row.top5_probs, ref.top5_probs, rtol=1e-5, atol=1e-6)
        assert row.e_c == float(keys[lv])
        spent = sum(per_level[keys[i]].loc[path, "gflops"] for i in range(lv + 1))
        assert row.gflops == pytest.approx(spent) and row.gflops_per_view == pytest.approx(spent / row.views)
    errs = df[df.error.notna()]
    assert len(errs) == 3 and (errs.gflops == 0).all() and errs.cascade_level.isna().all()
    assert summary["cascade"]["answered"] == [int((ok.cascade_level == i).sum()) for i in range(3)]
    assert summary["cascade"]["mean_gflops"] == pytest.approx(ok.gflops.mean())
    rep = json.loads(Path(summary["report"]).read_text())
    assert rep["budgets"][0]["budget"] == "cascade"
    assert rep["budgets"][0]["top1"] == pytest.approx(ok.top1_correct.mean())


def test_cascade_that_sends_everything_on_equals_the_last_fixed_level(tuned, ray_cluster, archive_ckpt, tmp_path):
    archive, ckpt = archive_ckpt
    out, _ = tuned
    casc = write_cascade(tmp_path / "c.json", [None, 1.5])  # null and above 1: neither cheap level is run
    # the same chunks of videos as the fixed run of `mone tune cascade` (default --batch-videos 8, sorted paths)
    run_evaluation(ckpt, archive, tmp_path / "c.parquet", cascade=casc, progress=False, echo=lambda *a, **k: None)
    assert set(decodes(ray_cluster).values()) == {1}
    got = pd.read_parquet(tmp_path / "c.parquet").set_index("path").sort_index()
    ref = pd.read_parquet(out / "levels.parquet").query("budget == '1.0'").set_index("path").sort_index()
    assert list(got.index) == list(ref.index)
    ok = got.error.isna()
    assert (got.cascade_level[ok] == 2).all() and ok.sum() == 24
    for col in ("pred", "top1_correct", "gflops", "gflops_per_view", "e_c", "views"):
        assert got[col][ok].equals(ref[col][ok]), col
    for col in ("top5", "top5_probs"):
        assert all(np.array_equal(a, b) for a, b in zip(got[col][ok], ref[col][ok], strict=True)), col
    assert (got.gflops[~ok] == 0).all() and (ref.gflops[~ok] == 0).all()  # unreadable: nothing spent
