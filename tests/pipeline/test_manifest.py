import json
import math
import os
import shutil

import pyarrow as pa
import pytest

from pipeline import manifest as M


def _info(root):
    return json.loads((root / "synth.json").read_text())


def _check_schema(table: pa.Table):
    assert table.schema.equals(M.SCHEMA)


def test_k400_csv_with_split_label_tree(k400_tree):
    m = M.build_manifest(k400_tree)  # auto
    assert m.layout == "k400"
    _check_schema(m.table)
    assert m.labels == sorted(["moving left", "moving right", "moving up", "moving down"])
    assert m.splits() == {"train": 19, "validate": 8, "test": 4}
    assert m.missing == []
    rows = m.table.to_pylist()
    for r in rows:
        assert r["label_name"] == m.labels[r["label"]]
        # the tree folder is the label; the file name carries youtube id and times
        assert f"/{r['split']}/{r['label_name']}/{r['video_id']}_" in r["path"]
        assert r["end_s"] > r["start_s"]
    # youtube ids may contain '_' and '-': the id is everything before the two 6-digit times
    assert all(len(r["video_id"]) == 11 for r in rows)


def test_k400_flat_layout(k400_flat):
    m = M.build_manifest(k400_flat, "k400")
    assert len(m) == 3 * 5 and m.missing == []
    assert {r["path"].rsplit("/", 2)[-2] for r in m.table.to_pylist()} == {"videos"}


def test_k400_quoted_labels_with_commas_and_quotes(tmp_path, k400_flat):
    # Official CSVs quote labels; some contain commas or quotes. Reuse real clips under new labels.
    src = sorted((k400_flat / "videos").glob("*.mp4"))[:3]
    vids = tmp_path / "videos"
    vids.mkdir()
    lines = ["label,youtube_id,time_start,time_end,split,is_cc"]
    names = ['passing American football (in game)', 'massaging person\'s head', 'tying bow, "fancy"']
    for f, name in zip(src, names, strict=True):
        shutil.copy(f, vids / f.name)
        ytid, start, end = f.stem[:11], int(f.stem[12:18]), int(f.stem[19:25])
        quoted = '"' + name.replace('"', '""') + '"'
        lines.append(f"{quoted},{ytid},{start},{end},train,0")
    (tmp_path / "kinetics_train.csv").write_text("\n".join(lines) + "\n")
    m = M.build_manifest(tmp_path)
    assert m.labels == sorted(names)
    assert sorted(m.table.column("label_name").to_pylist()) == sorted(names)


def test_missing_files_are_reported_not_fatal(tmp_path, k400_tree):
    root = tmp_path / "k400"
    shutil.copytree(k400_tree, root)
    m0 = M.build_manifest(root)
    gone = [r["path"] for r in m0.table.to_pylist()][:3]  # the test split: 1 clip per class, none left
    for p in gone:
        os.remove(p)
    m = M.build_manifest(root)
    assert len(m) == len(m0) - 3
    # reported where the user would look for them: videos/{split}/{label}/{ytid}_{start}_{end}.mp4
    assert sorted(m.missing) == sorted(gone)
    assert m.summary()["missing"] == 3


def test_class_folders(k400_tree):
    m = M.build_manifest(k400_tree / "videos", "folders")
    assert m.layout == "folders"
    assert m.labels == sorted(["moving left", "moving right", "moving up", "moving down"])
    assert m.splits() == {"test": 4, "train": 19, "validate": 8}
    # no annotations there: auto-detection finds the folders too
    assert M.detect_layout(k400_tree / "videos") == "folders"
    # a plain <label>/*.mp4 tree (no split level) is one 'train' split
    m2 = M.build_manifest(k400_tree / "videos" / "train")
    assert m2.layout == "folders" and len(m2) == 19 and m2.splits() == {"train": 19}


def test_list_files(k400_tree):
    m = M.from_list_files(sorted((k400_tree / "lists").glob("*.txt")), root=k400_tree)
    assert m.layout == "list" and m.missing == []
    assert m.splits() == {"test": 4, "train": 19, "validate": 8}
    # labels.json next to the dataset gives the names for integer labels
    assert m.labels == M.read_labels(k400_tree / "labels.json")
    ref = {r["path"]: r["label_name"] for r in M.build_manifest(k400_tree, "k400").table.to_pylist()}
    got = {r["path"]: r["label_name"] for r in m.table.to_pylist()}
    assert got == ref


def test_list_file_with_names_and_missing(tmp_path, k400_flat):
    vids = sorted((k400_flat / "videos").glob("*.mp4"))
    lst = tmp_path / "val_list.txt"
    lst.write_text(f"{vids[0]} moving left\n{vids[1]}\tmoving up\n# comment\n{tmp_path}/nope.mp4 moving left\n")
    m = M.build_manifest(tmp_path, "auto")
    assert m.layout == "list"
    assert m.labels == ["moving left", "moving up"]
    assert m.table.column("split").to_pylist() == ["validate", "validate"]
    assert m.missing == [f"{tmp_path}/nope.mp4"]


def test_ssv2(ssv2):
    m = M.build_manifest(ssv2)
    assert m.layout == "ssv2"
    _check_schema(m.table)
    assert m.labels[:2] == ["Moving something left", "Moving something right"]  # SSv2's own indices
    assert m.splits() == {"train": 4 * 3 + 3, "validation": 4, "test": 4}
    test = m.split("test").to_pylist()
    assert all(r["label"] == -1 and r["label_name"] == "" for r in test)
    train = m.split("train").to_pylist()
    assert all(r["path"].endswith(f"/{r['video_id']}.webm") and r["label"] >= 0 for r in train)
    assert all(math.isnan(r["end_s"]) for r in train)
    # aliases: 'val' finds 'validation'
    assert m.split("val").num_rows == 4


def test_ssv2_missing_videos(tmp_path, ssv2):
    root = tmp_path / "ssv2"
    shutil.copytree(ssv2, root)
    victims = sorted((root / "20bn-something-something-v2").glob("*.webm"))[:2]
    for v in victims:
        v.unlink()
    m = M.build_manifest(root, "ssv2")
    assert len(m.missing) == 2 and {p.rsplit("/", 1)[-1] for p in m.missing} == {v.name for v in victims}


def test_labels_json_roundtrip(tmp_path):
    names = ["b class", "a class", 'quote "x"']
    p = M.write_labels(tmp_path, names)
    assert p.name == "labels.json" and M.read_labels(p) == names
    (tmp_path / "ssv2_style.json").write_text(json.dumps({"x": "1", "y": "0"}))
    assert M.read_labels(tmp_path / "ssv2_style.json") == ["y", "x"]


def test_relabel_to_a_saved_label_map(k400_tree):
    m = M.build_manifest(k400_tree)
    forced = list(reversed(m.labels)) + ["extra"]
    m2 = M.build_manifest(k400_tree, labels=forced)
    assert m2.labels == forced
    assert all(r["label"] == forced.index(r["label_name"]) for r in m2.table.to_pylist())


def test_manifest_parquet_roundtrip(tmp_path, ssv2):
    m = M.build_manifest(ssv2)
    M.write_manifest(m.table, tmp_path / "m.parquet")
    back = M.read_manifest(tmp_path / "m.parquet")
    assert back.schema.equals(M.SCHEMA) and back.to_pandas().equals(m.table.to_pandas())  # (NaN end_s: pandas)


def test_clear_error_when_nothing_is_found(tmp_path):
    (tmp_path / "readme.txt").write_text("hello\n")
    with pytest.raises(M.ManifestError, match="no annotation file found under .*expected a Kinetics CSV"):
        M.build_manifest(tmp_path)
    with pytest.raises(M.ManifestError, match="does not exist"):
        M.build_manifest(tmp_path / "nope")
    with pytest.raises(M.ManifestError, match="split 'dev' not in the manifest"):
        M.select_split(M._table([("p", 0, "a", "v", 0.0, 1.0, "train")]), "dev")
