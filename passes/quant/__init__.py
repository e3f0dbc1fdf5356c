"""One home for quantization: every weight format (--quant, --keep) and KV-cache
format (--kv-dtype) is one object (formats/*.py) owning its packing codec, its
TE dequantize expression, its CUDA kernel code kind, the codes random weights
must avoid and its bytes per element; codec.py holds the bit-level pieces
they share (the nibble packer, the e4m3 code); plan.py decides which matrix
gets which format.

A layer below the models and the kernels (tests/test_layers.py): nothing here
imports TVM at module import, and the numpy half serves the compiler, the
tests and the quality tools alike.
"""

from .kv import KVFormat
from .plan import BODY_ROLES, ROLES, QuantPlan, expand_params, role_of
from .registry import FLOAT_KV_FORMATS, KV_DTYPES, KV_FORMATS, WEIGHT_FORMATS, kv_format
from .weights import WeightFormat

__all__ = ["BODY_ROLES", "FLOAT_KV_FORMATS", "KVFormat", "KV_DTYPES", "KV_FORMATS", "QuantPlan", "ROLES",
           "WEIGHT_FORMATS", "WeightFormat", "expand_params", "kv_format", "role_of"]
