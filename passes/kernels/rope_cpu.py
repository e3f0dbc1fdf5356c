"""RoPE on append for CPU KV caches: the paged cache's `tir_split_rotary` slot (split the fused
qkv rows into q, k, v, rotating q and k), with the angles' cos / sin computed once per (token,
dimension) and applied to every head.

TVM's kernel (relax/frontend/nn/llm/position_embedding.py, llama_rope_with_position_map)
evaluates theta^(2d/D) (powf), cos and sin for every element of every head: on SmolLM2 (12
heads of q and k) that was 12x the transcendental work needed, ~8% of a 128-token CPU prefill
(perf: __powf_fma, __sinf_fma, __cosf_fma) and serial over tokens. The frequency expressions
are TVM's own (switch_rope_freq_func: default, llama3), so values are the same bit for bit;
gptj's interleaved pairs, longrope's per-dimension factors, yarn and llama4 keep TVM's kernel
(`rope_supported`).
"""

from __future__ import annotations

from ...tvm_compat import compiler

_t = compiler()
T = _t.T
tirx = _t.tirx


def rope_supported(rope_scaling: dict) -> bool:
    """Frequencies that depend on the pair index alone (d and d + R/2 share an angle): default and
    llama3. TVM's yarn ramp reads the raw dimension (the second half gets other angles than HF's
    repeated first half; kiln refuses YaRN models anyway) and llama4 is unused: both keep TVM's."""
    return rope_scaling.get("rope_type", "default") in ("default", "llama3")


def rope_split_cpu(theta: float, scale: float, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: str,
                   rope_scaling: dict, rotary_dim: int | None = None):
    from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func  # noqa: PLC0415

    H, HQ, HKV, D = num_q_heads + 2 * num_kv_heads, num_q_heads, num_kv_heads, head_dim
    R = head_dim if rotary_dim is None else rotary_dim
    half = R // 2
    freq_fn = switch_rope_freq_func(rope_scaling)
    scale_c = tirx.const(scale, "float32")

    def angle(pos, d, which: int):
        """cos (which 0) or sin (1) of dimension d's angle at position pos, as TVM's kernel has it."""
        cos_f, sin_f, var_map = freq_fn(pos * scale_c, d, R, theta, "float32")
        expr = cos_f if which == 0 else sin_f
        for var, value in var_map.items():
            expr = tirx.Let(var, value, expr)
        return expr

    @T.prim_func
    def kiln_rope_split(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle,
                        apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        pm_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, H, D), dtype)
        q = T.match_buffer(var_q, (seq_len, HQ, D), dtype)
        k = T.match_buffer(var_k, (seq_len, HKV, D), dtype)
        v = T.match_buffer(var_v, (seq_len, HKV, D), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=pm_offset)
        for s in T.parallel(seq_len):
            cs = T.alloc_buffer((half,), "float32", scope="local")
            sn = T.alloc_buffer((half,), "float32", scope="local")
            for d in T.serial(half):
                cs[d] = angle(position_map[s], d, 0)
                sn[d] = angle(position_map[s], d, 1)
            for h in T.serial(HQ):
                if apply_rope > 0:
                    for d in T.vectorized(half):
                        q[s, h, d] = T.Cast(dtype, cs[d] * T.Cast("float32", qkv[s, h, d]) + sn[d] * (T.float32(0) - T.Cast("float32", qkv[s, h, d + half])))
                        q[s, h, d + half] = T.Cast(dtype, cs[d] * T.Cast("float32", qkv[s, h, d + half]) + sn[d] * T.Cast("float32", qkv[s, h, d]))
                    for d in T.serial(D - R):
                        q[s, h, R + d] = qkv[s, h, R + d]
                else:
                    for d in T.vectorized(D):
                        q[s, h, d] = qkv[s, h, d]
            for h in T.serial(HKV):
                if apply_rope > 0:
                    for d in T.vectorized(half):
                        k[s, h, d] = T.Cast(dtype, cs[d] * T.Cast("float32", qkv[s, HQ + h, d]) + sn[d] * (T.float32(0) - T.Cast("float32", qkv[s, HQ + h, d + half])))
                        k[s, h, d + half] = T.Cast(dtype, cs[d] * T.Cast("float32", qkv[s, HQ + h, d + half]) + sn[d] * T.Cast("float32", qkv[s, HQ + h, d]))
                    for d in T.serial(D - R):
                        k[s, h, R + d] = qkv[s, HQ + h, R + d]
                else:
                    for d in T.vectorized(D):
                        k[s, h, d] = qkv[s, HQ + h, d]
                for d in T.vectorized(D):
                    v[s, h, d] = qkv[s, HQ + HKV + h, d]

    return kiln_rope_split
