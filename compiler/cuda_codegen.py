"""How kiln turns TVM's generated CUDA source into device code.

TVM calls the global function `tvm_callback_cuda_compile(code)` for every CUDA
module it builds. During a kiln CUDA build that callback is ours:

  - kiln's hand-written device functions (kernels/cuda/*.cuh, called from TIR
    through T.call_extern) are put in front of the generated source;
  - nvcc builds one fatbin with SASS for every requested arch plus PTX of the
    newest (drivers of later GPUs JIT the PTX: forward compatibility). Nothing
    is left for NVRTC at load time.

The hook is installed only for the duration of one build and TVM's own
callback is put back afterwards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..tvm_compat import compiler
from .target import arch_number

_CUDA_DIR = Path(__file__).resolve().parent.parent / "passes" / "kernels" / "cuda"
# common.cuh (shared helpers) first, then the kernels in a fixed order
KERNEL_HEADERS = [_CUDA_DIR / "common.cuh"] + sorted(p for p in _CUDA_DIR.glob("*.cuh") if p.name != "common.cuh")


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc flags: SASS for each arch, PTX for the newest. sm_90's SASS is built as sm_90a (the
    Hopper-only instructions: wgmma, which kernels guard with __CUDA_ARCH_FEAT_SM90_ALL and
    replace by portable code elsewhere, e.g. in the PTX); every sm_90 GPU runs sm_90a code."""
    nums = sorted({arch_number(a) for a in archs})
    flags = []
    for n in nums:
        a = f"{n}a" if n == 90 else str(n)
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{nums[-1]},code=compute_{nums[-1]}"]
    return flags


def kernel_source() -> str:
    """kiln's CUDA device functions, in a fixed order (the build is reproducible)."""
    return "".join(f"// ---- kiln: {p.name}\n{p.read_text()}\n" for p in KERNEL_HEADERS)


@contextlib.contextmanager
def nvcc_callback(archs: list[str]):
    t = compiler()
    nvcc = t.nvcc
    flags = gencode_flags(archs)
    prefix = kernel_source()

    def compile_cuda(code):
        src = prefix + code if "kiln::" in code else code
        return nvcc.compile_cuda(src, target_format="fatbin", arch=flags, compiler="nvcc")

    t.ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    try:
        yield
    finally:
        t.ffi.register_global_func("tvm_callback_cuda_compile", nvcc.tvm_callback_cuda_compile, override=True)


__all__ = ["nvcc_callback", "gencode_flags", "kernel_source"]
