"""pairwise_overlap: how much every two class maps of an image overlap (SPEC §2.2)."""

import pytest
import torch

import fastcam
from helpers import MEASURES, assert_close_rel, naive_pairwise


def random_cams(shape, *, device="cpu", dtype=torch.float64, seed=0, sparse=True):
    """Maps as cam_head makes them: non-negative, with exact zeros where ``sparse``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = torch.relu(x) if sparse else x.abs() + 0.05
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 7), (1, 1, 1), (2, 5, 1, 1)])
def test_values_match_the_formulas(backend, device, measure, shape):
    cams = random_cams(shape, device=device, seed=1)
    got = fastcam.pairwise_overlap(cams, measure=measure, backend=backend)
    assert got.shape == (shape[0], shape[1], shape[1]) and got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), naive_pairwise(cams.cpu(), measure), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("measure", MEASURES)
def test_symmetric(backend, device, measure):
    o = fastcam.pairwise_overlap(random_cams((3, 6, 9), device=device, seed=2), measure=measure, backend=backend)
    torch.testing.assert_close(o, o.transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("measure", MEASURES)
def test_gradcheck(backend, device, measure):
    cams = random_cams((2, 3, 2, 3), device=device, seed=3, sparse=False).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: fastcam.pairwise_overlap(c, measure=measure, backend=backend), (cams,))


@pytest.mark.parametrize("measure", MEASURES)
def test_all_zero_map_overlaps_nothing_and_has_finite_gradient(backend, device, measure):
    cams = random_cams((2, 3, 8), device=device, seed=4, sparse=False)
    cams[0, 1] = 0
    cams.requires_grad_()
    o = fastcam.pairwise_overlap(cams, measure=measure, backend=backend)
    assert torch.isfinite(o).all()
    assert (o[0, 1] == 0).all() and (o[0, :, 1] == 0).all()
    o.sum().backward()
    assert torch.isfinite(cams.grad).all()


@pytest.mark.parametrize("measure", ["intersection", "soft_iou", "dice"])
def test_ties_split_the_gradient_equally(backend, device, measure):
    """min/max of equal values give each side half, as torch.minimum/maximum do."""
    a = random_cams((1, 1, 6), device=device, seed=5, sparse=False)
    cams = torch.cat([a, a], dim=1).requires_grad_()
    fastcam.pairwise_overlap(cams, measure=measure, backend=backend)[0, 0, 1].backward()
    ref = torch.cat([a, a.clone()], dim=1).requires_grad_()
    x, y = ref[0, 0], ref[0, 1]
    inter = torch.minimum(x, y).sum()
    value = {"intersection": inter, "soft_iou": inter / (torch.maximum(x, y).sum() + 1e-6),
             "dice": 2 * inter / (x.sum() + y.sum() + 1e-6)}[measure]
    value.backward()
    torch.testing.assert_close(cams.grad, ref.grad)
    if measure == "intersection":
        torch.testing.assert_close(cams.grad, torch.full_like(cams, 0.5))


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_maps(backend, device, measure, dtype):
    cams = random_cams((2, 4, 5, 5), device=device, dtype=dtype, seed=6)
    got = fastcam.pairwise_overlap(cams, measure=measure, backend=backend)
    assert got.dtype == torch.float32
    assert_close_rel(got, fastcam.pairwise_overlap(cams.double(), measure=measure, backend="torch"), 1e-5, measure)


def test_cosine_of_a_map_with_itself_is_one(backend, device):
    o = fastcam.pairwise_overlap(random_cams((2, 3, 10), device=device, seed=7, sparse=False), backend=backend)
    torch.testing.assert_close(torch.diagonal(o, dim1=1, dim2=2), torch.ones(2, 3, dtype=o.dtype, device=device),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("measure", MEASURES)
def test_groups_of_many_maps_match_the_reference(backend, device, measure):
    """70 maps of 150 positions a group: the CUDA backend's tiled kernels (pairs in tiles of 64
    maps, gradients in tiles of 32 maps by 128 positions; FASTCAM_CUDA_OVERLAP) with tiles cut
    in the middle, an all-zero map and a map equal to another (ties), values and gradients."""
    cams = random_cams((2, 70, 150), device=device, seed=8)
    cams[0, 5] = 0
    cams[1, 40] = cams[1, 3]
    gout = torch.randn(2, 70, 70, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)

    def run(be):
        c = cams.clone().requires_grad_()
        o = fastcam.pairwise_overlap(c, measure=measure, backend=be)
        return o, torch.autograd.grad(o, c, gout)[0]

    for name, got, want in zip(("overlap", "gradient"), run(backend), run("torch")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
