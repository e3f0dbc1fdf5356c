"""A stand-in `libcuda.so.1` so a machine with no GPU driver can build CUDA code.

TVM's CUDA runtime plugin (`libtvm_runtime_cuda.so`) links against the driver
library. Without it the plugin does not load, and TVM then silently keeps CUDA
*source* in the library, to be compiled at load time. With this stand-in
loaded first (RTLD_GLOBAL, soname libcuda.so.1), the plugin loads and TVM
compiles device code at build time (`TVM_CUDA_COMPILE_MODE=nvcc`), embedding a
cubin. Every entry point answers CUDA_ERROR_NO_DEVICE: nothing can run here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import CompileError

# The nine driver functions libtvm_runtime_cuda.so imports (TVM 0.27).
_SOURCE = r"""
typedef int CUresult;
#define NO_DEVICE 100
static const char *msg = "kiln stand-in libcuda: no CUDA device on this machine";
CUresult cuDeviceGetName(char *n, int len, int d) { return NO_DEVICE; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { return NO_DEVICE; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = msg; return 0; }
CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) { return NO_DEVICE; }
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { return NO_DEVICE; }
CUresult cuModuleLoadData(void **m, const void *img) { return NO_DEVICE; }
CUresult cuModuleUnload(void *m) { return NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void *t, int a, unsigned r, void *g, const void *d, const void *s,
                                const void *b, const void *es, int il, int sw, int l2, int oob) { return NO_DEVICE; }
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "cuda-stub"


def driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def load_stand_in_driver() -> Path:
    """Build (once, cached by source hash) and load the stand-in driver. Call before `import tvm`."""
    out = _cache_dir() / f"libcuda-{hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]}.so.1"
    if not out.is_file():
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise CompileError("CUDA targets on a machine without a GPU driver need a C compiler (gcc) to build a stand-in libcuda")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        src = out.with_name(f"{out.name}.{os.getpid()}.c")  # per process: two compiles at once don't share a source file
        src.write_text(_SOURCE)
        res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", str(src), "-o", str(tmp)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise CompileError(f"building the stand-in libcuda failed: {res.stderr.strip()[-300:]}")
        os.replace(tmp, out)
        src.unlink(missing_ok=True)
    ctypes.CDLL(str(out), mode=ctypes.RTLD_GLOBAL)
    return out


def prepare_cuda_compile() -> None:
    """Before anything imports TVM in a process that will compile for CUDA: load a
    stand-in driver where no real one exists, so TVM's CUDA plugin loads."""
    import sys  # noqa: PLC0415

    if "tvm" not in sys.modules and not driver_present():
        load_stand_in_driver()
