"""What every frontend produces: a validated checkpoint, read lazily.

Every reader (frontends/readers.py lists them) returns a `Checkpoint` whose
tensors are named with HF names (GGUF names are mapped and llama.cpp's q/k
permutation undone), so one conversion (`DecoderLM.convert_hf`) serves all.
This module imports no reader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenizerFiles:
    """The tokenizer as the artifact ships it.

    tokenizer_json: HF `tokenizers` serialisation (tokenizer.json text).
    chat_template: jinja2 template text, or None.
    bos_token / eos_token: token strings used by the chat template, or None.
    add_bos: prepend BOS when encoding a plain prompt.
    """

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False
    extra_eos_tokens: list[str] = field(default_factory=list)


@dataclass
class Checkpoint:
    """A model checkpoint, validated, with tensors loaded on demand.

    config: the raw config dict (HF keys) -> ModelConfig.from_dict.
    tensor_names: every tensor in the checkpoint (HF names).
    load: name -> np.ndarray (float32/float16/bfloat16 in its stored dtype), reads lazily.
    tokenizer: None when the checkpoint carries none (then only --tokens works).
    source: the path shown in error messages.
    """

    config: dict
    tensor_names: list[str]
    load: Callable[[str], np.ndarray]
    tokenizer: TokenizerFiles | None
    source: str
    format: str  # "safetensors" | "gguf"
    tensor_dtypes: dict[str, str] = field(default_factory=dict)
    # (name, kiln weight format) -> that format's arrays taken straight from the
    # file's own quantized blocks when they are exactly that format, else None
    load_quantized: Callable[[str, str], dict | None] | None = None

