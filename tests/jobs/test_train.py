"""`mone train`: config validation before Ray starts, and the distributed run itself
(2 Ray Train workers x DeepSpeed ZeRO-2 on CPU): disjoint shards, checkpoint, kill, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config
from jobs.train import check_resources

sys.path.insert(0, str(Path(__file__).parent))
from helpers_cluster import kill_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- before any worker starts


@pytest.mark.parametrize(
    "override, message",
    [
        (["model.variant=vivit_b61"], "unknown variant 'vivit_b61'; did you mean vivit_b16"),
        (["mone.val_budgets=[0.3,1.5]"], "mone.val_budgets[1]: budget e_c=1.5 is out of range"),
        (["mone.train_budgets=[0.1]"], "mone.train_budgets[0]: budget e_c=0.1 is out of range"),
        (["data.root=/no/such/dataset"], "data.root: dataset path '/no/such/dataset' does not exist"),
        (["optim.epocs=3"], "unknown config key 'optim.epocs'; did you mean 'epochs'?"),
        (["scaling.precision=bf16"], "bf16 needs scaling.use_gpu=true"),
        (["optim.batch_size=zero"], "optim.batch_size: expected int, got 'zero'"),
        (["data.crop_size=70"], "data.crop_size=70 must be a multiple of data.patch=8"),
    ],
)
def test_bad_config_is_named_with_its_fix(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", override)
    assert message in str(e.value)


def test_every_shipped_config_loads():
    from jobs.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    stages = {"k400_vivit_b16_nested", "k400_vivit_b16", "ssv2_vivit_b16_nested", "ssv2_vivit_b16"}
    assert {"tiny_cpu", *stages} <= set(names)
    for name in names:  # dataset roots and init_from of the cluster configs are cluster paths
        cfg = load_config(name, check_paths=name == "tiny_cpu")
        assert cfg.model.variant


def test_more_workers_than_resources_is_refused():
    cfg = load_config("tiny_cpu", ["scaling.num_workers=4", "scaling.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match="needs 4.25 CPUs, the Ray cluster has 2"):
        check_resources(cfg, {"CPU": 2.0})
    gpu = load_config("tiny_cpu", ["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5"])
    with pytest.raises(ConfigError, match="needs 2 GPUs, the Ray cluster has 0"):
        check_resources(gpu, {"CPU": 8.0})
    check_resources(load_config("tiny_cpu"), {"CPU": 2.0})  # the demo fits a 2-core laptop


def test_cli_rejects_a_bad_config_before_starting_ray(capsys):
    import ray

    from jobs.cli import main

    t = time.time()
    assert main(["train", "model.variant=nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().out
    assert not ray.is_initialized() and time.time() - t < 30


# --------------------------------------------------------------------------- the distributed run


def _train_cmd(storage: Path, cache: Path, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "jobs.cli", "train", "--config", "tiny_cpu",
        f"optim.epochs={epochs}", "optim.batch_size=4", "optim.warmup_epochs=0.5",
        "data.synth.classes=4", "data.synth.videos_per_class=6", "data.synth.val_videos_per_class=2",
        "data.synth.corrupt=1", "data.synth.frames=8", "data.synth.width=64", "data.synth.height=64",
        "scaling.num_workers=2", "scaling.zero_stage=2", "mone.val_budgets=[0.3,1.0]",
        f"data.cache_dir={cache}", f"run.storage_path={storage}", "run.name=resume", "run.record_shards=true",
        "run.max_failures=0", "data.final_views=1x3", "mone.nested_epochs=1", "optim.ema_decay=0.9",
    ]


def _run_env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # its own local Ray, stopped with the process group
    return env


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has finished persisting (a `checkpoint_*` folder appears while it is still written)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results", []))


def _checkpointed_epochs(run_dir: Path) -> list[int]:
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return sorted(c["metrics"]["epoch"] for c in snapshot["checkpoint_results"])


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports_after():
    """Every train worker imports DeepSpeed at each (re)start; its autotuner's MLflow import doubled that. The
    block must not outlive the import: tracking to MLflow imports it afterwards."""
    code = ("import sys; from jobs.train import _import_deepspeed; ds = _import_deepspeed(); "
            "import deepspeed.autotuning.autotuner as a; assert not a.has_mlflow; "
            "assert 'mlflow' not in sys.modules; import mlflow; print('ok', mlflow.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert out.returncode == 0 and "ok mlflow" in out.stdout, out.stderr[-3000:]


@pytest.mark.slow
def test_zero2_run_is_killed_and_resumes_without_redoing_epochs(tmp_path):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    run_dir = storage / "resume"
    cmd = _train_cmd(storage, cache, epochs=3)

    # 1) Start, wait for the first epoch's checkpoint, then kill the whole process group (driver + local Ray).
    with open(tmp_path / "first.log", "w") as log1:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_run_env(), stdout=log1, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 420
    try:
        while time.time() < deadline and proc.poll() is None:
            if _registered_checkpoints(run_dir) and _metrics(run_dir):  # what a re-run resumes from
                break
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert list(run_dir.glob("checkpoint_*")), "no checkpoint within the time limit"
    finally:  # every process of the run: Ray's workers live in process groups of their own
        kill_session(proc.pid)
        proc.wait()
    first = _metrics(run_dir)
    done = {m["epoch"] for m in first}
    assert 0 in done and len(done) < 3
    last_done = _checkpointed_epochs(run_dir)[-1]  # what a re-run resumes from: the last persisted checkpoint
    assert set(range(last_done + 1)) <= done

    # 2) The same command again resumes from the latest checkpoint and finishes.
    out = subprocess.run(cmd, cwd=ROOT, env=_run_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    from jobs import faults

    starts = [(e["invocation"], e["epoch"]) for e in faults.attempts(str(run_dir)) if e.get("event") == "start"]
    mone_lines = [x for x in (out.stdout + out.stderr).splitlines() if "[mone]" in x]
    assert starts[0][1] == 0 and starts[-1][1] == last_done + 1, (starts, mone_lines[:20])
    assert f"resumed from epoch {last_done + 1}" in out.stdout + out.stderr, (starts, mone_lines[:20])
    history = _metrics(run_dir)
    assert [m["epoch"] for m in history] == [0, 1, 2]  # no epoch twice, none lost
    assert history[: last_done + 1] == first[: last_done + 1]  # checkpointed epochs are kept, not redone
    steps = [m["global_step"] for m in history]
    per_epoch = steps[0]
    assert per_epoch > 0 and steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]  # the step counter continues
    assert summary["epochs"] == 3 and summary["global_step"] == 3 * per_epoch
    assert summary["num_classes"] == 4 and 0.0 <= summary["top1_ec0.3"] <= 1.0
    assert summary["bad_videos"] >= 1  # the corrupt file was skipped and recorded
    # Data-wait and ETAs in the step logs and metrics; per-epoch validation 1 view, the full protocol once at the end.
    logs = out.stdout + out.stderr
    assert "data-wait" in logs and "ETA epoch" in logs and ", run " in logs
    assert all(0.0 <= m["data_wait_fraction"] <= 1.0 for m in history)
    assert summary["val_views"] == "1x1" and 0.0 <= summary["data_wait_fraction"] <= 1.0
    final = summary["val_final"]
    assert final["views"] == "1x3" and final["weights"] == "final (epoch 3)" and 0.0 <= final["top1_ec0.3"] <= 1.0
    assert final["gflops_ec0.3"] == pytest.approx(3 * summary["gflops_ec0.3"])  # 3 views per clip
    assert [m["epoch"] for m in history if "val_final" in m] == [2]
    assert (run_dir / "errors.parquet").exists() and (run_dir / "accuracy_vs_gflops.png").exists()
    # The nested stage (epoch 0) validated every width; GFLOPs per view in the paper's convention, named.
    assert {"top1_width0.125", "top1_width0.25", "top1_width0.5", "top1_width1.0"} <= set(history[0])
    assert "top1_width0.125" not in history[1]
    assert summary["gmacs_ec0.3"] == pytest.approx(history[-1]["gflops_ec0.3"] / 2 / summary["views_per_clip"])
    assert final["gmacs_ec0.3"] == pytest.approx(summary["gmacs_ec0.3"]) and final["views_per_clip"] == 3
    assert "top1_ema_ec0.3" in final  # the full protocol also scores the EMA weights (the inference model)
    assert "multiply-add = 1" in summary["flops_convention"] and "top1_ema_ec0.3" in summary

    # The consolidated inference checkpoint loads without DeepSpeed and serves any budget.
    import torch

    from jobs.checkpoint import load_inference

    ck = load_inference(run_dir)
    assert ck.labels == json.loads((run_dir / "labels.json").read_text())
    # EMA on: the inference checkpoint holds the EMA weights (as saved for resuming), the raw ones beside them.
    assert ck.meta["weights"].startswith("ema")
    ema = torch.load(Path(summary["ray_checkpoint"]) / "ema.pt", weights_only=True)
    from safetensors.torch import load_file

    raw = load_file(ck.path / "model_raw.safetensors")
    for k, v in ck.model.state_dict().items():
        torch.testing.assert_close(v, ema[f"module.{k}"], msg=k)
    assert any(not torch.equal(v, raw[k]) for k, v in ck.model.state_dict().items())
    L = ck.model.cfg.temporal_tokens * ck.model.cfg.num_patches
    tokens = torch.randint(0, 255, (2, L, ck.model.cfg.token_dim), dtype=torch.uint8)
    assert ck.model.forward_tokens(tokens, budget=0.3).shape == (2, 4)

    # Both workers saw disjoint shards of every epoch, covering the good clips.
    for epoch in range(3):
        shards = [set((run_dir / "shards" / f"epoch{epoch}_rank{r}.txt").read_text().split()) for r in (0, 1)]
        assert shards[0] and shards[1] and not shards[0] & shards[1], f"epoch {epoch} shards overlap"
