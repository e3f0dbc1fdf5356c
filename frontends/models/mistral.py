"""Mistral: the Llama graph without any bias. A sliding window applies to every
layer: window-masked attention on CPU, a cap on the context elsewhere (see
compiler.build)."""

from __future__ import annotations

import dataclasses

from . import register
from .llama import LlamaForCausalLM


@register("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def adapt_config(cls, config):
        # transformers' Mistral has no bias anywhere and reads no bias flag.
        return dataclasses.replace(config, attention_bias=False, attention_out_bias=False, mlp_bias=False)
