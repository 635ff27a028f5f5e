"""data.augment, model.drop_path and optim.label_smoothing: validated before Ray and carried to the decode workers
and the train step. A real `mone train` with every piece on is test_tracking.py's run (one Ray Train run for both)."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, load_config
from jobs.data import clip_spec_dict
from pipeline.sampling import ClipSpec

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
