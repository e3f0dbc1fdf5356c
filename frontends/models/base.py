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

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ...errors import ModelFormatError
from ...passes.quant import QuantPlan  # quantization formats: a layer below the models (tests/test_layers.py)
from ...tvm_compat import compiler
from ..config import ModelConfig

_tvm = compiler()
nn = _tvm.nn
op = _tvm.op
spec = _tvm.spec

# HF tensors that carry no weights (derived buffers); never an error, never used.
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


COMPUTE_DTYPE = "float32"  # activations, accumulation and the KV cache on CPU


@dataclass(frozen=True)
class Precision:
    """storage: the big matrices' dtype in the artifact; compute: activations,
    norms, the KV cache. CPU: compute fp32 (fp16 arithmetic is not native);
    GPU: compute = storage (bf16/fp16 tensor-core math, fp32 accumulation)."""

    storage: str
    compute: str = COMPUTE_DTYPE
    quant: QuantPlan | None = None  # quantized matrices by role (None: all float)

    def format_for(self, role: str, k: int, tied: bool = False):
        """The quantized format of a matrix of this role with rows of k weights, or None (float)."""
        return self.quant.matrix_format(role, k, tied) if self.quant is not None else None


def _precision(dtype) -> Precision:
    return dtype if isinstance(dtype, Precision) else Precision(dtype)


def to_compute(w, compute: str = COMPUTE_DTYPE):
    """Weights are stored in the artifact's dtype (fp16/bf16 halve the bytes a
    token reads); arithmetic is in `compute`. The cast fuses into the consuming
    kernel, so converted weights only ever exist in registers."""
    return w if w.dtype == compute else w.astype(compute)


# What a projection kernel is, set on its PrimFunc on purpose so that passes
# (passes/cuda_projections.py) match it by attribute, never by its name:
# OP_ATTR "matmul" (float W) | "qmatmul" (quantized W); ROLE_ATTR "projection" | "lm_head".
OP_ATTR, ROLE_ATTR = "kiln.op", "kiln.role"
QFORMAT_ATTR = "kiln.qformat"  # a qmatmul's weight format (passes/quant WEIGHT_FORMATS name)


def nt_matmul(x, w, name: str = "NT_matmul", out_dtype: str | None = None, role: str = "projection"):
    """x @ w^T with w in its storage dtype: x  # [*, k], w  # [n, k] -> [*, n] in
    out_dtype (default: x's dtype).

    One TE kernel with the casts inside, so fp16/bf16 weights are converted in
    registers (FuseOps would leave a separate cast kernel that writes an fp32
    copy of the whole matrix every call). 16-bit activations accumulate in
    fp32 (a bf16 running sum over K = 14336 terms loses most of its bits);
    the result is rounded once, at the end."""
    te = _tvm.te
    out_dtype = str(out_dtype or x.dtype)

    def compute(xt, wt):
        *lead, k_ext = xt.shape
        k = te.reduce_axis((0, k_ext), name="k")
        x_dtype = str(xt.dtype)
        acc = "float32" if "16" in x_dtype or out_dtype == "float32" else x_dtype

        def body(*idx):
            xv, wv = xt[(*idx[:-1], k)], wt[idx[-1], k]
            if str(xv.dtype) != acc:
                xv = xv.astype(acc)
            if str(wv.dtype) != acc:
                wv = wv.astype(acc)
            return te.sum(xv * wv, axis=k)

        out = te.compute((*lead, wt.shape[0]), body, name=name)
        if acc == out_dtype:
            return out
        return te.compute(out.shape, lambda *i: out(*i).astype(out_dtype), name=name + "_cast")

    return op.tensor_expr_op(compute, name, [x, w], attrs={OP_ATTR: "matmul", ROLE_ATTR: role})


def take(x, indices, axis: int, name: str = "take"):
    """x[indices] along `axis`, clipping out-of-range indices instead of reading
    out of bounds (relax's default "fast" mode reads them, and TVM prints a
    warning about that on every compile). Token ids are checked by the runtime;
    this keeps a kernel safe even where a check is missed."""
    r = _tvm.relax
    return nn.wrap_nested(r.op.take(x._expr, indices._expr, axis=axis, mode="clip"), name)


def greedy_pick(logits, vocab: int):
    """logits  # [1, 1, vocab] float32 -> [2] int32: the argmax, and 1 if every
    logit is finite (0 if any is NaN/Inf, which the runtime turns into an error
    as the host sampler does). Lets greedy decoding read 8 bytes per token instead
    of the whole logits row.

    One pass over the logits: non-finite values count as +inf in the argmax, so
    if any exists the argmax lands on one, and checking the picked logit alone
    tells whether all were finite. (A separate all-finite reduction got TVM's
    one-thread fallback schedule: 128k serial loads.)"""
    r = _tvm.relax
    x = logits._expr
    inf = r.const(float("inf"), "float32")
    best = r.op.argmax(r.op.where(r.op.isfinite(x), x, inf), axis=2, keepdims=False)  # [1, 1] int64
    best = r.op.reshape(r.op.astype(best, "int32"), [1])
    picked = r.op.take(r.op.reshape(x, [vocab]), best, axis=0, mode="clip")  # [1]
    return nn.wrap_nested(r.op.concat([best, r.op.astype(r.op.isfinite(picked), "int32")], axis=0), "greedy_pick")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis. The weight
    stays fp32 whatever the artifact dtype (a few KB per layer)."""

    def __init__(self, size: int, eps: float, dtype):
        self.weight = nn.Parameter((size,), _precision(dtype).compute)
        self.eps = eps

    def forward(self, x):
        return op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)


class QWeight(nn.Module):
    """A quantized [N, K] matrix stored as the arrays of its format (params
    `q`, `s`, and `z` for formats with a minimum; passes/quant/formats/). Never
    dequantized as a whole: kernels decode the codes where they read them."""

    def __init__(self, shape: tuple[int, int], fmt):
        self.fmt = fmt
        self.shape = tuple(shape)
        self.group = fmt.group_for(shape[1])
        self.q = self.s = self.z = None
        for sfx, (shp, dt) in fmt.parts(self.shape).items():
            setattr(self, sfx, nn.Parameter(shp, dt))

    def params(self) -> list:
        return [self.q, self.s] + ([self.z] if self.z is not None else [])


def q_matmul(x, qw: QWeight, name: str = "NT_qmatmul", out_dtype: str | None = None, role: str = "projection"):
    """x @ dequant(W)^T: the dequantize stage and the reduction are one TIR
    function; the schedules inline the dequantize into the GEMV (decode) or
    into the per-tile packing of the GEMM (prefill), so a dequantized matrix
    never exists in memory."""
    te = _tvm.te
    out_dtype = str(out_dtype or x.dtype)

    def compute(xt, q, s, z=None):
        *lead, k_ext = xt.shape
        n_ext = qw.shape[0]
        deq = qw.fmt.te_weight(qw.group, q, s, z)
        w = te.compute((n_ext, k_ext), deq, name=name + "_dequant")
        k = te.reduce_axis((0, k_ext), name="k")

        def body(*idx):
            xv = xt[(*idx[:-1], k)]
            if str(xv.dtype) != "float32":
                xv = xv.astype("float32")
            return te.sum(xv * w[idx[-1], k], axis=k)

        out = te.compute((*lead, n_ext), body, name=name)
        if out_dtype == "float32":
            return out
        return te.compute(out.shape, lambda *i: out(*i).astype(out_dtype), name=name + "_cast")

    return op.tensor_expr_op(compute, name, [x, *qw.params()], attrs={OP_ATTR: "qmatmul", ROLE_ATTR: role, QFORMAT_ATTR: qw.fmt.name})


def q_take(qw: QWeight, ids, out_dtype: str):
    """Rows `ids` of a quantized table, dequantized (the embedding lookup)."""
    te = _tvm.te

    def compute(idt, q, s, z=None):
        deq = qw.fmt.te_weight(qw.group, q, s, z)
        return te.compute((idt.shape[0], qw.shape[1]), lambda t, k: deq(idt[t], k).astype(out_dtype), name="q_take")

    return op.tensor_expr_op(compute, "q_take", [ids, *qw.params()])


def matmul_any(x, w, name: str = "NT_matmul", out_dtype: str | None = None, role: str = "projection"):
    if isinstance(w, QWeight):
        return q_matmul(x, w, "NT_qmatmul" if name == "NT_matmul" else name, out_dtype, role)
    return nt_matmul(x, w, name, out_dtype, role)


class Linear(nn.Module):
    """y = x @ W^T (+ b). W stays [out, in] so decode reads it row by row.
    `role` names the projection for the quantization plan (--keep ROLE=...)."""

    def __init__(self, in_features: int, out_features: int, dtype, bias: bool = False, role: str = "body"):
        p = _precision(dtype)
        self.compute = p.compute
        fmt = p.format_for(role, in_features) if role != "body" else None
        self.weight = QWeight((out_features, in_features), fmt) if fmt is not None else nn.Parameter((out_features, in_features), p.storage)
        self.bias = nn.Parameter((out_features,), p.storage) if bias else None

    def forward(self, x):
        y = matmul_any(x, self.weight)
        return y + to_compute(self.bias, self.compute) if self.bias is not None else y


def tvm_paged_kv_cache(*, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rope_scale, rope_theta, rope_scaling, dtype, target, **shape_vars):
    """TVM's own TIR paged KV cache (RoPE applied on append)."""
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
        rope_mode=_tvm.kv_cache.RopeMode.NORMAL,
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


class DecoderLM(nn.Module):
    """Embeddings -> N decoder layers -> final norm -> LM head. Subclasses set `layer_cls`."""

    layer_cls: type = None  # the family's decoder layer, (config, dtype) -> nn.Module

    def __init__(self, config: ModelConfig, dtype, kv_cache_factory=None, kv_quant=None):
        """dtype: storage dtype string, or a Precision (storage + compute).
        kv_cache_factory(**kwargs) -> PagedKVCache: the compiler picks the
        attention kernels per target; the default is TVM's TIR cache.
        kv_quant: a quantized KV cache (passes/kernels/kv_quant.py QuantKV)
        instead: prefill/decode take the cache as three tensors (kv_cache is
        then the int32 meta tensor) and return the updated pages and scales."""
        self.config = config
        self.kv_quant = kv_quant
        self.precision = _precision(dtype)
        self.dtype = self.precision.storage
        dtype = self.precision
        self.kv_cache_factory = kv_cache_factory or tvm_paged_kv_cache
        emb_fmt = self.precision.format_for("embed", config.hidden_size, tied=config.tie_word_embeddings)
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = QWeight(shape, emb_fmt) if emb_fmt is not None else nn.Parameter(shape, self.dtype)
        self.layers = nn.ModuleList([self.layer_cls(config, dtype) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype, role="lm_head")

    # --- graph -------------------------------------------------------------
    def _body(self, h, kv_cache):
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, kv_cache, layer_id)
        return self.norm(h)

    def _project(self, h):
        # fp32 logits straight from the fp32 accumulator: the sampler reads fp32,
        # and rounding logits to bf16 first would create ties at the top
        w = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head.weight
        return matmul_any(h, w, name="lm_head", out_dtype="float32", role="lm_head")

    def embed(self, input_ids):
        if isinstance(self.embed_tokens, QWeight):
            return q_take(self.embed_tokens, input_ids, self.precision.compute)
        return to_compute(take(self.embed_tokens, input_ids, axis=0, name="embed"), self.precision.compute)

    def _cache(self, kv_cache, kv_pages, kv_scales):
        """The object the layers call attention on: TVM's cache, or kiln's quantized one."""
        if self.kv_quant is None:
            return kv_cache
        return self.kv_quant.bind(kv_cache, kv_pages, kv_scales, **self._rope_args())

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
        r = self._rope_args()
        rope_scale, rope_scaling = r["rope_scale"], dict(c.rope_scaling or {})
        if rope_scaling.get("rope_type") == "linear":
            rope_scaling = {}
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
        )

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
        if self.kv_quant is not None:
            return fns
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

    # --- weights -----------------------------------------------------------
    @classmethod
    def adapt_config(cls, config: ModelConfig) -> ModelConfig:
        """Family-specific config fix-ups (e.g. Qwen2 always has qkv bias)."""
        return config

    @classmethod
    def param_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """kiln param name -> shape, as the graph expects them."""
        c = config
        shapes = {"embed_tokens": (c.vocab_size, c.hidden_size), "norm.weight": (c.hidden_size,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for i in range(c.num_hidden_layers):
            shapes.update({f"layers.{i}.{k}": v for k, v in cls.layer_param_shapes(c).items()})
        return shapes

    @classmethod
    def layer_param_shapes(cls, c: ModelConfig) -> dict[str, tuple[int, ...]]:
        qkv = c.q_size + 2 * c.kv_size
        shapes = {
            "attn_norm.weight": (c.hidden_size,),
            "attn.qkv_proj.weight": (qkv, c.hidden_size),
            "attn.o_proj.weight": (c.hidden_size, c.q_size),
            "ffn_norm.weight": (c.hidden_size,),
            "mlp.gate_up_proj.weight": (2 * c.intermediate_size, c.hidden_size),
            "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        if c.attention_bias:
            shapes["attn.qkv_proj.bias"] = (qkv,)
        if c.attention_out_bias:
            shapes["attn.o_proj.bias"] = (c.hidden_size,)
        if c.mlp_bias:
            shapes["mlp.gate_up_proj.bias"] = (2 * c.intermediate_size,)
            shapes["mlp.down_proj.bias"] = (c.hidden_size,)
        return shapes

    @classmethod
    def hf_layer_sources(cls, c: ModelConfig) -> dict[str, tuple[str, ...]]:
        """kiln layer param -> the HF tensors concatenated (axis 0) to make it."""
        attn, mlp = "self_attn", "mlp"
        sources = {
            "attn_norm.weight": ("input_layernorm.weight",),
            "attn.qkv_proj.weight": tuple(f"{attn}.{p}_proj.weight" for p in "qkv"),
            "attn.o_proj.weight": (f"{attn}.o_proj.weight",),
            "ffn_norm.weight": ("post_attention_layernorm.weight",),
            "mlp.gate_up_proj.weight": (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
            "mlp.down_proj.weight": (f"{mlp}.down_proj.weight",),
        }
        if c.attention_bias:
            sources["attn.qkv_proj.bias"] = tuple(f"{attn}.{p}_proj.bias" for p in "qkv")
        if c.attention_out_bias:
            sources["attn.o_proj.bias"] = (f"{attn}.o_proj.bias",)
        if c.mlp_bias:
            sources["mlp.gate_up_proj.bias"] = (f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias")
            sources["mlp.down_proj.bias"] = (f"{mlp}.down_proj.bias",)
        return sources

    @classmethod
    def hf_sources(cls, c: ModelConfig) -> dict[str, tuple[str, ...]]:
        """kiln param name -> the HF tensors concatenated (rows) to make it."""
        sources: dict[str, tuple[str, ...]] = {"embed_tokens": ("model.embed_tokens.weight",), "norm.weight": ("model.norm.weight",)}
        if not c.tie_word_embeddings:
            sources["lm_head.weight"] = ("lm_head.weight",)
        for i in range(c.num_hidden_layers):
            for k, srcs in cls.hf_layer_sources(c).items():
                sources[f"layers.{i}.{k}"] = tuple(f"model.layers.{i}.{s}" for s in srcs)
        return sources

    @classmethod
    def convert_hf(
        cls,
        config: ModelConfig,
        names: list[str],
        load: Callable[[str], np.ndarray],
        file: str,
    ) -> dict[str, Callable[[], np.ndarray]]:
        """Map HF tensor names to kiln params (QKV and gate/up concatenated as data).

        Returns kiln name -> thunk producing the array, so that weights are read
        one at a time at write time. Missing tensors are an error (never
        zero-filled); unexpected ones are an error too (strict policy), except
        derived buffers such as rotary inv_freq.
        """
        c = config
        sources = cls.hf_sources(c)
        available = set(names)
        wanted = {s for srcs in sources.values() for s in srcs}
        missing = sorted(wanted - available)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ModelFormatError(f"{file}: missing tensors {', '.join(missing[:5])}{more}")
        extra = sorted(n for n in available - wanted if not n.endswith(IGNORED_HF_TENSORS))
        if c.tie_word_embeddings and "lm_head.weight" in extra:
            extra.remove("lm_head.weight")  # some tied checkpoints store the copy; it is not used
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise ModelFormatError(f"{file}: unexpected tensors {', '.join(extra[:5])}{more} for {c.architecture}")
        expected = cls.param_shapes(c)
        out: dict[str, Callable[[], np.ndarray]] = {}
        for name, srcs in sources.items():
            out[name] = _concat_thunk(name, srcs, expected[name], load, file)
        return out


def _concat_thunk(name, srcs, shape, load, file):
    def thunk() -> np.ndarray:
        parts = [load(s) for s in srcs]
        for s, p in zip(srcs, parts):
            if p.ndim != len(shape) or p.shape[1:] != tuple(shape[1:]):
                raise ModelFormatError(f"{file}: tensor {s} has shape {list(p.shape)}, expected [*, {', '.join(map(str, shape[1:]))}] for {name}")
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if arr.shape != tuple(shape):
            got = " + ".join(str(list(p.shape)) for p in parts)
            raise ModelFormatError(f"{file}: tensor(s) {', '.join(srcs)} have shape {got}, expected {list(shape)} from config.json")
        return arr

    return thunk


def check_finite(name: str, arr: np.ndarray, file: str) -> None:
    """NaN/Inf weights are reported, never silently compiled (THREATS 12)."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ModelFormatError(f"{file}: tensor {name} has {bad} NaN/Inf values")


def params_from_mapping(params: Mapping[str, np.ndarray]) -> dict[str, Callable[[], np.ndarray]]:
    return {k: (lambda v=v: v) for k, v in params.items()}
