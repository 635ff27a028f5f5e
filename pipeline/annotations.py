"""Annotation files for a copy of a dataset whose videos were renamed or left out (`mone data prepare`).

A prepared archive keeps the dataset's own layout, so every reader of `pipeline.manifest` takes it unchanged. What
changes between SRC and DST is which videos exist and their file extension (everything becomes .mp4). So:

- Kinetics CSVs (``label,youtube_id,time_start,time_end,split,is_cc``): rows whose clip is not in DST are dropped;
  kept lines are copied as they are (quoting included). Clip files are found by name, not by extension.
- Something-Something-v2 JSONs (``-train/-validation/-test.json``): items whose id is not in DST are dropped; the
  label file is copied. Videos are found by id (``{id}.mp4`` like ``{id}.webm``).
- "path label" list files: each path is rewritten to the new file name (extension) and lines whose video is not
  in DST are dropped; the rest of each line (label, separator) is kept.
- Class folders carry no annotation file: the tree is the annotation.
- Every other non-video file (labels.json, READMEs, ...) is copied as it is (up to `max_copy_bytes`).

A file with nothing to drop or rename is copied byte for byte. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.manifest import (
    VIDEO_EXTS,
    _int_or_none,
    _split_list_line,
    find_k400_csvs,
    find_list_files,
    find_ssv2_labels,
    list_bases,
)

MAX_COPY_BYTES = 256 * 2**20  # larger non-video files (archives, dumps) are not copied: listed in `skipped`


@dataclass
class AnnotationReport:
    rewritten: list[str] = field(default_factory=list)  # annotation files with rows dropped or paths renamed
    copied: list[str] = field(default_factory=list)  # files copied byte for byte
    skipped: list[str] = field(default_factory=list)  # non-video files too large to copy
    dropped_rows: int = 0  # annotation rows/items/lines left out (their video is not in DST)

    def to_json(self) -> dict:
        return {"rewritten": self.rewritten, "copied": len(self.copied), "skipped": self.skipped,
                "dropped_rows": self.dropped_rows}


def k400_key(youtube_id: str, time_start: str | None, time_end: str | None) -> tuple:
    """A Kinetics clip as `from_k400_csv` turns a CSV row into manifest fields (video_id, start_s, end_s)."""
    start, end = _int_or_none(time_start), _int_or_none(time_end)
    return (youtube_id.strip(), float(start) if start is not None else 0.0, float(end) if end is not None else None)


def k400_key_of_row(row: Mapping) -> tuple:
    """The same key from a manifest row (end_s NaN = no end time)."""
    end = row["end_s"]
    return (row["video_id"], float(row["start_s"]), None if end is None or end != end else float(end))


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rewrite_k400_csv(text: str, kept: Collection[tuple]) -> tuple[str, int]:
    """Drops the rows whose (youtube_id, start, end) key is not in `kept`; returns (text, rows dropped)."""
    lines = text.splitlines(keepends=True)
    if not lines:
        return text, 0
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    out, dropped = [lines[0]], 0
    for line in lines[1:]:
        if not line.strip():
            out.append(line)
            continue
        values = next(csv.reader([line], skipinitialspace=True))
        row = dict(zip(header, (v.strip() for v in values), strict=False))
        if k400_key(row.get("youtube_id", ""), row.get("time_start"), row.get("time_end")) in kept:
            out.append(line)
        else:
            dropped += 1
    return "".join(out), dropped


def rewrite_ssv2_json(text: str, kept_ids: Collection[str]) -> tuple[str, int]:
    """Drops the items whose id is not in `kept_ids` (the text is returned as it was when none is dropped)."""
    items = json.loads(text)
    keep = [it for it in items if str(it["id"]) in kept_ids]
    if len(keep) == len(items):
        return text, 0
    return json.dumps(keep, indent=1), len(items) - len(keep)


def rewrite_list_file(list_file: Path, root: Path, text: str, renamed: Mapping[str, str]) -> tuple[str, int]:
    """`renamed`: resolved source video path -> new file name (relative to its folder, e.g. 'x.mp4') for every
    video present in DST. Lines naming other videos are dropped; kept lines get the new file name."""
    bases = list_bases(list_file, root)
    out, dropped = [], 0
    for line in text.splitlines(keepends=True):
        body = line.strip()
        if not body or body.startswith("#"):
            out.append(line)
            continue
        path, _ = _split_list_line(body)
        cands = [Path(path)] if os.path.isabs(path) else [b / path for b in bases]
        hit = next((c for c in cands if c.is_file()), None)
        new_name = renamed.get(str(hit.resolve())) if hit is not None else None
        if new_name is None:
            dropped += 1
            continue
        new_path = os.path.join(os.path.dirname(path), new_name) if os.path.dirname(path) else new_name
        start = line.index(path)
        out.append(line[:start] + new_path + line[start + len(path):])
    return "".join(out), dropped


def write_annotations(src_root: Path, dst_root: Path, *, kept_k400: Collection[tuple], kept_ssv2: Collection[str],
                      renamed: Mapping[str, str], exclude: Collection[str] = (),
                      max_copy_bytes: int = MAX_COPY_BYTES) -> AnnotationReport:
    """Copies every non-video file of `src_root` to the same place under `dst_root`, rewriting annotation files
    (module doc). kept_k400: keys (`k400_key`) of the Kinetics clips present in DST; kept_ssv2: SSv2 ids present;
    renamed: resolved source path -> new file name of every video present. `exclude`: file names at the root that
    are not copied (the prepare job's own files)."""
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    k400_csvs = {p.resolve() for p in find_k400_csvs(src_root)}
    ssv2_files: set[Path] = set()
    labels_json = find_ssv2_labels(src_root)
    if labels_json is not None:
        prefix = labels_json.name[: -len("labels.json")]
        ssv2_files = {labels_json.with_name(f"{prefix}{s}.json").resolve() for s in ("train", "validation", "test")}
    lists = {p.resolve() for p in find_list_files(src_root)}
    rep = AnnotationReport()
    video_exts = tuple(VIDEO_EXTS)
    for dirpath, dirnames, filenames in os.walk(src_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            src = Path(dirpath) / fn
            rel = src.relative_to(src_root)
            if fn.lower().endswith(video_exts) or fn.startswith(".") or (len(rel.parts) == 1 and fn in exclude):
                continue
            dst = dst_root / rel
            key = src.resolve()
            rewritten = None
            if key in k400_csvs:
                rewritten = rewrite_k400_csv(src.read_text(), kept_k400)
            elif key in ssv2_files:
                rewritten = rewrite_ssv2_json(src.read_text(), kept_ssv2)
            elif key in lists:
                rewritten = rewrite_list_file(key, src_root, src.read_text(), renamed)
            if rewritten is not None:
                text, dropped = rewritten
                rep.dropped_rows += dropped
                if text != src.read_text():
                    write_atomic(dst, text.encode())
                    rep.rewritten.append(str(rel))
                    continue
            if src.stat().st_size > max_copy_bytes:
                rep.skipped.append(str(rel))
                continue
            _copy_atomic(src, dst)
            rep.copied.append(str(rel))
    return rep
