"""Typed job configs, loaded from YAML under jobs/configs/ and validated before Ray starts.

A config file names components (model variant, dataset layout, budgets); `key.sub=value` overrides on the
command line change single fields. Every mistake a user can make in a config (unknown key, unknown variant,
budget out of range, missing dataset) is reported here, with the fix, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "tiny_cpu"
# The paper's training set of budgets: e_c drawn per step uniformly from {0.15, 0.25, ..., 0.95}.
PAPER_TRAIN_BUDGETS = [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]


class ConfigError(ValueError):
    """A config value a job cannot run with; the message names the key and the fix."""


@dataclass
class SynthConfig:
    """The generated dataset used when `data.root` is empty (the embedded default)."""

    classes: int = 8
    videos_per_class: int = 60
    val_videos_per_class: int = 25
    frames: int = 8
    width: int = 64
    height: int = 64
    corrupt: int = 2
    seed: int = 0
    scene: str = "objects"  # objects (the demo) | clutter (one small object over a panning textured background)


@dataclass
class AugmentConfig:
    """Training augmentation; every piece is off at its default. Clip-level pieces run in the decode workers on
    uint8 frames with one parameter draw per clip (every frame gets the same op, magnitude, box); mixup/cutmix run
    in the train step on tokens. Label smoothing is `optim.label_smoothing`, stochastic depth `model.drop_path`."""

    randaugment_layers: int = 0  # RandAugment ops applied per clip (0 = off); ViViT SSv2: 2
    randaugment_magnitude: float = 9.0  # timm's scale: 10 = the strongest level of its op table, above 10 allowed
    color_jitter: float = 0.0  # brightness/contrast/saturation factors drawn from [1-s, 1+s] per clip (0 = off)
    scale_jitter: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [min, max] frame scale before the crop
    random_erasing: float = 0.0  # probability of erasing one box (same box in every frame) with noise
    mixup: float = 0.0  # mixup alpha (0 = off): float tokens mixed, lam ~ Beta(alpha, alpha)
    cutmix: float = 0.0  # cutmix alpha (0 = off): whole tubelets swapped, the same box in every frame
    mix_prob: float = 1.0  # probability that a batch is mixed at all (when mixup or cutmix is on)
    switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup for a batch


@dataclass
class DataConfig:
    layout: str = "ssv2"  # ssv2 | k400 | auto
    root: str = ""  # dataset root; empty = generate a synthetic one (cached under cache_dir)
    cache_dir: str = "~/.cache/mone"
    train_split: str = "train"
    val_split: str = "validation"
    synth: SynthConfig = field(default_factory=SynthConfig)
    num_frames: int = 8
    sampling: str = "segment"  # segment (SSv2) | dense (K400)
    stride: int = 2  # dense sampling only
    short_side: int = 64
    crop_size: int = 64
    tubelet_t: int = 2
    patch: int = 16
    flip: bool = False  # never for SSv2: left/right is in the labels
    train_crop: str = "random_resized"  # random_resized | random | center
    decoder: str = "auto"  # auto | decord | pyav
    decode_cpus: float = 0.25  # CPUs per decode task; leaves room for Train workers (STACK.md deadlock 1)
    decode_concurrency: int = 2
    max_error_fraction: float = 0.05
    val_views: str = "1x1"  # temporal x spatial views of the validation after every epoch (keep it cheap: 1x1)
    # The config's full view protocol (e.g. 4x3 for K400), run once after the last epoch over the final weights;
    # empty: none (the last per-epoch validation is the result).
    final_views: str = ""
    # Validation clips are the same every epoch (center crops, fixed sampling): each worker keeps its decoded val
    # batches in host memory after the first validation when they fit in this many MiB (0 = decode every epoch).
    # The demo's 400 clips take ~20 MiB per worker; a K400 val set does not fit and is decoded every epoch.
    val_cache_mb: int = 512
    clips_per_video: int = 1  # repeated sampling (VideoMAE's num_sample): k training clips per decoded video
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    variant: str = "vivit_tiny"
    init_from: str = ""  # a ViT/ViViT/timm state dict (.pt/.pth/.safetensors) or an inference checkpoint
    drop_path: float = 0.0  # stochastic depth: the last block's drop rate (linear from 0 over the blocks)
    overrides: dict[str, Any] = field(default_factory=dict)  # any models.vit.ModelConfig field, e.g. {pool: gap}


@dataclass
class OptimConfig:
    epochs: int = 12
    batch_size: int = 16  # per worker
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (SGD with momentum, as ViViT)
    momentum: float = 0.9  # sgd only
    # optim.lr and optim.min_lr are the rates for a global batch of this many clips; the job scales them linearly
    # to the real global batch (batch_size x num_workers x grad_accum). 0: take optim.lr as it is.
    lr_reference_batch: int = 256
    layer_decay: float = 1.0  # layer-wise lr decay: lr x layer_decay^(layers above); 1 = off
    ema_decay: float = 0.0  # EMA of the weights (e.g. 0.9999); 0 = off. When on, the inference checkpoint has it
    grad_accum: int = 1  # DeepSpeed gradient_accumulation_steps: micro-batches per optimizer step


@dataclass
class MoNEConfig:
    dense: bool = False  # True: dense baseline (e_c = 1 every step), same config otherwise
    # From scratch (no dense/nested checkpoint to start from, unlike the paper), train dense for these first
    # epochs so the features exist before the router starts cutting compute.
    dense_epochs: int = 0
    # Nested stage (MatViT/MatFormer), before the dense and MoNE stages: the widths D/8, D/4, D/2, D trained as
    # standalone sub-models. nested_mode: sum (the four widths' losses every step) | draw (one width per step).
    nested_epochs: int = 0
    nested_mode: str = "draw"
    train_budgets: list[float] = field(default_factory=lambda: list(PAPER_TRAIN_BUDGETS))
    isoflops: bool = False  # sample budgets so expected FLOPs per step match e_c = isoflops_target
    isoflops_target: float = 0.5
    val_budgets: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.5, 1.0])
    delta: float = 2.0
    beta: float = 10.0


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on purpose: Ray Data needs CPU too (STACK.md deadlock 1)
    gpus_per_worker: float = 1.0
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # Extra DeepSpeed config keys, merged over the generated config (jobs.train.deepspeed_config), e.g.
    # {zero_optimization: {reduce_bucket_size: 5.0e8, stage3_param_persistence_threshold: 0}}.
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = ""  # empty = derived from the config name; re-running a name resumes it
    storage_path: str = "runs"  # local dir, NFS mount, or s3:// / gs://
    seed: int = 0
    max_failures: int = 2
    checkpoint_every: int = 1  # epochs
    num_to_keep: int = 2
    log_every: int = 10  # steps
    record_shards: bool = False  # audit: write the clips each rank trained on per epoch to run_dir/shards/
    keep_best: str = ""  # a metric key (e.g. top1_ec0.3): also keep best/, the inference checkpoint of its best epoch
    tracking: list[str] = field(default_factory=list)  # beside TensorBoard (always on): mlflow, wandb
    mlflow_uri: str = ""  # a tracking server (http://host:5000) or a backend store (sqlite:///path/mlflow.db)
    wandb_project: str = "mone"
    wandb_mode: str = ""  # online | offline (no network needed) | "" = $WANDB_MODE, else online


@dataclass
class TrainConfig:
    name: str = DEFAULT_CONFIG
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mone: MoNEConfig = field(default_factory=MoNEConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def run_name(self) -> str:
        return self.run.name or self.name


# --------------------------------------------------------------------------- loading


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value or {}, path)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [v for v in str(value).split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}") from None
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "mone.val_budgets=[0.3,1.0]"]` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. optim.epochs=3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:  # e.g. "[1,2": kept as text, which the field's type check then names
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' not found: give a YAML path or one of: {available}")


def load_config(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, *,
                check_paths: bool = True) -> TrainConfig:
    """`check_paths=False` skips checking that data.root exists here (a dry run of a cluster's config)."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"config {path}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections (data:, model:, optim:, ...), "
                          f"got a {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = _from_dict(TrainConfig, raw, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    cfg = _from_dict(TrainConfig, raw, "")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _check_budgets(value: float | list[float], path: str) -> None:
    from models.budgets import ec_range, parse_budget_list

    lo, hi = ec_range()  # below 1/8 no capacity split exists: every token already sits on the D/8 expert
    try:
        parse_budget_list(value, what=path, low=lo, high=hi)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _choice(value: str, allowed: tuple[str, ...], path: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: '{value}' is not one of {', '.join(allowed)}")


def validate(cfg: TrainConfig, check_paths: bool = True) -> None:
    """Checks that need no Ray: values, ranges, names, paths. Resource checks happen in train.check_resources."""
    from models.vit import VARIANTS  # models/ is pure torch; importing it here costs ~1 s

    if cfg.model.variant not in VARIANTS:
        close = difflib.get_close_matches(cfg.model.variant, list(VARIANTS), n=3)
        raise ConfigError(
            f"model.variant: unknown variant '{cfg.model.variant}'"
            + (f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(VARIANTS))}")
        )
    d = cfg.data
    _choice(d.layout, ("ssv2", "k400", "auto"), "data.layout")
    _choice(d.synth.scene, ("objects", "clutter"), "data.synth.scene")
    _choice(d.sampling, ("segment", "dense"), "data.sampling")
    _choice(d.decoder, ("auto", "decord", "pyav"), "data.decoder")
    _choice(d.train_crop, ("random_resized", "random", "center"), "data.train_crop")
    if check_paths and d.root and "://" not in d.root and not Path(d.root).expanduser().exists():
        raise ConfigError(f"data.root: dataset path '{d.root}' does not exist (leave it empty to use generated data)")
    init = cfg.model.init_from
    if check_paths and init and "://" not in init and not Path(init).expanduser().exists():
        raise ConfigError(f"model.init_from: '{init}' does not exist (give a ViT/ViViT/timm state dict, an inference "
                          "checkpoint or the run directory of a finished run, e.g. the nested stage's)")
    if d.crop_size % d.patch:
        raise ConfigError(f"data.crop_size={d.crop_size} must be a multiple of data.patch={d.patch}")
    if d.num_frames % d.tubelet_t:
        raise ConfigError(f"data.num_frames={d.num_frames} must be a multiple of data.tubelet_t={d.tubelet_t}")
    _check_clip_fits_model(cfg)
    if not 0 <= d.max_error_fraction <= 1:
        raise ConfigError(f"data.max_error_fraction={d.max_error_fraction} must be in [0, 1]")
    for key in ("val_views", "final_views"):
        value = getattr(d, key)
        if key == "final_views" and not value:
            continue
        try:
            t, s = (int(v) for v in value.lower().split("x"))
            assert t >= 1 and s in (1, 3)
        except (ValueError, AssertionError):
            raise ConfigError(f"data.{key}='{value}' must look like 1x1 or 4x3 (temporal x spatial, spatial 1 or "
                              "3)") from None
    if d.val_cache_mb < 0:
        raise ConfigError(f"data.val_cache_mb={d.val_cache_mb} must be >= 0 (0 = decode the val set every epoch)")
    if d.clips_per_video < 1:
        raise ConfigError(f"data.clips_per_video={d.clips_per_video} must be >= 1 (clips drawn per decoded video)")
    _validate_augment(cfg)
    m = cfg.mone
    if not m.train_budgets:
        raise ConfigError("mone.train_budgets is empty: give at least one budget, e.g. [0.3]")
    _check_budgets(m.train_budgets, "mone.train_budgets")
    _check_budgets(m.val_budgets, "mone.val_budgets")
    _check_budgets(m.isoflops_target, "mone.isoflops_target")
    if m.dense_epochs < 0:  # more than optim.epochs simply means a dense run (short test runs of a MoNE config)
        raise ConfigError(f"mone.dense_epochs={m.dense_epochs} must be >= 0")
    o = cfg.optim
    for name in ("epochs", "batch_size"):
        if getattr(o, name) < 1:
            raise ConfigError(f"optim.{name}={getattr(o, name)} must be >= 1")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0")
    _validate_recipe(cfg)
    s = cfg.scaling
    if s.num_workers < 1:
        raise ConfigError(f"scaling.num_workers={s.num_workers} must be >= 1")
    if s.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"scaling.zero_stage={s.zero_stage} must be 0, 1, 2 or 3")
    _choice(s.precision, ("auto", "fp32", "bf16"), "scaling.precision")
    if not s.use_gpu and s.precision == "bf16":
        # bf16 matmuls ran ~5x slower than fp32 on these CPUs (no bf16 units).
        raise ConfigError("scaling.precision=bf16 needs scaling.use_gpu=true; on CPU use fp32 (or auto)")
    _validate_run(cfg.run, cfg)


def epoch_metric_keys(cfg: TrainConfig) -> list[str]:
    """The keys of a training run's per-epoch metrics (metrics.jsonl) that `run.keep_best` may name."""
    per_budget = ("top1", "top5", "mean_class", "gflops", "clips_per_s")
    keys = ["train_loss", "train_clips_per_s", "lr", "data_wait_s", "data_wait_fraction", "train_steps", "val_clips"]
    return keys + [f"{k}_ec{b}" for b in cfg.mone.val_budgets for k in per_budget]


def _validate_run(r: RunConfig, cfg: TrainConfig) -> None:
    import importlib.util

    for i, backend in enumerate(r.tracking):
        _choice(backend, ("tensorboard", "mlflow", "wandb"), f"run.tracking[{i}]")
        if backend != "tensorboard" and importlib.util.find_spec(backend) is None:
            raise ConfigError(f"run.tracking: {backend} is not installed; pip install -e '.[{backend}]' "
                              f"(or drop {backend} from run.tracking)")
    if "mlflow" in r.tracking and not r.mlflow_uri:
        raise ConfigError("run.tracking includes mlflow but run.mlflow_uri is empty; set run.mlflow_uri="
                          "http://HOST:5000 (a tracking server) or sqlite:///PATH/mlflow.db")
    _choice(r.wandb_mode, ("", "online", "offline"), "run.wandb_mode")
    if r.keep_best and r.keep_best not in epoch_metric_keys(cfg):
        known = epoch_metric_keys(cfg)
        close = difflib.get_close_matches(r.keep_best, known, n=1)
        raise ConfigError(f"run.keep_best: '{r.keep_best}' is not a metric of this run"
                          + (f"; did you mean '{close[0]}'?" if close else f"; one of {', '.join(known)}"))


def _check_clip_fits_model(cfg: TrainConfig) -> None:
    """The clips the pipeline cuts must be the tokens the model was built for: crop = img_size, same frames,
    tubelet and patch. Otherwise the first batch fails inside the model, on every worker, after Ray started."""
    from models.vit import ModelConfig as ModelShape
    from models.vit import get_config

    m, d = cfg.model, cfg.data
    known = [f.name for f in fields(ModelShape) if f.name != "name"]
    for key in m.overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
            raise ConfigError(f"model.overrides.{key}: not a model setting; {hint}")
    try:
        model = get_config(m.variant, **m.overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides {m.overrides}: {e}") from None
    pairs = (("crop_size", d.crop_size, "img_size", model.img_size), ("num_frames", d.num_frames, "num_frames",
             model.num_frames), ("tubelet_t", d.tubelet_t, "tubelet_t", model.tubelet_t),
             ("patch", d.patch, "patch_size", model.patch_size))
    for data_key, have, model_key, want in pairs:
        if have != want:
            raise ConfigError(
                f"data.{data_key}={have} does not match model {m.variant} ({model_key}={want}); set "
                f"model.overrides.{model_key}={have} (position embeddings are resampled when loading "
                f"model.init_from) or data.{data_key}={want}"
            )


def _validate_recipe(cfg: TrainConfig) -> None:
    """Optimiser and training-stage settings (issue 10's recipe)."""
    o, m = cfg.optim, cfg.mone
    _choice(o.optimizer, ("adamw", "sgd"), "optim.optimizer")
    _choice(m.nested_mode, ("sum", "draw"), "mone.nested_mode")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum={o.momentum} must be in [0, 1) (0.9 is usual)")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay={o.layer_decay} must be in (0, 1] (1 = off; 0.75 is usual)")
    if not 0 <= o.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay={o.ema_decay} must be in [0, 1) (0 = off; 0.9999 is usual)")
    if o.ema_decay and cfg.scaling.zero_stage == 3:
        raise ConfigError("optim.ema_decay needs scaling.zero_stage <= 2: under ZeRO-3 no rank holds the whole "
                          "weights to average; set scaling.zero_stage=2 or optim.ema_decay=0")
    if o.grad_accum < 1:
        raise ConfigError(f"optim.grad_accum={o.grad_accum} must be >= 1 (micro-batches per optimizer step)")
    if o.lr_reference_batch < 0:
        raise ConfigError(f"optim.lr_reference_batch={o.lr_reference_batch} must be >= 0 (0: optim.lr as given)")
    if m.nested_epochs < 0:
        raise ConfigError(f"mone.nested_epochs={m.nested_epochs} must be >= 0")


def _validate_augment(cfg: TrainConfig) -> None:
    a, where = cfg.data.augment, "data.augment"
    if a.randaugment_layers < 0 or a.randaugment_magnitude < 0:
        raise ConfigError(f"{where}.randaugment_layers/_magnitude must be >= 0 (layers 0 = off), got "
                          f"{a.randaugment_layers}/{a.randaugment_magnitude}")
    if not 0 <= a.color_jitter < 1:
        raise ConfigError(f"{where}.color_jitter={a.color_jitter} must be in [0, 1) (0 = off; 0.4 is usual)")
    lo_hi = a.scale_jitter
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise ConfigError(f"{where}.scale_jitter={lo_hi} must be [min, max] with 0 < min <= max, e.g. [0.9, 1.33] "
                          "([1, 1] = off)")
    if tuple(lo_hi) != (1.0, 1.0) and cfg.data.train_crop == "random_resized":
        raise ConfigError(f"{where}.scale_jitter={lo_hi} and data.train_crop=random_resized both rescale the crop; "
                          "with scale jitter set data.train_crop=random")
    for name in ("random_erasing", "mix_prob", "switch_prob"):
        if not 0 <= getattr(a, name) <= 1:
            raise ConfigError(f"{where}.{name}={getattr(a, name)} is a probability: give a value in [0, 1]")
    for name in ("mixup", "cutmix"):
        if getattr(a, name) < 0:
            raise ConfigError(f"{where}.{name}={getattr(a, name)} is a Beta alpha: give a value >= 0 (0 = off)")
    if not 0 <= cfg.model.drop_path < 1:
        raise ConfigError(f"model.drop_path={cfg.model.drop_path} must be in [0, 1) (0 = off)")
    if "drop_path" in cfg.model.overrides:
        raise ConfigError("model.overrides.drop_path: set model.drop_path instead (one place for stochastic depth)")
    if not 0 <= cfg.optim.label_smoothing < 1:
        raise ConfigError(f"optim.label_smoothing={cfg.optim.label_smoothing} must be in [0, 1)")


def dump_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
