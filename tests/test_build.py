"""The compiled extension is built on first use when the package was installed without it."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

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
