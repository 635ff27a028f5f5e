import argparse
import json

import pytest

from jobs import flops_cmd
from models.flops import model_flops


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="mone")
    flops_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["flops", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_dense_vs_mone(capsys):
    code, out, _ = _run(["vivit_b16", "--frames", "32", "--budget", "0.3"], capsys)
    assert code == 0
    dense, mone = model_flops("vivit_b16") / 1e9, model_flops("vivit_b16", 0.3) / 1e9
    assert f"{dense:.2f}" in out and f"{mone:.2f}" in out and f"{dense / mone:.2f}" in out
    assert "[0.414, 0.321, 0.194, 0.071]" in out


def test_json_several_budgets_and_img_size(capsys):
    code, out, _ = _run(["vit_b16", "--img-size", "384", "--budget", "0.2,0.3,0.5", "--json"], capsys)
    assert code == 0
    t = json.loads(out)
    assert t["img_size"] == 384 and t["tokens_per_frame"] == 576
    assert [r["e_c"] for r in t["budgets"]] == [0.2, 0.3, 0.5]
    ratios = [r["ratio"] for r in t["budgets"]]
    assert ratios == sorted(ratios, reverse=True) and all(r > 1 for r in ratios)
    assert t["dense_gflops"] == pytest.approx(model_flops("vit_b16", img_size=384) / 1e9, abs=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vit_huge"], "unknown variant"),
        (["vit_b16", "--frames", "8"], "image model"),
        (["vivit_b16", "--budget", "0.05"], "outside the valid range"),
        (["vivit_b16", "--budget", "abc"], "comma list"),
    ],
)
def test_errors_exit_2_with_a_message(capsys, argv, message):
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err


def test_paper_convention_counts_a_multiply_add_once_per_view(capsys):
    """ViViT-FE-B/16 at 256 px, 32 frames: ~374 GFLOPs per view as the paper counts (Table 1: 376), 12 views."""
    code, out, _ = _run(["vivit_b16", "--img-size", "256", "--budget", "0.3", "--views", "4x3", "--json"], capsys)
    assert code == 0
    t = json.loads(out)
    two = model_flops("vivit_b16", img_size=256)
    assert t["dense_gmacs"] == pytest.approx(two / 2e9, abs=1e-3) and 370 < t["dense_gmacs"] < 380
    assert t["dense_gflops"] == pytest.approx(two / 1e9, abs=1e-3)  # the x2 convention, under its own name
    assert t["views"] == 12 and t["dense_gmacs_per_clip"] == pytest.approx(12 * t["dense_gmacs"], abs=0.01)
    assert "multiply-add = 1" in t["flops_convention"]
    code, out, _ = _run(["vivit_b16", "--img-size", "256", "--budget", "0.3"], capsys)
    assert "as the paper counts them (a multiply-add = 1 FLOP)" in out and f"{two / 2e9:.2f}" in out
    code, _, err = _run(["vivit_b16", "--views", "4by3"], capsys)
    assert code == 2 and "--views" in err
