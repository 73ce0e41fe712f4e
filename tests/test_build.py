"""The compiled extension is built on first use when the package was installed without it."""

import os
import re
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
        assert f"{sys.executable} TORCH_CUDA_ARCH_LIST=\"8.0;9.0+PTX\" scripts/build_wheel.sh" in got


PY = f"cp{sys.version_info.major}{sys.version_info.minor}"


@pytest.mark.parametrize("built, running, cuda, says", [
    # an installed wheel for torch 2.14 + CUDA 13.0 under torch 2.15: the wheel to get, or the command with its archs
    ({"torch": "2.14.1+cu130", "cuda": "13.0", "archs": "7.0_8.0_8.6_9.0+PTX"}, "2.15.0+cu130", "13.0",
     ["built for torch 2.14.1+cu130 but torch 2.15.0+cu130 is running",
      f"fastcam-*+cu130torch2.15-{PY}-{PY}-linux_x86_64.whl",
      'TORCH_CUDA_ARCH_LIST="7.0;8.0;8.6;9.0+PTX" scripts/build_wheel.sh',
      'TORCH_CUDA_ARCH_LIST="7.0;8.0;8.6;9.0+PTX" make wheel']),
    # CUDA 12 kernels under a CUDA 13 torch
    ({"torch": "2.14.1+cu126", "cuda": "12.6", "archs": "8.0_9.0+PTX"}, "2.14.1+cu130", "13.0",
     ["with CUDA 12.6 but this torch uses CUDA 13.0", f"fastcam-*+cu130torch2.14-{PY}-{PY}-"]),
    # a CUDA wheel under a CPU-only torch of another release: a CPU-only wheel
    ({"torch": "2.14.1+cu130", "cuda": "13.0", "archs": "8.0_9.0+PTX"}, "2.15.0a0+git1234", None,
     ["fastcam-*+cputorch2.15-", "FASTCAM_CUDA=0 scripts/build_wheel.sh", "FASTCAM_CUDA=0 make wheel"]),
])  # fmt: skip
def test_version_mismatch_names_the_wheel_and_the_command(built, running, cuda, says):
    from fastcam._ext import version_mismatch

    got = version_mismatch(built, running, cuda)
    for text in says:
        assert text in got, got


@pytest.mark.parametrize("torch_version, cuda, tag", [
    ("2.14.1+cu130", "13.0", "cu130torch2.14"),
    ("2.14.1", "12.6", "cu126torch2.14"),
    ("2.15.0a0+git1234", None, "cputorch2.15"),
    ("2.10.0+cu128", "12.8", "cu128torch2.10"),  # versions as numbers: 2.10 is not 2.1
])  # fmt: skip
def test_wheel_local_version(torch_version, cuda, tag):
    from fastcam._build import local_version

    assert local_version(torch_version, cuda) == tag


def test_build_info_is_read_from_the_file_without_loading_it(tmp_path):
    from fastcam._ext import build_info_from_file, load_extension

    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF\x00junk torch=\x00torch=2.11.0+cu130 cuda=13.0 archs=8.0_9.0+PTX\x00more")
    assert build_info_from_file(str(fake)) == {"torch": "2.11.0+cu130", "cuda": "13.0", "archs": "8.0_9.0+PTX"}
    assert build_info_from_file(str(tmp_path / "missing.so")) is None
    built, _ = load_extension()
    if built is not None and "fastcam._C" in sys.modules:  # the library built here says the same from its file
        assert build_info_from_file() == built


MISMATCH_PROGRAM = """
import fastcam
info = fastcam.backends()["cpu"]
assert not info.usable
print(info.reason)
"""


def test_an_installed_library_for_another_torch_says_what_to_install_or_build(tmp_path):
    """As installed from a wheel (no csrc/, so no JIT build): a fastcam._C built for another
    torch, which fails to load, is reported with the wheel to get and the command to build it."""
    import torch

    site = tmp_path / "site"
    shutil.copytree(ROOT / "fastcam", site / "fastcam", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    fake = b"not a library\x00torch=2.11.0+cu130 cuda=13.0 archs=8.0_9.0+PTX\x00"
    (site / "fastcam" / f"_C{suffix}").write_bytes(fake)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]))
    done = subprocess.run([sys.executable, "-S", "-c", MISMATCH_PROGRAM], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"built for torch 2.11.0+cu130 but torch {torch.__version__} is running" in done.stdout
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" scripts/build_wheel.sh' in done.stdout
    assert "compiling it now" not in done.stderr


@pytest.mark.parametrize("local, version", [(None, r"\d+\.\d+\.\d+"), ("1", r"\d+\.\d+\.\d+\+cputorch\d+\.\d+")])
def test_setup_py_versions_a_wheel_build_only(local, version):
    """`make wheel` (FASTCAM_WHEEL_LOCAL_VERSION=1) versions the build with what it is built against;
    any other build keeps the plain version."""
    env = dict(os.environ, FASTCAM_CUDA="0")
    env.pop("FASTCAM_WHEEL_LOCAL_VERSION", None)
    if local:
        env["FASTCAM_WHEEL_LOCAL_VERSION"] = local
    done = subprocess.run([sys.executable, "setup.py", "--version"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(version, done.stdout.strip().splitlines()[-1]), done.stdout
