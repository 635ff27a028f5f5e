"""Data glue for the jobs: the embedded synthetic dataset, manifests, Ray Data streams, batches on the worker.

pipeline/ does the work (manifests, decoding, sampling, tokens, Ray Data); this module only chooses what the
job asks for from the config and hands the streams to Ray Train.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, TrainConfig


@dataclass
class PreparedData:
    root: str
    layout: str
    labels: list[str]
    train_manifest: Any  # pyarrow.Table
    val_manifest: Any
    train_clip: dict[str, Any]
    eval_clip: dict[str, Any]  # the per-epoch validation's views (data.val_views)
    missing: list[str] = field(default_factory=list)
    final_clip: dict[str, Any] | None = None  # the full view protocol after the last epoch (data.final_views)

    @property
    def num_train(self) -> int:
        return self.train_manifest.num_rows

    @property
    def num_val(self) -> int:
        return self.val_manifest.num_rows


def split_config():
    """Every dataset is split across workers with equal row counts (Ray's streaming_split(equal=True)):
    with drop_last, every rank takes the same number of steps, so no collective waits on a missing rank."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all")


def iter_batches(shard, batch_size: int, device, *, train: bool) -> Iterator[dict[str, Any]]:
    """Batches of a worker's shard, on its device. Training drops the last partial batch (equal step counts)."""
    import torch

    from pipeline.dataset import TorchCollate

    collate = TorchCollate(pin=torch.device(device).type == "cuda")  # pinned: asynchronous copies to the GPU
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=train, collate_fn=collate,
                                          prefetch_batches=2):
        yield {
            "tokens": batch["tokens"].to(device, non_blocking=True),
            "label": batch["label"].to(device, non_blocking=True),
            "path": batch["path"],
        }


# --------------------------------------------------------------------------- driver side


def synthetic_root(cfg: TrainConfig) -> Path:
    """Where the embedded dataset for this config lives: one folder per distinct set of synth settings."""
    synth = asdict(cfg.data.synth)
    if synth["scene"] == "objects":  # the original scene keeps the folder it had before scenes existed
        del synth["scene"]
    key = json.dumps({"layout": cfg.data.layout, **synth}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    layout = "ssv2" if cfg.data.layout == "auto" else cfg.data.layout
    return Path(cfg.data.cache_dir).expanduser() / f"synth-{layout}-{digest}"


def ensure_synthetic(cfg: TrainConfig) -> Path:
    """Generates the synthetic dataset once (into a temporary folder renamed into place), then reuses it."""
    import shutil
    import tempfile

    from pipeline.synth import generate

    root = synthetic_root(cfg)
    if (root / "synth.json").is_file():
        return root
    s = cfg.data.synth
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    print(f"[mone] generating the synthetic {root.name.split('-')[1]} dataset ({s.classes} classes x "
          f"{s.videos_per_class} train videos) into {root} (once; cached)", flush=True)
    try:
        generate(tmp, layout="ssv2" if cfg.data.layout == "auto" else cfg.data.layout, classes=s.classes,
                 videos_per_class=s.videos_per_class, val_videos_per_class=s.val_videos_per_class,
                 test_videos_per_class=0, corrupt=s.corrupt, width=s.width, height=s.height, frames=s.frames,
                 seed=s.seed, scene=s.scene)
        if root.exists():  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def clip_spec_dict(cfg: TrainConfig, *, train: bool, views: str | None = None) -> dict[str, Any]:
    """The ClipSpec fields of the training clips, or of evaluation with `views` (default data.val_views)."""
    d = cfg.data
    t_views, s_views = (1, 1) if train else (int(v) for v in (views or d.val_views).lower().split("x"))
    return {
        "num_frames": d.num_frames, "sampling": d.sampling, "stride": d.stride, "short_side": d.short_side,
        "crop_size": d.crop_size, "tubelet_t": d.tubelet_t, "patch": d.patch, "train": train,
        "flip": d.flip and train, "temporal_views": t_views, "spatial_views": s_views, "train_crop": d.train_crop,
        **({"augment": clip_augment_dict(cfg)} if train else {}),
    }


def clip_augment_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The decode-worker part of data.augment (pipeline.augment.ClipAugment); mixup/cutmix run in the train step."""
    a = cfg.data.augment
    return {"randaugment_layers": a.randaugment_layers, "randaugment_magnitude": a.randaugment_magnitude,
            "color_jitter": a.color_jitter, "random_erasing": a.random_erasing, "scale_jitter": list(a.scale_jitter)}


def prepare(cfg: TrainConfig) -> PreparedData:
    """Dataset root (generated if the config names none) -> train/val manifests and the label map."""
    from pipeline.manifest import build_manifest

    root = str(ensure_synthetic(cfg)) if not cfg.data.root else cfg.data.root
    m = build_manifest(root, cfg.data.layout)
    from pipeline.manifest import ManifestError, select_split

    try:
        train = select_split(m.table, cfg.data.train_split)
        val = select_split(m.table, cfg.data.val_split)
    except ManifestError as e:
        raise ConfigError(f"data.train_split / data.val_split: {e}") from None
    for name, table, split in (("train", train, cfg.data.train_split), ("val", val, cfg.data.val_split)):
        if table.num_rows == 0:
            splits = sorted(set(m.table.column("split").to_pylist()))
            raise ConfigError(f"data: the {name} split '{split}' of {root} has no videos; splits found: {splits} "
                             f"(set data.train_split / data.val_split)")
    return PreparedData(root=root, layout=m.layout, labels=list(m.labels), train_manifest=train, val_manifest=val,
                        train_clip=clip_spec_dict(cfg, train=True), eval_clip=clip_spec_dict(cfg, train=False),
                        missing=list(m.missing), final_clip=final_clip_spec(cfg))


def final_clip_spec(cfg: TrainConfig) -> dict[str, Any] | None:
    """The full view protocol run once after the last epoch, or None when the per-epoch validation is it."""
    final = cfg.data.final_views.lower()
    if not final or final == cfg.data.val_views.lower():
        return None
    return clip_spec_dict(cfg, train=False, views=final)


def ray_datasets(cfg: TrainConfig, data: PreparedData) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train and val streams, and their error logs (actors the workers and the driver share).

    Training randomness (sampling offsets, crops, flips, order) is seeded per clip from (seed, epoch, path); the
    workers tell the train log the epoch they are in. Validation is fixed (epoch 0, test-mode sampling)."""
    from pipeline.dataset import ErrorLog, build_dataset
    from pipeline.sampling import ClipSpec

    d = cfg.data
    datasets, logs = {}, {}
    streams = [("train", data.train_manifest, data.train_clip, None, d.clips_per_video),
               ("val", data.val_manifest, data.eval_clip, 0, 1)]
    if data.final_clip is not None:
        streams.append((FINAL_EVAL, data.val_manifest, data.final_clip, 0, 1))
    for name, manifest, clip, epoch, k in streams:
        logs[name] = ErrorLog(manifest.num_rows, d.max_error_fraction)
        datasets[name] = build_dataset(
            manifest, ClipSpec(**clip), decoder=d.decoder, concurrency=(1, max(1, d.decode_concurrency)),
            num_cpus_per_task=d.decode_cpus, seed=cfg.run.seed, epoch=epoch, error_log=logs[name],
            max_error_fraction=d.max_error_fraction, clips_per_video=k,
        )
    return datasets, logs


FINAL_EVAL = "val_final"  # the dataset (and metrics key prefix) of the full-protocol evaluation after training


def train_clips(cfg: TrainConfig, num_videos: int) -> int:
    """Training rows per epoch: data.clips_per_video clips of every video."""
    return num_videos * cfg.data.clips_per_video


def write_errors(logs: dict[str, Any], run_dir: str) -> int:
    """errors.parquet in the run directory (path, stage, error; one row per bad file); returns its row count."""
    import tempfile

    import pyarrow.parquet as pq

    from jobs import run_files
    from pipeline.dataset import ERRORS_FILE, errors_table

    rows = []
    for log in logs.values():
        rows += log.errors()
    seen, unique = set(), []
    for r in rows:
        if r["path"] not in seen:
            seen.add(r["path"])
            unique.append({"path": r["path"], "stage": r["stage"], "error": r["error"]})
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(errors_table(unique), Path(tmp) / ERRORS_FILE)
        run_files.write_bytes(run_files.join(run_dir, ERRORS_FILE), (Path(tmp) / ERRORS_FILE).read_bytes())
    return len(unique)
