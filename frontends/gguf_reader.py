"""GGUF checkpoints (llama.cpp's format): validated first, then read lazily.

`open_gguf(path)` parses the header itself with `struct`. Every count, length,
type id and offset is checked against the file before anything is allocated
(THREATS 15: llama.cpp's own GGUF parser had repeated overflow CVEs). Then it
maps llama.cpp tensor names back to HF names and undoes llama.cpp's q/k row
permutation, so `DecoderLM.convert_hf` serves a GGUF like any HF checkpoint.

`gguf.GGUFReader` is not used at runtime: it trusts the header it reads (a
string length or tensor count of 2^64-1 reaches numpy unchecked) and builds
one numpy object per array element (seconds for a 49k-token vocabulary). The
`gguf` package still supplies the type tables and `gguf.quants.dequantize`.

File layout (little-endian; str = u64 byte length + UTF-8 bytes):

    "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv      x (key str, value type u32, value)
    n_tensors x (name str, n_dims u32, dims u64[n_dims] (fastest axis first),
                 type u32, offset u64 (from the data start))
    zero padding to `general.alignment` (default 32) | tensor data
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import KilnError, ModelFormatError, UnsupportedModelError
from .checkpoint import Checkpoint, TokenizerFiles

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = (2, 3)
# Limits far above any real model (a 405B model has ~1.1k tensors and ~40 keys;
# vocabularies stay under 4M tokens) and low enough that a hostile header
# cannot make us allocate much more memory than the file's own size.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_NAME = 4096  # bytes in a key or tensor name
MAX_STRING = 1 << 20  # bytes in a string value
MAX_TEMPLATE = 16 << 20  # bytes in a chat template (they can be long)
MAX_ARRAY = 10_000_000  # elements in a numeric array
MAX_STRING_ARRAY = 1 << 22  # elements in a string array (tokens, merges)
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40  # elements in one tensor

_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
               7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}  # fmt: skip


# --- header ----------------------------------------------------------------
@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the header describes it, already bounds-checked."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy (row-major) order: GGUF dims reversed, [out, in] for matrices
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data, validated.

    metadata: key -> int | float | bool | str | list[str] | np.ndarray (numeric arrays).
    value_types: key -> GGUF value type id (arrays: 9).
    """

    version: int
    metadata: dict[str, Any]
    value_types: dict[str, int]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int
    file_size: int


class _Cursor:
    """Bounds-checked reads from the mapped file; every failure names the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, msg: str):
        raise ModelFormatError(f"{self.path}: {msg}")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size} (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str, limit: int) -> str:
        n = self.unpack("<Q", f"length of {what}")
        if n > limit:
            self.fail(f"{what} claims {n} bytes (limit {limit})")
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, vtype: int, key: str):
        if vtype in _SCALAR_FMT:
            v = self.unpack(_SCALAR_FMT[vtype], f"value of {key}")
            if vtype == _BOOL:
                if v > 1:
                    self.fail(f"metadata {key}: bool byte is {v}, expected 0 or 1")
                v = bool(v)
            return v
        if vtype == _STRING:
            return self.string(f"value of {key}", MAX_TEMPLATE if key.startswith("tokenizer.chat_template") else MAX_STRING)
        if vtype != _ARRAY:
            self.fail(f"metadata {key} has unknown value type id {vtype}")
        itype = self.unpack("<I", f"element type of {key}")
        n = self.unpack("<Q", f"length of {key}")
        if itype == _STRING:
            if n > MAX_STRING_ARRAY:
                self.fail(f"metadata {key} claims {n} strings (limit {MAX_STRING_ARRAY})")
            if n * 8 > self.size - self.pos:
                self.fail(f"metadata {key} claims {n} strings but the file ends at byte {self.size} (truncated?)")
            return [self.string(f"{key}[{i}]", MAX_STRING) for i in range(n)]
        if itype not in _NP_DTYPE:
            kind = "nested arrays are not supported" if itype == _ARRAY else f"unknown element type id {itype}"
            self.fail(f"metadata {key}: {kind}")
        if n > MAX_ARRAY:
            self.fail(f"metadata {key} claims {n} elements (limit {MAX_ARRAY})")
        dtype = np.dtype(_NP_DTYPE[itype])
        start = self.take(n * dtype.itemsize, f"value of {key}")
        arr = np.frombuffer(self.buf[start : start + n * dtype.itemsize], dtype=dtype)
        if itype == _BOOL:
            if (arr > 1).any():
                self.fail(f"metadata {key}: bool array holds bytes other than 0 and 1")
            arr = arr.astype(bool)
        return arr


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and validate a GGUF header; ModelFormatError names the file and the key or tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 24:
                raise ModelFormatError(f"{path}: {size} bytes is too small to be a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(_Cursor(buf, path))
    except KilnError:
        raise
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read: {e.strerror or e}") from e


def _parse_header(c: _Cursor) -> GGUFHeader:
    if c.buf[:4] != b"GGUF":
        c.fail(f"not a GGUF file (magic {bytes(c.buf[:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file? only little-endian GGUF is supported)" if version & 0xFFFF == 0 else ""
        c.fail(f"GGUF version {version} is not supported{hint}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata key count")
    if n_tensors > MAX_TENSORS:
        c.fail(f"header claims {n_tensors} tensors (limit {MAX_TENSORS})")
    if n_kv > MAX_KV:
        c.fail(f"header claims {n_kv} metadata keys (limit {MAX_KV})")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_NAME)
        if key in metadata:
            c.fail(f"duplicate metadata key {key}")
        vtype = c.unpack("<I", f"value type of {key}")
        metadata[key] = c.value(vtype, key)
        value_types[key] = vtype

    alignment = 32
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] != 4:
            c.fail(f"metadata general.alignment has type {_TYPE_NAMES.get(value_types['general.alignment'])}, expected uint32")
        if alignment <= 0 or alignment & (alignment - 1):
            c.fail(f"metadata general.alignment = {alignment} is not a power of two")

    raw = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}", MAX_NAME)
        n_dims = c.unpack("<I", f"dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = [c.unpack("<Q", f"dimension {d} of tensor {name}") for d in range(n_dims)]
        type_id = c.unpack("<I", f"type of tensor {name}")
        offset = c.unpack("<Q", f"data offset of tensor {name}")
        raw.append((name, dims, type_id, offset))

    data_start = -(-c.pos // alignment) * alignment
    tensors, seen, expected = [], set(), 0
    for name, dims, type_id, offset in raw:
        if name in seen:
            c.fail(f"duplicate tensor {name}")
        seen.add(name)
        n_elements = math.prod(dims)
        if min(dims) < 1 or n_elements > MAX_ELEMENTS:
            c.fail(f"tensor {name} has shape {dims} (each dimension must be >= 1, at most {MAX_ELEMENTS} elements)")
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            c.fail(f"tensor {name} has unknown type id {type_id}")
        if dims[0] % block:
            c.fail(f"tensor {name}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
        nbytes = n_elements // block * type_size
        # llama.cpp's rule: tensors are contiguous in header order, each padded to
        # the alignment. It rules out overlaps, gaps and offsets past the end at once.
        if offset != expected:
            c.fail(f"tensor {name} has data offset {offset}, expected {expected} "
                   f"(tensor data must be contiguous in header order, aligned to {alignment})")  # fmt: skip
        end = data_start + offset + nbytes
        if end > c.size:
            c.fail(f"tensor {name} needs bytes {data_start + offset}..{end} but the file has {c.size} bytes (truncated)")
        expected += -(-nbytes // alignment) * alignment
        tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes))
    if tensors and c.size > data_start + expected:
        c.fail(f"{c.size - data_start - expected} unexpected bytes after the last tensor's data")
    return GGUFHeader(version, metadata, value_types, tensors, alignment, data_start, c.size)


# --- names and layout --------------------------------------------------------
@dataclass(frozen=True)
class _Arch:
    hf_architecture: str
    permute_qk: bool  # llama.cpp's convert permuted q/k rows for its interleaved RoPE


# GGUF general.architecture -> HF architecture.
ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", permute_qk=True),
    "qwen2": _Arch("Qwen2ForCausalLM", permute_qk=False),
    "qwen3": _Arch("Qwen3ForCausalLM", permute_qk=False),
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(0|[1-9][0-9]{0,5})\.([a-z_]+)\.(weight|bias)")
_SKIPPED = ("rope_freqs.weight",)  # derived data; read into config, never a weight


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when it has no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's convert-time q/k permutation.

    llama.cpp did `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`
    (interleaving each head's two rotary halves); this restores HF's half-split rows.
    w  # [n_head * head_dim, *rest] (a weight [out, in] or a bias [out])
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_dequantizable: dict[GGMLQuantizationType, bool] = {}


def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    if qtype not in _dequantizable:
        block, type_size = GGML_QUANT_SIZES[qtype]
        try:
            quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
            _dequantizable[qtype] = True
        except Exception:  # noqa: BLE001 - NotImplementedError, or anything else: not usable
            _dequantizable[qtype] = False
    return _dequantizable[qtype]


# --- metadata ------------------------------------------------------------------
_REQUIRED = object()
_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "strings": lambda v: isinstance(v, list),
    "ints": lambda v: isinstance(v, np.ndarray) and v.dtype.kind in "iu",
}


def _meta(header: GGUFHeader, key: str, kind: str, path: Path, default: Any = _REQUIRED) -> Any:
    if key not in header.metadata:
        if default is _REQUIRED:
            raise ModelFormatError(f"{path}: missing metadata key {key}")
        return default
    v = header.metadata[key]
    if not _KINDS[kind](v):
        got = _TYPE_NAMES.get(header.value_types[key], "?")
        raise ModelFormatError(f"{path}: metadata {key} has type {got}, expected {kind}")
    if kind == "float":
        # float32 metadata as its shortest decimal: rms_norm_eps 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(v))) if header.value_types[key] == 6 else float(v)
    return v


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor.

    llama.cpp's convert turns (factor, low_freq_factor, high_freq_factor,
    original context) into one factor per rotary frequency and drops the
    parameters. Every Llama 3.x model uses low 1, high 4, original 8192 with
    factor 8 or 32: recompute with those and accept only an exact match.
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.shape != (head_dim // 2,):
        raise ModelFormatError(f"{path}: tensor rope_freqs.weight has {f.size} values, expected head_dim/2 = {head_dim // 2}")
    if np.all(f == 1.0):
        return None
    cand = {"rope_type": "llama3", "factor": float(f.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    old, lo, hi, factor = 8192, 1.0, 4.0, cand["factor"]
    smooth = (old / wavelen - lo) / (hi - lo)
    want = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(want, f, rtol=1e-4, atol=0):
        raise UnsupportedModelError(f"{path}: tensor rope_freqs.weight does not match llama3 rope scaling "
                                    f"(low 1, high 4, original context 8192); other rope frequency factors are not supported")  # fmt: skip
    return cand


def _rope_scaling(header: GGUFHeader, arch: str, path: Path) -> dict | None:
    kind = _meta(header, f"{arch}.rope.scaling.type", "str", path, "none")
    factor = _meta(header, f"{arch}.rope.scaling.factor", "float", path, None)
    if kind == "none" and factor is None:
        legacy = _meta(header, f"{arch}.rope.scale_linear", "float", path, None)
        if legacy is not None and legacy != 1.0:
            return {"rope_type": "linear", "factor": legacy}
        return None
    if kind == "none":
        return None
    out = {"rope_type": kind, "factor": factor}
    orig = _meta(header, f"{arch}.rope.scaling.original_context_length", "int", path, None)
    if orig is not None:
        out["original_max_position_embeddings"] = orig
    return out  # ModelConfig.from_dict rejects kinds kiln does not run (yarn, longrope)


def _build_config(header: GGUFHeader, arch: str, hf_arch: str, names: dict[str, GGUFTensorInfo], path: Path) -> dict:
    def key(k, kind, default=_REQUIRED):
        return _meta(header, f"{arch}.{k}", kind, path, default)

    if key("expert_count", "int", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts GGUF models are not supported")
    heads = key("attention.head_count", "int")
    key_len, value_len = key("attention.key_length", "int", None), key("attention.value_length", "int", None)
    rope_dim = key("rope.dimension_count", "int", None)
    head_dim = key_len if key_len is not None else rope_dim
    if value_len is not None and head_dim is not None and value_len != head_dim:
        raise UnsupportedModelError(f"{path}: attention key length {head_dim} differs from value length {value_len}")
    if rope_dim is not None and head_dim is not None and rope_dim != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim {head_dim}) are not supported")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    embd = names.get("model.embed_tokens.weight")
    vocab = key("vocab_size", "int", None)
    if vocab is None:
        vocab = embd.shape[0] if embd is not None else len(tokens) if isinstance(tokens, list) else None
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "hidden_size": key("embedding_length", "int"),
        "intermediate_size": key("feed_forward_length", "int"),
        "num_hidden_layers": key("block_count", "int"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", "int", heads),
        "vocab_size": vocab,
        "max_position_embeddings": key("context_length", "int"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", "float"),
        "rope_theta": key("rope.freq_base", "float", 10000.0),
        "rope_scaling": _rope_scaling(header, arch, path),
        "tie_word_embeddings": "lm_head.weight" not in names,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in names,
        "torch_dtype": "float32",
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _meta(header, f"tokenizer.ggml.{gguf_key}", "int", path, None)
        if value is not None:
            cfg[hf_key] = value
    extra_eos = _extra_eos_ids(header, path, cfg.get("eos_token_id"))
    if extra_eos:
        cfg["eos_token_id"] = [cfg["eos_token_id"], *extra_eos] if "eos_token_id" in cfg else extra_eos
    return cfg


def _extra_eos_ids(header: GGUFHeader, path: Path, eos: int | None) -> list[int]:
    """End-of-turn / end-of-message ids that also stop generation (Llama 3's <|eot_id|>)."""
    out = []
    for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = _meta(header, k, "int", path, None)
        if v is not None and v != eos and v not in out:
            out.append(v)
    return out


# --- tokenizer -------------------------------------------------------------------
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
# llama.cpp's tokenizer.ggml.pre -> (split regex before byte-level | "digits" | None, ignore_merges, NFC)
_PRE_TOKENIZERS = {
    "default": (None, False, False),
    "gpt2": (None, False, False),
    "smollm": ("digits", False, False),
    "starcoder": ("digits", False, False),
    "refact": ("digits", False, False),
    "llama-bpe": (_LLAMA3_SPLIT, True, False),
    "llama3": (_LLAMA3_SPLIT, True, False),
    "llama-v3": (_LLAMA3_SPLIT, True, False),
    "qwen2": (_QWEN2_SPLIT, False, True),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, True),
}
_CONTROL, _USER_DEFINED = 3, 4


def _build_tokenizer(header: GGUFHeader, vocab_size: int, path: Path) -> TokenizerFiles | None:
    """An HF `tokenizers` tokenizer from the GGUF vocabulary, or None where kiln cannot build one."""
    model = _meta(header, "tokenizer.ggml.model", "str", path, None)
    if model is None:
        return None
    pre = _meta(header, "tokenizer.ggml.pre", "str", path, "default")
    if model != "gpt2" or pre not in _PRE_TOKENIZERS:
        logger.warning("%s: tokenizer %r (pre-tokenizer %r) is not supported for GGUF; no tokenizer is bundled, "
                       "prompts must be given as token ids (--tokens)", path, model, pre)  # fmt: skip
        return None
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: PLC0415

    tokens = _meta(header, "tokenizer.ggml.tokens", "strings", path)
    merges = _meta(header, "tokenizer.ggml.merges", "strings", path, [])
    types = _meta(header, "tokenizer.ggml.token_type", "ints", path, np.ones(len(tokens), np.int32))
    if len(tokens) > vocab_size:
        raise ModelFormatError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens, more than vocab_size {vocab_size}")
    if len(types) != len(tokens):
        raise ModelFormatError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    spelled = set(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 printable stand-ins for bytes
    respell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab: dict[str, int] = {}
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types.tolist())):
        if kind in (_CONTROL, _USER_DEFINED):
            # llama.cpp stores these as raw text; match them whole in the input.
            added.append(AddedToken(tok, special=kind == _CONTROL, normalized=False))
        elif not set(tok) <= spelled:  # a raw-text token: spell it in the byte alphabet
            tok = respell.pre_tokenize_str(tok)[0][0]
        if tok in vocab:
            logger.warning("%s: token %d %r duplicates token %d; it will never be produced", path, i, tok, vocab[tok])
        else:
            vocab[tok] = i
    pairs = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)  # llama.cpp's rule: the first space after the first character
        if cut < 0:
            raise ModelFormatError(f"{path}: tokenizer.ggml.merges[{i}] = {m[:40]!r} is not two tokens separated by a space")
        pairs.append((m[:cut], m[cut + 1 :]))
    split, ignore_merges, nfc = _PRE_TOKENIZERS[pre]
    try:
        tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    except Exception as e:
        raise ModelFormatError(f"{path}: tokenizer vocabulary/merges are inconsistent: {e}") from e
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])

    def token(k: str) -> str | None:
        i = _meta(header, k, "int", path, None)
        if i is not None and not 0 <= i < len(tokens):
            raise ModelFormatError(f"{path}: metadata {k} = {i} is not a token id (vocabulary has {len(tokens)})")
        return None if i is None else tokens[i]

    eos = _meta(header, "tokenizer.ggml.eos_token_id", "int", path, None)
    extra = [tokens[i] for i in _extra_eos_ids(header, path, eos) if 0 <= i < len(tokens)]
    return TokenizerFiles(
        tokenizer_json=tok.to_str(),
        chat_template=_meta(header, "tokenizer.chat_template", "str", path, None),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        add_bos=_meta(header, "tokenizer.ggml.add_bos_token", "bool", path, False),
        extra_eos_tokens=extra,
    )


# --- entry point ---------------------------------------------------------------
# GGUF block type -> the kiln weight format with exactly its grid (passes/quantize.py)
DIRECT_IMPORTS = {("Q4_1", "q4g32"), ("Q4_0", "q4g32"), ("Q8_0", "q8")}


def blocks_to_kiln(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Raw GGUF blocks of an [N, K] tensor -> kiln's arrays, no float detour.
    Q4_1 block (20 bytes): d fp16, m fp16, 16 bytes whose low nibbles are
    elements 0..15 and high nibbles 16..31; x = d q + m.
    Q4_0 block (18 bytes): d fp16, 16 bytes of nibbles as Q4_1; x = d (q - 8),
    i.e. q4g32 with minimum -8 d (exact in fp16: a power-of-two multiple).
    Q8_0 block (34 bytes): d fp16, 32 int8; x = d q."""
    n, k = shape
    if qtype == "Q4_0":
        b = data.reshape(n, k // 32, 18)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        codes = np.concatenate([b[..., 2:18] & 0x0F, b[..., 2:18] >> 4], axis=-1).astype(np.uint32).reshape(n, k // 8, 8)
        shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
        return {"q": np.bitwise_or.reduce(codes << shifts, axis=2).astype(np.uint32), "s": d, "z": (d * np.float16(-8)).astype(np.float16)}
    if qtype == "Q4_1":
        b = data.reshape(n, k // 32, 20)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        m = b[..., 2:4].copy().view(np.float16)[..., 0]
        qs = b[..., 4:20]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint32).reshape(n, k // 8, 8)
        shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
        return {"q": np.bitwise_or.reduce(codes << shifts, axis=2).astype(np.uint32), "s": d, "z": m}
    if qtype == "Q8_0":
        b = data.reshape(n, k // 32, 34)
        return {"q": b[..., 2:34].copy().view(np.int8).reshape(n, k), "s": b[..., 0:2].copy().view(np.float16)[..., 0]}
    raise ValueError(f"no direct import for {qtype}")


def open_gguf(path: Path) -> Checkpoint:
    """Open a `.gguf` file as a Checkpoint with HF tensor names and an HF-style config.

    The header is validated in full first; `load(name)` then reads one tensor,
    dequantizes it to float32 [out, in] (F32/F16/BF16 exactly) and undoes
    llama.cpp's q/k permutation. Errors are ModelFormatError or
    UnsupportedModelError, and their message starts with the file path.
    """
    path = Path(path)
    try:
        return _open_gguf(path)
    except KilnError:
        raise
    except Exception as e:  # a gap in the checks above must still name the file
        raise ModelFormatError(f"{path}: cannot read GGUF: {type(e).__name__}: {e}") from e


def _open_gguf(path: Path) -> Checkpoint:
    from .config import ModelConfig  # noqa: PLC0415

    header = read_gguf_header(path)
    arch = _meta(header, "general.architecture", "str", path)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    spec = ARCHITECTURES[arch]

    by_hf: dict[str, GGUFTensorInfo] = {}
    skipped: dict[str, GGUFTensorInfo] = {}
    unknown = []
    for t in header.tensors:
        if t.name in _SKIPPED:
            skipped[t.name] = t
            continue
        hf = hf_tensor_name(t.name)
        if hf is None:
            unknown.append(t.name)
            continue
        if hf in by_hf:
            raise ModelFormatError(f"{path}: tensors {by_hf[hf].name} and {t.name} both map to {hf}")
        by_hf[hf] = t
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ModelFormatError(f"{path}: unknown tensors {', '.join(unknown[:5])}{more} for GGUF architecture {arch}")
    unsupported = sorted({t.qtype.name for t in header.tensors if not _can_dequantize(t.qtype)})
    if unsupported:
        bad = next(t for t in header.tensors if t.qtype.name in unsupported)
        ok = sorted(q.name for q in GGML_QUANT_SIZES if _can_dequantize(q))
        raise UnsupportedModelError(f"{path}: tensor {bad.name} has type {bad.qtype.name}, supported: {', '.join(ok)}")

    config = _build_config(header, arch, spec.hf_architecture, by_hf, path)
    model_config = ModelConfig.from_dict(config, str(path))  # validated now: errors come early and name the file
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads

    def read_raw(t: GGUFTensorInfo) -> np.ndarray:
        data = np.empty(t.nbytes, np.uint8)
        with open(path, "rb") as f:
            f.seek(t.offset)
            got = f.readinto(data)
        if got != t.nbytes:
            raise ModelFormatError(f"{path}: tensor {t.name}: file ended after {got} of {t.nbytes} bytes (changed since it was opened?)")
        return data

    def unpermute(name: str, t: GGUFTensorInfo, arr: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's q/k row order (on floats, or on codes and scales alike)."""
        if not (spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))):
            return arr
        n = heads if ".q_proj." in name else kv_heads
        if arr.shape[0] % (2 * n):
            raise ModelFormatError(f"{path}: tensor {t.name} has {arr.shape[0]} rows, not a multiple of 2 x {n} heads")
        return np.ascontiguousarray(unpermute_qk(arr, n))

    def read(t: GGUFTensorInfo) -> np.ndarray:
        data = read_raw(t)
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        byte_shape = (*t.shape[:-1], t.shape[-1] // block * type_size)
        try:
            arr = quants.dequantize(data.reshape(byte_shape), t.qtype)
        except Exception as e:
            raise ModelFormatError(f"{path}: tensor {t.name}: cannot dequantize {t.qtype.name}: {e}") from e
        if arr.shape != t.shape:
            raise ModelFormatError(f"{path}: tensor {t.name}: dequantized to shape {list(arr.shape)}, expected {list(t.shape)}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def load(name: str) -> np.ndarray:
        try:
            return _load(name)
        except KilnError:
            raise
        except Exception as e:
            raise ModelFormatError(f"{path}: tensor {name}: {type(e).__name__}: {e}") from e

    def _load(name: str) -> np.ndarray:
        t = by_hf.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: no tensor {name}")
        return unpermute(name, t, read(t))

    def load_quantized(name: str, fmt: str) -> dict | None:
        """Q4_1 / Q4_0 -> q4g32 and Q8_0 -> q8 block for block (the same grids:
        scale and minimum per 32 / scale per 32, fp16), with the q/k row order undone
        on the codes; None for any other pairing (the caller re-quantizes)."""
        t = by_hf.get(name)
        if t is None or len(t.shape) != 2 or (t.qtype.name, fmt) not in DIRECT_IMPORTS:
            return None
        parts = blocks_to_kiln(read_raw(t), t.qtype.name, t.shape)
        return {k: unpermute(name, t, v) for k, v in parts.items()}

    if "rope_freqs.weight" in skipped:
        config["gguf_skipped_tensors"] = sorted(skipped)
        if config["rope_scaling"] is not None:
            raise UnsupportedModelError(f"{path}: both rope scaling metadata and a rope_freqs tensor are present")
        factors = read(skipped["rope_freqs.weight"])
        config["rope_scaling"] = _llama3_rope_scaling(factors, model_config.head_dim, model_config.rope_theta, path)
        model_config = ModelConfig.from_dict(config, str(path))
    tokenizer = _build_tokenizer(header, model_config.vocab_size, path)
    return Checkpoint(
        config=config,
        tensor_names=list(by_hf),
        load=load,
        tokenizer=tokenizer,
        source=str(path),
        format="gguf",
        tensor_dtypes={hf: t.qtype.name for hf, t in by_hf.items()},
        load_quantized=load_quantized,
    )
