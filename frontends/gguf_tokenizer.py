"""A GGUF's vocabulary and merges -> an HF `tokenizers` tokenizer (tokenizer.json text),
with its chat template and special tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from .checkpoint import TokenizerFiles
from .gguf_config import extra_eos_ids
from .gguf_header import GGUFHeader, meta

logger = logging.getLogger(__name__)

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


def build_tokenizer(header: GGUFHeader, vocab_size: int, path: Path) -> TokenizerFiles | None:
    """An HF `tokenizers` tokenizer from the GGUF vocabulary, or None where kiln cannot build one."""
    model = meta(header, "tokenizer.ggml.model", "str", path, None)
    if model is None:
        return None
    pre = meta(header, "tokenizer.ggml.pre", "str", path, "default")
    if model == "llama" and meta(header, "general.architecture", "str", path, None) in _SPM_ARCHS:
        return _with_specials(header, _gemma_spm(header, vocab_size, path), path)
    if model != "gpt2" or pre not in _PRE_TOKENIZERS:
        logger.warning("%s: tokenizer %r (pre-tokenizer %r) is not supported for GGUF; no tokenizer is bundled, "
                       "prompts must be given as token ids (--tokens)", path, model, pre)  # fmt: skip
        return None
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: PLC0415

    tokens = meta(header, "tokenizer.ggml.tokens", "strings", path)
    merges = meta(header, "tokenizer.ggml.merges", "strings", path, [])
    types = meta(header, "tokenizer.ggml.token_type", "ints", path, np.ones(len(tokens), np.int32))
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

    return _with_specials(header, tok, path)


def _with_specials(header: GGUFHeader, tok, path: Path) -> TokenizerFiles:
    """The TokenizerFiles of a built tokenizer: chat template, BOS / EOS and the extra stop tokens."""
    tokens = meta(header, "tokenizer.ggml.tokens", "strings", path)

    def token(k: str) -> str | None:
        i = meta(header, k, "int", path, None)
        if i is not None and not 0 <= i < len(tokens):
            raise ModelFormatError(f"{path}: metadata {k} = {i} is not a token id (vocabulary has {len(tokens)})")
        return None if i is None else tokens[i]

    eos = meta(header, "tokenizer.ggml.eos_token_id", "int", path, None)
    extra = [tokens[i] for i in extra_eos_ids(header, path, eos) if 0 <= i < len(tokens)]
    return TokenizerFiles(
        tokenizer_json=tok.to_str(),
        chat_template=meta(header, "tokenizer.chat_template", "str", path, None),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        add_bos=meta(header, "tokenizer.ggml.add_bos_token", "bool", path, False),
        extra_eos_tokens=extra,
    )


_SPM_ARCHS = ("gemma3",)  # SentencePiece vocabularies rebuilt as transformers' GGUF loader rebuilds them


def _gemma_spm(header: GGUFHeader, vocab_size: int, path: Path):
    """Gemma's SentencePiece vocabulary as a `tokenizers` BPE with byte fallback, built as
    transformers builds it from a GGUF (its gemma_tokenizer), so both encode alike: tokens of
    two or more spaces spelled with U+2581 as the model sees them; no merges in the file, so
    each token's splits into two tokens become merges, ranked by the token's place in the
    vocabulary (Gemma's scores do not follow its merge order), then longer left, longer right
    parts first; spaces become U+2581 before the model, and back after it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: PLC0415

    raw = meta(header, "tokenizer.ggml.tokens", "strings", path)
    types = meta(header, "tokenizer.ggml.token_type", "ints", path, np.ones(len(raw), np.int32)).tolist()
    if len(raw) > vocab_size or len(types) != len(raw):
        raise ModelFormatError(f"{path}: tokenizer.ggml.tokens has {len(raw)} tokens and token_type {len(types)} "
                               f"for a vocabulary of {vocab_size}")
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated spelling keeps its last id, as transformers' dict does
    merges = []
    for t, rank in vocab.items():
        merges.extend((-rank, k, len(t) - k, t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab)
    merges.sort(key=lambda m: m[:3], reverse=True)
    try:
        tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    except Exception as e:
        raise ModelFormatError(f"{path}: tokenizer vocabulary is inconsistent: {e}") from e
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(raw, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(raw, types) if k == _USER_DEFINED and t in vocab])
    return tok
