"""jobs.checkpoint: inference checkpoints are safetensors, older model.pt ones still load, and `is_best` picks
the epoch `run.keep_best` keeps."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.checkpoint import (
    LEGACY_WEIGHTS_FILE,
    WEIGHTS_FILE,
    find_inference_dir,
    is_best,
    load_inference,
    save_inference,
)
from models.vit import create_model

CLIP = {"num_frames": 8, "sampling": "dense", "stride": 2, "short_side": 64, "crop_size": 64, "tubelet_t": 2,
        "patch": 16, "train": False, "flip": False, "temporal_views": 1, "spatial_views": 1}


def _save(out, model):
    return save_inference(out, model.state_dict(), variant="vivit_tiny", num_classes=3, labels=["a", "b", "c"],
                          clip=CLIP, extra={"run": {"epoch": 4}})


def test_inference_checkpoint_is_safetensors_and_old_model_pt_still_loads(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=3).eval()
    d = _save(tmp_path / "run" / "inference", model)
    assert sorted(p.name for p in d.iterdir()) == ["inference.json", WEIGHTS_FILE]
    with safe_open(str(d / WEIGHTS_FILE), "pt") as f:  # a plain safetensors file anyone can read
        assert set(f.keys()) == set(model.state_dict())
    cfg = model.cfg
    tokens = torch.randint(0, 255, (2, cfg.temporal_tokens * cfg.num_patches, cfg.token_dim), dtype=torch.uint8)
    with torch.no_grad():
        ref = model.forward_tokens(tokens, budget=0.3)
        ck = load_inference(tmp_path / "run")  # a run directory: its inference/
        torch.testing.assert_close(ck.model.forward_tokens(tokens, budget=0.3), ref)
    assert ck.labels == ["a", "b", "c"] and ck.meta["run"]["epoch"] == 4

    # A checkpoint written before safetensors: model.pt (torch.save) + inference.json.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(model.state_dict(), legacy / LEGACY_WEIGHTS_FILE)
    (legacy / "inference.json").write_text((d / "inference.json").read_text())
    assert find_inference_dir(legacy) == legacy
    with torch.no_grad():
        torch.testing.assert_close(load_inference(legacy).model.forward_tokens(tokens, budget=0.3), ref)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "inference.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        find_inference_dir(tmp_path / "empty")


def test_is_best_keeps_the_best_epoch():
    top1 = [0.50, 0.70, 0.60, 0.70, float("nan")]
    history: list[dict] = []
    kept = []
    for epoch, v in enumerate(top1):
        history.append({"epoch": epoch, "top1_ec0.3": v, "train_loss": 2.0 - 0.1 * epoch - (epoch == 2)})
        if is_best(history, "top1_ec0.3"):
            kept.append(epoch)
    assert kept == [0, 1]  # epoch 3 only ties epoch 1: the earlier one stays
    losses = [is_best(history[: i + 1], "train_loss") for i in range(len(history))]
    assert losses == [True, True, True, False, False]  # lower is better for a loss; epoch 2 dipped to 0.8
    assert not is_best(history, "no_such_key")
