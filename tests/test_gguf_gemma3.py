"""GGUF pieces Gemma 3 needs, checked without the real model: the K-quant blocks
kiln dequantizes (Q4_K, Q6_K) against float64 twins written from llama.cpp's
block layouts, and a tiny gemma3 GGUF (written as llama.cpp's convert writes
one: its norm names, +1 on every norm) read back as the HF checkpoint it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from helpers.tiny_gguf import write_hf_as_gguf

from kiln.frontends.config import ModelConfig
from kiln.frontends.gguf_blocks import dequantize
from kiln.frontends.gguf_header import GGUFTensorInfo

# max |kiln - twin| / max |twin|: gguf dequantizes in float32 (as llama.cpp does), the twins in float64
DEQUANT_RTOL = {"float32": 1e-6}


def _scale_min_k4(j: int, s: np.ndarray):
    """llama.cpp's get_scale_min_k4: sub-block j's 6-bit scale and min from the 12 packed bytes."""
    s = s.astype(np.int64)
    if j < 4:
        return s[..., j] & 63, s[..., j + 4] & 63
    return (s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4), (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)


def q4_k_twin(b: np.ndarray) -> np.ndarray:
    """Q4_K blocks [n, 144] (d, dmin fp16; 12 scale bytes; 128 bytes of nibbles) -> [n, 256] float64."""
    d = b[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64)
    dmin = b[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64)
    sc, qs = b[:, 4:16], b[:, 16:144].astype(np.int64)
    y = np.empty((b.shape[0], 256))
    for chunk in range(4):  # 64 weights: 32 low nibbles (sub-block 2c), 32 high (2c + 1)
        q = qs[:, 32 * chunk:32 * chunk + 32]
        for half, codes in enumerate((q & 0xF, q >> 4)):
            s, m = _scale_min_k4(2 * chunk + half, sc)
            y[:, 64 * chunk + 32 * half:64 * chunk + 32 * half + 32] = (d * s)[:, None] * codes - (dmin * m)[:, None]
    return y


def q6_k_twin(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks [n, 210] (128 bytes low nibbles, 64 bytes high bit pairs, 16 int8 scales, d fp16) -> [n, 256]."""
    ql, qh = b[:, 0:128].astype(np.int64), b[:, 128:192].astype(np.int64)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float64)
    d = b[:, 208:210].copy().view(np.float16)[:, 0].astype(np.float64)
    y = np.empty((b.shape[0], 256))
    for h in range(2):  # two halves of 128
        lo, hi, s = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32], sc[:, 8 * h:8 * h + 8]
        for l in range(32):
            i = l // 16
            q = [(lo[:, l] & 0xF) | ((hi[:, l] & 3) << 4), (lo[:, l + 32] & 0xF) | (((hi[:, l] >> 2) & 3) << 4),
                 (lo[:, l] >> 4) | (((hi[:, l] >> 4) & 3) << 4), (lo[:, l + 32] >> 4) | (((hi[:, l] >> 6) & 3) << 4)]
            for k in range(4):
                y[:, 128 * h + l + 32 * k] = d * s[:, i + 2 * k] * (q[k] - 32)
    return y


def _random_blocks(qtype, n: int, rng) -> np.ndarray:
    """n random blocks with finite fp16 super-block scales (random bytes elsewhere)."""
    _, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    scales = rng.standard_normal((n, 2)).astype(np.float16).view(np.uint8).reshape(n, 4)
    if qtype == Q.Q4_K:
        b[:, 0:4] = scales  # d, dmin
    else:
        b[:, 208:210] = scales[:, 0:2]  # d
    return b


@pytest.mark.parametrize(("qtype", "twin"), [(Q.Q4_K, q4_k_twin), (Q.Q6_K, q6_k_twin)], ids=["Q4_K", "Q6_K"])
def test_k_quant_blocks_dequantize_exactly(qtype, twin):
    rows, k = 3, 768  # three super-blocks per row
    blocks = _random_blocks(qtype, rows * k // 256, np.random.default_rng(5))
    t = GGUFTensorInfo("blk.0.ffn_down.weight", (rows, k), qtype, 0, blocks.nbytes)
    got = dequantize(blocks.reshape(-1), t, Path("x.gguf"))
    want = twin(blocks).reshape(rows, k)
    assert got.dtype == np.float32 and got.shape == (rows, k)
    assert np.abs(want).max() > 0
    assert np.abs(got - want).max() / np.abs(want).max() < DEQUANT_RTOL["float32"]


_GEMMA_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gemma3_metadata(w) -> None:
    w.add_context_length(256)
    w.add_embedding_length(72)
    w.add_block_count(2)
    w.add_feed_forward_length(100)
    w.add_head_count(3)
    w.add_head_count_kv(1)
    w.add_key_length(24)
    w.add_value_length(24)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(48)


def test_tiny_gemma3_gguf_reads_back_as_hf(tiny_checkpoint, tmp_path):
    from kiln.frontends.gguf_reader import open_gguf  # noqa: PLC0415

    hf = write_hf_as_gguf(tiny_checkpoint("gemma3"), tmp_path / "g.gguf", "gemma3", _GEMMA_BLOCK, _gemma3_metadata, norm_shift=1.0)
    ck = open_gguf(tmp_path / "g.gguf")
    assert sorted(ck.tensor_names) == sorted(hf)
    for name, arr in hf.items():
        np.testing.assert_allclose(ck.load(name), arr, rtol=0, atol=1e-6 if name.endswith("norm.weight") else 0, err_msg=name)
    c = ModelConfig.from_dict(ck.config)
    assert c.architecture == "Gemma3ForCausalLM" and c.tie_word_embeddings and c.sliding_window == 48
    assert (c.rope_theta, c.rope_local_theta, c.head_dim) == (1e6, 10000.0, 24)
    assert c.layer_types == ("sliding_attention", "sliding_attention")  # llama.cpp's pattern: every 6th layer full
    assert c.extra["query_pre_attn_scalar"] == 24


def _gemma_vocab() -> tuple[list[str], list[int]]:
    """A small Gemma-like SentencePiece vocabulary: specials, byte-fallback tokens for ASCII
    letters, pieces whose splits make merges, a run-of-spaces token stored as spaces, and a
    user-defined token. (token types: 1 normal, 3 control, 4 user-defined, 6 byte)"""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁w", "or", "▁wor", "▁world", "  ", "▁▁▁"]
    byte = [f"<0x{b:02X}>" for b in range(0x41, 0x5B)]
    tokens = specials + byte + pieces + ["<start_of_turn>", "[multimodal]"]
    types = [3] * 4 + [6] * len(byte) + [1] * len(pieces) + [3, 4]
    return tokens, types


def test_gemma_tokenizer_matches_transformers_on_a_small_vocabulary(tmp_path):
    """kiln's rebuild of a Gemma GGUF vocabulary against transformers' rebuild of the same
    file (the real 262k vocabulary: tests/test_gemma3_gguf.py, slow)."""
    import gguf  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415

    transformers = pytest.importorskip("transformers")
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer  # noqa: PLC0415

    from kiln.frontends.gguf_header import read_gguf_header  # noqa: PLC0415
    from kiln.frontends.gguf_tokenizer import build_tokenizer  # noqa: PLC0415

    tokens, types = _gemma_vocab()
    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files = build_tokenizer(read_gguf_header(path), len(tokens), path)
    assert (files.bos_token, files.eos_token) == ("<bos>", "<eos>")
    ours = Tokenizer.from_str(files.tokenizer_json)
    ref = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])[0]
    for text in ["hello world", "  hello   world  ", "Hello WORLD", "<start_of_turn>hello[multimodal]", "héllo"]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
    assert len(set(ours.encode("  hello   world  ", add_special_tokens=False).ids)) > 3
