"""Build script for dlcv_fast.

The Triton kernels in ``kernels/`` install as the subpackage ``dlcv_fast.kernels`` so that nothing
named ``kernels`` lands at the top of site-packages. The CUDA sources in ``csrc/`` are built as the
extension ``dlcv_fast._C`` when a CUDA build of torch and nvcc are both present; otherwise (or with
``DLCV_FAST_SKIP_CUDA=1``, or when that build fails) the package installs without it and the Triton/reference
backends are used. ``DLCV_FAST_CUDA_ARCHS`` (e.g. ``80;90``) lists the SM versions to build for; by default the
visible GPU's, or 80 and 90 on a machine without one.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def nvcc_library_dirs(nvcc):
    """The CUDA runtime's library folders as nvcc itself links them (its --dryrun LIBRARIES line): torch guesses
    CUDA_HOME from nvcc's path, which misses when nvcc is a wrapper script outside the toolkit."""
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    dirs = []
    for line in (dry.stdout + dry.stderr).splitlines():
        if "LIBRARIES=" in line:
            found = re.findall(r'-L"?([^"\s]+)', line)
            dirs += [os.path.normpath(d) for d in found if not d.rstrip("/").endswith("stubs")]
    return [d for d in dirs if os.path.isdir(d)]


def default_archs(torch):
    """The visible GPU's SM version when building on a GPU machine (half the compile time of two), else sm_80
    and sm_90 (the kernels need sm_80+: bf16 WMMA)."""
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if major * 10 + minor >= 80:
                return f"{major}{minor}"
    except Exception:  # a broken driver: build the default set
        pass
    return "80;90"


def find_ninja():
    """Whether ninja is on PATH, putting the `ninja` Python package's binary there when only that is installed."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except (ImportError, AttributeError):
        return False
    return shutil.which("ninja") is not None


def parallel_compile(compile_fn):
    """A distutils ``compiler.compile`` that compiles each source in its own thread (each runs nvcc or the C++
    compiler as a subprocess): without ninja the .cu files would otherwise compile one after another, which on a
    GPU check's 150 s install limit is too slow (about 140 s for sm_90 alone on the 2-core CI machine)."""
    from concurrent.futures import ThreadPoolExecutor

    def compile_all(sources, *args, **kwargs):
        workers = min(len(sources), os.cpu_count() or 1)
        if workers <= 1:
            return compile_fn(sources, *args, **kwargs)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda src: compile_fn([src], *args, **kwargs), sources))
        return [obj for objs in parts for obj in objs]
    return compile_all


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
    archs = os.environ.get("DLCV_FAST_CUDA_ARCHS") or default_archs(torch)
    gencode = []
    for arch in archs.split(";"):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = max(archs.split(";"), key=int)  # plus its PTX, which newer GPUs compile at load time
    gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    ext = CUDAExtension(
        name="dlcv_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=nvcc_library_dirs(nvcc),
        # No -std flag: torch's build helper passes the C++ standard its headers need (C++17 / C++20).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", *gencode]},
    )
    ninja = find_ninja() and os.environ.get("DLCV_FAST_NO_NINJA", "0") != "1"
    base = BuildExtension.with_options(use_ninja=bool(ninja))

    class OptionalBuildExt(base):
        """A failed CUDA build leaves the package installed without dlcv_fast._C (the Triton and reference
        backends still work; backend "cuda" then raises), unless DLCV_FAST_REQUIRE_CUDA=1."""

        failed = ()

        def build_extension(self, ext):
            if not ninja:  # setuptools compiles one source after another: compile them side by side instead
                self.compiler.compile = parallel_compile(self.compiler.compile)
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler errors surface as CompileError / RuntimeError / OSError
                if os.environ.get("DLCV_FAST_REQUIRE_CUDA", "0") == "1":
                    raise
                self.failed = (*self.failed, ext.name)
                print(f"dlcv_fast: WARNING: building csrc/ failed ({type(exc).__name__}: {exc}); installing "
                      f"without the CUDA kernels (set DLCV_FAST_REQUIRE_CUDA=1 to make this an error)")

        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def get_outputs(self):
            return [self.get_ext_fullpath(e.name) for e in self._built()]

        def copy_extensions_to_source(self):
            exts, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = exts

    return [ext], {"build_ext": OptionalBuildExt}


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
