"""fastcam.data: the label-file readers of SPEC §6.1 and the synthetic dataset of ``fastcam demo``."""

import re

import pytest
import torch

from fastcam.data import (
    NIH_CLASSES,
    SYNTHETIC_CLASSES,
    LabelTable,
    SyntheticChestXray,
    make_synthetic,
    read_boxes,
    read_labels,
)

# ----------------------------------------------------------------------------------------------
# Synthetic dataset
# ----------------------------------------------------------------------------------------------

C = len(SYNTHETIC_CLASSES)


@pytest.fixture(scope="module")
def big():
    return make_synthetic(1000, seed=11, unlabeled_fraction=0.25)


def test_synthetic_shapes_and_dtypes():
    b = make_synthetic(10, seed=0)
    assert b.images.shape == (10, 1, 96, 96) and b.images.dtype == torch.float32
    assert b.labels.shape == (10, C) and b.labels.dtype == torch.float32
    assert b.true_labels.shape == (10, C) and b.true_labels.dtype == torch.float32
    assert b.mask.shape == (10, C) and b.mask.dtype == torch.bool
    assert len(b.boxes) == 10
    assert 0.0 <= b.images.min() and b.images.max() <= 1.0
    assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
    small = make_synthetic(3, size=64, seed=0)
    assert small.images.shape == (3, 1, 64, 64)
    empty = make_synthetic(0)
    assert empty.images.shape == (0, 1, 96, 96) and empty.labels.shape == (0, C) and empty.boxes == []


def _same(a, b) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.mask, b.mask)
            and torch.equal(a.true_labels, b.true_labels) and a.boxes == b.boxes)


def test_synthetic_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = make_synthetic(300, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(1234)  # the global RNG does not matter
    b = make_synthetic(300, seed=5)
    assert _same(a, b)
    threads = torch.get_num_threads()
    make_synthetic(2)
    assert torch.get_num_threads() == threads


def test_synthetic_seed_changes_the_images_and_n_does_not():
    a = make_synthetic(300, seed=5)
    c = make_synthetic(300, seed=6)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.true_labels, c.true_labels)
    prefix = make_synthetic(40, seed=5)  # image i does not depend on n
    assert torch.equal(prefix.images, a.images[:40]) and prefix.boxes == a.boxes[:40]
    assert torch.equal(prefix.true_labels, a.true_labels[:40])


def test_synthetic_boxes_inside_and_on_the_lesions():
    n, S = 200, 96
    b = make_synthetic(n, seed=3)
    clean = make_synthetic(n, seed=3, lesions=False)
    assert torch.equal(b.true_labels, clean.true_labels) and b.boxes == clean.boxes
    diff = (b.images - clean.images).abs()[:, 0]
    checked = 0
    for i in range(n):
        present = {c for c in range(C) if b.true_labels[i, c]}
        assert {box[0] for box in b.boxes[i]} == present  # a box per finding, none without
        if not present:
            assert diff[i].max() == 0  # no lesion: the image is the background
            continue
        union = torch.zeros(S, S, dtype=torch.bool)
        for c, x, y, w, h in b.boxes[i]:
            assert all(float(v).is_integer() for v in (x, y, w, h))
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= S and y + h <= S
            x, y, w, h = int(x), int(y), int(w), int(h)
            inside = diff[i, y : y + h, x : x + w]
            assert inside.max() > 0.04, (i, SYNTHETIC_CLASSES[c], inside.max())
            union[y : y + h, x : x + w] = True
            checked += 1
        # the boxes cover the lesions: nearly all of what the lesions change is inside them
        assert diff[i][union].sum() >= 0.9 * diff[i].sum(), i
    assert checked > 150


def test_synthetic_label_statistics(big):
    true, labels, mask = big.true_labels, big.labels, big.mask
    rate = true.mean(0)
    assert ((rate > 0.08) & (rate < 0.45)).all(), rate
    count = true.sum(1)
    assert 0.28 < (count == 0).float().mean() < 0.42
    assert 1.0 < count.mean() < 1.45
    assert (count >= 2).float().mean() > 0.2
    joint = (true.T @ true) / len(true)
    nod, mass, eff, card, ptx = range(C)
    assert joint[eff, card] > 1.3 * rate[eff] * rate[card]  # correlated pairs
    assert joint[nod, mass] > 1.3 * rate[nod] * rate[mass]
    assert joint[card, ptx] < rate[card] * rate[ptx]
    # unlabeled images: mask all False, labels 0, truth kept
    unlabeled = ~mask.any(1)
    assert (mask.all(1) | unlabeled).all()
    assert 0.2 < unlabeled.float().mean() < 0.3
    assert torch.equal(labels, true * mask)
    assert true[unlabeled].sum() > 0
    assert make_synthetic(100, seed=11, unlabeled_fraction=0.0).mask.all()
    assert not make_synthetic(100, seed=11, unlabeled_fraction=1.0).mask.any()


def test_synthetic_class_typical_places(big):
    S = 96
    place = {c: [] for c in range(C)}
    for boxes in big.boxes:
        for c, x, y, w, h in boxes:
            place[c].append((abs(x + w / 2 - S / 2), y + h / 2))  # (distance from the midline, height)
    mean = {c: torch.tensor(p).mean(0) for c, p in place.items()}
    for c in range(C):
        for d in range(c):
            assert (mean[c] - mean[d]).norm() > 4, (SYNTHETIC_CLASSES[c], SYNTHETIC_CLASSES[d], mean[c], mean[d])
    nod, mass, eff, card, ptx = range(C)
    assert mean[ptx][1] < mean[nod][1] < mean[mass][1] < mean[eff][1]  # apex, upper, middle, lower lung
    assert mean[card][0] < 10  # central
    sizes = {c: torch.tensor([(w * h) for boxes in big.boxes for k, x, y, w, h in boxes if k == c]).float().mean()
             for c in range(C)}
    assert sizes[nod] < sizes[mass] < sizes[card]


def test_synthetic_dataset_and_collate():
    ds = SyntheticChestXray(20, seed=2, unlabeled_fraction=0.5)
    assert len(ds) == 20 and ds.classes == SYNTHETIC_CLASSES
    item = ds[3]
    assert item["image"].shape == (1, 96, 96) and item["labels"].shape == (C,) and item["mask"].dtype == torch.bool
    assert ds[-1]["index"] == 19
    with pytest.raises(IndexError):
        ds[20]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=SyntheticChestXray.collate)))
    assert batch["image"].shape == (8, 1, 96, 96) and batch["true_labels"].shape == (8, C)
    assert len(batch["boxes"]) == 8 and batch["boxes"][3] == ds.boxes[3]
    assert torch.equal(batch["image"], make_synthetic(8, seed=2).images)


@pytest.mark.parametrize("kwargs, match", [({"n": -1}, "n must"), ({"n": 2, "size": 16}, "size must"),
                                           ({"n": 2, "unlabeled_fraction": 1.5}, "unlabeled_fraction")])
def test_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)


# ----------------------------------------------------------------------------------------------
# Label files (SPEC §6.1)
# ----------------------------------------------------------------------------------------------


def write(tmp_path, name: str, text: str, bom: bool = False):
    path = tmp_path / name
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


NIH_CSV = """\
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,\
OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171
00000003_000.png,Hernia|Infiltration|Effusion,0,3,81,F,PA,2582,2991,0.143,0.143
"""


def multi_hot(classes, rows):
    out = torch.zeros(len(rows), len(classes))
    for r, names in enumerate(rows):
        for name in names:
            out[r, classes.index(name)] = 1
    return out


def test_nih(tmp_path):
    table = read_labels(write(tmp_path, "Data_Entry_2017.csv", NIH_CSV, bom=True), format="nih")
    assert isinstance(table, LabelTable) and len(table) == 4
    assert table.classes == list(NIH_CLASSES) and table.classes[:3] == ["Atelectasis", "Cardiomegaly", "Effusion"]
    assert table.paths == ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
    expected = multi_hot(table.classes, [["Cardiomegaly"], ["Cardiomegaly", "Emphysema"], [],
                                         ["Hernia", "Infiltration", "Effusion"]])
    assert table.labels.dtype == torch.float32 and torch.equal(table.labels, expected)
    assert table.mask.dtype == torch.bool and table.mask.all() and table.mask.shape == (4, 14)


def test_nih_classes_selects_and_orders(tmp_path):
    path = write(tmp_path, "Data_Entry_2017.csv", NIH_CSV)
    table = read_labels(path, format="nih", classes=["Effusion", "Cardiomegaly"])
    assert table.classes == ["Effusion", "Cardiomegaly"]
    assert torch.equal(table.labels, torch.tensor([[0.0, 1], [0, 1], [0, 0], [1, 0]]))
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv.*unknown class 'Pleural Effusion'"):
        read_labels(path, format="nih", classes=["Pleural Effusion"])


CHEXPERT_COLUMNS = ("No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
                    "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                    "Support Devices")
CHEXPERT_CSV = f"""\
Path,Sex,Age,Frontal/Lateral,AP/PA,{CHEXPERT_COLUMNS}
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,,,,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,,,,,,,1.0,
"""


def test_chexpert_uncertain_modes(tmp_path):
    path = write(tmp_path, "train.csv", CHEXPERT_CSV)
    classes = CHEXPERT_COLUMNS.split(",")
    positives = [["No Finding", "Support Devices"], ["Lung Opacity", "Fracture"], ["Lung Opacity", "Fracture"]]
    uncertain = [(1, "Cardiomegaly"), (1, "Edema"), (1, "Consolidation")]
    table = read_labels(path, format="chexpert")  # uncertain="ignore"
    assert table.classes == classes
    assert table.paths[1] == "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"
    mask = torch.ones(3, 14, dtype=torch.bool)
    for r, name in uncertain:
        mask[r, classes.index(name)] = False
    assert torch.equal(table.labels, multi_hot(classes, positives))
    assert torch.equal(table.mask, mask)
    ones = read_labels(path, format="chexpert", uncertain="ones")
    assert ones.mask.all()
    assert torch.equal(ones.labels, multi_hot(classes, [positives[0], positives[1] + [n for _, n in uncertain],
                                                        positives[2]]))
    zeros = read_labels(path, format="chexpert", uncertain="zeros")
    assert zeros.mask.all() and torch.equal(zeros.labels, multi_hot(classes, positives))
    picked = read_labels(path, format="chexpert", classes=["Edema", "Lung Opacity"])
    assert picked.classes == ["Edema", "Lung Opacity"]
    assert torch.equal(picked.labels, torch.tensor([[0.0, 0], [0, 1], [0, 1]]))
    assert torch.equal(picked.mask, torch.tensor([[True, True], [False, True], [True, True]]))
    with pytest.raises(ValueError, match=r"train\.csv.*unknown class 'Sex'"):
        read_labels(path, format="chexpert", classes=["Sex"])
    with pytest.raises(ValueError, match=r"train\.csv.*uncertain='maybe'"):
        read_labels(path, format="chexpert", uncertain="maybe")


PADCHEST_CSV = """\
ImageID,ImageDir,StudyDate_DICOM,Labels,Localizations
a.png,0,20140915,"['pleural effusion', ' cardiomegaly']",['loc left']
b.png,1,20140915,['normal'],[]
c.png,1,20150101,"['', 'pneumonia', 'cardiomegaly ']",[]
d.png,2,20150101,nan,[]
e.png,54,20160101,"['pleural effusion', 'unchanged'",[]
f.png,2,20160101,[],[]
"""


def test_padchest(tmp_path):
    path = write(tmp_path, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", PADCHEST_CSV)
    with pytest.warns(UserWarning, match=r"PADCHEST.*'Labels'.*2 row\(s\) \(data rows \[4, 5\]\)"):
        table = read_labels(path, format="padchest")
    assert table.paths == ["0/a.png", "1/b.png", "1/c.png", "2/d.png", "54/e.png", "2/f.png"]
    assert table.classes == ["cardiomegaly", "pleural effusion", "pneumonia"]
    assert torch.equal(table.labels, torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0],
                                                   [0, 0, 0]]))
    assert torch.equal(table.mask.all(1), torch.tensor([True, True, True, False, False, True]))
    assert torch.equal(table.mask.any(1), table.mask.all(1))
    with pytest.warns(UserWarning):
        given = read_labels(path, format="padchest", classes=["pneumonia", "emphysema"])
    assert given.classes == ["pneumonia", "emphysema"]  # labels outside classes are dropped
    assert torch.equal(given.labels, torch.tensor([[0.0, 0], [0, 0], [1, 0], [0, 0], [0, 0], [0, 0]]))


GENERIC_CSV = """\
path,a,b,c
x1.png,1,0,
x2.png,,1,0

x3.png,0,,1.0
"""


def test_generic(tmp_path):
    path = write(tmp_path, "labels.csv", GENERIC_CSV)
    table = read_labels(path, format="generic")
    assert table.paths == ["x1.png", "x2.png", "x3.png"] and table.classes == ["a", "b", "c"]
    assert torch.equal(table.labels, torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))
    assert torch.equal(table.mask, torch.tensor([[True, True, False], [False, True, True], [True, False, True]]))
    picked = read_labels(path, format="generic", classes=["c", "a"])
    assert picked.classes == ["c", "a"] and torch.equal(picked.labels, torch.tensor([[0.0, 1], [0, 0], [1, 0]]))
    with pytest.raises(ValueError, match=r"labels\.csv.*unknown class 'd'"):
        read_labels(path, format="generic", classes=["d"])
    # a bad value: data rows count from 1 after the header, lines count the header and blank lines
    bad = write(tmp_path, "bad.csv", GENERIC_CSV.replace("x3.png,0,,1.0", "x3.png,0,,-1"))
    with pytest.raises(ValueError, match=r"bad\.csv: data row 3 \(line 5\), column 'c': value '-1'"):
        read_labels(bad, format="generic")


BBOX_CSV = """\
Image Index,Finding Label,Bbox [x,y,w,h],,,
00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,
00014716_007.png,Infiltrate,173.79,267.82,116.97,89.6,,,
00013118_008.png,Mass,1.5,2,3,4,,,
"""


def test_boxes(tmp_path):
    path = write(tmp_path, "BBox_List_2017.csv", BBOX_CSV, bom=True)
    boxes = read_boxes(path)  # classes default to the 14 NIH findings
    assert boxes == {
        "00013118_008.png": [(0, 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661),
                             (4, 1.5, 2.0, 3.0, 4.0)],
        "00014716_007.png": [(3, 173.79, 267.82, 116.97, 89.6)],
    }
    table = read_labels(write(tmp_path, "Data_Entry_2017.csv", NIH_CSV), format="nih", classes=["Mass", "Infiltration"])
    assert read_boxes(path, classes=table.classes) == {"00013118_008.png": [(0, 1.5, 2.0, 3.0, 4.0)],
                                                        "00014716_007.png": [(1, 173.79, 267.82, 116.97, 89.6)]}


# ----------------------------------------------------------------------------------------------
# Errors name the file, the row and the column
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        read_labels(tmp_path / "nowhere.csv", format="nih")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        read_boxes(tmp_path / "nowhere.csv")


def test_unknown_format(tmp_path):
    path = write(tmp_path, "labels.csv", GENERIC_CSV)
    with pytest.raises(ValueError, match=r"labels\.csv: unknown format 'mimic'"):
        read_labels(path, format="mimic")


def test_format_told_from_the_header(tmp_path):
    for fmt, name, text in [("nih", "Data_Entry_2017.csv", NIH_CSV), ("chexpert", "train.csv", CHEXPERT_CSV),
                            ("generic", "labels.csv", GENERIC_CSV)]:
        path = write(tmp_path, name, text)
        auto, given = read_labels(path), read_labels(path, format=fmt)
        assert auto.classes == given.classes and auto.paths == given.paths
        assert torch.equal(auto.labels, given.labels) and torch.equal(auto.mask, given.mask)
    with pytest.warns(UserWarning):
        assert read_labels(write(tmp_path, "padchest.csv", PADCHEST_CSV)).paths[0] == "0/a.png"
    with pytest.raises(ValueError, match=r"other\.csv: line 1 \(header\): cannot tell the format"):
        read_labels(write(tmp_path, "other.csv", "file,a\nx.png,1\n"))


@pytest.mark.parametrize("fmt, text, column", [
    ("chexpert", CHEXPERT_CSV.replace("Path,", "Image,", 1), "Path"),
    ("nih", NIH_CSV.replace("Finding Labels", "Findings"), "Finding Labels"),
    ("padchest", PADCHEST_CSV.replace("ImageDir", "Dir"), "ImageDir"),
    ("generic", GENERIC_CSV.replace("path", "file"), "path"),
])
def test_missing_column(tmp_path, fmt, text, column):
    path = write(tmp_path, f"{fmt}.csv", text)
    with pytest.raises(ValueError, match=rf"{fmt}\.csv: line 1 \(header\): missing column '{re.escape(column)}'"):
        read_labels(path, format=fmt)


def test_missing_bbox_column(tmp_path):
    path = write(tmp_path, "BBox_List_2017.csv", BBOX_CSV.replace("Bbox [x,y,w,h]", "Bbox [x,y,h]"))
    with pytest.raises(ValueError, match=r"BBox_List_2017\.csv: line 1 \(header\): missing column 'w'"):
        read_boxes(path)


def test_malformed_chexpert_value(tmp_path):
    path = write(tmp_path, "valid.csv", CHEXPERT_CSV.replace(",-1.0,1.0,,-1.0,", ",-1.0,yes,,-1.0,"))
    with pytest.raises(ValueError, match=r"valid\.csv: data row 2 \(line 3\), column 'Lung Opacity': value 'yes'"):
        read_labels(path, format="chexpert")


def test_short_row(tmp_path):
    path = write(tmp_path, "Data_Entry_2017.csv", NIH_CSV + "00000004_000.png\n")
    with pytest.raises(ValueError, match=r"data row 5 \(line 6\), column 'Finding Labels'"):
        read_labels(path, format="nih")


@pytest.mark.parametrize("labels", ["Pneumonitis", "Mass|Pneumonitis", "Mass||Nodule", "No Finding|Mass", '""'])
def test_nih_bad_finding(tmp_path, labels):
    path = write(tmp_path, "Data_Entry_2017.csv",
                 NIH_CSV.replace("No Finding,0,2", f"{labels},0,2"))
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv: data row 3 \(line 4\), column 'Finding Labels'"):
        read_labels(path, format="nih")
    if "Pneumonitis" in labels:
        with pytest.raises(ValueError, match="unknown finding 'Pneumonitis'"):
            read_labels(path, format="nih")


def test_bbox_unknown_finding_and_bad_number(tmp_path):
    path = write(tmp_path, "BBox_List_2017.csv", BBOX_CSV.replace(",Mass,", ",Lump,"))
    with pytest.raises(ValueError, match=r"BBox_List_2017\.csv: data row 3 \(line 4\), column 'Finding Label': "
                                         r"unknown finding 'Lump'"):
        read_boxes(path)
    path = write(tmp_path, "BBox_List_2017.csv", BBOX_CSV.replace(",Mass,1.5,", ",Mass,abc,"))
    with pytest.raises(ValueError, match=r"BBox_List_2017\.csv: data row 3 \(line 4\), column 'Bbox \[x'"):
        read_boxes(path)


def test_empty_file(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.csv: line 1: no header"):
        read_labels(write(tmp_path, "empty.csv", ""), format="generic")
