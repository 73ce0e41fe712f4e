"""Training hygiene and inputs at the edges (issue 7): a long CPU training loop that does not
grow memory or touch what it should not, non-finite weights, mismatched dtypes, and huge C and N."""

import gc
import os

import pytest
import torch
from torch import nn

import fastcam
from conftest import BACKEND_DEVICES

CPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cpu"]
COMPILED = [(b, d) for b, d in BACKEND_DEVICES if b != "torch"]  # checked against the reference


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Tiny(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(16, classes)
        self.unused = nn.Linear(3, 3)  # not in the graph: its .grad must stay as it is


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_thousand_training_steps_keep_memory_modes_and_unrelated_grads(backend):
    torch.manual_seed(0)
    model = Tiny()
    model.unused.weight.grad = torch.full_like(model.unused.weight, 7.0)
    criterion = fastcam.AttentionMapLoss(lambda_distinct=0.5, lambda_consist=0.1, backend=backend)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("unused")], lr=0.01)
    images = torch.randn(6, 1, 16, 16)
    labels = (torch.rand(6, 5) < 0.4).float()
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[-2:] = False

    def step():
        opt.zero_grad(set_to_none=True)
        loss = criterion(model.body(images), model.head, labels, mask)
        loss.backward()
        opt.step()
        return loss

    for _ in range(100):  # warm up: allocator pools, thread-local buffers
        step()
    gc.collect()
    before = _rss_bytes()
    modes = [m.training for m in model.modules()]
    for i in range(1000):
        loss = step()
        if i == 500:
            model.eval()  # the loss must not switch modes back, whichever mode is set
            modes = [m.training for m in model.modules()]
    gc.collect()
    grown = _rss_bytes() - before
    assert torch.isfinite(loss)
    assert grown < 16 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1,000 steps"
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model.unused.weight.grad, torch.full_like(model.unused.weight, 7.0))
    assert model.unused.bias.grad is None


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_poisons_its_class_like_the_reference(backend, device, value):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 6, 4, 5, generator=g).to(device)
    weight = torch.randn(4, 6, generator=g).to(device)
    weight[2, 1] = value
    labels = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], device=device)

    def run(be):
        f, w = feats.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fastcam.attention_loss(f, w, None, labels, backend=be)
        return (out.loss, out.logits, out.cams, *torch.autograd.grad(out.loss, (f, w)))

    for name, a, r in zip(("loss", "logits", "cams", "grad features", "grad weight"), run(backend), run("torch")):
        assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        assert torch.equal(torch.isinf(a), torch.isinf(r)), name
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
def test_a_thousand_classes_and_a_64x64_map(backend, device):
    # C = 1,000 with an unlabeled image (every pair weighted: a 1,000 x 1,000 Gram matrix) and
    # N = 64 x 64 positions: works, and agrees with the reference.
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 8, 64, 64, generator=g).to(device)
    weight = (torch.randn(1000, 8, generator=g) / 8**0.5).to(device)
    bias = torch.randn(1000, generator=g).to(device)
    labels = (torch.rand(2, 1000, generator=g) < 0.003).float().to(device)
    mask = torch.ones(2, 1000, dtype=torch.bool, device=device)
    mask[1] = False

    def run(be):
        f, w, b = (t.clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, mask, backend=be)
        return (out.loss, *torch.autograd.grad(out.loss, (f, w, b)))

    for name, a, r in zip(("loss", "grad features", "grad weight", "grad bias"), run(backend), run("torch")):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6 * float(r.detach().abs().max()), msg=name)


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64, torch.float16),
                                    (torch.bfloat16, torch.float32, torch.float64),
                                    (torch.float16, torch.float64, torch.float32)],
                         ids=["f32-w64-b16", "bf16-w32-b64", "f16-w64-b32"])  # fmt: skip
def test_mismatched_dtypes_work_like_the_reference(backend, device, dtypes):
    # Features, weight and bias of three different float dtypes: the reference's values, and each
    # gradient in its input's dtype (the head computes in the features' accumulation type).
    fdt, wdt, bdt = dtypes
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 6, 4, 5, generator=g).to(device, fdt)
    weight = (torch.randn(4, 6, generator=g) / 6**0.5).to(device, wdt)
    bias = torch.randn(4, generator=g).to(device, bdt)
    labels = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], device=device)

    def run(be):
        f, w, b = (t.clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, backend=be)
        return (out.loss, out.logits, *torch.autograd.grad(out.loss, (f, w, b)))

    got, want = run(backend), run("torch")
    for name, a, r in zip(("loss", "logits", "grad features", "grad weight", "grad bias"), got, want):
        assert a.dtype == r.dtype, name
        tol = 1e-5 if fdt == torch.float32 else 2e-2
        torch.testing.assert_close(a, r, rtol=tol, atol=tol * float(r.detach().abs().max()), msg=name)
    assert [t.dtype for t in got[2:]] == [fdt, wdt, bdt]


@pytest.mark.parametrize("backend,device", COMPILED, ids=[f"{b}-{d}" for b, d in COMPILED])
@pytest.mark.parametrize("unlabeled", ["ignore", "predicted"])
def test_a_nan_bias_of_an_unlabeled_class_like_the_reference(backend, device, unlabeled):
    # The class's labels are unknown everywhere, its bias NaN: with unlabeled="ignore" the loss
    # does not depend on that logit, so the loss and every gradient stay finite (the bias's 0);
    # with "predicted" its NaN weight q poisons the pairs, the same way in every backend.
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64).to(device)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device)
    bias = torch.zeros(3, dtype=torch.float64, device=device)
    bias[1] = float("nan")
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 1]], dtype=torch.float64, device=device)
    mask = torch.tensor([[True, False, True], [True, False, True]], device=device)

    def run(be):
        f, w, b = (t.clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, mask, backend=be, unlabeled=unlabeled)
        return (out.loss, *torch.autograd.grad(out.loss, (f, w, b)))

    got, want = run(backend), run("torch")
    if unlabeled == "ignore":
        assert all(torch.isfinite(t).all() for t in want) and want[3][1] == 0
    for name, a, r in zip(("loss", "grad features", "grad weight", "grad bias"), got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, equal_nan=True, msg=name)
