"""Shared helpers for the evaluate / visualize tests: a tiny synthetic archive and a tiny trained checkpoint.

Both are built once per test session under a cache folder keyed by their parameters (a few seconds each), so the
test modules that use them stay fast and independent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

CLIP = {"num_frames": 8, "sampling": "dense", "stride": 2, "short_side": 64, "crop_size": 64, "tubelet_t": 2,
        "patch": 8, "train": False, "flip": False, "temporal_views": 1, "spatial_views": 1}
SYNTH = {"classes": 3, "videos_per_class": 6, "val_videos_per_class": 2, "test_videos_per_class": 0, "corrupt": 3,
         "width": 80, "height": 64, "frames": 16, "fps": 8, "seed": 3}


def make_archive(root: Path) -> Path:
    """A K400-layout synthetic archive: 3 classes, 24 good videos, 3 corrupt (truncated, empty, garbage)."""
    from pipeline.synth import generate

    root = Path(root)
    done = root / "synth.json"
    if not done.exists():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, "k400", progress=False, workers=1, **SYNTH)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def make_checkpoint(out: Path, archive: Path, steps: int = 60) -> Path:
    """vivit_tiny trained a few steps on the archive's train split (so predictions are not all one class),
    saved with jobs.checkpoint.save_inference."""
    import torch

    from jobs.checkpoint import save_inference
    from jobs.evaluate import video_tokens
    from models.vit import create_model
    from pipeline.manifest import build_manifest
    from pipeline.sampling import ClipSpec

    out = Path(out)
    if (out / "inference.json").exists():
        return out
    m = build_manifest(archive)
    spec = ClipSpec(**CLIP)
    xs, ys = [], []
    for row in m.split("train").to_pylist():
        try:
            xs.append(video_tokens(row["path"], spec)[0])  # (L, K)
            ys.append(row["label"])
        except Exception:  # noqa: BLE001 -- the corrupt files
            continue
    x = torch.from_numpy(np.stack(xs))  # (N, L, K) uint8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core box spin-wait: ~50x slower than 1
    y = torch.tensor(ys)
    torch.manual_seed(0)
    model = create_model("vivit_tiny", num_classes=len(m.labels))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    budgets = [0.25, 0.35, 0.5, 0.75, 1.0]
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(x), size=min(8, len(x)), replace=False))
        loss = torch.nn.functional.cross_entropy(model.forward_tokens(x[idx], budget=float(rng.choice(budgets))),
                                                 y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    save_inference(out, model.state_dict(), variant="vivit_tiny", num_classes=len(m.labels), labels=m.labels,
                   clip=CLIP, extra={"train_budgets": budgets, "run": {"name": "test"}})
    (out.parent / "labels.json").write_text(json.dumps({"labels": m.labels}))
    return out


def assets(tmp_path_factory) -> tuple[Path, Path]:
    """(archive root, checkpoint dir), built once per pytest session (both test modules share the folder)."""
    base = tmp_path_factory.getbasetemp() / "mone_eval_assets"
    base.mkdir(exist_ok=True)
    archive = make_archive(base / "archive")
    return archive, make_checkpoint(base / "run" / "inference", archive)


DECODE_LOG_ENV = "MONE_TEST_DECODE_LOG"


def count_decodes() -> None:
    """A Ray worker_process_setup_hook: every call of pipeline.dataset.load_clip (the decode of one video, in
    whichever process it runs) appends the video's path to the file named by $MONE_TEST_DECODE_LOG."""
    log = os.environ.get(DECODE_LOG_ENV)
    if not log:
        return
    import pipeline.dataset as dataset

    original = dataset.load_clip

    def counted(path, *args, **kwargs):
        with open(log, "a") as f:  # one short O_APPEND write per call: lines of parallel tasks do not mix
            f.write(f"{path}\n")
        return original(path, *args, **kwargs)

    dataset.load_clip = counted
