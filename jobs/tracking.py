"""Experiment tracking of `mone train` (and of every `mone tune train` trial): TensorBoard always; MLflow and
Weights & Biases when `run.tracking` names them.

One `Tracker`, created on rank 0 by the train loop (`open_tracker`; other ranks get a no-op one), sends every
record to each backend:
- per logged step, `train/`: loss, lr, e_c, clips_per_s, data_wait_s (seconds the step waited for its batch) and
  data_wait_fraction (share of step time spent waiting so far this epoch, jobs.progress);
- per epoch: every numeric key of the epoch's metrics line, so whatever a stage reports is tracked without code
  here: `val/top1_ec0.3`, `val/top5_ec0.3`, `val/mean_class_ec0.3`, `val/gflops_ec0.3`, per-width accuracies of a
  nested stage, ...; keys of the training side (`train_*`, lr, data-wait) under `epoch/`;
- figures (accuracy vs GFLOPs each epoch, validation confusion matrices) as images.

TensorBoard: event files in `<run>/tensorboard/`, written there directly on local disk or NFS; for s3:// / gs://
storage they are written to a local folder and copied up after every epoch. A resumed run's writer purges the
events past the checkpoint's step, so no curve is drawn twice. MLflow: the client API (what Ray's docs advise
inside a Train V2 loop), one MLflow run per training run, found again on resume by its tag `mone.run_dir`.
W&B: `wandb.init(id=<from the run directory>, resume="allow")`; `run.wandb_mode: offline` needs no network and
leaves `<run>/wandb/` for `wandb sync`. A backend that fails during training is switched off with one warning:
tracking never kills a run.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from jobs import run_files

TB_DIRNAME = "tensorboard"
RUN_DIR_TAG = "mone.run_dir"
# Keys of the per-epoch metrics that describe the training side; everything else is a validation figure.
TRAIN_SIDE = ("lr", "data_wait_s", "data_wait_fraction")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Every finite numeric value of an epoch's metrics line, under its tag (`val/KEY` or `epoch/KEY`); a nested
    section (e.g. `val_final`, the full view protocol after the last epoch) as `SECTION/KEY`."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": float(vv) for kk, vv in v.items() if isinstance(vv, (int, float))
                        and not isinstance(vv, bool) and math.isfinite(vv)})
            continue
        if k in ("epoch", "global_step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            continue
        side = "epoch" if k.startswith("train_") or k in TRAIN_SIDE else "val"
        out[f"{side}/{k}"] = float(v)
    return out


def png_to_array(png: bytes):
    """PNG bytes -> (H, W, 3) uint8."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(io.BytesIO(png), format="png")  # (H, W, 3|4), float in [0, 1]
    return np.ascontiguousarray((np.clip(img[..., :3], 0, 1) * 255).round().astype(np.uint8))


# =========================================================================== backends


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: str, start_step: int, config_text: str):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = run_files.join(run_dir, TB_DIRNAME) if run_files.is_remote(run_dir) else None
        self.local = tempfile.mkdtemp(prefix="mone-tb-") if self.remote else run_files.join(run_dir, TB_DIRNAME)
        # purge_step: TensorBoard hides what an interrupted run logged past the checkpoint it resumes from.
        self.writer = SummaryWriter(self.local, purge_step=start_step or None, flush_secs=30)
        if start_step == 0:
            self.writer.add_text("config", "    " + config_text.replace("\n", "\n    "), 0)  # indented: verbatim

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        self.writer.add_image(tag, png_to_array(png), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(self.remote)
            fs.create_dir(path, recursive=True)
            pafs.copy_files(self.local, path, destination_filesystem=fs)

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self.flush()
            shutil.rmtree(self.local, ignore_errors=True)


class _MLflow:
    name = "mlflow"

    def __init__(self, cfg, run_dir: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.run.mlflow_uri)
        exp = self.client.get_experiment_by_name(cfg.name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.name)
        quoted = run_dir.replace("'", "\\'")
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{quoted}'", max_results=1)
        if found:  # a resumed training run continues its MLflow run
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=cfg.run_name, tags={RUN_DIR_TAG: run_dir}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(cfg.to_dict()).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def image(self, tag: str, png: bytes, step: int) -> None:
        with tempfile.TemporaryDirectory() as d:  # the latest version of each figure, as an artifact
            path = os.path.join(d, tag.replace("/", "_") + ".png")
            with open(path, "wb") as f:
                f.write(png)
            self.client.log_artifact(self.run_id, path, artifact_path="figures")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


class _WandB:
    name = "wandb"

    def __init__(self, cfg, run_dir: str):
        import wandb

        self.wandb = wandb
        self.run_dir = run_dir
        self.tmp = tempfile.mkdtemp(prefix="mone-wandb-") if run_files.is_remote(run_dir) else None
        run_id = hashlib.sha1(run_dir.encode()).hexdigest()[:16]  # the same W&B run when this run resumes
        self.run = wandb.init(project=cfg.run.wandb_project, name=cfg.run_name, id=run_id, resume="allow",
                              dir=self.tmp or run_dir, config=cfg.to_dict(), mode=cfg.run.wandb_mode or None,
                              settings=wandb.Settings(console="off", silent=True))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        self.run.log({tag: self.wandb.Image(png_to_array(png))}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()
        # wandb-core writes the run file out when its service stops; Ray may end this worker without the exit
        # hooks that would stop it, so stop it here.
        self.wandb.teardown()
        if self.tmp:  # remote storage: W&B's local files (an offline run: for `wandb sync`) go beside the run
            run_files.upload_dir(os.path.join(self.tmp, "wandb"), run_files.join(self.run_dir, "wandb"))
            shutil.rmtree(self.tmp, ignore_errors=True)


# =========================================================================== the tracker


class Tracker:
    """Sends step and epoch records to every configured backend (rank 0 only)."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def _each(self, method: str, *args: Any) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001 -- a tracking outage must not end the training run
                print(f"[mone] warning: {b.name} tracking failed ({type(e).__name__}: {e}); it is off for the rest "
                      "of this run", flush=True)
                self.backends.remove(b)

    def log_step(self, step: int, **values: float) -> None:
        """Per logged training step: loss, lr, e_c, clips_per_s, data_wait_s, ... (as `train/NAME`)."""
        self._each("scalars", step, {f"train/{k}": float(v) for k, v in values.items() if v is not None})

    def log_epoch(self, step: int, metrics: dict[str, Any],
                  figures: Callable[[], dict[str, bytes]] | None = None) -> None:
        """Every numeric key of an epoch's metrics line, and the figures `figures()` draws (PNG bytes by tag; drawn
        only where a backend is open, and a figure that fails is skipped with a warning); then flushes."""
        if not self.backends:
            return
        self._each("scalars", step, epoch_scalars(metrics))
        try:
            pngs = figures() if figures else {}
        except Exception as e:  # noqa: BLE001 -- a plot must not end the training run
            print(f"[mone] warning: epoch figures not drawn ({type(e).__name__}: {e})", flush=True)
            pngs = {}
        for tag, png in pngs.items():
            self._each("image", tag, png, step)
        self._each("flush")

    def close(self) -> None:
        self._each("close")
        self.backends = []


def open_tracker(cfg, run_dir: str, *, rank: int, start_step: int = 0) -> Tracker:
    """The run's tracker on rank 0 (TensorBoard + what `run.tracking` names); a tracker without backends elsewhere.
    Opening fails loudly (before any step is taken); logging later never does."""
    if rank != 0:
        return Tracker([])
    import yaml

    backends: list[Any] = [_TensorBoard(run_dir, start_step, yaml.safe_dump(cfg.to_dict(), sort_keys=False))]
    if "mlflow" in cfg.run.tracking:
        backends.append(_MLflow(cfg, run_dir))
    if "wandb" in cfg.run.tracking:
        backends.append(_WandB(cfg, run_dir))
    return Tracker(backends)


def preflight(cfg) -> None:
    """On the driver, before Ray starts: an MLflow tracking server named by run.mlflow_uri must answer."""
    from jobs.config import ConfigError

    if "mlflow" not in cfg.run.tracking or not cfg.run.mlflow_uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"})
    try:
        MlflowClient(tracking_uri=cfg.run.mlflow_uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 -- any failure means: no usable server there
        raise ConfigError(f"run.mlflow_uri={cfg.run.mlflow_uri}: no MLflow tracking server answers ({type(e).__name__})"
                          "; start one (mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000) or fix "
                          "the URI") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
