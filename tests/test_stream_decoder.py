"""Streaming detokenization and stop strings (THREATS 29): characters split
across tokens (emoji, CJK, combining marks, NUL) stream out whole, never as
U+FFFD, and the streamed pieces add up to the full decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kiln.runtime.tokenizer import StopMatcher, StreamDecoder, Tokenizer


TEXTS = [
    "héllo 👋🏽 世界 and 日本語のテキスト",
    "emoji 🎉🎉 family 👨‍👩‍👧‍👦 flag 🇫🇷 rainbow 🏳️‍🌈",
    "NUL \x00 in \x00\x00 the middle\x00",
    "combining e\u0301 a\u0308\u0301 ñ Z\u0335\u0353\u0301",
    "math 𝕳𝖊𝖑𝖑𝖔 ∑∫√ hieroglyph 𓀀 and Ω≈ç",
    "  leading spaces, tabs\t\tand\nnewlines\n\n",
    "👋",
    "世",
]


def _wrap(hf: HFTokenizer, tmp_path: Path, name: str) -> Tokenizer:
    p = tmp_path / f"{name}.json"
    p.write_text(hf.to_str(), encoding="utf-8")
    return Tokenizer(p, {})


def byte_level_bpe(tmp_path) -> Tokenizer:
    """GPT-2 style byte-level BPE whose merges cut multi-byte characters apart."""
    corpus = ["hello world 世界 你好 👋🏽 emoji 🎉 text", "日本語のテキスト and more 世界", "e\u0301 combining ñ Ω≈ç"] * 20
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|end|>"], show_progress=False))
    return _wrap(hf, tmp_path, "bytelevel")


def metaspace_byte_fallback(tmp_path) -> Tokenizer:
    """Llama-2 / SentencePiece style: '▁' for spaces, <0xNN> byte fallback, leading space stripped on decode."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzäöü世,":
        vocab.setdefault(c, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return _wrap(hf, tmp_path, "metaspace")


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_gguf):
    from kiln.frontends.gguf_reader import open_gguf

    tf = open_gguf(smollm2_gguf).tokenizer
    p = tmp_path_factory.mktemp("smol") / "tokenizer.json"
    p.write_text(tf.tokenizer_json, encoding="utf-8")
    return Tokenizer(p, {"bos_token": tf.bos_token, "eos_token": tf.eos_token})


@pytest.fixture(params=["smollm2", "bytelevel", "metaspace"])
def tok(request, tmp_path):
    if request.param == "smollm2":
        return request.getfixturevalue("smol")
    return {"bytelevel": byte_level_bpe, "metaspace": metaspace_byte_fallback}[request.param](tmp_path)


def stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    d = StreamDecoder(tok)
    return [d.push(i) for i in ids], d.flush()


def splits_a_character(tok: Tokenizer, ids: list[int]) -> bool:
    return any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_adds_up_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    full = tok.decode(ids)
    # SentencePiece-style decoders drop one leading space: that is the tokenizer, not streaming
    assert full == text or (text.startswith(" ") and full == text[1:])
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == full
    assert not any("\ufffd" in p for p in pieces), pieces
    assert tail == ""  # valid text ends on a character boundary: nothing held back


def test_texts_do_split_characters(tok):
    """Guards the test above: these tokenizers really cut characters across tokens."""
    assert sum(splits_a_character(tok, tok.encode(t)) for t in TEXTS) >= 3


def test_pieces_are_emitted_as_soon_as_a_character_completes(smol):
    ids = smol.encode("a👋b")
    pieces, _ = stream(smol, ids)
    assert "".join(pieces) == "a👋b"
    first_with_emoji = next(i for i, p in enumerate(pieces) if "👋" in p)
    # the emoji appears exactly at its last byte's token, not later
    assert smol.decode(ids[: first_with_emoji + 1]).endswith("👋")
    assert all(p == "" for p in pieces[pieces.index("a") + 1 : first_with_emoji])


def test_incomplete_character_is_held_until_flush(tok):
    ids = tok.encode("x👋")
    cut = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith("\ufffd")) if splits_a_character(tok, ids) else None
    if cut is None:
        pytest.skip("this tokenizer has the emoji as one token")
    pieces, tail = stream(tok, ids[:cut])
    assert "\ufffd" not in "".join(pieces)
    assert tail == tok.decode(ids[:cut])[len("".join(pieces)) :]  # flush gives out what was held, as the full decode has it


def test_random_token_streams_match_full_decode(smol):
    """Model output can be any token sequence, invalid UTF-8 included: the stream
    still adds up to the full decode, whatever it is."""
    rng = np.random.default_rng(0)
    single = [i for i in range(smol.tok.get_vocab_size()) if len(smol.tok.id_to_token(i) or "") == 1]
    for _ in range(400):
        n = int(rng.integers(1, 10))
        ids = [int(rng.choice(single)) if rng.random() < 0.7 else int(rng.integers(0, smol.tok.get_vocab_size())) for _ in range(n)]
        pieces, tail = stream(smol, ids)
        assert "".join(pieces) + tail == smol.decode(ids), ids


def test_special_tokens_stream_as_text(smol):
    ids = smol.encode("<|im_start|>user\nhi 👋<|im_end|>")
    pieces, tail = stream(smol, ids)
    assert "".join(pieces) + tail == "<|im_start|>user\nhi 👋<|im_end|>"


# --- stop strings ---------------------------------------------------------------------


def feed_all(m: StopMatcher, chunks: list[str]) -> str:
    out = [m.feed(c) for c in chunks]
    return "".join(out) + m.flush()


def test_stop_across_chunks():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == "abc "  # "ST" may begin the stop: held
    assert m.feed("O") == ""
    assert m.feed("P and more") == "" and m.stopped
    assert m.feed("later") == "" and m.flush() == ""


def test_held_text_is_released_when_the_stop_does_not_follow():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == "abc "
    assert m.feed("ART") == "START"
    assert m.flush() == "" and not m.stopped
    m = StopMatcher(["STOP"])
    assert feed_all(m, ["x", "S", "T", "O"]) == "xSTO"  # held to the end, then flushed


def test_earliest_stop_wins_whatever_its_place_in_the_list():
    assert feed_all(StopMatcher(["b", "a"]), ["xab"]) == "x"
    assert feed_all(StopMatcher(["s", "long stop"]), ["a long stop"]) == "a "
    assert feed_all(StopMatcher(["stop", "long"]), ["a long stop"]) == "a "
    assert feed_all(StopMatcher(["cd", "bcd"]), ["ab", "cde"]) == "a"


def test_stop_with_unicode_and_nul():
    assert feed_all(StopMatcher(["👋"]), ["hi ", "\x00", "👋", " bye"]) == "hi \x00"
    assert feed_all(StopMatcher(["\x00"]), ["a\x00b"]) == "a"
    assert feed_all(StopMatcher(["世界"]), ["你好世", "界!"]) == "你好"


def test_empty_stop_strings_are_ignored():
    assert feed_all(StopMatcher(["", "zz"]), ["abc"]) == "abc"
    assert feed_all(StopMatcher([]), ["abc", "def"]) == "abcdef"


def test_stream_decoder_and_stop_matcher_together(smol):
    text = "héllo 世界 👋🏽 more text after the wave"
    ids = smol.encode(text)
    d, m = StreamDecoder(smol), StopMatcher(["👋"])
    out = []
    for i in ids:
        out.append(m.feed(d.push(i)))
        if m.stopped:
            break
    assert m.stopped and "".join(out) == "héllo 世界 "


def test_token_bytes_are_the_raw_bytes_of_partial_characters(tmp_path):
    """logprobs' `bytes`: a byte-level BPE token holding one byte of a UTF-8 character, or a
    byte-fallback <0xNN> token, gives that byte (decoding it alone gives U+FFFD)."""
    from tokenizers import Tokenizer as HF  # noqa: PLC0415
    from tokenizers import decoders, models, pre_tokenizers  # noqa: PLC0415

    from kiln.runtime.tokenizer import _UNICODE_TO_BYTE, Tokenizer  # noqa: PLC0415

    alphabet = {ch: b for ch, b in _UNICODE_TO_BYTE.items()}
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=alphabet.get))}
    vocab["\u0120hello"] = len(vocab)  # " hello"
    bl = HF(models.BPE(vocab=vocab, merges=[]))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    (tmp_path / "bl.json").write_text(bl.to_str())
    t = Tokenizer(tmp_path / "bl.json", {})
    e2 = vocab[next(ch for ch, b in alphabet.items() if b == 0xE2)]
    assert t.decode([e2]) == "\ufffd" and t.token_bytes(e2) == b"\xe2"
    assert t.token_bytes(vocab["\u0120hello"]) == b" hello"
    assert b"".join(t.token_bytes(i) for i in t.encode("h\u00e9\u20ac")) == "h\u00e9\u20ac".encode()

    fb_vocab = {"<unk>": 0, "<0xE2>": 1, "<0x82>": 2, "<0xAC>": 3, "\u2581hi": 4}
    fb = HF(models.BPE(vocab=fb_vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    fb.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    (tmp_path / "fb.json").write_text(fb.to_str())
    t = Tokenizer(tmp_path / "fb.json", {})
    assert [t.token_bytes(i) for i in (1, 2, 3)] == [b"\xe2", b"\x82", b"\xac"] and t.token_bytes(4) == b" hi"
    assert t.decode([1]) != "\u20ac" and t.decode([1, 2, 3]) == "\u20ac"
