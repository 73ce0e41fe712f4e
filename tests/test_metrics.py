"""fastcam.metrics: localization and classification measures on hand-made cases with known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastcam import metrics

SIZE = (8, 8)


def one_map(values: torch.Tensor) -> torch.Tensor:
    """A single map ``[h, w]`` as ``maps [1, 1, h, w]``."""
    return values.to(torch.float32)[None, None]


def point_map(row: int, col: int, size=SIZE) -> torch.Tensor:
    m = torch.zeros(size)
    m[row, col] = 1.0
    return one_map(m)


def boxes(*xywh) -> torch.Tensor:
    return torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4)


def index(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, 2, dtype=torch.int64)


# ------------------------------------------------------------------------ geometry


def test_boxes_to_masks_pixel_centres_half_open_and_clipped():
    m = metrics.boxes_to_masks(boxes((2, 3, 3, 2), (1.4, 0.6, 1.0, 1.0), (-2, -2, 4, 4), (0, 0, 0, 5)), 8, 8)
    assert m.shape == (4, 8, 8) and m.dtype == torch.bool
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3:5, 2:5] = True  # rows 3-4, columns 2-4: exactly w * h = 6 pixels
    assert torch.equal(m[0], expected)
    assert m[1].nonzero().tolist() == [[1, 1]]  # centre (1.5, 1.5) lies in [1.4, 2.4) x [0.6, 1.6)
    assert m[2].sum() == 4 and m[2, :2, :2].all()  # clipped by the image
    assert not m[3].any()  # zero width


def test_boxes_to_masks_tolerance_grows_every_side():
    m = metrics.boxes_to_masks(boxes((2, 3, 3, 2)), 8, 8, tolerance=1)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 1:6] = True
    assert torch.equal(m[0], expected)


def test_upsample_constant_map_stays_constant():
    up = metrics.upsample_maps(torch.full((2, 3, 3, 5), 0.7), (8, 8))
    assert up.shape == (2, 3, 8, 8) and up.dtype == torch.float32
    torch.testing.assert_close(up, torch.full((2, 3, 8, 8), 0.7))


def test_upsample_2x2_to_4x4_is_torch_bilinear_and_known_values():
    m = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    up = metrics.upsample_maps(m, (4, 4))
    ref = F.interpolate(m[None, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    assert up.dtype == torch.float64
    torch.testing.assert_close(up, ref, rtol=0, atol=0)
    # align_corners=False: output pixel i samples source (i + 0.5) / 2 - 0.5, clamped at the edges
    a = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(up, 2 * a[:, None] + a[None, :], rtol=0, atol=1e-15)


def test_upsample_same_size_is_identity_and_half_becomes_float32():
    m = torch.rand(1, 2, 8, 8).half()
    up = metrics.upsample_maps(m, 8)
    assert up.dtype == torch.float32 and torch.equal(up, m.float())


# ------------------------------------------------------------------------ pointing game


def test_pointing_game_inside_outside_and_border():
    maps = point_map(4, 5)  # centre (5.5, 4.5)
    b = boxes((4, 3, 3, 3), (0, 0, 2, 2), (2, 3, 3, 3), (3, 3, 3, 3), (5.5, 4.5, 1, 1), (4.5, 3.5, 1, 1))
    hits = metrics.pointing_game(maps, b, index(6), SIZE)
    assert hits.dtype == torch.bool
    # (2,3,3,3) covers columns 2-4: its right edge x + w = 5 < 5.5; the right edge is open, the left closed
    assert hits.tolist() == [True, False, False, True, True, False]


def test_pointing_game_tolerance():
    maps, b = point_map(4, 5), boxes((2, 3, 3, 3))  # the peak's centre is 0.5 px right of the box
    assert metrics.pointing_game(maps, b, index(), SIZE, tolerance=1).tolist() == [True]
    assert metrics.pointing_game(maps, b, index(), SIZE, tolerance=0.4).tolist() == [False]
    assert metrics.pointing_game(maps, b, index(), SIZE, tolerance=0.5).tolist() == [False]  # 5.5 < 5.5 fails
    assert metrics.pointing_game(maps, b, index(), SIZE, tolerance=0.51).tolist() == [True]


def test_pointing_game_ties_take_the_first_in_row_major_order():
    b = boxes((0, 0, 1, 1), (1, 0, 1, 1), (6, 2, 1, 1), (1, 5, 1, 1))
    constant = one_map(torch.ones(SIZE))
    assert metrics.pointing_game(constant, b, index(4), SIZE).tolist() == [True, False, False, False]
    two = torch.zeros(SIZE)
    two[2, 6] = two[5, 1] = 1.0
    assert metrics.pointing_game(one_map(two), b, index(4), SIZE).tolist() == [False, False, True, False]


def test_pointing_game_on_an_upsampled_grid_and_box_index():
    grid = torch.zeros(2, 3, 4, 4)
    grid[1, 2, 1, 2] = 1.0  # cell (1, 2) covers image columns 4-5 and rows 2-3
    grid[0, 1, 3, 0] = 1.0  # cell (3, 0): columns 0-1, rows 6-7
    b = boxes((4, 2, 2, 2), (0, 6, 2, 2), (4, 2, 2, 2), (0, 0, 8, 4))
    idx = torch.tensor([[1, 2], [0, 1], [0, 1], [0, 1]])
    assert metrics.pointing_game(grid, b, idx, SIZE).tolist() == [True, True, False, False]


# ------------------------------------------------------------------------ energy


def test_energy_fractions_by_hand():
    half = torch.zeros(SIZE)
    half[1, 1] = half[6, 6] = 1.0
    three_quarters = torch.zeros(SIZE)
    three_quarters[0, 0] = 3.0
    three_quarters[7, 7] = 1.0
    three_quarters[3, 3] = -5.0  # negative values are clamped to 0
    maps = torch.stack([half, three_quarters, torch.zeros(SIZE), -torch.ones(SIZE)])[:, None]
    b = boxes((0, 0, 2, 2), (0, 0, 4, 4), (0, 0, 8, 8), (0, 0, 8, 8), (0, 0, 8, 8), (2, 2, 4, 4))
    idx = torch.tensor([[0, 0], [1, 0], [0, 0], [2, 0], [3, 0], [1, 0]])
    e = metrics.energy_pointing_game(maps, b, idx, SIZE)
    assert e.dtype == torch.float64
    torch.testing.assert_close(e, torch.tensor([0.5, 0.75, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_energy_of_an_upsampled_grid_split_in_halves():
    grid = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # constant: the upsampled map is constant
    e = metrics.energy_pointing_game(one_map(grid), boxes((0, 0, 4, 8), (0, 0, 2, 2)), index(2), SIZE)
    torch.testing.assert_close(e, torch.tensor([0.5, 4 / 64], dtype=torch.float64))


# ------------------------------------------------------------------------ IoU and IoBB


def rectangle_map():
    m = torch.zeros(SIZE)
    m[2:6, 1:5] = 1.0  # rows 2-5, columns 1-4: 16 pixels
    return one_map(m)


def test_iou_and_iobb_of_a_rectangle_map():
    b = boxes((3, 4, 4, 3), (1, 2, 4, 4), (0, 0, 8, 8), (6, 0, 2, 2))
    # box 0: columns 3-6, rows 4-6 = 12 px; intersection columns 3-4 x rows 4-5 = 4 px
    got_iobb = metrics.iobb(rectangle_map(), b, index(4), SIZE)
    got_iou = metrics.iou(rectangle_map(), b, index(4), SIZE)
    assert got_iobb.dtype == got_iou.dtype == torch.float64
    torch.testing.assert_close(got_iobb, torch.tensor([4 / 16, 1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(got_iou, torch.tensor([4 / (16 + 12 - 4), 1.0, 16 / 64, 0.0], dtype=torch.float64))


def test_iobb_divides_by_the_predicted_area_not_the_box():
    small = torch.zeros(SIZE)
    small[3, 3] = 1.0  # one predicted pixel inside a big box
    b = boxes((0, 0, 8, 8))
    assert metrics.iobb(one_map(small), b, index(), SIZE).item() == 1.0
    assert metrics.iou(one_map(small), b, index(), SIZE).item() == 1 / 64


def ringed_map():
    m = torch.full(SIZE, 0.2)
    m[1:5, 1:5] = 0.5  # 16 px at half the peak
    m[2:4, 2:4] = 1.0  # 4 px at the peak
    return one_map(m)


@pytest.mark.parametrize("threshold, pred_area", [(0.5, 16), (0.6, 4), (1.0, 4), (0.1, 64), (0.0, 64)])
def test_threshold_is_a_fraction_of_the_max_inclusive(threshold, pred_area):
    b = boxes((2, 2, 2, 2))  # exactly the peak block: 4 px
    got = metrics.localization(ringed_map(), b, index(), SIZE, threshold=threshold)
    assert got["iobb"].item() == pytest.approx(4 / pred_area)
    assert got["iou"].item() == pytest.approx(4 / pred_area)


def test_threshold_is_relative_to_each_maps_own_max():
    assert metrics.iobb(ringed_map() * 100, boxes((2, 2, 2, 2)), index(), SIZE, threshold=0.6).item() == 1.0


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_empty_predicted_mask_gives_zero(fill):
    maps = one_map(torch.full(SIZE, fill))
    b = boxes((0, 0, 4, 4), (0, 0, 0, 0))
    got = metrics.localization(maps, b, index(2), SIZE)
    assert got["iou"].tolist() == [0.0, 0.0] and got["iobb"].tolist() == [0.0, 0.0]
    assert got["energy"].tolist() == [0.0, 0.0]


def test_region_box_uses_the_bounding_box_of_the_mask():
    m = torch.zeros(SIZE)
    m[1, 1] = m[4, 5] = 1.0  # bounding box: rows 1-4, columns 1-5 = 20 px
    b = boxes((1, 1, 5, 4), (0, 0, 3, 3))
    as_mask = metrics.localization(one_map(m), b, index(2), SIZE)
    as_box = metrics.localization(one_map(m), b, index(2), SIZE, region="box")
    torch.testing.assert_close(as_mask["iobb"], torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(as_mask["iou"], torch.tensor([2 / 20, 1 / 10], dtype=torch.float64))
    # box 1 covers rows 0-2, columns 0-2: its overlap with rows 1-4 x columns 1-5 is 2 x 2
    torch.testing.assert_close(as_box["iobb"], torch.tensor([1.0, 4 / 20], dtype=torch.float64))
    torch.testing.assert_close(as_box["iou"], torch.tensor([1.0, 4 / (20 + 9 - 4)], dtype=torch.float64))


def test_localization_matches_the_single_measures_and_does_not_depend_on_chunking(monkeypatch):
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 4, 5, 6, generator=g)
    xy = torch.rand(20, 2, generator=g) * 12 - 2
    wh = torch.rand(20, 2, generator=g) * 9
    b = torch.cat([xy, wh], 1)
    idx = torch.stack([torch.randint(0, 3, (20,), generator=g), torch.randint(0, 4, (20,), generator=g)], 1)
    size = (11, 13)
    whole = metrics.localization(maps, b, idx, size, tolerance=1.5, threshold=0.3)
    assert torch.equal(whole["pointing"], metrics.pointing_game(maps, b, idx, size, tolerance=1.5))
    assert torch.equal(whole["energy"], metrics.energy_pointing_game(maps, b, idx, size))
    assert torch.equal(whole["iou"], metrics.iou(maps, b, idx, size, threshold=0.3))
    assert torch.equal(whole["iobb"], metrics.iobb(maps, b, idx, size, threshold=0.3))
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 3 * 11 * 13)  # 3 boxes per chunk
    chunked = metrics.localization(maps, b, idx, size, tolerance=1.5, threshold=0.3)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-12, atol=1e-12)


def test_random_cases_match_explicit_masks():
    """The separable sums against masks built pixel by pixel (boxes_to_masks, upsample_maps)."""
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
    b = torch.cat([torch.rand(12, 2, generator=g) * 10 - 1, torch.rand(12, 2, generator=g) * 7], 1)
    idx = torch.stack([torch.randint(0, 2, (12,), generator=g), torch.randint(0, 3, (12,), generator=g)], 1)
    size = (9, 10)
    got = metrics.localization(maps, b, idx, size, threshold=0.4)
    up = metrics.upsample_maps(maps, size)[idx[:, 0], idx[:, 1]]
    gt = metrics.boxes_to_masks(b, *size)
    e = up.clamp_min(0)
    energy = (e * gt).sum((1, 2)) / e.sum((1, 2))
    pred = up >= 0.4 * up.amax((1, 2), keepdim=True)
    inter = (pred & gt).sum((1, 2)).double()
    torch.testing.assert_close(got["energy"], energy)
    torch.testing.assert_close(got["iobb"], inter / pred.sum((1, 2)))
    torch.testing.assert_close(got["iou"], inter / (pred | gt).sum((1, 2)))
    peak = up.flatten(1).argmax(1)
    assert torch.equal(got["pointing"], gt.flatten(1)[torch.arange(12), peak])


def test_no_boxes_gives_empty_results():
    got = metrics.localization(torch.rand(1, 2, 4, 4), torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), SIZE)
    assert all(v.shape == (0,) for v in got.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    maps = torch.rand(2, 3, 4, 4)
    b = boxes((1, 1, 4, 4), (0, 2, 3, 5))
    idx = torch.tensor([[0, 1], [1, 2]])
    cpu = metrics.localization(maps, b, idx, SIZE)
    gpu = metrics.localization(maps.cuda(), b, idx, SIZE)  # boxes follow the maps' device
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ hit rates


def test_hit_rates_at_the_chestxray8_thresholds():
    got = metrics.hit_rates(torch.tensor([0.05, 0.1, 0.3, 0.5, 0.95]))
    assert list(got) == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert got == pytest.approx({0.1: 0.8, 0.25: 0.6, 0.5: 0.4, 0.75: 0.2, 0.9: 0.2})


def test_hit_rates_bool_nan_empty_and_custom_thresholds():
    assert metrics.hit_rates(torch.tensor([True, False, True, True]), thresholds=[0.5]) == {0.5: 0.75}
    assert metrics.hit_rates([float("nan"), 1.0], thresholds=(0.5,)) == {0.5: 0.5}
    assert all(math.isnan(v) for v in metrics.hit_rates(torch.zeros(0)).values())


# ------------------------------------------------------------------------ co-present classes


def test_copresent_identical_maps_have_cosine_one_and_disjoint_maps_zero():
    a = torch.zeros(4, 4)
    a[:2] = 1.0
    b = torch.zeros(4, 4)
    b[2:] = 1.0
    cams = torch.stack([a, a.clone(), b])[None]  # [1, 3, 4, 4]
    same = torch.tensor([[1.0, 1.0, 0.0]])
    assert metrics.copresent_overlap(cams, same) == pytest.approx(1.0, abs=1e-5)
    apart = torch.tensor([[0.0, 1.0, 1.0]])
    assert metrics.copresent_overlap(cams, apart) == 0.0
    all_three = metrics.copresent_pair_overlaps(cams, torch.ones(1, 3))
    torch.testing.assert_close(all_three, torch.tensor([1.0, 0.0, 0.0]), atol=1e-5, rtol=0)  # (0,1), (0,2), (1,2)
    assert metrics.copresent_overlap(cams, torch.ones(1, 3)) == pytest.approx(1 / 3, abs=1e-5)


def test_copresent_no_pair_is_nan_and_label_mask_and_soft_labels_are_honoured():
    cams = torch.rand(2, 3, 5)
    assert math.isnan(metrics.copresent_overlap(cams, torch.tensor([[1.0, 0, 0], [0, 0, 1]])))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    labels = torch.tensor([[1.0, 1, 0], [0.4, 0.6, 0]])  # (0,1) unknown in image 0; 0.4 is not present
    assert metrics.copresent_pair_overlaps(cams, labels, mask).numel() == 0
    assert math.isnan(metrics.copresent_overlap(cams, labels, mask))


def test_copresent_measure_is_passed_through():
    cams = torch.rand(2, 3, 6, dtype=torch.float64)
    labels = torch.tensor([[1, 1, 1], [1, 0, 1]])
    ref = cams[:, :, None, :].minimum(cams[:, None, :, :]).sum(-1)
    expected = torch.stack([ref[0, 0, 1], ref[0, 0, 2], ref[0, 1, 2], ref[1, 0, 2]])
    got = metrics.copresent_pair_overlaps(cams, labels, measure="intersection")
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------ AUC


def test_macro_auc_perfect_inverted_and_skipped_class():
    labels = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1], [1, 0, 1]])
    scores = torch.tensor([[0.1, 0.2, 0.5], [0.2, 0.9, 0.5], [0.8, 0.3, 0.5], [0.9, 0.8, 0.5]])
    # class 0: positives score above negatives (1); class 1: positives below (0); class 2: one label value
    aucs = metrics.per_class_auc(scores, labels)
    assert aucs[:2].tolist() == [1.0, 0.0] and math.isnan(aucs[2])
    assert metrics.macro_auc(scores, labels) == 0.5
    assert metrics.macro_auc(scores[:, :1], labels[:, :1]) == 1.0
    assert math.isnan(metrics.macro_auc(scores[:, 2:], labels[:, 2:]))


def test_macro_auc_mask_is_honoured_and_unknown_labels_never_read():
    labels = torch.tensor([[0.0], [1.0], [0.0], [float("nan")]])
    scores = torch.tensor([[0.1], [0.5], [0.9], [float("nan")]])
    mask = torch.tensor([[True], [True], [False], [False]])  # without the mask row 2 would rank a negative first
    assert metrics.macro_auc(scores, labels, mask) == 1.0
    assert metrics.macro_auc(scores[:3], labels[:3]) == 0.5


def test_per_class_auc_ties_count_one_half_known_answer():
    # class 0: positives score 0.9, 0.5, 0.5; negatives 0.9, 0.5, 0.1. Of the 9 (positive, negative)
    # pairs, 0.9 vs (0.9, 0.5, 0.1) counts 0.5 + 1 + 1 and each 0.5 vs (0.9, 0.5, 0.1) counts 0 + 0.5 + 1:
    # AUC = (2.5 + 1.5 + 1.5) / 9 = 11/18.
    # class 1: the mask drops rows 0 and 5, leaving positives 0.2, 0.7 and negatives 0.7, 0.4:
    # 0.2 vs (0.7, 0.4) counts 0 + 0 and 0.7 vs (0.7, 0.4) counts 0.5 + 1: AUC = 1.5 / 4.
    labels = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1], [0, 0]])
    scores = torch.tensor([[0.9, 0.0], [0.9, 0.2], [0.5, 0.7], [0.5, 0.4], [0.5, 0.7], [0.1, 9.0]])
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[[0, 5], 1] = False
    got = metrics.per_class_auc(scores, labels, mask)
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert got.tolist() == pytest.approx([11 / 18, 1.5 / 4], abs=1e-12)
    assert metrics.macro_auc(scores, labels, mask) == pytest.approx((11 / 18 + 1.5 / 4) / 2, abs=1e-12)
    assert metrics.per_class_auc(torch.tensor([[0.3], [0.3]]), torch.tensor([[0], [1]])).item() == 0.5
    # a class with no known entry has no AUC (one with a single label value: see the test above)
    none_known = metrics.per_class_auc(scores, labels, torch.zeros(6, 2, dtype=torch.bool))
    assert all(math.isnan(v) for v in none_known.tolist())


# ------------------------------------------------------------------------ bad inputs

MAPS, BOXES, IDX = torch.rand(2, 3, 4, 4), boxes((0, 0, 2, 2)), torch.tensor([[1, 2]])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(maps=torch.rand(3, 4, 4)), ValueError, r"maps must be \[B, C, h, w\].*\[3, 4, 4\]"),
        (dict(maps=MAPS.long()), TypeError, "maps has dtype"),
        (dict(boxes=torch.zeros(1, 3)), ValueError, r"boxes must be \[M, 4\].*\[1, 3\]"),
        (dict(boxes=boxes((0, 0, -1, 2))), ValueError, "negative width or height"),
        (dict(boxes=boxes((0, float("nan"), 1, 2))), ValueError, "non-finite coordinate"),
        (dict(box_index=torch.tensor([1, 2])), ValueError, r"box_index must be \[M, 2\].*\[2\]"),
        (dict(box_index=torch.tensor([[1, 2], [0, 0]])), ValueError, r"box_index \[2, 2\] and boxes \[1, 4\]"),
        (dict(box_index=torch.tensor([[2, 0]])), ValueError, "0 <= b < 2"),
        (dict(box_index=torch.tensor([[0, 3]])), ValueError, "0 <= c < 3"),
        (dict(box_index=torch.tensor([[0.0, 1.0]])), TypeError, "box_index has dtype"),
        (dict(image_size=(8, 0)), ValueError, "image_size must be"),
        (dict(image_size="big"), ValueError, "image_size must be"),
        (dict(threshold=1.5), ValueError, "threshold must be a finite number in"),
        (dict(tolerance=-1), ValueError, "tolerance must be"),
        (dict(region="blob"), ValueError, "unknown region 'blob'"),
    ],
)
def test_bad_localization_inputs(kwargs, error, match):
    args = dict(maps=MAPS, boxes=BOXES, box_index=IDX, image_size=SIZE) | kwargs
    with pytest.raises(error, match=match):
        metrics.localization(**args)


def test_non_finite_map_under_a_box_is_rejected():
    maps = MAPS.clone()
    maps[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite value"):
        metrics.pointing_game(maps, BOXES, IDX, SIZE)
    metrics.pointing_game(maps, BOXES, torch.tensor([[0, 0]]), SIZE)  # another map: fine


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: metrics.upsample_maps(torch.rand(4), (8, 8)), ValueError, r"maps must be \[..., h, w\]"),
        (lambda: metrics.upsample_maps(torch.rand(4, 4), (8,)), ValueError, "size must be"),
        (lambda: metrics.boxes_to_masks(torch.zeros(2, 5), 8, 8), ValueError, r"boxes must be \[M, 4\]"),
        (lambda: metrics.hit_rates([0.5], thresholds=0.5), TypeError, "thresholds must be a sequence"),
        (lambda: metrics.hit_rates([0.5], thresholds=[float("inf")]), ValueError, "thresholds must be a finite"),
        (lambda: metrics.copresent_overlap(torch.rand(2, 3, 4), torch.ones(2, 4)), ValueError,
         r"labels must be \[B, C\] = \[2, 3\].*\[2, 4\]"),
        (lambda: metrics.copresent_overlap(torch.rand(2, 3), torch.ones(2, 3)), ValueError, r"cams must be"),
        (lambda: metrics.copresent_overlap(torch.rand(2, 3, 4), torch.ones(2, 3), torch.ones(2, 3)), TypeError,
         "label_mask has dtype"),
        (lambda: metrics.copresent_overlap(torch.rand(2, 3, 4), torch.ones(2, 3), measure="l1"), ValueError,
         "measure"),
        (lambda: metrics.macro_auc(torch.rand(4), torch.ones(4)), ValueError, r"scores must be \[N, C\].*\[4\]"),
        (lambda: metrics.macro_auc(torch.rand(4, 2), torch.ones(4, 3)), ValueError,
         r"labels \[4, 3\] must have the shape of scores \[4, 2\]"),
        (lambda: metrics.macro_auc(torch.rand(2, 1), torch.tensor([[0.5], [1.0]])), ValueError, "must be 0 or 1"),
        (lambda: metrics.macro_auc(torch.rand(2, 1), torch.ones(2, 1), torch.ones(2, 2, dtype=torch.bool)),
         ValueError, r"mask \[2, 2\]"),
        (lambda: metrics.macro_auc(torch.tensor([[float("nan")], [0.0]]), torch.tensor([[0], [1]])), ValueError,
         "non-finite"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()
