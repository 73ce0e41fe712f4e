"""What the Triton kernels share: float scalars passed exactly, and the refusal of double backward."""

from __future__ import annotations

import functools
import struct

import triton
import triton.language as tl


@functools.lru_cache(maxsize=256)  # the same few values (eps, temperature, the weights) every step
def split_float(value: float) -> tuple[float, float]:
    """``value`` as ``(hi, lo)``, two float32 numbers whose sum is ``value`` to about 2^-48 relative.

    Triton passes a Python float to a compiled kernel as a float32 (the interpreter keeps it
    float64), which is not exact enough for float64 maps; the kernels take eps and the loss
    weights in two halves and rejoin them with ``rejoin``.
    """
    if not abs(value) < 3.0e38:  # beyond float32: left whole
        return value, 0.0
    hi = _float32(value)
    return hi, _float32(value - hi)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@triton.jit
def rejoin(hi, lo, ACC_F64: tl.constexpr):
    """The float passed as split_float's two halves, in the accumulation dtype."""
    value = hi
    if ACC_F64:
        value = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return value


def no_double_backward(ctx, *grads):
    raise RuntimeError("fastcam: double backward (a gradient of a gradient) is not supported")
