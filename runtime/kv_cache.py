"""The runtime's two KV caches: several sequences; kiln's quantized one takes several per call for decode steps.

PagedKVCache: TVM's C++ paged cache object (K/V in the activations' dtype).
QuantKVCache: kiln's quantized cache (--kv-dtype int8|fp8), and the latent
cache of multi-head latent attention (DeepSeek): the pages and scales are
plain tensors passed to prefill/decode, which quantize on append and attend
over them in place; this class owns page allocation and the sequence length,
and writes the meta tensor each call:

    meta    # [1 + pages] int32: position of the call's first token, then the page table
    pages   # [layers, num_pages, 2, kv_heads, page_size, head_dim]  codes (latent: [layers, num_pages, page_size, latent_dim])
    scales  # [layers, num_pages, 2, kv_heads, page_size]            float32 (latent: [layers, num_pages, page_size])

Both have add / remove / begin / end and `args()`: what the model's
functions take in the cache's place.
"""

from __future__ import annotations

import numpy as np

from ..errors import RequestError


class PagedKVCache:
    """The TVM runtime's paged KV cache object. Pages hold page_size tokens x
    kv_heads x head_dim per layer; memory for max_sequences sequences of
    max_seq_len tokens is reserved once at creation."""

    def __init__(self, vm, rt, max_seq_len: int, page_size: int, prefill_chunk: int, max_sequences: int = 1, pages: int | None = None):
        """pages: the pool's size in pages (default: every sequence at max_seq_len;
        whole pages per sequence, sequences do not share a page)."""
        shape = rt.ffi.Shape
        self.rt = rt
        if pages is not None:
            tokens = pages * page_size
        else:
            tokens = max_seq_len if max_sequences == 1 else max_sequences * -(-max_seq_len // page_size) * page_size
        self.obj = vm["create_paged_kv_cache"](shape([max_sequences]), shape([tokens]), shape([prefill_chunk]), shape([page_size]), shape([0]))
        g = rt.get_global_func
        self._add, self._remove = g("vm.builtin.kv_state_add_sequence"), g("vm.builtin.kv_state_remove_sequence")
        self._begin, self._end = g("vm.builtin.kv_state_begin_forward"), g("vm.builtin.kv_state_end_forward")
        self._available = g("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.live: set[int] = set()
        self.total_pages = self.free_pages()

    def free_pages(self) -> int:
        return int(self._available(self.obj))

    def add(self, seq_id: int) -> None:
        self._add(self.obj, seq_id)
        self.live.add(seq_id)

    def remove(self, seq_id: int) -> None:
        if seq_id in self.live:
            self._remove(self.obj, seq_id)
            self.live.discard(seq_id)

    def fork(self, parent: int, child: int, length: int) -> None:
        """child := parent's first `length` tokens: whole pages shared (reference-counted
        by TVM, so either may be removed first), a partial last page copied."""
        self.rt.get_global_func("vm.builtin.kv_state_fork_sequence")(self.obj, parent, child, length)
        self.live.add(child)

    def begin(self, seq_ids: list[int], lengths: list[int]) -> None:
        self._begin(self.obj, self.rt.ffi.Shape(seq_ids), self.rt.ffi.Shape(lengths))

    def end(self) -> None:
        self._end(self.obj)

    def args(self) -> tuple:
        return (self.obj,)


class QuantKVCache:
    """kiln's quantized paged KV cache (see the module doc). Memory for
    max_sequences sequences of max_seq_len tokens is allocated once; a
    sequence takes pages from a free list as it grows and gives them back
    when removed."""

    def __init__(self, rt, dev, kv: dict, max_seq_len: int, max_sequences: int = 1):
        self.rt, self.dev = rt, dev
        self.page_size = int(kv["page_size"])
        self.num_pages = max_sequences * -(-max_seq_len // self.page_size)
        if kv["kind"] == "kiln-mla":  # one latent row per token and layer: [layers, pages, page_size, latent_dim]
            shape, row = (int(kv["num_layers"]), self.num_pages, self.page_size), int(kv["latent_dim"])
        else:
            shape, row = (int(kv["num_layers"]), self.num_pages, 2, int(kv["num_kv_heads"]), self.page_size), int(kv["head_dim"])
        self.pages = rt.runtime.empty((*shape, row), kv["code_dtype"], dev)
        self.scales = rt.runtime.empty(shape, "float32", dev)
        # zero scales: a row never written decodes to 0 whatever its codes (every code is finite),
        # so a cache advanced without the model (benchmarks) holds no NaN
        self.scales.copyfrom(np.zeros(shape, dtype=np.float32))
        self._meta = rt.runtime.empty((1 + self.num_pages,), "int32", dev)  # (grown for a batch's longer meta)
        self._meta_view = None
        self.free = list(range(self.num_pages - 1, -1, -1))
        self.seqs: dict[int, list] = {}  # seq id -> [length, page ids]
        self.live: set[int] = set()
        self._cur: list[tuple[int, int]] | None = None  # this call's (sequence, tokens)

    def add(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise RequestError(f"sequence {seq_id} is already in the KV cache")
        self.seqs[seq_id] = [0, []]
        self.live.add(seq_id)

    def remove(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            self.free.extend(reversed(self.seqs.pop(seq_id)[1]))
            self.live.discard(seq_id)

    def _short(self, sid: int, n: int) -> int:
        """Pages sid's next n tokens take from the free list."""
        length, pages = self.seqs[sid]
        return max(0, -(-(length + n) // self.page_size) - len(pages))

    def begin(self, seq_ids: list[int], lengths: list[int]) -> None:
        """One sequence (a prompt chunk or a decode step): meta = [position, page table]; several
        sequences, one token each (decode_batch): meta = [n, positions, table starts (n + 1), tables]."""
        if len(seq_ids) != 1 and any(n != 1 for n in lengths):
            raise RequestError("the quantized KV cache takes several sequences only for one token each (decode_batch)")
        for sid in seq_ids:  # (checked before any page moves: a refused call takes nothing)
            if sid not in self.seqs:
                raise RequestError(f"sequence {sid} is not in the KV cache")
        short = [self._short(sid, n) for sid, n in zip(seq_ids, lengths)]
        if sum(short) > len(self.free):
            if len(seq_ids) == 1:
                sid, n = seq_ids[0], lengths[0]
                raise RequestError(f"KV cache full: sequence {sid} needs {self.seqs[sid][0] + n} tokens, the cache holds "
                                   f"{self.num_pages * self.page_size}")
            raise RequestError(f"KV cache full: {len(seq_ids)} sequences need more pages than the {len(self.free)} free")
        for sid, k in zip(seq_ids, short):
            self.seqs[sid][1].extend(self.free.pop() for _ in range(k))
        positions, tables = [self.seqs[sid][0] for sid in seq_ids], [self.seqs[sid][1] for sid in seq_ids]
        if len(seq_ids) == 1:
            meta = np.concatenate([positions, tables[0]]).astype(np.int32)
        else:
            starts = np.cumsum([0] + [len(t) for t in tables])
            meta = np.concatenate([[len(seq_ids)], positions, starts, *tables]).astype(np.int32)
        if meta.size > self._meta.shape[0]:  # (several sequences: their tables plus 2 + 2 n entries)
            self._meta = self.rt.runtime.empty((meta.size,), "int32", self.dev)
        view = self._meta._create_view((meta.size,))
        view.copyfrom(meta)
        self._meta_view = view
        self._cur = list(zip(seq_ids, lengths))

    def end(self) -> None:
        for sid, n in self._cur:
            self.seqs[sid][0] += n
        self._cur = None

    def args(self) -> tuple:
        return (self._meta_view, self.pages, self.scales)
