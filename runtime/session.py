"""A loaded model: sequences in a paged KV cache, the prefill / decode step API,
and what is built on it (generate, stream, teacher-forced logits).

Uses the TVM runtime only (tvm.runtime + the Relax VM), never the compiler.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, RequestError
from ..tvm_compat import runtime
from . import manifest as mf
from .artifact import Artifact, open_artifact, read_weights
from .dtypes import numpy_dtype
from .kv_cache import PagedKVCache, QuantKVCache
from .request import Generation, check_tokens
from .sampler import NonFiniteLogitsError, SamplingParams
from .tokenizer import Tokenizer

MAX_SEQUENCES_LIMIT = mf.MAX_SEQUENCES


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
    """A model ready to run. Create with `kiln.runtime.load(path)`.

    The step API, which generate, `kiln bench`, the benchmarks and (next) the
    server are built from; sequences live in the session's paged KV cache:

        seq = s.add_sequence()
        last = s.prefill(seq, prompt_ids)            # float32 [vocab]: logits after the prompt
        ids = s.decode_greedy([seq], [next_id])      # [1] argmax ids, picked on the device
        rows = s.decode_step([seq], [next_id])       # float32 [1, vocab], for a host sampler
        s.remove_sequence(seq)

    Public attributes: artifact, config, vocab_size, max_seq_len (tokens per
    sequence), max_sequences (sequences open at once), prefill_chunk (tokens
    per prefill call), page_size (tokens per KV page), tokenizer (None without one), eos_ids, params (the
    weights as TVM tensors, in the manifest's order), device ("cpu" | "cuda"),
    tvm_device (the TVM Device), load_seconds.
    """

    def __init__(self, artifact: Artifact, device: str = "cpu", max_seq_len: int | None = None, prefill_chunk: int | None = None,
                 random_weights: bool = False, max_sequences: int = 1, kv_pages: int | None = None, kv_contexts: int | None = None,
                 shard: int = 0, cpu_target: str | None = None):
        """shard: which tensor-parallel shard this process runs (its weights file and, on
        CUDA, GPU `shard`); runtime/tensor_parallel.py starts one Session per shard.
        cpu_target: which CPU level of a multi-level artifact to run (its --target CPU name; default:
        the best this host supports)."""
        t0 = time.perf_counter()
        rt = runtime()
        self._rt = rt
        self.artifact = artifact
        self.device = device
        m = artifact.manifest
        self.config = m["model"]["config"]
        self.vocab_size = int(self.config["vocab_size"])
        kv = m["kv_cache"]
        limit = int(kv["max_seq_len"])
        self.max_seq_len = min(limit, 4096) if max_seq_len is None else max_seq_len
        if not 1 <= self.max_seq_len <= limit:
            raise RequestError(f"max_seq_len {self.max_seq_len} is outside [1, {limit}] for this artifact")
        if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or not 1 <= max_sequences <= MAX_SEQUENCES_LIMIT:
            raise RequestError(f"max_sequences must be an integer in [1, {MAX_SEQUENCES_LIMIT}], got {max_sequences!r}")
        self.max_sequences = max_sequences
        # tokens per prefill call (all sequences of a ragged call together): attention across chunks
        # runs TVM's slower paged kernel, so CUDA (memory to spare, tensor-core attention within a
        # chunk) takes 2048. Not capped by max_seq_len: the server's prompt chunks of many sequences
        # share a call (a 512-token context had cut a wave of 128 prompts into 512-token calls)
        if prefill_chunk is None:
            prefill_chunk = mf.PREFILL_CHUNK["cuda" if device == "cuda" else "cpu"]
        self.prefill_chunk = max(1, min(prefill_chunk, int(kv.get("max_prefill_chunk", prefill_chunk))))
        self.window = kv.get("window")  # sliding-window layers' window (their prefill calls hold < window tokens), or None
        tgt = artifact.target_for(device, cpu_target)
        self.target = tgt  # the manifest's entry for the library this session runs
        self.tvm_device = rt.tvm.cpu(0) if device == "cpu" else cuda_device(rt, tgt, artifact.path, index=shard)
        lib = rt.runtime.load_module(str(artifact.file(tgt["library"])))
        self._vm = rt.vm.VirtualMachine(lib, self.tvm_device)
        tp = m.get("tensor_parallel")
        if tp is not None and tp.get("weights_files") is not None:
            if random_weights:
                raise RequestError("random_weights is for artifacts compiled with --no-weights")
            weights = read_weights(artifact, tp["weights_files"][shard])
        elif m.get("weights_file") is None:
            if not random_weights:
                raise ArtifactError(f"{artifact.path}: compiled with --no-weights; it runs only with random weights (kiln bench --random-weights)")
            weights = None  # made below, on the device
        elif random_weights:
            raise RequestError("random_weights is for artifacts compiled with --no-weights")
        else:
            weights = read_weights(artifact)
        if weights is None and device != "cpu":
            self.params = random_weights_on(rt, self.tvm_device, m["params"])
        elif device == "cpu":
            self.params = self._load_params(weights if weights is not None else random_weights_for(m["params"]))
        else:
            self.params = [self._to_device(spec, raw) for spec, raw in weights]
        # every open sequence may grow to max_seq_len: the cache reserves pages for all of them
        self.page_size = int(kv["page_size"])
        if kv.get("kind", "paged") in ("kiln-quant", "kiln-mla"):
            if kv_pages is not None:
                raise RequestError("kv_pages sizes TVM's paged cache; this artifact's quantized KV cache reserves each sequence's pages")
            self._kv = QuantKVCache(rt, self.tvm_device, kv, self.max_seq_len, max_sequences)
        else:
            if kv_pages is None and kv_contexts is not None:  # a pool of that many whole contexts
                kv_pages = min(max(int(kv_contexts), 1), max_sequences) * self.pages_for(self.max_seq_len)
            if kv_pages is not None:
                low, high = self.pages_for(self.max_seq_len), max_sequences * self.pages_for(self.max_seq_len)
                if isinstance(kv_pages, bool) or not isinstance(kv_pages, int) or not low <= kv_pages <= high:
                    raise RequestError(f"kv_pages must be an integer in [{low}, {high}] (one to max_sequences contexts of "
                                       f"{self.max_seq_len} tokens in pages of {self.page_size}), got {kv_pages!r}")
            self._kv = PagedKVCache(self._vm, rt, self.max_seq_len, self.page_size, self.prefill_chunk, max_sequences, pages=kv_pages)
        self._lengths: dict[int, int] = {}  # open sequence id -> tokens in its KV cache
        self._advanced: set[int] = set()  # sequences grown by advance(): K/V arbitrary, logits meaningless
        self._embed, self._prefill, self._decode = self._vm["embed"], self._vm["prefill"], self._vm["decode"]
        # one call for a decode step of several sequences (CPU artifacts; CUDA with 16-bit or fp8 weights and
        # TVM's paged cache); without it (older artifacts, kiln's quantized cache on CUDA) one call per sequence
        self._decode_batch = _vm_function(self._vm, "decode_batch")
        self._one_token = self._tensor(np.zeros(1, dtype=np.int32))
        # decode_batch's token ids, copied into a view of one device buffer: a fresh tensor per step
        # was freed (cudaFree) right after the launch, which waits for the whole step -- the host
        # could not work beside it (H200, 8B, 128 sequences: the launch call took the step's 9 ms)
        self._batch_tokens = None
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

    # --- sequences ---------------------------------------------------------
    def add_sequence(self) -> int:
        """Open an empty sequence in the KV cache and return its id (the
        smallest id not in use). At most `max_sequences` are open at once."""
        seq = self._free_sequence_id()
        self._kv.add(seq)
        self._lengths[seq] = 0
        return seq

    def fork_sequence(self, parent: int, length: int) -> int:
        """Open a sequence holding the first `length` tokens of open sequence `parent`
        (1 <= length <= its length): their KV pages are shared, not recomputed or
        copied (a partial last page is copied). The server's prefix cache is built on
        it. TVM's paged cache only."""
        have = self._length(parent)
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= have:
            raise RequestError(f"sequence {parent} holds {have} tokens: a fork takes 1 to {have} of them, not {length!r}")
        if not isinstance(self._kv, PagedKVCache):
            raise RequestError("fork_sequence needs TVM's paged KV cache (this artifact has kiln's quantized cache)")
        if self.window is not None:  # measured wrong: TVM's fork does not carry the sliding layers' window state
            raise RequestError("fork_sequence is not available for models with sliding-window layers yet")
        seq = self._free_sequence_id()
        self._kv.fork(parent, seq, length)
        self._lengths[seq] = length
        if parent in self._advanced:
            self._advanced.add(seq)
        return seq

    def _free_sequence_id(self) -> int:
        """The smallest id not in use; RequestError when max_sequences are open."""
        if len(self._lengths) >= self.max_sequences:
            raise RequestError(f"all {self.max_sequences} sequences of this session are open: remove one first, "
                               f"or load with a larger max_sequences")
        return next(i for i in itertools.count() if i not in self._lengths)

    def remove_sequence(self, seq: int) -> None:
        """Close a sequence and give its KV pages back; its id may be reused."""
        self._length(seq)
        del self._lengths[seq]
        self._advanced.discard(seq)
        self._kv.remove(seq)

    def pages_for(self, tokens: int) -> int:
        """KV pages that hold `tokens` tokens of one sequence."""
        return -(-tokens // self.page_size)

    def kv_pages_free(self) -> int | None:
        """Pages of the KV pool not held by any sequence (None: kiln's quantized
        cache, which reserves max_seq_len for every sequence it may open)."""
        return self._kv.free_pages() if isinstance(self._kv, PagedKVCache) else None

    @property
    def kv_pages_total(self) -> int | None:
        return self._kv.total_pages if isinstance(self._kv, PagedKVCache) else None

    @property
    def batch_decode(self) -> bool:
        """Whether one decode call serves several sequences (the artifact has decode_batch)."""
        return self._decode_batch is not None

    @property
    def sequences(self) -> list[int]:
        """Ids of the open sequences."""
        return sorted(self._lengths)

    def sequence_length(self, seq: int) -> int:
        """Tokens in `seq`'s KV cache (its next token's position)."""
        return self._length(seq)

    # --- steps -------------------------------------------------------------
    def prefill(self, seq: int, tokens, *, all_logits: bool = False) -> np.ndarray:
        """Append `tokens` (ids, at least one) to `seq`, running them through the
        model prefill_chunk tokens per call. Returns float32 logits of the last
        token [vocab], or of every token given [len(tokens), vocab] when
        all_logits (row i predicts the token after tokens[i]). Logits are
        returned as computed: the Sampler refuses NaN/Inf."""
        ids = self._check_tokens(tokens)
        self._check_room(seq, len(ids))
        rows = []
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            rows.append(self._forward_prefill([seq], [chunk], np.arange(len(chunk)) if all_logits else np.array([len(chunk) - 1])))
        return np.concatenate(rows, axis=0) if all_logits else rows[-1][0]

    def prefill_many(self, seqs: list[int], token_lists: list) -> np.ndarray:
        """Append token_lists[i] to seqs[i] (the server's prefill step): float32
        logits of each list's last token, [len(seqs), vocab]. One model call for
        all of them where the cache runs several sequences per call (TVM's paged
        cache: a ragged batch, so one launch of each kernel instead of one per
        prompt) and they fit one call (prefill_chunk tokens in all); otherwise
        `prefill` one by one. Everything is checked before anything runs."""
        if not isinstance(seqs, (list, tuple)) or not isinstance(token_lists, (list, tuple)) or len(seqs) != len(token_lists) or not seqs:
            raise RequestError("prefill_many takes a list of sequence ids and a list of as many token lists")
        if len(set(seqs)) != len(seqs):
            raise RequestError(f"a sequence appears twice in one prefill step: {list(seqs)}")
        lists = [self._check_tokens(t) for t in token_lists]
        for seq, ids in zip(seqs, lists):
            self._check_room(seq, len(ids))
        ragged = isinstance(self._kv, PagedKVCache) and self._decode_batch is not None  # (kiln's quantized cache: decode rows only)
        if len(seqs) == 1 or not ragged or sum(len(ids) for ids in lists) > self.prefill_chunk:
            return np.stack([self.prefill(seq, ids) for seq, ids in zip(seqs, lists)])
        return self._forward_prefill(list(seqs), lists, np.cumsum([len(ids) for ids in lists]) - 1)  # each list's last token

    def decode_step(self, seqs: list[int], tokens: list[int]) -> np.ndarray:
        """Feed tokens[i] to open sequence seqs[i] (each once per step); returns
        float32 logits [len(seqs), vocab], row i for seqs[i], for a host sampler.
        Several sequences run as one decode_batch call where the artifact has it
        (row i is bit-identical to decoding seqs[i] alone), else one call each.
        Every sequence and token is checked before any runs."""
        self._check_decode(seqs, tokens)
        if len(seqs) > 1 and self._decode_batch is not None:
            return self._decode_many(seqs, tokens)[0].numpy()[:, 0]
        rows = [self._decode_one(seq, tok)[0].numpy()[:, 0] for seq, tok in zip(seqs, tokens)]  # each [1, vocab]
        if len(rows) == 1:
            return rows[0]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, self.vocab_size), np.float32)

    def decode_greedy(self, seqs: list[int], tokens: list[int]) -> list[int]:
        """decode_step, but returns each sequence's argmax token id, picked on the
        device: 8 bytes per sequence come back instead of a logits row (0.5 MB
        for a 128k vocabulary). Raises NonFiniteLogitsError on NaN/Inf logits."""
        return self.decode_greedy_async(seqs, tokens)()

    def decode_greedy_async(self, seqs: list[int], tokens: list[int]) -> Callable[[], list[int]]:
        """decode_greedy in two halves: the step is queued on the device now (the
        sequences grow now), and calling the returned function waits for it and gives
        the token ids (or raises NonFiniteLogitsError). The host may work meanwhile --
        the server's engine delivers the previous step's tokens while this one runs --
        but must read it before the next decode call (whose token ids reuse its buffer)."""
        self._check_decode(seqs, tokens)
        if len(seqs) > 1 and self._decode_batch is not None:
            greedy = self._decode_many(seqs, tokens)[1]  # [B, 2]: argmax, all-finite
            pending = [(greedy, list(seqs))]
        else:
            pending = [(self._decode_one(seq, tok)[1], [seq]) for seq, tok in zip(seqs, tokens)]  # each [2]
        advanced = [q for q in seqs if q in self._advanced]

        def result() -> list[int]:
            out = []
            for greedy, qs in pending:
                picked = greedy.numpy().reshape(len(qs), 2)
                if not all(ok or q in advanced for q, ok in zip(qs, picked[:, 1])):
                    raise NonFiniteLogitsError("the model produced NaN/Inf logits; refusing to sample")
                out += [int(x) for x in picked[:, 0]]
            return out

        return result

    def advance(self, seq: int, n: int) -> None:
        """Grow `seq` by n positions without running the model: their K/V hold
        whatever the cache pages held. Only for speed runs at a long context
        (`kiln bench --context`): attention still reads every cached byte, and
        the prefill that would cost more than the decode being timed is skipped.
        Uninitialised pages may hold any bits, NaN included: decode_greedy does not
        refuse such a sequence's non-finite logits (they mean nothing either way)."""
        have = self._length(seq)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.max_seq_len - have:
            raise RequestError(f"sequence {seq} holds {have} tokens: it can advance by 0 to {self.max_seq_len - have}, not {n!r}")
        for s in range(0, n, self.prefill_chunk):
            self._kv.begin([seq], [min(self.prefill_chunk, n - s)])
            self._kv.end()
        self._lengths[seq] += n
        if n:
            self._advanced.add(seq)

    # --- profiling ---------------------------------------------------------
    def set_instrument(self, fn: Callable | None) -> None:
        """Call fn(func, name, before, ret, *args) before and after every call the
        Relax VM makes (compiled kernels, builtins); fn returns 0. None removes
        it. For per-kernel timing (benchmarks/profile_step.py)."""
        self._vm.set_instrument(fn)

    def sync(self) -> None:
        """Wait until the device has finished the work queued so far (CUDA
        launches are asynchronous): call before reading a clock."""
        self.tvm_device.sync()

    # --- low level ---------------------------------------------------------
    def _length(self, seq) -> int:
        n = self._lengths.get(seq) if isinstance(seq, (int, np.integer)) and not isinstance(seq, bool) else None
        if n is None:
            raise RequestError(f"sequence {seq!r} is not open in this session (add_sequence opens one)")
        return n

    def _check_decode(self, seqs, tokens) -> None:
        if not isinstance(seqs, (list, tuple)) or not isinstance(tokens, (list, tuple, np.ndarray)) or len(seqs) != len(tokens):
            raise RequestError("decode takes a list of sequence ids and a list of as many token ids")
        for seq, t in zip(seqs, tokens):
            if self._length(seq) >= self.max_seq_len:
                raise RequestError(f"sequence {seq} holds {self.max_seq_len} tokens, this session's context: no room to decode")
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                raise RequestError(f"token id {t!r} is outside [0, {self.vocab_size})")
        if len(seqs) > 1 and len(set(seqs)) != len(seqs):
            raise RequestError(f"a sequence appears twice in one decode step: {list(seqs)}")

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
                base = self._rt.runtime.from_dlpack(view.view(np.uint16).reshape(spec["shape"]))
                params.append(base._create_view(tuple(spec["shape"]), "bfloat16"))
            else:
                params.append(self._rt.runtime.from_dlpack(view.view(numpy_dtype(spec["dtype"])).reshape(spec["shape"])))
        self._arena = arena  # the views above keep it alive too; this documents ownership
        return params

    def _to_device(self, spec: dict, raw: np.ndarray):
        arr = self._rt.runtime.empty(tuple(spec["shape"]), spec["dtype"], self.tvm_device)
        arr.copyfrom(np.asarray(raw).view(numpy_dtype(spec["dtype"])).reshape(spec["shape"]))
        return arr

    def _tensor(self, a: np.ndarray):
        return self._rt.runtime.tensor(a, self.tvm_device)

    def _forward_prefill(self, seqs: list[int], lists: list[list[int]], logit_pos: np.ndarray) -> np.ndarray:
        """Run lists[i] through the model for seqs[i], one ragged batch of at most
        prefill_chunk tokens in all (TVM's paged cache: several sequences in one
        begin_forward); logit_pos indexes the concatenated tokens. Returns logits
        # [len(logit_pos), vocab] and grows each sequence by its list."""
        flat = [t for ids in lists for t in ids]
        self._kv.begin(list(seqs), [len(ids) for ids in lists])
        try:
            emb = self._embed(self._tensor(np.asarray(flat, dtype=np.int32)), self.params)
            emb = emb._create_view((1, len(flat), emb.shape[1]))
            out = self._prefill(emb, self._tensor(np.asarray(logit_pos, dtype=np.int32)), *self._kv.args(), self.params)
        finally:
            self._kv.end()
        for seq, ids in zip(seqs, lists):
            self._lengths[seq] += len(ids)
        return out[0].numpy()[0]

    def _check_room(self, seq: int, n: int) -> None:
        have = self._length(seq)
        if have + n > self.max_seq_len:
            raise RequestError(f"sequence {seq} holds {have} tokens: {n} more pass this session's context of {self.max_seq_len}")

    def _decode_one(self, seq: int, token: int):
        """One decode step of `seq` on `token` (checked); returns the device tensors
        (logits  # [1, 1, vocab] float32, greedy  # [2] int32: argmax, all-finite)."""
        self._one_token.copyfrom(np.asarray([token], dtype=np.int32))
        self._kv.begin([seq], [1])
        out = self._decode(self._one_token, *self._kv.args(), self.params)
        self._kv.end()
        self._lengths[seq] += 1
        return out[0], out[1]

    def _decode_many(self, seqs: list[int], tokens: list[int]):
        """One decode_batch call for checked (seqs, tokens); returns the device tensors
        (logits  # [B, 1, vocab] float32, greedy  # [B, 2] int32: argmax, all-finite)."""
        n = len(tokens)
        if self._batch_tokens is None or self._batch_tokens.shape[0] < n:
            self._batch_tokens = self._tensor(np.zeros(max(n, self.max_sequences), dtype=np.int32))
        ids = self._batch_tokens._create_view((n,))
        ids.copyfrom(np.asarray(tokens, dtype=np.int32))
        self._kv.begin(list(seqs), [1] * len(seqs))
        try:
            out = self._decode_batch(ids, *self._kv.args(), self.params)
        finally:
            self._kv.end()
        for seq in seqs:
            self._lengths[seq] += 1
        return out[0], out[1]

    def _check_tokens(self, ids) -> list[int]:
        return check_tokens(ids, self.vocab_size)

    # --- whole requests ----------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits at every position: float32 [T, vocab]; row i predicts token i+1."""
        with self._scratch_sequence(token_ids) as (seq, ids):
            return self.prefill(seq, ids, all_logits=True)

    def decode_logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits like `logits`, but through the decode path that
        generation uses (a one-token prefill, then one decode step per token):
        float32 [T, vocab]. For checking the decode kernels (e.g. quantized GEMVs)."""
        with self._scratch_sequence(token_ids) as (seq, ids):
            rows = [self.prefill(seq, ids[:1], all_logits=True)]
            rows += [self.decode_step([seq], [t]) for t in ids[1:]]
            return np.concatenate(rows, axis=0)

    @contextlib.contextmanager
    def _scratch_sequence(self, token_ids):
        """(sequence, checked ids) of a teacher-forced pass; the sequence is open for its duration."""
        ids = self._check_tokens(token_ids)
        if len(ids) > self.max_seq_len:
            raise RequestError(f"sequence has {len(ids)} tokens, over this session's context of {self.max_seq_len}")
        seq = self.add_sequence()
        try:
            yield seq, ids
        finally:
            self.remove_sequence(seq)

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
        g = Generation(self, prompt_tokens, max_new_tokens, sampling, stop, ignore_eos)
        info.update(prompt=g.prompt, finish="length", prefill_s=0.0, decode_s=0.0)
        seq = self.add_sequence()
        try:
            t0 = time.perf_counter()
            tok = g.sample(self.prefill(seq, g.prompt))
            info["prefill_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            while True:
                text = g.accept(tok)
                if text is not None:
                    yield tok, text
                if g.done:
                    break
                tok = self.decode_greedy([seq], [tok])[0] if g.greedy else g.sample(self.decode_step([seq], [tok])[0])
            info["decode_s"] = time.perf_counter() - t1
            info["finish"] = g.finish
            tail = g.tail()
            if tail:
                yield -1, tail
        finally:
            self.remove_sequence(seq)


def _vm_function(vm, name: str):
    """vm[name], or None when the artifact has no such function."""
    try:
        return vm[name]
    except (AttributeError, KeyError, ValueError, RuntimeError):
        return None


def _random_sources(params: list[dict]):
    """Per param spec, the bytes its random values repeat (cyclically, in order): N(0, 0.02)
    for matrices and biases from one 16 MiB float32 block in the param's dtype, 1 for norm
    weights, random bytes for quantized codes (clear of the values the format never writes:
    the next code down, fixed in the 4 MiB block -- fixing 8 GB of fp8 codes took minutes)."""
    block = (np.random.default_rng(0).standard_normal(1 << 22) * 0.02).astype(np.float32)
    codes = np.random.default_rng(1).integers(0, 256, 1 << 22, dtype=np.uint8)
    clean: dict[tuple, np.ndarray] = {}
    by_dtype: dict = {}
    for spec in params:
        dt = numpy_dtype(spec["dtype"])
        if len(spec["shape"]) == 1 and "norm" in spec["name"]:
            src = np.ones(int(np.prod(spec["shape"])), dtype=dt)
        elif dt.kind in "iu":
            bad = tuple(spec.get("invalid_codes") or ())
            if bad not in clean:
                clean[bad] = np.where(np.isin(codes, bad), codes - 1, codes).astype(np.uint8) if bad else codes
            src = clean[bad]
        else:
            if dt not in by_dtype:
                by_dtype[dt] = block.astype(dt)
            src = by_dtype[dt]
        yield spec, src.view(np.uint8)


def _nbytes(spec: dict) -> int:
    return int(np.prod(spec["shape"])) * numpy_dtype(spec["dtype"]).itemsize


def random_weights_for(params: list[dict]) -> list[tuple[dict, np.ndarray]]:
    """Random params of the spec's shapes/dtypes for speed runs (host arrays; values in
    _random_sources): filling an 8B-parameter model takes seconds, not minutes."""
    return [(spec, np.resize(src, _nbytes(spec))) for spec, src in _random_sources(params)]


def random_weights_on(rt, device, params: list[dict]) -> list:
    """The same random params as random_weights_for, made on `device`: each source block is
    copied over once, then tiled into every param by device-side copies. For GPUs, where the
    host copy of a 70B model's weights would not fit in host memory and its upload would
    take minutes."""
    out, on_device = [], {}
    for spec, src in _random_sources(params):
        arr = rt.runtime.empty(tuple(spec["shape"]), spec["dtype"], device)
        if id(src) not in on_device:
            on_device[id(src)] = (src, rt.runtime.tensor(np.ascontiguousarray(src), device))
        blk = on_device[id(src)][1]
        total, size = _nbytes(spec), src.size
        flat = arr._create_view((total,), "uint8")
        for off in range(0, total, size):
            n = min(size, total - off)
            blk._create_view((n,), "uint8").copyto(flat._create_view((n,), "uint8", off))
        out.append(arr)
    return out


def cuda_device(rt, target: dict, path, index: int = 0):
    """CUDA GPU `index` (the first by default), after loading TVM's CUDA plugin (runtime-only TVM does
    not load it by itself) and checking the artifact has code for its arch."""
    import ctypes  # noqa: PLC0415

    libdir = Path(rt.tvm.base._LOADED_LIBS["tvm_runtime"]._name).parent
    plugin = libdir / "libtvm_runtime_cuda.so"
    if rt.get_global_func("device_api.cuda") is None:
        try:
            ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            raise ArtifactError(f"cannot load TVM's CUDA runtime ({plugin}): {err}") from None
    dev = rt.tvm.cuda(index)
    if not dev.exist:
        if index:
            raise ArtifactError(f"{path}: needs GPU {index} (one per tensor-parallel shard); this machine has fewer GPUs")
        raise ArtifactError(f"{path}: no CUDA GPU on this machine; run with --device cpu on an artifact compiled with --target llvm")
    here = "sm_" + str(dev.compute_version).replace(".", "")
    archs = target.get("archs") or [target.get("arch")]
    ptx = target.get("ptx")  # "compute_90": the driver can JIT it for this arch and newer
    if here not in archs and not (ptx and int(here[3:]) >= int(ptx.removeprefix("compute_"))):
        have = ", ".join(archs) + (f" + PTX {ptx}" if ptx else "")
        raise ArtifactError(f"{path}: has device code for {have}; this GPU is {here}: recompile with --target cuda:{here}")
    return dev


def load(path: str | Path, device: str = "cpu", max_seq_len: int | None = None, threads: int | None = None, verify: bool = True,
         random_weights: bool = False, prefill_chunk: int | None = None, max_sequences: int = 1, kv_pages: int | None = None,
         kv_contexts: int | None = None, cls: type | None = None, cpu_target: str | None = None) -> Session:
    """Load an artifact (checks manifest, machine and hashes first) and return a Session.
    max_seq_len: tokens per sequence (default: the artifact's, at most 4096);
    max_sequences: sequences open at once (KV memory is reserved for each at max_seq_len,
    unless kv_pages sizes a smaller pool that they share: at least one context's pages;
    kv_contexts: that pool as so many whole contexts, when kv_pages is not given);
    random_weights: only for artifacts compiled with --no-weights (speed runs);
    cls: the Session class (kiln.runtime.load passes TensorParallelSession for split artifacts);
    cpu_target: a CPU level of a multi-level artifact (its --target CPU name, e.g. "x86-64-v2" or "aarch64"; default:
    the best level this host supports, see Session.target)."""
    if threads is not None:
        if not 1 <= threads <= 1024:
            raise RequestError(f"threads must be in [1, 1024], got {threads}")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    art = open_artifact(path, device=device, verify_hashes=verify, cpu=cpu_target)
    if art.manifest.get("tensor_parallel") and (cls is None or not issubclass(cls, Session) or cls is Session):
        raise ArtifactError(f"{path}: a tensor-parallel artifact: load it with kiln.runtime.load (one worker per shard)")
    return (cls or Session)(art, device=device, max_seq_len=max_seq_len, random_weights=random_weights, prefill_chunk=prefill_chunk,
                   max_sequences=max_sequences, kv_pages=kv_pages, kv_contexts=kv_contexts, cpu_target=cpu_target)
