"""Tokenizer, chat template and streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ArtifactError, RequestError


def _check_text(text, what: str) -> str:
    """Request text must be a str of valid Unicode (JSON can carry lone surrogates)."""
    if not isinstance(text, str):
        raise RequestError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(
            f"{what} contains a lone surrogate U+{ord(text[err.start]):04X} at character {err.start}: text must be valid Unicode"
        ) from None
    return text


class Tokenizer:
    """Wraps an HF `tokenizers` tokenizer plus the chat template from the manifest."""

    def __init__(self, path: Path, meta: dict):
        from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

        try:
            raw = path.read_text(encoding="utf-8")
            self.tok = HFTokenizer.from_str(raw)
        except Exception as err:  # tokenizers raises plain Exception
            raise ArtifactError(f"{path}: tokenizer cannot be loaded: {err}") from None
        kinds = _decoder_kinds(json.loads(raw).get("decoder"))
        self._byte_level = "ByteLevel" in kinds  # GPT-2-style byte alphabet
        self._byte_fallback = "ByteFallback" in kinds  # <0xNN> tokens
        self.chat_template = meta.get("chat_template")
        self.bos_token = meta.get("bos_token")
        self.eos_token = meta.get("eos_token")
        self.add_bos = bool(meta.get("add_bos"))
        self._template = None

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(_check_text(text, "prompt"), add_special_tokens=False).ids
        bos = self.token_id(self.bos_token)
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def render_chat(self, messages: list[dict]) -> str:
        if not self.chat_template:
            raise RequestError("this artifact has no chat template; run without --chat")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise RequestError(f"chat template: {msg}")

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tok.encode(_check_text(self.render_chat(messages), "chat prompt"), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (logprobs' `bytes`): a token holding part of a
        UTF-8 character gives those raw bytes, where decoding it alone gives U+FFFD.
        Byte-level BPE (GPT-2's alphabet: Llama 3, Qwen, SmolLM2) maps each character back
        to its byte; sentencepiece-style byte fallback spells a byte <0xNN>."""
        piece = self.tok.id_to_token(token)
        if piece is None:
            return b""
        if self._byte_level and all(ch in _UNICODE_TO_BYTE for ch in piece):
            return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
        if self._byte_fallback:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.decode([token]).encode("utf-8")


def _decoder_kinds(dec) -> set[str]:
    """The `type`s of a tokenizer.json decoder, through Sequence decoders."""
    if not isinstance(dec, dict):
        return set()
    out = {dec.get("type")}
    for d in dec.get("decoders") or []:
        out |= _decoder_kinds(d)
    return out


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the other
    bytes for code points from 256 up, in byte order (what tokenizers' ByteLevel uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_alphabet()


class StreamDecoder:
    """Incremental detokenization that never emits half a UTF-8 character.

    Decodes a sliding window of recent tokens and emits only the new suffix,
    holding text back while it ends in U+FFFD (a byte sequence cut mid-character).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Stop strings over streamed text: holds back any suffix that may start a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        # the earliest stop in the text wins, whichever position it has in the list
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
