"""passes/quant: one object per format, one codec for the bits they share,
and a registry that a new format joins by being one new file (issue 11 item 3)."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from kiln.passes.quant import FLOAT_KV_FORMATS, KV_DTYPES, KV_FORMATS, WEIGHT_FORMATS, QuantPlan, WeightFormat
from kiln.passes.quant.codec import FP8_NAN_CODES, fp8_decode, fp8_encode, pack_nibbles, unpack_nibbles
from kiln.passes.quant.registry import discover

RNG = np.random.default_rng(7)


def test_registry_lists_every_format_in_rank_order():
    assert list(WEIGHT_FORMATS) == ["q8", "q4g32", "q4k", "q4g128", "fp8"]
    assert set(KV_FORMATS) == {"int8", "fp8"} and set(FLOAT_KV_FORMATS) == {"float16", "bfloat16"}
    assert KV_DTYPES[0] == "float32" and set(KV_DTYPES) == {"float32", "float16", "bfloat16", "int8", "fp8"}


def test_nibble_packer_round_trips_and_keeps_its_layout():
    codes = RNG.integers(0, 16, (3, 64)).astype(np.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == np.uint32 and packed.shape == (3, 8)
    assert np.array_equal(unpack_nibbles(packed), codes)
    # nibble j of word w holds element 8w + j (the kernels' layout)
    assert int(packed[1, 2]) & 0xF == codes[1, 16] and (int(packed[1, 2]) >> 28) & 0xF == codes[1, 23]


def test_fp8_codec_never_writes_nan_codes():
    y = np.concatenate([np.clip(RNG.standard_normal(4096) * 100, -448, 448), [448.0, -448.0, 0.0, 1e-9]]).astype(np.float32)
    codes = fp8_encode(y)
    assert not np.isin(codes, FP8_NAN_CODES).any()
    assert np.isnan(fp8_decode(np.array(FP8_NAN_CODES, np.uint8))).sum() == 0  # decoded as the integer rule says
    back, normal = fp8_decode(codes), np.abs(y) >= 2**-6
    assert np.max(np.abs(back - y)[normal] / np.abs(y[normal])) <= 2**-4 + 1e-6  # 3 mantissa bits, round to nearest
    assert not back[~normal].any()  # below the smallest normal: flushed to zero


@pytest.mark.parametrize(("name", "k", "bits"), [("q8", 4096, 8.5), ("q4g32", 4096, 5.0), ("q4g128", 4096, 4.25),
                                                 ("fp8", 4096, 8 + 32 / 4096), ("q4g128", 576, 4.5),
                                                 ("q4k", 4096, 4.625), ("q4k", 576, 4 + 0.5 + 32 / 192)])
def test_bits_per_weight(name, k, bits):
    assert WEIGHT_FORMATS[name].bits_per_weight(k) == pytest.approx(bits)


@pytest.mark.parametrize("name", list(WEIGHT_FORMATS))
def test_every_format_packs_what_it_declares(name):
    fmt = WEIGHT_FORMATS[name]
    w = (RNG.standard_normal((16, 256)) * 0.05).astype(np.float32)
    parts = fmt.quantize(w)
    assert {k: (v.shape, str(v.dtype)) for k, v in parts.items()} == fmt.parts(w.shape)
    back = fmt.dequantize(parts, w.shape)
    assert back.shape == w.shape and np.abs(back - w).max() < 0.2 * np.abs(w).max()
    for bad in fmt.invalid_codes:
        assert not (parts["q"].view(np.uint8) == bad).any()


def test_a_new_format_is_one_new_file(tmp_path, monkeypatch):
    """A package holding only a new file is enough for the registry to list it."""
    pkg = tmp_path / "myformats"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "q2.py").write_text(
        "from dataclasses import dataclass\n"
        "from kiln.passes.quant.weights import WeightFormat\n"
        "@dataclass(frozen=True)\n"
        "class Q2(WeightFormat):\n"
        "    def parts(self, shape):\n"
        "        return {'q': ((shape[0], shape[1] // 16), 'uint32'), 's': ((shape[0], shape[1] // 32), 'float16')}\n"
        "FORMATS = (Q2('q2', bits=2, group=32, rank=9),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weights, kv = discover(importlib.import_module("myformats"))
    assert list(weights) == ["q2"] and kv == {}
    assert isinstance(weights["q2"], WeightFormat) and weights["q2"].bits_per_weight(64) == pytest.approx(2.5)
    sys.modules.pop("myformats.q2", None)
    sys.modules.pop("myformats", None)


def test_a_duplicate_format_name_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "dupformats"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in ("a.py", "b.py"):
        (pkg / f).write_text("from kiln.passes.quant.formats.q8 import FORMATS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="not a new"):
        discover(importlib.import_module("dupformats"))


def test_random_weights_avoid_the_codes_a_format_never_writes():
    from kiln.runtime.session import random_weights_for  # noqa: PLC0415

    spec = {"name": "w.q", "shape": [1 << 16], "dtype": "uint8", "quant": "fp8", "invalid_codes": list(FP8_NAN_CODES)}
    (_, arr), = random_weights_for([spec])
    assert arr.size == 1 << 16 and not np.isin(arr, FP8_NAN_CODES).any()
    (_, plain), = random_weights_for([{**spec, "invalid_codes": []}])
    assert np.isin(plain, FP8_NAN_CODES).any()  # the guard is what removes them


def test_plan_lists_the_registry_in_its_errors():
    with pytest.raises(Exception, match="supported: none, q8, q4g32, q4k, q4g128, fp8, gguf"):
        QuantPlan.parse("q3")


def test_random_weights_made_on_a_device_equal_the_host_ones():
    """random_weights_on (GPUs: tiled by device copies, nothing the size of the model on the
    host) writes exactly random_weights_for's bytes, for float, 16-bit, code and norm params of
    sizes that are no multiple of the source blocks."""
    from kiln.runtime.session import random_weights_for, random_weights_on  # noqa: PLC0415
    from kiln.tvm_compat import runtime  # noqa: PLC0415

    rt = runtime()
    params = [{"name": "l.attn_norm.weight", "shape": [72], "dtype": "float32"},
              {"name": "w", "shape": [3000, 2001], "dtype": "bfloat16"},
              {"name": "x.q", "shape": [5000, 1001], "dtype": "uint8", "invalid_codes": [127, 255]},
              {"name": "b", "shape": [77], "dtype": "float16"}]
    for (spec, raw), t in zip(random_weights_for(params), random_weights_on(rt, rt.tvm.cpu(0), params)):
        assert np.array_equal(t._create_view((raw.size,), "uint8").numpy(), raw), spec["name"]
