"""Sources and compiler flags of ``fastcam._C``, shared by setup.py (ahead-of-time build)
and fastcam/_ext.py (JIT build on first use). Imports only the standard library at the
top, so that setup.py can load it by path."""

from __future__ import annotations

import glob
import os
import shutil
import site
import sysconfig

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def local_version(torch_version: str, cuda_version: str | None) -> str:
    """The PEP 440 local version of a wheel built against this torch: "cu130torch2.14" (CUDA
    13.0, torch 2.14.x), or "cputorch2.14" without CUDA kernels. torch's C++ ABI holds within
    a major.minor release, CUDA's within a major one; the tag names what the wheel needs."""
    from packaging.version import Version

    major, minor = Version(torch_version).release[:2]
    cuda = "cu" + "".join(str(n) for n in Version(cuda_version).release[:2]) if cuda_version else "cpu"
    return f"{cuda}torch{major}.{minor}"


def find_csrc() -> str | None:
    """csrc/ of a source checkout (or shipped inside the package), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "fastcam.cpp")):
            return candidate
    return None


def nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def want_cuda(setting: str | None) -> bool:
    """FASTCAM_CUDA: "0" never, "1" always (an error without nvcc), unset when nvcc is found."""
    if setting == "0":
        return False
    found = nvcc_path() is not None
    if setting == "1" and not found:
        raise RuntimeError("FASTCAM_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on the PATH)")
    return found


def sources(csrc: str, cuda: bool) -> list[str]:
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")) + glob.glob(os.path.join(csrc, "cuda", "*.cpp")))
    return files


def pip_cuda_dirs() -> tuple[list[str], list[str]]:
    """Include and library folders of the pip CUDA packages (nvidia/cu13), where present.

    A machine may have nvcc but not the full toolkit (no cuBLAS headers, no unversioned
    libcudart.so); torch's pip CUDA build brings them in site-packages/nvidia/."""
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    includes, libs = [], []
    for root in sorted(roots):
        for sub in sorted(glob.glob(os.path.join(root, "nvidia", "cu*"))):
            if os.path.isdir(os.path.join(sub, "include")):
                includes.append(os.path.join(sub, "include"))
            if os.path.isdir(os.path.join(sub, "lib")):
                libs.append(os.path.join(sub, "lib"))
    return includes, libs


def toolkit_include_dirs() -> list[str]:
    """The include folder of the CUDA toolkit that nvcc belongs to, for the C++ (g++) sources
    that include CUDA headers (csrc/cuda/*_binding.cpp: c10/cuda -> cuda_runtime.h ->
    crt/host_config.h). torch derives CUDA_HOME from nvcc's location, which is wrong where
    nvcc is a wrapper script outside its toolkit (e.g. /usr/local/bin/nvcc); nvcc itself
    knows its folder (``_HERE_`` in ``nvcc --dryrun``). The pip CUDA headers lack crt/."""
    import subprocess

    nvcc = nvcc_path()
    if nvcc is None:
        return []
    try:
        run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            include = os.path.normpath(os.path.join(line.split("=", 1)[1].strip(), "..", "include"))
            if os.path.isfile(os.path.join(include, "crt", "host_config.h")):
                return [include]
    return []


def cudart_link_name(library_dirs: list[str]) -> str:
    """"cudart" where an unversioned libcudart.so exists, else ":libcudart.so.N"."""
    from torch.utils.cpp_extension import CUDA_HOME

    dirs = [os.path.join(CUDA_HOME or "", d) for d in ("lib64", "lib")] + library_dirs
    if any(os.path.exists(os.path.join(d, "libcudart.so")) for d in dirs):
        return "cudart"
    for d in dirs:
        versioned = sorted(glob.glob(os.path.join(d, "libcudart.so.*")), key=len)
        if versioned:
            return ":" + os.path.basename(versioned[0])
    return "cudart"


def flags(debug: bool = False) -> dict[str, list[str]]:
    opt = ["-O0", "-g"] if debug else ["-O3"]
    return {
        "cxx": opt + ["-fopenmp"],
        "nvcc": opt + ["-lineinfo", "--expt-relaxed-constexpr"],
        "ld": ["-fopenmp"],
    }


def build_defines(with_cuda: bool) -> list[str]:
    """-D flags recording what the library is built against (read back by fastcam::build_info)."""
    import torch

    defines = [f"-DFASTCAM_TORCH_VERSION={torch.__version__}"]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST).replace(";", "_").replace(" ", "_")
        defines += ["-DFASTCAM_WITH_CUDA", f"-DFASTCAM_CUDA_VERSION={torch.version.cuda}",
                    f"-DFASTCAM_CUDA_ARCHS={archs}"]  # fmt: skip
    return defines


def extension_kwargs(root: str, cuda: str | None, debug: bool = False) -> tuple[dict, bool]:
    """Keyword arguments of the setuptools Extension, and whether it has CUDA kernels."""
    csrc = os.path.join(root, "csrc")
    with_cuda = want_cuda(cuda)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    f = flags(debug)
    kwargs = dict(
        sources=[os.path.relpath(s, root) for s in sources(csrc, with_cuda)],
        extra_compile_args={"cxx": f["cxx"] + build_defines(with_cuda) + ["-DFASTCAM_PYTHON_MODULE"],
                            "nvcc": f["nvcc"]},
        extra_link_args=f["ld"],
    )
    if with_cuda:
        includes, libs = pip_cuda_dirs()
        kwargs.update(include_dirs=toolkit_include_dirs() + includes, library_dirs=libs)
    return kwargs, with_cuda


def fix_cuda_libraries(ext) -> None:
    """Link the CUDA runtime under the name this machine has it."""
    name = cudart_link_name(list(ext.library_dirs))
    ext.libraries = [name if lib == "cudart" else lib for lib in ext.libraries]


def jit_load(verbose: bool = False) -> None:
    """Build (once, cached by torch under TORCH_EXTENSIONS_DIR) and load the library from csrc/."""
    from torch.utils.cpp_extension import load

    csrc = find_csrc()
    if csrc is None:
        raise ImportError("fastcam's C++ sources (csrc/) are not installed, so fastcam._C cannot be JIT-built")
    with_cuda = want_cuda(os.environ.get("FASTCAM_CUDA"))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    f = flags()
    includes, libs = pip_cuda_dirs() if with_cuda else ([], [])
    if with_cuda:
        includes = toolkit_include_dirs() + includes
    ldflags = f["ld"] + [f"-L{d}" for d in libs]
    if with_cuda:
        ldflags.append(f"-l{cudart_link_name(libs)}")
    load(
        name="fastcam_C",
        sources=sources(csrc, with_cuda),
        extra_cflags=f["cxx"] + build_defines(with_cuda),
        extra_cuda_cflags=f["nvcc"],
        extra_ldflags=ldflags,
        extra_include_paths=includes,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
