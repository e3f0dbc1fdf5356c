"""`kiln export MODEL --hf DIR`: a GGUF file or a float kiln artifact -> a
Hugging Face model directory that transformers' `from_pretrained` reads.

DIR gets config.json (the HF config of the architecture, with the legacy
`rope_theta` / `rope_scaling` / `torch_dtype` keys that transformers 4.x and
5.x both read), model.safetensors (HF tensor names; q/k rows in HF's
half-split rotary order) and, when the source has a tokenizer, tokenizer.json
+ tokenizer_config.json (chat template, BOS/EOS) for AutoTokenizer.

Sources:
- a `.gguf`: frontends.gguf_reader already maps llama.cpp names to HF names,
  dequantizes blocks to float32 and undoes llama.cpp's q/k permutation, so its
  tensors are written as they load;
- a float kiln artifact (NAME.kiln): each param is cut back into the HF
  tensors `DecoderLM.hf_sources` says it was concatenated from (qkv_proj ->
  q/k/v_proj, gate_up_proj -> gate/up_proj). Quantized artifacts and
  `--no-weights` artifacts are refused: export the checkpoint they came from.

Written like an artifact: into a temp dir beside DIR, then renamed into place,
so a failed or killed export never leaves a half-written DIR. An existing
non-empty DIR is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import HashingWriter
from .artifact import fsync_dir as _fsync_dir
from .weights import write_safetensors
from ..errors import ArtifactError, CompileError, ModelFormatError, UnsupportedModelError
from ..frontends.checkpoint import TokenizerFiles
from ..frontends.config import ModelConfig
from ..frontends.readers import open_checkpoint
from ..runtime.dtypes import numpy_dtype

EXPORT_DTYPES = ("float32", "float16", "bfloat16")

# architectures[0] -> HF model_type (what AutoConfig dispatches on)
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Rows each HF projection holds in a kiln param that concatenates several
# (the layout of HF's own tensors, read off the config).
_SPLIT_ROWS: dict[str, Callable[[ModelConfig], int]] = {
    "q_proj": lambda c: c.q_size,
    "k_proj": lambda c: c.kv_size,
    "v_proj": lambda c: c.kv_size,
    "gate_proj": lambda c: c.intermediate_size,
    "up_proj": lambda c: c.intermediate_size,
}


@dataclass(frozen=True)
class ExportSummary:
    output: Path
    architecture: str
    num_tensors: int
    total_bytes: int
    dtype: str
    tokenizer: bool
    chat_template: bool
    seconds: float

    def line(self) -> str:
        tok = ("tokenizer + chat template" if self.chat_template else "tokenizer") if self.tokenizer else "no tokenizer"
        return (f"exported {self.output}: {self.architecture}, {self.num_tensors} tensors, {self.dtype}, "
                f"{self.total_bytes / 2**20:.1f} MiB, {tok} ({self.seconds:.1f} s)")


@dataclass
class _Source:
    """What export writes from, whatever the input format."""

    config: ModelConfig  # after the family's adapt_config
    family: type
    tensor: Callable[[str], np.ndarray]  # HF name -> array in HF layout (any float dtype)
    tokenizer: TokenizerFiles | None
    label: str  # the path errors name


def _noop(_msg: str) -> None:
    pass


def export_hf(model: str | Path, output: str | Path, *, dtype: str = "float32",
              progress: Callable[[str], None] = _noop) -> ExportSummary:
    """Write `output` as an HF model directory made from `model` (a .gguf file or a
    float kiln artifact directory); tensors are cast to `dtype`.

    Raises a KilnError with a one-line message naming the file or field on bad
    input, and CompileError when `output` exists and is not an empty directory."""
    t0 = time.perf_counter()
    if dtype not in EXPORT_DTYPES:
        raise CompileError(f"--dtype {dtype!r} is not supported for export; supported: {', '.join(EXPORT_DTYPES)}")
    if not Path(model).exists():
        raise ModelFormatError(f"{model}: no such file or directory")
    out = Path(os.path.abspath(output))
    _check_output(out)  # before reading the model: hashing an artifact's weights takes a while
    progress(f"read {model}")
    src = _open_source(Path(model))
    c = src.config
    layout = hf_layout(src.family, c)
    config = hf_config(c, dtype)
    tok_files = tokenizer_files(src.tokenizer, c) if src.tokenizer is not None else {}
    if src.tokenizer is None:
        progress(f"{src.label} carries no tokenizer kiln can read: writing weights and config only")
    with _staging(out) as tmp:
        _write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        order = list(layout)
        shapes = {name: layout[name][2] for name in order}

        from ..frontends.models.hf_names import check_finite  # noqa: PLC0415

        def produce(name: str) -> np.ndarray:
            arr = src.tensor(name)
            if tuple(arr.shape) != shapes[name]:
                raise ModelFormatError(f"{src.label}: tensor {name} has shape {list(arr.shape)}, expected {list(shapes[name])} from the config")
            check_finite(name, arr, src.label)
            cast = arr.astype(numpy_dtype(dtype), copy=False)
            if cast is not arr and not np.isfinite(cast).all():
                wider = "float32" + (" or bfloat16" if dtype == "float16" else "")
                raise ModelFormatError(f"{src.label}: tensor {name} has values that overflow {dtype}; export with --dtype {wider}")
            return cast

        write_hf_safetensors(tmp / "model.safetensors", order, shapes, dtype, produce, progress)
        for name, text in tok_files.items():
            _write_text(tmp / name, text)
        total = sum(f.stat().st_size for f in tmp.iterdir())
    return ExportSummary(out, c.architecture, len(layout), total, dtype, src.tokenizer is not None,
                         bool(src.tokenizer and src.tokenizer.chat_template), time.perf_counter() - t0)


# --- sources -------------------------------------------------------------------
def _open_source(path: Path) -> _Source:
    if path.is_dir() and not (path / "manifest.json").is_file():
        raise ModelFormatError(f"{path}: a directory but not a kiln artifact (no manifest.json); "
                               "kiln export reads a .gguf file or a float kiln artifact")
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        raise ModelFormatError(f"{path}: not a .gguf file or a kiln artifact directory; kiln export reads only those")
    from ..tvm_compat import compiler  # noqa: PLC0415

    compiler()  # the full TVM (the model families need it) before anything can load TVM runtime-only
    return _artifact_source(path) if path.is_dir() else _gguf_source(path)


def _gguf_source(path: Path) -> _Source:
    ck = open_checkpoint(path)  # the header, names, config and tokenizer are validated here
    from ..frontends.models import family_for  # noqa: PLC0415

    config = ModelConfig.from_dict(ck.config, file=ck.source)
    family = family_for(config.architecture, file=ck.source)
    config = family.adapt_config(config)
    family.convert_hf(config, ck.tensor_names, ck.load, ck.source)  # missing / unexpected tensors fail now; nothing is read
    return _Source(config, family, ck.load, ck.tokenizer, ck.source)


def _artifact_source(path: Path) -> _Source:
    from ..frontends.models import family_for  # noqa: PLC0415
    from ..runtime.artifact import open_artifact, read_weights  # noqa: PLC0415  (no TVM: device=None)

    art = open_artifact(path, device=None, verify_hashes=True)
    m = art.manifest
    if m.get("weights_file") is None:
        raise ArtifactError(f"{path}: compiled with --no-weights; it has no weights to export")
    quant = m.get("quant", "none")
    formats = sorted({str(p["quant"]) for p in m["params"] if p.get("quant", "none") != "none"})
    if quant != "none" or formats:
        what = ", ".join(formats) or (quant.get("weights") if isinstance(quant, dict) else str(quant))
        raise UnsupportedModelError(f"{path}: a quantized artifact ({what}); kiln export needs float weights: "
                                    "export the checkpoint it was compiled from")
    label = str(path / "manifest.json")
    config = _manifest_config(m["model"]["config"], label)
    family = family_for(config.architecture, file=label)
    config = family.adapt_config(config)
    declared = {p["name"]: tuple(p["shape"]) for p in m["params"]}
    expected = family.param_shapes(config)
    if declared != expected:
        odd = sorted(set(declared.items()) ^ set(expected.items()))[0]
        raise ArtifactError(f"{label}: field 'params' does not match field 'model.config' (first difference: {odd[0]} {list(odd[1])})")
    # memory-mapped bytes, checked against the manifest's param spec
    views = {spec["name"]: raw.view(numpy_dtype(spec["dtype"])).reshape(spec["shape"]) for spec, raw in read_weights(art)}
    layout = hf_layout(family, config)

    def tensor(name: str) -> np.ndarray:
        param, start, shape = layout[name]
        return np.array(views[param][start : start + shape[0]])

    tokenizer = None
    tok = m.get("tokenizer")
    if isinstance(tok, dict):
        tok_path = art.file(tok.get("file", "tokenizer.json"))
        try:
            text = tok_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{tok_path}: cannot read the tokenizer ({err})") from None
        tokenizer = TokenizerFiles(tokenizer_json=text, chat_template=tok.get("chat_template"), bos_token=tok.get("bos_token"),
                                   eos_token=tok.get("eos_token"), add_bos=bool(tok.get("add_bos")),
                                   extra_eos_tokens=list(tok.get("extra_eos_tokens") or []))
    return _Source(config, family, tensor, tokenizer, str(path))


def _manifest_config(raw: dict, label: str) -> ModelConfig:
    """The ModelConfig a manifest stores (`ModelConfig.to_dict()`), rebuilt and re-checked."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = ModelConfig(**{k: v for k, v in raw.items() if k in fields})
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(cfg.eos_token_ids))
        # the same validation a checkpoint's config gets
        ModelConfig.from_dict(hf_config(cfg, "float32"), file=label)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{label}: field 'model.config' is malformed ({err})") from None
    return cfg


# --- layout --------------------------------------------------------------------
def hf_layout(family: type, config: ModelConfig) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """HF tensor name -> (kiln param, first row in it, HF shape), in kiln's param
    order: the inverse of `family.convert_hf`, which concatenates rows."""
    shapes = family.param_shapes(config)
    out: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    for param, srcs in family.hf_sources(config).items():
        shape = tuple(shapes[param])
        if len(srcs) == 1:
            out[srcs[0]] = (param, 0, shape)
            continue
        start = 0
        for s in srcs:
            proj = s.split(".")[-2]
            if proj not in _SPLIT_ROWS:
                raise CompileError(f"internal: no row count for {s} (part of {param})")
            rows = _SPLIT_ROWS[proj](config)
            out[s] = (param, start, (rows, *shape[1:]))
            start += rows
        if start != shape[0]:
            raise CompileError(f"internal: {param} has {shape[0]} rows, its HF parts {start}")
    return out


def hf_config(c: ModelConfig, dtype: str) -> dict:
    """The transformers config.json of a kiln ModelConfig."""
    if c.architecture not in MODEL_TYPES:
        raise UnsupportedModelError(f"architecture {c.architecture!r} cannot be exported; supported: {', '.join(sorted(MODEL_TYPES))}")
    model_type = MODEL_TYPES[c.architecture]
    cfg: dict = {
        "architectures": [c.architecture],
        "model_type": model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,
        "hidden_act": "silu",
        "tie_word_embeddings": c.tie_word_embeddings,
        # Llama / Qwen3: one flag for q, k, v and o; Qwen2 has its q/k/v bias whatever
        # this says, and Mistral none
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "sliding_window": c.sliding_window,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if model_type == "qwen2":
        cfg["use_sliding_window"] = c.sliding_window is not None
        cfg["max_window_layers"] = 0  # kiln applies a window to every layer (and caps the context at it)
    if c.bos_token_id is not None:
        cfg["bos_token_id"] = c.bos_token_id
    if c.eos_token_ids:
        cfg["eos_token_id"] = c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids)
    return cfg


def tokenizer_files(tok: TokenizerFiles, c: ModelConfig) -> dict[str, str]:
    """file name -> text: tokenizer.json and a tokenizer_config.json that
    AutoTokenizer reads (and kiln's own HF reader reads back the same)."""
    tokenizer_json = tok.tokenizer_json
    if tok.add_bos and tok.bos_token is not None and json.loads(tokenizer_json).get("post_processor") is None:
        # GGUF tokenizers carry add_bos as a flag, which PreTrainedTokenizerFast
        # ignores: give transformers the post-processor HF Llama checkpoints have
        from tokenizers import Tokenizer, processors  # noqa: PLC0415

        t = Tokenizer.from_str(tokenizer_json)
        bos_id = t.token_to_id(tok.bos_token)
        if bos_id is not None:
            t.post_processor = processors.TemplateProcessing(single=[tok.bos_token, "$A"], pair=[tok.bos_token, "$A", tok.bos_token, "$B:1"],
                                                             special_tokens=[(tok.bos_token, bos_id)])
            tokenizer_json = t.to_str()
    cfg: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": c.max_position_embeddings,
    }
    if tok.chat_template is not None:
        cfg["chat_template"] = tok.chat_template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"}


# --- writing -------------------------------------------------------------------
def write_hf_safetensors(path: Path, order: list[str], shapes: dict[str, tuple[int, ...]], dtype: str,
                         produce: Callable[[str], np.ndarray], progress: Callable[[str], None] = _noop) -> None:
    """Stream tensors into a safetensors file, one in memory at a time, cast to
    `dtype`, through the artifact's writer (compiler/weights.py) with metadata
    format "pt": transformers refuses any other."""
    step = max(1, len(order) // 10)

    def report(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            progress(f"  tensors {done}/{total}")

    write_safetensors(HashingWriter(path), order, shapes, dict.fromkeys(order, dtype), produce, report, fmt="pt")


def _write_text(path: Path, text: str) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_output(out: Path) -> None:
    if out.is_symlink():
        raise CompileError(f"{out}: is a symlink; choose a new directory for the export")
    if out.exists():
        if not out.is_dir():
            raise CompileError(f"{out}: exists and is not a directory; choose a new directory for the export")
        if any(out.iterdir()):
            raise CompileError(f"{out}: exists and is not empty; choose a new or empty directory for the export")
    if not out.parent.is_dir():
        raise CompileError(f"{out.parent}: no such directory (the parent of the export directory)")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temp dir beside `out`, renamed to `out` when the body succeeds, removed when it fails."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as err:
        raise CompileError(f"cannot write to {out.parent}: {err.strerror}") from None
    try:
        yield tmp
        _fsync_dir(tmp)
        try:
            os.rename(tmp, out)  # replaces `out` only if it is still an empty directory
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise CompileError(f"{out}: appeared or filled up while exporting; nothing written") from None
            raise CompileError(f"cannot create {out}: {err.strerror}") from None
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
