"""Smoke test of an installed fastcam wheel: run with the Python of the environment the wheel
was installed into, from outside the source tree (scripts/wheel_check.sh does both).

    python wheel_smoke.py dist/fastcam-0.1.0+cu130torch2.14-cp311-cp311-linux_x86_64.whl [ARCH_LIST]

Checks that fastcam is imported from the installed wheel (not a checkout), that its name and
version carry the torch and CUDA versions it was built against and that those are this
environment's, that fastcam._C has CPU kernels and (a +cu wheel) CUDA kernels for the archs
asked for, that attention_loss on the cpu backend agrees with the reference in the loss and
the gradients, and prints `fastcam info`.
"""

import importlib.metadata
import os
import subprocess
import sys

import torch
from packaging.version import Version


def main(wheel: str, arch_list: str | None) -> None:
    import fastcam
    from fastcam import _build, _ext

    print(f"fastcam {importlib.metadata.version('fastcam')} from {os.path.dirname(fastcam.__file__)}")
    assert "site-packages" in fastcam.__file__, f"fastcam is not the installed one: {fastcam.__file__}"
    assert _build.find_csrc() is None, "the wheel must not ship the C++ sources"

    built, reason = _ext.load_extension()
    assert built is not None, reason
    assert "fastcam._C" in sys.modules, "fastcam._C was not loaded from the wheel (JIT-built?)"
    print(f"fastcam._C {sys.modules['fastcam._C'].__file__}: {built}")
    with_cuda = built["cuda"] != "none"
    tag = _build.local_version(built["torch"], built["cuda"] if with_cuda else None)
    running = _build.local_version(torch.__version__, torch.version.cuda if with_cuda else None)
    assert tag == running, f"the wheel is for {tag}, this environment has {running}"
    assert f"+{tag}-" in os.path.basename(wheel), f"{wheel} does not name {tag}"
    assert importlib.metadata.version("fastcam").endswith(f"+{tag}"), importlib.metadata.version("fastcam")

    assert _ext.has_kernel("CPU"), "no CPU kernels registered"
    if "+cu" in os.path.basename(wheel):
        assert with_cuda and _ext.has_kernel("CUDA"), "a +cu wheel without CUDA kernels"
        if arch_list:
            assert built["archs"] == arch_list.replace(";", "_").replace(" ", "_"), (built["archs"], arch_list)
    print(f"kernels: CPU {_ext.has_kernel('CPU')}, CUDA {_ext.has_kernel('CUDA')}")

    torch.manual_seed(0)
    features = torch.randn(4, 16, 5, 6, dtype=torch.float64)
    weight, bias = torch.randn(7, 16, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    labels = (torch.rand(4, 7) < 0.4).double()
    mask = torch.rand(4, 7) < 0.8
    results = {}
    for backend in ("cpu", "torch"):
        inputs = [t.clone().requires_grad_() for t in (features, weight, bias)]
        out = fastcam.attention_loss(*inputs, labels, mask, lambda_distinct=0.5, lambda_consist=0.1,
                                     backend=backend)  # fmt: skip
        out.loss.backward()
        results[backend] = [out.loss.detach()] + [t.grad for t in inputs]
    for name, got, want in zip(("loss", "dF", "dW", "db"), results["cpu"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    print(f"attention_loss cpu == torch: loss {results['cpu'][0].item():.6f}, gradients of F, W, b agree")

    have = Version(torch.__version__)
    other = f"{have.major}.{have.minor + 1}.0"
    print(f"under torch {other} it would say: {_ext.version_mismatch(built, other, torch.version.cuda)}")

    cli = os.path.join(os.path.dirname(sys.executable), "fastcam")
    print(f"$ {cli} info")
    subprocess.run([cli, "info"], check=True)
    print("wheel smoke test: ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
