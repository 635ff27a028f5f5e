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


def _tiny_val_setup(n_batches: int = 2):
    import numpy as np

    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=4, num_frames=8, img_size=64, pool="gap")
    L, K = model.cfg.temporal_tokens * model.cfg.num_patches, model.cfg.token_dim
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 255, (3, 1, L, K), dtype=np.uint8), "label": np.array([0, 1, 2]),
                "path": np.array(["a", "b", "c"], dtype=object)} for _ in range(n_batches)]
    return TokensClassifier(model), CountingShard(batches)


def _budget_arg(e_c):
    return None if e_c >= 1.0 else capacities_for_budget(e_c)


def test_one_decode_of_the_val_set_serves_every_budget():
    cfg = load_config("tiny_cpu", ["mone.val_budgets=[0.2,0.3,0.5,1.0]"])
    net, shard = _tiny_val_setup()
    out = _validate(net, shard, cfg, torch.device("cpu"), _budget_arg, model_flops, 4)[0]
    assert shard.reads == 1  # the validation videos were decoded once for all four budgets
    assert out["val_clips"] == 6
    for b in cfg.mone.val_budgets:
        assert 0.0 <= out[f"top1_ec{b}"] <= 1.0 and out[f"gflops_ec{b}"] > 0
    assert out["gflops_ec0.2"] < out["gflops_ec1.0"]


def test_a_small_val_set_is_decoded_once_per_run_and_a_large_one_every_epoch():
    """The val clips do not change between epochs: when a worker's batches fit data.val_cache_mb they are replayed
    from memory from the second validation on, with the same figures; when they do not, every epoch decodes."""
    net, shard = _tiny_val_setup()
    cfg = load_config("tiny_cpu", ["mone.val_budgets=[0.3,1.0]"])
    cache: dict = {}
    first = _validate(net, shard, cfg, torch.device("cpu"), _budget_arg, model_flops, 4, cache=cache)[0]
    second = _validate(net, shard, cfg, torch.device("cpu"), _budget_arg, model_flops, 4, cache=cache)[0]
    assert shard.reads == 1 and second["val_clips"] == first["val_clips"] == 6
    assert all(second[f"top1_ec{b}"] == first[f"top1_ec{b}"] for b in (0.3, 1.0))

    small = load_config("tiny_cpu", ["mone.val_budgets=[1.0]", "data.val_cache_mb=1"])
    cache = {}
    net_b, shard_b = _tiny_val_setup(4)  # each batch is ~0.28 MiB: 1 MiB holds three, not four
    for _ in range(2):
        _validate(net_b, shard_b, small, torch.device("cpu"), _budget_arg, model_flops, 4, cache=cache)
    assert shard_b.reads == 2 and "batches" not in cache
    off = load_config("tiny_cpu", ["mone.val_budgets=[1.0]", "data.val_cache_mb=0"])
    net, shard = _tiny_val_setup()
    cache = {}
    for _ in range(2):
        _validate(net, shard, off, torch.device("cpu"), _budget_arg, model_flops, 4, cache=cache)
    assert shard.reads == 2 and not cache


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


def test_the_epoch_log_line_names_each_budget_width_and_ema_entry():
    from jobs.train import epoch_line

    cfg = load_config("tiny_cpu", ["mone.val_budgets=[0.3,1.0]"])
    metrics = {"train_loss": 0.5, "train_clips_per_s": 40.0, "data_wait_fraction": 0.1, "top1_ec0.3": 0.9,
               "top1_ec1.0": 0.95, "top1_width0.125": 0.5, "top1_width1.0": 0.8, "top1_ema_ec0.3": 0.91,
               "top1_ema_ec1.0": 0.96}
    line = epoch_line(3, cfg, metrics)
    assert line.startswith(f"[mone] epoch 4/{cfg.optim.epochs}: loss 0.500, 40.0 clips/s, data-wait 10%, ")
    for part in ("top-1@0.3 90.0%", "top-1@1.0 95.0%", "width 0.125xD 50.0%", "width 1.0xD 80.0%", "EMA@0.3 91.0%",
                 "EMA@1.0 96.0%"):
        assert part in line, (part, line)
