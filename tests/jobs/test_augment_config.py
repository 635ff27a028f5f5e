"""data.augment, model.drop_path and optim.label_smoothing: validated before Ray, carried to the decode workers and
the train step, and a real `mone train` epoch with every piece on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config
from jobs.data import clip_spec_dict
from pipeline.sampling import ClipSpec

ROOT = Path(__file__).resolve().parents[2]
ALL_ON = [
    "data.augment.randaugment_layers=2", "data.augment.randaugment_magnitude=9", "data.augment.color_jitter=0.4",
    "data.augment.scale_jitter=[0.9,1.33]", "data.augment.random_erasing=0.25", "data.augment.mixup=0.8",
    "data.augment.cutmix=1.0", "model.drop_path=0.1", "optim.label_smoothing=0.1",
]


@pytest.mark.parametrize("override, message", [
    (["data.augment.cutmix=-1"], "data.augment.cutmix=-1.0 is a Beta alpha"),
    (["data.augment.random_erasing=1.5"], "data.augment.random_erasing=1.5 is a probability"),
    (["data.augment.scale_jitter=[1.3,0.9]"], "data.augment.scale_jitter=[1.3, 0.9] must be [min, max]"),
    (["data.augment.scale_jitter=[0.9,1.33]", "data.train_crop=random_resized"], "set data.train_crop=random"),
    (["data.augment.color_jitter=1.2"], "data.augment.color_jitter=1.2 must be in [0, 1)"),
    (["model.overrides.drop_path=0.1"], "set model.drop_path instead"),
    (["model.drop_path=1.0"], "model.drop_path=1.0 must be in [0, 1)"),
    (["data.augment.mixpu=0.8"], "unknown config key 'data.augment.mixpu'; did you mean 'mixup'?"),
])
def test_bad_augment_config_is_named_with_its_fix(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", override)
    assert message in str(e.value)


def test_off_by_default_and_carried_to_the_training_clip_only():
    for name in ("tiny_cpu", "k400_vivit_b16", "ssv2_vivit_b16"):
        cfg = load_config(name) if name == "tiny_cpu" else load_config(name, check_paths=False)
        assert cfg.data.augment.mixup >= 0 and cfg.model.drop_path >= 0  # shipped configs validate
    default = load_config("tiny_cpu")
    assert not ClipSpec(**clip_spec_dict(default, train=True)).augment.active
    cfg = load_config("tiny_cpu", ALL_ON)
    train, val = ClipSpec(**clip_spec_dict(cfg, train=True)), ClipSpec(**clip_spec_dict(cfg, train=False))
    assert train.augment.randaugment_layers == 2 and train.augment.scale_jitter == (0.9, 1.33)
    assert train.augment.random_erasing == 0.25 and train.augment.color_jitter == 0.4
    assert not val.augment.active and val.augment.scale_jitter == (1.0, 1.0)  # validation clips are never augmented


@pytest.mark.slow
def test_one_epoch_with_every_augmentation_on(tmp_path):
    """The decode workers (RandAugment, jitter, erasing), the train step (mixup/cutmix + soft targets + label
    smoothing) and stochastic depth run together under Ray Train + DeepSpeed."""
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--config", "tiny_cpu", *ALL_ON,
           "optim.epochs=1", "optim.batch_size=4", "data.synth.classes=4", "data.synth.videos_per_class=4",
           "data.synth.val_videos_per_class=1", "data.synth.corrupt=0", "mone.val_budgets=[0.3,1.0]",
           "mone.dense_epochs=0", f"data.cache_dir={tmp_path / 'cache'}", f"run.storage_path={tmp_path / 'runs'}",
           "run.name=aug", "run.max_failures=0"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and 0 < summary["train_loss"] < 10
    config = (tmp_path / "runs" / "aug" / "config.yaml").read_text()
    assert "mixup: 0.8" in config and "drop_path: 0.1" in config and "randaugment_layers: 2" in config
