"""Request checks of the runtime and the CLI (THREATS 25, 26, 29, 30): prompts
over the context, bad generation and sampling values, text that is not valid
Unicode, NaN logits, and the `kiln run/eval/inspect` commands."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import VOCAB, prefer_full_tvm, shared_artifact, subprocess_env

import kiln.runtime
from kiln.errors import KilnError, RequestError
from kiln.runtime import SamplingParams
from kiln.runtime.request import MAX_NEW_TOKENS_LIMIT, MAX_STOP_LEN, MAX_STOPS
from kiln.runtime.session import Session

CTX = 16


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifact(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def session(art):
    prefer_full_tvm()
    return kiln.runtime.load(art, max_seq_len=CTX)


@pytest.fixture(autouse=True)
def no_leaked_sequences(request):
    """Every request, failed or not, frees its KV sequence."""
    yield
    if "session" in request.fixturenames:
        assert request.getfixturevalue("session").sequences == []


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", env=subprocess_env(), timeout=timeout)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# --- 25: prompt and context -----------------------------------------------------------


def test_prompt_longer_than_context(session):
    with pytest.raises(RequestError) as ei:
        session.generate(list(range(3, 23)), max_new_tokens=4)
    assert "20" in str(ei.value) and str(CTX) in str(ei.value)


def test_prompt_filling_the_context(session):
    """A prompt of exactly the context leaves no room to generate: refused with both counts."""
    with pytest.raises(RequestError, match=f"{CTX} tokens.*{CTX}"):
        session.generate(list(range(3, 3 + CTX)), max_new_tokens=1)


def test_prompt_plus_max_tokens_over_context_is_truncated(session):
    """Behaviour (documented here): max_new_tokens is cut to what the context holds."""
    prompt = list(range(3, 3 + CTX - 3))
    res = session.generate(prompt, max_new_tokens=1000, ignore_eos=True)
    assert len(res.tokens) == 3 and res.finish_reason == "length"


def test_logits_longer_than_context(session):
    with pytest.raises(RequestError, match=f"{CTX + 1} tokens.*{CTX}"):
        session.logits(list(range(3, 4 + CTX)))


def test_session_context_outside_the_artifact(art):
    prefer_full_tvm()
    for bad in (0, -1, 10**6):
        with pytest.raises(RequestError, match="max_seq_len"):
            kiln.runtime.load(art, max_seq_len=bad)


# --- 26: generation and sampling values ------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, MAX_NEW_TOKENS_LIMIT + 1, 2**63, "x", 1.5, True, None])
def test_bad_max_new_tokens(session, n):
    with pytest.raises(RequestError, match=r"max_new_tokens must be an integer in \[1, "):
        session.generate([1, 2, 3], max_new_tokens=n)


@pytest.mark.parametrize("ids", [[1, VOCAB], [-1], [1, 10**30], ["a"], [1.0], [True], [None], [[1, 2]]])
def test_token_ids_outside_vocab(session, ids):
    with pytest.raises(RequestError, match=rf"token id .* is outside \[0, {VOCAB}\)"):
        session.generate(ids, max_new_tokens=1)
    with pytest.raises(RequestError, match=rf"outside \[0, {VOCAB}\)"):
        session.logits([*ids, 1])


@pytest.mark.parametrize("ids", [[], (), np.array([], dtype=np.int64)])
def test_empty_prompt(session, ids):
    with pytest.raises(RequestError, match="empty"):
        session.generate(ids, max_new_tokens=1)


@pytest.mark.parametrize("ids", ["hello", None, 5])
def test_prompt_of_the_wrong_type_says_so(session, ids):
    with pytest.raises(RequestError, match="token ids|list|str"):
        session.generate(ids, max_new_tokens=1)


def test_numpy_prompt_is_accepted(session):
    res = session.generate(np.array([1, 2, 3], dtype=np.int64), max_new_tokens=2, ignore_eos=True)
    assert len(res.tokens) == 2


@pytest.mark.parametrize("field,value,bound", [
    ("temperature", float("nan"), "finite"),
    ("temperature", float("inf"), "finite"),
    ("temperature", -0.5, "[0.0, 100.0]"),
    ("temperature", "hot", "finite"),
    ("top_p", 0.0, "(0.0, 1.0]"),
    ("top_p", 1.5, "(0.0, 1.0]"),
    ("top_p", -0.1, "(0.0, 1.0]"),
    ("top_p", float("nan"), "finite"),
    ("top_k", -1, "[0, 1048576]"),
    ("top_k", 1.5, "[0, 1048576]"),
    ("top_k", True, "[0, 1048576]"),
    ("top_k", 2**40, "[0, 1048576]"),
    ("repetition_penalty", 0.0, "(0.0, 100.0]"),
    ("repetition_penalty", float("nan"), "finite"),
    ("seed", -1, "[0, 2^63)"),
    ("seed", 2**63, "[0, 2^63)"),
    ("seed", 1.5, "[0, 2^63)"),
    ("seed", "42", "[0, 2^63)"),
])
def test_bad_sampling_values(field, value, bound):
    with pytest.raises(RequestError) as ei:
        SamplingParams(**{field: value})
    msg = str(ei.value)
    assert field in msg and bound in msg, msg


def test_sampling_values_at_the_bounds(session):
    for sp in (SamplingParams(temperature=100.0, top_p=1.0, top_k=0, seed=0), SamplingParams(temperature=1e-30, top_p=1e-9, top_k=1, seed=2**63 - 1),
               SamplingParams(temperature=1.0, top_k=10**6, repetition_penalty=100.0, seed=1)):
        res = session.generate([1, 2, 3], max_new_tokens=3, sampling=sp, ignore_eos=True)
        assert len(res.tokens) == 3 and all(0 <= t < VOCAB for t in res.tokens)


def test_sampling_of_the_wrong_type(session):
    with pytest.raises(RequestError, match="sampling must be SamplingParams, got dict"):
        session.generate([1, 2, 3], max_new_tokens=1, sampling={"temperature": 0.5})


def test_too_many_or_too_long_stop_strings(session):
    with pytest.raises(RequestError, match=f"at most {MAX_STOPS} strings"):
        session.generate([1, 2, 3], max_new_tokens=1, stop=[f"s{i}" for i in range(MAX_STOPS + 1)])
    with pytest.raises(RequestError, match=f"at most {MAX_STOP_LEN} characters"):
        session.generate([1, 2, 3], max_new_tokens=1, stop=["x" * (MAX_STOP_LEN + 1)])
    with pytest.raises(RequestError, match="stop"):
        session.generate([1, 2, 3], max_new_tokens=1, stop=[1, 2])
    # at the limits: fine
    session.generate([1, 2, 3], max_new_tokens=1, stop=["x" * MAX_STOP_LEN] * MAX_STOPS)


def test_stop_given_as_a_plain_string_is_one_stop(session):
    free = session.generate([1, 2, 3], max_new_tokens=12, ignore_eos=True)
    stop = free.text[2:4]
    assert len(stop) == 2
    cut = session.generate([1, 2, 3], max_new_tokens=12, ignore_eos=True, stop=stop)  # a str, not a list
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]  # as one stop string, not one per character


def test_stop_string_ends_generation(session):
    free = session.generate([1, 2, 3], max_new_tokens=12, ignore_eos=True)
    assert len(free.text) >= 4
    stop = free.text[2:4]
    cut = session.generate([1, 2, 3], max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]


def test_seeded_generation_is_reproducible(session):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    a = session.generate([5, 6, 7], max_new_tokens=8, sampling=sp, ignore_eos=True)
    b = session.generate([5, 6, 7], max_new_tokens=8, sampling=sp, ignore_eos=True)
    assert a.tokens == b.tokens


def test_greedy_generation_follows_the_logits(session):
    prompt = [5, 6, 7]
    res = session.generate(prompt, max_new_tokens=4, ignore_eos=True)
    ids = prompt + res.tokens
    logits = session.logits(ids)
    assert res.tokens == [int(np.argmax(logits[i])) for i in range(len(prompt) - 1, len(ids) - 1)]


# --- 29: Unicode -------------------------------------------------------------------------


def test_unicode_prompt_and_streamed_text(session):
    ids = session.encode_prompt("héllo 世界 👋 ΣΩ")
    assert all(0 <= t < VOCAB for t in ids) and len(ids) == 13
    assert session.tokenizer.decode(ids) == "héllo 世界 👋 ΣΩ"
    pieces = []
    res = session.generate(ids[:10], max_new_tokens=5, ignore_eos=True, on_text=pieces.append)
    assert "".join(pieces) == res.text == session.tokenizer.decode(res.tokens)
    assert "\ufffd" not in res.text


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "x\udcff"])
def test_lone_surrogates_in_the_prompt(session, text):
    with pytest.raises(RequestError, match="lone surrogate U\\+D[89A-F][0-9A-F]{2} at character"):
        session.encode_prompt(text)


def test_prompt_text_of_the_wrong_type(session):
    with pytest.raises(RequestError, match="must be a string"):
        session.encode_prompt(b"bytes")


# --- 30: NaN logits ------------------------------------------------------------------------


def _poison_final_norm(session):
    """Make every logit NaN from now on: the final norm's weight becomes NaN (on device)."""
    names = [p["name"] for p in session.artifact.manifest["params"]]
    w = session.params[names.index("norm.weight")]
    saved = w.numpy().copy()  # numpy() may be a view of the weights arena
    w.copyfrom(np.full_like(saved, np.nan))
    return lambda: w.copyfrom(saved)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(repetition_penalty=1.1)])
def test_nan_logits_in_decode_fail_the_request(session, monkeypatch, sampling):
    # prefill is clean; the weights turn NaN before the first decode step, so the
    # check under test is decode's: the device-side finite flag (greedy) or the host sampler
    real = Session.prefill
    restore = []
    def prefill_then_poison(self, seq, tokens, **kw):
        out = real(self, seq, tokens, **kw)
        restore.append(_poison_final_norm(self))
        return out
    monkeypatch.setattr(Session, "prefill", prefill_then_poison)
    try:
        with pytest.raises(KilnError, match="NaN"):
            session.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True, sampling=sampling)
    finally:
        restore[0]()
        monkeypatch.undo()
    assert len(session.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True).tokens) == 4


def test_nan_logits_in_prefill_emit_nothing(session, monkeypatch):
    real = Session.prefill

    def poisoned(self, seq, tokens, **kw):
        out = real(self, seq, tokens, **kw)
        out[..., 7] = np.nan
        return out

    monkeypatch.setattr(Session, "prefill", poisoned)
    emitted = []
    with pytest.raises(KilnError, match="NaN"):
        for tok in session.stream([1, 2, 3], max_new_tokens=4):
            emitted.append(tok)
    assert emitted == []


def test_session_still_works_after_failed_requests(session):
    res = session.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True)
    assert len(res.tokens) == 3


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_bad_token_list(art):
    assert_one_line_error(cli("run", art, "--tokens", "1,2,x"), "--tokens", "1,2,x")


@pytest.mark.parametrize("args,fragments", [
    (["--tokens", "1,999"], ["999", str(VOCAB)]),
    (["--tokens", ",".join(map(str, range(3, 23))), "--max-seq-len", "16"], ["20", "16"]),
    (["--tokens", "1,2", "--temperature", "nan"], ["temperature"]),
    (["--tokens", "1,2", "--top-p", "1.5"], ["top_p", "(0.0, 1.0]"]),
    (["--tokens", "1,2", "--top-k", "-1"], ["top_k"]),
    (["--tokens", "1,2", "--seed", "-3"], ["seed"]),
    (["--tokens", "1,2", "--max-new-tokens", "0"], ["max_new_tokens"]),
    (["--tokens", "1,2", "--threads", "0"], ["threads"]),
    (["--prompt", "a\udcffb"], ["lone surrogate"]),
])
def test_cli_bad_requests(art, args, fragments):
    assert_one_line_error(cli("run", art, *args), *fragments)


def test_cli_run_json(art):
    proc = cli("run", art, "--tokens", "1,2,3", "--max-new-tokens", "4", "--json", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"prompt_tokens", "tokens", "text", "prefill_tok_per_s", "decode_tok_per_s"} <= set(out)
    assert out["prompt_tokens"] == [1, 2, 3] and len(out["tokens"]) == 4
    assert isinstance(out["text"], str)
    assert out["prefill_tok_per_s"] > 0 and out["decode_tok_per_s"] > 0


def test_cli_run_unicode_prompt(art):
    proc = cli("run", art, "--prompt", "héllo 世界 👋", "--max-new-tokens", "3", "--json", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"][:2] == [75, 139] and len(out["tokens"]) == 3


def test_cli_nan_logits(art):
    code = f"""
import sys, numpy as np
import kiln.runtime.session as S
real = S.Session.decode_greedy
def nan_step(self, seqs, tokens):
    out = real(self, seqs, tokens)
    names = [p["name"] for p in self.artifact.manifest["params"]]
    w = self.params[names.index("norm.weight")]
    w.copyfrom(np.full(w.shape, np.nan, np.float32))  # every later step sees NaN logits
    return out
S.Session.decode_greedy = nan_step
from kiln.cli import main
sys.exit(main(["run", {str(art)!r}, "--tokens", "1,2,3", "--max-new-tokens", "4", "--ignore-eos", "--json"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert_one_line_error(proc, "NaN")
    assert proc.stdout.strip() == ""  # no JSON result for a failed request


def test_cli_inspect(art):
    proc = cli("inspect", art)
    assert proc.returncode == 0, proc.stderr
    assert "hashes   verified" in proc.stdout and "LlamaForCausalLM" in proc.stdout
    assert "serving  decode_batch on cpu; up to 4096 sequences; prompt tokens per step 1024 on cpu by default" in proc.stdout
    proc = cli("inspect", art, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["magic"] == "kiln-artifact"


def test_cli_eval_logits(art, session, tmp_path):
    ids = [1, 5, 9, 14, 20, 33, 47, 80, 120, 200]
    f = tmp_path / "logits.npy"
    proc = cli("eval", art, "--tokens", ",".join(map(str, ids)), "--logits-out", f, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    logits = np.load(f)
    assert logits.dtype == np.float32 and logits.shape == (len(ids), VOCAB)
    np.testing.assert_allclose(logits, session.logits(ids), rtol=1e-5, atol=1e-5)
    # mean NLL of tokens 1.. under rows 0..T-2, float64 reference
    x = logits[:-1].astype(np.float64)
    logp = x - x.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert out["tokens"] == len(ids)
    assert math.isclose(out["mean_nll"], nll, rel_tol=1e-6) and math.isclose(out["perplexity"], math.exp(nll), rel_tol=1e-6)


def test_cli_eval_needs_two_tokens(art):
    assert_one_line_error(cli("eval", art, "--tokens", "5"), "at least 2 tokens")
