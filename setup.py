"""Build the mtkernels extension (`mtkernels._C`).

CPU build (CppExtension) by default; a CUDAExtension when the installed torch has CUDA and a CUDA
toolkit is found. Environment:
  FORCE_CUDA=1            a missing CUDA toolkit (or a CPU-only torch) is an error
  MTKERNELS_FORCE_CPU=1   build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    defaults to "9.0+PTX" (Hopper code plus PTX for newer chips)
  MTKERNELS_PORTABLE=1    do not tune the CPU code for the build machine (-march=native)
  MAX_JOBS                parallel compile jobs (ninja)

Only python_api/module.cpp includes torch/extension.h (about 40 s per translation unit); the kernel
files include ATen headers only.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _sources(pattern):
    # Paths relative to setup.py: setuptools refuses absolute source paths in some modes.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _want_cuda():
    if _flag("MTKERNELS_FORCE_CPU"):
        return False
    import torch

    has_toolkit = cpp_extension.CUDA_HOME is not None
    torch_has_cuda = torch.version.cuda is not None
    if _flag("FORCE_CUDA"):
        if not torch_has_cuda:
            raise RuntimeError("FORCE_CUDA=1 but the installed torch is a CPU-only build")
        if not has_toolkit:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return torch_has_cuda and has_toolkit


def _extension():
    with_cuda = _want_cuda()
    sources = _sources("python_api/*.cpp") + _sources("csrc/**/cpu/*.cpp")
    # C++20 explicitly: torch before about 2.12 defaults extensions to C++17, and the kernels use C++20
    # (std::bit_cast); the GPU machine's torch (about 2.11) would otherwise fail to build them.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DMTKERNELS_VERSION=\"%s\"" % VERSION]
    if not _flag("MTKERNELS_PORTABLE"):
        cxx.append("-march=native")
    define_macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        sources += _sources("csrc/**/cuda/*.cu")
        define_macros.append(("MTKERNELS_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="mtkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    name="mtkernels",
    version=VERSION,
    description="Fused CPU/CUDA kernels for multi-task recommendation (PyTorch extension)",
    packages=find_packages(include=["mtkernels", "mtkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "pandas", "scikit-learn", "tqdm", "matplotlib", "pyyaml"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["mtkernels=mtkernels.cli:main"]},
)
