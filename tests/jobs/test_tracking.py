"""Tracking, checkpoints and the run report end to end: one short `mone train` (2 Ray Train workers, ZeRO-2)
with TensorBoard, a real local MLflow server started here, W&B in offline mode and `run.keep_best`; then what a user
opens afterwards: the event files, the MLflow run, the W&B offline run, model.safetensors, best/, report.html in
headless Chromium. The same run has every augmentation on in its MoNE stage (one `mone train` fewer in CI than a
run of its own for them). The tracker and the confusion figure alone first (no Ray)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_augment_config import ALL_ON  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUDGETS = (0.3, 1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def render_in_chromium(page: Path, screenshot: Path, profile: Path) -> str:
    """Loads the page in headless Chromium: writes a screenshot and returns the DOM after the load event."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", "--virtual-time-budget=10000"]
    url = page.resolve().as_uri()
    subprocess.run([*base, f"--user-data-dir={profile}-shot", "--window-size=1300,2600",
                    f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=180)
    dom = subprocess.run([*base, f"--user-data-dir={profile}-dom", "--dump-dom", url], check=True,
                         capture_output=True, text=True, timeout=180)
    return dom.stdout


def screenshot_is_a_page(png: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(png)[..., :3]  # (H, W, 3) in [0, 1]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    ink = (img.mean(-1) < 0.9).mean()  # text and figures, not an empty white page
    colour = (img.max(-1) - img.min(-1) > 0.25).mean()  # plots, routing overlays
    assert ink > 0.02 and colour > 0.005, (ink, colour)
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


# ------------------------------------------------------------------------------------------------ no Ray


@pytest.mark.parametrize("override, message", [
    (["run.keep_best=top1_ec0.7"], "run.keep_best: 'top1_ec0.7' is not a metric of this run; did you mean 'top1_ec0.5"),
    (["run.tracking=[mlflow]"], "run.tracking includes mlflow but run.mlflow_uri is empty"),
    (["run.tracking=[tensorbord]"], "run.tracking[0]: 'tensorbord' is not one of tensorboard, mlflow, wandb"),
    (["run.wandb_mode=ofline"], "run.wandb_mode: 'ofline' is not one of"),
])
def test_bad_tracking_config_is_named_with_its_fix(override, message):
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", override)
    assert message in str(e.value)


def test_unreachable_mlflow_server_is_refused_before_ray_starts():
    from jobs.config import ConfigError, load_config
    from jobs.tracking import preflight

    cfg = load_config("tiny_cpu", ["run.tracking=[mlflow]", f"run.mlflow_uri=http://127.0.0.1:{_free_port()}"])
    with pytest.raises(ConfigError, match="no MLflow tracking server answers"):
        preflight(cfg)


def test_confusion_figure_with_400_classes_and_its_table(tmp_path):
    import matplotlib.image as mpimg
    import numpy as np
    import pyarrow.parquet as pq

    from jobs.report import confusion_png, read_confusions, write_confusion

    rng = np.random.default_rng(0)
    labels = [f"class number {i}" for i in range(400)]
    true = rng.integers(0, 400, 5000)
    pred = np.where(rng.random(5000) < 0.6, true, rng.integers(0, 400, 5000))
    m = np.zeros((400, 400), np.int64)
    np.add.at(m, (true, pred), 1)
    png = tmp_path / "c.png"
    png.write_bytes(confusion_png(m, labels, "e_c = 0.3"))
    img = mpimg.imread(png)
    assert 800 <= img.shape[0] <= 1200 and img.shape[1] >= 1200  # one readable figure, not 400 tick labels
    write_confusion(str(tmp_path / "c.parquet"), {"0.3": m, "1.0": np.eye(400, dtype=np.int64)}, labels)
    t = pq.read_table(tmp_path / "c.parquet").to_pandas()
    assert t[t.budget == "0.3"]["count"].sum() == 5000 and t[t.budget == "1.0"]["count"].sum() == 400
    assert (t["count"] > 0).all()  # sparse: zero cells are not rows
    back = read_confusions(str(tmp_path / "c.parquet"), 400)
    assert np.array_equal(back["0.3"], m)


def test_tracker_writes_tensorboard_and_wandb_offline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs.config import load_config
    from jobs.tracking import open_tracker

    cfg = load_config("tiny_cpu", ["run.tracking=[wandb]", "run.wandb_mode=offline"])
    tr = open_tracker(cfg, str(tmp_path), rank=0)
    assert tr.names == ["tensorboard", "wandb"] and open_tracker(cfg, str(tmp_path), rank=1).names == []
    for step in range(1, 6):
        tr.log_step(step, loss=1.0 / step, lr=1e-3, e_c=0.3, clips_per_s=12.0, data_wait_s=0.02)
    tr.log_epoch(5, {"epoch": 0, "global_step": 5, "train_loss": 0.4, "top1_ec0.3": 0.75, "top1_w0.5": 0.5,
                     "note": "text is skipped", "mean_class_ec0.3": float("nan"),
                     "val_final": {"views": "4x3", "top1_ec0.3": 0.8}})
    tr.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/e_c", "train/clips_per_s", "train/data_wait_s", "epoch/train_loss",
            "val/top1_ec0.3", "val/top1_w0.5", "val_final/top1_ec0.3"} == tags  # every numeric key; NaN, text out
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    wandb_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_file.read_bytes().count(b"train/loss") >= 5 and b"val/top1_ec0.3" in wandb_file.read_bytes()


# ------------------------------------------------------------------------------------------------ one training run


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(d / "server.log", "w")  # noqa: SIM115 -- the server writes to it until the fixture ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, (d / "server.log").read_text()[-2000:]
                assert time.time() < deadline, "the MLflow server did not come up in 300 s"
                time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its job runner lingers; nothing of it is needed any more
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    storage, cache = tmp / "runs", tmp / "cache"
    cmd = [
        sys.executable, "-m", "jobs.cli", "train", "--config", "tiny_cpu",
        # warmup over 2 of 3 epochs: lr peaks at the end of the middle epoch, so keep_best=lr must keep epoch 1
        "optim.epochs=3", "optim.batch_size=4", "optim.warmup_epochs=2",
        "data.synth.classes=4", "data.synth.videos_per_class=6", "data.synth.val_videos_per_class=2",
        "data.synth.corrupt=1", "scaling.num_workers=2", "scaling.zero_stage=2",
        f"mone.val_budgets=[{','.join(map(str, BUDGETS))}]", f"data.cache_dir={cache}",
        f"run.storage_path={storage}", "run.name=tracked", "run.max_failures=0", "run.log_every=1",
        "run.keep_best=lr", "run.tracking=[mlflow,wandb]", f"run.mlflow_uri={mlflow_server}", "run.wandb_mode=offline",
        *ALL_ON, "mone.dense_epochs=0",  # every augmentation, with e_c drawn per step from the first step
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir = storage / "tracked"
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, history


@pytest.mark.slow
def test_every_augmentation_on_trains_under_ray_train_and_deepspeed(trained):
    """The decode workers (RandAugment, colour and scale jitter, erasing), the train step (mixup/cutmix, soft
    targets, label smoothing) and stochastic depth ran together in the MoNE stage of a real run."""
    run_dir, summary, history = trained
    config = (run_dir / "config.yaml").read_text()
    for setting in ("mixup: 0.8", "cutmix: 1.0", "randaugment_layers: 2", "random_erasing: 0.25",
                    "color_jitter: 0.4", "drop_path: 0.1", "label_smoothing: 0.1", "dense_epochs: 0"):
        assert setting in config, setting
    assert summary["epochs"] == 3 and all(0 < m["train_loss"] < 10 for m in history)


@pytest.mark.slow
def test_tensorboard_has_the_loss_and_every_budgets_top1(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary, history = trained
    assert summary["tensorboard"] == str(run_dir / "tensorboard")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/e_c", "train/clips_per_s", "train/data_wait_s"):
        assert tag in tags["scalars"], tag
    for b in BUDGETS:
        for key in ("top1", "top5", "mean_class", "gflops"):
            assert f"val/{key}_ec{b}" in tags["scalars"]
        values = [e.value for e in acc.Scalars(f"val/top1_ec{b}")]
        assert values == pytest.approx([m[f"top1_ec{b}"] for m in history])
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert len(steps) == history[-1]["global_step"] and steps == sorted(steps)  # run.log_every=1: every step
    assert "accuracy_vs_gflops" in tags["images"] and len(acc.Images("accuracy_vs_gflops")) == 3
    assert {f"confusion/ec{b}" for b in BUDGETS} <= set(tags["images"])  # at the last epoch


@pytest.mark.slow
def test_mlflow_server_sees_the_runs_metrics(trained, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_dir, _, history = trained
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tiny_cpu")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mone.run_dir` = '{run_dir}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["optim.epochs"] == "3" and run.data.params["run.keep_best"] == "lr"
    for b in BUDGETS:
        hist = client.get_metric_history(run.info.run_id, f"val/top1_ec{b}")
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(
            [m[f"top1_ec{b}"] for m in history])
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [m["global_step"] for m in history]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == history[-1]["global_step"]
    assert "figures/accuracy_vs_gflops.png" in [f.path for f in client.list_artifacts(run.info.run_id, "figures")]


@pytest.mark.slow
def test_wandb_offline_run_is_written_without_network(trained):
    run_dir, _, history = trained
    (offline,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = offline.read_bytes()
    assert data.count(b"train/loss") >= history[-1]["global_step"]
    assert all(f"val/top1_ec{b}".encode() in data for b in BUDGETS)


@pytest.mark.slow
def test_safetensors_checkpoint_and_the_best_epoch(trained):
    import torch

    from jobs.checkpoint import load_inference

    run_dir, summary, history = trained
    inf, best = run_dir / "inference", run_dir / "best"
    assert (inf / "model.safetensors").is_file() and not (inf / "model.pt").exists()
    assert summary["checkpoint"] == str(inf) and summary["best_checkpoint"] == str(best)
    lrs = [m["lr"] for m in history]
    best_epoch = lrs.index(max(lrs))
    assert best_epoch == 1 != history[-1]["epoch"]  # the best epoch is not simply the latest
    assert summary["best"] == {"metric": "lr", "epoch": best_epoch, "value": pytest.approx(max(lrs))}
    assert json.loads((best / "inference.json").read_text())["run"]["epoch"] == best_epoch
    assert json.loads((inf / "inference.json").read_text())["run"]["epoch"] == 2
    latest, kept = load_inference(run_dir), load_inference(best)
    tokens = torch.randint(0, 255, (2, latest.model.cfg.temporal_tokens * latest.model.cfg.num_patches,
                                    latest.model.cfg.token_dim), dtype=torch.uint8)
    with torch.no_grad():
        assert not torch.allclose(latest.model.forward_tokens(tokens), kept.model.forward_tokens(tokens))
    for b in BUDGETS:  # mean-class accuracy is reported beside top-1
        assert 0.0 <= summary[f"mean_class_ec{b}"] <= 1.0


@pytest.mark.slow
def test_report_renders_in_headless_chromium(trained, tmp_path):
    run_dir, summary, _ = trained
    page = run_dir / "report.html"
    assert summary["report"] == str(page)
    text = page.read_text()
    assert 'src="http' not in text and "<link" not in text  # self-contained
    for needle in ("Accuracy vs compute", "Per-epoch curves", "Routing of validation videos", "errors.parquet",
                   "Config", "Best epoch by <code>lr</code>: epoch 2"):
        assert needle in text, needle
    assert text.count("data:image/png;base64,") >= 5  # plot, curves, >= 1 routing picture, 2 confusion matrices
    if chromium() is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium); .ci/run installs it")
    shot = tmp_path / "report.png"
    dom = render_in_chromium(page, shot, tmp_path / "profile")
    assert 'data-images-ok="yes"' in dom  # every embedded image decoded
    screenshot_is_a_page(shot)
