"""Tensor parallelism, the weight side: how a model's params split over N GPUs
(Megatron's layout), and the config each shard's graph is built from.

Column-parallel matrices (outputs split: QKV by heads, gate/up by FFN columns,
the LM head by vocabulary rows) need no communication; row-parallel ones (o_proj,
down_proj: inputs split) end in an all-reduce of the hidden state, and the LM
head's vocabulary shards are gathered. Everything else (embeddings, norms, q/k
norms) is replicated. A concatenated param (QKV, gate/up) splits each of its
segments, so shard r holds [q_r; k_r; v_r] and the graph's reshape to
[q_heads + 2 kv_heads, head_dim] still reads q, k, v in order.

Splitting happens on float weights at conversion time, before quantization, so
group scales belong to their shard's rows (row-parallel K must stay a multiple
of the group). Plain numpy: no TVM here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ...errors import CompileError
from ..config import ModelConfig

MAX_TENSOR_PARALLEL = 64


@dataclass(frozen=True)
class Split:
    """How one param is cut: kind "rows" (axis 0, each of `segments` split N ways),
    "cols" (axis 1), "vocab" (axis 0 in equal blocks of ceil(rows / N), the last
    padded with zero rows whose logits the gather drops), "first" (shard 0 has it, the others zeros: a row-parallel
    bias, added once by the all-reduce), "replicate"."""

    kind: str
    segments: tuple[int, ...] = ()
    ways: tuple[int, ...] = ()  # "rows": parts per segment (default N); shard r takes part r * ways // N

    def describe(self) -> str:
        if not self.segments or len(self.segments) == 1:
            return self.kind
        return f"{self.kind}{list(self.segments)}" + (f" in {list(self.ways)} parts" if self.ways else "")


REPLICATE = Split("replicate")


def shard_config(c: ModelConfig, n: int) -> ModelConfig:
    """The config of one shard's graph: heads, KV heads and FFN width divided by n, the
    LM head untied (its own vocab rows, ceil(vocab / n) of them). A split that does not come out even is refused
    with the numbers, never rounded."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TENSOR_PARALLEL:
        raise CompileError(f"--tensor-parallel {n!r}: must be an integer in [1, {MAX_TENSOR_PARALLEL}]")
    if n == 1:
        return c
    if c.num_experts:
        raise CompileError(f"--tensor-parallel {n}: mixture-of-experts models ({c.architecture}) do not split over GPUs yet")
    kv = c.num_key_value_heads
    # fewer KV heads than shards: each KV head is replicated on the n / kv shards whose query heads read it
    kv_uneven = kv % n and n % kv
    uneven = [(what, v) for what, v, bad in (("attention heads", c.num_attention_heads, c.num_attention_heads % n),
                                              ("KV heads", kv, kv_uneven),
                                              ("FFN columns (intermediate_size)", c.intermediate_size, c.intermediate_size % n)) if bad]
    if uneven:
        what, v = uneven[0]
        raise CompileError(f"--tensor-parallel {n}: the model's {v} {what} do not split evenly over {n} GPUs "
                           f"({c.architecture}: {c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, "
                           f"FFN {c.intermediate_size}, vocab {c.vocab_size}); pick a divisor")
    return replace(c, num_attention_heads=c.num_attention_heads // n, num_key_value_heads=max(kv // n, 1),
                   intermediate_size=c.intermediate_size // n, tie_word_embeddings=False, tensor_parallel=n)


def layer_layout(c: ModelConfig, n: int) -> dict[str, Split]:
    """A dense decoder layer's splits (full config), by param name within the layer."""
    ffn = (c.intermediate_size, c.intermediate_size)
    kv = c.num_key_value_heads
    ways = (n, min(n, kv), min(n, kv)) if kv < n else ()  # KV heads replicated when there are fewer than shards
    qkv = Split("rows", (c.q_size, c.kv_size, c.kv_size), ways)
    return {
        "attn.qkv_proj.weight": qkv,
        "attn.qkv_proj.bias": qkv,
        "attn.o_proj.weight": Split("cols"),
        "attn.o_proj.bias": Split("first"),
        "mlp.gate_up_proj.weight": Split("rows", ffn),
        "mlp.gate_up_proj.bias": Split("rows", ffn),
        "mlp.down_proj.weight": Split("cols"),
        "mlp.down_proj.bias": Split("first"),
    }


def layout(family: type, c: ModelConfig, n: int) -> dict[str, Split]:
    """Every param of the graph split n ways -> its Split (full config c). A tied LM head is
    cut from the embedding table (`lm_head.weight` then has no HF tensor of its own)."""
    out = {name: REPLICATE for name in family.param_shapes(c)}
    out["lm_head.weight"] = Split("vocab")
    per_layer = getattr(family, "tp_layer_layout", layer_layout)(c, n)
    for i in range(c.num_hidden_layers):
        for k, split in per_layer.items():
            if f"layers.{i}.{k}" in out:
                out[f"layers.{i}.{k}"] = split
    return out


def shard(arr: np.ndarray, split: Split, n: int, rank: int) -> np.ndarray:
    """Shard `rank` of n of a full param."""
    if split.kind == "replicate":
        return arr
    if split.kind == "first":
        return arr if rank == 0 else np.zeros_like(arr)
    if split.kind == "cols":
        k = arr.shape[1] // n
        return np.ascontiguousarray(arr[:, rank * k : (rank + 1) * k])
    if split.kind == "vocab":
        rows = -(-arr.shape[0] // n)
        part = arr[rank * rows : (rank + 1) * rows]
        if part.shape[0] < rows:
            part = np.concatenate([part, np.zeros((rows - part.shape[0], *arr.shape[1:]), arr.dtype)], axis=0)
        return np.ascontiguousarray(part)
    if split.kind == "rows":
        parts, start = [], 0
        for i, seg in enumerate(split.segments):
            ways = split.ways[i] if split.ways else n
            step, part = seg // ways, rank * ways // n  # ways < n: n / ways shards share (replicate) a part
            parts.append(arr[start + part * step : start + (part + 1) * step])
            start += seg
        if start != arr.shape[0]:
            raise CompileError(f"internal: a param of {arr.shape[0]} rows split as {list(split.segments)}")
        return np.ascontiguousarray(np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0])
    raise CompileError(f"internal: unknown split {split.kind!r}")
