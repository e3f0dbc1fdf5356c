"""Fixtures: tiny random HF checkpoints per architecture, their compiled
artifacts and transformers models (cached per session), and the bundled
SmolLM2 GGUF. The functions behind them are in tests/helpers."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

# Load the full TVM (compiler included) before anything imports the kiln
# runtime, which would otherwise load TVM runtime-only for the whole process.
from kiln.tvm_compat import compiler as _load_full_tvm

_load_full_tvm()

from helpers import SEEDS, compile_artifact, gemma3_path, load_hf_model, make_tiny_checkpoint, smollm2_path  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: variant name (see helpers.VARIANTS) -> path of its tiny HF checkpoint dir (save_pretrained)."""
    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"hf_{variant}"), variant, seed=SEEDS[variant])
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def compiled(tiny_checkpoint, tmp_path_factory):
    """Factory: variant name -> path of its compiled artifact (float32, llvm).

    Under pytest-xdist the workers share one folder of these: the first to need a variant
    compiles it (holding a lock on the variant), the others wait and load the same artifact.
    The checkpoints are seeded per variant, so any worker's compile is every worker's."""
    cache: dict[str, Path] = {}
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_artifacts"
    root.mkdir(exist_ok=True)

    def build(variant: str) -> Path:
        if variant not in cache:
            out = root / variant / f"{variant}.kiln"
            with open(root / f"{variant}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (out / "manifest.json").is_file():
                    out.parent.mkdir(exist_ok=True)
                    compile_artifact(tiny_checkpoint(variant), out)
            cache[variant] = out
        return cache[variant]

    return build


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    """Factory: variant name -> transformers reference model (cached)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = load_hf_model(tiny_checkpoint(variant))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, or skip (set KILN_SMOLLM2_GGUF or KILN_FETCH_MODELS=1)."""
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 GGUF not found: set KILN_SMOLLM2_GGUF, or KILN_FETCH_MODELS=1 to download it (kiln.frontends.bundled)")
    return p


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF, or skip (set KILN_GEMMA3_GGUF or KILN_FETCH_MODELS=1)."""
    p = gemma3_path()
    if p is None:
        pytest.skip("Gemma-3-270M GGUF not found: set KILN_GEMMA3_GGUF, or KILN_FETCH_MODELS=1 to download it (kiln.frontends.bundled)")
    return p
