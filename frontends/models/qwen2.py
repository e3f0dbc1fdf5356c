"""Qwen2: the Llama graph with a bias on the Q, K and V projections (not on O)."""

from __future__ import annotations

import dataclasses

from . import register
from .llama import LlamaForCausalLM


@register("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def adapt_config(cls, config):
        # Qwen2 always has a q/k/v bias and never an o or MLP bias, whatever config.json says.
        return dataclasses.replace(config, attention_bias=True, attention_out_bias=False, mlp_bias=False)
