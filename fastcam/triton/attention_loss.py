"""The triton backend's ``attention_loss`` as one autograd node, for eager calls.

Through its three ``triton_op``\\ s (scores, head maps, loss terms) a training step makes six
custom-op calls, each through the dispatcher into Python and, for the forward ones, through a
generated autograd Function: on a CPU with the kernels stubbed out (interpreter), ~0.94 ms of
host work a step at densenet121@512, most of it those layers, around ~0.13 ms of kernels on a
GPU (BENCHMARKS.md). Here the same bodies (``*_impl``) run in one ``torch.autograd.Function``:
the forward launches S, the maps and the terms; the backward the terms' gradient, the maps'
and the GEMMs', with the gradients the caller gives the logits and maps added in. The kernels
and their order are the ops' own, so the values are the same bit for bit; the backward takes the
forward's converted labels and mask and its pair weights q instead of making them again (one
launch and one copy fewer).

fastcam/triton/backend.py takes this path for eager calls on plain tensors; under
``torch.compile``, ``torch.func`` transforms or a dispatch mode (fake tensors among them) it
keeps the three ops, which those trace. A backward with ``create_graph=True`` goes through the
backward ops, whose own backward refuses a double backward, as on the ops' path.
"""

from __future__ import annotations

import contextlib

import torch

from fastcam.triton.attention_terms import (
    attention_terms_backward,
    attention_terms_backward_impl,
    attention_terms_impl,
)
from fastcam.triton.cam_head import scores_backward, scores_backward_impl, scores_impl
from fastcam.triton.normalize import head_maps_backward, head_maps_backward_impl, head_maps_impl

try:  # the switch triton_op's own eager path uses: kernels launched directly, not as a HOP
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - an older torch: the HOP path, slower, same values
    def _set_wrap_triton_enabled(enabled):
        return contextlib.nullcontext()


def eager_path_usable(*tensors: torch.Tensor | None) -> bool:
    """Whether this call can take the one-node path: eager, plain tensors, nothing tracing."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


class _AttentionLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, labels, label_mask, normalize, measure, temperature, eps, predicted,
                grid_h, grid_w, weights):  # fmt: skip
        with _set_wrap_triton_enabled(False):
            s = scores_impl(features, weight)
            logits, cams = head_maps_impl(s, bias, normalize, temperature, eps)
            kept = {}  # the labels and mask as the kernels take them, and the pair weights q
            terms = attention_terms_impl(logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w,
                                         weights, keep=kept)  # fmt: skip
        ctx.save_for_backward(features, weight, s, logits, cams, labels, label_mask, kept["y"], kept["m"], kept["q"])
        ctx.head_options = (normalize, temperature, eps)
        ctx.terms_options = (measure, eps, predicted, grid_h, grid_w, weights)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        return terms, logits, cams

    @staticmethod
    def backward(ctx, grad_terms, grad_logits, grad_cams):
        features, weight, s, logits, cams, labels, label_mask, y, m, q = ctx.saved_tensors
        need_f, need_w, need_b = ctx.needs_input_grad[:3]
        rest = (None,) * 10
        if torch.is_grad_enabled():  # create_graph: the ops, whose backward refuses a double backward
            terms_bwd, maps_bwd, gemm_bwd = attention_terms_backward, head_maps_backward, scores_backward
            launches, kept = contextlib.nullcontext(), {}
        else:
            terms_bwd, maps_bwd, gemm_bwd = attention_terms_backward_impl, head_maps_backward_impl, scores_backward_impl
            launches, kept = _set_wrap_triton_enabled(False), {"kept": dict(y=y, m=m, q=q)}
        with launches:
            gl, gc = grad_logits, grad_cams
            if grad_terms is not None:
                gl_terms, gc_terms = terms_bwd(grad_terms, logits, cams, labels, label_mask, *ctx.terms_options,
                                               **kept)  # fmt: skip
                gl_terms = gl_terms.to(logits.dtype)
                gl = gl_terms if gl is None else gl_terms + gl
                gc = gc_terms if gc is None else gc_terms + gc
            if gl is None and gc is None:
                return (None, None, None, *rest)
            grad_bias = gl.sum(0).to(ctx.bias_dtype) if need_b and gl is not None else None
            df = dw = None
            if need_f or need_w:
                gs = maps_bwd(gl, gc, s, cams, *ctx.head_options)
                df, dw = gemm_bwd(gs, features, weight, need_f, need_w)
        return (df if need_f else None), (dw.to(weight.dtype) if need_w else None), grad_bias, *rest


def attention_loss_eager(features, weight, bias, labels, label_mask, normalize, measure, temperature, eps, predicted,
                         grid_h, grid_w, weights):  # fmt: skip
    """(terms [5], logits [B, C], cams [B, C, N]) of features [B, K, N], as one autograd node."""
    return _AttentionLoss.apply(features, weight, bias, labels, label_mask, normalize, measure, temperature, eps,
                                predicted, grid_h, grid_w, weights)  # fmt: skip
