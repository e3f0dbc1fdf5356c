"""GGUF phi3: the tiny LongRoPE Phi-3 written as llama.cpp's convert writes it (fused
attn_qkv and ffn_up, rope_factors_short / _long tensors, the original context and
attention factor as metadata) reads back as the HF checkpoint it came from, with the
same RoPE once the family has adapted both configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.tiny_gguf import write_hf_as_gguf

from kiln.frontends.config import ModelConfig
from kiln.frontends.models import family_for

_PHI3_BLOCK = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def test_tiny_phi3_gguf_reads_back_as_hf(tiny_checkpoint, tmp_path):
    import json  # noqa: PLC0415

    from kiln.frontends.gguf_reader import open_gguf  # noqa: PLC0415

    hf_dir = tiny_checkpoint("phi3")
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    rope = hf_cfg["rope_parameters"]

    def metadata(w):
        w.add_context_length(256)
        w.add_embedding_length(72)
        w.add_block_count(2)
        w.add_feed_forward_length(100)
        w.add_head_count(3)
        w.add_head_count_kv(1)
        w.add_rope_dimension_count(24)
        w.add_layer_norm_rms_eps(hf_cfg["rms_norm_eps"])
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_scaling_orig_ctx_len(64)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(256 / 64) / math.log(64)))  # llama.cpp's convert computes it

    factors = {"rope_factors_short.weight": np.array(rope["short_factor"], np.float32),
               "rope_factors_long.weight": np.array(rope["long_factor"], np.float32)}
    hf = write_hf_as_gguf(hf_dir, tmp_path / "p.gguf", "phi3", _PHI3_BLOCK, metadata, extra=factors)
    ck = open_gguf(tmp_path / "p.gguf")
    assert sorted(ck.tensor_names) == sorted(hf)
    for name, arr in hf.items():
        assert np.array_equal(ck.load(name), arr), name
    family = family_for("Phi3ForCausalLM")
    got = family.adapt_config(ModelConfig.from_dict(ck.config))
    want = family.adapt_config(ModelConfig.from_dict(hf_cfg))
    assert got.max_position_embeddings == want.max_position_embeddings == 64
    g, h = dict(got.rope_scaling), dict(want.rope_scaling)
    assert g.pop("attention_factor") == pytest.approx(h.pop("attention_factor"), rel=1e-6)
    assert g == {**h, "short_factor": list(np.float32(h["short_factor"])), "long_factor": list(np.float32(h["long_factor"]))}
    assert not got.tie_word_embeddings and got.rope_theta == want.rope_theta
