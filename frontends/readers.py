"""The checkpoint readers, registered in one place, and `open_checkpoint`.

`open_checkpoint(path)` accepts an HF directory, a `.safetensors` file (with
config.json beside it), a sharded `model.safetensors.index.json`, or a `.gguf`:
the first reader in READERS that recognises the path opens it. Readers import
only `checkpoint` (the types), never this module, so there is no import cycle.
Adding a format is one reader module and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFormatError
from .checkpoint import Checkpoint
from .gguf_reader import open_gguf
from .hf import open_config_only, open_hf_checkpoint


@dataclass(frozen=True)
class Reader:
    """One checkpoint format: how a path is recognised, and how it is opened."""

    format: str  # Checkpoint.format of what `open` returns
    recognises: Callable[[Path], bool]  # called on a path that exists
    open: Callable[[Path], Checkpoint]


def _is_gguf(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() == ".gguf"


def _any_other(p: Path) -> bool:
    return True


# In order; the first that recognises the path opens it. The HF reader comes
# last and takes every other path (a directory, .safetensors, an index): it
# refuses anything else itself, naming what it expected (pickles included).
READERS: tuple[Reader, ...] = (
    Reader("gguf", _is_gguf, open_gguf),
    Reader("safetensors", _any_other, open_hf_checkpoint),
)


def open_checkpoint(path: str | Path, *, weights: bool = True) -> Checkpoint:
    """Open and validate a checkpoint; ModelFormatError names the file on failure.

    weights=False: only the config is read (`path` may be a config.json alone)."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if not weights:
        return open_config_only(p)
    reader = next(r for r in READERS if r.recognises(p))
    return reader.open(p)
