"""``fastcam demo``: a tiny run end to end (table, PNGs, JSON), determinism, and bad options."""

import json
import math
import re

import pytest
import torch
from PIL import Image

import fastcam.cli

TINY = ["--epochs", "1", "--train-size", "64", "--test-size", "32", "--image-size", "48", "--no-progress"]
RATES = ("0.1", "0.25", "0.5", "0.75", "0.9")


def in_unit_interval(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_tiny_demo_prints_the_table_and_writes_three_valid_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert fastcam.cli.main(["demo", *TINY]) == 0  # no --out: a new timestamped folder here
    printed = capsys.readouterr().out
    folders = list(tmp_path.glob("fastcam-demo-*"))
    assert len(folders) == 1 and re.fullmatch(r"fastcam-demo-\d{8}-\d{6}", folders[0].name), folders
    out = folders[0]
    assert f"writing into {out}" in printed
    assert re.search(r"^metric +baseline +attention +difference$", printed, flags=re.M), printed
    for row in ("macro ROC AUC", "pointing game", "energy pointing game", "IoU >= 0.1", "IoU >= 0.25",
                "IoU >= 0.5", "IoBB >= 0.1", "IoBB >= 0.5", "co-present map overlap"):
        figures = r" +-?\d\.\d{3} +-?\d\.\d{3} +[+-]\d\.\d{3}$"
        assert re.search(f"^{re.escape(row)}.*{figures}", printed, flags=re.M), row

    for name in ("overlays.png", "curves.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 100
            image.verify()

    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["epochs"] == 1 and report["config"]["image_size"] == 48
    assert report["environment"]["backend_used"] in ("torch", "cpu", "cuda", "triton")
    assert report["data"]["test_images"] == 32 and report["data"]["test_boxes"] > 0
    assert report["seconds"]["total"] > 0
    assert set(report["runs"]) == {"baseline", "attention"}
    for run in report["runs"].values():
        for key in ("macro_auc", "pointing_game", "energy_pointing_game", "mean_iou", "mean_iobb",
                    "copresent_overlap"):
            assert in_unit_interval(run[key]), (key, run[key])
        assert list(run["iou_hit_rates"]) == list(RATES) and list(run["iobb_hit_rates"]) == list(RATES)
        assert all(in_unit_interval(v) for v in [*run["iou_hit_rates"].values(), *run["iobb_hit_rates"].values()])
        assert all(v is None or in_unit_interval(v) for v in run["per_class_auc"].values())
        assert run["history"]["epoch"] == [1] and math.isfinite(run["history"]["loss"][0])
    diff = report["difference"]["macro ROC AUC"]
    assert diff == pytest.approx(report["runs"]["attention"]["macro_auc"] - report["runs"]["baseline"]["macro_auc"])


def test_runs_share_data_order_and_initialization(tmp_path, capsys):
    """With lambda_distinct = 0 the attention run is the baseline (masked BCE), so both runs match
    (up to the float rounding of two BCE implementations); a second run repeats the first exactly."""
    args = ["demo", *TINY, "--train-size", "128", "--lambda-distinct", "0"]
    reports = []
    for k in range(2):
        assert fastcam.cli.main([*args, "--out", str(tmp_path / str(k))]) == 0
        reports.append(json.loads((tmp_path / str(k) / "metrics.json").read_text())["runs"])
    capsys.readouterr()
    base, att = reports[0]["baseline"], reports[0]["attention"]
    assert att["history"]["bce"] == pytest.approx(base["history"]["bce"], rel=1e-4)
    assert att["macro_auc"] == pytest.approx(base["macro_auc"], abs=1e-3)
    for name in ("baseline", "attention"):
        first, second = reports[0][name], reports[1][name]
        assert first.pop("train_seconds") > 0 and second.pop("train_seconds") > 0
        assert first == second


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--epochs", "0", "argument --epochs: must be an integer >= 1, got '0'"),
        ("--train-size", "many", "argument --train-size: must be an integer >= 8, got 'many'"),
        ("--image-size", "16", "argument --image-size: must be an integer >= 32, got '16'"),
        ("--unlabeled-fraction", "1.5", "argument --unlabeled-fraction: must be a number in [0.0, 1.0)"),
        ("--lambda-distinct", "-1", "argument --lambda-distinct: must be a number in [0.0, inf]"),
        ("--backend", "fast", "argument --backend: invalid choice: 'fast'"),
    ],
)
def test_bad_option_values_are_refused_clearly(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fastcam.cli.main(["demo", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    assert fastcam.cli.main(["demo", *TINY, "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "fastcam demo: error: --device cuda: CUDA is not available here" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
