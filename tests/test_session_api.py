"""Session's public step API: sequences in the paged KV cache, prefill,
decode_step / decode_greedy, advance, the profiling hooks. Generate, `kiln
bench`, the benchmarks and the server are built on these calls, so each is
checked against the teacher-forced `logits()` and against a sequence run alone,
on TVM's paged cache and on kiln's int8 cache."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import kiln.runtime
from kiln.errors import KilnError, RequestError

CTX = 40
PROMPT_A = [5, 17, 99, 3, 150, 42, 7, 201, 64, 11, 90, 33, 120]  # 13 tokens: odd, over one prefill chunk of 5
PROMPT_B = [8, 160, 2, 77, 19, 140, 55]


@pytest.fixture(scope="module", params=["paged", pytest.param("int8", marks=pytest.mark.slow)])  # int8: kiln's cache, slow tier
def art(request, compiled, tiny_checkpoint, tmp_path_factory):
    if request.param == "paged":
        return compiled("llama")
    out = tmp_path_factory.mktemp("kv_int8") / "int8.kiln"
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(tiny_checkpoint("llama")), "-o", str(out), "--dtype", "float32",
                           "--kv-dtype", "int8", "--no-quality-check", "--quiet"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def session(art):
    return kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3)


@pytest.fixture(autouse=True)
def no_open_sequences(request):
    """Each test closes what it opens (a failed call leaves nothing behind either)."""
    yield
    if "session" in request.fixturenames:
        s = request.getfixturevalue("session")
        leaked = s.sequences
        for seq in leaked:
            s.remove_sequence(seq)
        assert leaked == []


def test_prefill_all_logits_equals_logits(session):
    ref = session.logits(PROMPT_A)
    seq = session.add_sequence()
    try:
        rows = session.prefill(seq, PROMPT_A, all_logits=True)
        assert rows.shape == (len(PROMPT_A), session.vocab_size) and rows.dtype == np.float32
        np.testing.assert_allclose(rows, ref, rtol=0, atol=1e-5)
        assert session.sequence_length(seq) == len(PROMPT_A)
    finally:
        session.remove_sequence(seq)
    seq = session.add_sequence()
    try:
        last = session.prefill(seq, PROMPT_A)
        assert last.shape == (session.vocab_size,)
        np.testing.assert_allclose(last, ref[-1], rtol=0, atol=1e-5)
    finally:
        session.remove_sequence(seq)


def test_prefill_in_chunks_and_in_pieces(art, session):
    """A prompt over prefill_chunk runs in several calls; a sequence prefilled in
    two pieces continues where the first left off: the same logits either way."""
    ref = session.logits(PROMPT_A)
    chunked = kiln.runtime.load(art, max_seq_len=CTX, prefill_chunk=5)
    np.testing.assert_allclose(chunked.logits(PROMPT_A), ref, rtol=0, atol=1e-4)
    seq = session.add_sequence()
    try:
        head = session.prefill(seq, PROMPT_A[:6], all_logits=True)
        tail = session.prefill(seq, PROMPT_A[6:], all_logits=True)
        np.testing.assert_allclose(np.concatenate([head, tail]), ref, rtol=0, atol=1e-4)
    finally:
        session.remove_sequence(seq)


def test_decode_step_is_the_next_teacher_forced_row(session):
    ids = PROMPT_A + PROMPT_B  # 20 tokens: prefill 13, decode 7
    ref = session.logits(ids)
    quantized = session.artifact.manifest["kv_cache"]["kind"] == "kiln-quant"
    if quantized:  # decode reads K/V back from int8 pages: the same path teacher-forced is decode_logits
        close = ref
        ref = session.decode_logits(ids)
    seq = session.add_sequence()
    try:
        session.prefill(seq, PROMPT_A)
        for i, tok in enumerate(PROMPT_B):
            rows = session.decode_step([seq], [tok])
            assert rows.shape == (1, session.vocab_size) and rows.dtype == np.float32
            np.testing.assert_allclose(rows[0], ref[len(PROMPT_A) + i], rtol=0, atol=1e-4)
        assert session.sequence_length(seq) == len(ids)
    finally:
        session.remove_sequence(seq)
    if quantized:  # and close to the float prefill
        assert (ref.argmax(-1) == close.argmax(-1)).mean() >= 0.9
        assert np.abs(ref - close).max() < 0.1 * np.abs(close).max()


def _alone(session, prompt, n):
    """Greedy tokens and the logits rows that picked them, for `prompt` in a session of its own."""
    seq = session.add_sequence()
    try:
        rows = [session.prefill(seq, prompt)]
        toks = [int(rows[-1].argmax())]
        for _ in range(n - 1):
            rows.append(session.decode_step([seq], [toks[-1]])[0])
            toks.append(int(rows[-1].argmax()))
        return toks, np.stack(rows)
    finally:
        session.remove_sequence(seq)


def test_two_sequences_interleaved_equal_each_alone(session):
    n = 10
    toks_a, rows_a = _alone(session, PROMPT_A, n)
    toks_b, rows_b = _alone(session, PROMPT_B, n)
    assert toks_a != toks_b
    a, b = session.add_sequence(), session.add_sequence()
    assert a != b and session.sequences == sorted([a, b])
    try:
        got_a, got_b = [session.prefill(a, PROMPT_A)], [session.prefill(b, PROMPT_B)]
        ta, tb = [int(got_a[0].argmax())], [int(got_b[0].argmax())]
        for i in range(n - 1):
            if i % 3 == 2:  # some steps as one call over both sequences, B first: rows follow the order given
                rb, ra = session.decode_step([b, a], [tb[-1], ta[-1]])
            else:
                ra = session.decode_step([a], [ta[-1]])[0]
                rb = session.decode_step([b], [tb[-1]])[0]
            got_a.append(ra)
            got_b.append(rb)
            ta.append(int(ra.argmax()))
            tb.append(int(rb.argmax()))
        assert (ta, tb) == (toks_a, toks_b)
        np.testing.assert_allclose(np.stack(got_a), rows_a, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.stack(got_b), rows_b, rtol=0, atol=1e-5)
        assert session.sequence_length(a) == len(PROMPT_A) + n - 1 and session.sequence_length(b) == len(PROMPT_B) + n - 1
    finally:
        session.remove_sequence(a)
        session.remove_sequence(b)


def test_batched_decode_rows_are_bit_identical_to_each_alone(session):
    """decode_step / decode_greedy over three sequences of different lengths (one
    decode_batch call, on TVM's paged cache or kiln's int8 one): every row equals, bit for bit, the
    row of that sequence decoded alone (the B = 1 decode function) -- batching
    never changes a request's logits or its greedy tokens."""
    assert session.batch_decode  # TVM's paged cache and kiln's int8 cache both batch their decode steps
    prompts = [PROMPT_A, PROMPT_B, PROMPT_A[:4]]
    n = 8
    alone = [_alone(session, p, n) for p in prompts]
    seqs = [session.add_sequence() for _ in prompts]
    try:
        rows = [[session.prefill(q, p)] for q, p in zip(seqs, prompts)]
        toks = [[int(r[0].argmax())] for r in rows]
        for i in range(n - 1):
            if i % 2:
                picked = session.decode_greedy(seqs, [t[-1] for t in toks])
                for t, x in zip(toks, picked):
                    t.append(x)
                for r, (_, ref) in zip(rows, alone):
                    r.append(ref[len(r)])  # the greedy step returns no rows: keep the reference's
            else:
                out = session.decode_step(seqs, [t[-1] for t in toks])
                assert out.shape == (len(seqs), session.vocab_size)
                for r, t, row in zip(rows, toks, out):
                    r.append(row)
                    t.append(int(row.argmax()))
        for (ref_toks, ref_rows), got_toks, got_rows in zip(alone, toks, rows):
            assert got_toks == ref_toks
            np.testing.assert_array_equal(np.stack(got_rows), ref_rows)
    finally:
        for q in seqs:
            session.remove_sequence(q)


def test_prefill_many_equals_each_prefill(session):
    """prefill_many (the server's prefill step: one ragged call on TVM's paged cache)
    gives each sequence the logits and the cache a prefill of it alone gives: the last
    rows match, a second round on top of the first (a chunked prompt) matches the
    teacher-forced row, and the decode step after it matches too."""
    prompts = [PROMPT_A, PROMPT_B, PROMPT_A[:4]]
    split = [6, 3, 1]  # first chunks; the rest in a second prefill_many over sequences with history
    refs = [session.logits(p) for p in prompts]
    seqs = [session.add_sequence() for _ in prompts]
    try:
        first = session.prefill_many(seqs, [p[:k] for p, k in zip(prompts, split)])
        assert first.shape == (len(prompts), session.vocab_size) and first.dtype == np.float32
        for row, ref, k in zip(first, refs, split):
            np.testing.assert_allclose(row, ref[k - 1], rtol=0, atol=1e-5)
        last = session.prefill_many(seqs, [p[k:] for p, k in zip(prompts, split)])
        for row, ref in zip(last, refs):
            np.testing.assert_allclose(row, ref[-1], rtol=0, atol=1e-5)
        assert [session.sequence_length(q) for q in seqs] == [len(p) for p in prompts]
        nxt = [int(r.argmax()) for r in last]
        out = session.decode_step(seqs, nxt)
    finally:
        for q in seqs:
            session.remove_sequence(q)
    for row, p, t in zip(out, prompts, nxt):  # (logits() needs a free sequence)
        np.testing.assert_allclose(row, session.logits(p + [t])[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("lists", "msg"), [
    ([[5, 6], []], "empty"),
    ([[5, 6], [7, 211]], "outside"),
    ([[5] * (CTX - 1), [5] * (CTX + 1)], "pass this session's context"),
])
def test_prefill_many_checks_everything_first(session, lists, msg):
    seqs = [session.add_sequence() for _ in lists]
    try:
        with pytest.raises(RequestError, match=msg):
            session.prefill_many(seqs, lists)
        assert [session.sequence_length(q) for q in seqs] == [0, 0]  # nothing ran
        with pytest.raises(RequestError, match="twice"):
            session.prefill_many([seqs[0], seqs[0]], [[5], [6]])
    finally:
        for q in seqs:
            session.remove_sequence(q)


def test_decode_greedy_matches_generate_across_sequences(session):
    n = 8
    want_a = session.generate(PROMPT_A, max_new_tokens=n, ignore_eos=True).tokens
    want_b = session.generate(PROMPT_B, max_new_tokens=n, ignore_eos=True).tokens
    a, b = session.add_sequence(), session.add_sequence()
    try:
        ta, tb = [int(session.prefill(a, PROMPT_A).argmax())], [int(session.prefill(b, PROMPT_B).argmax())]
        for _ in range(n - 1):
            na, nb = session.decode_greedy([a, b], [ta[-1], tb[-1]])
            ta.append(na)
            tb.append(nb)
        assert (ta, tb) == (want_a, want_b)
    finally:
        session.remove_sequence(a)
        session.remove_sequence(b)


def test_removed_sequence_frees_its_place(session):
    """Close A while B runs; a new sequence takes A's id and pages; B is unaffected."""
    toks_b, _ = _alone(session, PROMPT_B, 6)
    toks_c, _ = _alone(session, PROMPT_A[:4], 3)
    a, b = session.add_sequence(), session.add_sequence()
    try:
        session.prefill(a, PROMPT_A)
        tb = [int(session.prefill(b, PROMPT_B).argmax())]
        tb += session.decode_greedy([b], [tb[-1]])
        session.remove_sequence(a)
        c = session.add_sequence()
        assert c == a and session.sequence_length(c) == 0
        tc = [int(session.prefill(c, PROMPT_A[:4]).argmax())]
        for _ in range(4):
            tb += session.decode_greedy([b], [tb[-1]])
        tc += session.decode_greedy([c], [tc[-1]])
        tc += session.decode_greedy([c], [tc[-1]])
        assert tb == toks_b and tc == toks_c
        session.remove_sequence(c)
    finally:
        session.remove_sequence(b)


def test_advance_then_decode(session):
    """kiln bench --context's path: positions filled without the model, then decode."""
    seq = session.add_sequence()
    try:
        session.advance(seq, 30)
        assert session.sequence_length(seq) == 30
        (tok,) = session.decode_greedy([seq], [5])
        assert 0 <= tok < session.vocab_size and session.sequence_length(seq) == 31
        session.advance(seq, 0)
        with pytest.raises(RequestError, match=f"advance by 0 to {CTX - 31}"):
            session.advance(seq, CTX - 30)
    finally:
        session.remove_sequence(seq)


def test_instrument_and_sync(session):
    names = []

    def hook(func, name, before, ret, *args):
        if before:
            names.append(name)
        return 0

    seq = session.add_sequence()
    try:
        session.prefill(seq, PROMPT_B)
        session.set_instrument(hook)
        try:
            session.decode_greedy([seq], [5])
        finally:
            session.set_instrument(None)
        assert names, "the hook saw no VM call"
        count = len(names)
        session.decode_greedy([seq], [6])
        session.sync()
        assert len(names) == count  # removed
    finally:
        session.remove_sequence(seq)


# --- errors: one-line KilnErrors, nothing run, nothing left open ---------------------------


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, KilnError) and "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("bad", [99, -1, "0", None, 0.0, False, [0]])
def test_unknown_sequence(session, bad):
    seq = session.add_sequence()  # id 0 is open: 0.0 and False must not pass for it
    assert seq == 0
    calls = [lambda: session.prefill(bad, [1, 2]), lambda: session.decode_step([bad], [1]), lambda: session.decode_greedy([bad], [1]),
             lambda: session.remove_sequence(bad), lambda: session.sequence_length(bad), lambda: session.advance(bad, 1)]
    try:
        for call in calls:
            with pytest.raises(RequestError, match="is not open in this session") as ei:
                call()
            _one_line(ei)
        assert session.sequence_length(seq) == 0
    finally:
        session.remove_sequence(seq)


def test_closed_sequence_is_unknown(session):
    seq = session.add_sequence()
    session.remove_sequence(seq)
    with pytest.raises(RequestError, match=f"sequence {seq} is not open"):
        session.decode_step([seq], [1])


def test_context_overflow(session):
    seq = session.add_sequence()
    try:
        with pytest.raises(RequestError, match=f"holds 0 tokens: {CTX + 1} more pass this session's context of {CTX}") as ei:
            session.prefill(seq, [3] * (CTX + 1))
        _one_line(ei)
        assert session.sequence_length(seq) == 0
        session.prefill(seq, [3] * (CTX - 1))
        with pytest.raises(RequestError, match=f"holds {CTX - 1} tokens: 2 more"):
            session.prefill(seq, [3, 4])
        session.decode_step([seq], [4])  # the last position
        assert session.sequence_length(seq) == CTX
        for call in (lambda: session.decode_step([seq], [4]), lambda: session.decode_greedy([seq], [4])):
            with pytest.raises(RequestError, match=f"sequence {seq} holds {CTX} tokens, this session's context: no room") as ei:
                call()
            _one_line(ei)
        assert session.sequence_length(seq) == CTX
    finally:
        session.remove_sequence(seq)


@pytest.mark.parametrize("tok", [-1, 211, 10**30, 1.5, True, None, "7"])
def test_bad_token_ids(session, tok):
    assert session.vocab_size == 211
    seq = session.add_sequence()
    try:
        for call in (lambda: session.prefill(seq, [1, tok]), lambda: session.decode_step([seq], [tok]),
                     lambda: session.decode_greedy([seq], [tok])):
            with pytest.raises(RequestError, match=r"token id .* is outside \[0, 211\)") as ei:
                call()
            _one_line(ei)
        assert session.sequence_length(seq) == 0
    finally:
        session.remove_sequence(seq)


def test_a_bad_entry_stops_the_whole_decode_step(session):
    """Every sequence and token is checked before any sequence runs."""
    a, b = session.add_sequence(), session.add_sequence()
    try:
        session.prefill(a, PROMPT_A)
        session.prefill(b, PROMPT_B)
        for seqs, toks, msg in [([a, b], [1, 999], "outside"), ([a, 77], [1, 2], "not open"), ([a, a], [1, 2], "twice"),
                                ([a, b], [1], "as many token ids"), ((a,), 5, "as many token ids")]:
            with pytest.raises(RequestError, match=msg) as ei:
                session.decode_step(seqs, toks)
            _one_line(ei)
        assert (session.sequence_length(a), session.sequence_length(b)) == (len(PROMPT_A), len(PROMPT_B))
    finally:
        session.remove_sequence(a)
        session.remove_sequence(b)


def test_empty_prefill(session):
    seq = session.add_sequence()
    try:
        with pytest.raises(RequestError, match="empty"):
            session.prefill(seq, [])
    finally:
        session.remove_sequence(seq)


def test_too_many_sequences(session):
    opened = [session.add_sequence() for _ in range(session.max_sequences)]
    try:
        assert opened == list(range(session.max_sequences))
        with pytest.raises(RequestError, match=f"all {session.max_sequences} sequences of this session are open") as ei:
            session.add_sequence()
        _one_line(ei)
        with pytest.raises(RequestError, match="sequences of this session are open"):
            session.generate([1, 2, 3], max_new_tokens=2)  # generate needs a sequence of its own
    finally:
        for seq in opened:
            session.remove_sequence(seq)
    assert len(session.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True).tokens) == 2


@pytest.mark.parametrize("n", [0, -1, 4097, 1.5, True])
def test_bad_max_sequences(art, n):
    with pytest.raises(RequestError, match=r"max_sequences must be an integer in \[1, 4096\]"):
        kiln.runtime.load(art, max_seq_len=CTX, max_sequences=n)


def _quantized_cache(art) -> bool:
    return json.loads((art / "manifest.json").read_text())["kv_cache"].get("kind") == "kiln-quant"


@pytest.mark.parametrize("n", [0, 2, 10, True, 1.5, "4"])
def test_bad_kv_pages(art, n):
    """The shared pool holds one to max_sequences contexts (here 3 to 9 pages of 16 for a
    context of 40); kiln's quantized cache has no shared pool to size."""
    msg = "quantized KV cache reserves" if _quantized_cache(art) else r"kv_pages must be an integer in \[3, 9\]"
    with pytest.raises(RequestError, match=msg):
        kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3, kv_pages=n)


def test_kv_pool_pages_are_counted(art):
    if _quantized_cache(art):
        s = kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3)
        assert s.kv_pages_total is None and s.kv_pages_free() is None
        return
    one_context = kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3, kv_contexts=1)  # (the server's pool with a prefix cache)
    assert one_context.kv_pages_total == kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3, kv_pages=3).kv_pages_total
    s = kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3, kv_pages=4)
    total = s.kv_pages_total
    assert total >= 4 and s.kv_pages_free() == total and s.pages_for(17) == 2 and s.page_size == 16
    seq = s.add_sequence()
    s.prefill(seq, PROMPT_A + PROMPT_B)  # 20 tokens: 2 pages
    assert s.kv_pages_free() == total - 2
    s.remove_sequence(seq)
    assert s.kv_pages_free() == total


def test_fork_sequence_shares_a_prefix(art):
    """fork_sequence(parent, n): a new sequence holding parent's first n tokens, its
    pages shared (no new page for whole pages); the rest prefilled on top gives the
    teacher-forced logits; either may be removed first."""
    if _quantized_cache(art):
        s = kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3)
        a = s.add_sequence()
        s.prefill(a, PROMPT_A)
        with pytest.raises(RequestError, match="paged KV cache"):
            s.fork_sequence(a, 4)
        return
    s = kiln.runtime.load(art, max_seq_len=CTX, max_sequences=3)
    prompt = PROMPT_A + PROMPT_B + PROMPT_A  # 33 tokens: 3 pages of 16
    ref = s.logits(prompt)
    a = s.add_sequence()
    s.prefill(a, prompt[:20])
    free = s.kv_pages_free()
    b = s.fork_sequence(a, 16)  # a whole page: shared
    assert s.kv_pages_free() == free and s.sequence_length(b) == 16
    c = s.fork_sequence(a, 19)  # a partial page: copied
    assert s.kv_pages_free() == free - 1
    s.remove_sequence(a)
    np.testing.assert_allclose(s.prefill(b, prompt[16:]), ref[-1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(s.prefill(c, prompt[19:]), ref[-1], rtol=0, atol=1e-5)
    for bad in (0, 34, True, 1.5):  # b holds 33 now
        with pytest.raises(RequestError, match="a fork takes 1 to 33"):
            s.fork_sequence(b, bad)
    s.remove_sequence(b)
    s.remove_sequence(c)
    assert s.kv_pages_free() == s.kv_pages_total
