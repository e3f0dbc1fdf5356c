"""Shared test helpers (plain functions, not fixtures: those live in conftest.py).

- models: the one tiny-checkpoint factory `make_tiny_checkpoint` (transformers'
  `save_pretrained` for every architecture, or the numpy-written llama with a
  tokenizer), the variants and their seeds, where the bundled SmolLM2 GGUF is.
- tiny_gguf: tiny GGUF files written with gguf.GGUFWriter.
- processes: compiling from a test, in this process or in a child
  (`compile_artifact`, `compile_artifacts` two at a time, `run_compiler_code`,
  `run_python`), the artifact shared by the artifact and runtime-request tests,
  and `MemoLogits` (a reference's logits computed once for several candidates).
- reference: transformers as the reference (`load_hf_model`, `hf_logits`, `hf_greedy`),
  `random_ids`, `rel_err` (max |got - want| / max |want|), and `dequantized_hf` (the
  reference with a quantized artifact's weights).
- tiers: `slow_except`, to keep one or two cases of a long sweep in the fast tier.

Tests import them as `from helpers import ...`: pytest puts tests/ on sys.path
(`pythonpath` in pyproject.toml's [tool.pytest.ini_options]).
"""

from .models import ARCHS, SEEDS, TINY, VARIANTS, VOCAB, gemma3_path, make_tiny_checkpoint, smollm2_path
from .processes import (
    MemoLogits,
    compile_artifact,
    compile_artifacts,
    compile_script,
    copy_artifact,
    prefer_full_tvm,
    run_compiler_code,
    run_python,
    shared_artifact,
    subprocess_env,
)
from .reference import dequantized_hf, hf_greedy, hf_logits, load_hf_model, random_ids, rel_err
from .tiers import slow_except

__all__ = [
    "ARCHS",
    "SEEDS",
    "TINY",
    "VARIANTS",
    "VOCAB",
    "compile_artifact",
    "compile_script",
    "copy_artifact",
    "dequantized_hf",
    "gemma3_path",
    "hf_greedy",
    "load_hf_model",
    "make_tiny_checkpoint",
    "prefer_full_tvm",
    "run_compiler_code",
    "run_python",
    "shared_artifact",
    "slow_except",
    "smollm2_path",
    "subprocess_env",
]
