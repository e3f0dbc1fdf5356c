"""HF tensor names -> kiln params: the shapes the graph expects, which HF
tensors are concatenated (axis 0) into each (QKV, gate/up; a stack of
per-expert matrices is their concatenation reshaped), and the strict
conversion (missing or unexpected tensors are errors; NaN/Inf weights too).
Plain numpy: no TVM here."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ...errors import ModelFormatError
from ..config import ModelConfig

# HF tensors that carry no weights (derived buffers); never an error, never used.
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


class HFNames:
    """The weight side of a decoder family (mixed into DecoderLM); families
    override layer_param_shapes / hf_layer_sources where their layers differ,
    and the `_at` variants where layers differ from each other (MoE)."""

    @classmethod
    def param_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """kiln param name -> shape, as the graph expects them."""
        c = config
        shapes = {"embed_tokens": (c.vocab_size, c.hidden_size), "norm.weight": (c.hidden_size,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (-(-c.vocab_size // c.tensor_parallel), c.hidden_size)  # a shard's vocab rows
        for i in range(c.num_hidden_layers):
            shapes.update({f"layers.{i}.{k}": v for k, v in cls.layer_param_shapes_at(c, i).items()})
        return shapes

    @classmethod
    def layer_param_shapes_at(cls, c: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
        """Layer i's params (every layer alike unless a family says otherwise)."""
        return cls.layer_param_shapes(c)

    @classmethod
    def hf_layer_sources_at(cls, c: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
        return cls.hf_layer_sources(c)

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
            for k, srcs in cls.hf_layer_sources_at(c, i).items():
                sources[f"layers.{i}.{k}"] = tuple(f"model.layers.{i}.{s}" for s in srcs)
        return sources

    @classmethod
    def hf_sources_for(cls, c: ModelConfig, names: set[str]) -> dict[str, tuple[str, ...]]:
        """hf_sources for the tensors a checkpoint has: a family whose params are
        spelled more than one way on disk picks the spelling here."""
        return cls.hf_sources(c)

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
        available = set(names)
        sources = cls.hf_sources_for(c, available)
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
            out[name] = cls.convert_param(name, _concat_thunk(name, srcs, expected[name], load, file))
        return out

    @classmethod
    def reordered_params(cls, c: ModelConfig) -> set[str]:
        """kiln params whose rows conversion reorders (DeepSeek's RoPE rows): a file's quantized
        blocks of them must not be imported as they are (compiler/stages.py)."""
        return set()

    @classmethod
    def convert_param(cls, name: str, thunk: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        """A family's conversion-time change to one param (Gemma folds its norms' +1), as data."""
        return thunk


def _concat_thunk(name, srcs, shape, load, file):
    def thunk() -> np.ndarray:
        parts = [load(s) for s in srcs]
        # a stack [E, rows, k] made of 2-D per-expert matrices [*, k]: concatenate, then reshape;
        # made of stacks [E, *, k] (GGUF's gate and up experts): concatenate within each expert
        stacked = len(shape) == 3 and parts[0].ndim == 2
        axis = 1 if len(shape) == 3 and parts[0].ndim == 3 else 0
        row = tuple(shape[2:]) if stacked else tuple(shape[axis + 1:])
        ndim = len(shape) - 1 if stacked else len(shape)
        for s, p in zip(srcs, parts):
            if p.ndim != ndim or p.shape[axis + 1:] != row or p.shape[:axis] != tuple(shape[:axis]):
                want = ", ".join(map(str, (*shape[:axis], "*", *row)))
                raise ModelFormatError(f"{file}: tensor {s} has shape {list(p.shape)}, expected [{want}] for {name}")
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
        if stacked and arr.shape[0] == shape[0] * shape[1]:
            arr = arr.reshape(shape)
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
