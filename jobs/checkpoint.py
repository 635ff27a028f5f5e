"""The consolidated inference checkpoint: what `mone train` leaves for evaluate, tune and visualize.

A directory with `model.pt` (a plain fp32 state_dict, no DeepSpeed needed to read it) and `inference.json`
(model variant + overrides, label names, the clip spec to decode with, the budgets trained on). Written to a
temporary directory and renamed into place, so a reader never sees half of one.
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
META_FILE = "inference.json"
WEIGHTS_FILE = "model.pt"


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
    saved beside model.pt under their file names (e.g. the raw weights when model.pt is their EMA)."""
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
    for name, sd in {WEIGHTS_FILE: state_dict, **(extra_weights or {})}.items():
        cpu_state = {k: v.detach().to("cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype)
                     for k, v in sd.items()}
        torch.save(cpu_state, tmp / name)
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


def find_inference_dir(path: str | os.PathLike) -> Path:
    """Accepts an inference directory, a run directory, or a run's checkpoint directory."""
    p = Path(path).expanduser()
    for candidate in (p, p / INFERENCE_DIRNAME, p / "checkpoint" / INFERENCE_DIRNAME):
        if (candidate / META_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{p}' does not exist")
    raise FileNotFoundError(
        f"no inference checkpoint under '{p}': expected {META_FILE} and {WEIGHTS_FILE} in it or in "
        f"'{INFERENCE_DIRNAME}/' (a finished `mone train` run directory has one)"
    )


def load_inference(path: str | os.PathLike, device: str = "cpu") -> InferenceCheckpoint:
    import torch

    from models.vit import create_model

    d = find_inference_dir(path)
    meta = json.loads((d / META_FILE).read_text())
    m = meta["model"]
    model = create_model(m["variant"], num_classes=m["num_classes"], **m.get("overrides", {}))
    state = torch.load(d / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return InferenceCheckpoint(model=model, labels=meta["labels"], clip=meta["clip"], meta=meta, path=d)
