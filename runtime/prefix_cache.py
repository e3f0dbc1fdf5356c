"""Prefix caching for the serving engine: whole KV pages of earlier prompts, kept
for later requests that start with the same tokens (a chat's system prompt, a
few-shot preamble).

An entry is a sequence of its own in the session's paged KV cache, holding the
first L tokens of a prompt (L a multiple of the page size), forked from the
request that computed them: TVM shares the pages, so an entry costs no copy and
only the pages no running request also holds. A new request whose tokens start
with an entry's first k pages (k * page_size < its length: at least one token is
left to compute its logits) is forked from the entry at k pages and prefills
only the rest. Keys are hashes chained page by page; a hit is verified against
the entry's tokens. Entries are evicted least-recently-used when their slots
are all taken or the engine needs pages.

Results equal the uncached ones up to float rounding (attention over the cached
pages runs TVM's paged kernel and is merged with the new tokens' part; ~1e-6
relative at float32), which is why `kiln serve` leaves it off unless
--prefix-cache is given.
"""

from __future__ import annotations

import collections


class PrefixCache:
    def __init__(self, session, slots: int):
        self.session = session
        self.slots = slots
        self.page = session.page_size
        self._entries: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # seq -> its tokens, LRU first
        self._keys: dict[int, tuple[int, int]] = {}  # chained hash of k pages -> (entry seq, k * page)
        self.hit_tokens = 0  # prompt tokens served from the cache
        self.lookup_tokens = 0  # prompt tokens of the requests looked up

    def __len__(self) -> int:
        return len(self._entries)

    def _hashes(self, tokens: list[int]):
        h = 0
        for k in range(1, len(tokens) // self.page + 1):
            h = hash((h, tuple(tokens[(k - 1) * self.page : k * self.page])))
            yield k * self.page, h

    def count(self, tokens: int, hit: int) -> None:
        """Record an admitted request's lookup (the engine looks a waiting head up again each step)."""
        self.lookup_tokens += tokens
        self.hit_tokens += hit

    def lookup(self, tokens: list[int]) -> tuple[int, int] | None:
        """(entry sequence, tokens to reuse) for the longest cached prefix of `tokens`
        that leaves at least one token to compute, or None."""
        best = None
        for n, h in self._hashes(tokens[:-1]):
            hit = self._keys.get(h)
            if hit is None or hit[1] != n:
                break
            best = hit
        if best is None or self._entries[best[0]][: best[1]] != tokens[: best[1]]:  # a hash collision reads as a miss
            return None
        self._entries.move_to_end(best[0])
        return best

    def donate(self, seq: int, tokens: list[int]) -> None:
        """Keep the whole pages of `tokens` (just computed in open sequence `seq`)
        unless an entry already covers them."""
        n = len(tokens) // self.page * self.page
        if n == 0 or self.slots == 0:
            return
        h = None
        for _, h in self._hashes(tokens[:n]):
            pass
        hit = self._keys.get(h)
        if hit is not None and hit[1] == n and self._entries[hit[0]][:n] == tokens[:n]:
            self._entries.move_to_end(hit[0])
            return
        if len(self._entries) >= self.slots:
            self.evict()
        entry = self.session.fork_sequence(seq, n)
        self._entries[entry] = list(tokens[:n])
        for length, key in self._hashes(tokens[:n]):
            self._keys[key] = (entry, length)

    def evict(self, keep: int | None = None) -> bool:
        """Drop the least recently used entry but `keep`; False when there is none."""
        seq = next((e for e in self._entries if e != keep), None)
        if seq is None:
            return False
        tokens = self._entries.pop(seq)
        for length, key in self._hashes(tokens):
            if self._keys.get(key) == (seq, length):
                del self._keys[key]
        self.session.remove_sequence(seq)
        return True
