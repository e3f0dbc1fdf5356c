"""ModelConfig.from_dict against real transformers configs: the v5 layout
(`rope_parameters`) and the v4 one (`rope_scaling` + top-level `rope_theta`)
must normalise to the same thing, and each family's bias flags must follow
transformers' modeling code."""

from __future__ import annotations

import json
import shutil

import numpy as np

import pytest
from helpers import ARCHS
from kiln.errors import UnsupportedModelError
from kiln.frontends.config import ModelConfig

transformers = pytest.importorskip("transformers")


# keys a family reads from ModelConfig.extra itself (frontends/models/gemma3.py adapt_config)
FAMILY_KEYS = {"gemma3": {"query_pre_attn_scalar", "hidden_activation", "final_logit_softcapping", "attn_logit_softcapping",
                          "use_bidirectional_attention", "_sliding_window_pattern"}}
FAMILY_KEYS["gemma3_window"] = FAMILY_KEYS["gemma3"]
# DeepSeek's routing and RoPE layout keys: read by its family (frontends/models/deepseek.py), from `extra`
FAMILY_KEYS["deepseek_v2"] = FAMILY_KEYS["deepseek_v2_lite"] = {"topk_method", "n_group", "topk_group", "routed_scaling_factor"}
FAMILY_KEYS["deepseek_v3"] = {"n_group", "topk_group", "routed_scaling_factor", "rope_interleave", "num_nextn_predict_layers"}


def v5_config(tiny_checkpoint, arch) -> dict:
    return json.loads((tiny_checkpoint(arch) / "config.json").read_text())


def as_v4(cfg: dict) -> dict:
    """The same config as transformers 4.x wrote it."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    if "full_attention" in rope:  # one set per layer type (Gemma 3): 4.x wrote the local base on its own
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = dict(rope["full_attention"])
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_fields_match_transformers(arch, tiny_checkpoint):
    cfg = v5_config(tiny_checkpoint, arch)
    mc = ModelConfig.from_dict(cfg)
    hf = transformers.AutoConfig.from_pretrained(tiny_checkpoint(arch))
    assert mc.architecture == hf.architectures[0]
    assert (mc.hidden_size, mc.num_attention_heads, mc.num_key_value_heads) == (hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads)
    assert mc.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    rope = hf.rope_parameters.get("full_attention", hf.rope_parameters)
    assert mc.rope_theta == rope["rope_theta"]
    if "sliding_attention" in hf.rope_parameters:
        assert mc.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
        assert mc.layer_types == tuple(hf.layer_types)
    assert mc.rms_norm_eps == hf.rms_norm_eps
    assert mc.tie_word_embeddings == hf.tie_word_embeddings
    assert set(mc.extra) <= FAMILY_KEYS.get(arch, set()), "keys kiln does not know in a config transformers wrote"


@pytest.mark.parametrize("arch", ARCHS)
def test_v4_and_v5_layouts_agree(arch, tiny_checkpoint):
    cfg = v5_config(tiny_checkpoint, arch)
    assert ModelConfig.from_dict(as_v4(cfg)) == ModelConfig.from_dict(cfg)


def test_llama3_rope_scaling_normalised(tiny_checkpoint):
    mc = ModelConfig.from_dict(v5_config(tiny_checkpoint, "llama_tied_rope3"))
    assert mc.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}  # fmt: skip


def test_legacy_type_key_and_unsupported_rope(tiny_checkpoint, tmp_path):
    cfg = as_v4(v5_config(tiny_checkpoint, "llama"))
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert ModelConfig.from_dict(cfg).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # YaRN parses (DeepSeek's families apply it: tests/test_deepseek.py); others refuse it at compile time
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert ModelConfig.from_dict(cfg).rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                                       "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
    d = tmp_path / "yarn"
    shutil.copytree(tiny_checkpoint("llama"), d)
    (d / "config.json").write_text(json.dumps(cfg))
    from kiln.compiler.build import compile_model  # noqa: PLC0415

    with pytest.raises(UnsupportedModelError, match="YaRN RoPE scaling is supported for DeepSeek models only, not LlamaForCausalLM"):
        compile_model(d, tmp_path / "out.kiln")
    assert not (tmp_path / "out.kiln").exists()
    v5 = v5_config(tiny_checkpoint, "llama")
    v5["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ModelConfig.from_dict(v5)


def test_qwen2_sliding_window_off_when_unused(tiny_checkpoint):
    cfg = v5_config(tiny_checkpoint, "qwen2")
    cfg.update(sliding_window=16, use_sliding_window=False)
    assert ModelConfig.from_dict(cfg).sliding_window is None


@pytest.mark.parametrize(
    ("arch", "flags", "want"),
    [
        # transformers: Llama and Qwen3 put attention_bias on q, k, v and o; Llama's mlp_bias on gate/up/down;
        # Qwen2 always biases q, k, v and never o; Mistral has no bias at all.
        ("llama", {"attention_bias": True, "mlp_bias": True}, (True, True, True)),
        ("qwen3", {"attention_bias": True, "mlp_bias": True}, (True, True, False)),
        ("qwen2", {"attention_bias": False, "mlp_bias": True}, (True, False, False)),
        ("mistral", {"attention_bias": True, "mlp_bias": True}, (False, False, False)),
    ],
)
def test_family_bias_flags(arch, flags, want, tiny_checkpoint):
    from kiln.frontends.models import family_for  # noqa: PLC0415

    cfg = {**v5_config(tiny_checkpoint, arch), **flags}
    mc = ModelConfig.from_dict(cfg)
    mc = family_for(mc.architecture).adapt_config(mc)
    assert (mc.attention_bias, mc.attention_out_bias, mc.mlp_bias) == want


def test_gemma3_and_phi3_config_rules(tiny_checkpoint):
    """What Gemma 3 and Phi-3 refuse rather than compile wrong, and what they derive."""
    from kiln.frontends.models import family_for  # noqa: PLC0415

    gemma = family_for("Gemma3ForCausalLM")
    cfg = v5_config(tiny_checkpoint, "gemma3")
    for key, value in (("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0), ("hidden_activation", "gelu")):
        with pytest.raises(UnsupportedModelError, match=key if key != "hidden_activation" else "gelu"):
            gemma.adapt_config(ModelConfig.from_dict({**cfg, key: value}))
    legacy = {k: v for k, v in as_v4(cfg).items() if k != "layer_types"}  # 4.x: the pattern, no layer_types
    legacy.update(num_hidden_layers=7, sliding_window_pattern=3)
    mc = gemma.adapt_config(ModelConfig.from_dict(legacy))
    assert mc.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2 + ("sliding_attention",)
    phi = v5_config(tiny_checkpoint, "phi3")
    mc = family_for("Phi3ForCausalLM").adapt_config(ModelConfig.from_dict(phi))
    assert mc.max_position_embeddings == 64  # capped at the original context: short factors only
    assert mc.rope_scaling["attention_factor"] == pytest.approx((1 + np.log(256 / 64) / np.log(64)) ** 0.5)
    v4 = as_v4(phi)
    v4["rope_scaling"] = {**v4["rope_scaling"], "type": "su"}
    del v4["rope_scaling"]["rope_type"], v4["rope_scaling"]["original_max_position_embeddings"]
    assert ModelConfig.from_dict(v4).rope_scaling == ModelConfig.from_dict(phi).rope_scaling  # top-level original context
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        ModelConfig.from_dict({**phi, "rope_parameters": {**phi["rope_parameters"], "partial_rotary_factor": 0.75}})


def test_longrope_refused_where_the_cache_rotates(tiny_checkpoint):
    from kiln.frontends.models import family_for  # noqa: PLC0415

    cfg = {**v5_config(tiny_checkpoint, "phi3"), "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(UnsupportedModelError, match="LongRoPE"):
        family_for("LlamaForCausalLM")(ModelConfig.from_dict(cfg), "float32")


def test_context_past_the_window_is_refused_saying_why(tiny_checkpoint, tmp_path):
    """Where kiln has no windowed kernels (here: a quantized KV cache) the context is capped
    at the window, and a longer --max-seq-len is refused saying why."""
    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.errors import CompileError  # noqa: PLC0415

    with pytest.raises(CompileError, match=r"outside \[1, 48\].*sliding window.*--kv-dtype"):
        compile_model(tiny_checkpoint("gemma3"), tmp_path / "g.kiln", max_seq_len=100, kv_dtype="int8")
