"""The CPU backend's S = W F for bf16 features on the CPU's bf16 matrix units
(csrc/cpu/bf16_gemm.cpp, the fp32 weight split in three bf16 parts) against an fp64 GEMM of the
same operands and against its fp32 fallback (FASTCAM_CPU_BF16_GEMM=0), on each of its paths:
fastcam's AMX kernels (csrc/cpu/amx.cpp) and ATen's brgemm (FASTCAM_CPU_AMX=0).

On a CPU without the units every run takes the fp32 path: the comparisons still hold, and the
tests that the paths differ are skipped.
"""

import pytest
import torch

import fastcam
from helpers import make_head_inputs, to_nkn

pytestmark = pytest.mark.skipif(not fastcam.backends()["cpu"].usable, reason="the compiled extension is not built")

# An fp32 GEMM of these errs by ~2e-7 of the largest score, two bf16 parts of W (not three) by
# ~2e-6. (layout, B, C, K, H, W): several blocks of 64 positions with a tail, an odd K (padded), more
# than 64 stacked weight rows (NCHW: in chunks of 64 rows, the last partial), channels-last and
# tokens with >= 128 positions (their bf16 path; with K % 32 != 0 brgemm's, not the tiles'), many
# classes both ways, and a small channels-last map (the fp32 path, last).
CASES = [
    ("nchw", 3, 5, 37, 10, 13),
    ("tokens", 2, 9, 96, 13, 11),  # K % 32 == 0 with a tail of 15 rows (padded for the tiles)
    ("channels_last", 2, 11, 64, 12, 11),  # a tail of 4 rows
    ("nchw", 2, 40, 160, 5, 9),  # 120 weight rows: a last block of 16 rows on the tiles
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


# The three paths: fastcam's AMX kernels, ATen's brgemm, the fp32 fallback.
PATHS = {"amx": ("1", "1"), "brgemm": ("1", "0"), "fp32": ("0", "0")}


def _set_path(monkeypatch, path: str):
    gemm, amx = PATHS[path]
    monkeypatch.setenv("FASTCAM_CPU_BF16_GEMM", gemm)
    monkeypatch.setenv("FASTCAM_CPU_AMX", amx)


def _scores(feats, weight, monkeypatch, path: str):
    _set_path(monkeypatch, path)
    return torch.ops.fastcam.cam_head(to_nkn(feats), weight, None, "none", 1.0, 1e-6)[1]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-C{c[2]}-K{c[3]}-N{c[4] * c[5]}" for c in CASES])
def test_scores_match_an_fp64_gemm(case, monkeypatch):
    feats, weight = _inputs(*case)
    exact = weight.double() @ to_nkn(feats).double()
    scale = exact.abs().max().item()
    for path in PATHS:
        s = _scores(feats, weight, monkeypatch, path)
        assert s.dtype == torch.float32 and s.shape == exact.shape
        error = (s.double() - exact).abs().max().item() / scale
        assert error < 1e-6, f"{path}: max error {error:.2e} of the largest score"


def _path_runs(monkeypatch, path: str) -> bool:
    _set_path(monkeypatch, path)
    return torch.ops.fastcam.cpu_bf16_gemm() and (torch.ops.fastcam.cpu_amx() == (path == "amx"))


# Cases whose layout each path computes on the units (the others fall back, tested above).
UNITS_CASES = {
    "amx": [c for c in CASES[:-1] if c[0] == "nchw" or c[3] % 32 == 0],
    "brgemm": CASES[:-1],
}


@pytest.mark.parametrize("path,case", [(p, c) for p, cases in UNITS_CASES.items() for c in cases],
                         ids=[f"{p}-{c[0]}-C{c[2]}-K{c[3]}" for p, cases in UNITS_CASES.items() for c in cases])
def test_the_units_path_is_taken(path, case, monkeypatch):
    # Different summation orders give different last bits somewhere: equal results everywhere
    # would mean both runs took the same path.
    if not (fastcam.backends()["cpu"].usable and _path_runs(monkeypatch, path)):
        pytest.skip(f"the {path} path does not run on this CPU (or build)")
    feats, weight = _inputs(*case)
    assert not torch.equal(_scores(feats, weight, monkeypatch, path), _scores(feats, weight, monkeypatch, "fp32"))


@pytest.mark.parametrize("where", ["feature", "weight"])
def test_non_finite_inputs_give_the_fp32_results(where, monkeypatch):
    # The parts of an infinite weight are inf and NaN, and inf * part products can add up to NaN
    # where the fp32 product is inf: such images are recomputed on the fp32 path.
    feats, weight = _inputs("nchw", 3, 4, 20, 9, 9)
    if where == "feature":
        feats[1, 3, 2, 2] = float("inf")
    else:
        weight[2, 5] = float("-inf")
    fp32 = _scores(feats, weight, monkeypatch, "fp32")
    assert not torch.isfinite(fp32).all()
    for path in ("amx", "brgemm"):
        got = _scores(feats, weight, monkeypatch, path)
        torch.testing.assert_close(got, fp32, rtol=2e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(torch.isnan(got), torch.isnan(fp32)) and torch.equal(torch.isinf(got), torch.isinf(fp32))


def test_loss_and_gradients_with_the_units_match_the_fp32_path(monkeypatch):
    # The whole step: bf16 tokens with >= 128 positions and an fp32 head, gradients included.
    feats, weight = _inputs("tokens", 4, 6, 32, 12, 12)
    bias = torch.randn(6)
    labels = (torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) < 0.4).float()

    def run(path):
        _set_path(monkeypatch, path)
        f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, backend="cpu")
        out.loss.backward()
        return out.loss, out.logits, out.cams, f.grad, w.grad, b.grad

    fp32 = run("fp32")
    for path in ("amx", "brgemm"):
        for a, b in zip(run(path), fp32):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


# The head backward's GEMM images (every map weighted: an unlabeled image) on the tiles
# (csrc/cpu/bf16_gemm.cpp grad_images_bf16): NCHW with N = 49 (rows padded, copied) and N = 64
# (read as they lie), channels-last, tokens, more classes than a tile row block, and K % 16 != 0
# (not on the tiles: the fp32 path).
BACKWARD_CASES = [
    ("nchw", 2, 20, 64, 7, 7),
    ("nchw", 2, 12, 32, 8, 8),
    ("channels_last", 2, 10, 48, 5, 6),
    ("tokens", 3, 9, 80, 3, 5),
    ("nchw", 1, 40, 16, 3, 3),
    ("nchw", 2, 10, 24, 4, 4),
]


def _head_backward(feats, weight, monkeypatch, path, gl, gc):
    f = to_nkn(feats)
    _set_path(monkeypatch, "fp32")  # the same scores for every path
    _, scores, cams = torch.ops.fastcam.cam_head(f, weight, None, "none", 1.0, 1e-6)
    _set_path(monkeypatch, path)
    df, dw, db = torch.ops.fastcam.cam_head_backward(gl, gc, f, weight, scores, cams, "none", 1.0, 1e-6,
                                                     [True, True, True])
    return df, dw, db, scores


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[f"{c[0]}-C{c[2]}-K{c[3]}-N{c[4] * c[5]}" for c in BACKWARD_CASES])
def test_backward_gemm_images_match_fp64(case, monkeypatch):
    layout, B, C, K, H, W = case
    feats, weight = _inputs(*case)
    g = torch.Generator().manual_seed(7)
    gl, gc = torch.randn(B, C, generator=g), torch.randn(B, C, H * W, generator=g)
    results = {}
    for path in ("amx", "fp32"):
        df, dw, db, scores = _head_backward(feats, weight, monkeypatch, path, gl, gc)
        # The truth in fp64 from the same scores: G = dL/dS (relu: gc where S > 0) + dL/dlogits / N.
        grad = gc.double() * (scores > 0) + gl.double()[..., None] / (H * W)
        f64 = to_nkn(feats).double()
        dw64 = torch.einsum("bcn,bkn->ck", grad, f64)
        df64 = torch.einsum("ck,bcn->bkn", weight.double(), grad)
        f = to_nkn(feats)
        assert df.dtype == torch.bfloat16 and df.shape == f.shape and df.stride() == f.stride()
        dw_error = (dw.double() - dw64).abs().max().item() / dw64.abs().max().item()
        assert dw_error < 1e-6, f"{path}: dW max error {dw_error:.2e} of the largest"
        # dF is rounded to bf16: within half an ulp of the exact value, plus the sum's error: on the
        # tiles three bf16 products (W_hi G_hi + W_hi G_mid + W_mid G_hi) err by ~2^-16 of the
        # scale (|W|^T |G|), 2^8 times less than a bf16 rounding at that scale.
        scale = torch.einsum("ck,bcn->bkn", weight.double().abs(), grad.abs()).max().item()
        torch.testing.assert_close(df.double(), df64, rtol=2**-8, atol=2**-15 * scale)
        torch.testing.assert_close(db, gl.sum(0))
        results[path] = (df, dw)
    if case[3] % 16 == 0 and _path_runs(monkeypatch, "amx"):
        # The tiles' sums differ from the fp32 path's in their last bits somewhere: the path was taken.
        assert not torch.equal(results["amx"][1], results["fp32"][1])


@pytest.mark.parametrize("layout,H,W,where", [
    ("nchw", 4, 8, (1, 3, 2, 2)),
    ("nchw", 7, 7, (1, 4, 0, 0)),  # the first value of a row, which the tiles also read for the row before
    ("tokens", 4, 8, (1, 5, 3)),
])  # fmt: skip
def test_backward_gemm_images_with_an_infinite_feature(layout, H, W, where, monkeypatch):
    # An infinite feature: the parts' products could add up to NaN where fp32 gives inf; the
    # tiles' dW block holding it is recomputed in fp32, so both paths agree value for value.
    feats, weight = _inputs(layout, 2, 12, 32, H, W)
    feats[where] = float("inf") if layout == "nchw" else float("-inf")
    g = torch.Generator().manual_seed(8)
    gl, gc = torch.randn(2, 12, generator=g), torch.randn(2, 12, H * W, generator=g)
    amx = _head_backward(feats, weight, monkeypatch, "amx", gl, gc)
    fp32 = _head_backward(feats, weight, monkeypatch, "fp32", gl, gc)
    assert torch.isfinite(fp32[0]).all() and not torch.isfinite(fp32[1]).all()  # dF = W^T G does not read F
    for got, want, rtol in zip(amx[:2], fp32[:2], (2**-7, 1e-5)):  # dF in bf16, dW in fp32
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5, equal_nan=True)
