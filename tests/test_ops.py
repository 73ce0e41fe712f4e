"""The compiled ops of fastcam._C: opcheck, torch.compile, determinism, double backward.

Values and gradients of every backend are tested against the reference by the rest of the
suite (through the ``backend`` fixture); this file tests the op registrations themselves.
"""

import pytest
import torch

import fastcam
from conftest import BACKEND_DEVICES
from helpers import assert_compiled_step_matches_eager, make_head_inputs

COMPILED = [(b, d) for b, d in BACKEND_DEVICES if b in ("cpu", "cuda")]

ops = torch.ops.fastcam
ids = [f"{b}-{d}" for b, d in COMPILED]


def _op_samples(device, dtype=torch.float32):
    feats, weight, bias = make_head_inputs("channels_last", B=2, C=3, K=5, H=3, W=4, dtype=dtype, device=device,
                                           seed=3, requires_grad=True)
    f3 = feats.flatten(2)  # [B, K, N] with stride 1 along K
    nchw = feats.detach().contiguous().flatten(2).requires_grad_()
    cams = torch.rand(2, 3, 12, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    cams.requires_grad_()
    logits = torch.randn(2, 3, dtype=cams.dtype, device=device, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, float("nan")]], dtype=cams.dtype, device=device)
    mask = torch.tensor([[True, True, True], [True, False, False]], device=device)
    return dict(f3=f3, nchw=nchw, weight=weight, bias=bias, cams=cams, logits=logits, labels=labels, mask=mask)


@pytest.mark.parametrize("backend,device", COMPILED, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_every_op(backend, device, dtype):
    s = _op_samples(device, dtype)
    for f in (s["f3"], s["nchw"]):
        for normalize in ("l2", "max", "softmax"):
            torch.library.opcheck(ops.cam_head, (f, s["weight"], s["bias"], normalize, 1.0, 1e-6))
        # Backward ops are checked without autograd: their own backward raises on purpose.
        with torch.no_grad():
            logits, scores, cams = ops.cam_head(f, s["weight"], None, "sum", 1.0, 1e-6)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(ops.cam_head_backward, (torch.randn_like(logits), torch.randn_like(cams), f.detach(),
                                                          s["weight"].detach(), scores, cams, "sum", 1.0, 1e-6, mask))
        torch.library.opcheck(ops.cam_head_backward, (None, torch.randn_like(cams), f.detach(), s["weight"].detach(),
                                                      scores, cams, "max", 1.0, 1e-6, [True, True, False]))
    for measure in ("cosine", "soft_iou", "dice"):
        torch.library.opcheck(ops.pairwise_overlap, (s["cams"], measure, 1e-6))
        torch.library.opcheck(ops.pairwise_overlap_backward,
                              (torch.randn(2, 3, 3, dtype=s["cams"].dtype, device=device), s["cams"].detach(),
                               measure, 1e-6))
    for labels, mask in ((s["labels"], s["mask"]), (None, None), (s["labels"].nan_to_num(), None)):
        args = (s["logits"], s["cams"], labels, mask, "cosine", 1e-6, True, 3, 4, [1.0, 0.5, 0.25, 0.125])
        torch.library.opcheck(ops.attention_terms, args)
        torch.library.opcheck(ops.attention_terms_backward,
                              (torch.randn(5, dtype=s["cams"].dtype, device=device),
                               *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)))
    # The composite of the two: 4-D features (channels-last) and tokens, with and without labels.
    feats4 = s["f3"].unflatten(2, (3, 4))
    for feats in (feats4, s["f3"].transpose(1, 2)):
        for labels, mask in ((s["labels"], s["mask"]), (None, None)):
            torch.library.opcheck(ops.attention_loss, (feats, s["weight"], s["bias"], labels, mask, "l2", "cosine",
                                                       1.0, 1e-6, True, 3, 4, [1.0, 0.5, 0.25, 0.125]))


@pytest.mark.parametrize("backend,device", COMPILED, ids=ids)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend, device, compile_backend):
    feats, weight, bias = make_head_inputs("nchw", B=3, C=4, K=8, H=3, W=3, dtype=torch.float32, device=device,
                                           seed=5, requires_grad=True)
    labels = (torch.rand(3, 4, generator=torch.Generator().manual_seed(6)) < 0.5).float().to(device)
    mask = torch.ones(3, 4, dtype=torch.bool, device=device)
    mask[2] = False

    def step(f, w, b):
        out = fastcam.attention_loss(f, w, b, labels, mask, lambda_consist=0.5, lambda_coherence=0.5,
                                     backend=backend)
        return out.loss, out.cams

    assert_compiled_step_matches_eager(step, (feats, weight, bias), compile_backend)


@pytest.mark.parametrize("backend,device", COMPILED, ids=ids)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_bitwise_deterministic(backend, device, layout, dtype):
    # bf16: more classes than the direct loops take and an unlabeled image (every map weighted),
    # K a multiple of 16: the CPU backend's AMX paths where the CPU has them.
    C, K = (5, 300) if dtype == torch.float32 else (12, 64)
    feats, weight, bias = make_head_inputs(layout, B=4, C=C, K=K, H=6, W=7, dtype=torch.float32, device=device,
                                           seed=7)
    feats = feats.to(dtype)
    labels = (torch.rand(4, C, generator=torch.Generator().manual_seed(8)) < 0.4).float().to(device)
    mask = torch.ones(4, C, dtype=torch.bool, device=device)
    if dtype == torch.bfloat16:
        mask[1] = False  # an unlabeled image: its predicted weights weigh every map

    def grads(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
            out = fastcam.attention_loss(f, w, b, labels, mask, lambda_consist=0.3, lambda_coherence=0.2, grid=(6, 7),
                                         backend=backend)
            out.loss.backward()
            return out.loss, f.grad, w.grad, b.grad
        finally:
            torch.set_num_threads(previous)

    torch.use_deterministic_algorithms(True)
    try:
        first, again, other_threads = grads(2), grads(2), grads(1)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(first, again, other_threads):
        assert torch.equal(a, b)  # bitwise repeatable
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)  # BLAS may split sums by thread count


@pytest.mark.parametrize("backend,device", COMPILED, ids=ids)
def test_double_backward_raises_a_clear_error(backend, device):
    feats, weight, bias = make_head_inputs("nchw", device=device, seed=9, requires_grad=True)
    out = fastcam.attention_loss(feats, weight, bias, torch.ones(2, 3, dtype=feats.dtype, device=device),
                                 backend=backend)
    (grad,) = torch.autograd.grad(out.loss, feats, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()
