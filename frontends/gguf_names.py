"""GGUF tensor names -> HF names, and llama.cpp's q/k row permutation undone.

Mapped back to HF names, a GGUF's tensors go through the same conversion
(`DecoderLM.convert_hf`) as any HF checkpoint. Stacked expert tensors
(`ffn_*_exps`) have no HF spelling; they keep the stack under the per-expert
module's name (`mlp.experts.gate_proj.weight  # [E, F, hidden]`), which the
MoE families recognise (moe.py MoEFamily.hf_sources_for). So do the halves
llama.cpp splits DeepSeek's kv_b_proj into (`attn_k_b` / `attn_v_b` ->
`self_attn.k_b_proj` / `v_b_proj`, the names its converter gives them),
which frontends/models/deepseek.py takes as its w_uk (transposed back) and w_uv.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Arch:
    hf_architecture: str
    permute_qk: bool  # llama.cpp's convert permuted q/k rows for its interleaved RoPE
    hf_moe_architecture: str | None = None  # the family when `{arch}.expert_count` > 0 (llama: Mixtral)
    block_names: tuple[tuple[str, str], ...] = ()  # this architecture's spellings over _BLOCK_NAMES
    norm_shift: float = 0.0  # llama.cpp's convert added this to every norm weight (Gemma's 1 + w)
    block_tensors: tuple[tuple[str, str], ...] = ()  # whole names in a layer whose HF name ends otherwise ("exp_probs_b.bias")


# Gemma 3's four norms per layer: llama.cpp's ffn_norm is the pre-feedforward one
_GEMMA_NORMS = (("post_attention_norm", "post_attention_layernorm"), ("ffn_norm", "pre_feedforward_layernorm"),
                ("post_ffw_norm", "post_feedforward_layernorm"))


# DeepSeek-V2/V3 (llama.cpp's deepseek2): multi-head latent attention, shared experts and V3's
# router score bias (HF `e_score_correction_bias`, which llama.cpp's convert renames to `.bias`).
# kv_b_proj is one tensor in files converted before llama.cpp's MLA support (2025-04), two since:
# attn_k_b  # [heads, kv_lora, nope] (W_UK transposed) and attn_v_b  # [heads, v, kv_lora]
_DEEPSEEK2_NAMES = (("attn_q_a", "self_attn.q_a_proj"), ("attn_q_a_norm", "self_attn.q_a_layernorm"), ("attn_q_b", "self_attn.q_b_proj"),
                    ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"), ("attn_kv_a_norm", "self_attn.kv_a_layernorm"),
                    ("attn_kv_b", "self_attn.kv_b_proj"), ("attn_k_b", "self_attn.k_b_proj"), ("attn_v_b", "self_attn.v_b_proj"),
                    ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"), ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
                    ("ffn_down_shexp", "mlp.shared_experts.down_proj"))


# GGUF general.architecture -> HF architecture.
ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", permute_qk=True, hf_moe_architecture="MixtralForCausalLM"),
    "qwen2": _Arch("Qwen2ForCausalLM", permute_qk=False),
    "qwen3": _Arch("Qwen3ForCausalLM", permute_qk=False),
    "qwen3moe": _Arch("Qwen3MoeForCausalLM", permute_qk=False, hf_moe_architecture="Qwen3MoeForCausalLM"),
    "gemma3": _Arch("Gemma3ForCausalLM", permute_qk=False, block_names=_GEMMA_NORMS, norm_shift=1.0),
    # Phi-3 keeps its fused projections: attn_qkv, and gate and up in ffn_up (gate first, as HF)
    "phi3": _Arch("Phi3ForCausalLM", permute_qk=False, block_names=(("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj"))),
    # V2 or V3 is the router's gating function (gguf_config); llama.cpp rotates DeepSeek's
    # interleaved pairs as they are (rope type NORM), so its rows keep HF's order
    "deepseek2": _Arch("DeepseekV2ForCausalLM", permute_qk=False, hf_moe_architecture="DeepseekV2ForCausalLM",
                       block_names=_DEEPSEEK2_NAMES, block_tensors=(("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),)),
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixtures of experts: the router, and every expert of a layer stacked in one tensor
    # ([E, F, hidden] gate and up, [E, hidden, F] down; frontends/models/moe.py reads them)
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(0|[1-9][0-9]{0,5})\.([a-z_]+)\.(weight|bias)")
SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # derived data; read into config, never a weight


def hf_tensor_name(gguf_name: str, arch: str | None = None) -> str | None:
    """The HF name of a GGUF tensor (of GGUF architecture `arch`), or None when it has no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    spec = ARCHITECTURES.get(arch)
    names = _BLOCK_NAMES | dict(spec.block_names) if spec else _BLOCK_NAMES
    m = _BLOCK_RE.fullmatch(gguf_name)
    whole = dict(spec.block_tensors).get(f"{m.group(2)}.{m.group(3)}") if m and spec else None
    if whole:
        return f"model.layers.{m.group(1)}.{whole}"
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's convert-time q/k permutation.

    llama.cpp did `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`
    (interleaving each head's two rotary halves); this restores HF's half-split rows.
    w  # [n_head * head_dim, *rest] (a weight [out, in] or a bias [out])
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
