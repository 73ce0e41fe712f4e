"""gather=True under torch.distributed: two gloo processes on loopback, each with half of a
batch, against one process with the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcam
from conftest import BACKEND_DEVICES

CPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cpu" and b != "triton"]
WORLD = 2


def _batch():
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(6, 7, 4, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 7, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    labels = (torch.rand(6, 5, generator=g) < 0.5).double()
    mask = torch.rand(6, 5, generator=g) < 0.7
    return feats, weight, bias, labels, mask


def _loss(feats, weight, bias, labels, mask, backend, gather):
    f, w, b = (t.clone().requires_grad_() for t in (feats, weight, bias))
    out = fastcam.attention_loss(f, w, b, labels, mask, lambda_distinct=0.0, lambda_consist=1.0,
                                 classification=False, gather=gather, backend=backend)  # fmt: skip
    grads = torch.autograd.grad(out.loss, (f, w, b), allow_unused=True)  # no BCE: b is unused
    return out.consist.detach(), out.loss.detach(), *(torch.zeros_like(t) if g is None else g
                                                      for g, t in zip(grads, (f, w, b)))


def _rank(rank, port, backend, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        feats, weight, bias, labels, mask = _batch()
        half = slice(rank * 3, rank * 3 + 3)
        local = _loss(feats[half], weight, bias, labels[half], mask[half], backend, gather=True)
        alone = _loss(feats[half], weight, bias, labels[half], mask[half], backend, gather=False)
        torch.save({"gathered": local, "local": alone}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gathered_consistency_is_the_whole_batch_term(backend, tmp_path):
    path = str(tmp_path / "out")
    mp.spawn(_rank, args=(_free_port(), backend, path), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(WORLD)]
    feats, weight, bias, labels, mask = _batch()
    whole = _loss(feats, weight, bias, labels, mask, backend, gather=False)
    for r, got in enumerate(ranks):
        consist, loss, gf, gw, gb = got["gathered"]
        # Every rank has the whole batch's term ...
        torch.testing.assert_close(consist, whole[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(loss, whole[1], rtol=1e-12, atol=1e-14)
        # ... and its features get world_size times their part of its gradient (the all-gather
        # sums the ranks' contributions; DDP's averaging over ranks then gives the global one).
        torch.testing.assert_close(gf / WORLD, whole[2][r * 3:r * 3 + 3], rtol=1e-10, atol=1e-12)
        # which differs from the local term's: the test would see a gather that did nothing.
        assert not torch.allclose(got["local"][0], whole[0])
    # The weight's gradient, averaged over the ranks as DDP does, is the whole batch's.
    torch.testing.assert_close(sum(g["gathered"][3] for g in ranks) / WORLD, whole[3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(g["gathered"][4] for g in ranks) / WORLD, whole[4], rtol=1e-10, atol=1e-12)


def test_gather_without_distributed_changes_nothing():
    feats, weight, bias, labels, mask = _batch()
    a = _loss(feats, weight, bias, labels, mask, "torch", gather=True)
    b = _loss(feats, weight, bias, labels, mask, "torch", gather=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
