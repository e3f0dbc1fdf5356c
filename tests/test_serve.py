"""`kiln serve` (issue 12): a live server on 127.0.0.1, started as a user
would (`python -m kiln.cli serve`), driven by the real `openai` client and by
raw HTTP for the error statuses. The reference is the runtime's own
Session.generate on the same artifact (what `kiln run` prints)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from helpers.models import make_tiny_checkpoint
from helpers.processes import compile_artifact, subprocess_env

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["hello world", "the kiln fires", "abc", "one two three four", "zzz", "a", "serving tests", "xyz 123"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_checkpoint(root / "model", writer="numpy")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return compile_artifact(model, root / "tiny.kiln")


class Server:
    def __init__(self, artifact: Path, *args: str, group: bool = False):
        """group: the server leads a process group of its own (as under a service manager)."""
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                                     start_new_session=group)
        line = self.proc.stdout.readline()
        m = re.search(r"on http://([\d.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = f"http://{m.group(1)}:{m.group(2)}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="-", max_retries=0, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, obj) -> tuple[int, dict, dict]:
        status, raw, headers = self.request("POST", path, obj if isinstance(obj, bytes) else json.dumps(obj).encode())
        return status, json.loads(raw) if raw else {}, headers

    def metrics(self) -> dict[str, float]:
        text = self.get("/metrics")[1].decode()
        return {k: float(v) for k, v in re.findall(r"^(kiln_[\w{}=\"]+) ([\d.e+-]+)$", text, re.M)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(artifact):
    s = Server(artifact, "--max-batch", "4", "--model-name", "tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def reference(artifact):
    from kiln.runtime import SamplingParams, load  # noqa: PLC0415

    session = load(artifact)

    def generate(ids: list[int], n: int, ignore_eos: bool = False) -> str:
        return session.generate(ids, max_new_tokens=n, sampling=SamplingParams(temperature=0), ignore_eos=ignore_eos).text

    return session, generate


def test_concurrent_greedy_requests_equal_the_runtime_token_for_token(server, reference):
    """8 requests at once through a batch of 4: each text equals generate() alone."""
    session, generate = reference

    def one(prompt: str):
        r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        return r.choices[0].text, r.usage

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, PROMPTS))
    for prompt, (text, usage) in zip(PROMPTS, got):
        ids = session.encode_prompt(prompt)
        assert text == generate(ids, 24), prompt
        assert usage.prompt_tokens == len(ids) and 1 <= usage.completion_tokens <= 24


@pytest.mark.slow
def test_batching_does_not_change_greedy_tokens(artifact, reference):
    """One request alone, and the same request among 31 others in a batch of 32."""
    session, generate = reference
    s = Server(artifact, "--max-batch", "32", "--model-name", "tiny")
    try:
        ids = session.encode_prompt("batch invariance")
        alone = s.client.completions.create(model="tiny", prompt=ids, max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
        with ThreadPoolExecutor(32) as pool:
            futs = [pool.submit(s.client.completions.create, model="tiny", prompt=ids if i == 7 else PROMPTS[i % len(PROMPTS)],
                                max_tokens=32, temperature=0, extra_body={"ignore_eos": True}) for i in range(32)]
            crowd = [f.result() for f in futs]
        assert crowd[7].choices[0].text == alone.choices[0].text == generate(ids, 32, ignore_eos=True)
        assert alone.usage.completion_tokens == crowd[7].usage.completion_tokens == 32
    finally:
        assert s.stop() == 0


def test_chat_and_streaming_equal_non_streaming(server, reference):
    session, generate = reference
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    full = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    ids = session.tokenizer.encode_chat(msgs)
    assert full.choices[0].message.content == generate(ids, 20)
    assert full.choices[0].message.role == "assistant" and full.usage.prompt_tokens == len(ids)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    comp = "".join(c.choices[0].text for c in server.client.completions.create(model="tiny", prompt="stream me", max_tokens=16,
                                                                                temperature=0, stream=True))
    assert comp == server.client.completions.create(model="tiny", prompt="stream me", max_tokens=16, temperature=0).choices[0].text


def test_sampling_is_seeded_and_stop_strings_cut(server):
    a = server.client.completions.create(model="tiny", prompt="seeded", max_tokens=16, temperature=0.9, top_p=0.9, seed=5)
    b = server.client.completions.create(model="tiny", prompt="seeded", max_tokens=16, temperature=0.9, top_p=0.9, seed=5)
    assert a.choices[0].text == b.choices[0].text
    full = server.client.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0).choices[0].text
    stop = full[3:5]
    cut = server.client.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": None}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": list(range(1, 200))}, 413, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 400}, 413, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400, "tools"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_status_in_openai_shape(server, path, body, status, param):
    got, obj, _ = server.post(path, body)
    assert got == status, obj
    assert set(obj["error"]) >= {"message", "type", "param", "code"} and obj["error"]["message"]
    assert obj["error"]["param"] == param


def test_body_over_the_limit_and_unknown_routes(server):
    status, obj, _ = server.post("/v1/completions", b'{"model": "tiny", "prompt": "' + b"x" * (1 << 20) + b'"}')
    assert status == 413 and obj["error"]["code"] == "body_too_large"
    assert server.get("/v1/nothing")[0] == 404
    assert server.request("GET", "/v1/completions")[0] == 405
    assert server.get("/health")[0] == 200
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_api_key_is_required_when_set(artifact):
    s = Server(artifact, "--api-key", "sekrit", "--model-name", "tiny")
    try:
        status, obj, _ = s.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 401 and obj["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            s.client.completions.create(model="tiny", prompt="x", max_tokens=2)
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        assert s.get("/health")[0] == 200  # health and metrics stay open for probes
    finally:
        assert s.stop() == 0


def test_an_idle_keep_alive_connection_outlives_the_clients_pool(server):
    """A connection idle for 6 s (past httpx's 5 s pool expiry, so the openai client has dropped it
    by then) still answers: the server never closes one a client may be about to reuse."""
    import http.client  # noqa: PLC0415

    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for wait in (0, 6):
            time.sleep(wait)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
    finally:
        conn.close()


def test_full_queue_is_429_with_retry_after(artifact):
    s = Server(artifact, "--max-batch", "1", "--max-queue", "1", "--model-name", "tiny")
    try:
        body = {"model": "tiny", "prompt": "long", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: s.post("/v1/completions", body), range(8)))
        statuses = sorted(r[0] for r in results)
        assert 200 in statuses and 429 in statuses, statuses
        refused = next(r for r in results if r[0] == 429)
        assert refused[2].get("Retry-After") == "1" and refused[1]["error"]["type"] == "rate_limit_error"
        assert s.metrics()["kiln_requests_rejected_total"] == statuses.count(429)
    finally:
        assert s.stop() == 0


def test_a_client_that_disconnects_frees_its_sequence(server):
    # Deterministic: the batch (4) is full of long requests and four more wait ahead of
    # ours, so the stream is still queued (no token yet) when its client goes away --
    # a running tiny-model request could otherwise finish before the disconnect is seen.
    before = server.metrics()
    blockers = []

    def block():
        blockers.append(server.client.completions.create(model="tiny", prompt="hold the batch", max_tokens=100,
                                                         temperature=0, extra_body={"ignore_eos": True}))

    threads = [threading.Thread(target=block) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while server.metrics()["kiln_running"] < 4 and time.time() < deadline:
        time.sleep(0.01)
    stream = server.client.completions.create(model="tiny", prompt="go on", max_tokens=124, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    stream.close()  # the connection goes away before the request got a token
    for t in threads:
        t.join(timeout=60)
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server.metrics()
        if m["kiln_running"] == 0 and m["kiln_sequences_open"] == 0:
            break
        time.sleep(0.05)
    assert len(blockers) == 8 and all(r.usage.completion_tokens == 100 for r in blockers)
    assert m['kiln_requests_finished_total{outcome="cancelled"}'] == before['kiln_requests_finished_total{outcome="cancelled"}'] + 1
    assert m['kiln_requests_finished_total{outcome="completed"}'] == before['kiln_requests_finished_total{outcome="completed"}'] + 8
    assert m["kiln_sequences_open"] == 0 and m["kiln_running"] == 0


def _stop_during_a_long_request(s: Server, stop) -> int:
    """Start a 100-token request, stop the server with stop() while it runs; the server's exit
    code, once the request has come back whole."""
    out = {}

    def long_request():
        out["r"] = s.client.completions.create(model="tiny", prompt="finish me", max_tokens=100, temperature=0,
                                               extra_body={"ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.3)
    try:
        code = stop()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    t.join(timeout=30)
    assert out["r"].usage.completion_tokens == 100
    return code


def test_sigterm_lets_running_requests_finish_and_exits_0(artifact):
    s = Server(artifact, "--model-name", "tiny", "--grace", "30")
    assert _stop_during_a_long_request(s, s.stop) == 0


def test_sigterm_to_the_whole_group_still_finishes_running_requests(artifact):
    """systemd (and a terminal's Ctrl-C) signal the server and its engine process together: the
    engine ignores it and the server leads the stop, so the running request still completes."""
    s = Server(artifact, "--model-name", "tiny", "--grace", "30", group=True)

    def stop_group():
        __import__("os").killpg(s.proc.pid, signal.SIGTERM)
        return s.proc.wait(timeout=60)

    assert _stop_during_a_long_request(s, stop_group) == 0


@pytest.mark.slow
def test_soak_of_mixed_requests_leaves_nothing_behind(server):
    threads_before = server.metrics()["kiln_threads"]
    rng = __import__("random").Random(3)

    def one(i: int):
        kind = i % 4
        if kind == 0:
            return server.client.completions.create(model="tiny", prompt=PROMPTS[i % 8], max_tokens=rng.randint(1, 40), temperature=0)
        if kind == 1:
            return list(server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[i % 8]}],
                                                              max_tokens=16, temperature=0.7, seed=i, stream=True))
        if kind == 2:
            st = server.client.completions.create(model="tiny", prompt="cut", max_tokens=60, stream=True, extra_body={"ignore_eos": True})
            next(iter(st))
            st.close()
            return None
        return server.post("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3})

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(300)))
    deadline = time.time() + 10
    while time.time() < deadline and (server.metrics()["kiln_running"] or server.metrics()["kiln_sequences_open"]):
        time.sleep(0.05)
    m = server.metrics()
    assert m["kiln_running"] == 0 and m["kiln_sequences_open"] == 0 and m["kiln_queue_depth"] == 0
    assert m["kiln_threads"] <= threads_before + 2


def test_an_unexpected_engine_error_fails_the_request_and_the_engine_goes_on(artifact):
    """A bug in a step (here: the decode launch raising a plain ValueError) fails the requests
    it hit with an error event; the engine thread lives on for the next request."""
    import queue  # noqa: PLC0415

    from kiln.runtime import load  # noqa: PLC0415
    from kiln.runtime.engine import Engine  # noqa: PLC0415

    session = load(artifact, max_sequences=2)
    real = session.decode_greedy_async
    calls = {"n": 0}

    def flaky(seqs, toks):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        return real(seqs, toks)

    session.decode_greedy_async = flaky
    engine = Engine(session).start()
    try:
        for want in ("error", "done"):
            events: queue.Queue = queue.Queue()
            engine.submit([1, 2, 3], events.put, max_new_tokens=4, ignore_eos=True)
            while True:
                ev = events.get(timeout=60)
                if ev.kind != "token":
                    break
            assert ev.kind == want, ev
            if want == "error":
                assert "internal error: ValueError: boom" in ev.error
        assert engine.stats()["sequences_open"] == 0 and session.sequences == []
    finally:
        engine.stop()


def test_overlapped_greedy_steps_end_where_generate_ends(artifact, reference):
    """The engine queues a greedy step before it accepts the previous one's tokens: requests
    that end on a stop string (known only from the text), on the token limit or on EOS,
    admitted mid-flight into a batch of 3, still give generate()'s text exactly, and every
    sequence is closed afterwards."""
    import queue  # noqa: PLC0415

    from kiln.runtime import SamplingParams, load  # noqa: PLC0415
    from kiln.runtime.engine import Engine  # noqa: PLC0415

    session = load(artifact, max_sequences=3)
    ref_session, _ = reference
    jobs = []
    for i, p in enumerate(PROMPTS[:6]):
        ids = session.encode_prompt(p)
        full = ref_session.generate(ids, max_new_tokens=20, sampling=SamplingParams(temperature=0), ignore_eos=True).text
        stop = [full[4:6]] if i % 2 and len(full) > 6 else None
        want = ref_session.generate(ids, max_new_tokens=5 + 3 * i, sampling=SamplingParams(temperature=0), stop=stop,
                                    ignore_eos=i % 3 == 0)
        jobs.append((ids, 5 + 3 * i, stop, i % 3 == 0, want))
    assert {"stop", "length"} <= {j[-1].finish_reason for j in jobs}
    engine = Engine(session).start()
    try:
        queues = []
        for ids, n, stop, ignore_eos, _ in jobs:
            q: queue.Queue = queue.Queue()
            engine.submit(ids, q.put, max_new_tokens=n, stop=stop, ignore_eos=ignore_eos)
            queues.append(q)
        for q, (*_, want) in zip(queues, jobs):
            text, ev = "", None
            while ev is None or ev.kind == "token":
                ev = q.get(timeout=60)
                text += ev.text if ev.kind == "token" else ""
            assert ev.kind == "done" and (text, ev.finish) == (want.text, want.finish_reason), (text, ev, want)
        deadline = time.time() + 10
        while engine.stats()["sequences_open"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["sequences_open"] == 0 and session.sequences == []
    finally:
        engine.stop()


def test_a_sampler_joining_overlapped_steps_does_not_decode_a_finished_request(artifact, reference):
    """Greedy request A decodes in overlapped steps while B's long prompt is fed 4 tokens a step;
    the step where B starts sampling reads logits at once, accepting A's in-flight token first --
    which completes A's stop string. A ends on it, and B's step must not include A's closed
    sequence (it failed both requests before)."""
    import queue  # noqa: PLC0415

    from kiln.runtime import SamplingParams, load  # noqa: PLC0415
    from kiln.runtime.engine import Engine  # noqa: PLC0415

    ref, _ = reference
    a_ids, b_ids = ref.encode_prompt("ab")[:2], ref.encode_prompt("the kiln fires, slowly")[:14]
    assert len(a_ids) == 2 and len(b_ids) == 14
    text = ref.generate(a_ids, max_new_tokens=8, sampling=SamplingParams(temperature=0), ignore_eos=True).text
    # prefill budget 4: A's 2 prompt tokens and 2 of B's in step 1, B done at step 4; step 5 samples B and
    # accepts A's 4th token (launched at step 4): stop on the text up to that token
    stop = text[:4]
    want = ref.generate(a_ids, max_new_tokens=8, sampling=SamplingParams(temperature=0), stop=[stop], ignore_eos=True)
    assert want.finish_reason == "stop" and len(want.tokens) == 4, (text, want)
    session = load(artifact, max_sequences=2)
    engine = Engine(session, prefill_budget=4)
    qa, qb = queue.Queue(), queue.Queue()
    engine.submit(a_ids, qa.put, max_new_tokens=8, stop=[stop], ignore_eos=True)
    engine.submit(b_ids, qb.put, max_new_tokens=6, sampling=SamplingParams(temperature=0.8, seed=1), ignore_eos=True)
    engine.start()
    try:
        ends = []
        for q in (qa, qb):
            ev = q.get(timeout=60)
            while ev.kind == "token":
                ev = q.get(timeout=60)
            ends.append(ev)
        assert [e.kind for e in ends] == ["done", "done"], ends
        assert ends[0].finish == "stop" and ends[1].finish == "length"
    finally:
        engine.stop()


def test_a_small_kv_pool_preempts_and_outputs_stay_right(artifact, reference):
    """A pool of 5 pages (16 tokens each) for 4 requests that grow to ~4 pages each:
    the youngest are preempted and recomputed, and every text still equals
    generate() alone; afterwards every page is free again."""
    session, generate = reference
    s = Server(artifact, "--max-batch", "4", "--max-seq-len", "64", "--kv-pages", "5", "--model-name", "tiny")
    try:
        m = s.metrics()
        assert m["kiln_kv_pages_total"] == m["kiln_kv_pages_free"] >= 5
        prompts = PROMPTS[:4]
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: s.client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0,
                                                                         extra_body={"ignore_eos": True}).choices[0].text, prompts))
        for p, text in zip(prompts, texts):
            assert text == generate(session.encode_prompt(p), 40, ignore_eos=True), p
        m = s.metrics()
        assert m["kiln_preemptions_total"] > 0
        assert m["kiln_kv_pages_free"] == m["kiln_kv_pages_total"] and m["kiln_sequences_open"] == 0
    finally:
        assert s.stop() == 0


def test_a_kv_pool_under_one_context_is_refused(artifact):
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port", "0", "--max-seq-len", "64", "--kv-pages", "3"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode != 0
    assert "kv_pages must be an integer in [4, 32]" in proc.stderr, proc.stderr[-2000:]


def test_prefix_cache_reuses_a_shared_system_prompt(artifact, reference):
    """Chats that share a long system prompt: later ones fork its cached KV pages
    and prefill only the rest (hit tokens in /metrics), and their greedy texts equal
    generate() alone. On a small pool the cache gives its pages back before any
    running request is preempted."""
    session, generate = reference
    system = "You are the kiln test assistant. Answer in one short line. "  # one token per character here
    s = Server(artifact, "--max-batch", "2", "--max-seq-len", "128", "--prefix-cache", "2", "--kv-pages", "14", "--model-name", "tiny")
    try:
        users = ["first question", "second one", "a third", "and a fourth", "fifth"]
        for u in users:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": u}]
            r = s.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
            assert r.choices[0].message.content == generate(session.tokenizer.encode_chat(msgs), 12), u
        m = s.metrics()
        shared = len(session.tokenizer.encode_chat([{"role": "system", "content": system}])) // session.page_size * session.page_size
        assert shared >= 3 * session.page_size
        assert m["kiln_prefix_cache_hit_tokens_total"] >= (len(users) - 1) * (shared - session.page_size)
        assert 0 < m["kiln_prefix_cache_hit_tokens_total"] < m["kiln_prefix_cache_lookup_tokens_total"]
        assert 1 <= m["kiln_prefix_cache_entries"] <= 2
        with ThreadPoolExecutor(4) as pool:  # page pressure: 4 long requests on 14 pages
            texts = list(pool.map(lambda u: s.client.completions.create(model="tiny", prompt=system + u, max_tokens=40, temperature=0,
                                                                         extra_body={"ignore_eos": True}).choices[0].text, users[:4]))
        for u, text in zip(users, texts):
            assert text == generate(session.encode_prompt(system + u), 40, ignore_eos=True), u
        m = s.metrics()
        assert m["kiln_sequences_open"] == 0 and m["kiln_running"] == 0
    finally:
        assert s.stop() == 0


def test_logprobs_are_the_model_s(server, reference):
    """Completions with logprobs=3 and chat with top_logprobs=2 (streamed and not): each
    token's log-probability and the alternatives equal log_softmax of the runtime's
    own logits for that position; the best alternative is the greedy pick."""
    session, _ = reference
    ids = session.encode_prompt("the kiln fires")
    r = server.client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=3,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    generated = session.generate(ids, max_new_tokens=6, ignore_eos=True).tokens
    rows = session.logits(ids + generated[:-1])[len(ids) - 1:]  # row i predicts generated[i]
    for i, (t, row) in enumerate(zip(generated, rows)):
        x = row.astype(np.float64)
        ref = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert abs(lp.token_logprobs[i] - ref[t]) < 1e-4
        best = np.argsort(-ref, kind="stable")[:3]
        assert list(lp.top_logprobs[i].values()) == pytest.approx([ref[b] for b in best], abs=1e-4)
        assert list(lp.top_logprobs[i])[0] == session.tokenizer.decode([t]) == lp.tokens[i]
    assert lp.text_offset == list(np.cumsum([0] + [len(x) for x in lp.tokens[:-1]]))
    msgs = [{"role": "user", "content": "hi there"}]
    full = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and e.logprob == e.top_logprobs[0].logprob for e in content)
    assert "".join(e.token for e in content) == full.choices[0].message.content
    streamed = [c for c in server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                                                   top_logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
    got = [e for c in streamed for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in got] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == full.choices[0].message.content


def _engine_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_the_engine_runs_in_its_own_process(server):
    """HTTP and the model do not share a GIL: the server process never loads TVM,
    its one child (the engine) does."""
    engine = _engine_pid(server.proc.pid)
    assert "libtvm" not in Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtvm" in Path(f"/proc/{engine}/maps").read_text()


def test_a_dead_engine_fails_open_requests_and_stops_the_server(artifact):
    """The engine process dies with a request open (stopped first, so the request is
    surely waiting on it): the client gets a 503 naming the cause, and the server exits
    1 (not 0: it served nothing after that)."""
    s = Server(artifact, "--model-name", "tiny")
    try:
        engine = _engine_pid(s.proc.pid)
        __import__("os").kill(engine, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(s.post, "/v1/completions", {"model": "tiny", "prompt": "die", "max_tokens": 8})
            time.sleep(0.5)
            assert not pending.done()
            __import__("os").kill(engine, signal.SIGKILL)
            status, body, _ = pending.result(timeout=30)
        assert status == 503 and "the engine process exited with code -9" in body["error"]["message"], body
        assert s.proc.wait(timeout=30) == 1
        assert "the engine process exited with code -9" in s.proc.stderr.read()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
