"""Tiny GGUF files written with gguf.GGUFWriter, shared by the GGUF reader and
export tests: a 2-layer model (hidden 64, 4 heads, 2 KV heads, FFN 96) with a
byte-level BPE tokenizer, llama.cpp's q/k permutation for llama, and any
tensor stored as F32, F16, BF16 or a quantized GGML type; and (write_moe) a
transformers mixture-of-experts model written as llama.cpp writes Mixtral
(llama arch) and Qwen3-MoE (qwen3moe): experts stacked per layer; and
(write_deepseek2) a tiny DeepSeek-V2/V3 checkpoint as llama.cpp's deepseek2."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def _byte_chars() -> list[str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tiny_vocab() -> tuple[list[str], list[int]]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + _byte_chars() + merged + ["<think>"]
    types = [3] * len(SPECIALS) + [1] * (256 + len(merged)) + [4]
    return tokens, types


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path: Path, *, arch="llama", dtypes=None, extra=None, rope_freqs=None, tokenizer_model="gpt2"):
    """A 2-layer model in GGUF; returns HF name -> the array load() must give back."""
    rng = np.random.default_rng(7)
    tokens, types = tiny_vocab()
    vocab = len(tokens)
    hf_shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab, HIDDEN)}
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {
        "input_layernorm.weight": ("attn_norm.weight", (HIDDEN,)),
        "self_attn.q_proj.weight": ("attn_q.weight", (HEADS * HEAD_DIM, HIDDEN)),
        "self_attn.k_proj.weight": ("attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        "self_attn.v_proj.weight": ("attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        "self_attn.o_proj.weight": ("attn_output.weight", (HIDDEN, HEADS * HEAD_DIM)),
        "post_attention_layernorm.weight": ("ffn_norm.weight", (HIDDEN,)),
        "mlp.gate_proj.weight": ("ffn_gate.weight", (FFN, HIDDEN)),
        "mlp.up_proj.weight": ("ffn_up.weight", (FFN, HIDDEN)),
        "mlp.down_proj.weight": ("ffn_down.weight", (HIDDEN, FFN)),
    }
    for i in range(LAYERS):
        for hf, (g, shape) in layer.items():
            hf_shapes[f"model.layers.{i}.{hf}"] = shape
            gguf_names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{g}"

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for k, v in (extra or {}).items():
        w.add_key_value(k, v[0], v[1])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    expected = {}
    for hf, shape in hf_shapes.items():
        arr = rng.standard_normal(shape).astype(np.float32)
        qtype = (dtypes or {}).get(hf, Q.F32)
        if qtype == Q.F32:
            stored = arr
        elif qtype == Q.F16:
            stored = arr.astype(np.float16)
            arr = stored.astype(np.float32)
        else:
            stored = quants.quantize(arr, qtype)
            arr = quants.dequantize(stored, qtype)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            n = HEADS if ".q_proj." in hf else KV_HEADS
            stored = llama_permute(stored, n) if qtype in (Q.F32, Q.F16) else quants.quantize(llama_permute(arr, n), qtype)
        w.add_tensor(gguf_names[hf], stored, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        expected[hf] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# transformers' MoE families -> (GGUF architecture, llama.cpp permutes q/k)
MOE_ARCHS = {"MixtralForCausalLM": ("llama", True), "Qwen3MoeForCausalLM": ("qwen3moe", False)}


def write_moe(path: Path, model, *, expert_type=Q.F32, tokenizer: bool = True, extra=None) -> dict:
    """A transformers Mixtral / Qwen3-MoE model as a GGUF, as llama.cpp's convert lays it
    out: `blk.N.ffn_{gate,up,down}_exps` stacks ([E, F, hidden] / [E, hidden, F]) in
    `expert_type`, the router `ffn_gate_inp`, everything else F32; `{arch}.expert_*`
    metadata (and `extra`: key -> (value, GGUFValueType)); a byte-level tokenizer of the
    model's vocabulary size (3 specials and bytes 0..vocab-4: ASCII text encodes). Returns transformers' parameter name -> the
    float32 values the GGUF holds, for the parameters whose values changed (quantized
    experts, fused gate_up_proj rebuilt), so a reference model can load them."""
    c = model.config
    arch, permute = MOE_ARCHS[c.architectures[0]]
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    experts = getattr(c, "num_local_experts", None) or c.num_experts
    moe_ffn = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_expert_count(experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(moe_ffn)
        w.add_expert_weights_norm(bool(c.norm_topk_prob))
    for k, v in (extra or {}).items():
        w.add_key_value(k, v[0], v[1])
    if tokenizer:
        chars = _byte_chars()[: c.vocab_size - len(SPECIALS)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(SPECIALS + chars)
        w.add_token_types([3] * len(SPECIALS) + [1] * len(chars))
        w.add_token_merges([])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    changed = {}

    def add(name, arr, qtype=Q.F32):
        if qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
            return arr
        raw = quants.quantize(arr.reshape(-1, arr.shape[-1]), qtype)
        w.add_tensor(name, raw.reshape(*arr.shape[:-1], raw.shape[-1]), raw_shape=None, raw_dtype=qtype)
        return quants.dequantize(raw, qtype).reshape(arr.shape)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        hf, b = f"model.layers.{i}.", f"blk.{i}."
        for g, n in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")):
            if hf + n + ".weight" in state:
                add(b + g + ".weight", state[hf + n + ".weight"])
        for g, n, heads in (("attn_q", "q_proj", c.num_attention_heads), ("attn_k", "k_proj", c.num_key_value_heads)):
            q = state[hf + f"self_attn.{n}.weight"]
            add(b + g + ".weight", llama_permute(q, heads) if permute else q)
        add(b + "ffn_gate_inp.weight", state[hf + "mlp.gate.weight"])
        gate_up, down = state[hf + "mlp.experts.gate_up_proj"], state[hf + "mlp.experts.down_proj"]  # [E, 2F, D], [E, D, F]
        gate = add(b + "ffn_gate_exps.weight", gate_up[:, :moe_ffn], expert_type)
        up = add(b + "ffn_up_exps.weight", gate_up[:, moe_ffn:], expert_type)
        changed[hf + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        changed[hf + "mlp.experts.down_proj"] = add(b + "ffn_down_exps.weight", down, expert_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return changed


def write_hf_as_gguf(hf_dir: Path, path: Path, arch: str, block_names: dict[str, str], metadata, *, norm_shift: float = 0.0,
                     extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A tiny HF checkpoint (model.safetensors) written as llama.cpp's convert writes one, F32:
    `block_names` maps HF module names in a layer to llama.cpp's, `metadata(writer)` adds the
    keys, `norm_shift` is added to every norm weight, `extra` tensors are added as they are.
    Returns the HF tensors."""
    import safetensors.numpy  # noqa: PLC0415

    hf = safetensors.numpy.load_file(str(Path(hf_dir) / "model.safetensors"))
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    w = gguf.GGUFWriter(str(path), arch)
    metadata(w)
    for name, arr in hf.items():
        if name in top:
            g = top[name]
        else:
            _, _, i, *mod, kind = name.split(".")
            g = f"blk.{i}.{block_names['.'.join(mod)]}.{kind}"
        w.add_tensor(g, arr + np.float32(norm_shift) if norm_shift and name.endswith("norm.weight") else arr)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def write_deepseek2(hf_dir: Path, path: Path, *, layout: str = "mla", omit: tuple[str, ...] = (), q8: tuple[str, ...] = ()) -> None:
    """A tiny transformers DeepSeek-V2/V3 checkpoint (save_pretrained) as llama.cpp's convert writes
    `deepseek2`, F32. layout "mla" (convert since its MLA support, 2025-04, with the expert-group
    keys it writes since 2025-10): kv_b_proj split per head into attn_k_b  # [heads, kv_lora, nope]
    and attn_v_b  # [heads, v, kv_lora], head_count_kv 1, the latent as key/value_length and the
    per-head sizes as key/value_length_mla. "legacy" (before): attn_kv_b as it is, per-head sizes
    in key/value_length, head_count_kv = heads, no group keys. Both: RoPE rows as HF has them
    (llama.cpp rotates pairs in place), experts stacked per layer, e_score_correction_bias as
    exp_probs_b.bias, yarn_log_multiplier = 0.1 x mscale_all_dim, layers past num_hidden_layers
    (multi-token prediction) left out. `omit`: metadata keys (without "deepseek2.") and GGUF
    tensor names not to write; `q8`: tensors whose names end so are stored as Q8_0."""
    import json  # noqa: PLC0415

    import safetensors.numpy  # noqa: PLC0415

    T = gguf.GGUFValueType
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    hf = safetensors.numpy.load_file(str(Path(hf_dir) / "model.safetensors"))
    v3 = cfg["architectures"][0] == "DeepseekV3ForCausalLM"
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    heads, layers, lat = cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["kv_lora_rank"]
    nope, rdim, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    mla = layout == "mla"
    meta = {
        "block_count": (layers, T.UINT32), "context_length": (cfg["max_position_embeddings"], T.UINT32),
        "embedding_length": (cfg["hidden_size"], T.UINT32), "feed_forward_length": (cfg["intermediate_size"], T.UINT32),
        "attention.head_count": (heads, T.UINT32), "attention.head_count_kv": (1 if mla else cfg["num_key_value_heads"], T.UINT32),
        "attention.layer_norm_rms_epsilon": (cfg["rms_norm_eps"], T.FLOAT32),
        "rope.freq_base": (cfg.get("rope_theta", rope.get("rope_theta", 10000.0)), T.FLOAT32),
        "vocab_size": (cfg["vocab_size"], T.UINT32), "leading_dense_block_count": (cfg["first_k_dense_replace"], T.UINT32),
        "attention.kv_lora_rank": (lat, T.UINT32),
        "attention.key_length": (lat + rdim if mla else nope + rdim, T.UINT32), "attention.value_length": (lat if mla else v, T.UINT32),
        "expert_feed_forward_length": (cfg["moe_intermediate_size"], T.UINT32), "expert_count": (cfg["n_routed_experts"], T.UINT32),
        "expert_used_count": (cfg["num_experts_per_tok"], T.UINT32), "expert_shared_count": (cfg["n_shared_experts"], T.UINT32),
        "expert_weights_scale": (cfg["routed_scaling_factor"], T.FLOAT32), "expert_gating_func": (2 if v3 else 1, T.UINT32),
        "rope.dimension_count": (rdim, T.UINT32),
    }
    if cfg.get("q_lora_rank") is not None:
        meta["attention.q_lora_rank"] = (cfg["q_lora_rank"], T.UINT32)
    if mla:
        meta |= {"attention.key_length_mla": (nope + rdim, T.UINT32), "attention.value_length_mla": (v, T.UINT32),
                 "expert_group_count": (cfg["n_group"], T.UINT32), "expert_group_used_count": (cfg["topk_group"], T.UINT32)}
    if cfg.get("norm_topk_prob"):
        meta["expert_weights_norm"] = (True, T.BOOL)
    if rope.get("rope_type") == "yarn":
        meta |= {"rope.scaling.type": ("yarn", T.STRING), "rope.scaling.factor": (rope["factor"], T.FLOAT32),
                 "rope.scaling.original_context_length": (rope["original_max_position_embeddings"], T.UINT32),
                 "rope.scaling.yarn_log_multiplier": (0.1 * rope["mscale_all_dim"], T.FLOAT32)}
    w = gguf.GGUFWriter(str(path), "deepseek2")
    for k, (value, vtype) in meta.items():
        if k not in omit:
            w.add_key_value(f"deepseek2.{k}", value, vtype)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])

    def add(name: str, arr: np.ndarray) -> None:
        if name in omit:
            return
        if name.endswith(q8):
            w.add_tensor(name, quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    add("token_embd.weight", hf["model.embed_tokens.weight"])
    add("output_norm.weight", hf["model.norm.weight"])
    if "lm_head.weight" in hf:
        add("output.weight", hf["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
             "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
             "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for n, g in names.items():
            if p + n + ".weight" in hf:
                add(b + g + ".weight", hf[p + n + ".weight"])
        kv_b = hf[p + "self_attn.kv_b_proj.weight"]
        if mla:
            per_head = kv_b.reshape(heads, nope + v, lat)
            add(b + "attn_k_b.weight", per_head[:, :nope].transpose(0, 2, 1))  # [heads, kv_lora, nope]
            add(b + "attn_v_b.weight", per_head[:, nope:])  # [heads, v, kv_lora]
        else:
            add(b + "attn_kv_b.weight", kv_b)
        if p + "mlp.gate.e_score_correction_bias" in hf:
            add(b + "exp_probs_b.bias", hf[p + "mlp.gate.e_score_correction_bias"])
        if p + "mlp.experts.0.gate_proj.weight" in hf:
            for proj in ("gate", "up", "down"):
                add(b + f"ffn_{proj}_exps.weight",
                    np.stack([hf[p + f"mlp.experts.{e}.{proj}_proj.weight"] for e in range(cfg["n_routed_experts"])]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
