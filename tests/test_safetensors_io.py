"""The safetensors reader against hand-crafted hostile files (THREATS 1-7)."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from kiln.errors import ModelFormatError
from kiln.frontends.safetensors_io import MAX_HEADER_BYTES, SafetensorsFile


def write(path, header, data: bytes = b"", *, length: int | None = None):
    """Write a safetensors file by hand; header is a dict or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def expect_error(path, *words):
    """Opening fails with a ModelFormatError that starts with the path and names `words`."""
    with pytest.raises(ModelFormatError) as info:
        SafetensorsFile(path).close()
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# --- happy paths ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_reads_back_files_written_by_safetensors(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((13, 72)).astype(dtype),
        "model.norm.weight": rng.standard_normal(72).astype(dtype),
        "scalar": np.array(3.5, dtype=dtype),
        "empty": np.zeros((0, 3), dtype=dtype),
    }
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "np"})
    with SafetensorsFile(path) as f:
        assert sorted(f.names) == sorted(tensors)
        assert f.metadata == {"format": "np"}
        for name, want in tensors.items():
            got = f.load(name)
            assert got.dtype == np.dtype(dtype)
            assert f.shape(name) == want.shape == got.shape
            assert f.dtype(name) == {np.float32: "F32", np.float16: "F16", ml_dtypes.bfloat16: "BF16"}[dtype]
            assert got.tobytes() == want.tobytes()
            assert got.flags.writeable and got.flags.owndata


def test_other_dtypes_are_readable(tmp_path):
    tensors = {
        "f64": np.linspace(-1, 1, 7),
        "i64": np.arange(-3, 4, dtype=np.int64),
        "i32": np.arange(5, dtype=np.int32).reshape(5, 1),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "u8": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([True, False, True]),
    }
    path = tmp_path / "mixed.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    with SafetensorsFile(path) as f:
        for name, want in tensors.items():
            got = f.load(name)
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want)


def test_bool_bytes_other_than_0_1_become_true(tmp_path):
    path = write(tmp_path / "b.safetensors", {"m": entry("BOOL", (3,), (0, 3))}, bytes([0, 1, 7]))
    with SafetensorsFile(path) as f:
        assert f.load("m").tolist() == [False, True, True]


def test_header_padding_and_unknown_name_and_close(tmp_path):
    hdr = json.dumps({"w": entry()}).encode() + b"   "
    path = write(tmp_path / "w.safetensors", hdr, np.array([1, 2], "<f4").tobytes())
    f = SafetensorsFile(path)
    assert f.load("w").tolist() == [1.0, 2.0]
    with pytest.raises(ModelFormatError, match="no tensor named 'nope'") as info:
        f.load("nope")
    assert str(info.value).startswith(str(path))
    f.close()
    with pytest.raises(ModelFormatError, match="closed"):
        f.load("w")


# --- 1: size and header length ---------------------------------------------------
def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, "0 bytes", "at least 8")


def test_file_under_8_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00")
    expect_error(path, "4 bytes", "header")


def test_header_length_larger_than_file(tmp_path):
    path = write(tmp_path / "h.safetensors", b"{}", length=1000)
    expect_error(path, "header length 1000", "larger than the file")


def test_header_over_100mb_is_refused_before_reading(tmp_path):
    path = write(tmp_path / "big.safetensors", b"{}", length=MAX_HEADER_BYTES + 1)
    expect_error(path, f"header length {MAX_HEADER_BYTES + 1}", "limit")
    path = write(tmp_path / "huge.safetensors", b"{}", length=2**64 - 1)
    expect_error(path, f"header length {2**64 - 1}")


def test_not_a_regular_file(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    expect_error(d, "not a regular file")


# --- 2: header encoding and JSON ---------------------------------------------------
def test_header_not_utf8(tmp_path):
    path = write(tmp_path / "u.safetensors", b'{"\xff\xfe": 1}')
    expect_error(path, "header", "UTF-8")


def test_header_not_json(tmp_path):
    path = write(tmp_path / "j.safetensors", b'{"w": {"dtype": "F32",')
    expect_error(path, "header", "not valid JSON")


def test_header_nan_is_not_json(tmp_path):
    path = write(tmp_path / "nan.safetensors", b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}')
    expect_error(path, "header", "not valid JSON")


@pytest.mark.parametrize("depth", [65, 100_000])
def test_header_deeply_nested(tmp_path, depth):
    raw = b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}"
    path = write(tmp_path / "deep.safetensors", raw)
    expect_error(path, "header", "nested", "64")


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    meta = {"note": "[" * 500 + '\\"{' * 100}
    path = write(tmp_path / "s.safetensors", {"__metadata__": meta})
    with SafetensorsFile(path) as f:
        assert f.metadata == meta and f.names == []


def test_header_top_level_not_object(tmp_path):
    path = write(tmp_path / "list.safetensors", b"[1, 2]")
    expect_error(path, "header top level", "object")


# --- 3: duplicates and field types ---------------------------------------------------
def test_duplicate_tensor_names(tmp_path):
    raw = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    path = write(tmp_path / "dup.safetensors", raw, bytes(8))
    expect_error(path, "duplicate tensor name 'w'")


def test_duplicate_field_in_entry(tmp_path):
    raw = b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}'
    path = write(tmp_path / "dupf.safetensors", raw, bytes(4))
    expect_error(path, "'w'", "duplicate field 'dtype'")


def test_metadata_must_be_str_to_str(tmp_path):
    path = write(tmp_path / "m.safetensors", {"__metadata__": {"format": 1}})
    expect_error(path, "__metadata__.format", "string")
    path = write(tmp_path / "m2.safetensors", {"__metadata__": ["x"]})
    expect_error(path, "__metadata__", "object")


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"shape": [2], "data_offsets": [0, 8]}, "missing field 'dtype'"),
        ({"dtype": "F32", "data_offsets": [0, 8]}, "missing field 'shape'"),
        ({"dtype": "F32", "shape": [2]}, "missing field 'data_offsets'"),
        ({"dtype": 5, "shape": [2], "data_offsets": [0, 8]}, "'dtype'"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "'shape'"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "'shape'"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "'shape'"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "'shape'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "'data_offsets'"),
        ([1, 2], "entry must be an object"),
    ],
)
def test_entry_field_types(tmp_path, bad, field):
    path = write(tmp_path / "t.safetensors", {"w": bad}, bytes(8))
    expect_error(path, "tensor 'w'", field)


def test_too_many_dims(tmp_path):
    path = write(tmp_path / "nd.safetensors", {"w": entry(shape=[1] * 40, offsets=(0, 4))}, bytes(4))
    expect_error(path, "tensor 'w'", "40 dimensions")


# --- 4: offsets ---------------------------------------------------------------------
def test_overlapping_offsets(tmp_path):
    hdr = {"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(4, 12))}
    path = write(tmp_path / "ov.safetensors", hdr, bytes(12))
    expect_error(path, "'a'", "'b'", "overlap")


def test_gap_between_tensors(tmp_path):
    hdr = {"a": entry(shape=(1,), offsets=(0, 4)), "b": entry(shape=(1,), offsets=(8, 12))}
    path = write(tmp_path / "gap.safetensors", hdr, bytes(12))
    expect_error(path, "'a'", "'b'", "gap")


def test_first_offset_not_zero(tmp_path):
    path = write(tmp_path / "f0.safetensors", {"a": entry(shape=(1,), offsets=(4, 8))}, bytes(8))
    expect_error(path, "tensor 'a'", "first data offset is 4")


def test_end_before_start(tmp_path):
    path = write(tmp_path / "eb.safetensors", {"a": entry(shape=(0,), offsets=(8, 4))}, bytes(8))
    expect_error(path, "tensor 'a'", "end before")


@pytest.mark.parametrize("offsets", [(2**64 - 8, 2**64), (0, 2**64 - 1), (2**64 + 8, 2**64 + 16)])
def test_offsets_near_2_64(tmp_path, offsets):
    path = write(tmp_path / "big.safetensors", {"a": entry(shape=(2,), offsets=offsets)}, bytes(8))
    expect_error(path, "tensor 'a'", "data_offsets")


def test_trailing_bytes_after_last_tensor(tmp_path):
    path = write(tmp_path / "tail.safetensors", {"a": entry()}, bytes(8) + b"junk")
    expect_error(path, "4 trailing bytes")


# --- 5: shapes ----------------------------------------------------------------------
def test_shape_product_overflows(tmp_path):
    hdr = {"a": entry(shape=(2**32, 2**32, 2**32), offsets=(0, 8))}
    path = write(tmp_path / "of.safetensors", hdr, bytes(8))
    expect_error(path, "tensor 'a'", "overflows")


def test_shape_product_wraps_to_small_in_64_bits(tmp_path):
    # 2^32 * 2^32 * 2 wraps to 0 in uint64 arithmetic; Python ints must catch it.
    hdr = {"a": entry(dtype="U8", shape=(2**31, 2**31, 4), offsets=(0, 0))}
    path = write(tmp_path / "wrap.safetensors", hdr)
    expect_error(path, "tensor 'a'", "overflows")


def test_shape_times_itemsize_not_span(tmp_path):
    path = write(tmp_path / "sp.safetensors", {"a": entry(dtype="F16", shape=(3,), offsets=(0, 8))}, bytes(8))
    expect_error(path, "tensor 'a'", "6 bytes", "span 8")


# --- 6: dtype -----------------------------------------------------------------------
def test_unsupported_dtype(tmp_path):
    path = write(tmp_path / "f8.safetensors", {"a": entry(dtype="F8_E8M0", shape=(8,), offsets=(0, 8))}, bytes(8))
    expect_error(path, "tensor a has dtype F8_E8M0, supported: F32, F16, BF16")


# --- 7: truncation ------------------------------------------------------------------
def test_truncated_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    safetensors.numpy.save_file({"a": np.ones(4, np.float32), "b": np.ones(16, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    expect_error(path, "tensor 'b'", "truncated")


def test_file_shrinking_after_open_is_an_error_on_load(tmp_path):
    path = tmp_path / "shrink.safetensors"
    safetensors.numpy.save_file({"a": np.ones(64, np.float32)}, str(path))
    f = SafetensorsFile(path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ModelFormatError, match="truncated") as info:
        f.load("a")
    assert str(info.value).startswith(str(path)) and "'a'" in str(info.value)
    f.close()


def test_escaped_backslash_ends_string_before_deep_nesting(tmp_path):
    # "x\\" ends at its second quote, so the 70 brackets after it are real nesting.
    raw = b'{"__metadata__": {"a": "x\\\\"}, "b": ' + b"[" * 70 + b"]" * 70 + b"}"
    path = write(tmp_path / "esc.safetensors", raw)
    expect_error(path, "header", "nested 71 levels")
