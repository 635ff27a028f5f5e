"""Validation during training: one pass over the decoded clips serves every budget (no Ray needed)."""

import torch

from jobs.config import load_config
from jobs.train import TokensClassifier, _validate
from models.capacity import capacities_for_budget
from models.flops import model_flops
from models.vit import create_model


class CountingShard:
    """A dataset shard that counts how often it is read (each read decodes every video once more)."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def iter_torch_batches(self, **kw):
        self.reads += 1
        for b in self.batches:
            yield kw["collate_fn"](b) if kw.get("collate_fn") else b


def test_one_decode_of_the_val_set_serves_every_budget():
    import numpy as np

    cfg = load_config("tiny_cpu", ["mone.val_budgets=[0.2,0.3,0.5,1.0]"])
    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=4, num_frames=8, img_size=64, pool="gap")
    L, K = model.cfg.temporal_tokens * model.cfg.num_patches, model.cfg.token_dim
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 255, (3, 1, L, K), dtype=np.uint8), "label": np.array([0, 1, 2]),
                "path": np.array(["a", "b", "c"], dtype=object)} for _ in range(2)]
    shard = CountingShard(batches)

    def budget_arg(e_c):
        return None if e_c >= 1.0 else capacities_for_budget(e_c)

    out = _validate(TokensClassifier(model), shard, cfg, torch.device("cpu"), budget_arg, model_flops, 4)[0]
    assert shard.reads == 1  # the validation videos were decoded once for all four budgets
    assert out["val_clips"] == 6
    for b in cfg.mone.val_budgets:
        assert 0.0 <= out[f"top1_ec{b}"] <= 1.0 and out[f"gflops_ec{b}"] > 0
    assert out["gflops_ec0.2"] < out["gflops_ec1.0"]


def test_view_protocols_and_clips_per_video_in_the_config():
    import pytest

    from jobs import data as job_data
    from jobs.config import ConfigError

    cfg = load_config("tiny_cpu", ["data.final_views=4x3", "data.clips_per_video=2"])
    assert job_data.clip_spec_dict(cfg, train=False)["temporal_views"] == 1  # per epoch: val_views 1x1
    final = job_data.final_clip_spec(cfg)
    assert (final["temporal_views"], final["spatial_views"], final["train"]) == (4, 3, False)
    assert job_data.train_clips(cfg, 480) == 960  # two clips of every video per epoch
    assert job_data.final_clip_spec(load_config("tiny_cpu")) is None  # no final protocol: none run
    assert job_data.final_clip_spec(load_config("tiny_cpu", ["data.final_views=1x1"])) is None  # same as per epoch
    for bad, msg in ((["data.final_views=4x2"], "data.final_views='4x2'"), (["data.clips_per_video=0"], ">= 1")):
        with pytest.raises(ConfigError, match=msg):
            load_config("tiny_cpu", bad)
