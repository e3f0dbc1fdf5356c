"""The one place kiln imports TVM.

TVM 0.27 moved things around (``tvm.tir`` is ``tvm.tirx``, dlight lives in
``tvm.s_tir.dlight``, targets are JSON dicts). Every other kiln module asks this
module for what it needs, so the next move is fixed here once.

Two modes:
- ``runtime()``: the TVM runtime only. When TVM is not yet imported in this
  process it is imported with ``TVM_USE_RUNTIME_LIB=1`` so that
  ``libtvm_compiler.so`` (260 MB) is never loaded; this is what a deployment
  machine has.
- ``compiler()``: the full TVM (relax, tirx, dlight, codegen). Fails with a clear
  message when the process already imported TVM runtime-only.
"""

from __future__ import annotations

import os
import sys
import types

from .errors import KilnError

TVM_VERSION_PINNED = "0.27.0.post1"


def runtime() -> types.SimpleNamespace:
    """Return the TVM runtime pieces the kiln runtime uses (no compiler)."""
    fresh = "tvm" not in sys.modules
    if fresh:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    # tvm_ffi imports torch eagerly when it is installed (seconds of start-up,
    # and the runtime must not depend on torch): hide it during the import.
    hide_torch = fresh and "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm  # noqa: PLC0415
        import tvm_ffi  # noqa: PLC0415
        from tvm import runtime as tvm_runtime  # noqa: PLC0415
        from tvm.runtime import vm as tvm_vm  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the install
        raise KilnError(f"the TVM runtime is not importable ({err}); install apache-tvm=={TVM_VERSION_PINNED}") from err
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return types.SimpleNamespace(
        tvm=tvm,
        ffi=tvm_ffi,
        runtime=tvm_runtime,
        vm=tvm_vm,
        version=tvm_version(),
        get_global_func=lambda name: tvm_ffi.get_global_func(name, allow_missing=True),
    )


def disco() -> types.SimpleNamespace:
    """TVM's disco runtime (worker processes and their message channels), for
    tensor-parallel sessions. Runtime-only TVM does not load the library that holds
    it (libtvm_runtime_extra.so): load it, then re-read disco's function table,
    which was filled when the functions were not there yet."""
    import ctypes  # noqa: PLC0415
    import importlib  # noqa: PLC0415

    rt = runtime()
    if rt.get_global_func("runtime.disco.SessionProcess") is None:
        lib = os.path.join(os.path.dirname(rt.tvm.base._LOADED_LIBS["tvm_runtime"]._name), "libtvm_runtime_extra.so")
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            raise KilnError(f"cannot load TVM's disco runtime ({lib}): {err}") from None
    api = importlib.import_module("tvm.runtime.disco._ffi_api")
    rt.ffi.init_ffi_api("runtime.disco", api.__name__)  # what its import did, now with the functions there
    session = importlib.import_module("tvm.runtime.disco.session")
    return types.SimpleNamespace(ProcessSession=session.ProcessSession, api=api)


def tvm_version() -> str:
    import tvm  # noqa: PLC0415

    return getattr(tvm, "__version__", "unknown")


def runtime_only_loaded() -> bool:
    """True when this process loaded TVM without libtvm_compiler.so."""
    base = sys.modules.get("tvm.base")
    return bool(base is not None and getattr(base, "_RUNTIME_ONLY", False))


def compiler() -> types.SimpleNamespace:
    """Return the full TVM compiler API used by frontends/, passes/ and compiler/.

    CUDA targets on a machine without a GPU driver need TVM's CUDA plugin made
    loadable before TVM is imported: the compiler does that first
    (compiler/cuda_stub.py prepare_cuda_compile)."""
    if runtime_only_loaded():
        raise KilnError(
            "TVM was imported runtime-only in this process (TVM_USE_RUNTIME_LIB=1); "
            "the compiler needs libtvm_compiler.so: run compilation in a separate process"
        )
    import tvm  # noqa: PLC0415
    from tvm import relax, te, tirx  # noqa: PLC0415
    from tvm.relax.frontend import nn  # noqa: PLC0415
    from tvm.relax.frontend.nn import op, spec  # noqa: PLC0415
    from tvm.relax.frontend.nn.llm import kv_cache as llm_kv_cache  # noqa: PLC0415
    from tvm.relax.frontend.nn.llm import position_embedding as llm_rope  # noqa: PLC0415
    from tvm.s_tir import dlight  # noqa: PLC0415
    from tvm.s_tir import schedule as s_schedule  # noqa: PLC0415
    from tvm.script import tirx as T  # noqa: PLC0415
    from tvm.support import nvcc  # noqa: PLC0415
    from tvm.target import Target  # noqa: PLC0415
    import tvm_ffi  # noqa: PLC0415
    from tvm_ffi import libinfo as ffi_libinfo  # noqa: PLC0415  (headers + library for kiln's C++ plugins)

    if runtime_only_loaded():
        raise KilnError("libtvm_compiler.so could not be loaded: the TVM compiler is unavailable in this install")
    return types.SimpleNamespace(
        tvm=tvm,
        relax=relax,
        tirx=tirx,
        te=te,
        T=T,
        nn=nn,
        op=op,
        spec=spec,
        kv_cache=llm_kv_cache,
        rope=llm_rope,
        dlight=dlight,
        schedule=s_schedule,
        Target=Target,
        nvcc=nvcc,
        ffi=tvm_ffi,
        ffi_libinfo=ffi_libinfo,
        version=tvm_version(),
    )


def onnx_importer() -> types.SimpleNamespace:
    """TVM's Relax ONNX importer (needs the full TVM and the `onnx` package):
    Importer (ONNXGraphImporter: `Importer(shape_dict, dtype_dict, keep_params_in_input=..,
    sanitize=..).from_onnx(graph, opset)`), from_onnx, and supported(op_type)."""
    t = compiler()
    from tvm.relax.frontend.onnx import onnx_frontend  # noqa: PLC0415

    convert_map = onnx_frontend._get_convert_map()  # noqa: SLF001 - the importer's own table of converters
    direct = {"Constant", "If"}  # handled inside the importer, not through the table
    return types.SimpleNamespace(
        tvm=t.tvm,
        relax=t.relax,
        Importer=onnx_frontend.ONNXGraphImporter,
        from_onnx=onnx_frontend.from_onnx,
        supported=lambda op: op in convert_map or op in direct,
    )
