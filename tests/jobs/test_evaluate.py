"""`mone evaluate`: budgets, archives, bad input (no Ray), then end to end on a synthetic archive with corrupt files
(one Ray instance for the module): predictions equal a direct in-process evaluation; a SIGKILLed run resumes to
the identical table."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_eval import assets  # noqa: E402

from jobs.evaluate import (  # noqa: E402
    EvaluateError,
    ec_for_gflops,
    flops_per_view,
    load_archive,
    read_budgets_file,
    resolve_budgets,
    run_evaluation,
)
from models.vit import get_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARGS = {"budget": "0.3,1.0", "views": "2x3", "batch_videos": 4, "save_scores": True}


@pytest.fixture(scope="module")
def archive_ckpt(tmp_path_factory):
    return assets(tmp_path_factory)


# ------------------------------------------------------------------------------------------------ no Ray


def test_budgets_from_ec_list_and_range():
    cfg = get_config("vivit_tiny")
    bs = resolve_budgets(cfg, 3, budget="1.0,0.2, 0.3")
    assert [b.key for b in bs] == ["0.2", "0.3", "1.0"]
    assert bs[-1].capacities == (0.0, 0.0, 0.0, 1.0)
    np.testing.assert_allclose(bs[1].capacities, [0.414, 0.321, 0.194, 0.071], atol=2e-3)  # MONE.md reference
    for bad in ("1.5", "0.1", "abc"):
        with pytest.raises(EvaluateError, match="--budget"):
            resolve_budgets(cfg, 3, budget=bad)
    with pytest.raises(EvaluateError, match="alternatives"):
        resolve_budgets(cfg, 3, budget="0.3", gflops="0.1")


def test_gflops_solves_for_ec_and_rejects_out_of_range():
    cfg = get_config("vivit_b16", num_frames=8, img_size=112)
    dense = flops_per_view(cfg, (0, 0, 0, 1), 10) / 1e9
    low = flops_per_view(cfg, (1, 0, 0, 0), 10) / 1e9
    # FLOPs are affine in e_c up to flooring token counts (N = 49 here): the middle of the range is e_c ~ 0.5625.
    assert ec_for_gflops(cfg, (low + dense) / 2, 10) == pytest.approx(0.5625, abs=0.02)
    for ec in (0.3, 0.6):
        target = flops_per_view(cfg, resolve_budgets(cfg, 10, budget=str(ec))[0].capacities, 10) / 1e9
        (b,) = resolve_budgets(cfg, 10, gflops=f"{target}")
        assert b.source == "gflops" and abs(b.e_c - ec) < 0.03
        assert flops_per_view(cfg, b.capacities, 10) / 1e9 == pytest.approx(target, rel=0.02)
    with pytest.raises(EvaluateError, match=r"outside this model's range \["):
        resolve_budgets(cfg, 10, gflops=f"{dense * 1.1}")
    with pytest.raises(EvaluateError, match="outside"):
        resolve_budgets(cfg, 10, gflops="0.001")


def test_budgets_file_formats(tmp_path):
    cfg = get_config("vivit_tiny")
    caps = [0.4, 0.3, 0.2, 0.1]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"0.3": caps, "model": "vivit_tiny", "0.5": [0.2, 0.2, 0.3, 0.3]}))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"budgets": {"0.3": {"capacities": caps, "top1": 0.5}}, "created": "now"}))
    assert [b.key for b in read_budgets_file(plain)] == ["0.3", "0.5"]
    (b,) = read_budgets_file(wrapped)
    assert b.capacities == tuple(caps) and b.e_c == 0.3 and b.source == "file"
    assert [b.key for b in resolve_budgets(cfg, 3, budget="0.5", budgets_file=str(plain))] == ["0.5"]
    with pytest.raises(EvaluateError, match=r"--budget 0.7 is not in --budgets .*0\.3, 0\.5"):
        resolve_budgets(cfg, 3, budget="0.7", budgets_file=str(plain))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0.3": [0.5, 0.5, 0.5, 0.5]}))
    with pytest.raises(EvaluateError, match="sum to 1"):
        read_budgets_file(bad)
    with pytest.raises(EvaluateError, match="no such file"):
        read_budgets_file(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(EvaluateError, match="no budgets found"):
        read_budgets_file(tmp_path / "empty.json")


def test_archives_folder_manifest_and_bad_input(archive_ckpt, tmp_path):
    archive, _ = archive_ckpt
    full = load_archive(archive)
    assert full.num_rows == 27 and full.column("path").to_pylist() == sorted(full.column("path").to_pylist())
    assert load_archive(archive, "validation").num_rows == 6  # alias of K400's "validate"
    # A plain folder of videos (no annotations): labels unknown.
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in full.column("path").to_pylist()[:3]:
        shutil.copy(p, flat / Path(p).name)
    t = load_archive(flat)
    assert t.num_rows == 3 and set(t.column("label").to_pylist()) == {-1}
    # A manifest parquet with only paths.
    pq.write_table(pa.table({"path": full.column("path").to_pylist()[:5]}), tmp_path / "m.parquet")
    assert load_archive(tmp_path / "m.parquet").num_rows == 5
    # Labels are mapped to the checkpoint's label map by name; unknown classes become -1.
    relabelled = load_archive(archive, labels=["moving up", "moving left"])
    names = relabelled.column("label_name").to_pylist()
    ids = relabelled.column("label").to_pylist()
    assert all(i == {"moving up": 0, "moving left": 1}.get(n, -1) for n, i in zip(names, ids, strict=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluateError, match="no videos found"):
        load_archive(tmp_path / "empty")
    with pytest.raises(EvaluateError, match="no such file or folder"):
        load_archive(tmp_path / "nope")
    with pytest.raises(EvaluateError, match="--split test2"):
        load_archive(archive, "test2")


def test_missing_checkpoint_is_a_clear_error(archive_ckpt, tmp_path):
    archive, _ = archive_ckpt
    with pytest.raises(EvaluateError, match=r"--checkpoint: checkpoint '.*nowhere' does not exist"):
        run_evaluation(tmp_path / "nowhere", archive, tmp_path / "p.parquet")
    (tmp_path / "run").mkdir()
    with pytest.raises(EvaluateError, match="no inference checkpoint under"):
        run_evaluation(tmp_path / "run", archive, tmp_path / "p.parquet")


# ------------------------------------------------------------------------------------------------ with Ray


@pytest.fixture(scope="module")
def uninterrupted(archive_ckpt, ray_cluster, tmp_path_factory):
    archive, ckpt = archive_ckpt
    out = tmp_path_factory.mktemp("eval") / "preds.parquet"
    summary = run_evaluation(ckpt.parent, archive, out, progress=False, **ARGS)
    return out, summary


def direct_predictions(ckpt_dir: Path, archive: Path, budgets, views=(2, 3)):
    """The same model and clips, in-process: pipeline.dataset.iter_clips + model.forward_tokens; views fused as
    VideoMAE does (each view's softmax, then the mean)."""
    import torch

    from jobs.checkpoint import load_inference
    from pipeline.dataset import iter_clips

    ckpt = load_inference(ckpt_dir)
    spec = ckpt.clip_spec(temporal_views=views[0], spatial_views=views[1])
    manifest = load_archive(archive, labels=ckpt.labels)
    errors: list = []
    preds = {}
    with torch.inference_mode():
        for item in iter_clips(manifest, spec, errors=errors, max_error_fraction=None):
            x = torch.from_numpy(item["tokens"])  # (V, L, K)
            for b in budgets:
                logits = ckpt.model.forward_tokens(x, budget=b.capacities)  # (V, C)
                preds[(item["path"], b.key)] = (torch.softmax(logits, -1).mean(0).numpy(), item["label"])
    return preds, {e.path for e in errors}


def test_evaluate_matches_direct_evaluation(uninterrupted, archive_ckpt):
    archive, ckpt = archive_ckpt
    out, summary = uninterrupted
    df = pd_read(out)
    budgets = resolve_budgets(get_config("vivit_tiny"), 3, budget=ARGS["budget"])
    preds, bad = direct_predictions(ckpt, archive, budgets)
    assert len(bad) == 3  # truncated, empty, garbage
    # Every video exactly once per budget; the corrupt ones as error rows.
    assert df.groupby(["path", "budget"]).size().eq(1).all()
    assert len(df) == 27 * len(budgets)
    assert set(df.loc[df.error.notna(), "path"]) == bad
    errs = df[df.error.notna()]
    assert (errs.gflops == 0).all() and (errs.views == 0).all() and errs.pred.isna().all()
    good = df[df.error.isna()]
    assert (good.views == 6).all()
    for row in good.itertuples():
        probs, label = preds[(row.path, row.budget)]
        top = np.argsort(-probs, kind="stable")[:3]
        assert list(row.top5) == list(top), row.path
        np.testing.assert_allclose(row.top5_probs, probs[top], rtol=1e-4, atol=1e-6)
        assert row.label == label
        # --save-scores: the whole fused score vector; it gives the reported prediction and top-5.
        np.testing.assert_allclose(row.scores, probs, rtol=1e-4, atol=1e-6)
        assert int(np.argmax(row.scores)) == row.pred and list(np.argsort(-row.scores, kind="stable")[:3]) == \
            list(row.top5)
    assert pq.read_schema(out).field("scores").type == pa.list_(pa.float32(), 3)  # fixed-size: C classes
    assert all(np.isnan(v).all() for v in errs.scores)  # unreadable: no scores (nulls, NaN in pandas)
    # Accuracy per budget = the direct one; report files next to the output.
    rep = json.loads(out.with_name("preds.report.json").read_text())
    for b in rep["budgets"]:
        direct = [int(np.argmax(p) == lab) for (path, key), (p, lab) in preds.items() if key == b["budget"]]
        assert b["videos"] == 24 and b["errors"] == 3
        assert b["top1"] == pytest.approx(np.mean(direct))
        assert summary["top1"][b["budget"]] == pytest.approx(np.mean(direct))
    per_class = pd_read(out.with_name("preds.per_class.parquet"))
    assert len(per_class) == 3 * len(budgets) and (per_class.videos == 8).all()
    # Mean-class accuracy: the mean of the per-class top-1 (8 videos in each of the 3 classes).
    for b in rep["budgets"]:
        direct = {}
        for (_, key), (p, lab) in preds.items():
            if key == b["budget"]:
                direct.setdefault(lab, []).append(int(np.argmax(p) == lab))
        assert b["mean_class"] == pytest.approx(np.mean([np.mean(v) for v in direct.values()]))
    # Confusion matrix per budget: sums to the number of readable labelled videos; its diagonal is the top-1 count.
    conf = pd_read(out.with_name("preds.confusion.parquet"))
    for b in rep["budgets"]:
        c = conf[conf.budget == b["budget"]]
        assert c["count"].sum() == 24 == b["videos"]
        assert c.loc[c.true_id == c.pred_id, "count"].sum() == round(b["top1"] * 24)
        assert out.with_name(f"preds.confusion_{b['budget']}.png").stat().st_size > 10_000
    assert summary["errors"] == 3 and summary["videos"] == 27
    assert summary["gflops_total"] == pytest.approx(df.gflops.sum(), rel=1e-6)
    # GFLOPs spent: e_c 0.3 costs less than dense, per view times 6 views.
    g = good.groupby("budget").gflops.first()
    assert g["0.3"] < 0.6 * g["1.0"]


def test_rerun_is_a_noop_and_a_different_run_is_refused(uninterrupted, archive_ckpt):
    archive, ckpt = archive_ckpt
    out, _ = uninterrupted
    before = pq.read_table(out)
    summary = run_evaluation(ckpt.parent, archive, out, progress=False, **ARGS)
    assert summary["videos_this_run"] == 0 and summary["resumed_videos"] == 27
    assert pq.read_table(out).equals(before)
    with pytest.raises(EvaluateError, match="--overwrite"):
        run_evaluation(ckpt.parent, archive, out, progress=False, **{**ARGS, "budget": "0.5"})


def test_killed_run_resumes_to_the_identical_table(uninterrupted, archive_ckpt, ray_cluster, tmp_path):
    archive, ckpt = archive_ckpt
    ref, _ = uninterrupted
    out = tmp_path / "preds.parquet"
    parts = tmp_path / "preds.parquet.parts"
    cmd = [sys.executable, "-m", "jobs.evaluate", "--checkpoint", str(ckpt.parent), "--videos", str(archive),
           "--budget", ARGS["budget"], "--views", ARGS["views"], "--batch-videos", str(ARGS["batch_videos"]),
           "--out", str(out), "--no-progress", "--save-scores"]
    # Connects to this module's Ray; the throttle (the driver waits 2 s after each part) makes the kill land midway.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled", "MONE_EVAL_THROTTLE_S": "2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 150
    try:
        while len(list(parts.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no parts written in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    written = sorted(parts.glob("part-*.parquet"))
    assert 2 <= len(written) < 7 and not out.exists()
    rows = [pq.read_table(f).num_rows for f in written]  # every part that exists is whole and readable
    assert all(n == 4 * 2 or f.name == "part-00006.parquet" for n, f in zip(rows, written, strict=True))
    summary = run_evaluation(ckpt.parent, archive, out, progress=False, **ARGS)
    assert summary["resumed_videos"] == sum(rows) // 2 and summary["videos_this_run"] == 27 - sum(rows) // 2
    assert pq.read_table(out).equals(pq.read_table(ref))
    assert json.loads(out.with_name("preds.report.json").read_text())["budgets"] == \
        json.loads(ref.with_name("preds.report.json").read_text())["budgets"]


def test_folder_without_labels(archive_ckpt, ray_cluster, tmp_path):
    archive, ckpt = archive_ckpt
    flat = tmp_path / "flat"
    flat.mkdir()
    paths = sorted(p for p in archive.rglob("*.mp4"))
    bad = next(p for p in paths if p.stat().st_size == 0)
    for p in [*paths[:3], bad]:
        shutil.copy(p, flat / p.name)
    out = tmp_path / "flat.parquet"
    summary = run_evaluation(ckpt, flat, out, budget="0.5", progress=False)
    df = pd_read(out)
    assert len(df) == 4 and (df.label == -1).all() and df.top1_correct.isna().all()
    assert df.error.notna().sum() == 1 and summary["errors"] == 1
    assert summary["report"] is None and not (tmp_path / "flat.report.json").exists()


def pd_read(path):
    import pandas as pd

    return pd.read_parquet(path)
