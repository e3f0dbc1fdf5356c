"""Qwen3-MoE: the Qwen3 graph (q/k norm) whose MLP is a sparse MoE on the layers
`decoder_sparse_step` / `mlp_only_layers` pick (the rest keep a dense MLP of
`intermediate_size`); experts are `moe_intermediate_size` wide; the top-k
weights are renormalised only when `norm_topk_prob`."""

from __future__ import annotations

import dataclasses

from . import register
from .moe import MoEFamily
from .qwen3 import Qwen3ForCausalLM


@register("Qwen3MoeForCausalLM")
class Qwen3MoeForCausalLM(MoEFamily, Qwen3ForCausalLM):
    @classmethod
    def adapt_config(cls, config):
        config = super().adapt_config(config)
        # transformers' Qwen3MoeConfig defaults norm_topk_prob to False
        return dataclasses.replace(config, norm_topk_prob=bool(config.norm_topk_prob))
