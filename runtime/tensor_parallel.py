"""Tensor-parallel sessions: an artifact split over N GPUs (`kiln compile
--tensor-parallel N`) runs as N workers of TVM's disco runtime, one per shard.

Each worker holds a whole kiln `Session` over its shard (its weights file, its
slice of every head and FFN column, its KV heads, GPU `rank`); the compiled
graph's collectives (kiln.ccl.allreduce / allgather: compiler/ccl/kiln_ccl.cc,
NCCL on CUDA, shared memory on CPU) keep the shards in step. The controller
sends each step to every worker as one small message (the method name and its
JSON arguments) and reads the result from worker 0, which disco runs as a
thread of this process: logits come back without a copy between processes.

So `TensorParallelSession` is a `Session` whose primitives (sequences, prefill,
decode) are broadcast; generate, stream, logits, the bench and the server's
engine run on top of them unchanged. Arguments are checked by every worker the
same way (same state, same checks), so a bad request fails on all shards
before any collective, and worker 0's error is raised here.

Worker processes run runtime/tp_worker.py (`python -m kiln.runtime.tp_worker`,
started by disco): TVM runtime only, like the rest of the runtime.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, KilnError, RequestError
from ..tvm_compat import disco, runtime
from .artifact import Artifact, open_artifact
from .session import Session

ENTRYPOINT = "kiln.runtime.tp_worker"  # what disco runs in each worker process
SHM_SLOT_BYTES = 8 << 20  # CPU collectives go through slots of this size, chunk by chunk
COLLECTIVE_TIMEOUT_S = float(os.environ.get("KILN_CCL_TIMEOUT", "120"))  # CPU: a rank waiting longer at a collective reports the others as dead

# this process's shard: worker 0 lives in the controller's process (a disco thread)
_WORKER: dict = {"session": None, "result": None}


def register_worker_functions() -> None:
    """kiln.tp.* in this process: what the controller calls on each worker."""
    rt = runtime()

    def ok(value=None):
        _WORKER["result"] = ("ok", value)

    def open_shard(path: str, device: str, opts_json: str, ccl_json: str) -> None:
        try:
            rank = int(rt.get_global_func("runtime.disco.worker_rank")())
            ccl = json.loads(ccl_json)
            art = open_artifact(path, device=device, verify_hashes=False)  # the controller checked every hash
            # the plugin first: the VM looks up the graph's kiln.ccl.* functions when it loads
            ctypes.CDLL(str(art.file(art.manifest["tensor_parallel"]["ccl_library"])), mode=ctypes.RTLD_GLOBAL)
            session = Session(art, device=device, shard=rank, **json.loads(opts_json))
            rt.get_global_func("kiln.ccl.init")(ccl["backend"], rank, ccl["world"], rank if device == "cuda" else 0,
                                                ccl["key"], ccl.get("lib", ""), SHM_SLOT_BYTES, COLLECTIVE_TIMEOUT_S)
            # one collective now, outside any CUDA-graph capture: NCCL sets up its connections
            # here, and a broken link fails the load instead of the first request
            x = rt.runtime.empty((1024,), "float32", session.tvm_device)
            rt.get_global_func("kiln.ccl.allreduce")(x, rt.runtime.empty((1024,), "float32", session.tvm_device))
            session.tvm_device.sync()
            _WORKER["session"] = session
            ok(rank)
        except BaseException as err:  # noqa: BLE001  (an exception escaping worker 0's thread aborts the process)
            _failed(err)

    def call(method: str, args_json: str) -> None:
        try:
            args, kwargs = json.loads(args_json)
            ok(getattr(_WORKER["session"], method)(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001
            _failed(err)

    def close() -> None:
        try:
            shutdown = rt.get_global_func("kiln.ccl.shutdown")
            if shutdown is not None:
                shutdown(False)
            _WORKER["session"] = None
            ok()
        except BaseException as err:  # noqa: BLE001
            _WORKER["result"] = ("error", err)

    def time_allreduce(nbytes: int, iters: int) -> None:
        try:
            w = _WORKER["session"]
            dev, dt = w.tvm_device, "bfloat16" if w.device == "cuda" else "float32"  # CPU's collectives add fp32
            n = max(nbytes // (2 if dt == "bfloat16" else 4), 1)
            x, y = rt.runtime.empty((n,), dt, dev), rt.runtime.empty((n,), dt, dev)
            reduce = rt.get_global_func("kiln.ccl.allreduce")
            for _ in range(10):
                reduce(x, y)
            dev.sync()
            t = time.perf_counter()
            for _ in range(iters):
                reduce(x, y)
            dev.sync()
            ok((time.perf_counter() - t) / iters * 1e6)
        except BaseException as err:  # noqa: BLE001
            _failed(err)

    for name, fn in (("kiln.tp.open", open_shard), ("kiln.tp.call", call), ("kiln.tp.close", close),
                     ("kiln.tp.time_allreduce", time_allreduce)):
        rt.ffi.register_global_func(name, fn, override=True)


def _failed(err: BaseException) -> None:
    """Keep the error for the controller (worker 0); other workers also say it on stderr,
    where it is the only trace of a failure that worker 0 did not share."""
    _WORKER["result"] = ("error", err)
    rt = runtime()
    rank = int(rt.get_global_func("runtime.disco.worker_rank")())
    if rank != 0 and not isinstance(err, RequestError):
        print(f"kiln tensor-parallel worker {rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def _nccl_library() -> str:
    """libnccl for the workers: $KILN_NCCL_LIBRARY, else NVIDIA's wheel (nvidia-nccl-cu13/-cu12,
    as torch installs it) on this Python's path, else the loader's search path."""
    env = os.environ.get("KILN_NCCL_LIBRARY")
    if env:
        return env
    import site  # noqa: PLC0415

    for base in [*sys.path, *site.getsitepackages()]:  # (a bundle's launcher puts only its own site/ on sys.path)
        p = Path(base or ".") / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
        if p.is_file():
            return str(p)
    return "libnccl.so.2"


_POOLS: list = []  # the worker processes of the session being created (its pool function fills it)


def _create_process_pool(num_workers: int, num_groups: int, entrypoint: str):
    """disco's process pool (workers 1..N-1), kiln's way: like TVM's own, but it keeps the
    Popen objects, so the controller can see a worker die, and holds each worker's end of
    the command pipe open, so disco's teardown (which writes a shutdown to every worker)
    never meets a closed pipe (a write error there aborts the process)."""
    import subprocess  # noqa: PLC0415

    procs: dict[int, subprocess.Popen] = {}
    held: list[int] = []
    _POOLS.append(procs)

    def result(worker_id: int):
        if worker_id == 0:  # disco is shutting the session down: reap the workers
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for fd in held:
                os.close(fd)
            held.clear()
            return None
        main_read, worker_write = os.pipe()
        worker_read, main_write = os.pipe()
        cmd = [sys.executable, "-m", entrypoint, str(worker_id), str(num_workers), str(num_groups), str(worker_read), str(worker_write)]
        procs[worker_id] = subprocess.Popen(cmd, pass_fds=(worker_read, worker_write))
        os.close(worker_write)
        held.append(worker_read)
        return runtime().ffi.Shape([main_read, main_write])

    return result


def _start_workers(d, n: int):
    """A disco process session of n workers through _create_process_pool; returns it and {rank: Popen}."""
    runtime().ffi.register_global_func("kiln.tp.create_process_pool", _create_process_pool, override=True)

    class KilnProcessSession(d.ProcessSession):
        def __init__(self):  # (ProcessSession's own __init__ names TVM's pool)
            self.__init_handle_by_constructor__(d.api.SessionProcess, n, 1, "kiln.tp.create_process_pool", ENTRYPOINT)

    _POOLS.clear()
    sess = KilnProcessSession()
    procs = _POOLS.pop() if _POOLS else {}
    return sess, procs


class TensorParallelSession(Session):
    """A Session over a tensor-parallel artifact: `load()` returns one for such an
    artifact. Same API as Session; `params` is None (the weights live in the workers)."""

    def __init__(self, artifact: Artifact, device: str = "cpu", **opts):
        # no Session.__init__: the model lives in the workers, this process keeps the handle
        t0 = time.perf_counter()
        self.artifact = artifact
        self.device = device
        tp = artifact.manifest["tensor_parallel"]
        self.shards = int(tp["size"])
        if device == "cuda" and opts.get("random_weights") is False and tp.get("weights_files") is None:
            raise ArtifactError(f"{artifact.path}: compiled with --no-weights; it runs only with random weights (kiln bench --random-weights)")
        rt = runtime()
        d = disco()
        register_worker_functions()
        ctypes.CDLL(str(artifact.file(tp["ccl_library"])), mode=ctypes.RTLD_GLOBAL)  # worker 0's rank is in this process
        shm = None
        if device == "cuda":
            # connections at init, not lazily inside the first CUDA-graph capture (a capture may not allocate)
            os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
            lib = _nccl_library()
            try:
                key = str(rt.get_global_func("kiln.ccl.nccl_unique_id")(lib))
            except Exception as err:  # noqa: BLE001  (TVM error types vary)
                raise ArtifactError(f"{artifact.path}: a tensor-parallel CUDA artifact needs NCCL: {str(err).strip().splitlines()[-1]} "
                                    f"(pip install nvidia-nccl-cu13, or set KILN_NCCL_LIBRARY to libnccl.so.2)") from None
            ccl = {"backend": "nccl", "world": self.shards, "key": key, "lib": lib}
        else:
            fd, shm = tempfile.mkstemp(prefix="kiln-ccl-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, 64 + self.shards * SHM_SLOT_BYTES)
            os.close(fd)
            ccl = {"backend": "shm", "world": self.shards, "key": shm}
        _worker_path()
        self._disco, self._procs = _start_workers(d, self.shards)
        self._closed = False
        self._dead: str | None = None  # set by the watchdog when a worker process exits
        # (a weak reference: a session dropped without close() is still collected, and disco's
        # destructor then stops its workers)
        watchdog = threading.Thread(target=_watch, args=(weakref.ref(self), self._procs), name="kiln-tp-watchdog", daemon=True)
        watchdog.start()
        try:
            self._broadcast("kiln.tp.open", str(artifact.path), device, json.dumps(opts), json.dumps(ccl))
        except BaseException:
            self.close()
            raise
        finally:
            if shm is not None:
                os.unlink(shm)  # every rank mapped it (or failed): nothing is left in /dev/shm
        w = _WORKER["session"]
        self._w0 = w
        for name in ("config", "vocab_size", "max_seq_len", "max_sequences", "prefill_chunk", "page_size", "tokenizer", "eos_ids",
                     "tvm_device", "target"):
            setattr(self, name, getattr(w, name))
        self.params = None
        self.load_seconds = time.perf_counter() - t0

    # --- the broadcast -----------------------------------------------------------
    def _broadcast(self, func: str, *args):
        """Call func(*args) on every worker; return worker 0's result or raise its error."""
        if self._closed:
            raise RequestError("this tensor-parallel session is closed")
        if self._dead:
            raise KilnError(self._dead)
        _WORKER["result"] = None
        self._disco.get_global_func(func)(*args)
        self._disco._sync_worker(0)
        res = _WORKER["result"]
        if self._dead:  # worker 0 was released from a collective by the watchdog's abort
            raise KilnError(self._dead)
        if res is None:
            raise KilnError(f"tensor-parallel worker 0 returned nothing from {func}")
        kind, value = res
        _WORKER["result"] = None
        if kind == "error":
            raise value
        return value

    def _call(self, method: str, *args, **kwargs):
        return self._broadcast("kiln.tp.call", method, json.dumps([list(args), kwargs], default=_plain))

    def close(self) -> None:
        """Stop the workers and free their GPUs (dropping the session does it too)."""
        if not self._closed:
            try:
                if not self._dead:
                    self._broadcast("kiln.tp.close")
            except Exception:  # noqa: BLE001,S110  (closing must not fail)
                pass
            self._closed = True
            # disco's destructor shuts the workers down and reaps them (an explicit shutdown
            # first would make it write to their closed pipes and abort)
            self._disco = None

    # --- the Session primitives, on every shard ------------------------------------
    def add_sequence(self) -> int:
        return self._call("add_sequence")

    def fork_sequence(self, parent: int, length: int) -> int:
        return self._call("fork_sequence", parent, length)

    def remove_sequence(self, seq: int) -> None:
        return self._call("remove_sequence", seq)

    def prefill(self, seq: int, tokens, *, all_logits: bool = False) -> np.ndarray:
        return self._call("prefill", seq, tokens, all_logits=all_logits)

    def prefill_many(self, seqs, token_lists) -> np.ndarray:
        return self._call("prefill_many", seqs, token_lists)

    def decode_step(self, seqs, tokens) -> np.ndarray:
        return self._call("decode_step", seqs, tokens)

    def decode_greedy(self, seqs, tokens) -> list[int]:
        return self._call("decode_greedy", seqs, tokens)

    def decode_greedy_async(self, seqs, tokens):
        """decode_greedy now (the workers' call returns once every shard has stepped); the server's
        engine reads the returned function later, as from a single-GPU Session."""
        out = self.decode_greedy(seqs, tokens)
        return lambda: out

    def advance(self, seq: int, n: int) -> None:
        return self._call("advance", seq, n)

    def sync(self) -> None:
        return self._call("sync")

    def allreduce_latency(self, nbytes: int, iters: int = 200) -> float:
        """Microseconds per kiln.ccl.allreduce of `nbytes` (bf16 on CUDA, fp32 on CPU) on every shard (eager,
        outside CUDA graphs; rank 0's clock): what each row-parallel projection pays."""
        return self._broadcast("kiln.tp.time_allreduce", int(nbytes), int(iters))

    def set_instrument(self, fn) -> None:
        raise RequestError("per-kernel instrumentation runs on unsplit artifacts only")

    # reads: worker 0's state (every shard holds the same sequences and pages)
    def sequence_length(self, seq: int) -> int:
        return self._w0.sequence_length(seq)

    @property
    def sequences(self) -> list[int]:
        return self._w0.sequences

    def kv_pages_free(self) -> int | None:
        return self._w0.kv_pages_free()

    @property
    def kv_pages_total(self) -> int | None:
        return self._w0.kv_pages_total


def _watch(session_ref, procs: dict) -> None:
    """Poll a session's worker processes; when one exits, abort this process's collectives
    (worker 0 then fails out of any it is waiting in, instead of hanging) and fail the session."""
    while True:
        session = session_ref()
        if session is None or session._closed:
            return
        for rank, proc in procs.items():
            rc = proc.poll()
            if rc is not None:
                session._dead = (f"tensor-parallel worker {rank} (pid {proc.pid}) exited with status {rc}: "
                                 f"this session cannot continue; load the artifact again")
                abort = runtime().get_global_func("kiln.ccl.abort")
                if abort is not None:
                    abort()
                return
        del session
        time.sleep(0.1)


def _worker_path() -> None:
    """Worker processes import kiln like this process did: where kiln is a plain folder on
    sys.path (a bundle's site/), put that folder on PYTHONPATH for them."""
    root = Path(__file__).resolve().parents[2]
    if (root / "kiln" / "__init__.py").is_file():
        have = os.environ.get("PYTHONPATH", "")
        if str(root) not in have.split(os.pathsep):
            os.environ["PYTHONPATH"] = str(root) + (os.pathsep + have if have else "")


def _plain(o):
    """JSON for numpy scalars and arrays in step arguments."""
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot send {type(o).__name__} to a tensor-parallel worker")
