"""The triton backend's ``attention_loss`` as two autograd nodes, for eager calls.

Through its three ``triton_op``\\ s (scores, head maps, loss terms) a training step makes six
custom-op calls, each through the dispatcher into Python and, for the forward ones, through a
generated autograd Function: on a CPU with the kernels stubbed out (interpreter), ~0.95 ms of
host work a step at densenet121@512, most of it those layers, around ~0.13 ms of kernels on a
GPU (BENCHMARKS.md). Here the same bodies (``*_impl``) run in two ``torch.autograd.Function``\\ s:
``_Scores`` (S = W F; backward dF, dW) and ``_MapsAndTerms`` (the maps, logits and terms;
backward dL/dS and dL/db, with the gradients the caller gives the logits and maps added in) —
two, not one, so that S, the maps and their gradients are freed before dF is allocated, as on
the ops' path. The kernels and their order are the ops' own, so the values are the same bit for
bit; the backward takes the forward's converted labels and mask and its pair weights q instead
of making them again (one launch and one copy fewer).

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


# Private torch functions that tell whether a torch.func transform or a dispatch mode is active;
# a torch without them keeps the ops' path.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)


def eager_path_usable(*tensors: torch.Tensor | None) -> bool:
    """Whether this call can take the eager path: eager, plain tensors, nothing tracing."""
    if torch.compiler.is_compiling() or _functorch_active is None or _dispatch_modes is None:
        return False
    if _functorch_active() or _dispatch_modes() > 0:
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _backward_ops():
    """The backward bodies, and the launch switch: with create_graph (grad mode on in a backward)
    the backward ops, whose own backward refuses a double backward; else the bodies, launched
    directly."""
    if torch.is_grad_enabled():
        return False, contextlib.nullcontext()
    return True, _set_wrap_triton_enabled(False)


class _Scores(torch.autograd.Function):
    """S = W F; its backward dF and dW (the node that holds only F and W while it runs)."""

    @staticmethod
    def forward(ctx, features, weight):
        with _set_wrap_triton_enabled(False):
            s = scores_impl(features, weight)
        ctx.save_for_backward(features, weight)
        return s

    @staticmethod
    def backward(ctx, grad_scores):
        features, weight = ctx.saved_tensors
        need_f, need_w = ctx.needs_input_grad
        bodies, launches = _backward_ops()
        with launches:
            df, dw = (scores_backward_impl if bodies else scores_backward)(grad_scores, features, weight, need_f,
                                                                          need_w)  # fmt: skip
        return (df if need_f else None), (dw.to(weight.dtype) if need_w else None)


class _MapsAndTerms(torch.autograd.Function):
    """The maps and logits from S, and the loss terms; its backward dL/dS and dL/db, with the
    gradients the caller gives the logits and maps added in. (A node apart from _Scores, so that
    S, the maps and their gradients are freed before the GEMMs' backward allocates dF: the peak
    memory of the three ops' path.)"""

    @staticmethod
    def forward(ctx, s, bias, labels, label_mask, normalize, measure, temperature, eps, predicted, grid_h, grid_w,
                weights):  # fmt: skip
        with _set_wrap_triton_enabled(False):
            logits, cams = head_maps_impl(s, bias, normalize, temperature, eps)
            kept = {}  # the labels and mask as the kernels take them, and the pair weights q
            terms = attention_terms_impl(logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w,
                                         weights, keep=kept)  # fmt: skip
        ctx.save_for_backward(s, logits, cams, labels, label_mask, kept["y"], kept["m"], kept["q"])
        ctx.head_options = (normalize, temperature, eps)
        ctx.terms_options = (measure, eps, predicted, grid_h, grid_w, weights)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        return terms, logits, cams

    @staticmethod
    def backward(ctx, grad_terms, grad_logits, grad_cams):
        s, logits, cams, labels, label_mask, y, m, q = ctx.saved_tensors
        need_s, need_b = ctx.needs_input_grad[:2]
        rest = (None,) * 10
        bodies, launches = _backward_ops()
        with launches:
            gl, gc = grad_logits, grad_cams
            if grad_terms is not None:
                if bodies:
                    gl_terms, gc_terms = attention_terms_backward_impl(grad_terms, logits, cams, labels, label_mask,
                                                                       *ctx.terms_options, kept=dict(y=y, m=m, q=q))
                else:
                    gl_terms, gc_terms = attention_terms_backward(grad_terms, logits, cams, labels, label_mask,
                                                                  *ctx.terms_options)  # fmt: skip
                gl_terms = gl_terms.to(logits.dtype)
                gl = gl_terms if gl is None else gl_terms + gl
                gc = gc_terms if gc is None else gc_terms + gc
            if gl is None and gc is None:
                return (None, None, *rest)
            grad_bias = gl.sum(0).to(ctx.bias_dtype) if need_b and gl is not None else None
            grad_s = None
            if need_s:
                grad_s = (head_maps_backward_impl if bodies else head_maps_backward)(gl, gc, s, cams,
                                                                                     *ctx.head_options)  # fmt: skip
        return grad_s, grad_bias, *rest


def attention_loss_eager(features, weight, bias, labels, label_mask, normalize, measure, temperature, eps, predicted,
                         grid_h, grid_w, weights):  # fmt: skip
    """(terms [5], logits [B, C], cams [B, C, N]) of features [B, K, N], as two autograd nodes."""
    s = _Scores.apply(features, weight)
    return _MapsAndTerms.apply(s, bias, labels, label_mask, normalize, measure, temperature, eps, predicted, grid_h,
                               grid_w, weights)  # fmt: skip
