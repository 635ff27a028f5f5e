"""`mone data synth` / `mone data check`, run through jobs.data_cmd (the same parser `mone` builds)."""

import json
import os

import pytest

from jobs import data_cmd


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "k400"
    rc = data_cmd.main(["synth", "--layout", "k400", "--out", str(out), "--classes", "3", "--videos-per-class", "3",
                        "--corrupt", "2", "--size", "48x32", "--frames", "6", "--seed", "4", "--workers", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["videos"] == 3 * 3 + 3 * 1 + 2 and summary["corrupt"] == 2
    # delete one video: check reports it missing; the corrupt ones are unreadable
    victim = next((out / "videos" / "validate").rglob("*.mp4"))
    os.remove(victim)
    rc = data_cmd.main(["check", str(out), "--json", "--workers", "1"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert rep["layout"] == "k400" and rep["classes"] == 3
    assert rep["splits"]["train"]["unreadable"] == 2 and rep["splits"]["train"]["ok"] == 9
    assert rep["splits"]["validate"]["missing"] == 1 and rep["splits"]["validate"]["found"] == 2
    assert rep["missing"] == [str(victim)]
    assert rep["splits"]["train"]["resolution"] == {"48x32": 9}
    assert rep["splits"]["train"]["fps"] == {"8": 9}
    assert rep["splits"]["train"]["frames"] == {"min": 6, "median": 6, "max": 6}
    # human output: a table per split and the bad files
    rc = data_cmd.main(["check", str(out), "--workers", "1", "--errors-out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert rc == 1 and "unreadable" in text and "validate" in text and "48x32" in text
    assert (tmp_path / "run" / "errors.parquet").exists()


def test_check_ssv2_ok(ssv2, capsys, tmp_path):
    rc = data_cmd.main(["check", str(ssv2), "--json", "--workers", "1", "--limit", "2"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["layout"] == "ssv2" and set(rep["splits"]) == {"train", "validation", "test"}
    assert rc in (0, 1)


def test_check_explains_a_non_dataset(tmp_path, capsys):
    rc = data_cmd.main(["check", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "no annotation file found under" in err and "something-something-v2-labels.json" in err


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        data_cmd.main(["synth", "--help"])
    text = capsys.readouterr().out
    assert "--videos-per-class" in text and "direction of motion" in text
