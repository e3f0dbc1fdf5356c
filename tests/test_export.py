"""`kiln export MODEL --hf DIR` (compiler/export.py): a GGUF or a float artifact
becomes an HF directory that transformers loads, whose logits and tokens are
kiln's own. A tiny GGUF (tests/helpers/tiny_gguf.write_tiny: llama q/k
permutation, llama3 rope_freqs, F16/BF16/Q8_0 tensors, add_bos) always; the
bundled SmolLM2 GGUF where it is present (the smollm2_gguf fixture)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import compile_artifact, hf_logits, load_hf_model, rel_err, slow_except  # noqa: E402
from helpers.tiny_gguf import HEAD_DIM, write_tiny  # noqa: E402

from kiln.cli import main as cli_main  # noqa: E402
from kiln.compiler import export as export_mod  # noqa: E402
from kiln.compiler.export import export_hf  # noqa: E402
from kiln.errors import ArtifactError, CompileError, ModelFormatError, UnsupportedModelError  # noqa: E402
from kiln.frontends.readers import open_checkpoint  # noqa: E402
from kiln.frontends.config import ModelConfig  # noqa: E402
from kiln.runtime import load  # noqa: E402
from kiln.runtime import manifest as mf  # noqa: E402

REL_TOL = 1e-4  # float32 transformers vs float32 kiln, relative to the largest logit
TEXT = "hello world 42<|im_start|><think>"


def _llama3_factors(theta=500000.0, factor=8.0) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 scaling (low 1, high 4, original context 8192)."""
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    wavelen = 2 * math.pi / freqs
    smooth = (8192 / wavelen - 1) / 3
    return np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth)))


def _chat_ids(tok, text: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, its HF export, kiln's float32 artifact of the gguf)."""
    root = tmp_path_factory.mktemp("export_tiny")
    gguf = root / "tiny.gguf"
    dtypes = {"model.layers.0.mlp.up_proj.weight": Q.F16, "model.layers.0.mlp.gate_proj.weight": Q.BF16,
              "model.layers.1.mlp.up_proj.weight": Q.Q8_0, "model.layers.1.self_attn.q_proj.weight": Q.Q8_0}  # fmt: skip
    write_tiny(gguf, rope_freqs=_llama3_factors(), dtypes=dtypes)
    hf = root / "hf"
    summary = export_hf(gguf, hf)
    assert summary.output == hf and summary.tokenizer and summary.chat_template
    return gguf, hf, compile_artifact(gguf, root / "tiny.kiln")


# --- (b) a tiny GGUF, no real model needed ---------------------------------------------
def test_tiny_export_files_and_config(tiny):
    gguf, hf, _ = tiny
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not list(hf.parent.glob(".hf.tmp-*"))
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"], cfg["torch_dtype"]) == (["LlamaForCausalLM"], "llama", "float32")
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}  # fmt: skip
    assert (cfg["rope_theta"], cfg["tie_word_embeddings"], cfg["bos_token_id"], cfg["eos_token_id"]) == (500000.0, False, 1, 2)
    hf_cfg = transformers.AutoConfig.from_pretrained(hf)
    assert hf_cfg.rope_parameters["rope_type"] == "llama3" and hf_cfg.rope_parameters["rope_theta"] == 500000.0
    # kiln reads the export back as the same model
    ck, src = open_checkpoint(hf), open_checkpoint(gguf)
    drop = ("extra", "source_dtype")
    assert {k: v for k, v in ModelConfig.from_dict(ck.config).to_dict().items() if k not in drop} == \
           {k: v for k, v in ModelConfig.from_dict(src.config).to_dict().items() if k not in drop}
    for f in ("chat_template", "bos_token", "eos_token", "add_bos"):
        assert getattr(ck.tokenizer, f) == getattr(src.tokenizer, f), f


def test_tiny_tensors_are_the_gguf_tensors(tiny):
    """Every tensor is what the GGUF reader loads (HF names, q/k rows un-permuted), bit for bit."""
    gguf, hf, _ = tiny
    ck = open_checkpoint(gguf)
    got = load_file(str(hf / "model.safetensors"))
    assert sorted(got) == sorted(ck.tensor_names)
    for name in ck.tensor_names:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], ck.load(name), err_msg=name)
    with safe_open(str(hf / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_tiny_transformers_matches_kiln(tiny):
    """transformers on the export: the logits and the tokens of kiln's float32 compile of the GGUF."""
    _, hf, art = tiny
    s = load(art, max_seq_len=128)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    ids = s.encode_prompt(TEXT)
    assert ids[0] == 1 and tok(TEXT).input_ids == ids  # add_bos: one BOS from the post-processor
    assert tok.decode(ids[1:]) == TEXT
    assert _chat_ids(tok, "hello") == s.encode_prompt("hello", chat=True)
    model = load_hf_model(hf)
    ids = ids + [(7 * i + 3) % s.vocab_size for i in range(9)]  # 17 tokens
    err = rel_err(s.logits(ids), hf_logits(model, ids))
    assert err < REL_TOL, f"relative logits error {err:.2e}"


def test_artifact_export_equals_gguf_export(tiny, tmp_path):
    """A float artifact exports to the same directory (qkv / gate_up cut back into HF tensors)."""
    _, hf, art = tiny
    out = tmp_path / "from_artifact"
    out.mkdir()  # an existing empty directory is fine
    export_hf(art, out)
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        assert json.loads((out / name).read_text()) == json.loads((hf / name).read_text()), name
    want, got = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_float16_export(tiny, tmp_path):
    gguf, hf, _ = tiny
    out = tmp_path / "f16"
    export_hf(gguf, out, dtype="float16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    want, got = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in want:
        assert got[name].dtype == np.float16
        np.testing.assert_array_equal(got[name], want[name].astype(np.float16), err_msg=name)


def test_quantized_and_weightless_artifacts_are_refused(tiny, tmp_path):
    _, _, art = tiny
    for field, value, match in (("quant", {"weights": "q8", "roles": {}}, "quantized artifact \\(q8\\)"),
                                ("weights_file", None, "no-weights")):
        copy = tmp_path / f"{field}.kiln"
        shutil.copytree(art, copy)
        m = json.loads((copy / mf.MANIFEST_NAME).read_text())
        m[field] = value
        (copy / mf.MANIFEST_NAME).write_text(json.dumps(mf.seal(m)))
        with pytest.raises((ArtifactError, UnsupportedModelError), match=match) as e:
            export_hf(copy, tmp_path / f"out_{field}")
        assert str(copy) in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / f"out_{field}").exists()


# --- (c) bad inputs: one line, naming the file -------------------------------------------
def test_bad_inputs(tiny, tmp_path):
    gguf, hf, _ = tiny
    cases = []
    missing = tmp_path / "nope.gguf"
    cases.append((missing, tmp_path / "o1", ModelFormatError, "no such file"))
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    cases.append((text, tmp_path / "o2", ModelFormatError, "not a .gguf file"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(60))
    cases.append((fake, tmp_path / "o3", ModelFormatError, "not a GGUF file"))
    cases.append((hf, tmp_path / "o4", ModelFormatError, "not a kiln artifact"))  # an HF dir is not an export source
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases.append((gguf, full, CompileError, "exists and is not empty"))
    cases.append((gguf, text, CompileError, "exists and is not a directory"))
    cases.append((gguf, tmp_path / "no" / "such" / "parent", CompileError, "no such directory"))
    for model, out, err, match in cases:
        with pytest.raises(err, match=match) as e:
            export_hf(model, out)
        msg = str(e.value)
        assert "\n" not in msg and (str(model) in msg or str(out) in msg or str(out.parent) in msg), msg
    assert [p.name for p in full.iterdir()] == ["keep.txt"] and (full / "keep.txt").read_text() == "mine"
    with pytest.raises(CompileError, match="--dtype"):
        export_hf(gguf, tmp_path / "o5", dtype="int8")


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    gguf, _, _ = tiny
    real = export_mod.write_hf_safetensors

    def fail_on_fifth(path, order, shapes, dtype, produce, progress):
        def produce_or_fail(name):
            if name == order[4]:
                raise ModelFormatError(f"{gguf}: tensor {name} has 1 NaN/Inf values")
            return produce(name)

        real(path, order, shapes, dtype, produce_or_fail, progress)

    monkeypatch.setattr(export_mod, "write_hf_safetensors", fail_on_fifth)
    with pytest.raises(ModelFormatError, match="NaN"):
        export_hf(gguf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp dir


def test_cli_export(tiny, tmp_path, capsys):
    gguf, _, _ = tiny
    assert cli_main(["export", str(gguf), "--hf", str(tmp_path / "cli"), "--dtype", "bfloat16"]) == 0
    assert "exported" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert cli_main(["export", str(gguf), "--hf", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error: ") and "not empty" in err and "\n" not in err


# --- (a) the bundled SmolLM2 GGUF ---------------------------------------------------------
@pytest.mark.slow
def test_smollm2_export_matches_kiln(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_smollm2")
    hf = root / "hf"
    summary = export_hf(smollm2_gguf, hf)
    assert summary.num_tensors == 272 and summary.chat_template
    s = load(compile_artifact(smollm2_gguf, root / "smollm2.kiln"), max_seq_len=256)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    prompt = "The capital of France is"
    ids = s.encode_prompt(prompt)
    assert tok(prompt).input_ids == ids
    assert _chat_ids(tok, "What is 2+2?") == s.encode_prompt("What is 2+2?", chat=True)
    err = rel_err(s.logits(ids), hf_logits(load_hf_model(hf), ids))
    assert err < REL_TOL, f"relative logits error {err:.2e}"


@pytest.mark.parametrize("variant", slow_except(["qwen2", "qwen3", "llama_bias", "llama_tied_rope3", "mistral"]))  # all slow: test_tiny_export_files_and_config keeps llama fast
def test_artifact_export_per_architecture(variant, tiny_checkpoint, compiled, hf_model, tmp_path):
    """A float artifact of each architecture's tiny HF checkpoint exports back to that
    checkpoint: the same tensors (biases, q/k norms, tied embeddings) and the same logits."""
    out = tmp_path / "hf"
    export_hf(compiled(variant), out)
    want = load_file(str(tiny_checkpoint(variant) / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(n for n in want if not n.endswith("rotary_emb.inv_freq"))
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    ids = [(11 * i + 5) % 211 for i in range(13)]
    err = rel_err(hf_logits(load_hf_model(out), ids), hf_logits(hf_model(variant), ids))
    assert err < 1e-6, f"relative logits error {err:.2e}"
