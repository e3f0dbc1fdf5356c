"""What every frontend produces: a validated checkpoint, read lazily.

`open_checkpoint(path)` accepts an HF directory, a `.safetensors` file (with
config.json beside it), a sharded `model.safetensors.index.json`, or a `.gguf`.
Tensors are named with HF names (GGUF names are mapped and llama.cpp's q/k
permutation undone), so one conversion (`DecoderLM.convert_hf`) serves all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError


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


def open_checkpoint(path: str | Path, *, weights: bool = True) -> Checkpoint:
    """Open and validate a checkpoint; ModelFormatError names the file on failure.

    weights=False: only the config is read (`path` may be a config.json alone)."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if not weights:
        from .hf import open_config_only  # noqa: PLC0415

        return open_config_only(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from .gguf_reader import open_gguf  # noqa: PLC0415

        return open_gguf(p)
    from .hf import open_hf_checkpoint  # noqa: PLC0415

    return open_hf_checkpoint(p)
