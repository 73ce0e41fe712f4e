"""``fastcam train`` and ``fastcam explain`` on a handful of tiny images in tmp_path (NIH files)."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import fastcam.cli
from fastcam.cli.train import TrainError, build_model, load_image

TINY = ["--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.4",
        "--no-progress"]
ROWS = [("a.png", "Effusion|Mass"), ("b.png", "No Finding"), ("c.png", "Cardiomegaly"),
        ("d.jpg", "Mass|Nodule|Effusion"), ("e.png", "No Finding"), ("f.png", "Effusion"),
        ("g.png", "Cardiomegaly|Effusion"), ("h.png", "Nodule")]


def write_images(folder, rows=ROWS):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for k, (name, _) in enumerate(rows):
        path = folder / name
        if k % 4 == 1:  # 16-bit gray, stored as mode I;16
            Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(path)
        elif k % 4 == 2:
            Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8), "RGB").save(path)
        else:  # 8-bit gray (PNG or JPEG)
            Image.fromarray(rng.integers(0, 256, (44, 40), dtype=np.uint8), "L").save(path)


def write_labels(path, rows=ROWS):
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    lines += [f"{name},{labels},0,{k}" for k, (name, labels) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def nih(tmp_path):
    write_images(tmp_path / "images")
    write_labels(tmp_path / "Data_Entry_2017.csv")
    boxes = ["Image Index,Finding Label,Bbox [x,y,w,h]"]
    boxes += [f"{name},{finding},{4 + k},{5 + k},20,18" for k, (name, labels) in enumerate(ROWS)
              for finding in labels.split("|") if finding != "No Finding"]
    boxes.append("a.png,Infiltrate,2,2,10,10")
    (tmp_path / "BBox_List_2017.csv").write_text("\n".join(boxes) + "\n")
    return tmp_path


def data_args(root):
    return ["--labels", str(root / "Data_Entry_2017.csv"), "--format", "nih", "--images", str(root / "images")]


def test_images_of_every_mode_are_one_channel_in_unit_range(nih):
    sixteen = np.full((10, 12), 65535, dtype=np.uint16)
    sixteen[0, 0] = 0
    Image.fromarray(sixteen).save(nih / "white16.png")
    for name in ["a.png", "b.png", "c.png", "d.jpg", "white16.png"]:
        folder = nih if name == "white16.png" else nih / "images"
        x, hw = load_image(str(folder / name), 32)
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
    with Image.open(nih / "images" / "b.png") as image:
        assert image.mode.startswith("I")  # the fixture's 16-bit image is read as a 16-bit mode
    x, hw = load_image(str(nih / "white16.png"), 32)
    assert hw == (10, 12) and x.mean() > 0.95  # 16-bit white is 1, not 65535 / 255


def test_train_resume_and_explain(nih, capsys):
    out = nih / "run"
    args = ["train", *data_args(nih), "--boxes", str(nih / "BBox_List_2017.csv"), *TINY, "--out", str(out)]
    assert fastcam.cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "5 training and 3 validation images, 14 classes" in printed
    assert re.search(r"^epoch 1/1: loss \d+\.\d{4}", printed, flags=re.M), printed
    assert re.search(r"^macro ROC AUC +(-?\d\.\d{3}|nan)$", printed, flags=re.M), printed
    assert re.search(r"^pointing game \(hit rate\) +\d\.\d{3}$", printed, flags=re.M), printed
    assert (out / "checkpoint-epoch001.pt").is_file() and (out / "checkpoint-last.pt").is_file()
    ckpt = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["arch"] == "resnet18" and ckpt["config"]["image_size"] == 32
    assert ckpt["classes"][2] == "Effusion" and len(ckpt["classes"]) == 14
    assert ckpt["model"]["body.0.weight"].shape[1] == 1  # one input channel

    assert fastcam.cli.main([*args, "--epochs", "2", "--resume", str(out / "checkpoint-last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2:" in printed and "epoch 1/2:" not in printed
    ckpt2 = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert ckpt2["epoch"] == 2 and ckpt2["history"]["epoch"] == [1, 2] and (out / "checkpoint-epoch002.pt").is_file()
    assert ckpt2["steps"] == 2 * ckpt["steps"]

    pngs = nih / "explained"
    images = [str(nih / "images" / "a.png"), str(nih / "images" / "b.png")]
    assert fastcam.cli.main(["explain", "--checkpoint", str(out / "checkpoint-last.pt"), *images,
                             "--out", str(pngs), "--threshold", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 2 overlay(s) into {pngs}" in printed
    for stem in ("a", "b"):
        with Image.open(pngs / f"{stem}-cam.png") as image:
            assert image.format == "PNG" and image.width > 100
            image.verify()


def test_lambda_zero_and_val_labels_without_boxes(nih, capsys):
    write_labels(nih / "val.csv", ROWS[:3])
    out = nih / "run0"
    assert fastcam.cli.main(["train", *data_args(nih), *TINY, "--lambda-distinct", "0", "--out", str(out),
                             "--val-labels", str(nih / "val.csv")]) == 0
    printed = capsys.readouterr().out
    assert "8 training and 3 validation images" in printed and "pointing game" not in printed
    assert (out / "checkpoint-last.pt").is_file()


def test_missing_label_file_bad_options_and_unknown_arch(nih, capsys):
    missing = nih / "nope.csv"
    assert fastcam.cli.main(["train", "--labels", str(missing), "--images", str(nih), *TINY, "--out",
                             str(nih / "x")]) == 2
    assert f"fastcam train: error: {missing}: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        fastcam.cli.main(["train", *data_args(nih), "--arch", "vgg11"])
    assert exit_info.value.code == 2
    assert "argument --arch: invalid choice: 'vgg11'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fastcam.cli.main(["train", *data_args(nih), "--val-fraction", "1"])
    assert "argument --val-fraction: must be a number in (0.0, 1.0)" in capsys.readouterr().err
    assert fastcam.cli.main(["train", *data_args(nih), *TINY, "--out", str(nih / "x"), "--resume",
                             str(nih / "none.pt")]) == 2
    assert f"{nih / 'none.pt'}: no such checkpoint file" in capsys.readouterr().err


def test_missing_image_names_path_and_row(nih, capsys):
    (nih / "images" / "c.png").unlink()
    assert fastcam.cli.main(["train", *data_args(nih), *TINY, "--out", str(nih / "x")]) == 2
    err = capsys.readouterr().err
    assert "Data_Entry_2017.csv: data row 3: image 'c.png' not found" in err and str(nih / "images" / "c.png") in err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_image_names_path_and_row(nih, capsys, workers):
    bad = nih / "images" / "e.png"
    bad.write_bytes(b"this is not a PNG file at all")
    assert fastcam.cli.main(["train", *data_args(nih), *TINY, "--out", str(nih / "x"), "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot read the image" in err and "Data_Entry_2017.csv, data row 5" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_weights_file_sums_the_rgb_first_conv_and_drops_the_head(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)  # 3 channels, 1000 classes
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    model = build_model("resnet18", 5, str(tmp_path / "r18.pt"))
    assert torch.allclose(model.body[0].weight, reference.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.body[4][0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.head.weight.shape == (5, 512) and model(torch.rand(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(TrainError, match="r18.pt: not a resnet50 state_dict"):
        build_model("resnet50", 5, str(tmp_path / "r18.pt"))
    with pytest.raises(TrainError, match="unknown arch 'vgg11'"):
        build_model("vgg11", 5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_train_under_torchrun_with_two_gloo_processes(nih):
    # `fastcam train` under torchrun: two CPU processes (gloo), DDP, each with half of the batches;
    # rank 0 alone logs and writes the checkpoints.
    import os
    import subprocess
    import sys

    out = nih / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastcam.cli", "train", *data_args(nih), *TINY, "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ckpt = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and "x 2 processes" in done.stdout  # rank 0's log line, printed once
    assert done.stdout.count("x 2 processes") == 1
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == ["checkpoint-epoch001.pt", "checkpoint-last.pt"]
