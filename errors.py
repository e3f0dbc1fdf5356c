"""Typed errors. Every user-facing failure is a KilnError with a one-line message."""


class KilnError(Exception):
    """Base class: the CLI prints str(err) on one line and exits non-zero."""


class ModelFormatError(KilnError):
    """A model file (safetensors, GGUF, config.json, tokenizer) is malformed or hostile."""


class UnsupportedModelError(KilnError):
    """The model is well formed but kiln does not support it (architecture, dtype, ...)."""


class ArtifactError(KilnError):
    """An artifact is missing, corrupt, or was built for another machine/version."""


class CompileError(KilnError):
    """Compilation failed (target, output path, codegen)."""


class RequestError(KilnError):
    """A generation request has an invalid field (prompt too long, bad sampling value)."""
