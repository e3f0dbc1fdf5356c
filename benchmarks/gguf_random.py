"""A GGUF of a real model's shape and tokenizer with random float weights, for
running llama.cpp beside kiln on a machine the real weights cannot reach (the
device machine takes 64 MiB per call; SmolLM2 in F32 is 540 MB).

Two steps:
    # here (needs the gguf package): metadata + tensor infos, no data (a few MB)
    python benchmarks/gguf_random.py head SmolLM2.Q4_1.gguf smol-f32.head --type f32
    # there (numpy only): append N(0, 0.02) data (norm weights 1), aligned as the head says
    python benchmarks/gguf_random.py fill smol-f32.head smol-f32.gguf

kiln's `--no-weights` artifacts run on random weights too (runtime/session.py
random_weights_for): the two peers then read the same number of bytes per
token; the values differ, which does not change speed.
"""

from __future__ import annotations

import argparse
import json
import struct

import numpy as np

SIDE = ".tensors.json"  # beside the head: [name, nbytes, dtype, is_norm] per tensor, in file order


def head(src: str, out: str, kind: str) -> None:
    import gguf  # noqa: PLC0415

    r = gguf.GGUFReader(src)
    arch = r.get_field("general.architecture").contents()
    w = gguf.GGUFWriter(out, arch)
    w.kv_data[0].pop("general.architecture", None)  # re-added from the source below, once
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}[kind]
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.file_type":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    side = []
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF stores ne[] fastest-first
        # 1-D tensors (norms) stay F32 as llama.cpp's converter keeps them
        tt = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else qtype
        dt = np.float32 if tt == gguf.GGMLQuantizationType.F32 else np.float16
        nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
        w.add_tensor_info(t.name, shape, np.dtype(dt), nbytes, raw_dtype=tt)
        side.append([t.name, nbytes, np.dtype(dt).name, len(shape) == 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(out + SIDE, "w") as f:
        json.dump({"alignment": w.data_alignment, "tensors": side}, f)


def fill(head_path: str, out: str) -> None:
    with open(head_path + SIDE) as f:
        side = json.load(f)
    align = side["alignment"]
    block = (np.random.default_rng(0).standard_normal(1 << 22) * 0.02).astype(np.float32)
    with open(head_path, "rb") as src, open(out, "wb") as dst:
        data = src.read()
        dst.write(data)
        pos = len(data)
        for _name, nbytes, dtype, is_norm in side["tensors"]:
            pad = -pos % align
            dst.write(b"\0" * pad)
            pos += pad
            n = nbytes // np.dtype(dtype).itemsize
            arr = np.ones(n, np.float32) if is_norm else np.resize(block, n)
            dst.write(arr.astype(dtype).tobytes())
            pos += nbytes
    assert struct.unpack("<I", data[:4])[0] == 0x46554747  # "GGUF"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("head")
    h.add_argument("src")
    h.add_argument("out")
    h.add_argument("--type", choices=["f32", "f16"], default="f32")
    f = sub.add_parser("fill")
    f.add_argument("head")
    f.add_argument("out")
    a = ap.parse_args()
    head(a.src, a.out, a.type) if a.cmd == "head" else fill(a.head, a.out)


if __name__ == "__main__":
    main()
