"""One request's generation state, shared by Session.generate / stream and the
serving engine so both stop, sample and detokenize the same way: the prompt
and limits checked, a sampler, EOS, stop strings, UTF-8-safe streamed text."""

from __future__ import annotations

import numpy as np

from ..errors import RequestError
from .sampler import Sampler, SamplingParams
from .tokenizer import StopMatcher, StreamDecoder

MAX_NEW_TOKENS_LIMIT = 1 << 20
MAX_STOPS = 16
MAX_STOP_LEN = 256


def check_tokens(ids, vocab_size: int) -> list[int]:
    if not isinstance(ids, (list, tuple, np.ndarray)):
        raise RequestError(f"the prompt must be a list of token ids, got {type(ids).__name__} (encode text with encode_prompt)")
    if len(ids) == 0:
        raise RequestError("the prompt is empty: give at least one token")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < vocab_size:
            raise RequestError(f"token id {t!r} is outside [0, {vocab_size})")
        out.append(int(t))
    return out


class Generation:
    """Feed it the sampled tokens one at a time (accept); it says what text to
    emit and when the request is finished (finish: "eos" | "stop" | "length")."""

    def __init__(self, session, prompt_tokens, max_new_tokens: int = 128, sampling: SamplingParams | None = None,
                 stop: list[str] | str | None = None, ignore_eos: bool = False):
        self.prompt = check_tokens(prompt_tokens, session.vocab_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise RequestError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens!r}")
        if len(self.prompt) >= session.max_seq_len:
            raise RequestError(f"prompt has {len(self.prompt)} tokens; the context holds {session.max_seq_len} (prompt + generated)")
        # cut to what the context has left after the prompt (finish "length")
        self.max_new_tokens = min(max_new_tokens, session.max_seq_len - len(self.prompt))
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if len(stop) > MAX_STOPS or any(not isinstance(s, str) or len(s) > MAX_STOP_LEN for s in stop):
            raise RequestError(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_LEN} characters")
        self.sampler = Sampler(sampling or SamplingParams())
        self.detok = StreamDecoder(session.tokenizer) if session.tokenizer else None
        self.matcher = StopMatcher(stop)
        self.eos_ids = () if ignore_eos else session.eos_ids
        self.history = list(self.prompt)
        self.tokens: list[int] = []
        self.finish: str | None = None

    @property
    def greedy(self) -> bool:
        """Plain argmax: the device may pick the token (Session.decode_greedy)."""
        return self.sampler.greedy

    @property
    def done(self) -> bool:
        return self.finish is not None

    def sample(self, logits: np.ndarray) -> int:
        """logits  # [vocab] float32 -> the next token id (raises on NaN/Inf)."""
        return self.sampler(logits, self.history)

    def accept(self, tok: int) -> str | None:
        """Take the next token. Returns the text it completes ("" while a UTF-8
        character or a possible stop string is held back), or None when the
        token is EOS (not part of the output). Sets finish when the request ends."""
        self.history.append(tok)
        if tok in self.eos_ids:
            self.finish = "eos"
            return None
        text = self.matcher.feed(self.detok.push(tok)) if self.detok else ""
        self.tokens.append(tok)
        if self.matcher.stopped:
            self.finish = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish = "length"
        return text

    def ends_with(self, tok: int) -> bool:
        """Whether accepting tok will finish the request for sure (EOS or the token limit;
        a stop string is only known once its text is decoded)."""
        return tok in self.eos_ids or len(self.tokens) + 1 >= self.max_new_tokens

    def tail(self) -> str:
        """Text held back at the end (an incomplete character, a partial stop string)."""
        if self.detok and not self.matcher.stopped:
            return self.matcher.feed(self.detok.flush()) + self.matcher.flush()
        return ""
