"""Physical memory: the frame pool (``struct page`` as arrays), swap, shmem objects.

``struct page`` fields live in numpy arrays indexed by pfn (structure of arrays) so that
fork and zap can update 512 pages with one vectorised operation.

Simplifications (documented in the README's model section):

* ``_mapcount`` is stored as the logical mapcount (the kernel stores it biased by -1).
* A FOLL_PIN adds ``GUP_PIN_COUNTING_BIAS`` (1024) to ``_refcount`` exactly as for small
  folios in the kernel; ``pincount`` is kept beside it only for renders and the
  accounting oracle's exact recount.
* The swap cache (``mm/swap_state.c``, 6.2) is :attr:`SwapDevice.cache` (slot -> pfn,
  the swap address space's xarray) plus ``PG_swapcache`` and :attr:`PagePool.swap`
  (``folio->swap``) on the folio; the cache holds one reference on the folio and
  ``SWAP_HAS_CACHE`` (:attr:`SwapDevice.has_cache`) on the slot. Writeback is
  asynchronous in effect: ``pageout`` writes the data at once but the folio stays in
  the swap cache until a later reclaim pass (``__remove_mapping``) or
  ``folio_free_swap`` drops it (no ``PG_writeback`` state, no ``SWP_STABLE_WRITES``).
  The device is not ``SWP_SYNCHRONOUS_IO``: every swap-in goes through the swap cache.
* Page-table pages come from the same pool as data pages, so ``fail_nth`` and pool
  exhaustion hit both, as ``alloc_pages`` does in the kernel.
"""

from __future__ import annotations

import numpy as np

#: ``GUP_PIN_COUNTING_BIAS`` (include/linux/mm.h).
GUP_PIN_COUNTING_BIAS = 1024

# page->flags bits (the subset that matters; names follow include/linux/page-flags.h).
PG_allocated = 1 << 0  # not in the buddy allocator
PG_anon = 1 << 1  # PageAnon (folio->mapping & PAGE_MAPPING_ANON)
PG_anon_exclusive = 1 << 2  # PageAnonExclusive
PG_dirty = 1 << 3  # PG_dirty
PG_swapbacked = 1 << 4  # PG_swapbacked; clear on an anon page = lazyfree (MADV_FREE)
PG_table = 1 << 5  # PageTable
PG_shmem = 1 << 6  # shmem page-cache page
PG_zero = 1 << 7  # the shared zero page
PG_swapcache = 1 << 8  # folio_test_swapcache: in the swap cache, folio->swap valid
PG_locked = 1 << 9  # folio_lock: held by reclaim (shrink_folio_list) only, see vmscan.py


class PagePool:
    """The frame pool: ``struct page`` fields of every frame plus the free list.

    Attributes:
        refcount: ``page_ref_count``.
        mapcount: ``page_mapcount`` (logical, 0 = unmapped).
        pincount: number of FOLL_PIN pins (each also counted as 1024 in refcount).
        flags: ``PG_*`` bits above.
        content: the data token the page holds (0 = zero-filled).
        anon_vma: id of ``folio->mapping``'s anon_vma (rmap), -1 if none.
        index: ``page->index`` (the virtual page number it was faulted at; linear).
        shmem: (object id) for shmem pages, -1 otherwise.
        gen: allocation generation, bumped at every allocation (use-after-free checks).
    """

    def __init__(self, nr_frames: int) -> None:
        self.nr = nr_frames
        self.refcount = np.zeros(nr_frames, dtype=np.int64)
        self.mapcount = np.zeros(nr_frames, dtype=np.int64)
        self.pincount = np.zeros(nr_frames, dtype=np.int64)
        self.flags = np.zeros(nr_frames, dtype=np.int64)
        self.content = np.zeros(nr_frames, dtype=np.int64)
        self.anon_vma = np.full(nr_frames, -1, dtype=np.int64)
        self.index = np.zeros(nr_frames, dtype=np.int64)
        self.shmem = np.full(nr_frames, -1, dtype=np.int64)
        self.gen = np.zeros(nr_frames, dtype=np.int64)
        # Position on the (single, anon) LRU list: -1 = not on it; lower = older.
        self.lru_seq = np.full(nr_frames, -1, dtype=np.int64)
        self.lru_clock = 0
        # folio->swap (swp_entry_t, the slot) of a swap-cache folio, -1 otherwise.
        self.swap = np.full(nr_frames, -1, dtype=np.int64)
        # Frame 0 is the zero page: allocated forever, never refcounted by mappings.
        self.flags[0] = PG_allocated | PG_zero
        self.refcount[0] = 1
        # LIFO free list, highest pfn at the bottom so that allocation order is 1, 2, 3…
        self.free: list[int] = list(range(nr_frames - 1, 0, -1))
        self.nr_free = nr_frames - 1

    #: Frames only ``__GFP_NOFAIL``/``PF_MEMALLOC`` allocations may use (memory reserves).
    RESERVE = 8

    #: Batches of up to this many pages take the scalar paths (one-page ``take`` and
    #: ``give_back``; ``lru_add``, ``put_pages``, ``free_pages``, ``page_remove_rmap`` and
    #: one-entry ``set_ptes`` in the kernel): Python stores in the same order, with the
    #: same results as the numpy paths, which cost microseconds per call on such small
    #: arrays. 0 = always the numpy paths (``tests/test_fast_paths.py`` compares the two).
    SMALL_BATCH = 8

    def take(self, n: int, reserve_ok: bool = False) -> np.ndarray | None:
        """Remove ``n`` frames from the free list (``alloc_pages`` bulk); None if short.

        Ordinary allocations leave :attr:`RESERVE` frames free; ``reserve_ok`` (a
        ``__GFP_NOFAIL`` allocation) may use them.
        """
        if n > len(self.free) - (0 if reserve_ok else self.RESERVE):
            return None
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if n == 1 and self.SMALL_BATCH:  # scalar stores, ~10x cheaper than fancy ones
            ix: int | np.ndarray = self.free.pop()
        else:
            ix = np.array(self.free[-n:][::-1], dtype=np.int64)
            del self.free[-n:]
        self.nr_free -= n
        self.gen[ix] += 1
        self.refcount[ix] = 1
        self.mapcount[ix] = 0
        self.pincount[ix] = 0
        self.flags[ix] = PG_allocated
        self.content[ix] = 0
        self.anon_vma[ix] = -1
        self.index[ix] = 0
        self.shmem[ix] = -1
        self.lru_seq[ix] = -1
        self.swap[ix] = -1
        return ix if isinstance(ix, np.ndarray) else np.array((ix,), dtype=np.int64)

    def give_back(self, pfns: np.ndarray) -> None:
        """Return frames to the free list (``free_unref_page``), in pfn order."""
        n = len(pfns)
        if n == 0:
            return
        if n == 1 and self.SMALL_BATCH:  # scalar stores, without 1-element fancy indexing
            self.give_back_one(int(pfns[0]))
            return
        pfns = pfns.copy()  # == np.sort(pfns), without numpy's Python-level wrapper
        pfns.sort()
        self.flags[pfns] = 0
        self.lru_seq[pfns] = -1
        self.free.extend(pfns[::-1].tolist())  # Python ints, as int(p) for each
        self.nr_free += len(pfns)

    def give_back_one(self, pfn: int) -> None:
        """:meth:`give_back` of one frame (``pfn`` a Python int)."""
        self.flags[pfn] = 0
        self.lru_seq[pfn] = -1
        self.free.append(pfn)
        self.nr_free += 1

    def lru_add(self, pfns: np.ndarray | list[int]) -> None:
        """``folio_add_lru``: append to the LRU tail in the given order."""
        n = len(pfns)
        if n <= self.SMALL_BATCH:  # scalar stores (same values, same order)
            seq = self.lru_seq
            c = self.lru_clock
            for p in (pfns.tolist() if isinstance(pfns, np.ndarray) else pfns):
                seq[p] = c
                c += 1
            self.lru_clock = c
            return
        pfns = np.asarray(pfns, dtype=np.int64)
        self.lru_seq[pfns] = self.lru_clock + np.arange(n)
        self.lru_clock += n

    def lru_order(self) -> list[int]:
        """Pages on the LRU, oldest first."""
        on = (self.lru_seq >= 0).nonzero()[0]
        return on[self.lru_seq[on].argsort(kind="stable")].tolist()  # (== np.argsort)

    def on_lru(self, pfn: int) -> bool:
        """``folio_test_lru``."""
        return bool(self.lru_seq[pfn] >= 0)

    def is_free(self, pfn: int) -> bool:
        """Whether ``pfn`` is in the buddy allocator."""
        return not (int(self.flags[pfn]) & PG_allocated)


class SwapDevice:
    """A swap device: ``swap_map`` counts, ``SWAP_HAS_CACHE``, the swap cache, the data.

    ``swap_map[slot]`` is the number of swap PTEs referencing the slot (the count part
    of ``si->swap_map``); ``has_cache[slot]`` is its ``SWAP_HAS_CACHE`` bit, set from
    ``folio_alloc_swap``/``swapcache_prepare`` until ``put_swap_folio``. A slot is free
    (``swap_entry_free``) when both are clear. ``cache`` is the swap address space
    (``swap_address_space(entry)->i_pages``): slot -> pfn of the swap-cache folio.
    """

    def __init__(self, nr_slots: int) -> None:
        self.nr = nr_slots
        self.swap_map = np.zeros(max(nr_slots, 1), dtype=np.int64)
        self.has_cache = np.zeros(max(nr_slots, 1), dtype=bool)
        self.data = np.zeros(max(nr_slots, 1), dtype=np.int64)
        self.cache: dict[int, int] = {}
        self.free: list[int] = list(range(nr_slots - 1, -1, -1))
        #: ``SWP_WRITEOK``: cleared while swapoff runs (no new slots are handed out).
        self.writeok = True

    def inuse_pages(self) -> int:
        """``si->inuse_pages``: slots with a count or ``SWAP_HAS_CACHE``."""
        return self.nr - len(self.free)

    def get_swap_page(self) -> int | None:
        """``get_swap_pages`` (``folio_alloc_swap``): a free slot with ``SWAP_HAS_CACHE``.

        Returns None when swap is full.
        """
        if not self.free or not self.writeok:
            return None
        slot = self.free.pop()
        self.has_cache[slot] = True
        return slot

    def free_slot(self, slot: int) -> None:
        """Return a slot with no count and no cache (``swap_entry_free``)."""
        self.data[slot] = 0
        self.free.append(slot)

    def full(self) -> bool:
        """``vm_swap_full``: more than half of swap in use.

        ``atomic_long_read(&nr_swap_pages) * 2 < total_swap_pages`` (mm/swap.h, 6.2).
        """
        return len(self.free) * 2 < self.nr


class ShmemObject:
    """A shmem inode backing a ``MAP_SHARED|MAP_ANONYMOUS`` mapping: pgoff -> pfn."""

    __slots__ = ("id", "pages", "nr_pages")

    def __init__(self, oid: int, nr_pages: int) -> None:
        self.id = oid
        self.nr_pages = nr_pages
        self.pages: dict[int, int] = {}
