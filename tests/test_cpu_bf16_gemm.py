"""The CPU backend's S = W F for bf16 features on the CPU's bf16 matrix units
(csrc/cpu/bf16_gemm.cpp: AMX through ATen's brgemm, the fp32 weight split in three bf16 parts)
against an fp64 GEMM of the same operands, and against its fp32 fallback (FASTCAM_CPU_BF16_GEMM=0).

On a CPU without the units both runs take the fp32 path: the comparisons still hold, and the
test that the two paths differ is skipped.
"""

import pytest
import torch

import fastcam
from helpers import make_head_inputs, to_nkn

pytestmark = pytest.mark.skipif(not fastcam.backends()["cpu"].usable, reason="the compiled extension is not built")

# An fp32 GEMM of these errs by ~2e-7 of the largest score, two bf16 parts of W (not three) by
# ~2e-6. (layout, B, C, K, H, W): several blocks of 64 positions with a tail, an odd K (padded), more
# than 64 stacked weight rows (NCHW: in chunks of 64 rows, the last partial), channels-last and
# tokens with >= 128 positions (their bf16 path), many classes both ways, and a small
# channels-last map (the fp32 path, last).
CASES = [
    ("nchw", 3, 5, 37, 10, 13),
    ("nchw", 2, 30, 64, 7, 7),
    ("channels_last", 2, 25, 48, 12, 11),
    ("tokens", 3, 7, 40, 13, 10),
    ("nchw", 2, 60, 128, 9, 9),
    ("tokens", 2, 45, 32, 12, 12),
    ("channels_last", 2, 3, 6, 3, 4),
]


def _inputs(layout, B, C, K, H, W, seed=0):
    feats, _, _ = make_head_inputs(layout, B=B, C=C, K=K, H=H, W=W, dtype=torch.bfloat16, seed=seed)
    weight = torch.randn(C, K, generator=torch.Generator().manual_seed(seed + 1)) / K**0.5  # fp32, not bf16-exact
    return feats, weight


def _scores(feats, weight, monkeypatch, units: bool):
    monkeypatch.setenv("FASTCAM_CPU_BF16_GEMM", "1" if units else "0")
    return torch.ops.fastcam.cam_head(to_nkn(feats), weight, None, "none", 1.0, 1e-6)[1]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-C{c[2]}-K{c[3]}-N{c[4] * c[5]}" for c in CASES])
def test_scores_match_an_fp64_gemm(case, monkeypatch):
    feats, weight = _inputs(*case)
    exact = weight.double() @ to_nkn(feats).double()
    scale = exact.abs().max().item()
    for units in (True, False):
        s = _scores(feats, weight, monkeypatch, units)
        assert s.dtype == torch.float32 and s.shape == exact.shape
        error = (s.double() - exact).abs().max().item() / scale
        assert error < 1e-6, f"units={units}: max error {error:.2e} of the largest score"


@pytest.mark.skipif(not (fastcam.backends()["cpu"].usable and torch.ops.fastcam.cpu_bf16_gemm()),
                    reason="this CPU has no bf16 matrix units (or ATen no bf16 brgemm)")
@pytest.mark.parametrize("case", CASES[:-1], ids=[f"{c[0]}-C{c[2]}" for c in CASES[:-1]])
def test_the_units_path_is_taken(case, monkeypatch):
    # Different summation orders give different last bits somewhere: equal results everywhere
    # would mean both runs took the same path.
    feats, weight = _inputs(*case)
    assert not torch.equal(_scores(feats, weight, monkeypatch, True), _scores(feats, weight, monkeypatch, False))


@pytest.mark.parametrize("where", ["feature", "weight"])
def test_non_finite_inputs_give_the_fp32_results(where, monkeypatch):
    # The parts of an infinite weight are inf and NaN, and inf * part products can add up to NaN
    # where the fp32 product is inf: such images are recomputed on the fp32 path.
    feats, weight = _inputs("nchw", 3, 4, 20, 9, 9)
    if where == "feature":
        feats[1, 3, 2, 2] = float("inf")
    else:
        weight[2, 5] = float("-inf")
    got, fp32 = _scores(feats, weight, monkeypatch, True), _scores(feats, weight, monkeypatch, False)
    assert not torch.isfinite(fp32).all()
    torch.testing.assert_close(got, fp32, rtol=2e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(torch.isnan(got), torch.isnan(fp32)) and torch.equal(torch.isinf(got), torch.isinf(fp32))


def test_loss_and_gradients_with_the_units_match_the_fp32_path(monkeypatch):
    # The whole step: bf16 tokens with >= 128 positions and an fp32 head, gradients included.
    feats, weight = _inputs("tokens", 4, 6, 32, 12, 12)
    bias = torch.randn(6)
    labels = (torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) < 0.4).float()

    def run(units):
        monkeypatch.setenv("FASTCAM_CPU_BF16_GEMM", "1" if units else "0")
        f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, backend="cpu")
        out.loss.backward()
        return out.loss, out.logits, out.cams, f.grad, w.grad, b.grad

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
