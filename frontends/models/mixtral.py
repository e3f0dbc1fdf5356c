"""Mixtral: the Mistral graph with a sparse MoE MLP in every layer (softmax
router, top-k of E experts, weights always renormalised over the k)."""

from __future__ import annotations

import dataclasses

from . import register
from .mistral import MistralForCausalLM
from .moe import MoEFamily


@register("MixtralForCausalLM")
class MixtralForCausalLM(MoEFamily, MistralForCausalLM):
    hf_moe = "block_sparse_moe"
    hf_expert = ("w1", "w3", "w2")  # gate, up, down

    @classmethod
    def adapt_config(cls, config):
        # transformers' Mixtral router always renormalises; every layer is sparse
        config = super().adapt_config(config)
        return dataclasses.replace(config, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=())
