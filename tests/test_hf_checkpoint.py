"""Opening HF checkpoint directories: layouts, tokenizer files, and hostile
directories (THREATS 7, 10, 13, 14)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from kiln.errors import ModelFormatError
from kiln.frontends import hf
from kiln.frontends.hf import open_hf_checkpoint
from kiln.frontends.readers import open_checkpoint

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 11,
    "torch_dtype": "float32",
}
TOKENIZER_JSON = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})


def tensors(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((11, 8)).astype(dtype),
        "model.norm.weight": rng.standard_normal(8).astype(dtype),
        "lm_head.weight": rng.standard_normal((11, 8)).astype(dtype),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(dtype),
    }


def make_dir(d, weights=None, *, config=CONFIG, shards=None, tokenizer=True):
    """A model directory; `shards` maps shard file -> list of tensor names (writes an index)."""
    d.mkdir(parents=True, exist_ok=True)
    weights = tensors() if weights is None else weights
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if shards is None:
        safetensors.numpy.save_file(weights, str(d / "model.safetensors"))
    else:
        weight_map = {}
        for shard, names in shards.items():
            safetensors.numpy.save_file({n: weights[n] for n in names}, str(d / shard))
            weight_map.update({n: shard for n in names})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        (d / "tokenizer.json").write_text(TOKENIZER_JSON)
    return d


def write_index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


TWO_SHARDS = {
    "model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.norm.weight"],
    "model-00002-of-00002.safetensors": ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight"],
}


def expect_error(path, *words, opener=open_hf_checkpoint):
    with pytest.raises(ModelFormatError) as info:
        opener(path)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def assert_same(ckpt, weights):
    assert sorted(ckpt.tensor_names) == sorted(weights)
    for name, want in weights.items():
        got = ckpt.load(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


# --- happy paths ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype, code", [(np.float32, "F32"), (np.float16, "F16"), (ml_dtypes.bfloat16, "BF16")])
def test_directory_with_one_file(tmp_path, dtype, code):
    w = tensors(dtype)
    d = make_dir(tmp_path / "m", w)
    ckpt = open_checkpoint(d)
    assert ckpt.config == CONFIG and ckpt.format == "safetensors" and ckpt.source == str(d)
    assert ckpt.tensor_dtypes == {n: code for n in w}
    assert ckpt.tokenizer.tokenizer_json == TOKENIZER_JSON
    assert_same(ckpt, w)


def test_safetensors_file_path(tmp_path):
    d = make_dir(tmp_path / "m")
    ckpt = open_hf_checkpoint(d / "model.safetensors")
    assert_same(ckpt, tensors())


def test_two_shard_index_via_dir_and_via_index_path(tmp_path):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    for p in (d, d / "model.safetensors.index.json"):
        ckpt = open_hf_checkpoint(p)
        assert_same(ckpt, tensors())
    with pytest.raises(ModelFormatError, match="no tensor named 'nope'"):
        ckpt.load("nope")


def test_pickles_beside_safetensors_are_ignored(tmp_path):
    d = make_dir(tmp_path / "m")
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    assert_same(open_hf_checkpoint(d), tensors())
    assert not marker.exists()


# --- tokenizer files ----------------------------------------------------------------------
def test_tokenizer_config_fields(tmp_path):
    d = make_dir(tmp_path / "m")
    (d / "tokenizer_config.json").write_text(
        json.dumps({
            "chat_template": "{{ messages }}",
            "bos_token": {"content": "<s>", "lstrip": False},
            "eos_token": "</s>",
            "add_bos_token": True,
        })
    )
    tok = open_hf_checkpoint(d).tokenizer
    assert (tok.chat_template, tok.bos_token, tok.eos_token, tok.add_bos) == ("{{ messages }}", "<s>", "</s>", True)


def test_named_chat_templates_and_jinja_file(tmp_path):
    d = make_dir(tmp_path / "m")
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    tok = open_hf_checkpoint(d).tokenizer
    assert tok.chat_template == "D" and tok.add_bos is False and tok.bos_token is None
    (d / "chat_template.jinja").write_text("J ✓", encoding="utf-8")
    assert open_hf_checkpoint(d).tokenizer.chat_template == "J ✓"


def test_no_tokenizer_json_means_no_tokenizer(tmp_path):
    d = make_dir(tmp_path / "m", tokenizer=False)
    assert open_hf_checkpoint(d).tokenizer is None


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"add_bos_token": "yes"}, "add_bos_token"),
        ({"bos_token": 3}, "bos_token"),
        ({"eos_token": {"id": 3}}, "eos_token"),
        ({"chat_template": 5}, "chat_template"),
        ({"chat_template": [{"name": "default"}]}, "chat_template[0]"),
    ],
)
def test_tokenizer_config_bad_fields(tmp_path, cfg, field):
    d = make_dir(tmp_path / "m")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    expect_error(d, str(d / "tokenizer_config.json"), field)


def test_tokenizer_json_too_big_or_garbage(tmp_path, monkeypatch):
    d = make_dir(tmp_path / "m")
    (d / "tokenizer.json").write_bytes(b"\xff not json")
    expect_error(d, str(d / "tokenizer.json"), "UTF-8")
    (d / "tokenizer.json").write_text(TOKENIZER_JSON)
    monkeypatch.setattr(hf, "MAX_TOKENIZER_BYTES", 10)
    expect_error(d, str(d / "tokenizer.json"), "limit")


# --- config.json ------------------------------------------------------------------------
def test_config_missing(tmp_path):
    d = make_dir(tmp_path / "m", config=None)
    expect_error(d, "config.json", "no such file")


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{not json", ("not valid JSON",)),
        (b"[1]", ("top level",)),
        (b'{"architectures": ["A"], "architectures": ["B"]}', ("duplicate key 'architectures'",)),
        (b"[" * 5000 + b"]" * 5000, ("nested",)),
        (json.dumps({**CONFIG, "num_hidden_layers": 0}).encode(), ("num_hidden_layers",)),
        (json.dumps({**CONFIG, "max_position_embeddings": 2**63}).encode(), ("max_position_embeddings",)),
    ],
)
def test_config_bad(tmp_path, raw, words):
    d = make_dir(tmp_path / "m")
    (d / "config.json").write_bytes(raw)
    expect_error(d, str(d / "config.json"), *words)


def test_config_too_big(tmp_path, monkeypatch):
    d = make_dir(tmp_path / "m")
    monkeypatch.setattr(hf, "MAX_CONFIG_BYTES", 64)
    expect_error(d, str(d / "config.json"), "64-byte limit")


# --- 7: shards ----------------------------------------------------------------------------
def test_index_names_missing_shard(tmp_path):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    (d / "model-00002-of-00002.safetensors").unlink()
    expect_error(d, "model.safetensors.index.json", "'model-00002-of-00002.safetensors'", "does not exist", "lm_head.weight")


def test_tensor_in_two_shards(tmp_path):
    shards = {"a.safetensors": ["model.norm.weight", "lm_head.weight"], "b.safetensors": ["model.norm.weight"]}
    d = make_dir(tmp_path / "m", shards=shards)
    write_index(d, {"model.norm.weight": "a.safetensors", "lm_head.weight": "b.safetensors"})
    expect_error(d, "b.safetensors", "'model.norm.weight'", "also in shard 'a.safetensors'")


def test_index_points_to_wrong_shard(tmp_path):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    write_index(d, {"model.norm.weight": "model-00002-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"})
    expect_error(d, "model.safetensors.index.json", "'model.norm.weight'")


def test_shard_tensor_not_in_index(tmp_path):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    write_index(d, {n: s for s, ns in TWO_SHARDS.items() for n in ns if n != "lm_head.weight"})
    expect_error(d, "model-00002-of-00002.safetensors", "'lm_head.weight'", "not listed")


@pytest.mark.parametrize("weight_map", [{}, {"a": 5}, ["a.safetensors"]])
def test_bad_weight_map(tmp_path, weight_map):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expect_error(d, "model.safetensors.index.json", "weight_map")


def test_truncated_shard(tmp_path):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    expect_error(d, str(shard), "truncated")


def test_unsupported_and_non_float_dtypes(tmp_path):
    d = make_dir(tmp_path / "m")
    safetensors.numpy.save_file({**tensors(), "model.position_ids": np.arange(4)}, str(d / "model.safetensors"))
    expect_error(d, str(d / "model.safetensors"), "tensor model.position_ids has dtype I64, supported: F32, F16, BF16")
    hdr = json.dumps({"w": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(4))
    expect_error(d, str(d / "model.safetensors"), "tensor w has dtype F8_E8M0, supported:")


def test_several_files_without_index_is_ambiguous(tmp_path):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    (d / "model.safetensors.index.json").unlink()
    expect_error(d, str(d), "no model.safetensors.index.json")


# --- 13: paths ----------------------------------------------------------------------------
def test_unicode_spaces_and_long_paths(tmp_path):
    d = tmp_path / ("長い" * 40) / ("d" * 250) / ("e" * 250) / "моя модель with spaces 🙂"
    assert len(os.fsencode(d)) > 800
    make_dir(d, shards=TWO_SHARDS)
    assert_same(open_checkpoint(d), tensors())
    assert_same(open_checkpoint(d / "model-00001-of-00002.safetensors"), {k: tensors()[k] for k in TWO_SHARDS["model-00001-of-00002.safetensors"]})


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/x.safetensors", "..", "x.bin"])
def test_index_shard_names_must_be_plain_files(tmp_path, shard):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    safetensors.numpy.save_file(tensors(), str(tmp_path / "outside.safetensors"))
    write_index(d, {"model.norm.weight": shard})
    expect_error(d, "model.safetensors.index.json", repr(shard), "model.norm.weight")


def test_symlinked_shard_outside_dir_is_refused(tmp_path):
    d = make_dir(tmp_path / "m", shards=TWO_SHARDS)
    shard = d / "model-00002-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    expect_error(d, str(shard), "outside the model directory")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_symlinked_file_outside_dir_is_refused(tmp_path, name):
    d = make_dir(tmp_path / "m")
    outside = tmp_path / ("other_" + name)
    (d / name).rename(outside)
    (d / name).symlink_to(os.path.relpath(outside, d))
    expect_error(d, str(d / name), "outside the model directory")


def test_symlink_inside_dir_and_symlinked_model_dir_work(tmp_path):
    d = make_dir(tmp_path / "m")
    (d / "model.safetensors").rename(d / "real.bin.safetensors")
    (d / "model.safetensors").symlink_to("real.bin.safetensors")
    link = tmp_path / "link"
    link.symlink_to(d)
    assert_same(open_hf_checkpoint(link), tensors())


def test_hf_hub_cache_layout_is_allowed(tmp_path):
    repo = tmp_path / "models--org--tiny"
    snap = make_dir(repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    for f in list(snap.iterdir()):
        blob = repo / "blobs" / ("sha-" + f.name)
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, snap))
    assert_same(open_hf_checkpoint(snap), tensors())


# --- 14: pickles; 10: remote code ---------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_pickle(marker):
    return pickle.dumps(_Evil(marker))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "w.pkl", "last.ckpt"])
def test_pickle_only_directory_is_refused_unopened(tmp_path, name):
    d = make_dir(tmp_path / "m")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (d / name).write_bytes(_evil_pickle(marker))
    msg = expect_error(d, str(d), name, "does not load pickle", "safetensors")
    assert not marker.exists(), msg
    expect_error(d / name, name, "does not load pickle")
    assert not marker.exists()


def test_auto_map_code_is_never_imported(tmp_path):
    d = make_dir(tmp_path / "m", config={**CONFIG, "auto_map": {"AutoModelForCausalLM": "modeling_x.EvilForCausalLM"}})
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').write('pwned')\nclass EvilForCausalLM: pass\n"
    for f in ("modeling_x.py", "configuration_x.py", "__init__.py", "tokenization_x.py"):
        (d / f).write_text(code)
    ckpt = open_checkpoint(d)
    assert ckpt.config["auto_map"]  # kept visible, never acted on
    assert_same(ckpt, tensors())
    assert not marker.exists()
    assert not any(p.suffix == ".pyc" or p.name == "__pycache__" for p in d.rglob("*"))


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope", "no such file")
    (tmp_path / "notes.txt").write_text("x")
    expect_error(tmp_path / "notes.txt", "not a checkpoint")
