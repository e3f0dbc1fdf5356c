"""The serving engine: one thread that owns a Session and runs every admitted
request a step at a time (iteration-level, "continuous" batching).

Each step of the loop:
  1. retire cancelled requests (their sequences and KV pages freed at once);
  2. admit waiting requests in arrival order (FCFS) while sequences are free;
  3. prefill: feed prompts in arrival order, at most `prefill_budget` tokens
     per step in all, so a long prompt is cut into chunks between decode
     steps and never stalls the running requests for its whole length; the
     step's chunks go to the model as one ragged batch (Session.prefill_many);
  4. decode: one token for every request past its prompt;
  5. deliver tokens and text to each request's `on_event` and retire the
     finished ones.
When every decoding request is greedy (the device picks the tokens), steps
overlap: step N is queued on the device, then step N-1's tokens are
delivered (text, stop strings, events: the engine's Python) while it runs,
and step N's tokens are read at the start of step N+1 as its inputs. A
request that a stop string ends is decoded one step too many; that token is
dropped. (H200, 8B, 128 streams: ~1 ms of Python per step no longer idles
the GPU.) A step with a sampling request reads its logits at once.
A new request waits at most one step to start; none waits behind a later
one. The decode of a step is one model call for all running requests where
the artifact has decode_batch (artifacts with TVM's paged cache), one call
per request otherwise; the prefill chunks are one call before it.

Thread safety: submit / cancel / stats may be called from any thread; the
Session is touched only by the engine thread. Events are delivered on the
engine thread: on_event must not block (the HTTP server hands them to its
event loop).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import KilnError, RequestError
from .prefix_cache import PrefixCache
from .quality import log_softmax
from .request import Generation
from .sampler import SamplingParams


MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)


def _internal_error(err: Exception) -> str:
    """A bug's report for the requests it hit (its traceback goes to stderr)."""
    import traceback  # noqa: PLC0415

    traceback.print_exception(err)
    return f"internal error: {type(err).__name__}: {err}"[:500]


class QueueFullError(RequestError):
    """Too many requests are waiting: try again later (HTTP 429)."""


class ShuttingDownError(RequestError):
    """The engine is stopping and takes no new requests (HTTP 503)."""


@dataclass
class Event:
    kind: str  # "token" | "done" | "error"
    token: int = -1
    text: str = ""
    finish: str | None = None  # done: "eos" | "stop" | "length" | "cancelled"
    error: str | None = None
    logprob: float | None = None  # token: its log-probability under the model (requests asking for logprobs)
    top: list[tuple[int, float]] | None = None  # token: the most likely ids and their log-probabilities, best first


@dataclass
class Request:
    id: int
    gen: Generation
    on_event: Callable[[Event], None]
    arrived: float = field(default_factory=time.perf_counter)
    seq: int | None = None
    feed: list[int] = field(default_factory=list)  # tokens to prefill: the prompt, or after a preemption all but the pending token
    fed: int = 0  # tokens of `feed` in the KV cache
    resume: bool = False  # feeding after a preemption: the next token is known, nothing is sampled
    next_token: int | None = None  # sampled and accepted, not yet in the KV cache
    logprobs: int | None = None  # alternatives to report per token (None: no logprobs)
    picked_logprobs: tuple | None = None  # (logprob, top) of next_token, for its event
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.gen.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.gen.tokens)


class Histogram:
    """Prometheus-style cumulative buckets (seconds)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if v <= b), len(self.bounds))] += 1
        self.sum += v
        self.n += 1


LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Engine:
    def __init__(self, session, *, max_queue: int = 256, prefill_budget: int | None = None, prefix_cache: int = 0):
        """prefix_cache: sequences kept for prefix caching (runtime/prefix_cache.py);
        they come out of session.max_sequences, the rest run requests."""
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or not 1 <= max_queue <= 1 << 16:
            raise RequestError(f"max_queue must be an integer in [1, 65536], got {max_queue!r}")
        if isinstance(prefix_cache, bool) or not isinstance(prefix_cache, int) or not 0 <= prefix_cache < session.max_sequences:
            raise RequestError(f"prefix_cache must be an integer in [0, {session.max_sequences - 1}] (sequences beside the batch), "
                               f"got {prefix_cache!r}")
        if prefix_cache and session.kv_pages_total is None:
            raise RequestError("prefix caching needs TVM's paged KV cache (this artifact has kiln's quantized cache)")
        if prefix_cache and session.window is not None:
            raise RequestError("prefix caching forks sequences, which models with sliding-window layers cannot do yet")
        self.session = session
        self.prefix = PrefixCache(session, prefix_cache) if prefix_cache else None
        self.max_batch = session.max_sequences - prefix_cache
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget or session.prefill_chunk
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._ids = itertools.count(1)
        self._stopping = False  # no new requests
        self._halt = False  # the loop ends once nothing is left
        self._thread: threading.Thread | None = None
        self._inflight: tuple[list[Request], Callable[[], list[int]]] | None = None  # a queued greedy step (engine thread)
        # called on the engine thread after every step (and before the thread ends): a consumer that
        # batches events (the engine process: one message per step) sends them here
        self.on_step: Callable[[], None] | None = None
        # metrics (read under the lock)
        # requests by outcome, tokens; the keys the engine thread bumps outside the lock exist from the
        # start, so stats() (under the lock, any thread) never sees the dict change size
        self.counters = collections.Counter(dict.fromkeys(("prompt_tokens", "completion_tokens", "preemptions", "prefix_hit_tokens"), 0))
        self.ttft = Histogram(LATENCY_BOUNDS)
        self.itl = Histogram(LATENCY_BOUNDS)
        self.kv_pages_total = session.kv_pages_total  # None: kiln's quantized cache (no shared pool)
        self.kv_pages_free = self.kv_pages_total

    # --- any thread ----------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt_tokens, on_event: Callable[[Event], None], *, max_new_tokens: int = 128,
               sampling: SamplingParams | None = None, stop=None, ignore_eos: bool = False, logprobs: int | None = None) -> Request:
        """Queue a request (checked now: RequestError for bad fields); events follow on the engine thread.
        logprobs: report each token's log-probability and this many alternatives (0-20)."""
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        gen = Generation(self.session, prompt_tokens, max_new_tokens, sampling, stop, ignore_eos)
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (the queue holds {self.max_queue}): try again later")
            req = Request(next(self._ids), gen, on_event, feed=gen.prompt, logprobs=logprobs)
            self._waiting.append(req)
            self.counters["requests"] += 1
            self._lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away): its sequence is freed on the next step."""
        with self._lock:
            req.cancelled = True
            self._lock.notify()

    def stop(self, grace: float = 0.0) -> None:
        """Take no new requests; let running ones finish for up to `grace` seconds,
        then cancel what is left and end the thread."""
        deadline = time.perf_counter() + grace
        with self._lock:
            self._stopping = True
            for r in self._waiting:
                r.cancelled = True
            self._lock.notify()
        while self._thread is not None and self._thread.is_alive() and time.perf_counter() < deadline:
            with self._lock:
                if not self._running and not self._waiting:
                    break
            time.sleep(0.01)
        with self._lock:
            for r in [*self._running, *self._waiting]:
                r.cancelled = True
            self._halt = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._waiting), "running": len(self._running), "max_batch": self.max_batch,
                    "sequences_open": sum(1 for r in self._running if r.seq is not None),
                    "kv_pages_total": self.kv_pages_total, "kv_pages_free": self.kv_pages_free,
                    "prefix_entries": len(self.prefix) if self.prefix is not None else 0,
                    "prefix_lookup_tokens": self.prefix.lookup_tokens if self.prefix is not None else 0, **self.counters}

    # --- engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._iteration():
                if self.on_step is not None:
                    self.on_step()
        finally:
            if self.on_step is not None:
                self.on_step()

    def _iteration(self) -> bool:
        """One step of the loop; False once the engine has halted and nothing is left."""
        with self._lock:
            while not self._halt and not self._waiting and not self._running:
                self._lock.wait()
            if self._halt and not self._running and not self._waiting:
                return False
            self._retire_cancelled()
            if not self._halt:
                try:
                    self._schedule()
                except Exception as err:  # noqa: BLE001  (fail the head it stopped at, not the engine)
                    if self._waiting:
                        self._finish(self._waiting.popleft(), Event("error", error=_internal_error(err)), "failed")
            self.kv_pages_free = self.session.kv_pages_free()
            if self._halt:
                self._retire_cancelled()
                if not self._running and not self._waiting:
                    return False
            running = list(self._running)
        try:
            self._step(running)
            self.kv_pages_free = self.session.kv_pages_free()
        except Exception as err:  # noqa: BLE001  (a bug must fail the requests it hit, not hang every client)
            message = _internal_error(err)
            for r in running:
                self._fail(r, RuntimeError(message))
        return True

    def _schedule(self) -> None:  # under the lock, on the engine thread
        """Admit waiting requests FCFS while sequences and KV pages allow; when the
        running ones' next step needs more pages than are free, evict cached
        prefixes, then preempt the youngest (free its pages now, recompute its
        tokens when it is readmitted). A request whose tokens start with a cached
        prefix is forked from it at admission and feeds only the rest.

        Pages: a request still feeding is owed the pages its whole feed needs (it
        got the promise at admission); a decoding one needs a page when its length
        is a multiple of the page size. A head request is admitted when its feed
        plus one page fits beside those; a later one never jumps it (no starvation).
        The pool holds at least one context, so the oldest request always fits."""
        s = self.session
        free = s.kv_pages_free()
        if free is None:  # kiln's quantized cache: every sequence reserves its context
            while self._waiting and len(self._running) < self.max_batch:
                self._running.append(self._waiting.popleft())
            return

        def held(r):
            return s.pages_for(s.sequence_length(r.seq)) if r.seq is not None else 0

        def wants(r):  # pages r's next step may take
            if r.fed < len(r.feed):
                return s.pages_for(len(r.feed)) - held(r)
            return 1 if r.seq is not None and s.sequence_length(r.seq) % s.page_size == 0 else 0

        def evict(keep: int | None = None) -> bool:  # a prefix-cache entry gives back the pages only it held
            nonlocal free
            if self.prefix is None or not self.prefix.evict(keep=keep):
                return False
            free = s.kv_pages_free()
            return True

        need = sum(wants(r) for r in self._running)
        if need > free and self._inflight is not None:  # a request may be requeued: accept its in-flight token first
            self._settle()
            free = s.kv_pages_free()
            need = sum(wants(r) for r in self._running)
        while need > free:  # cached prefixes go first, then the youngest requests
            if evict():
                continue
            if len(self._running) <= 1:
                break
            victim = self._running[-1]
            need -= wants(victim)
            self._preempt(victim)
            free = s.kv_pages_free()
        while self._waiting and len(self._running) < self.max_batch:
            head = self._waiting[0]
            # a cached prefix is shared, not taken: only the rest of the feed needs pages. The
            # fork happens once the head is admitted, so a refused head holds nothing.
            hit = self.prefix.lookup(head.feed) if self.prefix is not None else None
            want = s.pages_for(len(head.feed)) - (s.pages_for(hit[1]) if hit else 0)

            def fits() -> bool:  # with a page to grow into; alone, the pool (>= one context) always fits
                return need + want + 1 <= free or (not self._running and want <= free)

            while not fits() and evict(keep=hit[0] if hit else None):
                pass
            if not fits():
                break
            if hit is not None:
                head.seq, head.fed = s.fork_sequence(*hit), hit[1]
                self.prefix.count(len(head.feed), hit[1])
                self.counters["prefix_hit_tokens"] += hit[1]
            elif self.prefix is not None:
                self.prefix.count(len(head.feed), 0)
            need += want
            self._running.append(self._waiting.popleft())

    def _preempt(self, r: Request) -> None:  # under the lock
        """Give r's pages back and requeue it first: when readmitted it prefills its
        prompt and the tokens it has produced (all but the pending one), then goes on."""
        self._running.remove(r)
        if r.seq is not None:
            self.session.remove_sequence(r.seq)
            r.seq = None
        if r.next_token is not None:
            r.feed, r.resume = r.gen.history[:-1], True
        r.fed = 0
        self._waiting.appendleft(r)
        self.counters["preemptions"] += 1

    def _retire_cancelled(self) -> None:  # under the lock
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r, Event("done", finish="cancelled"), "cancelled")
        for r in [r for r in self._running if r.cancelled]:
            self._finish(r, Event("done", finish="cancelled"), "cancelled")

    def _step(self, running: list[Request]) -> None:
        s = self.session
        # the previous step's tokens (waiting for the device if it still runs): this step's inputs.
        # They are accepted -- text, stop strings, events -- after this step is launched.
        picked = self._collect()
        ending = {r.id for r in picked if r.gen.ends_with(r.next_token)}  # EOS or the limit: no further step
        budget = self.prefill_budget
        feeding, decoding = [], []  # (request, prompt tokens fed this step); requests past their prompt
        for r in running:
            try:
                if r.seq is None:
                    r.seq = s.add_sequence()
            except KilnError as err:
                self._fail(r, err)
                continue
            if r.fed < len(r.feed):
                if budget > 0:
                    n = min(budget, len(r.feed) - r.fed)
                    feeding.append((r, n))
                    budget -= n
            elif not r.done and r.id not in ending:
                decoding.append(r)
        if feeding:
            self._prefill(feeding)
        if decoding and all(r.gen.greedy and r.logprobs is None for r in decoding):
            self._launch(decoding)
        elif decoding:  # samplers read the history: accept the picked tokens first (a stop string may end one)
            self._accept(picked)
            picked = []
            decoding = [r for r in decoding if not r.done]
            if decoding:
                self._decode(decoding)
        self._accept(picked)

    def _launch(self, reqs: list[Request]) -> None:
        """Queue one greedy decode step for reqs on the device (the device picks the tokens);
        _collect reads them on the next step, after this one's host work overlapped it."""
        try:
            self._inflight = (reqs, self.session.decode_greedy_async([r.seq for r in reqs], [r.next_token for r in reqs]))
        except KilnError as err:
            for r in reqs:
                self._fail(r, err)

    def _collect(self) -> list[Request]:
        """The in-flight step's requests still running, each with its picked token as next_token (not accepted yet)."""
        if self._inflight is None:
            return []
        reqs, result = self._inflight
        self._inflight = None
        try:
            picked = result()
        except KilnError as err:
            for r in reqs:
                self._fail(r, err)
            return []
        for r, tok in zip(reqs, picked):
            r.next_token = tok
        return [r for r in reqs if not r.done]

    def _accept(self, picked: list[Request]) -> None:
        for r in picked:
            if not r.done:  # (cancelled or failed since it was collected)
                self._deliver(r)

    def _settle(self) -> None:  # under the lock
        """Read and accept the in-flight step now (before a preemption requeues a request)."""
        self._accept(self._collect())

    def _prefill(self, feeding: list[tuple[Request, int]]) -> None:
        """The step's prompt chunks in one prefill call (a ragged batch); if that
        call refuses them, one call each, so a bad request fails alone."""
        s = self.session
        chunks = [r.feed[r.fed : r.fed + n] for r, n in feeding]
        try:
            rows = s.prefill_many([r.seq for r, _ in feeding], chunks)
        except KilnError:
            rows = None
        for i, (r, n) in enumerate(feeding):
            try:
                logits = rows[i] if rows is not None else s.prefill(r.seq, chunks[i])
                r.fed += n
                self.counters["prompt_tokens"] += n
                if r.fed == len(r.feed):
                    if r.resume:  # recomputed after a preemption: its next token is already known
                        r.resume = False
                    else:
                        r.next_token = r.gen.sample(logits)  # (NaN/Inf logits raise here: nothing is cached then)
                        if self.prefix is not None:
                            try:
                                with self._lock:
                                    self.prefix.donate(r.seq, r.gen.prompt)
                            except KilnError:  # (no slot or page for an entry: the request goes on without one)
                                pass
                        self._note_logprobs(r, logits)
                        self._deliver(r)
            except KilnError as err:
                self._fail(r, err)

    def _decode(self, reqs: list[Request]) -> None:
        """One decode call for every request past its prompt when some request samples
        or wants logprobs: the logits rows come back for the samplers (a greedy request's
        sampler takes the argmax of the same row). All-greedy steps go through _launch."""
        s = self.session
        try:
            rows = s.decode_step([r.seq for r in reqs], [r.next_token for r in reqs]).reshape(len(reqs), -1)
        except KilnError as err:
            for r in reqs:
                self._fail(r, err)
            return
        for i, r in enumerate(reqs):
            try:
                r.next_token = r.gen.sample(rows[i])
            except KilnError as err:
                self._fail(r, err)
                continue
            self._note_logprobs(r, rows[i])
            self._deliver(r)

    def _note_logprobs(self, r: Request, logits: np.ndarray) -> None:
        """The picked token's log-probability under the model's distribution (the
        logits as computed, before temperature / top-p) and the `r.logprobs` best."""
        if r.logprobs is None:
            return
        lp = log_softmax(logits)
        top = []
        n = min(r.logprobs, len(lp))
        if n:
            best = np.argpartition(-lp, n - 1)[:n]
            best = best[np.lexsort((best, -lp[best]))]  # by logit, ties to the lower id
            top = [(int(t), float(lp[t])) for t in best]
        r.picked_logprobs = (float(lp[r.next_token]), top)

    def _deliver(self, r: Request) -> None:
        """Accept r.next_token into r's generation; emit its text; retire r when done."""
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self.ttft.observe(now - r.arrived)
        else:
            self.itl.observe(now - r.last_token_at)
        r.last_token_at = now
        text = r.gen.accept(r.next_token)
        if text is not None:
            self.counters["completion_tokens"] += 1
            lp, top = r.picked_logprobs or (None, None)
            self._emit(r, Event("token", token=r.next_token, text=text, logprob=lp, top=top))
        if r.gen.done:
            tail = r.gen.tail()
            if tail:
                self._emit(r, Event("token", token=-1, text=tail))
            with self._lock:
                self._finish(r, Event("done", finish=r.gen.finish), "completed")

    def _fail(self, r: Request, err: Exception) -> None:
        with self._lock:
            self._finish(r, Event("error", error=str(err)), "failed")

    def _finish(self, r: Request, ev: Event, outcome: str) -> None:  # under the lock
        if r.done:
            return
        r.done = True
        if r in self._running:
            self._running.remove(r)
        if r.seq is not None:
            self.session.remove_sequence(r.seq)
            r.seq = None
        self.counters[f"requests_{outcome}"] += 1
        self._emit(r, ev)

    def _emit(self, r: Request, ev: Event) -> None:
        try:
            r.on_event(ev)
        except Exception:  # noqa: BLE001  (a consumer's failure must not stop the engine)
            r.cancelled = True
