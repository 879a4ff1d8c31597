"""Build script for dlcv_fast.

The Triton kernels in ``kernels/`` install as the subpackage ``dlcv_fast.kernels`` so that nothing
named ``kernels`` lands at the top of site-packages. The CUDA sources in ``csrc/`` are built as the
extension ``dlcv_fast._C`` when a CUDA build of torch and nvcc are both present; otherwise (or with
``DLCV_FAST_SKIP_CUDA=1``) the package installs without it and the Triton/reference backends are used.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extensions():
    """Return (ext_modules, cmdclass) for csrc/, or ([], {}) when the CUDA build is not possible."""
    if os.environ.get("DLCV_FAST_SKIP_CUDA", "0") == "1":
        print("dlcv_fast: DLCV_FAST_SKIP_CUDA=1, not building csrc/")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("dlcv_fast: torch is not importable at build time, not building csrc/")
        return [], {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        print("dlcv_fast: no CUDA build of torch or no nvcc, not building csrc/")
        return [], {}
    include_dirs = [os.path.join(HERE, "csrc")]
    # pip's CUDA wheels ship headers under site-packages/nvidia/cu13/include (design.md).
    try:
        import nvidia

        for root in nvidia.__path__:
            include_dirs += glob.glob(os.path.join(root, "cu*", "include"))
    except ImportError:
        pass
    archs = os.environ.get("DLCV_FAST_CUDA_ARCHS", "80;90")
    gencode = []
    for arch in archs.split(";"):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    ext = CUDAExtension(
        name="dlcv_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="dlcv_fast",
    version="0.1.0",
    description="Triton and CUDA attention kernels for vision transformers and vision-language models",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dlcv_fast", "dlcv_fast.*"]) + ["dlcv_fast.kernels"],
    package_dir={"dlcv_fast.kernels": "kernels"},
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
