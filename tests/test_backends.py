"""fastcam.backends() and backend="auto"."""

import pytest
import torch

import fastcam
from fastcam._backends import resolve_backend
from helpers import make_head_inputs


def test_every_backend_is_reported():
    infos = fastcam.backends()
    assert set(infos) == {"torch", "cpu", "cuda", "triton"}
    assert infos["torch"].usable and infos["torch"].version == torch.__version__
    for info in infos.values():
        assert info.usable == (info.reason == ""), info
        assert info.name in str(info)


def test_auto_picks_a_usable_backend_for_the_device():
    infos = fastcam.backends()
    for device_type in ("cpu", "cuda"):
        chosen = resolve_backend("auto", torch.device(device_type))
        assert infos[chosen].usable and device_type in infos[chosen].device_types
    if not infos["cpu"].usable:
        assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_auto_order_follows_the_benchmarks():
    """On a GPU the cuda backend first (BENCHMARKS.md, H200), then triton for the 14-class
    shapes, the eager reference for many classes; on the CPU the cpu backend; the reference last
    everywhere."""
    from fastcam._backends import MANY_CLASSES, auto_order, shape_class

    assert shape_class(14) == "few" and shape_class(MANY_CLASSES) == "few" and shape_class(174) == "many"
    assert auto_order("cuda", "few") == ("cuda", "triton", "torch")
    assert auto_order("cuda", "many") == ("cuda", "torch")
    assert auto_order("cpu", "few") == auto_order("cpu", "many") == ("cpu", "torch")
    assert auto_order("mps") == ("torch",)
    for device_type in ("cpu", "cuda"):
        for cls in ("few", "many"):
            assert auto_order(device_type, cls)[-1] == "torch"


def test_auto_gives_the_same_result_as_the_backend_it_picks():
    feats, weight, bias = make_head_inputs("nchw", seed=1)
    picked = resolve_backend("auto", feats.device)
    a = fastcam.attention_loss(feats, weight, bias, lambda_consist=1.0, backend="auto")
    b = fastcam.attention_loss(feats, weight, bias, lambda_consist=1.0, backend=picked)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Torch", "gpu", "", None, 3])
def test_unknown_backend_names(name):
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(name, torch.device("cpu"))
