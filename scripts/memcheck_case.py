"""A small forward + backward through every CUDA op and Triton kernel, for compute-sanitizer
(scripts/gpu_check.sh)."""

import torch

import fastcam

torch.manual_seed(0)
BACKENDS = [name for name in ("cuda", "triton") if fastcam.backends()[name].usable]
MODES = (("l2", "cosine"), ("max", "soft_iou"), ("softmax", "dice"), ("sum", "intersection"), ("none", "dot"))
print("memcheck of", BACKENDS)


def every_mode(backend, feats, weight, bias, labels, mask, **kw):
    """attention_loss and pairwise_overlap, forward and backward, in every normalize/measure pair."""
    for normalize, measure in MODES:
        out = fastcam.attention_loss(feats, weight, bias, labels, mask, normalize=normalize, measure=measure,
                                     lambda_consist=0.5, backend=backend, **kw)
        out.loss.backward()
        fastcam.pairwise_overlap(out.cams.detach().requires_grad_(), measure=measure,
                                 backend=backend).sum().backward()


for backend in BACKENDS:
    for layout in ("nchw", "channels_last", "tokens"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            feats = torch.randn(3, 37, 5, 7, device="cuda", dtype=dtype)
            if layout == "channels_last":
                feats = feats.contiguous(memory_format=torch.channels_last)
            if layout == "tokens":
                feats = feats.flatten(2).transpose(1, 2).contiguous()
            feats.requires_grad_()
            weight = torch.randn(6, 37, device="cuda", requires_grad=True)
            bias = torch.randn(6, device="cuda", requires_grad=True)
            labels = (torch.rand(3, 6, device="cuda") < 0.4).float()
            mask = torch.rand(3, 6, device="cuda") < 0.7
            every_mode(backend, feats, weight, bias, labels, mask, lambda_coherence=0.5, grid=(5, 7))
    # Groups of 40 and 70 maps: the cuda backend's tiled overlap kernels (csrc/cuda/overlap.cuh).
    feats = torch.randn(40, 9, 3, 50, device="cuda", requires_grad=True)
    weight = torch.randn(70, 9, device="cuda", requires_grad=True)
    bias = torch.randn(70, device="cuda", requires_grad=True)
    labels = (torch.rand(40, 70, device="cuda") < 0.05).float()
    mask = torch.rand(40, 70, device="cuda") < 0.75
    every_mode(backend, feats, weight, bias, labels, mask)
torch.cuda.synchronize()
print("memcheck case done")
