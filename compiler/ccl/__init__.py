"""kiln's collective-communication plugin for tensor-parallel artifacts: the C++
source (kiln_ccl.cc) and its build into the artifact's lib/ccl.so."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import CompileError
from ...tvm_compat import compiler

SOURCE = Path(__file__).with_name("kiln_ccl.cc")


def build_ccl(out: Path) -> None:
    """Compile kiln_ccl.cc into `out` (a host shared library that links only tvm-ffi,
    whose C ABI is stable, and libdl: NCCL is opened at run time). Built once per
    source and tvm-ffi version, then copied from ~/.cache/kiln/ccl/."""
    t = compiler()
    ffi, libinfo = t.ffi, t.ffi_libinfo
    include = libinfo.find_include_path()
    lib = Path(libinfo.find_libtvm_ffi())
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise CompileError("--tensor-parallel needs a C++ compiler (g++) to build the collective plugin; install g++ or set CXX")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wl,--build-id=none", f"-I{include}", f"-I{Path(include) / 'dlpack'}",
           str(SOURCE), "-o", "{out}", f"-L{lib.parent}", "-ltvm_ffi", "-ldl"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(cmd[:1] + cmd[2:]).encode() + str(getattr(ffi, "__version__", "")).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("KILN_CACHE_DIR", Path.home() / ".cache" / "kiln")) / "ccl" / f"kiln_ccl-{key}.so"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
            tmp_out = Path(tmp) / "kiln_ccl.so"
            run = subprocess.run([a.replace("{out}", str(tmp_out)) for a in cmd], capture_output=True, text=True)
            if run.returncode != 0:
                last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise CompileError(f"building the collective plugin ({SOURCE.name}) failed: {last}")
            os.replace(tmp_out, cache)
    shutil.copyfile(cache, out)
