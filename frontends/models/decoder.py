"""Shared entry points of every decoder-only family: embed, prefill, decode, the
paged KV cache, the export spec and the HF-name weight conversion.

A family file declares only its graph (its decoder layer); everything here is
written once. Exported Relax functions (all params passed packed, last arg):

- ``embed(input_ids)``                         input_ids  # [seq] int32 -> [seq, hidden]
- ``prefill(embeds, logit_pos, kv_cache)``     embeds     # [1, seq, hidden]
                                               logit_pos  # [n] int32 rows of seq to project
                                               -> logits  # [1, n, vocab] float32
- ``decode(input_ids, kv_cache)``              input_ids  # [1] int32 -> logits  # [1, 1, vocab] float32,
                                               greedy  # [2] int32: argmax of the logits, 1 if all are finite
  (batch 1: static shapes let the GEMV rules match; batched decode comes with serving).
  The embedding lookup is inside, and `greedy` can be fed back as the next
  input_ids (a view of its first element) without the token leaving the GPU.
- ``create_paged_kv_cache(max_batch, max_total_seq, prefill_chunk, page_size, sliding)``
"""

from __future__ import annotations

from ...errors import UnsupportedModelError
from ..config import ModelConfig
from .hf_names import HFNames
from .layers import Linear, QWeight, RMSNorm, _precision, _tvm, gather_vocab, greedy_pick, greedy_pick_rows, matmul_any, nn, op, q_take, take, to_compute

spec = _tvm.spec


def tvm_paged_kv_cache(*, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rope_scale, rope_theta, rope_scaling, dtype, target,
                       rope_mode=_tvm.kv_cache.RopeMode.NORMAL, **shape_vars):
    """TVM's own TIR paged KV cache (RoPE applied on append unless rope_mode is NONE)."""
    return _tvm.kv_cache.TIRPagedKVCache(
        attn_kind="mha",
        layer_partition=_tvm.relax.ShapeExpr([0, num_hidden_layers]),
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        mla_original_qk_head_dim=0,
        mla_original_v_head_dim=0,
        rope_mode=rope_mode,
        rope_scale=rope_scale,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rope_ext_factors=_tvm.relax.prim_value(0),
        rotary_dim=head_dim,
        enable_disaggregation=False,
        dtype=dtype,
        target=target,
        **shape_vars,
    )


class DecoderLM(HFNames, nn.Module):
    """Embeddings -> N decoder layers -> final norm -> LM head. Subclasses set `layer_cls`."""

    layer_cls: type = None  # the family's decoder layer, (config, dtype) -> nn.Module
    batch_decode: bool = False  # export decode_batch too (the compiler sets it for targets with kernels for it)
    rope_in_graph: bool = False  # the layers apply RoPE themselves (layers.rope); the cache's RoPE is off
    window_kernels: bool = False  # sliding-window layers attend through window-masked kernels (the compiler sets it)
    latent_cache: bool = False  # multi-head latent attention: kiln's latent cache (kv_quant is a passes/kernels/mla.py LatentKV)
    yarn_rope: bool = False  # the layers apply YaRN-scaled RoPE themselves (DeepSeek)

    def __init__(self, config: ModelConfig, dtype, kv_cache_factory=None, kv_quant=None):
        """dtype: storage dtype string, or a Precision (storage + compute).
        kv_cache_factory(**kwargs) -> PagedKVCache: the compiler picks the
        attention kernels per target; the default is TVM's TIR cache.
        kv_quant: a quantized KV cache (passes/kernels/kv_quant.py QuantKV)
        instead: prefill/decode take the cache as three tensors (kv_cache is
        then the int32 meta tensor) and return the updated pages and scales."""
        self.config = config
        self.kv_quant = kv_quant
        rope_type = (config.rope_scaling or {}).get("rope_type")
        if rope_type == "longrope" and not self.rope_in_graph:
            raise UnsupportedModelError(f"{config.architecture}: LongRoPE scaling is not supported for this family")
        if rope_type == "yarn" and not self.yarn_rope:
            raise UnsupportedModelError(f"{config.architecture}: YaRN RoPE scaling is not supported for this family (DeepSeek only)")
        if kv_quant is not None and self.rope_in_graph and not self.latent_cache:
            raise UnsupportedModelError(f"{config.architecture}: a quantized KV cache (--kv-dtype) is not available yet for "
                                        f"models whose layers apply RoPE themselves")
        self.precision = _precision(dtype)
        self.dtype = self.precision.storage
        dtype = self.precision
        self.kv_cache_factory = kv_cache_factory or tvm_paged_kv_cache
        emb_fmt = self.precision.format_for("embed", config.hidden_size, tied=config.tie_word_embeddings)
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = QWeight(shape, emb_fmt) if emb_fmt is not None else nn.Parameter(shape, self.dtype)
        self.layers = nn.ModuleList([self.make_layer(config, dtype.layer(i), i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            # a tensor-parallel shard holds vocab / shards rows of the head (frontends/models/sharding.py)
            self.lm_head = Linear(config.hidden_size, -(-config.vocab_size // config.tensor_parallel), dtype, role="lm_head")

    def make_layer(self, config: ModelConfig, dtype, i: int):
        """Decoder layer i (alike for every i unless a family's layers differ, e.g. MoE)."""
        return self.layer_cls(config, dtype)

    # --- graph -------------------------------------------------------------
    def _body(self, h, kv_cache):
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, kv_cache, layer_id)
        return self.norm(h)

    def _project(self, h):
        # fp32 logits straight from the fp32 accumulator: the sampler reads fp32,
        # and rounding logits to bf16 first would create ties at the top
        w = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head.weight
        return gather_vocab(matmul_any(h, w, name="lm_head", out_dtype="float32", role="lm_head"), self.config.tensor_parallel, self.config.vocab_size)

    def embed(self, input_ids):
        if isinstance(self.embed_tokens, QWeight):
            return q_take(self.embed_tokens, input_ids, self.precision.compute)
        return to_compute(take(self.embed_tokens, input_ids, axis=0, name="embed"), self.precision.compute)

    def _cache(self, kv_cache, kv_pages, kv_scales):
        """The object the layers call attention on: TVM's cache, or kiln's quantized one."""
        if self.kv_quant is None:
            return kv_cache
        return self.kv_quant.bind(kv_cache, kv_pages, kv_scales, **({} if self.rope_in_graph else self._rope_args()))

    def _state(self, kv_cache, cache) -> tuple:
        return (kv_cache,) if self.kv_quant is None else (cache.pages, cache.scales)

    def prefill(self, embeds, logit_pos, kv_cache, kv_pages=None, kv_scales=None):
        cache = self._cache(kv_cache, kv_pages, kv_scales)
        h = self._body(embeds, cache)
        h = take(h, logit_pos, axis=1, name="logit_rows")
        return (self._project(h), *self._state(kv_cache, cache))

    def decode(self, input_ids, kv_cache, kv_pages=None, kv_scales=None):
        cache = self._cache(kv_cache, kv_pages, kv_scales)
        h = op.reshape(self.embed(input_ids), [1, 1, self.config.hidden_size])
        logits = self._project(self._body(h, cache))
        return (logits, greedy_pick(logits, self.config.vocab_size), *self._state(kv_cache, cache))

    def decode_batch(self, input_ids, kv_cache, kv_pages=None, kv_scales=None):
        """One token for each of B sequences in one call (the server's decode
        step): input_ids [B] -> logits [B, 1, vocab] float32, greedy [B, 2]
        int32 (argmax, all-finite) (+ kiln's quantized cache tensors). Every kernel
        treats rows independently with the same reduction order as `decode`, so a
        sequence's logits do not depend on the others in the batch
        (tests/test_batch_decode.py)."""
        cache = self._cache(kv_cache, kv_pages, kv_scales)
        b = input_ids.shape[0]
        h = op.reshape(self.embed(input_ids), [b, 1, self.config.hidden_size])
        logits = self._project(self._body(h, cache))
        return (logits, greedy_pick_rows(logits), *(() if self.kv_quant is None else self._state(kv_cache, cache)))

    def _rope_args(self) -> dict:
        c = self.config
        rope_scaling = dict(c.rope_scaling or {})
        rope_scale = 1.0
        if rope_scaling.get("rope_type") == "linear":
            # HF divides positions by `factor`; TVM's RoPE (tir_split_rotary) uses `pos * rope_scale`.
            rope_scale = 1.0 / rope_scaling.pop("factor")
            rope_scaling = {}
        return {"rope_scale": rope_scale, "rope_theta": c.rope_theta, "rope_scaling": _tvm.kv_cache._prepare_yarn_rope_scaling(rope_scaling, c.rope_theta) or {}}

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window):
        c = self.config
        r = self._rope_args() if not self.rope_in_graph else {"rope_scale": 1.0}
        rope_scale, rope_scaling = r["rope_scale"], dict(c.rope_scaling or {})
        if rope_scaling.get("rope_type") == "linear" or self.rope_in_graph:
            rope_scaling = {}  # (in the graph: the cache's kernels never rotate)
        return self.kv_cache_factory(
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            rope_scale=rope_scale,
            rope_theta=c.rope_theta,
            rope_scaling=rope_scaling,
            dtype=self.precision.compute,
            target=_tvm.Target.current(),
            rope_mode=_tvm.kv_cache.RopeMode.NONE if self.rope_in_graph else _tvm.kv_cache.RopeMode.NORMAL,
            **({"layer_kinds": self.layer_kinds(), "window": c.sliding_window} if self.window_kernels and c.sliding_window else {}),
        )

    def layer_kinds(self) -> list[str]:
        """Each layer's attention for the cache (config.layer_types): "mha_sliding" for a
        sliding-window layer, else "mha"."""
        return ["mha_sliding" if t == "sliding_attention" else "mha" for t in self.config.layer_types]

    def export_spec(self) -> dict:
        hidden = self.config.hidden_size
        packed = {"param_mode": "packed", "effect_mode": "none"}
        # TVM's cache object, or kiln's quantized cache as tensors (meta, pages, scales)
        kv = {"kv_cache": spec.Object(object_type=_tvm.kv_cache.PagedKVCache)} if self.kv_quant is None else self.kv_quant.spec(self.config)
        fns = {
            "embed": {"input_ids": spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {
                "embeds": spec.Tensor([1, "seq_len", hidden], self.precision.compute),
                "logit_pos": spec.Tensor(["num_logits"], "int32"),
                **kv,
                "$": packed,
            },
            "decode": {"input_ids": spec.Tensor([1], "int32"), **kv, "$": packed},
        }
        if self.batch_decode and (self.kv_quant is None or getattr(self.kv_quant, "batch_rows", False)):
            fns["decode_batch"] = {"input_ids": spec.Tensor(["batch_size"], "int32"), **kv, "$": packed}
        if self.kv_quant is not None:
            return fns  # kiln's quantized cache: tensors, no cache object to create
        return {
            **fns,
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }

    @classmethod
    def adapt_config(cls, config: ModelConfig) -> ModelConfig:
        """Family-specific config fix-ups (e.g. Qwen2 always has qkv bias)."""
        return config
