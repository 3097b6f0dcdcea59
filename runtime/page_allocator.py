"""Host-side page allocator for the paged KV cache (pure Python, no jax).

Pages are reference-counted so shared prefixes can point at the same page later; a
page returns to the free list when its count drops to zero. Page 0..num_pages-1 are
all allocatable; the device never reads a page past a sequence's length, so a freed
page's stale contents are unreachable until it is overwritten by its new owner.
"""

from __future__ import annotations

import collections


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self._refcount = [0] * num_pages
        self._pages: dict[str, list[int]] = {}  # sequence id -> its pages, in order

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def pages(self, seq_id: str) -> list[int]:
        return self._pages.get(seq_id, [])

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(self.pages(seq_id)) <= self.num_free

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Makes `seq_id` own enough pages for `num_tokens` tokens; returns its pages."""
        pages = self._pages.setdefault(seq_id, [])
        need = self.pages_for(num_tokens) - len(pages)
        if need > len(self._free):
            raise OutOfPages(f"{seq_id} needs {need} more pages, {len(self._free)} free")
        for _ in range(need):
            page = self._free.popleft()
            self._refcount[page] = 1
            pages.append(page)
        return pages

    def free(self, seq_id: str) -> None:
        for page in self._pages.pop(seq_id, []):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                self._free.append(page)

    def check_conserved(self) -> None:
        """Every page is either free or owned; raises if the books don't balance."""
        owned = collections.Counter(p for pages in self._pages.values() for p in pages)
        for page in range(self.num_pages):
            if owned[page] != self._refcount[page]:
                raise AssertionError(f"page {page}: refcount {self._refcount[page]}, owners {owned[page]}")
        if len(set(self._free)) != len(self._free) or any(self._refcount[p] for p in self._free):
            raise AssertionError("free list holds a page twice or a page still in use")
        if len(self._free) + sum(1 for c in self._refcount if c) != self.num_pages:
            raise AssertionError("pages are lost: neither free nor owned")
