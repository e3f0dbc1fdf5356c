"""The second real model: Gemma-3-270M from its Q4_K_M GGUF (Q4_K, Q6_K, Q5_0 and
Q8_0 blocks), compiled at float32, against transformers running the same
dequantized weights.

The reference is built here, apart from kiln's GGUF reader: gguf's GGUFReader
and numpy dequantizers, the llama.cpp -> HF names spelled out below, the
norms' +1 that llama.cpp's convert added taken off again, and a
Gemma3TextConfig from the file's metadata plus what llama.cpp's gemma3 graph
fixes (every 6th layer full, local RoPE base 10000, scores scaled by
head_dim^-1/2). Skips without the model file (see the gemma3_gguf fixture).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a 270M model: compile ~40 s, reference ~10 s

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import compile_artifact, hf_greedy, hf_logits, rel_err  # noqa: E402

from kiln.runtime import SamplingParams, load  # noqa: E402

LOGITS_RTOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 24
PROMPT = ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
          "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    layer, part, kind = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight)", name).groups()
    return f"model.layers.{layer}.{_NAMES[part]}.{kind}"


def _reference(path):
    """transformers' Gemma3ForCausalLM with the GGUF's dequantized weights (float32), and the vocabulary."""
    from gguf import GGUFReader, quants  # noqa: PLC0415

    r = GGUFReader(path)

    def meta(key):
        return r.fields[f"gemma3.{key}"].contents()

    layers, heads = meta("block_count"), meta("attention.head_count")
    config = transformers.Gemma3TextConfig(
        vocab_size=len(r.fields["tokenizer.ggml.tokens"].data), hidden_size=meta("embedding_length"),
        intermediate_size=meta("feed_forward_length"), num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=meta("attention.head_count_kv"), head_dim=meta("attention.key_length"),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon"), max_position_embeddings=meta("context_length"),
        sliding_window=meta("attention.sliding_window"), query_pre_attn_scalar=meta("attention.key_length"),
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": meta("rope.freq_base")}},
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    state = {}
    for t in r.tensors:
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        state[_hf_name(t.name)] = torch.from_numpy(w - 1.0 if t.name.endswith("norm.weight") else w)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = transformers.Gemma3ForCausalLM(config).to(torch.float32)
    model.load_state_dict(state, strict=True)
    model.config._attn_implementation = "eager"
    vocab = {bytes(r.fields["tokenizer.ggml.tokens"].parts[i]).decode(): n for n, i in enumerate(r.fields["tokenizer.ggml.tokens"].data)}
    return model.eval(), vocab


@pytest.fixture(scope="module")
def reference(gemma3_gguf):
    return _reference(gemma3_gguf)


@pytest.fixture(scope="module")
def session(gemma3_gguf, tmp_path_factory):
    return load(compile_artifact(gemma3_gguf, tmp_path_factory.mktemp("gemma3") / "g.kiln"))


def test_logits_and_greedy_match_transformers(session, reference):
    model, vocab = reference
    prompt = session.encode_prompt("The capital of France is")  # kiln's tokenizer, rebuilt from the GGUF
    assert prompt == [vocab[t] for t in PROMPT]
    got, want = session.logits(prompt), hf_logits(model, prompt)
    assert np.isfinite(got).all()
    err = rel_err(got, want)
    assert err < LOGITS_RTOL, f"relative logits error {err:.2e}"
    res = session.generate(prompt, max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0), ignore_eos=True)
    want_tokens = hf_greedy(model, prompt, NEW_TOKENS)
    assert res.tokens == want_tokens
    assert len(set(want_tokens)) > 5  # real text, not one token repeated
    assert res.text == session.tokenizer.decode(want_tokens) and "France" in res.text


def test_tokenizer_matches_transformers(gemma3_gguf, session):
    """kiln's Gemma tokenizer (frontends/gguf_tokenizer.py) against the one transformers
    rebuilds from the same GGUF (~45 s of its own), on text that reaches byte fallback,
    runs of spaces, control and user-defined tokens."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    ref = transformers.AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name).backend_tokenizer
    ours = Tokenizer.from_str(session.artifact.file("tokenizer.json").read_text(encoding="utf-8"))
    texts = ["Hello  world!\n\tdef f(x):  return x**2 # 日本語 👋", "   three spaces   and\n\n\nnewlines", " leading",
             "Ünïcödé ﬁ — … 1234567890 3.14159 \u0001\x7f", "<start_of_turn>user\nHi<end_of_turn> <unused5> [multimodal]"]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_past_the_window_matches_transformers(session, reference):
    """A prompt of ~700 tokens runs past the 512-token window of the sliding layers:
    prefill in chunks of 511 (the artifact's max_prefill_chunk), the sliding layers'
    window-masked kernels, then decode; last-position logits and 8 greedy tokens against
    transformers (whose sliding layers see the same 512 tokens)."""
    model, _ = reference
    kv = session.artifact.manifest["kv_cache"]
    assert (kv["window"], kv["max_prefill_chunk"], session.prefill_chunk) == (512, 511, 511)
    text = (ROOT / "README.md").read_text(encoding="utf-8")[:3000]
    prompt = session.encode_prompt(text)
    assert 600 < len(prompt) < 1000
    seq = session.add_sequence()
    try:
        got = session.prefill(seq, prompt)
    finally:
        session.remove_sequence(seq)
    with torch.no_grad():
        want = model(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1].numpy()
    err = rel_err(got, want)
    assert err < LOGITS_RTOL, f"relative logits error {err:.2e} past the window"
    res = session.generate(prompt, max_new_tokens=8, sampling=SamplingParams(temperature=0), ignore_eos=True)
    assert res.tokens == hf_greedy(model, prompt, 8)
