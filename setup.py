"""Builds the milora_ext._C extension (setup.py is the source of truth for the build).

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when torch has
CUDA and nvcc is found. Environment switches:
  MILORA_CUDA=0|1          force the CUDA kernels off / on (1 fails if they cannot be built)
  MILORA_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0+PTX" (default "8.0;8.6;8.9;9.0+PTX";
                           TORCH_CUDA_ARCH_LIST is honoured when MILORA_CUDA_ARCH_LIST is unset)
  MILORA_CPU_ARCH          opt-in value for -march= on the C++ side (default: none, a build that
                           runs on any x86-64 machine; the LoRA kernels are compiled per ISA level
                           in csrc/cpu/isa_*.cpp and chosen at load time, see csrc/cpu/isa.h)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """Where the CUDA toolkit lives, resolved from nvcc's real path.

    torch guesses CUDA_HOME from `which nvcc`; when nvcc is a wrapper in /usr/local/bin
    that guess is /usr/local and linking -lcudart fails, so resolve it here first."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "lib64")) or os.path.exists(os.path.join(home, "lib")):
            return home
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ.setdefault("CUDA_HOME", _cuda_home)

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    flag = os.environ.get("MILORA_CUDA", "auto").strip().lower()
    have_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    possible = torch.version.cuda is not None and CUDA_HOME is not None and have_sources
    why = (
        "torch has no CUDA" if torch.version.cuda is None
        else "nvcc not found (set CUDA_HOME)" if CUDA_HOME is None
        else "no csrc/cuda/*.cu sources" if not have_sources
        else ""
    )
    if flag in ("0", "off", "false", "no"):
        print("milora: MILORA_CUDA=0, building the CPU kernels only", file=sys.stderr)
        return False
    if flag in ("1", "on", "true", "yes"):
        if not possible:
            raise RuntimeError(f"milora: MILORA_CUDA=1 but the CUDA kernels cannot be built: {why}")
        return True
    if not possible:
        print(f"milora: building the CPU kernels only ({why})", file=sys.stderr)
    return possible


def _openmp_flags():
    """-fopenmp where torch itself runs on OpenMP (Linux wheels: GNU libgomp). ATen's
    at::parallel_for is a header template: compiled without _OPENMP it runs every work item
    on the calling thread, so the CPU kernel's phases would never use a second core. At run
    time the libgomp that libtorch_cpu already loaded serves the extension too (same soname,
    one thread pool, sized by torch.set_num_threads)."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    print("milora: torch has no OpenMP here; the CPU kernel's work items run on one thread", file=sys.stderr)
    return []


def _cxx_flags(openmp):
    flags = ["-O3", "-fvisibility=hidden"] + openmp
    arch = os.environ.get("MILORA_CPU_ARCH", "none").strip()
    if arch and arch != "none":
        flags.append(f"-march={arch}")
    return flags


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    openmp = _openmp_flags()
    extra = {"cxx": _cxx_flags(openmp)}
    if _want_cuda():
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        arch_list = os.environ.get("MILORA_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;8.6;8.9;9.0+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        cuda_files = [os.path.basename(p) for p in sources if p.startswith(os.path.join("csrc", "cuda"))]
        print(f"milora: building the CUDA kernels for {arch_list} with {CUDA_HOME}: {', '.join(cuda_files)}",
              file=sys.stderr)
        extra["cxx"].append("-DMILORA_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DMILORA_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension("milora_ext._C", sources, include_dirs=include_dirs,
                             extra_compile_args=extra, extra_link_args=openmp, py_limited_api=True)
    return CppExtension("milora_ext._C", sources, include_dirs=include_dirs,
                        extra_compile_args=extra, extra_link_args=openmp, py_limited_api=True)


setup(
    packages=find_packages(include=["milora_ext", "milora_ext.*"]) + ["milora." + p for p in find_packages("python/milora")] + ["milora"],
    package_dir={"milora": "python/milora"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
