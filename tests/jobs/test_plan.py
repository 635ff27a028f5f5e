"""`mone train --dry-run`: the resolved config as YAML and the plan, exit 0, nothing started."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError, load_config
from jobs.plan import describe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["k400_vivit_b16", "ssv2_vivit_b16"])
def test_dry_run_prints_yaml_and_the_plan_and_starts_no_ray(name, tmp_path):
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "ray"), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--config", name, "--dry-run"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    resolved = yaml.safe_load(text.split("\n# plan for ")[0])  # the YAML part parses as the config
    assert resolved["name"] == name and resolved["model"]["init_from"].endswith(f"{name}_nested")
    plan = json.loads(text.strip().splitlines()[-1])
    assert plan["model"]["init_from"] == resolved["model"]["init_from"]
    aug = plan["augmentation"]
    for key in ("optim.label_smoothing", "model.drop_path"):
        assert key in aug and key in text
    opt = plan["optimisation"]
    assert opt["optimizer"].startswith("sgd") and opt["global_batch"] == 64
    assert opt["lr"] == pytest.approx(resolved["optim"]["lr"] * 64 / 256)  # scaled from per-256 clips
    assert plan["steps_per_epoch"] == plan["train_clips"] * plan["clips_per_video"] // 64
    assert plan["validation"]["final_views"] == "4x3"  # the paper's protocol once at the end
    assert set(plan["validation"]["gflops_per_view"]) == {f"ec{b}" for b in resolved["mone"]["val_budgets"]}
    assert "GFLOPs per view (paper convention, multiply-add = 1)" in text
    assert not (tmp_path / "ray").exists()  # no Ray session was started


def test_plan_of_the_demo_and_of_a_nested_stage():
    demo = describe(load_config("tiny_cpu"))
    assert demo["train_clips"] == 8 * 60 and demo["optimisation"]["global_batch"] == 16  # 8 per worker x 2
    assert demo["steps_per_epoch"] == 480 // 16
    assert demo["validation"]["gflops_per_view"]["ec1.0"] > demo["validation"]["gflops_per_view"]["ec0.3"]
    nested = describe(load_config("k400_vivit_b16_nested", check_paths=False))
    assert [s["stage"] for s in nested["stages"]] == ["nested"]
    chain = describe(load_config("tiny_cpu", ["mone.nested_epochs=2", "mone.dense_epochs=1", "optim.epochs=5"]))
    assert [(s["stage"], s["epochs"]) for s in chain["stages"]] == [("nested", [1, 2]), ("dense", [3, 3]),
                                                                     ("mone", [4, 5])]


def test_the_cpu_chain_links_its_two_stages(tmp_path, monkeypatch):
    """tiny_cpu_nested (nested, then dense, from scratch) -> tiny_cpu_mone (MoNE from stage 1's run at a quarter of
    the demo's lr), on the demo's own data and model: what the README's two commands rely on."""
    demo, first = load_config("tiny_cpu"), load_config("tiny_cpu_nested")
    second = load_config("tiny_cpu_mone", check_paths=False)  # stage 1 has not run here
    plan1, plan2 = describe(first), describe(second)
    assert [(s["stage"], s["epochs"]) for s in plan1["stages"]] == [("nested", [1, 2]), ("dense", [3, 12])]
    assert [s["stage"] for s in plan2["stages"]] == ["mone"] and plan2["model"]["init_from"]
    assert Path(second.model.init_from) == Path(first.run.storage_path) / first.run_name  # stage 1's default run
    assert plan2["optimisation"]["lr"] == pytest.approx(describe(demo)["optimisation"]["lr"] / 4)
    for cfg in (first, second):  # the demo's clips and model; the chain adds a scale jitter (a random shift)
        assert dataclasses.replace(cfg.data, augment=demo.data.augment) == demo.data
        assert cfg.model.variant == demo.model.variant
        assert cfg.data.augment.scale_jitter == [1.0, 1.25] and cfg.data.train_crop == "random"
    assert second.data.augment == first.data.augment  # MoNE fine-tunes on what stage 1 trained on
    monkeypatch.chdir(tmp_path)  # where stage 1 has not run
    with pytest.raises(ConfigError, match="model.init_from: 'runs/tiny_cpu_nested' does not exist"):
        load_config("tiny_cpu_mone")  # named, with what to give
