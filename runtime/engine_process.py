"""The serving engine in a process of its own, and the HTTP side's handle on it.

Why a process: the engine thread runs the model with the GIL released, then needs it
back for its Python between model calls (scheduling, sampling, detokenizing 128
streams), while the HTTP event loop holds it writing one SSE chunk per stream and
token. In one process the two took turns: at 128 streams on the H200 the engine's
step was 9.9-10.5 ms alone and 13.3-13.8 ms behind the server. vLLM splits its API
server from its engine core for the same reason. Here the server process (HTTP,
tokenizer for prompts, chat templates) and the engine process (TVM, the Session, the
Engine thread) each have their own GIL.

Wire: one socketpair, multiprocessing.connection framing, pickled tuples (both ends
are this module, started by the server itself: nothing untrusted crosses it).
  server -> engine: ("submit", rid, prompt_ids, kwargs) | ("cancel", rid) |
                    ("stats", token) | ("stop", grace)
  engine -> server: ("ready", info) | ("failed", kind, message)       (once, at start)
                    ("ack", rid, None | (kind, message))              (each submit)
                    ("events", [(rid, kind, token, text, finish, error, logprob, top, completion_tokens), ...])
                    ("stats", token, dict) | ("stopped",)
The engine sends a step's events as one message (Engine's on_step), so 128 streams cost
one write and one wakeup per step, not 128. A submit's events may arrive before its
ack (the engine can step in between): the server registers the request first.

The engine process dies with the server: it exits when its end of the socket closes (it ignores SIGINT
and SIGTERM, which a terminal or a service manager sends to the whole group: the server leads the stop).
If it dies first, every open request fails with an error event, /health turns 503 and
the server stops with exit code 1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from ..errors import ArtifactError, KilnError, RequestError
from .engine import Event, QueueFullError, ShuttingDownError

_ERRORS = {"queue_full": QueueFullError, "shutting_down": ShuttingDownError, "request": RequestError,
           "artifact": ArtifactError, "kiln": KilnError}


def _kind_of(err: KilnError) -> str:
    """The wire name of err's class (subclasses before their bases in _ERRORS)."""
    return next(kind for kind, cls in _ERRORS.items() if isinstance(err, cls))


class _Channel:
    """One end of the socketpair: pickled tuples in multiprocessing.connection frames; sends from
    several threads take turns."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self.conn.send_bytes(data)

    def recv(self) -> tuple:
        return pickle.loads(self.conn.recv_bytes())


@dataclass
class RemoteRequest:
    """The server's handle on a request in the engine process (what Engine.submit returns in-process)."""
    id: int
    prompt_tokens: int
    on_event: Callable[[Event], None]
    completion_tokens: int = 0


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP side needs of the model: limits and the tokenizer (no TVM in the server process)."""
    name: str
    max_seq_len: int
    vocab_size: int
    max_batch: int
    tokenizer: object | None  # runtime.tokenizer.Tokenizer

    @classmethod
    def open(cls, artifact: str, name: str, info: dict) -> ServedModel:
        """The artifact's tokenizer (its hash checked) and the limits the engine reported."""
        from .artifact import open_artifact, verify_file  # noqa: PLC0415
        from .tokenizer import Tokenizer  # noqa: PLC0415

        art = open_artifact(artifact, device=None, verify_hashes=False)
        tm = art.manifest.get("tokenizer")
        tokenizer = None
        if tm:
            verify_file(art.path, tm["file"], art.manifest["files"][tm["file"]])
            tokenizer = Tokenizer(art.file(tm["file"]), tm)
        return cls(name, info["max_seq_len"], info["vocab_size"], info["max_batch"], tokenizer)


class EngineProcess:
    """Starts the engine process (child_main, on a socketpair), waits until it has loaded the
    artifact, then stands in for the Engine: submit / cancel / stats / stop."""

    def __init__(self, artifact: str, load_options: dict, engine_options: dict, *, switch_interval: float = 0.005,
                 on_dead: Callable[[int], None] | None = None):
        """Raises the engine's load error (ArtifactError, RequestError, KilnError: one line) if it fails to start."""
        parent, child = socket.socketpair()
        env = dict(os.environ, KILN_ENGINE_SYS_PATH=json.dumps(sys.path))
        boot = ("import json, os, sys; sys.path[:0] = json.loads(os.environ.pop('KILN_ENGINE_SYS_PATH')); "
                "from kiln.runtime.engine_process import child_main; child_main(int(sys.argv[1]))")
        # the engine's stdout goes to the server's stderr: the server's first stdout line is its address
        self._proc = subprocess.Popen([sys.executable, "-c", boot, str(child.fileno())], pass_fds=(child.fileno(),),
                                      stdout=sys.stderr.fileno(), env=env)
        child.close()
        self._chan = _Channel(Connection(parent.detach()))
        self._lock = threading.Lock()
        self._requests: dict[int, RemoteRequest] = {}
        self._acks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._replies: dict[int, list] = {}  # stats token -> [threading.Event, reply]
        self._ids = itertools.count(1)
        self._on_dead = on_dead
        self.dead: str | None = None  # why the engine process is gone (None while it runs)
        self._stopping = False
        self._send((str(artifact), load_options, engine_options, switch_interval))
        msg = self._recv_start()
        if msg[0] == "failed":
            self._proc.wait(timeout=30)
            raise _ERRORS.get(msg[1], KilnError)(msg[2])
        self.info: dict = msg[1]
        self._reader = threading.Thread(target=self._read, name="kiln-engine-events", daemon=True)
        self._reader.start()

    def _recv_start(self) -> tuple:
        try:
            return self._chan.recv()
        except (EOFError, OSError):
            code = self._proc.wait(timeout=30)
            raise KilnError(f"the engine process exited while loading the model (exit code {code}; its error is above)") from None

    def _send(self, msg: tuple) -> None:
        self._chan.send(msg)

    # --- the Engine's interface ----------------------------------------------------------------------
    async def submit(self, prompt_tokens: list[int], on_event: Callable[[Event], None], **kwargs) -> RemoteRequest:
        """Queue a request; raises what Engine.submit raises (QueueFullError, ShuttingDownError,
        RequestError) once the engine has taken or refused it."""
        if self.dead is not None or self._stopping:
            raise ShuttingDownError("the server is shutting down" if self.dead is None else f"the engine is gone: {self.dead}")
        loop = asyncio.get_running_loop()
        req = RemoteRequest(next(self._ids), len(prompt_tokens), on_event)
        ack = loop.create_future()
        with self._lock:
            self._requests[req.id] = req
            self._acks[req.id] = (loop, ack)
        try:
            self._send(("submit", req.id, prompt_tokens, kwargs))
        except OSError:
            self._forget(req.id)
            raise ShuttingDownError("the engine process is gone") from None
        refused = await ack
        if refused is not None:
            self._forget(req.id)
            raise _ERRORS.get(refused[0], RequestError)(refused[1])
        return req

    def cancel(self, req: RemoteRequest) -> None:
        try:
            self._send(("cancel", req.id))
        except OSError:
            pass

    def stats(self, timeout: float = 10.0) -> dict:
        """The engine's stats() plus its histograms and thread count (blocks for the reply)."""
        if self.dead is not None:
            raise KilnError(f"the engine is gone: {self.dead}")
        token = next(self._ids)
        slot = [threading.Event(), None]
        with self._lock:
            self._replies[token] = slot
        try:
            self._send(("stats", token))
            if not slot[0].wait(timeout):
                raise KilnError("the engine did not answer within 10 s")
        finally:
            with self._lock:
                self._replies.pop(token, None)
        if slot[1] is None:
            raise KilnError(f"the engine is gone: {self.dead}")
        return slot[1]

    def stop(self, grace: float = 0.0) -> None:
        """Take no new requests; the engine lets running ones finish for `grace` seconds,
        cancels the rest (their done events still come) and exits."""
        self._stopping = True
        try:
            self._send(("stop", float(grace)))
        except OSError:
            pass
        try:
            self._proc.wait(timeout=grace + 60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=10)
        self._chan.conn.close()

    # --- the reader thread ---------------------------------------------------------------------------
    def _forget(self, rid: int) -> None:
        with self._lock:
            self._requests.pop(rid, None)
            self._acks.pop(rid, None)

    def _read(self) -> None:
        try:
            while True:
                msg = self._chan.recv()
                if msg[0] == "events":
                    self._dispatch(msg[1])
                elif msg[0] == "ack":
                    with self._lock:
                        loop, fut = self._acks.pop(msg[1], (None, None))
                    if fut is not None:
                        loop.call_soon_threadsafe(_resolve, fut, msg[2])
                elif msg[0] == "stats":
                    with self._lock:
                        slot = self._replies.get(msg[1])
                    if slot is not None:
                        slot[1] = msg[2]
                        slot[0].set()
                elif msg[0] == "stopped":
                    return
        except (EOFError, OSError):
            pass
        code = self._proc.wait()
        if self._stopping and code == 0:
            return
        self.dead = f"the engine process exited with code {code}"
        with self._lock:
            requests, acks, replies = list(self._requests.values()), list(self._acks.values()), list(self._replies.values())
            self._requests.clear()
            self._acks.clear()
        for loop, fut in acks:
            loop.call_soon_threadsafe(_resolve, fut, ("shutting_down", f"the engine is gone: {self.dead}"))
        for req in requests:
            _emit(req, Event("error", error=self.dead))
        for slot in replies:
            slot[0].set()
        if self._on_dead is not None:
            self._on_dead(code)

    def _dispatch(self, events: list[tuple]) -> None:
        for rid, kind, token, text, finish, error, logprob, top, ntok in events:
            with self._lock:
                req = self._requests.get(rid) if kind == "token" else self._requests.pop(rid, None)
            if req is None:
                continue
            if kind != "token":
                req.completion_tokens = ntok
            _emit(req, Event(kind, token=token, text=text, finish=finish, error=error, logprob=logprob, top=top))


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _emit(req: RemoteRequest, ev: Event) -> None:
    try:
        req.on_event(ev)
    except Exception:  # noqa: BLE001  (a consumer's failure must not stop the reader)
        pass


# --- the engine process --------------------------------------------------------------------------------
def child_main(fd: int) -> None:
    """The engine process: load the artifact, run the Engine, serve the socket `fd`."""
    # Ctrl-C, and the SIGTERM of a service manager (systemd signals the whole group), reach both processes: the
    # server leads the stop (it lets running requests finish, then tells the engine); the engine also ends when
    # its socket closes, so it never outlives the server
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    chan = _Channel(Connection(fd))
    send = chan.send
    try:
        artifact, load_options, engine_options, switch_interval = chan.recv()
        engine, info = _start_engine(artifact, load_options, engine_options)
    except Exception as err:  # noqa: BLE001  (the server reports it in one line)
        if not isinstance(err, KilnError):
            import traceback  # noqa: PLC0415

            traceback.print_exception(err)
        send(("failed", _kind_of(err) if isinstance(err, KilnError) else "kiln", str(err) if isinstance(err, KilnError) else
              f"the engine failed to start: {type(err).__name__}: {err}"))
        return
    sys.setswitchinterval(switch_interval)
    requests: dict[int, object] = {}
    outbox: list[tuple] = []
    out_lock = threading.Lock()

    def flush() -> None:  # engine thread, after each step: the step's events in one message
        with out_lock:
            if not outbox:
                return
            batch = outbox[:]
            outbox.clear()
        try:
            send(("events", batch))
        except OSError:
            pass

    def make_on_event(rid: int, holder: list):
        def on_event(ev: Event) -> None:  # engine thread
            ntok = 0
            if ev.kind != "token":
                ntok = holder[0].completion_tokens if holder else 0
            with out_lock:
                if ev.kind != "token":
                    requests.pop(rid, None)
                outbox.append((rid, ev.kind, ev.token, ev.text, ev.finish, ev.error, ev.logprob, ev.top, ntok))

        return on_event

    engine.on_step = flush
    engine.start()
    send(("ready", info))
    try:
        while True:
            try:
                msg = chan.recv()
            except (EOFError, OSError):  # the server is gone: stop now
                engine.stop(0.0)
                return
            if msg[0] == "submit":
                _, rid, ids, kwargs = msg
                holder: list = []
                try:
                    req = engine.submit(ids, make_on_event(rid, holder), **kwargs)
                except KilnError as err:
                    send(("ack", rid, (_kind_of(err), str(err))))
                    continue
                holder.append(req)
                with out_lock:  # (a request can finish before this line: it is not kept then)
                    if not req.done:
                        requests[rid] = req
                send(("ack", rid, None))
            elif msg[0] == "cancel":
                req = requests.get(msg[1])
                if req is not None:
                    engine.cancel(req)
            elif msg[0] == "stats":
                st = engine.stats()
                st["ttft"] = (engine.ttft.bounds, list(engine.ttft.counts), engine.ttft.sum, engine.ttft.n)
                st["itl"] = (engine.itl.bounds, list(engine.itl.counts), engine.itl.sum, engine.itl.n)
                st["threads"] = threading.active_count()
                send(("stats", msg[1], st))
            elif msg[0] == "stop":
                engine.stop(msg[1])
                flush()
                send(("stopped",))
                return
    finally:
        chan.conn.close()


def _start_engine(artifact: str, load_options: dict, engine_options: dict):
    from .engine import Engine  # noqa: PLC0415
    from .loader import load  # noqa: PLC0415  (a split artifact loads as a TensorParallelSession)
    from .session import Session  # noqa: PLC0415

    s = load(artifact, **load_options)
    if not isinstance(s, Session):
        raise RequestError(f"{artifact}: a graph artifact (ONNX) has no text to serve: kiln serve takes language models")
    engine = Engine(s, **engine_options)
    info = {"max_seq_len": s.max_seq_len, "vocab_size": s.vocab_size, "max_batch": engine.max_batch}
    return engine, info
