"""Weights of a tensor-parallel artifact: one safetensors file per shard
(`weights.shard-K.safetensors`), so each worker maps only its own bytes. The
stages' write_weights writes them: each float param is read once per shard, cut
(frontends/models/sharding.py), then quantized like an unsharded param (group
scales travel with their rows)."""

from __future__ import annotations

from ..frontends.models.sharding import layout


def shard_file(rank: int) -> str:
    return f"weights.shard-{rank}.safetensors"


def sharding_of(m, order: list[str], stored: dict) -> dict[str, str]:
    """param -> how it is split (manifest `tensor_parallel.sharding`), for inspection and export."""
    splits = layout(m.family, m.config, m.tp)
    return {name: splits[stored[name][0]].describe() for name in order}
