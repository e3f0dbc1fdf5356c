"""GGUF frontend: the real SmolLM2 file, tiny files written with gguf.GGUFWriter,
and hostile headers crafted byte by byte (THREATS 15)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers.tiny_gguf import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, llama_permute, tiny_vocab, write_tiny
from tokenizers import Tokenizer

from kiln.errors import ModelFormatError, UnsupportedModelError
from kiln.frontends.config import ModelConfig
from kiln.frontends.gguf_header import read_gguf_header
from kiln.frontends.gguf_names import unpermute_qk
from kiln.frontends.gguf_reader import open_gguf
from kiln.frontends.models import family_for
from kiln.frontends.readers import open_checkpoint


# --- the real model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """The bundled model (conftest: KILN_SMOLLM2_GGUF, local caches, or fetched with KILN_FETCH_MODELS=1)."""
    return open_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_params(smollm2):
    """Every kiln param of the real model, dequantized once per session (~2 s)."""
    config = ModelConfig.from_dict(smollm2.config, smollm2.source)
    cls = family_for(config.architecture)
    thunks = cls.convert_hf(config, smollm2.tensor_names, smollm2.load, smollm2.source)
    return cls, config, {k: f() for k, f in thunks.items()}


def test_real_config(smollm2):
    c = ModelConfig.from_dict(smollm2.config, smollm2.source)
    assert (c.architecture, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == ("LlamaForCausalLM", 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.max_position_embeddings, c.rms_norm_eps, c.rope_theta, c.rope_scaling) == (8192, 1e-5, 100000.0, None)
    assert c.tie_word_embeddings and (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert smollm2.format == "gguf" and smollm2.config["torch_dtype"] == "float32"


def test_real_tensors_map(smollm2):
    names = smollm2.tensor_names
    assert len(names) == 272 and len(set(names)) == 272
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert all(n.startswith("model.") for n in names)
    dtypes = list(smollm2.tensor_dtypes.values())
    assert (dtypes.count("Q4_1"), dtypes.count("F32"), dtypes.count("Q8_0")) == (210, 61, 1)
    assert smollm2.tensor_dtypes["model.embed_tokens.weight"] == "Q8_0"
    assert smollm2.tensor_dtypes["model.layers.3.post_attention_layernorm.weight"] == "F32"


def test_real_convert_shapes(smollm2, smollm2_params):
    cls, config, params = smollm2_params
    assert {k: v.shape for k, v in params.items()} == cls.param_shapes(config)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in params.values())
    qkv = params["layers.0.attn.qkv_proj.weight"]
    parts = [smollm2.load(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    np.testing.assert_array_equal(qkv, np.concatenate(parts))
    # Norm weights are F32 in the file: loaded exactly, not round-tripped.
    assert params["norm.weight"].std() > 0


def test_real_tokenizer(smollm2):
    tf = smollm2.tokenizer
    assert (tf.bos_token, tf.eos_token, tf.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert "<|im_start|>" in tf.chat_template
    tok = Tokenizer.from_str(tf.tokenizer_json)
    enc = tok.encode("Hello, world! 12345 <|im_start|>user")
    assert enc.ids.count(1) == 1 and "<|im_start|>" in enc.tokens  # the control token stays whole
    assert [t for t in enc.tokens if any(ch.isdigit() for ch in t)] == list("12345")  # one digit per token
    assert enc.tokens[:4] == ["Hello", ",", "Ġworld", "!"]
    text = "naïve café — 日本語 🎉👍🏽\n\ttabs  and  spaces"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.get_vocab_size() == 49152


# --- tiny files written with gguf.GGUFWriter (helpers.tiny_gguf) -------------------
@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny model ü.gguf"  # spaces and unicode in the path must work
    expected = write_tiny(path, dtypes={"model.layers.0.mlp.up_proj.weight": Q.F16, "model.layers.0.mlp.gate_proj.weight": Q.BF16,
                                        "model.layers.1.mlp.up_proj.weight": Q.Q8_0})  # fmt: skip
    return path, expected


def test_tiny_loads_exactly_and_unpermutes(tiny):
    path, expected = tiny
    ck = open_checkpoint(path)
    assert ck.format == "gguf" and ck.source == str(path)
    assert sorted(ck.tensor_names) == sorted(expected)
    for name, want in expected.items():
        got = ck.load(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # F32/F16/BF16 exact; q/k permutation undone
    assert ck.tensor_dtypes["model.layers.0.mlp.gate_proj.weight"] == "BF16"
    assert ck.tensor_dtypes["model.layers.1.mlp.up_proj.weight"] == "Q8_0"
    with pytest.raises(ModelFormatError, match="no tensor"):
        ck.load("model.layers.9.mlp.up_proj.weight")


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for n in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(llama_permute(w, n), n), w)
    b = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_permute(b, 3), 3), b)


def test_tiny_config_and_convert(tiny):
    path, expected = tiny
    ck = open_gguf(path)
    c = ModelConfig.from_dict(ck.config, ck.source)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (HIDDEN, HEADS, KV_HEADS, HEAD_DIM)
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings, c.max_position_embeddings) == (len(tiny_vocab()[0]), 500000.0, False, 256)
    cls = family_for(c.architecture)
    params = {k: f() for k, f in cls.convert_hf(c, ck.tensor_names, ck.load, ck.source).items()}
    assert {k: v.shape for k, v in params.items()} == cls.param_shapes(c)
    np.testing.assert_array_equal(params["layers.1.attn.qkv_proj.weight"][: HEADS * HEAD_DIM], expected["model.layers.1.self_attn.q_proj.weight"])


def test_tiny_tokenizer(tiny):
    path, _ = tiny
    tf = open_gguf(path).tokenizer
    assert (tf.bos_token, tf.eos_token, tf.add_bos) == ("<|im_start|>", "<|im_end|>", True)
    assert tf.chat_template.startswith("{% for m in messages %}")
    tok = Tokenizer.from_str(tf.tokenizer_json)
    tokens, _ = tiny_vocab()
    enc = tok.encode("hello world 42<|im_start|><think>")
    assert enc.tokens[:3] == ["hell", "o", "Ġw"]
    assert enc.ids[-2:] == [tokens.index("<|im_start|>"), tokens.index("<think>")]
    assert "4" in enc.tokens and "2" in enc.tokens  # digits split one per token
    text = "¿Qué tal? 🎉 日本"
    assert tok.decode(tok.encode(text).ids) == text
    # control tokens are special (skipped on request), user-defined ones are kept
    assert tok.decode(enc.ids, skip_special_tokens=True).endswith("42<think>")


def test_header_matches_gguf_reader(tiny):
    """Our struct parser agrees with gguf.GGUFReader on a valid file."""
    path, _ = tiny
    ours = read_gguf_header(path)
    ref = gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.offset, a.nbytes, a.qtype, a.shape) == (b.data_offset, b.n_bytes, b.tensor_type, tuple(reversed(b.shape.tolist())))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        got = ours.metadata[key]
        want = field.contents()
        assert (got.tolist() if isinstance(got, np.ndarray) else got) == want, key


def test_qwen2_is_not_unpermuted(tmp_path):
    path = tmp_path / "qwen2.gguf"
    expected = write_tiny(path, arch="qwen2")
    ck = open_gguf(path)
    assert ck.config["architectures"] == ["Qwen2ForCausalLM"]
    name = "model.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(ck.load(name), expected[name])


def test_spm_tokenizer_is_left_out(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny(path, tokenizer_model="llama")
    ck = open_gguf(path)
    assert ck.tokenizer is None and len(ck.tensor_names) == 3 + 9 * LAYERS


def test_llama3_rope_freqs(tmp_path):
    theta, factor = 500000.0, 8.0
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    wavelen = 2 * math.pi / freqs
    smooth = (8192 / wavelen - 1) / 3
    factors = np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth)))
    path = tmp_path / "llama3.gguf"
    write_tiny(path, rope_freqs=factors)
    ck = open_gguf(path)
    assert "rope_freqs.weight" not in ck.tensor_names and ck.config["gguf_skipped_tensors"] == ["rope_freqs.weight"]
    assert ModelConfig.from_dict(ck.config).rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    bad = tmp_path / "odd_rope.gguf"
    write_tiny(bad, rope_freqs=np.linspace(1, 3, HEAD_DIM // 2))
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        open_gguf(bad)


def test_unknown_architecture_and_tensor(tmp_path):
    path = tmp_path / "gemma.gguf"
    write_tiny(path, arch="gemma")
    with pytest.raises(UnsupportedModelError, match=r"'gemma' is not supported; supported: deepseek2, gemma3, llama"):
        open_gguf(path)
    path = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_weird.weight", np.ones(4, np.float32))
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match=r"unknown tensors blk\.0\.attn_weird\.weight"):
        open_gguf(path)


U32, U64, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.UINT64, gguf.GGUFValueType.FLOAT32
HOSTILE_CONFIG = {
    "kv heads not a divisor": ({"llama.attention.head_count_kv": (3, U32)}, "not a multiple of num_key_value_heads"),
    "context 2^40": ({"llama.context_length": (1 << 40, U64)}, "max_position_embeddings"),
    "NaN eps": ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), F32)}, "rms_norm_eps"),
    "zero layers": ({"llama.block_count": (0, U32)}, "num_hidden_layers"),
    "bos outside vocab": ({"tokenizer.ggml.bos_token_id": (10**6, U32)}, "bos_token_id"),
    "eps as string": ({"llama.attention.layer_norm_rms_epsilon": ("1e-5", gguf.GGUFValueType.STRING)}, "expected float"),
    "merge of unknown tokens": ({"tokenizer.ggml.merges": (["zz qq"], gguf.GGUFValueType.ARRAY)}, "inconsistent"),
    "merge without a space": ({"tokenizer.ggml.merges": (["hello"], gguf.GGUFValueType.ARRAY)}, "merges[0]"),
    "yarn": ({"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING), "llama.rope.scaling.factor": (4.0, F32)}, "yarn"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIG))
def test_hostile_config_values(case, tmp_path):
    extra, match = HOSTILE_CONFIG[case]
    path = tmp_path / "hostile.gguf"
    write_tiny(path, extra=extra)
    with pytest.raises((ModelFormatError, UnsupportedModelError)) as e:
        open_gguf(path)
    assert str(e.value).startswith(f"{path}: ") and match in str(e.value), str(e.value)


def test_truncated_by_one_byte(tiny, tmp_path):
    path, _ = tiny
    last = read_gguf_header(path).tensors[-1]
    data = path.read_bytes()
    ok = tmp_path / "no_final_padding.gguf"
    ok.write_bytes(data[: last.offset + last.nbytes])  # final padding is optional
    open_gguf(ok)
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: last.offset + last.nbytes - 1])
    _assert_rejected(short, f"tensor {last.name} needs bytes")


def test_truncated_after_open_is_caught_on_load(tiny):
    path, _ = tiny
    ck = open_gguf(path)
    first = read_gguf_header(path).tensors[0]
    with open(path, "r+b") as f:
        f.truncate(first.offset + 3)
    with pytest.raises(ModelFormatError, match="file ended after 3 of"):
        ck.load(ck.tensor_names[0])


# --- hostile headers, byte by byte -----------------------------------------------------
def _s(v) -> bytes:
    b = v.encode() if isinstance(v, str) else v
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name, dims, type_id=0, offset=0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", type_id, offset)


ARCH = _kv("general.architecture", 8, _s("llama"))
EMBD = _tensor("token_embd.weight", [32, 4])


def _gguf(kvs=(ARCH,), tensors=(EMBD,), data=bytes(512), *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None, align=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % align) + data


def _assert_rejected(path: Path, match: str):
    with pytest.raises(ModelFormatError) as e:
        open_gguf(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert match in msg, msg


U64_MAX = 2**64 - 1
HOSTILE = {
    "empty": (b"", "too small"),
    "tiny": (b"GGUF\x03\x00", "too small"),
    "bad magic": (_gguf(magic=b"GGML"), "not a GGUF file"),
    "version 99": (_gguf(version=99), "version 99 is not supported"),
    "version 1": (_gguf(version=1), "version 1 is not supported"),
    "big endian": (_gguf(version=3 << 24), "big-endian"),
    "tensor count 2^64-1": (_gguf(n_tensors=U64_MAX), "tensors (limit"),
    "kv count 2^64-1": (_gguf(n_kv=U64_MAX), "metadata keys (limit"),
    "kv count past the end": (_gguf(n_kv=1000, tensors=[], data=b"", align=1), "truncated"),
    "key length 2^64-1": (_gguf(kvs=[struct.pack("<Q", U64_MAX) + b"general.architecture"]), "metadata key #0 claims"),
    "string value 2 MB": (_gguf(kvs=[ARCH, _s("general.name") + struct.pack("<IQ", 8, 2 << 20) + b"x" * 64]), "value of general.name claims"),
    "string past the end": (_gguf(kvs=[ARCH, _s("general.name") + struct.pack("<IQ", 8, 1000)], tensors=[], data=b""), "truncated"),
    "array 2^62 elements": (_gguf(kvs=[ARCH, _kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 2**62))]), "elements (limit"),
    "string array 2^62": (_gguf(kvs=[ARCH, _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**62))]), "strings (limit"),
    "string array past the end": (_gguf(kvs=[ARCH, _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 100_000))]), "truncated"),
    "nested array": (_gguf(kvs=[ARCH, _kv("x", 9, struct.pack("<IQ", 9, 1))]), "nested arrays"),
    "unknown value type": (_gguf(kvs=[ARCH, _kv("x", 77, b"")]), "unknown value type id 77"),
    "bool 2": (_gguf(kvs=[ARCH, _kv("x", 7, b"\x02")]), "expected 0 or 1"),
    "invalid utf-8 key": (_gguf(kvs=[ARCH, _kv(b"\xff\xfe", 4, bytes(4))]), "not valid UTF-8"),
    "duplicate key": (_gguf(kvs=[ARCH, ARCH]), "duplicate metadata key general.architecture"),
    "5 dims": (_gguf(tensors=[_tensor("token_embd.weight", [2, 2, 2, 2, 2])]), "has 5 dimensions"),
    "0 dims": (_gguf(tensors=[_tensor("token_embd.weight", [])]), "has 0 dimensions"),
    "dims count 2^32-1": (_gguf(tensors=[_s("token_embd.weight") + struct.pack("<I", 2**32 - 1)]), "dimensions"),
    "zero dim": (_gguf(tensors=[_tensor("token_embd.weight", [32, 0])]), "each dimension must be >= 1"),
    "dims overflow": (_gguf(tensors=[_tensor("token_embd.weight", [U64_MAX, U64_MAX])]), "at most"),
    "unknown type id": (_gguf(tensors=[_tensor("token_embd.weight", [32, 4], type_id=99)]), "unknown type id 99"),
    "row not a block multiple": (_gguf(tensors=[_tensor("token_embd.weight", [30, 4], type_id=8)]), "not a multiple of the Q8_0 block size 32"),
    "offset 2^64-1": (_gguf(tensors=[_tensor("token_embd.weight", [32, 4], offset=U64_MAX)]), "expected 0"),
    "overlapping": (_gguf(tensors=[EMBD, _tensor("output_norm.weight", [32], offset=0)]), "has data offset 0, expected 512"),
    "gap": (_gguf(tensors=[EMBD, _tensor("output_norm.weight", [32], offset=1024)], data=bytes(2048)), "expected 512"),
    "duplicate tensor": (_gguf(tensors=[EMBD, _tensor("token_embd.weight", [32, 4], offset=512)], data=bytes(1024)), "duplicate tensor"),
    "data one byte short": (_gguf(data=bytes(511)), "needs bytes"),
    "trailing bytes": (_gguf(data=bytes(600)), "unexpected bytes after"),
    "alignment 3": (_gguf(kvs=[ARCH, _kv("general.alignment", 4, struct.pack("<I", 3))]), "not a power of two"),
    "alignment 0": (_gguf(kvs=[ARCH, _kv("general.alignment", 4, struct.pack("<I", 0))]), "not a power of two"),
    "alignment u64": (_gguf(kvs=[ARCH, _kv("general.alignment", 10, struct.pack("<Q", 64))]), "expected uint32"),
    "arch not a string": (_gguf(kvs=[_kv("general.architecture", 4, bytes(4))]), "expected str"),
    "no arch": (_gguf(kvs=[]), "missing metadata key general.architecture"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header(case, tmp_path):
    data, match = HOSTILE[case]
    path = tmp_path / f"{case.replace(' ', '_')}.gguf"
    path.write_bytes(data)
    _assert_rejected(path, match)


def test_valid_raw_file_passes_header_checks(tmp_path):
    """The hostile cases above are one change away from this file, which parses."""
    path = tmp_path / "raw.gguf"
    path.write_bytes(_gguf())
    h = read_gguf_header(path)
    assert [(t.name, t.shape, t.nbytes) for t in h.tensors] == [("token_embd.weight", (4, 32), 512)]
    assert gguf.GGUFReader(path).tensors[0].data_offset == h.tensors[0].offset
    _assert_rejected(path, "missing metadata key llama.")  # header fine; the model config is not
