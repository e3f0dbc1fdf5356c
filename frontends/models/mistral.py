"""Mistral: the Llama graph. A sliding window shorter than the compiled context
is handled by capping the context at the window (see compiler.build)."""

from __future__ import annotations

from . import register
from .llama import LlamaForCausalLM


@register("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    pass
