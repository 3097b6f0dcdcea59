"""Host-side page allocator for the paged KV cache (pure Python, no jax).

Pages are reference-counted so shared prefixes can point at the same page later; a
page returns to the free list when its count drops to zero. Page 0..num_pages-1 are
all allocatable; the device never reads a page past a sequence's length, so a freed
page's stale contents are unreachable until it is overwritten by its new owner.

Data parallelism: with `groups` = D > 1 the pages are split into D equal groups (page p
belongs to group p // (num_pages / D)), each held by one data group's devices. A
sequence's group is fixed by its first `grow` (`group=`) and all its pages come from
that group; page ids stay global. D == 1 is one group of every page.
"""

from __future__ import annotations

import collections


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, groups: int = 1):
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

    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def num_free_in(self, group: int) -> int:
        return len(self._free[group])

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
        return self.pages_for(num_tokens) - len(self.pages(seq_id)) <= len(self._free[g])

    def grow(self, seq_id: str, num_tokens: int, group: int | None = None) -> list[int]:
        """Makes `seq_id` own enough pages for `num_tokens` tokens, all from its group
        (`group`, needed on the first grow when there are several); returns its pages."""
        g = self._resolve_group(seq_id, group)
        free = self._free[g]
        need = self.pages_for(num_tokens) - len(self.pages(seq_id))
        if need > len(free):
            where = f" in group {g}" if self.groups > 1 else ""
            raise OutOfPages(f"{seq_id} needs {need} more pages, {len(free)} free{where}")
        pages = self._pages.setdefault(seq_id, [])
        self._group[seq_id] = g
        for _ in range(need):
            page = free.popleft()
            self._refcount[page] = 1
            pages.append(page)
        return pages

    def free(self, seq_id: str) -> None:
        self._group.pop(seq_id, None)
        for page in self._pages.pop(seq_id, []):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                self._free[self.group_of_page(page)].append(page)

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
        for g, f in enumerate(self._free):
            if any(self.group_of_page(p) != g for p in f):
                raise AssertionError(f"group {g}'s free list holds a page of another group")
        for seq_id, pages in self._pages.items():
            g = self._group.get(seq_id)
            if any(self.group_of_page(p) != g for p in pages):
                raise AssertionError(f"{seq_id} (group {g}) holds pages of another group: {pages}")
        if len(free) + sum(1 for c in self._refcount if c) != self.num_pages:
            raise AssertionError("pages are lost: neither free nor owned")
