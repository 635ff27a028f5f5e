"""`mone tune`: trial capacities, the budget search on a tiny trained checkpoint (a held-out report part,
frontier, FLOPs, intervals, budgets.json through `mone evaluate --budgets`), and a 2-trial training search with ASHA
on CPU (+ resume)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jobs.tune import TuneError, load_search_space, trial_capacities
from models.capacity import capacities_for_budget, effective_capacity

ROOT = Path(__file__).resolve().parents[2]
CLIP = {"num_frames": 8, "sampling": "segment", "stride": 2, "short_side": 64, "crop_size": 64, "tubelet_t": 2,
        "patch": 8, "train": False, "flip": False, "temporal_views": 1, "spatial_views": 1}


# --------------------------------------------------------------------------- no Ray


def test_trial_capacities_of_both_spaces():
    cfg = {"e_c": 0.3, "space": "heuristic", "delta": 2.0, "beta": 10.0, "v0": 0.1, "v1": 0.2, "v2": 0.3, "v3": 0.4}
    assert trial_capacities(cfg) == pytest.approx(capacities_for_budget(0.3))
    assert effective_capacity(trial_capacities({**cfg, "space": "simplex"})) == pytest.approx(0.3)


def test_search_space_yaml(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("optim.lr: {loguniform: [1.0e-4, 3.0e-3]}\nmone.delta: {choice: [1.5, 2.0]}\noptim.epochs: 2\n")
    assert load_search_space(p) == {"optim.lr": {"loguniform": [1e-4, 3e-3]}, "mone.delta": {"choice": [1.5, 2.0]},
                                    "optim.epochs": {"value": 2}}
    p.write_text("optim.lr: {logunifrom: [1.0e-4, 3.0e-3]}\n")
    with pytest.raises(TuneError, match="expected one of loguniform"):
        load_search_space(p)
    assert load_search_space("tiny_cpu")  # the shipped default space
    from jobs.tune import _check_space_against_config

    with pytest.raises(TuneError, match="unknown config key 'optim.lrr'"):
        _check_space_against_config("tiny_cpu", [], {"optim.lrr": {"uniform": [0.1, 0.2]}})


# --------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """vivit_tiny trained ~24 steps on a 4-class synthetic SSv2 archive; inference.json records the dataset."""
    import torch

    from jobs.checkpoint import save_inference
    from jobs.tune import decode_split
    from models.vit import create_model
    from pipeline.manifest import build_manifest, select_split
    from pipeline.sampling import ClipSpec
    from pipeline.synth import generate

    base = tmp_path_factory.mktemp("tune_budgets")
    root = base / "data"
    generate(root, layout="ssv2", classes=4, videos_per_class=4, val_videos_per_class=4, test_videos_per_class=0,
             width=64, height=64, frames=8, seed=1, progress=False, workers=1)
    m = build_manifest(root, "ssv2")
    x, y, _ = decode_split(select_split(m.table, "train"), ClipSpec(**{**CLIP, "train": False}))
    x = torch.from_numpy(x[:, 0])  # (N, L, K)
    y = torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=4, img_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(24):
        idx = torch.from_numpy(rng.choice(len(x), size=8, replace=False))
        loss = torch.nn.functional.cross_entropy(
            model.forward_tokens(x[idx], budget=float(rng.choice([0.2, 0.3, 0.5, 1.0]))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    ckpt = save_inference(base / "run" / "inference", model.state_dict(), variant="vivit_tiny", num_classes=4,
                          labels=list(m.labels), clip=CLIP, overrides={"img_size": 64},
                          extra={"data": {"root": str(root)}, "train_budgets": [0.2, 0.3, 0.5, 1.0]})
    return ckpt, root


def test_budget_search_holds_out_a_report_part(ray_cluster, tiny_ckpt, tmp_path, capsys, monkeypatch):
    import pandas as pd

    from jobs.cli import main
    from jobs.evaluate import read_budgets_file, run_evaluation
    from models.flops import model_flops
    from models.vit import create_model
    from pipeline.manifest import read_manifest

    ckpt, root = tiny_ckpt
    # the CLI (in-process: the module's Ray); no --data: the dataset recorded in inference.json is used; a relative
    # --checkpoint (trials run in other working directories)
    monkeypatch.chdir(ckpt.parent.parent)
    assert main(["tune", "budgets", "--checkpoint", ckpt.parent.name, "--budgets", "0.2,0.3", "--trials", "6",
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "heuristic top-1" in printed and "report part: 8 held-out clips" in printed
    summary = json.loads(printed.strip().splitlines()[-1])  # the final JSON line
    out = Path(summary["out"])
    for key in ("frontier", "budgets", "plot", "trials_table", "report_videos"):
        assert Path(summary[key]).is_file(), key
    assert summary["trials"] == 6 and summary["clips"] == 16
    assert summary["search_clips"] == summary["report_clips"] == 8  # --report-fraction 0.5 of 4 clips per class

    # the two parts: disjoint, half of every class each
    search = read_manifest(out / "search_videos.parquet").to_pandas()
    report = read_manifest(out / "report_videos.parquet").to_pandas()
    assert not set(search["path"]) & set(report["path"])
    assert search["label"].value_counts().to_dict() == report["label"].value_counts().to_dict() == {
        c: 2 for c in range(4)}

    cfg = create_model("vivit_tiny", num_classes=4, img_size=64).cfg
    trials = pd.read_parquet(out / "trials.parquet")
    frontier = pd.read_parquet(out / "frontier.parquet")
    assert set(frontier["source"]) == {"tuned", "heuristic", "dense"}
    for df in (trials, frontier):
        for row in df.itertuples():
            assert row.gflops == pytest.approx(model_flops(cfg, capacities=tuple(row.capacities)) / 1e9, rel=1e-9)
            assert effective_capacity(row.capacities) == pytest.approx(row.e_c, abs=1e-6)
    assert (trials["e_c"] - trials["e_c_target"]).abs().max() < 1e-6
    # frontier rows carry report-part figures inside their interval; the front was picked on the search part
    assert ((frontier["top1_low"] <= frontier["top1"]) & (frontier["top1"] <= frontier["top1_high"])).all()
    assert (frontier["top1"] * 8).round(9).mod(1).eq(0).all()  # a share of the 8 report clips
    front = frontier[frontier["source"] == "tuned"]
    assert len(front) >= 1 and front["on_front"].all()
    for f in front.itertuples():
        assert not ((trials["top1_search"] >= f.top1_search) & (trials["gflops"] <= f.gflops)
                    & ((trials["top1_search"] > f.top1_search) | (trials["gflops"] < f.gflops))).any()
    for t in trials[~trials["on_front"]].itertuples():
        assert ((front["top1_search"] >= t.top1_search) & (front["gflops"] <= t.gflops)).any()
    heur = frontier[frontier["source"] == "heuristic"].set_index("e_c_target")
    assert list(heur.loc[0.3, "capacities"]) == pytest.approx(capacities_for_budget(0.3))

    # budgets.json: chosen on the search part (best top-1 within each target, never below the seeded heuristic
    # there), reported on the report part with intervals, the paired difference and its verdict
    doc = json.loads((out / "budgets.json").read_text())
    assert set(doc["budgets"]) == {"0.2", "0.3"} and doc["report_clips"] == 8
    for tgt in summary["targets"]:
        assert tgt["tuned_top1_search"] >= tgt["heuristic_top1_search"]
        entry = doc["budgets"][f"{tgt['e_c']:g}"]
        assert entry["e_c"] <= tgt["e_c"] + 1e-6
        assert entry["top1_search"] == trials[trials["e_c"] <= tgt["e_c"] + 1e-6]["top1_search"].max()
        assert entry["top1_low"] <= entry["top1"] <= entry["top1_high"]
        assert entry["diff_top1"] == pytest.approx(entry["top1"] - entry["heuristic"]["top1"])
        assert entry["diff_top1_low"] <= entry["diff_top1"] <= entry["diff_top1_high"]
        beats = entry["diff_top1_low"] > 0
        assert (entry["verdict"] == f"tuned beats heuristic at e_c {tgt['e_c']:g}") == beats
        if entry["diff_top1_low"] <= 0 <= entry["diff_top1_high"]:
            assert entry["verdict"].startswith(f"no difference shown at e_c {tgt['e_c']:g}")
        assert entry["verdict"] in printed

    # ... and round-trips into `mone evaluate --budgets` on the report part: same capacities, same accuracy
    table = read_budgets_file(out / "budgets.json")
    assert [b.e_c for b in table] == [0.2, 0.3]
    for b in table:
        assert list(b.capacities) == pytest.approx(doc["budgets"][b.key]["capacities"], abs=1e-12)
    ev = run_evaluation(ckpt, out / "report_videos.parquet", tmp_path / "preds.parquet",
                        budgets_file=str(out / "budgets.json"), progress=False, echo=lambda *a, **k: None)
    assert ev["e_c"] == [0.2, 0.3] and ev["budgets"] == ["0.2", "0.3"] and ev["videos"] == 8
    for key, top1 in ev["top1"].items():
        assert top1 == pytest.approx(doc["budgets"][key]["top1"], abs=1.01 / 8)
    preds = pd.read_parquet(tmp_path / "preds.parquet")
    for key, caps in preds.groupby("budget")["capacities"].first().items():
        assert list(caps) == pytest.approx(doc["budgets"][key]["capacities"], abs=1e-9)


def test_budget_search_needs_data_when_none_is_recorded(tiny_ckpt, tmp_path):
    import shutil

    from jobs.tune import tune_budgets

    ckpt, _ = tiny_ckpt
    bare = tmp_path / "inference"
    shutil.copytree(ckpt, bare)
    meta = json.loads((bare / "inference.json").read_text())
    meta.pop("data")
    (bare / "inference.json").write_text(json.dumps(meta))
    with pytest.raises(TuneError, match="give --data"):
        tune_budgets(bare, budgets="0.3", trials=2, out=tmp_path / "o")
    with pytest.raises(TuneError, match="must be in"):
        tune_budgets(bare, budgets="0.1", trials=2, out=tmp_path / "o")
    with pytest.raises(TuneError, match="--report-fraction 1: must be in"):
        tune_budgets(ckpt, budgets="0.3", trials=2, out=tmp_path / "o", report_fraction=1.0)


def test_train_search_asha_end_to_end_and_resume(ray_cluster, tmp_path):
    from jobs.tune import tune_train

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {loguniform: [3.0e-4, 3.0e-3]}\nmone.delta: {choice: [1.5, 2.0, 3.0]}\n")
    overrides = [
        "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "optim.epochs=2", "optim.batch_size=4",
        "data.synth.classes=4", "data.synth.videos_per_class=4", "data.synth.val_videos_per_class=2",
        "data.synth.corrupt=0", "data.synth.frames=8", "data.synth.width=64", "data.synth.height=64",
        "mone.val_budgets=[0.3,1.0]", f"data.cache_dir={tmp_path / 'cache'}", f"run.storage_path={tmp_path / 'runs'}",
        "run.max_failures=0",
    ]
    summary = tune_train("tiny_cpu", overrides, space, trials=2, name="search", max_concurrent=1, verbose=1)
    assert summary["trials"] == 2 and summary["errors"] == 0, summary
    assert summary["metric"] == "top1_ec0.3" and not summary["resumed"]
    best = summary["best"]
    assert 3e-4 <= best["optim.lr"] <= 3e-3 and best["mone.delta"] in (1.5, 2.0, 3.0)
    assert 1 <= best["epochs"] <= 2
    exp = Path(summary["experiment"])
    assert (exp / "trials.parquet").is_file()
    run_dirs = sorted((exp / "trials").iterdir())
    assert len(run_dirs) == 2 and all((d / "config.yaml").is_file() for d in run_dirs)
    # every trial leaves its latest inference checkpoint in its run directory, for `mone tune budgets`/evaluate
    assert (Path(best["checkpoint"]) / "inference.json").is_file()
    assert all((d / "inference" / "model.safetensors").is_file() for d in run_dirs)
    # every trial writes TensorBoard event files: step loss and the top-1 of each validation budget per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for d in run_dirs:
        acc = EventAccumulator(str(d / "tensorboard"))
        acc.Reload()
        epochs = len((d / "metrics.jsonl").read_text().splitlines())
        assert "train/loss" in acc.Tags()["scalars"], d
        assert all(len(acc.Scalars(f"val/top1_ec{b}")) == epochs for b in (0.3, 1.0)), d

    again = tune_train("tiny_cpu", overrides, space, trials=2, name="search", max_concurrent=1, verbose=0)
    assert again["resumed"] and again["trials"] == 2 and again["best"]["trial_id"] == best["trial_id"]
