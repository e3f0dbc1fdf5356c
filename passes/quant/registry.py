"""Every format kiln has, found in passes/quant/formats/: adding one (Q4_K
import, int4 KV, nvfp4) is one new file there plus its tests; nothing here
changes. Weight formats are listed in their `rank` order."""

from __future__ import annotations

import importlib
import pkgutil

from ...errors import CompileError
from . import formats as _formats_pkg
from .kv import KVFormat
from .weights import WeightFormat


def discover(package=_formats_pkg) -> tuple[dict[str, WeightFormat], dict[str, KVFormat]]:
    """(weight formats by name in rank order, KV formats by name) defined by the
    `FORMATS` tuples of the modules in `package`."""
    weights: dict[str, WeightFormat] = {}
    kv: dict[str, KVFormat] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for fmt in getattr(module, "FORMATS", ()):
            table = weights if isinstance(fmt, WeightFormat) else kv if isinstance(fmt, KVFormat) else None
            if table is None or fmt.name in table:
                raise TypeError(f"{module.__name__}: {fmt!r} is not a new WeightFormat or KVFormat")
            table[fmt.name] = fmt
    return dict(sorted(weights.items(), key=lambda kv_: (kv_[1].rank, kv_[0]))), kv


WEIGHT_FORMATS, _KV = discover()
KV_FORMATS = {n: f for n, f in _KV.items() if f.scaled}  # quantized caches (any target with kernels for them)
FLOAT_KV_FORMATS = {n: f for n, f in _KV.items() if not f.scaled}  # 16-bit K/V in kiln's cache (CPU targets)
KV_DTYPES = ("float32", *FLOAT_KV_FORMATS, *KV_FORMATS)


def kv_format(name: str | None, activations: str = "float32") -> KVFormat | None:
    """The kiln-cache format for --kv-dtype NAME when activations are in
    `activations`; None when TVM's cache holds it (the activations' own dtype)."""
    if name is None or name == activations:
        return None
    if name in KV_FORMATS:
        return KV_FORMATS[name]
    if name in FLOAT_KV_FORMATS and activations == "float32":
        return FLOAT_KV_FORMATS[name]
    if name in KV_DTYPES:
        raise CompileError(f"--kv-dtype {name}: a float KV cache has the activations' dtype ({activations}) here; "
                           f"quantized: {' or '.join(KV_FORMATS)} (16-bit float caches are for CPU targets)")
    raise CompileError(f"--kv-dtype {name!r} is not supported; supported: {', '.join(KV_DTYPES)}")
