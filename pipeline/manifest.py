"""Manifests: one Arrow table per dataset, whatever the download looks like.

Schema (docs/interfaces.md)::

    path: string (absolute), label: int32 (-1 = unknown), label_name: string, video_id: string,
    start_s: float64, end_s: float64 (NaN = unknown / whole file), split: string

`split` keeps the dataset's own names (K400: train / validate / test, SSv2: train / validation / test, folders:
the folder name); `select_split` accepts the usual aliases (val, valid, validate, validation).

Layouts (`build_manifest(root, layout=...)`):

- ``k400``: the official CSV(s) ``label,youtube_id,time_start,time_end,split,is_cc`` (labels quoted when they
  contain spaces; a test CSV may lack the label column). Clip files ``{youtube_id}_{start:06d}_{end:06d}.mp4``
  (any video extension, or just ``{youtube_id}.ext``) are found anywhere under the root: flat, or under
  ``{split}/{label}/``. Label map: sorted class names.
- ``ssv2``: ``something-something-v2-labels.json`` + ``-train.json`` / ``-validation.json`` (class = template
  with ``[`` ``]`` removed) + ``-test.json`` (ids only, label -1); videos ``{id}.webm``. Label map: the JSON's
  own indices.
- ``folders``: class-per-folder trees, ``ROOT/{label}/*.mp4`` or ``ROOT/{split}/{label}/*.mp4``. Sorted names.
- ``list``: "path label" list files (one clip per line; the label is an index, or a class name; paths relative
  to the list file's folder, the root, or a ``videos``/``data`` folder next to it).
- ``auto``: the first of the above that the root holds.

Listed videos that are not on disk are dropped from the table and reported (`Manifest.missing`), never fatal.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    pa.field("path", pa.string()),
    pa.field("label", pa.int32()),
    pa.field("label_name", pa.string()),
    pa.field("video_id", pa.string()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("split", pa.string()),
])
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")
LAYOUTS = ("auto", "k400", "ssv2", "folders", "list")
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validate", "validation"),
    "test": ("test", "testing"),
}
SSV2_LABELS = "something-something-v2-labels.json"
K400_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split", "is_cc")
_K400_STEM = re.compile(r"^(?P<ytid>.+)_(?P<start>\d{6})_(?P<end>\d{6})$")


class ManifestError(ValueError):
    """The dataset root cannot be turned into a manifest; the message says what was expected."""


@dataclass
class Manifest:
    table: pa.Table  # SCHEMA
    labels: list[str]  # label map: index -> class name
    missing: list[str] = field(default_factory=list)  # listed in the annotations, not on disk
    layout: str = ""
    root: str = ""

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> pa.Table:
        return select_split(self.table, name)

    def splits(self) -> dict[str, int]:
        names = self.table.column("split").to_pylist()
        return {s: names.count(s) for s in dict.fromkeys(names)}

    def summary(self) -> dict:
        return {"layout": self.layout, "root": self.root, "videos": len(self), "classes": self.num_classes,
                "splits": self.splits(), "missing": len(self.missing), "missing_examples": self.missing[:5]}


# --------------------------------------------------------------------------------------------------- label maps


def write_labels(path: str | os.PathLike, labels: Sequence[str]) -> Path:
    """Writes the label map `{"num_classes": K, "labels": [names by index]}`; a directory gets `labels.json`."""
    p = Path(path)
    if p.is_dir() or not p.suffix:
        p = p / "labels.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"num_classes": len(labels), "labels": list(labels)}, indent=1))
    return p


def read_labels(path: str | os.PathLike) -> list[str]:
    """Reads a label map: ours ({"labels": [...]}), a JSON list, or SSv2-style {name: index}; a dir: labels.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "labels.json"
    data = json.loads(p.read_text())
    if isinstance(data, dict) and "labels" in data:
        return [str(x) for x in data["labels"]]
    if isinstance(data, list):
        return [str(x) for x in data]
    if isinstance(data, dict):
        return _labels_from_index_map(data, str(p))
    raise ManifestError(f"{p}: not a label map (expected {{'labels': [...]}}, a list, or {{name: index}})")


def _labels_from_index_map(mapping: dict, where: str) -> list[str]:
    idx = {name: int(i) for name, i in mapping.items()}
    out = [""] * len(idx)
    for name, i in idx.items():
        if not 0 <= i < len(idx) or out[i]:
            raise ManifestError(f"{where}: label indices must be 0..{len(idx) - 1} without gaps or repeats")
        out[i] = name
    return out


# ------------------------------------------------------------------------------------------------------ helpers


def write_manifest(table: pa.Table, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, p)
    return p


def read_manifest(path: str | os.PathLike) -> pa.Table:
    table = pq.read_table(path)
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: not a manifest, columns {missing} are missing")
    return table.select(SCHEMA.names).cast(SCHEMA)


def select_split(table: pa.Table, name: str) -> pa.Table:
    """Rows of split `name`; 'val' matches 'validate'/'validation' etc. when the exact name is absent."""
    import pyarrow.compute as pc

    col = table.column("split")
    present = set(col.to_pylist())
    if name in present:
        return table.filter(pc.equal(col, name))
    for aliases in SPLIT_ALIASES.values():
        if name.lower() in aliases:
            hits = [s for s in present if s.lower() in aliases]
            if hits:
                return table.filter(pc.is_in(col, pa.array(hits)))
    raise ManifestError(f"split {name!r} not in the manifest (splits: {sorted(present)})")


def _table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in SCHEMA.names]
    return pa.Table.from_arrays([pa.array(list(c), type=f.type) for c, f in zip(cols, SCHEMA, strict=True)],
                                schema=SCHEMA)


def index_videos(root: str | os.PathLike, exts: Iterable[str] = VIDEO_EXTS) -> dict[str, list[str]]:
    """file stem -> absolute paths of every video file under `root` (one os.walk; fast on 10^5-10^6 files)."""
    exts = tuple(e.lower() for e in exts)
    out: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            stem, ext = os.path.splitext(fn)
            if ext.lower() in exts:
                out.setdefault(stem, []).append(os.path.abspath(os.path.join(dirpath, fn)))
    return out


def _pick(paths: list[str], *prefer: str) -> str:
    if len(paths) > 1:
        for word in prefer:
            for p in paths:
                parts = Path(p).parts
                if word in parts:
                    return p
    return sorted(paths)[0]


def _finish(rows: list[tuple], labels: list[str], missing: list[str], layout: str, root: Path) -> Manifest:
    if missing:
        log.warning("%d of %d listed videos are missing under %s (first: %s)", len(missing),
                    len(rows) + len(missing), root, missing[0])
    return Manifest(_table(rows), labels, missing, layout, str(root))


# ------------------------------------------------------------------------------------------------------ K400 CSV


def _is_k400_csv(p: Path) -> bool:
    try:
        with open(p, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "youtube_id" in [h.strip() for h in header]


def find_k400_csvs(root: Path) -> list[Path]:
    return [p for p in _shallow_files(root, (".csv",)) if _is_k400_csv(p)]


def from_k400_csv(csv_paths: Sequence[str | os.PathLike], video_root: str | os.PathLike,
                  labels: Sequence[str] | None = None, index: dict[str, list[str]] | None = None) -> Manifest:
    """Kinetics from its official CSV(s). Clip files are looked up by name anywhere under `video_root`."""
    video_root = Path(video_root).resolve()
    entries = []
    for cp in csv_paths:
        with open(cp, newline="") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            if not reader.fieldnames or "youtube_id" not in [h.strip() for h in reader.fieldnames]:
                raise ManifestError(f"{cp}: not a Kinetics CSV (expected header {','.join(K400_COLUMNS)})")
            default_split = _split_from_filename(Path(cp).stem)
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                entries.append((row.get("label", ""), row["youtube_id"], _int_or_none(row.get("time_start")),
                                _int_or_none(row.get("time_end")), row.get("split") or default_split))
    names = list(labels) if labels is not None else sorted({e[0] for e in entries if e[0]})
    lookup = {n: i for i, n in enumerate(names)}
    index = index if index is not None else index_videos(video_root)
    rows, missing, lost = [], [], []
    where: dict[tuple[str, str], str] = {}  # (split, label) -> folder its clips were found in
    for label, ytid, start, end, split in entries:
        stem = f"{ytid}_{start:06d}_{end:06d}" if start is not None and end is not None else ytid
        paths = index.get(stem) or index.get(ytid)
        if not paths:
            lost.append((split, label, stem))
            continue
        if label and label not in lookup:
            raise ManifestError(f"label {label!r} of {ytid} is not in the label map ({len(names)} classes)")
        path = _pick(paths, split, label)
        where.setdefault((split, label), os.path.dirname(path))
        rows.append((path, lookup.get(label, -1) if label else -1, label, ytid,
                     float(start) if start is not None else 0.0, float(end) if end is not None else math.nan,
                     split))
    # Report a missing clip where it would be: beside its class-mates, else following the tree the found clips
    # use ({base}/{split}/{label}/, {base}/{label}/ or one flat folder), else under the root.
    pattern = _tree_pattern(where)
    for split, label, stem in lost:
        folder = where.get((split, label)) or pattern(split, label) or str(video_root)
        missing.append(os.path.join(folder, f"{stem}.mp4"))
    return _finish(rows, names, missing, "k400", video_root)


def _tree_pattern(where: dict[tuple[str, str], str]):
    for (split, label), folder in where.items():
        p = Path(folder)
        if label and p.name == label and p.parent.name == split:
            base = p.parent.parent
            return lambda s, lab: str(base / s / lab) if lab else str(base / s)
        if label and p.name == label:
            base = p.parent
            return lambda s, lab: str(base / lab) if lab else str(base)
    folders = set(where.values())
    if len(folders) == 1:
        only = next(iter(folders))
        return lambda s, lab: only
    return lambda s, lab: None


def _int_or_none(v: str | None) -> int | None:
    try:
        return int(float(v)) if v not in (None, "") else None
    except ValueError:
        return None


def _split_from_filename(stem: str) -> str:
    s = stem.lower()
    for split in ("train", "validate", "validation", "val", "test"):
        if split in s:
            return {"validation": "validate", "val": "validate"}.get(split, split)
    return "train"


# ----------------------------------------------------------------------------------------------------------- SSv2


def from_ssv2(labels_json: str | os.PathLike, video_root: str | os.PathLike,
              index: dict[str, list[str]] | None = None) -> Manifest:
    """Something-Something-v2 from its JSON files (next to `labels_json`) and `{id}.webm` under `video_root`."""
    labels_json = Path(labels_json)
    try:
        names = _labels_from_index_map(json.loads(labels_json.read_text()), str(labels_json))
    except (json.JSONDecodeError, AttributeError, ValueError) as e:
        raise ManifestError(f"{labels_json}: not a something-something-v2 label file ({e})") from e
    lookup = {n: i for i, n in enumerate(names)}
    prefix = labels_json.name[: -len("labels.json")]
    video_root = Path(video_root).resolve()
    index = index if index is not None else index_videos(video_root)
    rows, missing = [], []
    found_any = False
    for split in ("train", "validation", "test"):
        ann = labels_json.with_name(f"{prefix}{split}.json")
        if not ann.exists():
            continue
        found_any = True
        for item in json.loads(ann.read_text()):
            vid = str(item["id"])
            if "template" in item:
                name = item["template"].replace("[", "").replace("]", "")
                if name not in lookup:
                    raise ManifestError(
                        f"{ann}: template {item['template']!r} of video {vid} is not in {labels_json.name}")
                label = lookup[name]
            else:
                name, label = "", -1
            paths = index.get(vid)
            if not paths:
                missing.append(str(video_root / f"{vid}.webm"))
                continue
            rows.append((_pick(paths), label, name, vid, 0.0, math.nan, split))
    if not found_any:
        raise ManifestError(f"{labels_json.parent}: found {labels_json.name} but no {prefix}train.json / "
                            f"{prefix}validation.json / {prefix}test.json next to it")
    return _finish(rows, names, missing, "ssv2", video_root)


def find_ssv2_labels(root: Path) -> Path | None:
    hits = [p for p in _shallow_files(root, (".json",)) if p.name.endswith("-labels.json")
            and p.with_name(p.name[: -len("labels.json")] + "train.json").exists()]
    hits += [p for p in _shallow_files(root, (".json",)) if p.name == SSV2_LABELS and p not in hits]
    return sorted(hits, key=lambda p: (p.name != SSV2_LABELS, len(p.parts)))[0] if hits else None


# ------------------------------------------------------------------------------------------------ class folders


def from_folders(root: str | os.PathLike) -> Manifest:
    """`ROOT/{label}/*.ext` or `ROOT/{split}/{label}/*.ext` (split folders named train/val/validate/test...)."""
    root = Path(root).resolve()
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_names = {a for aliases in SPLIT_ALIASES.values() for a in aliases}
    if subdirs and all(d.name.lower() in split_names for d in subdirs):
        pairs = [(d.name, c) for d in subdirs for c in sorted(x for x in d.iterdir() if x.is_dir())]
    else:
        pairs = [("train", d) for d in subdirs]
    names = sorted({c.name for _, c in pairs})
    lookup = {n: i for i, n in enumerate(names)}
    rows = []
    for split, cdir in pairs:
        for stem, paths in sorted(index_videos(cdir).items()):
            for p in paths:
                start, end = _times_from_stem(stem)
                rows.append((p, lookup[cdir.name], cdir.name, _video_id(stem), start, end, split))
    if not rows:
        raise ManifestError(f"{root}: no videos ({', '.join(VIDEO_EXTS[:3])}, ...) in class folders "
                            f"(expected ROOT/<label>/*.mp4 or ROOT/<split>/<label>/*.mp4)")
    return _finish(rows, names, [], "folders", root)


def _times_from_stem(stem: str) -> tuple[float, float]:
    m = _K400_STEM.match(stem)
    return (float(m["start"]), float(m["end"])) if m else (0.0, math.nan)


def _video_id(stem: str) -> str:
    m = _K400_STEM.match(stem)
    return m["ytid"] if m else stem


# --------------------------------------------------------------------------------------------------- list files


def from_list_files(list_paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None,
                    labels: Sequence[str] | None = None) -> Manifest:
    """"path label" files (one clip per line). The label is an index or a class name (names may contain
    spaces: the path is the first whitespace-free token unless the line has a tab). Split = the file's stem
    (train.txt -> train, kinetics_val_list.txt -> validate)."""
    root = Path(root).resolve() if root else Path(list_paths[0]).resolve().parent
    entries = []
    for lp in list_paths:
        lp = Path(lp).resolve()
        split = _split_from_filename(lp.stem)
        bases = list_bases(lp, root)
        for n, line in enumerate(lp.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, lab = _split_list_line(line)
            if not path or not lab:
                raise ManifestError(f"{lp}:{n}: expected 'path label', got {line!r}")
            entries.append((path, lab, split, bases))
    all_int = all(re.fullmatch(r"-?\d+", e[1]) for e in entries)
    if labels is None:
        if all_int:
            side = [p for p in (root / "labels.json", Path(list_paths[0]).resolve().parent / "labels.json")
                    if p.exists()]
            labels = read_labels(side[0]) if side else None
            k = max((int(e[1]) for e in entries), default=-1) + 1
            names = list(labels) if labels else [str(i) for i in range(k)]
        else:
            names = sorted({e[1] for e in entries})
    else:
        names = list(labels)
    lookup = {n: i for i, n in enumerate(names)}
    rows, missing = [], []
    for path, lab, split, bases in entries:
        cands = [Path(path)] if os.path.isabs(path) else [b / path for b in bases]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            missing.append(str(cands[0]))
            continue
        if re.fullmatch(r"-?\d+", lab):
            li = int(lab)
            name = names[li] if 0 <= li < len(names) else ""
        else:
            if lab not in lookup:
                raise ManifestError(f"label {lab!r} of {path} is not in the label map ({len(names)} classes)")
            li, name = lookup[lab], lab
        stem = hit.stem
        start, end = _times_from_stem(stem)
        rows.append((str(hit.resolve()), li, name, _video_id(stem), start, end, split))
    return _finish(rows, names, missing, "list", root)


def list_bases(list_file: Path, root: Path) -> list[Path]:
    """The folders a relative path in `list_file` is looked up in, first match wins."""
    return [list_file.parent, root, root / "videos", list_file.parent.parent / "videos", root / "data"]


_LIST_LINE = re.compile(r"^(?P<path>.*?\.(?:" + "|".join(e[1:] for e in VIDEO_EXTS) + r"))\s+(?P<label>.+)$", re.I)


def _split_list_line(line: str) -> tuple[str, str]:
    """'path label' -> (path, label). Paths may contain spaces (K400 label folders): a tab separates if present,
    else a trailing integer is the label, else the label follows the video extension."""
    if "\t" in line:
        path, _, lab = line.partition("\t")
        return path.strip(), lab.strip()
    head, _, tail = line.rpartition(" ")
    if head and re.fullmatch(r"-?\d+", tail):
        return head.strip(), tail
    m = _LIST_LINE.match(line)
    return (m["path"], m["label"].strip()) if m else (line, "")


def find_list_files(root: Path) -> list[Path]:
    out = []
    for p in _shallow_files(root, (".txt", ".lst", ".list")):
        try:
            with open(p) as f:
                first = next((ln for ln in f if ln.strip() and not ln.startswith("#")), "")
        except (OSError, UnicodeDecodeError):
            continue
        path, lab = _split_list_line(first.strip())
        if lab and os.path.splitext(path)[1].lower() in VIDEO_EXTS:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------------------ entry


def _shallow_files(root: Path, exts: tuple[str, ...], depth: int = 2) -> list[Path]:
    """Files with `exts` at most `depth` folders below root (annotation files live near the top)."""
    out = []
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        if len(Path(dirpath).parts) - base >= depth:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(exts)]
    return out


def detect_layout(root: str | os.PathLike) -> str:
    root = Path(root)
    if find_ssv2_labels(root):
        return "ssv2"
    if find_k400_csvs(root):
        return "k400"
    if find_list_files(root):
        return "list"
    if any(d.is_dir() and any(os.path.splitext(f)[1].lower() in VIDEO_EXTS for f in os.listdir(d))
           for d in root.iterdir() if d.is_dir()) or any(
        dd.is_dir() and any(os.path.splitext(f)[1].lower() in VIDEO_EXTS for f in os.listdir(dd))
        for d in root.iterdir() if d.is_dir() for dd in d.iterdir() if dd.is_dir()
    ):
        return "folders"
    raise ManifestError(
        f"no annotation file found under {root}: expected a Kinetics CSV (label,youtube_id,time_start,time_end,"
        f"split,is_cc), {SSV2_LABELS} with its -train/-validation JSON, 'path label' list files (*.txt), or class "
        f"folders (<label>/*.mp4). Pass layout= to choose one."
    )


def build_manifest(root: str | os.PathLike, layout: str = "auto", *, splits: Sequence[str] | None = None,
                   labels: Sequence[str] | None = None) -> Manifest:
    """Builds the manifest of a dataset root (see the module doc for the layouts). `splits` keeps only those
    splits (aliases allowed); `labels` forces a label map (e.g. the one saved with a training run)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ManifestError(f"dataset root {root} does not exist or is not a folder")
    root = root.resolve()
    if layout not in LAYOUTS:
        raise ManifestError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "k400":
        csvs = find_k400_csvs(root)
        if not csvs:
            raise ManifestError(f"no Kinetics CSV under {root}: expected a .csv with header "
                                f"{','.join(K400_COLUMNS)} (e.g. annotations/train.csv)")
        m = from_k400_csv(csvs, root, labels=labels)
    elif layout == "ssv2":
        lj = find_ssv2_labels(root)
        if lj is None:
            raise ManifestError(f"no {SSV2_LABELS} under {root} (with something-something-v2-train.json next to it)")
        m = from_ssv2(lj, root)
    elif layout == "list":
        lists = find_list_files(root)
        if not lists:
            raise ManifestError(f"no 'path label' list files (*.txt) under {root}")
        m = from_list_files(lists, root, labels=labels)
    else:
        m = from_folders(root)
        if labels is not None:
            m = relabel(m, labels)
    if splits:
        keep = [select_split(m.table, s) for s in splits]
        m = Manifest(pa.concat_tables(keep), m.labels, m.missing, m.layout, m.root)
    return m


def relabel(m: Manifest, labels: Sequence[str]) -> Manifest:
    """Re-indexes a manifest to a given label map (e.g. the training run's), by class name."""
    lookup = {n: i for i, n in enumerate(labels)}
    names = m.table.column("label_name").to_pylist()
    unknown = sorted({n for n in names if n and n not in lookup})
    if unknown:
        raise ManifestError(f"classes {unknown[:5]} are not in the given label map ({len(labels)} classes)")
    idx = pa.array([lookup.get(n, -1) if n else -1 for n in names], pa.int32())
    return Manifest(m.table.set_column(1, "label", idx), list(labels), m.missing, m.layout, m.root)
