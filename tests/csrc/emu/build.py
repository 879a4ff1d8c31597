"""Build csrc/'s kernels for the CPU under the CUDA emulation of cuda_emu.h (see its header comment).

``load()`` rewrites each csrc/ file into a C++ file (the rewrites are listed in :func:`rewrite`), compiles them with
the host compiler through ``torch.utils.cpp_extension.load`` (cached by content under build/emu/) and returns
``torch.ops.dlcv_fast_emu``: the ops of bindings.cpp (attention_fwd, attention_bwd, rope, window_attention_fwd,
window_attention_bwd) with the same schemas, taking CPU tensors. Needs the CUDA toolkit's headers (cuda_fp16.h and
friends; nothing is linked from it) and a C++ compiler. ``python -m tests.csrc.emu.build`` builds it once.

The kernels are compiled with GCC's ThreadSanitizer instrumentation (``-fsanitize=thread``) but not its runtime:
every load and store of the kernel code calls a hook of cuda_emu.h's race check, which reports unordered accesses
to one byte by two threads or blocks (``DLCV_FAST_EMU_RACECHECK=0`` turns it off at run time).

``DLCV_FAST_EMU_ASAN=1`` builds it with AddressSanitizer instead (no race check then), to catch a kernel reading or writing outside a tensor
(the emulation cannot see global-memory bounds otherwise); run Python with the sanitizer and libstdc++ preloaded
(triton's module throws C++ exceptions at import), e.g.
``LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0
DLCV_FAST_EMU_ASAN=1 python -m pytest tests/csrc/test_cuda_emulated.py -k "not faults"`` (the guard-page test
expects a plain segfault). ASan warns once that it does not fully support swapcontext; it has reported nothing
else on these kernels.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# the kernel sources (another copy of them through DLCV_FAST_EMU_CSRC, as tests/csrc/emu/barriers.py does)
CSRC = Path(os.environ.get("DLCV_FAST_EMU_CSRC", ROOT / "csrc"))
HERE = Path(__file__).resolve().parent

_DROPPED_INCLUDES = ("ATen/cuda/CUDAContext.h", "c10/cuda/CUDAGuard.h", "c10/cuda/CUDAException.h", "mma.h")


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory holding cuda_fp16.h, or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        text = Path(nvcc).read_text(errors="ignore") if os.path.getsize(nvcc) < 4096 else ""
        m = re.search(r"(/\S+)/bin/nvcc", text)  # a wrapper script naming the real nvcc
        if m:
            candidates.append(Path(m.group(1)))
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for c in candidates:
        for inc in (c / "include", *sorted(c.glob("targets/*/include"))):
            if (inc / "cuda_fp16.h").is_file():
                return inc
    return None


def _split_declarators(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def _static_shared(m: re.Match) -> str:
    """``__shared__ [__align__(n)] TYPE a[..], b[..];`` -> one emu::shared_var reference per declarator."""
    indent, body = m.group(1), m.group(2)
    declarators = _split_declarators(re.sub(r"__align__\(\s*\d+\s*\)", "", body).strip())
    first = re.match(r"(.*?)\b(\w+)\s*((?:\[[^\]]*\])*)\s*$", declarators[0])
    type_ = first.group(1).strip()
    decls = [first.group(2, 3)] + [re.match(r"(\w+)\s*((?:\[[^\]]*\])*)$", d).group(1, 2)
                                  for d in declarators[1:]]
    parts = []
    for name, dims in decls:
        key = f"emu_key_{name}_"
        parts.append(f"static char {key}; auto& {name} = ::emu::shared_var<{type_} {dims}>(&{key});")
    return indent + " ".join(parts)


def _launch(m: re.Match) -> str:
    return f"::emu::launch({m.group(1)}, {m.group(2)})("


def rewrite(name: str, text: str) -> str:
    """One csrc/ file as C++ for the emulation:
    - the CUDA-only includes dropped (cuda_emu.h provides what the files use of them);
    - ``extern __shared__ ... name[];`` -> the launch's dynamic shared memory;
    - ``__shared__ TYPE name[N], ...;`` -> block-wide variables (emu::shared_var);
    - ``kernel<<<grid, block, smem, stream>>>(args)`` -> ``::emu::launch(kernel, grid, block, smem, stream)(args)``;
    - ``.is_cuda()`` -> ``.is_cpu()`` (the emulated ops take CPU tensors);
    - bindings.cpp: the ops registered as dlcv_fast_emu::* for the CPU dispatch key."""
    lines = [ln for ln in text.splitlines() if not any(f"<{inc}>" in ln for inc in _DROPPED_INCLUDES)]
    text = "\n".join(lines) + "\n"
    text = re.sub(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s*)?unsigned\s+char\s+(\w+)\s*\[\s*\]\s*;",
                  r"unsigned char* \1 = ::emu::dynamic_smem();", text)
    text = re.sub(r"(?m)^(\s*)__shared__\s+([^;]*);", _static_shared, text)
    text = re.sub(r"([\w:]+(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", _launch, text, flags=re.S)
    text = text.replace(".is_cuda()", ".is_cpu()")
    if name == "bindings.cpp":
        text = text.replace("dlcv_fast_cuda", "dlcv_fast_emu")
        text = text.replace("TORCH_LIBRARY_IMPL(dlcv_fast_emu, CUDA,", "TORCH_LIBRARY_IMPL(dlcv_fast_emu, CPU,")
        text = re.sub(r"(?s)static PyModuleDef.*", "", text).replace("#include <Python.h>\n", "")
    if name.endswith((".cu", ".cpp")):
        text = '#include "cuda_emu.h"\n' + text
    return text


def sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()) + [HERE / "cuda_emu.h", HERE / "selftest.cu", Path(__file__)]:
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _build(name: str, files, digest: str, verbose: bool):
    from torch.utils import cpp_extension

    inc = cuda_include_dir()
    if inc is None:
        raise FileNotFoundError("the CUDA toolkit's headers (cuda_fp16.h) were not found; set CUDA_HOME")
    asan = os.environ.get("DLCV_FAST_EMU_ASAN") == "1"
    out = ROOT / "build" / "emu" / f"{name}-{digest}{'-asan' if asan else ''}"
    if os.environ.get("DLCV_FAST_EMU_OUT"):  # one directory for successive variants: ninja rebuilds what changed
        out = Path(os.environ["DLCV_FAST_EMU_OUT"]) / name
    src_dir = out / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for p in files:
        if p.suffix not in (".cu", ".cuh", ".h", ".cpp"):
            continue
        target = src_dir / (p.name[:-3] + ".cpp" if p.suffix == ".cu" else p.name)
        text = rewrite(p.name, p.read_text())
        if not target.exists() or target.read_text() != text:  # atomically: pytest-xdist workers may race here
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        if target.suffix == ".cpp":
            sources.append(str(target))
    cpp_extension.load(
        name=name, sources=sources, build_directory=str(out),
        extra_include_paths=[str(HERE), str(src_dir), str(inc)],
        # -fno-strict-aliasing: the kernels move 16-byte vectors through reinterpret_cast (uint4 <-> T), as CUDA
        # code does; GCC's type-based alias analysis would drop those stores
        extra_cflags=["-O2", "-fno-strict-aliasing", "-DDLCV_FAST_EMU", "-Wno-unknown-pragmas",
                      "-Wno-unused-variable"] + (["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else
                                                 # the race check's hooks (cuda_emu.h); no TSan runtime linked
                                                 ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]),
        extra_ldflags=["-fsanitize=address"] if asan else [],
        is_python_module=False, verbose=verbose)


def load(verbose: bool = False):
    """Build (or reuse) the emulated extension and return ``torch.ops.dlcv_fast_emu``."""
    import torch

    if not hasattr(torch.ops.dlcv_fast_emu, "attention_fwd"):
        _build("dlcv_fast_emu", sorted(CSRC.iterdir()), sources_digest(), verbose)
    return torch.ops.dlcv_fast_emu


def load_selftest(verbose: bool = False):
    """Build (or reuse) selftest.cu's deliberately broken kernels; returns ``torch.ops.dlcv_fast_emu_selftest``."""
    import torch

    if not hasattr(torch.ops.dlcv_fast_emu_selftest, "run"):
        _build("dlcv_fast_emu_selftest", [HERE / "selftest.cu"], sources_digest(), verbose)
    return torch.ops.dlcv_fast_emu_selftest


if __name__ == "__main__":
    ops = load(verbose=True)
    print("built:", ops)
