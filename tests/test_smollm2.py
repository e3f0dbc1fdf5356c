"""The real bundled model, SmolLM2-135M-Instruct (Q4_1 GGUF), end to end.

Compiled twice: from the GGUF directly, and from its HF export (`kiln export
--hf`: the same dequantized tensors). Both artifacts must give transformers' greedy tokens
on that HF checkpoint. Skips without the model file (see the smollm2_gguf fixture in conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # compiles SmolLM2 twice, runs the demo

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import compile_artifacts, hf_greedy, load_hf_model  # noqa: E402

from kiln.runtime import SamplingParams, load  # noqa: E402

NEW_TOKENS = 32
# (prompt, apply the chat template)
PROMPTS = [
    ("The capital of France is", False),
    ("def fibonacci(n):", False),
    ("What is the boiling point of water?", True),
]


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory):
    """The GGUF as an HF checkpoint (`kiln export --hf`): dequantized float32 tensors under HF names."""
    from kiln.compiler.export import export_hf  # noqa: PLC0415

    out = tmp_path_factory.mktemp("smollm2_hf")
    export_hf(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session")
def smollm2_artifacts(smollm2_gguf, smollm2_hf_dir, tmp_path_factory):
    """source -> compiled artifact (float32, llvm), for source in ("gguf", "hf")."""
    root = tmp_path_factory.mktemp("smollm2_art")
    sources = {"gguf": smollm2_gguf, "hf": smollm2_hf_dir}
    return dict(zip(sources, compile_artifacts([(src, root / f"{name}.kiln", {}) for name, src in sources.items()])))


@pytest.fixture(scope="module")
def sessions(smollm2_artifacts):
    return {name: load(path, max_seq_len=512) for name, path in smollm2_artifacts.items()}


@pytest.fixture(scope="module")
def reference(smollm2_hf_dir):
    return load_hf_model(smollm2_hf_dir)


@pytest.mark.parametrize(("prompt", "chat"), PROMPTS)
def test_greedy_matches_transformers(prompt, chat, sessions, reference):
    ids = sessions["gguf"].encode_prompt(prompt, chat=chat)
    assert len(ids) >= 4
    want = hf_greedy(reference, ids, NEW_TOKENS)
    for name, s in sessions.items():
        got = s.generate(ids, max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0), ignore_eos=True).tokens
        assert got == want, f"{name} artifact diverges from transformers at token {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"


def test_logits_match_transformers(sessions, reference):
    ids = sessions["gguf"].encode_prompt(PROMPTS[0][0])
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    for name, s in sessions.items():
        got = s.logits(ids)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err < 1e-4, f"{name}: relative logits error {err:.2e}"


def test_tokenizer_round_trip(sessions):
    s = sessions["gguf"]
    text = "The capital of France is Paris. 12345 héllo!"
    assert s.tokenizer.decode(s.encode_prompt(text)) == text
    chat = s.tokenizer.decode(s.encode_prompt("hi", chat=True))
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_readme_demo_command(smollm2_gguf, tmp_path):
    """`kiln demo` (the README's main job) compiles the bundled model into the
    cache and answers a chat prompt: run as a user would, in a child process."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    env.update(KILN_CACHE=str(tmp_path), KILN_SMOLLM2_GGUF=str(smollm2_gguf))
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "demo", "--max-new-tokens", "12"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout
    assert (tmp_path / "smollm2-float16.kiln" / "manifest.json").is_file()
