"""kiln's C kernels for CPU targets (passes/kernels/cpu/*.c, called from TIR through
T.call_extern): compiled here for one CompileTarget and linked into its library
(export_library's addons), so the artifact carries them like TVM's own code.

Instruction sets come from the target, never from the build machine: the ISA flags
passed to the C compiler are only those of the target's CPU (an x86-64-v2 library gets
no AVX2, and its kernels take their portable C path), so a multi-level artifact keeps
its guarantee that no library runs an instruction its host lacks. The cross gcc of a
foreign target (aarch64) compiles them, as it links the library.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import CompileError
from ..frontends.bundled import cache_dir
from .target import CompileTarget

C_DIR = Path(__file__).resolve().parent.parent / "passes" / "kernels" / "cpu"
SOURCES = sorted(C_DIR.glob("*.c"))

# x86 features the kernels use, as LLVM names them -> gcc flags: all of one row or none
_X86_SETS = (({"avx", "avx2", "fma", "f16c"}, ["-mavx", "-mavx2", "-mfma", "-mf16c"]),)


def isa_flags(tg: CompileTarget) -> list[str]:
    feats = set(tg.llvm_features)
    machine = tg.triple.split("-")[0]
    if machine == "x86_64":
        flags = ["-march=x86-64", "-mtune=generic"]
        for need, add in _X86_SETS:
            if need <= feats:
                flags += add
        return flags
    if machine == "aarch64":
        return ["-march=armv8.2-a+dotprod" if "dotprod" in feats else "-march=armv8-a"]
    return []


def c_compiler(tg: CompileTarget) -> str:
    cc = tg.linker or shutil.which("gcc") or shutil.which("cc") or shutil.which("g++")
    if cc is None:
        raise CompileError("building a CPU library needs a C compiler (gcc, cc or g++) on PATH")
    return cc


def kernel_objects(tg: CompileTarget, workdir: Path) -> list[str]:
    """Object files of kiln's C kernels for tg. Each is compiled once per (compiler, flags,
    sources) and kept in the kiln cache (KILN_CACHE/kernels): gcc at -O3 took ~2.6 s of every
    compile -- most of a small ONNX graph's -- for the same bytes each time. `workdir` is unused
    when the cache has them (kept for callers that compile into it)."""
    cc = c_compiler(tg)
    # -x c: the kernels are C even when the compiler found is g++
    flags = ["-x", "c", "-std=gnu11", "-O3", "-fPIC", "-fno-math-errno", *isa_flags(tg)]
    cache = cache_dir() / "kernels"
    headers = b"".join(h.read_bytes() for h in sorted(C_DIR.glob("*.h")))
    real = Path(shutil.which(cc) or cc).resolve()
    try:
        st = real.stat()
        who = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        who = str(real)
    out = []
    for src in SOURCES:
        key = hashlib.sha256("\0".join([who, *flags]).encode() + b"\0" + src.read_bytes() + b"\0" + headers).hexdigest()[:24]
        obj = cache / f"kiln_{src.stem}-{key}.o"
        if not obj.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{obj.name}.{os.getpid()}.tmp"
            cmd = [cc, *flags, "-c", str(src), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                tmp.unlink(missing_ok=True)
                last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise CompileError(f"compiling kiln's CPU kernel {src.name} for {tg.label} with {cc} failed: {last}")
            os.replace(tmp, obj)  # atomic: two compiles at once each write their own tmp
        out.append(str(obj))
    return out
