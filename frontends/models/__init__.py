"""Model families, registered by the checkpoint's `architectures[0]` string."""

from __future__ import annotations

from ...errors import UnsupportedModelError

_REGISTRY: dict[str, type] = {}


def register(*architectures: str):
    """Class decorator: make a family available under these HF architecture names."""

    def wrap(cls):
        for arch in architectures:
            _REGISTRY[arch] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def family_for(architecture: str, file: str = "config.json") -> type:
    """The model class for `architecture`; an unknown one fails listing the supported ones."""
    _load_families()
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"{file}: architecture {architecture!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _load_families() -> None:
    # Importing the family files runs their @register decorators.
    from . import deepseek, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe  # noqa: F401,PLC0415
