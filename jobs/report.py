"""Figures and tables of a run, and `<run>/report.html`: one self-contained page (no external files) to look at
after training.

- `confusion_table` / `write_confusion`: confusion matrices as a sparse Parquet table (budget, e_c, true_id,
  true_label, pred_id, pred_label, count; zero cells left out), for `mone evaluate`'s `OUT_STEM.confusion.parquet`
  and training's `val_confusion.parquet` (the latest epoch).
- `confusion_png`: a confusion matrix that stays readable with 400 classes: rows normalised to the fraction of
  each true class, classes sorted by their accuracy (the same order on both axes, so the diagonal stays the
  diagonal), class names as ticks only up to `TICK_LABELS_UP_TO` classes, and the most frequent confusions listed
  by name beside it.
- `epoch_figures`: what the tracker logs each epoch (accuracy vs GFLOPs; confusion matrices at the last epoch).
- `write_run_report`: config, per-epoch curves (loss, top-1 per budget, data-wait), the accuracy-vs-GFLOPs plot,
  the routing picture of a few validation videos, the latest validation confusion matrices, and errors.parquet as a
  table. Images are embedded as data: URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs import run_files

REPORT_FILE = "report.html"
VAL_CONFUSION_FILE = "val_confusion.parquet"
TICK_LABELS_UP_TO = 40  # more classes than this: no class names on the axes (they would overlap)
ANNOTATE_UP_TO = 12  # up to this many classes: each cell shows its count
ROUTING_VIDEOS = 3


# =========================================================================== confusion matrices


def _matrix(m):
    import numpy as np

    return np.asarray(m.cpu().numpy() if hasattr(m, "cpu") else m, dtype=np.int64)  # (C, C)


def confusion_table(confusions: dict[Any, Any], labels: list[str], epoch: int | None = None):
    """{budget: (C, C) counts (rows true, columns predicted)} -> a pyarrow Table of the non-zero cells."""
    import numpy as np
    import pyarrow as pa

    cols: dict[str, list] = {k: [] for k in ("budget", "e_c", "true_id", "true_label", "pred_id", "pred_label",
                                             "count")}
    for key, m in confusions.items():
        m = _matrix(m)
        t, p = np.nonzero(m)
        try:
            e_c = float(key)
        except (TypeError, ValueError):
            e_c = math.nan
        cols["budget"] += [str(key)] * len(t)
        cols["e_c"] += [e_c] * len(t)
        cols["true_id"] += t.tolist()
        cols["true_label"] += [labels[i] for i in t]
        cols["pred_id"] += p.tolist()
        cols["pred_label"] += [labels[i] for i in p]
        cols["count"] += m[t, p].tolist()
    schema = pa.schema([("budget", pa.string()), ("e_c", pa.float64()), ("true_id", pa.int32()),
                        ("true_label", pa.string()), ("pred_id", pa.int32()), ("pred_label", pa.string()),
                        ("count", pa.int64())])
    table = pa.Table.from_pydict(cols, schema=schema)
    if epoch is not None:
        table = table.append_column("epoch", pa.array([epoch] * table.num_rows, pa.int32()))
    return table


def write_confusion(uri: str, confusions: dict[Any, Any], labels: list[str], epoch: int | None = None) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(confusion_table(confusions, labels, epoch), buf)
    run_files.write_bytes(uri, buf.getvalue())


def read_confusions(uri: str, num_classes: int | None = None) -> dict[str, Any]:
    """A confusion Parquet table back to {budget: (C, C) counts}; C = num_classes, else the largest class id + 1."""
    import numpy as np
    import pyarrow.parquet as pq

    if not run_files.exists(uri):
        return {}
    if run_files.is_remote(uri):
        fs, path = run_files._fs(uri)
        table = pq.read_table(path, filesystem=fs)
    else:
        table = pq.read_table(uri)
    df = table.to_pandas()
    if df.empty:
        return {}
    c = num_classes or int(max(df.true_id.max(), df.pred_id.max())) + 1
    out = {}
    for key, g in df.groupby("budget", sort=False):
        m = np.zeros((c, c), np.int64)
        m[g.true_id.to_numpy(), g.pred_id.to_numpy()] = g["count"].to_numpy()
        out[key] = m
    return out


def confusion_png(matrix, labels: list[str], title: str, top_pairs: int = 12) -> bytes:
    """The confusion matrix as a PNG (see the module docstring for how it stays readable with many classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = _matrix(matrix)
    C = m.shape[0]
    support = m.sum(1)  # (C,)
    acc = np.where(support > 0, np.diag(m) / np.maximum(support, 1), -1.0)  # classes without videos last
    order = np.lexsort((np.arange(C), -acc))  # best class first; ties by class id
    frac = (m / np.maximum(support, 1)[:, None])[np.ix_(order, order)]  # (C, C) rows sum to 1
    side = 6.0 if C <= TICK_LABELS_UP_TO else 8.0
    fig, (ax, tx) = plt.subplots(1, 2, figsize=(side + 4.2, side), dpi=110,
                                 gridspec_kw={"width_ratios": [side, 4.2]})
    # square-root colour scale: a few percent of confusion stays visible next to a bright diagonal
    im = ax.imshow(frac, cmap="viridis", norm=matplotlib.colors.PowerNorm(0.5, vmin=0.0, vmax=1.0),
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    if C <= TICK_LABELS_UP_TO:
        names = [labels[i] for i in order]
        ax.set_xticks(range(C), names, rotation=90, fontsize=7)
        ax.set_yticks(range(C), names, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if C <= ANNOTATE_UP_TO:
        for i in range(C):
            for j in range(C):
                n = m[order[i], order[j]]
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                            color="black" if frac[i, j] > 0.6 else "white")
    ax.set_xlabel(f"predicted ({C} classes, sorted by accuracy)")
    ax.set_ylabel("true class")
    n_videos = int(m.sum())
    ax.set_title(f"{title}\n{n_videos} videos, top-1 {100 * np.trace(m) / max(n_videos, 1):.1f}%", fontsize=9)
    off = m.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top_pairs]
    lines = ["most frequent confusions", "(true -> predicted: videos)", ""]
    for f in flat:
        t, p = divmod(int(f), C)
        if off[t, p] == 0:
            break
        lines.append(f"{labels[t][:24]} -> {labels[p][:24]}: {off[t, p]}")
    if len(lines) == 3:
        lines.append("none")
    tx.axis("off")
    tx.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace",
            transform=tx.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# =========================================================================== run figures


def accuracy_vs_gflops_png(history: list[dict[str, Any]], cfg) -> bytes:
    """The same figure as the run's accuracy_vs_gflops.png (jobs.train draws it), as PNG bytes."""
    from jobs.train import _plot_accuracy_vs_gflops

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plot.png")
        _plot_accuracy_vs_gflops(history, path, cfg)
        return Path(path).read_bytes()


def epoch_figures(history: list[dict[str, Any]], cfg, confusions: dict[Any, Any] | None,
                  labels: list[str]) -> dict[str, bytes]:
    """Tag -> PNG for the tracker: accuracy vs GFLOPs, plus a confusion matrix per budget when given."""
    figs = {"accuracy_vs_gflops": accuracy_vs_gflops_png(history, cfg)}
    for b, m in (confusions or {}).items():
        figs[f"confusion/ec{b}"] = confusion_png(m, labels, f"validation, e_c = {b}, epoch {history[-1]['epoch'] + 1}")
    return figs


def curves_png(history: list[dict[str, Any]], budgets: list[float]) -> bytes:
    """Per epoch: training loss, top-1 at each validation budget, and seconds spent waiting for data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] + 1 for m in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    axes[0].plot(epochs, [m.get("train_loss") for m in history], "o-", color="C3")
    axes[0].set_title("training loss")
    for i, b in enumerate(sorted(budgets)):
        ys = [100 * m[f"top1_ec{b}"] if m.get(f"top1_ec{b}") is not None else None for m in history]
        axes[1].plot(epochs, ys, "o-", ms=3, color=f"C{i}", label=f"e_c={b}")
    axes[1].set_title("validation top-1 (%)")
    axes[1].legend(fontsize=8)
    if all("data_wait_fraction" in m for m in history):  # jobs.progress: share of step time blocked on data
        axes[2].bar(epochs, [100 * m["data_wait_fraction"] for m in history], color="C7")
        axes[2].set_title("data wait (% of step time, rank 0)")
    else:
        axes[2].bar(epochs, [m.get("data_wait_s") or 0.0 for m in history], color="C7")
        axes[2].set_title("data wait per epoch (s, rank 0)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def routing_pngs(inference_dir: str, manifest, budget: float, n: int = ROUTING_VIDEOS) -> list[tuple[str, bytes]]:
    """(caption, PNG) of the routing picture (jobs.visualize) of up to n validation videos of distinct classes."""
    from jobs.checkpoint import load_inference
    from jobs.evaluate import budget_from_ec
    from jobs.visualize import render_routing

    with tempfile.TemporaryDirectory() as d:
        local = inference_dir
        if run_files.is_remote(inference_dir):
            import pyarrow.fs as pafs

            fs, path = run_files._fs(inference_dir)
            local = os.path.join(d, "inference")
            pafs.copy_files(path, local, source_filesystem=fs)
        ckpt = load_inference(local)
    bud = budget_from_ec(budget, ckpt.model.cfg.num_experts)
    out, seen = [], set()
    for row in manifest.select(["path", "label_name"]).to_pylist():
        if len(out) >= n:
            break
        if row["label_name"] in seen:
            continue
        try:
            fig = render_routing(ckpt, row["path"], bud)
        except Exception:  # noqa: BLE001 -- an unreadable video (it is in errors.parquet): take the next one
            continue
        seen.add(row["label_name"])
        buf = io.BytesIO()
        import matplotlib.image as mpimg

        mpimg.imsave(buf, fig.image, format="png")
        out.append((f"{Path(row['path']).name} (class {row['label_name']}), e_c = {budget:g}", buf.getvalue()))
    return out


# =========================================================================== report.html


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}%" if pct else (f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))


def _read_errors(run_dir: str):
    import pyarrow.parquet as pq

    uri = run_files.join(run_dir, "errors.parquet")
    if not run_files.exists(uri):
        return None
    if run_files.is_remote(uri):
        fs, path = run_files._fs(uri)
        return pq.read_table(path, filesystem=fs).to_pandas()
    return pq.read_table(uri).to_pandas()


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1280px;
       padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #555; } table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td.l, th.l { text-align: left; } img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
figure { display: inline-block; margin: 6px 12px 6px 0; vertical-align: top; }
figcaption { font-size: 12px; color: #555; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.errors { max-height: 420px; overflow-y: auto; display: inline-block; } .errors td, .errors th { text-align: left; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def render_report(*, title: str, meta_lines: list[str], summary_rows: list[dict[str, Any]], budgets: list[float],
                  figures: list[tuple[str, str, bytes]], routing: list[tuple[str, bytes]],
                  confusions: list[tuple[str, bytes]], errors, config_text: str, notes: list[str]) -> str:
    """The page itself (pure formatting). figures: (heading, caption, PNG)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<div class="meta">{line}</div>' for line in meta_lines]
    parts.append("<h2>Validation at the last epoch</h2><table><tr><th>e_c</th>"
                 "<th>GFLOPs per view (multiply-add = 1)</th><th>top-1</th><th>top-5</th><th>mean-class</th>"
                 "<th>clips/s</th></tr>")
    for r in summary_rows:
        parts.append(f"<tr><td>{r['e_c']:g}</td><td>{_fmt(r['gmacs'])}</td><td>{_fmt(r['top1'], True)}</td>"
                     f"<td>{_fmt(r['top5'], True)}</td><td>{_fmt(r['mean_class'], True)}</td>"
                     f"<td>{_fmt(r['clips_per_s'])}</td></tr>")
    parts.append("</table>")
    parts += [f'<div class="meta">{n}</div>' for n in notes]
    for heading, caption, png in figures:
        parts.append(f"<h2>{html.escape(heading)}</h2><figure>{_img(png, heading)}"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Routing of validation videos</h2>")
    if routing:
        parts.append("<p>Each token tinted with the expert the router gave it (smallest expert blue ... full width "
                     "vermilion); the large experts should sit on what moves.</p>")
        parts += [f"<figure>{_img(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
                  for cap, png in routing]
    else:
        parts.append("<p>No routing picture: no validation video could be drawn.</p>")
    if confusions:
        parts.append("<h2>Validation confusion matrices (last epoch)</h2>")
        parts += [f"<figure>{_img(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
                  for cap, png in confusions]
    parts.append("<h2>Unreadable videos (errors.parquet)</h2>")
    if errors is None:
        parts.append("<p>errors.parquet was not written.</p>")
    elif errors.empty:
        parts.append("<p>None: every video was read.</p>")
    else:
        parts.append(f"<p>{len(errors)} video(s) were skipped and recorded.</p><div class=\"errors\">")
        parts.append(errors.to_html(index=False, escape=True, border=0, classes="l", max_rows=500))
        parts.append("</div>")
    parts.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    # A render check (tests run it in headless Chromium): every embedded image decoded.
    parts.append("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
                 "document.body.dataset.imagesOk = imgs.length > 0 && imgs.every(i => i.complete && "
                 "i.naturalWidth > 0) ? 'yes' : 'no'; });</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_run_report(cfg, run_dir: str, history: list[dict[str, Any]], data, *, inference_dir: str | None,
                     best_dir: str | None = None) -> str | None:
    """Writes `<run>/report.html`; returns its path, or None (with a warning) when it could not be built: a
    report must never fail a finished training run."""
    try:
        page = _build_run_report(cfg, run_dir, history, data, inference_dir=inference_dir, best_dir=best_dir)
    except Exception as e:  # noqa: BLE001
        print(f"[mone] warning: report.html not written ({type(e).__name__}: {e})", flush=True)
        return None
    uri = run_files.join(run_dir, REPORT_FILE)
    run_files.write_text(uri, page)
    return uri


def _build_run_report(cfg, run_dir, history, data, *, inference_dir, best_dir) -> str:
    import yaml

    budgets = list(cfg.mone.val_budgets)
    last = history[-1] if history else {}
    kind = "dense baseline" if cfg.mone.dense else "MoNE"
    meta = [
        f"{html.escape(cfg.model.variant)} ({kind}), {len(data.labels)} classes, {data.num_train} train / "
        f"{data.num_val} validation clips, {cfg.scaling.num_workers} worker(s); "
        f"{len(history)} epoch(s), global step {last.get('global_step', 0)}, final training loss "
        f"{_fmt(last.get('train_loss'))}",
        f"run directory <code>{html.escape(run_dir)}</code>; written {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"TensorBoard: <code>tensorboard --logdir {html.escape(run_files.join(run_dir, 'tensorboard'))}</code>"
        + (f"; MLflow: <code>{html.escape(cfg.run.mlflow_uri)}</code>" if "mlflow" in cfg.run.tracking else ""),
    ]
    rows = [{"e_c": b, **{k: last.get(f"{k}_ec{b}") for k in ("gmacs", "top1", "top5", "mean_class",
                                                               "clips_per_s")}} for b in budgets]
    notes = []
    if best_dir:
        best = json.loads(run_files.read_text(run_files.join(best_dir, "inference.json")))
        key = cfg.run.keep_best
        notes.append(f"Best epoch by <code>{html.escape(key)}</code>: epoch {best['run']['epoch'] + 1} "
                     f"({_fmt(best.get('metrics', {}).get(key))}), kept in <code>{html.escape(best_dir)}</code>.")
    figures = []
    if history:
        figures.append(("Accuracy vs compute", "top-1 at each validation budget against GFLOPs per clip (last "
                        "epochs; the final one solid)", accuracy_vs_gflops_png(history, cfg)))
        figures.append(("Per-epoch curves", "training loss, validation top-1 per budget, time rank 0 waited for "
                        "batches", curves_png(history, budgets)))
    routing: list[tuple[str, bytes]] = []
    if inference_dir:
        below = [b for b in budgets if b < 1.0]
        try:
            routing = routing_pngs(inference_dir, data.val_manifest, min(below, key=lambda b: abs(b - 0.3))
                                   if below else 1.0)
        except Exception as e:  # noqa: BLE001 -- the rest of the report is still worth having
            print(f"[mone] warning: no routing pictures in the report ({type(e).__name__}: {e})", flush=True)
    conf = read_confusions(run_files.join(run_dir, VAL_CONFUSION_FILE), len(data.labels))
    shown = sorted(conf, key=float)[:: max(1, len(conf) - 1)] if conf else []  # the cheapest and the dearest budget
    confusions = [(f"e_c = {k}", confusion_png(conf[k], data.labels, f"validation, e_c = {k}")) for k in shown]
    return render_report(
        title=f"MoNE run {cfg.run_name}", meta_lines=meta, summary_rows=rows, budgets=budgets, figures=figures,
        routing=routing, confusions=confusions, errors=_read_errors(run_dir),
        config_text=yaml.safe_dump(cfg.to_dict(), sort_keys=False), notes=notes)
