"""A tiny random Llama checkpoint and its compiled artifact, shared by the
artifact and runtime-request tests (not a conftest: plain helpers).

The checkpoint is written with numpy in HF layout (names, config.json,
tokenizer.json) rather than by transformers' save_pretrained, which is slower here:
dim 72, 3 heads / 1 KV head, FFN 100, vocab 211, 2 layers, context 128.

Compilation runs in this process when it has the full TVM, else in a child:
kiln.runtime imports TVM runtime-only when it comes first, after which this
process cannot compile.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import safetensors.numpy

VOCAB = 211
HIDDEN = 72
HEADS = 3
KV_HEADS = 1
HEAD_DIM = HIDDEN // HEADS
FFN = 100
LAYERS = 2
MAX_CTX = 128

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_CTX,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

# A character-level tokenizer with exactly VOCAB tokens: 3 specials, printable
# ASCII, then Latin-1, Greek and a few CJK characters and one emoji.
_SPECIALS = ["<unk>", "<s>", "</s>"]
_CHARS = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xC0, 0x100)] + [chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2]
_CHARS += ["世", "界", "日", "本", "👋"]


def tokenizer_json() -> str:
    chars = (_CHARS + [chr(0x4E00 + i) for i in range(VOCAB)])[: VOCAB - len(_SPECIALS)]
    vocab = {t: i for i, t in enumerate(_SPECIALS + chars)}
    assert len(vocab) == VOCAB
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, t in enumerate(_SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    }, ensure_ascii=False)


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": norm(), "lm_head.weight": w(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        })
    return out


def write_model(d: Path, seed: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIG))
    safetensors.numpy.save_file(tensors(seed), str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))
    return d


def subprocess_env() -> dict[str, str]:
    """The environment for a child that may compile: never runtime-only TVM."""
    env = dict(os.environ)
    env.pop("TVM_USE_RUNTIME_LIB", None)  # kiln.tvm_compat.runtime() sets it in this process
    env.setdefault("TVM_NUM_THREADS", "1")
    return env


def run_python(code: str, *, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def can_compile_in_process() -> bool:
    from kiln.tvm_compat import runtime_only_loaded

    prefer_full_tvm()
    return "tvm" in sys.modules and not runtime_only_loaded()


def run_compiler_code(code: str) -> str:
    """Run code that needs the TVM compiler; returns what it printed.

    In this process when it has (or can still get) the full TVM, which saves a
    TVM import per call; otherwise in a child process.
    """
    code = textwrap.dedent(code)
    if can_compile_in_process():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<compiler code>", "exec"), {"__name__": "__kiln_test__"})  # noqa: S102
        return buf.getvalue()
    return run_python(code).stdout


def compile_script(model: Path, out: Path) -> str:
    return f"""
        from kiln.compiler.build import compile_model
        compile_model({str(model)!r}, {str(out)!r}, target="llvm", dtype="float32")
    """


def compile_tiny(model: Path, out: Path) -> Path:
    run_compiler_code(compile_script(model, out))
    return out


_CACHE: dict[str, Path] = {}


def shared_artifact(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, artifact dir), compiled once per pytest process. Read-only: copy before changing it."""
    root = tmp_path_factory.getbasetemp() / "kiln_tiny_llama"
    key = str(root)
    if key not in _CACHE:
        if root.exists():
            shutil.rmtree(root)
        model = write_model(root / "model")
        compile_tiny(model, root / "tiny.kiln")
        _CACHE[key] = root
    return _CACHE[key] / "model", _CACHE[key] / "tiny.kiln"


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def prefer_full_tvm() -> None:
    """Import TVM with its compiler into this process when nothing imported it runtime-only yet.

    kiln.runtime imports TVM runtime-only when it comes first, after which no
    later test in this pytest process could compile in-process; loading the
    full TVM first keeps the runtime tests from breaking other test files.
    """
    from kiln.errors import KilnError
    from kiln.tvm_compat import compiler, runtime_only_loaded

    if "tvm" in sys.modules or runtime_only_loaded():
        return
    try:
        compiler()
    except KilnError:
        pass
