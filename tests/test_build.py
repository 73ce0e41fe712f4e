"""The compiled extension is built on first use when the package was installed without it."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import torch, fastcam
info = fastcam.backends()["cpu"]
assert info.usable, info.reason
f, w = torch.randn(2, 5, 3, 4), torch.randn(3, 5)
got, want = fastcam.cam_head(f, w, backend="cpu"), fastcam.cam_head(f, w, backend="torch")
torch.testing.assert_close(got, want)
print("ok", fastcam.__file__)
"""


def test_jit_build_on_first_use(tmp_path):
    """A source tree without fastcam._C (as installed without building): the first call
    compiles csrc/ with torch.utils.cpp_extension.load into TORCH_EXTENSIONS_DIR and works."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "fastcam", src / "fastcam", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", src / "csrc")
    env = dict(os.environ, FASTCAM_CUDA="0", MAX_JOBS="2", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=os.pathsep.join([str(src), sysconfig.get_paths()["purelib"]]))
    # -S: no site-packages .pth files, so the editable install of this checkout stays out.
    done = subprocess.run([sys.executable, "-S", "-c", PROGRAM], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ok {src / 'fastcam' / '__init__.py'}" in done.stdout
    assert "compiling it now" in done.stderr


@pytest.mark.parametrize("built, running, cuda, problem", [
    ({"torch": "2.14.1+cu130", "cuda": "13.0"}, "2.14.1+cu130", "13.0", None),
    ({"torch": "2.14.0+cu130", "cuda": "13.0"}, "2.14.1+cu130", "13.0", None),  # patch releases share the ABI
    ({"torch": "2.14.1+cu130", "cuda": "13.0"}, "2.14.1+cu130", "13.2", None),  # CUDA minor versions too
    ({"torch": "2.14.1", "cuda": "none"}, "2.14.1+cu130", "13.0", None),  # a CPU-only build under a CUDA torch
    ({"torch": "2.11.0+cu130", "cuda": "13.0"}, "2.14.1+cu130", "13.0", "for torch 2.11.0+cu130 but torch 2.14.1"),
    ({"torch": "2.14.1+cu126", "cuda": "12.6"}, "2.14.1+cu130", "13.0", "with CUDA 12.6 but this torch uses CUDA 13.0"),
    ({"torch": "unknown", "cuda": "none"}, "2.14.1", None, None),  # a hand-made build: nothing to compare
])  # fmt: skip
def test_version_mismatch_says_what_to_rebuild(built, running, cuda, problem):
    from fastcam._ext import version_mismatch

    got = version_mismatch(built, running, cuda)
    if problem is None:
        assert got is None
    else:
        assert problem in got and "pip install --no-build-isolation -e ." in got
