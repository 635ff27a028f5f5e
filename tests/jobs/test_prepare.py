"""`mone data prepare`: bad arguments (no Ray), then on tiny synthetic archives with corrupt and missing files (one
Ray instance for the module): K400 and SSv2 round trips, re-runs, --max-error-fraction, --dry-run, a crashing
worker, a SIGKILLed run that resumes to the same DST, and a training run on the prepared archive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import data_cmd
from jobs.prepare import ERRORS_FILE, PLAN_FILE, run_prepare
from pipeline.decode import decode_all
from pipeline.manifest import build_manifest
from pipeline.reencode import TMP_SUFFIX, probe_source

ROOT = Path(__file__).resolve().parents[2]
SIZE = {"width": 64, "height": 48, "frames": 12, "fps": 6}
K400_ARGS = {"short_side": 32, "max_error_fraction": 0.5, "progress": False, "speed_sample": 2}


@pytest.fixture(scope="module")
def k400_src(tmp_path_factory):
    """K400 tree layout: 3 classes, 18 listed videos, 3 corrupt (truncated, empty, garbage), 1 deleted (missing)."""
    from pipeline.synth import generate

    root = tmp_path_factory.mktemp("k400_src")
    r = generate(root, "k400", classes=3, videos_per_class=3, val_videos_per_class=1, test_videos_per_class=1,
                 corrupt=3, seed=5, workers=2, progress=False, **SIZE)
    victim = sorted((root / "videos" / "validate").rglob("*.mp4"))[0]
    victim.unlink()
    return root, {c["path"] for c in r.corrupt}, str(victim)


@pytest.fixture(scope="module")
def ssv2_src(tmp_path_factory):
    """SSv2: 4 classes, VP9 {id}.webm 64x48, 3 corrupt."""
    from pipeline.synth import generate

    root = tmp_path_factory.mktemp("ssv2_src")
    r = generate(root, "ssv2", classes=4, videos_per_class=3, val_videos_per_class=1, test_videos_per_class=1,
                 corrupt=3, seed=6, workers=2, progress=False, **SIZE)
    return root, {c["path"] for c in r.corrupt}


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what earlier calls printed
    rc = data_cmd.main(["prepare", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mone data prepare: error: "), err
    return err


def test_bad_arguments_are_one_line_errors_before_any_task(k400_src, tmp_path, capsys):
    import ray

    src, _, _ = k400_src
    assert "no such folder" in _one_line_error(capsys, [str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "is inside SRC" in _one_line_error(capsys, [str(src), "--out", str(src / "prepared")])
    assert "SRC" in _one_line_error(capsys, [str(src / "videos"), "--out", str(src.parent)])
    assert "--short-side 16: must be >= 32" in _one_line_error(capsys, [str(src), "--out", str(tmp_path / "o"),
                                                                        "--short-side", "16"])
    assert "--layout 'kinetics': expected one of auto, k400" in _one_line_error(
        capsys, [str(src), "--out", str(tmp_path / "o"), "--layout", "kinetics"])
    assert "no annotation file found" in _one_line_error(capsys, [str(tmp_path), "--out", str(tmp_path.parent / "x")])
    (tmp_path / "full" / "a").mkdir(parents=True)
    assert "is not empty and was not made by `mone data prepare`" in _one_line_error(
        capsys, [str(src), "--out", str(tmp_path / "full")])
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def k400_prepared(k400_src, ray_cluster, tmp_path_factory):
    src, _, _ = k400_src
    dst = tmp_path_factory.mktemp("k400_dst") / "k400_32"
    return dst, run_prepare(src, dst, **K400_ARGS)


def _fields(m, drop: set[str] = frozenset()) -> list[tuple]:
    """Manifest rows without the path (sorted), leaving out the rows of `drop`ped source paths."""
    rows = [r for r in m.table.to_pylist() if r["path"] not in drop]
    return sorted((r["label"], r["label_name"], r["video_id"], r["start_s"], str(r["end_s"]), r["split"])
                  for r in rows)


def _tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_k400_round_trip(k400_src, k400_prepared, capsys):
    src, corrupt, missing = k400_src
    dst, s = k400_prepared
    m_src, m_dst = build_manifest(src), build_manifest(dst)
    # Every good video is in DST, re-encoded to a short side of 32 (aspect kept, even sizes), H.264 yuv420p.
    assert (s["videos"], s["written"], s["skipped"], s["failed"], s["missing"]) == (17, 14, 0, 3, 1)
    assert (s["encoded"], s["remuxed"], s["copied"], s["encoded_because"]) == (14, 0, 0, {"resize": 14})
    good = [p for p in m_src.table.column("path").to_pylist() if p not in corrupt]
    for p in good:
        out = dst / Path(p).relative_to(src)
        info = probe_source(out, keyframes=True)
        assert (info.codec, info.pix_fmt, info.width, info.height, info.frames) == ("h264", "yuv420p", 42, 32, 12)
        assert info.keyframe_interval <= 16
    # The manifests agree apart from paths: labels, splits, ids, times; the label map is the same.
    assert m_dst.labels == m_src.labels and m_dst.layout == "k400" and m_dst.missing == []
    assert _fields(m_dst) == _fields(m_src, corrupt) and len(m_dst) == 14
    assert m_dst.splits() == {"train": 9, "validate": 2, "test": 3}
    # The list files point at the new names, too.
    m_list = build_manifest(dst, "list")
    assert len(m_list) == 14 and m_list.missing == [] and m_list.labels == m_src.labels
    # Unreadable and missing sources: recorded with their stage, left out of the annotations.
    errors = pq.read_table(dst / ERRORS_FILE).to_pylist()
    assert {e["path"] for e in errors} == corrupt | {missing}
    assert all(e["stage"] in ("open", "decode") and e["error"] for e in errors)
    assert s["annotation_rows_dropped"] == 2 * 4  # CSV rows and list lines of 3 corrupt + 1 missing video
    assert s["bytes_after"] < s["bytes_before"] and s["decode_sample"] == 2 and s["decode_speedup"] > 0
    assert json.loads((dst / PLAN_FILE).read_text())["settings"]["short_side"] == 32
    # `mone data check DST` passes: everything listed is there and decodes.
    assert data_cmd.main(["check", str(dst), "--json", "--workers", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["unreadable"] == [] and rep["missing"] == [] and rep["splits"]["train"]["resolution"] == {"42x32": 9}


@pytest.mark.slow
def test_rerun_skips_finished_videos_and_other_settings_are_refused(k400_src, k400_prepared, capsys):
    src, _, _ = k400_src
    dst, _ = k400_prepared
    before = {k: p.read_bytes() for k, p in _tree(dst).items() if k != ERRORS_FILE}
    s = run_prepare(src, dst, **K400_ARGS)
    assert (s["written"], s["skipped"], s["failed"]) == (0, 14, 3)  # the unreadable ones are tried again
    assert {k: p.read_bytes() for k, p in _tree(dst).items() if k != ERRORS_FILE} == before
    err = _one_line_error(capsys, [str(src), "--out", str(dst), "--short-side", "32", "--gop", "8"])
    assert "was prepared with other settings (gop: 16 -> 8)" in err


@pytest.fixture(scope="module")
def ssv2_prepared(ssv2_src, ray_cluster, tmp_path_factory):
    src, _ = ssv2_src
    dst = tmp_path_factory.mktemp("ssv2_dst") / "ssv2_256"
    return dst, run_prepare(src, dst, short_side=256, max_error_fraction=0.5, progress=False, speed_sample=0)


@pytest.mark.slow
def test_ssv2_round_trip_webm_becomes_mp4(ssv2_src, ssv2_prepared, capsys):
    src, corrupt = ssv2_src
    dst, s = ssv2_prepared
    # 64x48 VP9 is already below a short side of 256: encoded to H.264 at its own size, and the summary says why.
    assert (s["written"], s["failed"], s["encoded"], s["encoded_because"]) == (20, 3, 20, {"codec": 20})
    m_src, m_dst = build_manifest(src), build_manifest(dst)
    for r in m_dst.table.to_pylist():
        assert r["path"] == str(dst / "20bn-something-something-v2" / f"{r['video_id']}.mp4")
    assert not list(dst.rglob("*.webm"))
    assert m_dst.labels == m_src.labels and _fields(m_dst) == _fields(m_src, corrupt)
    train = json.loads((dst / "labels" / "something-something-v2-train.json").read_text())
    assert len(train) == 12 and not {str(Path(p).stem) for p in corrupt} & {t["id"] for t in train}
    # files without dropped items are copied byte for byte
    for name in ("labels", "validation", "test"):
        rel = Path("labels") / f"something-something-v2-{name}.json"
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert data_cmd.main(["check", str(dst), "--json", "--workers", "1"]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_too_many_unreadable_videos_stop_the_job_naming_them(ssv2_src, ray_cluster, tmp_path, capsys):
    src, corrupt = ssv2_src
    dst = tmp_path / "strict"
    rc = data_cmd.main(["prepare", str(src), "--out", str(dst), "--no-progress", "--max-error-fraction", "0.05"])
    cap = capsys.readouterr()
    err = cap.err
    assert rc == 1 and "> --max-error-fraction 5.0%" in err and "Worst files:" in err
    last = json.loads(cap.out.strip().splitlines()[-1])
    assert last["error"] == "too many unreadable videos" and last["failed"] >= 2
    assert any(p in err for p in corrupt) and "Re-run the same command to continue" in err
    errors = pq.read_table(dst / ERRORS_FILE).to_pylist()
    assert errors and {e["path"] for e in errors} <= corrupt
    assert not (dst / "labels").exists()  # no annotations for an unfinished archive


@pytest.mark.slow
def test_dry_run_lists_what_would_be_done_and_writes_nothing(k400_src, ray_cluster, tmp_path, capsys):
    src, corrupt, _ = k400_src
    dst = tmp_path / "dry"
    assert data_cmd.main(["prepare", str(src), "--out", str(dst), "--short-side", "32", "--dry-run",
                          "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    actions = [ln.split("\t") for ln in lines[:-1]]
    assert len(actions) == 17 and not dst.exists()
    assert {a[1] for a in actions if a[0] == "fail"} == corrupt
    assert all(a[3] == "resize 64x48 -> 42x32" and a[2].startswith(str(dst)) for a in actions if a[0] == "encode")
    assert (summary["dry_run"], summary["encode"], summary["unreadable"], summary["missing"]) == (True, 14, 3, 1)
    # At a short side of 64 the same videos are already small, H.264, keyframe every 8: they would be copied.
    assert data_cmd.main(["prepare", str(src), "--out", str(dst), "--short-side", "64", "--dry-run",
                          "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["copy"], summary["encode"]) == (14, 0)


@pytest.mark.slow
def test_a_video_that_crashes_its_worker_is_recorded_not_retried_forever(k400_src, ray_cluster, tmp_path,
                                                                         monkeypatch):
    src, corrupt, _ = k400_src
    good = sorted(p for p in src.rglob("*.mp4") if str(p) not in corrupt)
    archive = tmp_path / "folders"  # class-folder layout
    for i, p in enumerate(good[:3]):
        name = "crashme.mp4" if i == 2 else p.name
        (archive / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (archive / f"class{i % 2}" / name).write_bytes(p.read_bytes())
    monkeypatch.setenv("MONE_TEST_CRASH_MARKER", "crashme")
    s = run_prepare(archive, tmp_path / "out", short_side=32, max_error_fraction=0.5, progress=False,
                    speed_sample=0)
    assert (s["layout"], s["written"], s["failed"]) == ("folders", 2, 1)
    errors = pq.read_table(tmp_path / "out" / ERRORS_FILE).to_pylist()
    assert [(Path(e["path"]).name, e["stage"]) for e in errors] == [("crashme.mp4", "crash")]
    assert "died while preparing this video (2 times)" in errors[0]["error"]
    assert len(build_manifest(tmp_path / "out")) == 2 and not list((tmp_path / "out").rglob("*.prepare-*"))


@pytest.mark.slow
def test_sigkilled_run_then_the_same_command_gives_the_same_dst(k400_src, k400_prepared, ray_cluster, tmp_path):
    src, _, _ = k400_src
    ref, _ = k400_prepared
    dst = tmp_path / "k400_32"
    cmd = [sys.executable, "-m", "jobs.prepare", str(src), "--out", str(dst), "--short-side", "32",
           "--max-error-fraction", "0.5", "--concurrency", "1", "--speed-sample", "0", "--no-progress"]
    # Connects to this module's Ray; each task waits 0.5 s between its temporary file and the rename, one at a time,
    # so the kill lands mid-run (with a temporary file on disk, usually).
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled", "MONE_PREPARE_THROTTLE_S": "0.5"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 150
    try:
        while len(list(dst.rglob("*.mp4"))) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no videos written in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    time.sleep(2)  # Ray ends the dead driver's tasks
    n_done = len(list(dst.rglob("*.mp4")))
    assert 4 <= n_done < 14 and not (dst / "annotations").exists() and not (dst / ERRORS_FILE).exists()
    s = run_prepare(src, dst, **{**K400_ARGS, "speed_sample": 0})
    assert s["skipped"] == n_done and s["written"] == 14 - n_done
    a, b = _tree(ref), _tree(dst)
    assert list(a) == list(b) and not list(dst.rglob(f"*{TMP_SUFFIX}"))  # same files, no leftovers
    for rel, p in a.items():
        if rel.endswith(".mp4"):
            assert np.array_equal(decode_all(p, decoder="pyav"), decode_all(b[rel], decoder="pyav")), rel
        elif rel == ERRORS_FILE:
            assert pq.read_table(p).equals(pq.read_table(b[rel]))
        else:
            assert p.read_bytes() == b[rel].read_bytes(), rel


@pytest.mark.slow
def test_training_runs_on_the_prepared_archive(ssv2_prepared, ray_cluster, tmp_path):
    dst, _ = ssv2_prepared
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--config", "tiny_cpu", f"data.root={dst}", "data.layout=ssv2",
           "optim.epochs=1", "optim.batch_size=4", "scaling.num_workers=1", "mone.val_budgets=[1.0]",
           "data.max_error_fraction=0", f"run.storage_path={tmp_path}", "run.name=prepared"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:] + p.stdout[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(summary["checkpoint"]).is_dir()
    # Not one video of the prepared archive failed to decode (max_error_fraction=0 would have stopped the run).
    errors = tmp_path / "prepared" / "errors.parquet"
    assert not errors.exists() or pq.read_table(errors).num_rows == 0
