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

import shutil
import subprocess
from pathlib import Path

from ..errors import CompileError
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
    """Object files of kiln's C kernels for tg, in workdir."""
    cc, out = c_compiler(tg), []
    for src in SOURCES:
        obj = workdir / f"kiln_{src.stem}.o"
        # -x c: the kernels are C even when the compiler found is g++
        cmd = [cc, "-x", "c", "-std=gnu11", "-O3", "-fPIC", "-fno-math-errno", *isa_flags(tg), "-c", str(src), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CompileError(f"compiling kiln's CPU kernel {src.name} for {tg.label} with {cc} failed: {last}")
        out.append(str(obj))
    return out
