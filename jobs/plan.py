"""`mone train --dry-run`: what a config will do, resolved, before anything starts.

The plan: the training stages, the initialisation, augmentation and regularisation, the global batch and the lr
scaled to it, optimizer steps per epoch, and the GFLOPs per view (the paper's convention: a multiply-add is one
FLOP) at every validation budget. Needs no Ray and no GPU; the dataset need not be on this machine (the train
split's size is then its published size, marked as an estimate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs import optim as recipe
from jobs.config import TrainConfig

# Published train split sizes, for a plan made where the dataset is not mounted (ViViT's Scenic configs).
PUBLISHED_TRAIN_CLIPS = {"k400": 214_834, "ssv2": 168_913}

STAGE_TEXT = {
    "nested": "nested (MatViT): widths D/8, D/4, D/2, D each trained as a standalone model ({mode})",
    "dense": "dense: every token on the full width (e_c = 1)",
    "mone": "MoNE: e_c drawn per step from {budgets}",
}


def train_clips(cfg: TrainConfig) -> tuple[int | None, str]:
    """(clips in the train split, where the number comes from)."""
    d = cfg.data
    if not d.root:
        return d.synth.classes * d.synth.videos_per_class, "generated dataset (data.synth)"
    if "://" not in d.root and Path(d.root).expanduser().exists():
        from pipeline.manifest import build_manifest, select_split

        table = select_split(build_manifest(d.root, d.layout).table, d.train_split)
        return table.num_rows, f"manifest of {d.root}"
    n = PUBLISHED_TRAIN_CLIPS.get(d.layout)
    return n, (f"estimate: published {d.layout} train size (data.root {d.root} not found here)" if n
               else f"unknown: data.root {d.root} not found here")


def augmentation(cfg: TrainConfig) -> dict[str, Any]:
    """Augmentation and regularisation settings as the run will use them."""
    out: dict[str, Any] = {}
    aug = getattr(cfg.data, "augment", None)  # data.augment (issue 10, engineer "augment")
    if aug is None:
        out["data.augment"] = "not in this checkout (mixup, cutmix, randaugment, random erasing: none applied)"
    else:
        for key in ("mixup", "cutmix", "randaugment_layers", "randaugment_magnitude", "random_erasing",
                    "color_jitter", "scale_jitter"):
            if hasattr(aug, key):
                out[f"data.augment.{key}"] = getattr(aug, key)
    out["data.train_crop"] = cfg.data.train_crop
    out["data.flip"] = cfg.data.flip
    out["optim.label_smoothing"] = cfg.optim.label_smoothing
    out["model.drop_path"] = getattr(cfg.model, "drop_path", cfg.model.overrides.get("drop_path", 0.0))
    return out


def describe(cfg: TrainConfig) -> dict[str, Any]:
    """The plan as a dict (printed by `mone train --dry-run`, also its final JSON line)."""
    from models.capacity import capacities_for_budget
    from models.flops import model_flops
    from models.vit import create_model, num_params

    m = cfg.mone
    model = create_model(cfg.model.variant, num_classes=2, **cfg.model.overrides)
    lr, floor = recipe.scaled_lr(cfg)
    n_train, source = train_clips(cfg)
    clips_per_video = getattr(cfg.data, "clips_per_video", 1)  # repeated sampling: clips drawn per decoded video
    steps = recipe.steps_per_epoch(cfg, n_train * clips_per_video) if n_train else None
    budgets = [1.0] if m.dense else m.train_budgets
    stages = [{"stage": s.name, "epochs": [s.first_epoch + 1, s.last_epoch],
               "trains": STAGE_TEXT[s.name].format(mode=f"mone.nested_mode={m.nested_mode}", budgets=budgets)}
              for s in recipe.stages(cfg)]
    t_views, s_views = (int(v) for v in cfg.data.val_views.lower().split("x"))
    flops = {}
    for b in m.val_budgets:
        caps = None if b >= 1.0 else capacities_for_budget(b, delta=m.delta, beta=m.beta)
        flops[f"ec{b}"] = round(model_flops(model.cfg, capacities=caps) / 2e9, 4)
    o = cfg.optim
    return {
        "config": cfg.name,
        "run_dir": f"{cfg.run.storage_path.rstrip('/')}/{cfg.run_name}",
        "model": {"variant": cfg.model.variant, "params_M": round(num_params(model) / 1e6, 2),
                  "img_size": model.cfg.img_size, "frames": model.cfg.num_frames, "pool": model.cfg.pool,
                  "init_from": cfg.model.init_from or "(random initialisation)"},
        "stages": stages,
        "augmentation": augmentation(cfg),
        "optimisation": {
            "optimizer": o.optimizer + (f" (momentum {o.momentum})" if o.optimizer == "sgd" else ""),
            "global_batch": recipe.global_batch(cfg),
            "global_batch_is": f"{o.batch_size} per worker x {cfg.scaling.num_workers} workers x {o.grad_accum} "
                               "accumulated",
            "lr_given": o.lr, "lr_reference_batch": o.lr_reference_batch, "lr": lr, "min_lr": floor,
            "warmup_epochs": o.warmup_epochs, "schedule": "linear warm-up, cosine to min_lr",
            "weight_decay": o.weight_decay, "layer_decay": o.layer_decay, "grad_clip": o.grad_clip,
            "ema_decay": o.ema_decay or "off",
        },
        "epochs": o.epochs,
        "train_clips": n_train, "train_clips_source": source, "clips_per_video": clips_per_video,
        "steps_per_epoch": steps, "total_steps": steps * o.epochs if steps else None,
        "validation": {"budgets": list(m.val_budgets), "views_per_clip": t_views * s_views,
                       "views": cfg.data.val_views, "final_views": getattr(cfg.data, "final_views", "") or "none",
                       "gflops_per_view": flops,
                       "flops_convention": "GFLOPs per view as the paper counts them (a multiply-add = 1 FLOP)"},
        "scaling": {"workers": cfg.scaling.num_workers, "gpu": cfg.scaling.use_gpu,
                    "zero_stage": cfg.scaling.zero_stage, "precision": cfg.scaling.precision},
    }


def format_plan(plan: dict[str, Any]) -> str:
    o, v = plan["optimisation"], plan["validation"]
    lines = [f"# plan for {plan['config']}  (run directory {plan['run_dir']})",
             f"model       {plan['model']['variant']} ({plan['model']['params_M']} M params, "
             f"{plan['model']['frames']} frames x {plan['model']['img_size']} px, pool {plan['model']['pool']}); "
             f"init_from: {plan['model']['init_from']}",
             "stages"]
    lines += [f"  epochs {s['epochs'][0]}-{s['epochs'][1]}: {s['trains']}" for s in plan["stages"]]
    lines.append("augmentation / regularisation")
    lines += [f"  {k} = {val}" for k, val in plan["augmentation"].items()]
    lines += [
        f"optimizer   {o['optimizer']}, weight decay {o['weight_decay']}, layer decay {o['layer_decay']}, "
        f"grad clip {o['grad_clip']}, EMA {o['ema_decay']}",
        f"batch       global {o['global_batch']} = {o['global_batch_is']}",
        f"lr          {o['lr_given']:g} per {o['lr_reference_batch'] or o['global_batch']} clips -> {o['lr']:.4g} at "
        f"this global batch (floor {o['min_lr']:.3g}); {o['schedule']} over {o['warmup_epochs']} epochs",
        f"steps       {plan['steps_per_epoch']} optimizer steps per epoch x {plan['epochs']} epochs = "
        f"{plan['total_steps']} ({plan['train_clips']} train videos x {plan['clips_per_video']} clip(s): "
        f"{plan['train_clips_source']})",
        f"validation  every epoch {v['views']} view(s) per clip; after the last epoch {v['final_views']}; "
        "GFLOPs per view (paper convention, multiply-add = 1):",
    ]
    lines += [f"  e_c {k[2:]:<5} {g:10.4g}" for k, g in v["gflops_per_view"].items()]
    return "\n".join(lines)
