"""A loaded model: paged KV cache, prefill, decode, generate, teacher-forced logits.

Uses the TVM runtime only (tvm.runtime + the Relax VM), never the compiler.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, RequestError
from ..tvm_compat import runtime
from .artifact import Artifact, open_artifact, read_weights
from .dtypes import numpy_dtype
from .kv_cache import PagedKVCache, QuantKVCache
from .sampler import NonFiniteLogitsError, Sampler, SamplingParams
from .tokenizer import StopMatcher, StreamDecoder, Tokenizer

MAX_NEW_TOKENS_LIMIT = 1 << 20
MAX_STOPS = 16
MAX_STOP_LEN = 256


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    prefill_seconds: float
    decode_seconds: float
    timings: dict = field(default_factory=dict)

    @property
    def prefill_tok_per_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        # the first generated token comes from prefill; decode produced the rest
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Session:
    """A model ready to run. Create with `kiln.runtime.load(path)`."""

    def __init__(self, artifact: Artifact, device: str = "cpu", max_seq_len: int | None = None, prefill_chunk: int | None = None,
                 random_weights: bool = False):
        t0 = time.perf_counter()
        rt = runtime()
        self.rt = rt
        self.artifact = artifact
        m = artifact.manifest
        self.config = m["model"]["config"]
        self.vocab_size = int(self.config["vocab_size"])
        kv = m["kv_cache"]
        limit = int(kv["max_seq_len"])
        self.max_seq_len = min(limit, 4096) if max_seq_len is None else max_seq_len
        if not 1 <= self.max_seq_len <= limit:
            raise RequestError(f"max_seq_len {self.max_seq_len} is outside [1, {limit}] for this artifact")
        # tokens per prefill call: attention across chunks runs TVM's slower paged
        # kernel, so CUDA (memory to spare, tensor-core attention within a chunk) takes 2048
        if prefill_chunk is None:
            prefill_chunk = 2048 if device == "cuda" else 1024
        self.prefill_chunk = max(1, min(prefill_chunk, self.max_seq_len))
        tgt = artifact.target_for(device)
        self.dev = rt.tvm.cpu(0) if device == "cpu" else cuda_device(rt, tgt, artifact.path)
        lib = rt.runtime.load_module(str(artifact.file(tgt["library"])))
        self.vm = rt.vm.VirtualMachine(lib, self.dev)
        if m.get("weights_file") is None:
            if not random_weights:
                raise ArtifactError(f"{artifact.path}: compiled with --no-weights; it runs only with random weights (kiln bench --random-weights)")
            weights = random_weights_for(m["params"])
        elif random_weights:
            raise RequestError("random_weights is for artifacts compiled with --no-weights")
        else:
            weights = read_weights(artifact)
        if device == "cpu":
            self.params = self._load_params(weights)
        else:
            self.params = [self._to_device(spec, raw) for spec, raw in weights]
        if kv.get("kind", "paged") == "kiln-quant":
            self.kv = QuantKVCache(rt, self.dev, kv, self.max_seq_len)
        else:
            self.kv = PagedKVCache(self.vm, rt, self.max_seq_len, int(kv["page_size"]), self.prefill_chunk)
        self._embed, self._prefill, self._decode = self.vm["embed"], self.vm["prefill"], self.vm["decode"]
        self._one_token = self._tensor(np.zeros(1, dtype=np.int32))
        self.tokenizer = None
        tm = m.get("tokenizer")
        if tm:
            self.tokenizer = Tokenizer(artifact.file(tm["file"]), tm)
        self.eos_ids = set(m.get("eos_token_ids") or [])
        if self.tokenizer is not None:
            for t in [tm.get("eos_token"), *tm.get("extra_eos_tokens", [])]:
                i = self.tokenizer.token_id(t)
                if i is not None:
                    self.eos_ids.add(i)
        self.load_seconds = time.perf_counter() - t0

    # --- low level ---------------------------------------------------------
    def _load_params(self, weights: list[tuple[dict, np.ndarray]]) -> list:
        """Copy all params into one arena backed by transparent huge pages.

        Decode streams every weight once per token; with 4 KiB pages that is
        one TLB miss per 4 KiB (135k per token for SmolLM2 fp32). Each param
        is a 64-byte-aligned view handed to TVM through DLPack (no copy)."""
        import mmap  # noqa: PLC0415

        offsets, total = [], 0
        for _spec, raw in weights:
            offsets.append(total)
            total += (raw.nbytes + 63) // 64 * 64
        arena = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            arena.madvise(mmap.MADV_HUGEPAGE)
        buf = np.frombuffer(arena, dtype=np.uint8)
        params = []
        for (spec, raw), off in zip(weights, offsets):
            view = buf[off : off + raw.nbytes]
            view[:] = raw
            if spec["dtype"] == "bfloat16":  # DLPack from numpy knows no bfloat16: share as uint16, view as bf16
                base = self.rt.runtime.from_dlpack(view.view(np.uint16).reshape(spec["shape"]))
                params.append(base._create_view(tuple(spec["shape"]), "bfloat16"))
            else:
                params.append(self.rt.runtime.from_dlpack(view.view(numpy_dtype(spec["dtype"])).reshape(spec["shape"])))
        self._arena = arena  # the views above keep it alive too; this documents ownership
        return params

    def _to_device(self, spec: dict, raw: np.ndarray):
        arr = self.rt.runtime.empty(tuple(spec["shape"]), spec["dtype"], self.dev)
        arr.copyfrom(np.asarray(raw).view(numpy_dtype(spec["dtype"])).reshape(spec["shape"]))
        return arr

    def _tensor(self, a: np.ndarray):
        return self.rt.runtime.tensor(a, self.dev)

    def _forward_prefill(self, ids: list[int], logit_pos: np.ndarray) -> np.ndarray:
        """Run `ids` through the model for sequence 0 (already in the cache); logits  # [n, vocab]."""
        self.kv.begin([0], [len(ids)])
        emb = self._embed(self._tensor(np.asarray(ids, dtype=np.int32)), self.params)
        emb = emb._create_view((1, len(ids), emb.shape[1]))
        out = self._prefill(emb, self._tensor(logit_pos.astype(np.int32)), *self.kv.args(), self.params)
        self.kv.end()
        return out[0].numpy()[0]

    def _prefill_chunks(self, ids: list[int], all_rows: bool) -> np.ndarray:
        """Prefill `ids` for sequence 0 one prefill chunk per call (the cache's
        workspace holds prefill_chunk tokens); logits of every position
        [T, vocab], or of the last position only [vocab]."""
        rows = []
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            rows.append(self._forward_prefill(chunk, np.arange(len(chunk)) if all_rows else np.array([len(chunk) - 1])))
        return np.concatenate(rows, axis=0) if all_rows else rows[-1][0]

    def _decode_step(self, ids):
        """One decode step on a device int32 [1] token; returns the device
        tensors (logits  # [1, 1, vocab] float32, greedy  # [2] int32 argmax, all-finite)."""
        self.kv.begin([0], [1])
        out = self._decode(ids, *self.kv.args(), self.params)
        self.kv.end()
        return out[0], out[1]

    def _forward_decode(self, token: int) -> np.ndarray:
        """Logits  # [vocab] float32 after feeding `token` (for the host sampler)."""
        self._one_token.copyfrom(np.asarray([token], dtype=np.int32))
        return self._decode_step(self._one_token)[0].numpy()[0, 0]

    def _greedy_decode(self, token: int) -> int:
        """The argmax after feeding `token`, picked on the device: 8 bytes come
        back instead of the logits row (0.5 MB for a 128k vocabulary)."""
        self._one_token.copyfrom(np.asarray([token], dtype=np.int32))
        best, finite = self._decode_step(self._one_token)[1].numpy()
        if not finite:
            raise NonFiniteLogitsError("the model produced NaN/Inf logits; refusing to sample")
        return int(best)

    def _check_tokens(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise RequestError(f"the prompt must be a list of token ids, got {type(ids).__name__} (encode text with encode_prompt)")
        if len(ids) == 0:
            raise RequestError("the prompt is empty: give at least one token")
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < self.vocab_size:
                raise RequestError(f"token id {t!r} is outside [0, {self.vocab_size})")
            out.append(int(t))
        return out

    # --- public ------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits at every position: float32 [T, vocab]; row i predicts token i+1."""
        with self._scratch_sequence(token_ids) as ids:
            return self._prefill_chunks(ids, all_rows=True)

    def decode_logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits like `logits`, but through the decode path that
        generation uses (a one-token prefill, then one decode step per token):
        float32 [T, vocab]. For checking the decode kernels (e.g. quantized GEMVs)."""
        with self._scratch_sequence(token_ids) as ids:
            rows = [self._prefill_chunks(ids[:1], all_rows=True)[0]]
            rows += [self._forward_decode(t) for t in ids[1:]]
            return np.stack(rows)

    @contextlib.contextmanager
    def _scratch_sequence(self, token_ids):
        """Checked ids of a teacher-forced pass, in sequence 0 of the cache for its duration."""
        ids = self._check_tokens(token_ids)
        if len(ids) > self.max_seq_len:
            raise RequestError(f"sequence has {len(ids)} tokens, over this session's context of {self.max_seq_len}")
        self.kv.add(0)
        try:
            yield ids
        finally:
            self.kv.remove(0)

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this artifact has no tokenizer: pass token ids (--tokens) instead of text")
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def stream(
        self,
        prompt_tokens,
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[tuple[int, str]]:
        """Yield (token id, new text) as tokens are generated. Text is "" without a
        tokenizer; a final (-1, text) may carry text held back at the end."""
        return self._run(prompt_tokens, max_new_tokens, sampling, stop, ignore_eos, info={})

    def generate(
        self,
        prompt_tokens,
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate from token ids (see `encode_prompt`); returns tokens, text and timings.

        Generation stops at EOS, a stop string, max_new_tokens, or the end of
        the context: max_new_tokens is cut to what the context has left after
        the prompt (finish_reason "length"). A prompt that fills the context
        is refused."""
        info: dict = {}
        tokens, texts = [], []
        for tok, text in self._run(prompt_tokens, max_new_tokens, sampling, stop, ignore_eos, info):
            if tok >= 0:  # -1 carries only the held-back tail text
                tokens.append(tok)
            if text:
                texts.append(text)
                if on_text:
                    on_text(text)
        return GenerationResult(info["prompt"], tokens, "".join(texts), info["finish"], info["prefill_s"], info["decode_s"])

    def _run(self, prompt_tokens, max_new_tokens, sampling, stop, ignore_eos, info: dict):
        """The generation loop; fills `info` (prompt, finish reason, timings) as it goes."""
        ids = self._check_tokens(prompt_tokens)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise RequestError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens!r}")
        if len(ids) >= self.max_seq_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the context holds {self.max_seq_len} (prompt + generated)")
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(ids))
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if len(stop) > MAX_STOPS or any(not isinstance(s, str) or len(s) > MAX_STOP_LEN for s in stop):
            raise RequestError(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_LEN} characters")
        sampler = Sampler(sampling or SamplingParams())
        detok = StreamDecoder(self.tokenizer) if self.tokenizer else None
        matcher = StopMatcher(stop)
        info.update(prompt=ids, finish="length", prefill_s=0.0, decode_s=0.0)
        history = list(ids)
        self.kv.add(0)
        try:
            t0 = time.perf_counter()
            tok = sampler(self._prefill_chunks(ids, all_rows=False), history)
            info["prefill_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(max_new_tokens):
                history.append(tok)
                if tok in self.eos_ids and not ignore_eos:
                    info["finish"] = "eos"
                    break
                text = matcher.feed(detok.push(tok)) if detok else ""
                yield tok, text
                if matcher.stopped:
                    info["finish"] = "stop"
                    break
                if i == max_new_tokens - 1:
                    break
                tok = self._greedy_decode(tok) if sampler.greedy else sampler(self._forward_decode(tok), history)
            info["decode_s"] = time.perf_counter() - t1
            if detok and not matcher.stopped:
                tail = matcher.feed(detok.flush()) + matcher.flush()
                if tail:
                    yield -1, tail
        finally:
            self.kv.remove(0)


def random_weights_for(params: list[dict]) -> list[tuple[dict, np.ndarray]]:
    """Random params of the spec's shapes/dtypes for speed runs: N(0, 0.02) matrices
    and biases, norm weights 1. One 16 MiB random block is tiled across every
    tensor, so filling an 8B-parameter model takes seconds, not minutes."""
    block = (np.random.default_rng(0).standard_normal(1 << 22) * 0.02).astype(np.float32)
    codes = np.random.default_rng(1).integers(0, 256, 1 << 22, dtype=np.uint8)
    out = []
    for spec in params:
        n = int(np.prod(spec["shape"]))
        dt = numpy_dtype(spec["dtype"])
        if len(spec["shape"]) == 1 and "norm" in spec["name"]:
            arr = np.ones(n, dtype=dt)
        elif dt.kind in "iu":  # quantized codes: random bytes
            arr = np.resize(codes, n * dt.itemsize).view(dt)
            if spec.get("quant") == "fp8":  # 0x7F / 0xFF are NaN in e4m3: never written by the compiler
                arr = np.where((arr & 0x7F) == 0x7F, arr - 1, arr).astype(dt)
        else:
            arr = np.resize(block.astype(dt), n)
        out.append((spec, arr.view(np.uint8)))
    return out


def cuda_device(rt, target: dict, path):
    """The first CUDA GPU, after loading TVM's CUDA plugin (runtime-only TVM does
    not load it by itself) and checking the artifact has code for its arch."""
    import ctypes  # noqa: PLC0415

    libdir = Path(rt.tvm.base._LOADED_LIBS["tvm_runtime"]._name).parent
    plugin = libdir / "libtvm_runtime_cuda.so"
    if rt.get_global_func("device_api.cuda") is None:
        try:
            ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            raise ArtifactError(f"cannot load TVM's CUDA runtime ({plugin}): {err}") from None
    dev = rt.tvm.cuda(0)
    if not dev.exist:
        raise ArtifactError(f"{path}: no CUDA GPU on this machine; run with --device cpu on an artifact compiled with --target llvm")
    here = "sm_" + str(dev.compute_version).replace(".", "")
    archs = target.get("archs") or [target.get("arch")]
    ptx = target.get("ptx")  # "compute_90": the driver can JIT it for this arch and newer
    if here not in archs and not (ptx and int(here[3:]) >= int(ptx.removeprefix("compute_"))):
        have = ", ".join(archs) + (f" + PTX {ptx}" if ptx else "")
        raise ArtifactError(f"{path}: has device code for {have}; this GPU is {here}: recompile with --target cuda:{here}")
    return dev


def load(path: str | Path, device: str = "cpu", max_seq_len: int | None = None, threads: int | None = None, verify: bool = True,
         random_weights: bool = False, prefill_chunk: int | None = None) -> Session:
    """Load an artifact (checks manifest, machine and hashes first) and return a Session.
    random_weights: only for artifacts compiled with --no-weights (speed runs)."""
    if threads is not None:
        if not 1 <= threads <= 1024:
            raise RequestError(f"threads must be in [1, 1024], got {threads}")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    art = open_artifact(path, device=device, verify_hashes=verify)
    return Session(art, device=device, max_seq_len=max_seq_len, random_weights=random_weights, prefill_chunk=prefill_chunk)
