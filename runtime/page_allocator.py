"""Host-side page allocator for the paged KV cache (pure Python, no jax).

Pages are reference-counted so shared prefixes can point at the same page later; a
page returns to the free list when its count drops to zero. Page 0..num_pages-1 are
all allocatable; the device never reads a page past a sequence's length, so a freed
page's stale contents are unreachable until it is overwritten by its new owner.

Data parallelism: with `groups` = D > 1 the pages are split into D equal groups (page p
belongs to group p // (num_pages / D)), each held by one data group's devices. A
sequence's group is fixed by its first `grow` (`group=`) and all its pages come from
that group; page ids stay global. D == 1 is one group of every page.

Prefix caching (`prefix_caching=True`): a full page whose tokens are known is
registered under a chained digest (the previous page's digest, the page's token ids,
the request's salt and the allocator's `namespace`: whatever else changes the KV).
`lookup` finds the longest chain of a token sequence's full pages, comparing the stored
token ids too, so a digest collision cannot serve another prompt's KV; `share` maps
those pages into a sequence (read-only: a sequence only writes past them). A cached page
whose last owner freed it is kept, reclaimable, in a per-group LRU (a freed sequence's
pages enter it last page first, so chains are reclaimed from the tail); `grow` takes free
pages first, then reclaims the least recently used. Pages: free + reclaimable + owned
== num_pages (`check_conserved`).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, groups: int = 1, *, prefix_caching: bool = False,
                 namespace: str = ""):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be positive")
        if groups <= 0 or num_pages % groups:
            raise ValueError(f"num_pages={num_pages} must split into groups={groups} equal groups")
        self.num_pages = num_pages
        self.page_size = page_size
        self.groups = groups
        self.pages_per_group = num_pages // groups
        per = self.pages_per_group
        self._free = [collections.deque(range(g * per, (g + 1) * per)) for g in range(groups)]  # per group
        self._refcount = [0] * num_pages
        self._pages: dict[str, list[int]] = {}  # sequence id -> its pages, in order
        self._group: dict[str, int] = {}  # sequence id -> its group (fixed at its first grow)
        # Prefix cache: digest -> page, page -> (digest, parent digest, token bytes), the
        # reclaimable cached pages (refcount 0) per group in LRU order, and each
        # sequence's registered chain (pages registered, last digest).
        self.prefix_caching = prefix_caching
        self._namespace = hashlib.blake2b(namespace.encode(), digest_size=16).digest()  # hashed once, not per page
        self._by_digest: dict[bytes, int] = {}
        self._page_key: dict[int, tuple[bytes, bytes, bytes]] = {}
        self._reclaimable = [collections.OrderedDict() for _ in range(groups)]
        self._chain: dict[str, tuple[int, bytes]] = {}
        self.num_reclaimed = 0  # cached pages taken back for new contents

    @property
    def num_free(self) -> int:
        """Pages a sequence can get: free, or cached and unowned (reclaimable)."""
        return sum(len(f) for f in self._free) + self.num_reclaimable

    @property
    def num_reclaimable(self) -> int:
        return sum(len(r) for r in self._reclaimable)

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache (owned or reclaimable)."""
        return len(self._page_key)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def num_free_in(self, group: int) -> int:
        return len(self._free[group]) + len(self._reclaimable[group])

    def group_of_page(self, page: int) -> int:
        return page // self.pages_per_group

    def group_of(self, seq_id: str) -> int | None:
        """The sequence's group, or None before its first grow (and after `free`)."""
        return self._group.get(seq_id)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def pages(self, seq_id: str) -> list[int]:
        return self._pages.get(seq_id, [])

    def _resolve_group(self, seq_id: str, group: int | None) -> int:
        fixed = self._group.get(seq_id)
        if fixed is not None:
            if group is not None and group != fixed:
                raise ValueError(f"{seq_id} is in page group {fixed}, not {group}")
            return fixed
        if group is None:
            if self.groups == 1:
                return 0
            raise ValueError(f"{seq_id} has no page group yet: pass group= (one of {self.groups})")
        if not 0 <= group < self.groups:
            raise ValueError(f"group={group} is out of range [0, {self.groups})")
        return group

    def can_grow(self, seq_id: str, num_tokens: int, group: int | None = None) -> bool:
        g = self._resolve_group(seq_id, group)
        return self.pages_for(num_tokens) - len(self.pages(seq_id)) <= self.num_free_in(g)

    def grow(self, seq_id: str, num_tokens: int, group: int | None = None) -> list[int]:
        """Makes `seq_id` own enough pages for `num_tokens` tokens, all from its group
        (`group`, needed on the first grow when there are several); returns its pages."""
        g = self._resolve_group(seq_id, group)
        free = self._free[g]
        need = self.pages_for(num_tokens) - len(self.pages(seq_id))
        if need > self.num_free_in(g):
            where = f" in group {g}" if self.groups > 1 else ""
            raise OutOfPages(f"{seq_id} needs {need} more pages, {self.num_free_in(g)} free{where}")
        pages = self._pages.setdefault(seq_id, [])
        self._group[seq_id] = g
        for _ in range(need):
            if free:
                page = free.popleft()
            else:  # the least recently used cached page gets new contents
                page, _ = self._reclaimable[g].popitem(last=False)
                self._uncache(page)
                self.num_reclaimed += 1
            self._refcount[page] = 1
            pages.append(page)
        return pages

    def free(self, seq_id: str) -> None:
        self._group.pop(seq_id, None)
        self._chain.pop(seq_id, None)
        # Last page first: the LRU then reclaims a chain from its tail, and its prefix,
        # the part other prompts share, stays findable longest.
        for page in reversed(self._pages.pop(seq_id, [])):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if page in self._page_key:  # cached: kept until its page is needed
                    self._reclaimable[self.group_of_page(page)][page] = None
                else:
                    self._free[self.group_of_page(page)].append(page)

    # --- the prefix cache -------------------------------------------------------------

    def _digest(self, parent: bytes, tokens: bytes, salt: str) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for part in (self._namespace, parent, salt.encode(), tokens):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.digest()

    def _pages_bytes(self, tokens, n: int) -> list[bytes]:
        """The token ids of the first `n` full pages, each as int32 bytes (one conversion)."""
        step = 4 * self.page_size
        data = np.asarray(tokens[: n * self.page_size], np.int32).tobytes()
        return [data[i * step:(i + 1) * step] for i in range(n)]

    def _uncache(self, page: int) -> None:
        digest, _, _ = self._page_key.pop(page)
        del self._by_digest[digest]

    def lookup(self, tokens, *, salt: str = "", group: int = 0, max_pages: int | None = None) -> list[int]:
        """The pages of the longest cached chain of `tokens`' full pages (at most
        `max_pages`) in `group`: each page's digest found and its stored parent and token
        ids equal to the chain's."""
        if not self.prefix_caching:
            return []
        n = len(tokens) // self.page_size if max_pages is None else min(max_pages, len(tokens) // self.page_size)
        found, parent = [], b""
        for page_tokens in self._pages_bytes(tokens, n):
            digest = self._digest(parent, page_tokens, salt)
            page = self._by_digest.get(digest)
            if page is None or self.group_of_page(page) != group or self._page_key[page] != (
                    digest, parent, page_tokens):
                break
            found.append(page)
            parent = digest
        return found

    def share(self, seq_id: str, pages: list[int], *, group: int | None = None) -> None:
        """Maps cached `pages` (a `lookup` result) into `seq_id`, which holds no pages yet,
        as its first pages (read-only for it)."""
        if self._pages.get(seq_id):
            raise ValueError(f"{seq_id} already holds pages: cached pages go first")
        g = self._resolve_group(seq_id, group)
        self._group[seq_id] = g
        self._pages[seq_id] = list(pages)
        for page in pages:
            if self._refcount[page] == 0:
                del self._reclaimable[g][page]
            self._refcount[page] += 1
        self._chain[seq_id] = (len(pages), self._page_key[pages[-1]][0] if pages else b"")

    def can_share_and_grow(self, seq_id: str, pages: list[int], num_tokens: int, group: int) -> bool:
        """Whether `share(pages)` then `grow(num_tokens)` fit in `group`: cached pages that
        are reclaimable stop being so once shared."""
        idle = sum(1 for p in pages if self._refcount[p] == 0)
        return self.pages_for(num_tokens) - len(pages) <= self.num_free_in(group) - idle

    def register(self, seq_id: str, tokens, *, salt: str = "") -> int:
        """Registers `seq_id`'s full pages whose KV the device holds, `tokens` being their
        token ids from the sequence's first (a page whose contents are cached already
        under another page stays private). Returns the pages now registered for it."""
        if not self.prefix_caching:
            return 0
        pages = self._pages.get(seq_id, [])
        done, parent = self._chain.get(seq_id, (0, b""))
        full = min(len(tokens) // self.page_size, len(pages))
        new = self._pages_bytes(tokens[done * self.page_size:], max(0, full - done))
        for i, page_tokens in enumerate(new, start=done):
            digest = self._digest(parent, page_tokens, salt)
            page = pages[i]
            if digest not in self._by_digest and page not in self._page_key:
                self._by_digest[digest] = page
                self._page_key[page] = (digest, parent, page_tokens)
            parent = digest
        self._chain[seq_id] = (max(done, full), parent)
        return max(done, full)

    def check_conserved(self) -> None:
        """Every page is either free or owned, every free page is on its own group's list
        and every sequence's pages are in its group; raises if the books don't balance."""
        owned = collections.Counter(p for pages in self._pages.values() for p in pages)
        for page in range(self.num_pages):
            if owned[page] != self._refcount[page]:
                raise AssertionError(f"page {page}: refcount {self._refcount[page]}, owners {owned[page]}")
        free = [p for f in self._free for p in f]
        if len(set(free)) != len(free) or any(self._refcount[p] for p in free):
            raise AssertionError("free list holds a page twice or a page still in use")
        idle = [p for r in self._reclaimable for p in r]
        if any(self._refcount[p] or p not in self._page_key for p in idle) or set(idle) & set(free):
            raise AssertionError("a reclaimable page is owned, uncached, or also free")
        if any(self._page_key[p][0] not in self._by_digest or self._by_digest[self._page_key[p][0]] != p
               for p in self._page_key) or len(self._by_digest) != len(self._page_key):
            raise AssertionError("the prefix cache's digest and page maps disagree")
        for g, r in enumerate(self._reclaimable):
            if any(self.group_of_page(p) != g for p in r):
                raise AssertionError(f"group {g}'s reclaimable pages hold a page of another group")
        for g, f in enumerate(self._free):
            if any(self.group_of_page(p) != g for p in f):
                raise AssertionError(f"group {g}'s free list holds a page of another group")
        for seq_id, pages in self._pages.items():
            g = self._group.get(seq_id)
            if any(self.group_of_page(p) != g for p in pages):
                raise AssertionError(f"{seq_id} (group {g}) holds pages of another group: {pages}")
        if len(free) + len(idle) + sum(1 for c in self._refcount if c) != self.num_pages:
            raise AssertionError("pages are lost: neither free, reclaimable nor owned")
