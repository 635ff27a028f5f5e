"""The consolidated inference checkpoint: what `mone train` leaves for evaluate, tune and visualize.

A directory with `model.safetensors` (the plain fp32 state_dict, in the format weights are shared in: no pickle,
no DeepSpeed needed to read it) and `inference.json` (model variant + overrides, label names, the clip spec to
decode with, the budgets trained on, the epoch and its metrics). Written to a temporary directory and renamed into
place, so a reader never sees half of one. Checkpoints written before safetensors hold `model.pt` instead; loading
reads either.

With `run.keep_best: KEY`, training also keeps `best/` (same layout) beside the run's latest `inference/`: the
epoch whose metric KEY was best so far (`is_best`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFERENCE_DIRNAME = "inference"
BEST_DIRNAME = "best"
META_FILE = "inference.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "model.pt"  # torch.save'd state dict of older checkpoints; still read


@dataclass
class InferenceCheckpoint:
    model: Any  # models.vit.MoNEViT | MoNEViViT, in eval mode
    labels: list[str]
    clip: dict[str, Any]  # pipeline.sampling.ClipSpec fields for evaluation
    meta: dict[str, Any]
    path: Path

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def clip_spec(self, **changes: Any):
        """The evaluation ClipSpec, with optional changes (e.g. temporal_views=4, spatial_views=3)."""
        from pipeline.sampling import ClipSpec

        return ClipSpec(**{**self.clip, "train": False, **changes})


def save_inference(
    out_dir: str | os.PathLike,
    state_dict: dict[str, Any],
    *,
    variant: str,
    num_classes: int,
    labels: list[str],
    clip: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    extra_weights: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Atomically writes `out_dir` (replacing an older one) and returns it. `extra_weights`: more state dicts
    saved beside model.safetensors under their file names (e.g. the raw weights when it holds their EMA)."""
    import torch

    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} label names for {num_classes} classes")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    meta = {
        "model": {"variant": variant, "num_classes": num_classes, "overrides": dict(overrides or {})},
        "labels": list(labels),
        "clip": dict(clip),
        **(extra or {}),
    }
    from safetensors.torch import save_file

    for name, sd in {WEIGHTS_FILE: state_dict, **(extra_weights or {})}.items():
        cpu_state = {k: v.detach().to("cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                     for k, v in sd.items()}
        save_file(cpu_state, str(tmp / name), metadata={"format": "pt", "variant": variant})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def weights_path(inference_dir: str | os.PathLike) -> Path | None:
    """The weights file of an inference directory: model.safetensors, else an older checkpoint's model.pt."""
    d = Path(inference_dir)
    for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (d / name).is_file():
            return d / name
    return None


def find_inference_dir(path: str | os.PathLike) -> Path:
    """Accepts an inference directory, a run directory, or a run's checkpoint directory."""
    p = Path(path).expanduser()
    for candidate in (p, p / INFERENCE_DIRNAME, p / "checkpoint" / INFERENCE_DIRNAME):
        if (candidate / META_FILE).is_file() and weights_path(candidate):
            return candidate
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{p}' does not exist")
    raise FileNotFoundError(
        f"no inference checkpoint under '{p}': expected {META_FILE} and {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE}) in "
        f"it or in '{INFERENCE_DIRNAME}/' (a finished `mone train` run directory has one)"
    )


def read_weights(inference_dir: str | os.PathLike) -> dict[str, Any]:
    """The state dict of an inference directory (safetensors, or the legacy torch.save file), on the CPU."""
    import torch

    p = weights_path(inference_dir)
    if p is None:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE} in '{inference_dir}'")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    return torch.load(p, map_location="cpu", weights_only=True)


def best_mode(key: str) -> str:
    """'min' for losses and waiting times, 'max' for everything else (accuracies, throughput)."""
    return "min" if "loss" in key or "wait" in key else "max"


def is_best(history: list[dict[str, Any]], key: str) -> bool:
    """Whether the last epoch of `history` is strictly better on `key` than every earlier one (the first epoch
    that reports it is). Ties keep the earlier epoch. An epoch without the key (or with NaN) is never best."""
    import math

    values = [m.get(key) for m in history]
    last = values[-1] if values else None
    if not isinstance(last, (int, float)) or math.isnan(last):
        return False
    earlier = [v for v in values[:-1] if isinstance(v, (int, float)) and not math.isnan(v)]
    if not earlier:
        return True
    return last < min(earlier) if best_mode(key) == "min" else last > max(earlier)


def load_inference(path: str | os.PathLike, device: str = "cpu") -> InferenceCheckpoint:
    from models.vit import create_model

    d = find_inference_dir(path)
    meta = json.loads((d / META_FILE).read_text())
    m = meta["model"]
    model = create_model(m["variant"], num_classes=m["num_classes"], **m.get("overrides", {}))
    model.load_state_dict(read_weights(d))
    model.to(device).eval()
    return InferenceCheckpoint(model=model, labels=meta["labels"], clip=meta["clip"], meta=meta, path=d)
