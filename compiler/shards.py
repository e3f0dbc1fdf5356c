"""Weights of a tensor-parallel artifact: one safetensors file per shard
(`weights.shard-K.safetensors`), so each worker maps only its own bytes. Each
float param is read once per shard, cut (frontends/models/sharding.py), then
quantized like an unsharded param (group scales travel with their rows)."""

from __future__ import annotations

import numpy as np

from ..frontends.models.hf_names import check_finite
from ..frontends.models.sharding import layout, shard
from .progress import Progress
from .weights import write_safetensors


def shard_file(rank: int) -> str:
    return f"weights.shard-{rank}.safetensors"


def write_shards(m, writer, order, shapes, param_dtypes, stored, expanded, progress: Progress) -> list[str]:
    """m: build.Model with m.tp > 1; the rest as stages.write_weights. Returns the files, by rank."""
    thunks = m.family.convert_hf(m.config, m.ck.tensor_names, m.ck.load, m.ck.source)
    if "lm_head.weight" not in thunks:  # tied: each shard's head rows come from the embedding table
        thunks["lm_head.weight"] = thunks["embed_tokens"]
    splits = layout(m.family, m.config, m.tp)
    files = []
    for rank in range(m.tp):
        packed: dict[str, dict] = {}

        def produce(name: str, rank=rank, packed=packed) -> np.ndarray:
            base, _ = stored[name]
            fmt = expanded[base]["fmt"]
            if fmt is None:
                arr = thunks[base]()
                check_finite(base, arr, m.ck.source)
                return shard(arr, splits[base], m.tp, rank)
            if base not in packed:
                packed.clear()
                arr = thunks[base]()
                check_finite(base, arr, m.ck.source)
                packed[base] = fmt.quantize(shard(arr, splits[base], m.tp, rank))
            return packed[base][name.rsplit(".", 1)[1]]

        rel = shard_file(rank)
        info = write_safetensors(writer.open(rel), order, shapes, param_dtypes, produce,
                                 lambda done, total, rank=rank: progress.count(f"weights (shard {rank + 1} of {m.tp})", done, total))
        writer.record(rel, info)
        files.append(rel)
    return files


def sharding_of(m, order: list[str], stored: dict) -> dict[str, str]:
    """param -> how it is split (manifest `tensor_parallel.sharding`), for inspection and export."""
    splits = layout(m.family, m.config, m.tp)
    return {name: splits[stored[name][0]].describe() for name in order}
