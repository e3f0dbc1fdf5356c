"""16-bit float K/V in kiln's cache, for CPU targets (activations fp32, which is
what TVM's cache would hold): stored as they are with a unit scale (the 4
bytes per row of scale unused, kept so one layout and one set of kernels serve
every format). Half the KV bytes of fp32, no rounding beyond the dtype's."""

from __future__ import annotations

from ..kv import KVFormat

FORMATS = (KVFormat("float16", "float16", 0.0), KVFormat("bfloat16", "bfloat16", 0.0))
