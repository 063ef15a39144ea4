"""The swap cache: ``mm/swap_state.c`` of 6.2.

``add_to_swap`` (``folio_alloc_swap`` + ``add_to_swap_cache``), ``delete_from_swap_cache``
(``__delete_from_swap_cache`` + ``put_swap_folio``), ``swap_cache_get_folio`` and the
read side of ``swapin_readahead`` (``__read_swap_cache_async``). A swap-cache folio is
shared by every swap PTE that names its slot: ``do_swap_page`` of each of them finds
the same folio (:mod:`cowenv.kernel.fault`).

Simplifications: no readahead (one folio per fault), no shadow entries / workingset, the
xarray node allocation of ``add_to_swap_cache`` never fails, and ``swapcache_prepare``'s
``-EEXIST`` race loop does not arise (lookup and insertion happen without a preemption
point between them).
"""

from __future__ import annotations

import numpy as np

from .memory import PG_dirty, PG_swapbacked, PG_swapcache


class SwapStateMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def get_pages_one(self, pfn: int) -> None:
        """``folio_get`` on one page (scalar fast path of ``get_pages``)."""
        self.pool.refcount[pfn] += 1

    def add_to_swap_cache(self, pfn: int, slot: int) -> None:
        """``add_to_swap_cache``: the cache takes a reference, ``PG_swapcache``, ``folio->swap``."""
        pool = self.pool
        pool.refcount[pfn] += 1  # folio_ref_add(folio, nr)
        pool.flags[pfn] |= PG_swapcache | PG_swapbacked
        pool.swap[pfn] = slot
        self.swap.cache[slot] = pfn

    def add_to_swap(self, pfn: int) -> bool:
        """``add_to_swap`` (mm/swap_state.c, 6.2): allocate a slot and add the folio.

        ``folio_alloc_swap`` gives a slot with ``SWAP_HAS_CACHE``; then the folio is
        marked dirty::

            /*
             * Normally the folio will be dirtied in unmap because its
             * pte should be dirty. A special case is MADV_FREE page. ...
             * Always setting the dirty flag for the folio solves the problem.
             */
            folio_mark_dirty(folio);

        Returns False when swap is full.
        """
        slot = self.swap.get_swap_page()
        if slot is None:
            return False
        self.add_to_swap_cache(pfn, slot)
        self.pool.flags[pfn] |= PG_dirty
        return True

    def _delete_from_swap_cache_xa(self, pfn: int) -> int:
        """``__delete_from_swap_cache``: out of the xarray, ``folio_clear_swapcache``."""
        pool = self.pool
        slot = int(pool.swap[pfn])
        if self.swap.cache.get(slot) == pfn:
            del self.swap.cache[slot]
        pool.flags[pfn] &= ~np.int64(PG_swapcache)
        pool.swap[pfn] = -1
        return slot

    def delete_from_swap_cache(self, pfn: int, site: str) -> None:
        """``delete_from_swap_cache``: remove, ``put_swap_folio``, drop the cache's reference."""
        slot = self._delete_from_swap_cache_xa(pfn)
        self.put_swap_folio(slot)
        self.put_page(pfn, site)

    def remove_mapping_swapcache(self, pfn: int) -> None:
        """``__remove_mapping`` of a swap-cache folio (``reclaimed`` = True).

        The caller checked the folio is clean and its references are only the cache's and
        the isolation's (``folio_ref_freeze(folio, 1 + nr)``); the cache's is dropped here.
        """
        slot = self._delete_from_swap_cache_xa(pfn)
        self.put_swap_folio(slot)
        self.pool.refcount[pfn] -= 1

    def swap_cache_get_folio(self, slot: int) -> int | None:
        """``swap_cache_get_folio``: the cached folio of ``slot`` with a reference, or None."""
        pfn = self.swap.cache.get(slot)
        if pfn is not None:
            self.pool.refcount[pfn] += 1
        return pfn

    def read_swap_cache_async(self, slot: int, site: str) -> int | None:
        """``__read_swap_cache_async`` for one slot (no readahead).

        ``swapcache_prepare`` fails with -ENOENT when the slot is no longer in use (its
        PTE changed under us: the caller re-checks it); then a new folio
        (``GFP_HIGHUSER_MOVABLE``) is added to the swap cache with ``SWAP_HAS_CACHE``,
        put on the LRU and read (``swap_readpage``). Returns the pfn with the caller's
        reference (refcount 2 with the cache's), or None (the caller's
        ``VM_FAULT_OOM`` when the PTE is unchanged).
        """
        sw = self.swap
        if sw.swap_map[slot] == 0 or sw.has_cache[slot]:
            return None
        pfn = self.alloc_page(site)
        if pfn is None:
            return None
        sw.has_cache[slot] = True
        self.add_to_swap_cache(pfn, slot)
        self.pool.content[pfn] = sw.data[slot]
        self.pool.lru_add([pfn])
        self.cost.charge("page_alloc")
        self.cost.charge("swap_io")
        return pfn

    def drain_swap_cache(self) -> int:
        """Free every swap-cache folio that only the cache holds (reclaim's end state).

        Orphaned swap-cache folios (unmapped, refcount 1) stay until reclaim reaches them
        in the kernel (``shrink_folio_list`` → ``pageout`` if dirty → ``__remove_mapping``);
        this does that for all of them at once: called by the page allocator before it
        fails (the reclaim that needs no rmap walk) and by end-of-run leak checks.
        Returns the number of folios freed.
        """
        pool = self.pool
        n = 0
        for slot, pfn in sorted(self.swap.cache.items()):
            if int(pool.mapcount[pfn]) or int(pool.refcount[pfn]) != 1:
                continue
            if int(pool.flags[pfn]) & PG_dirty:
                self.swap.data[slot] = pool.content[pfn]  # pageout
                pool.flags[pfn] &= ~np.int64(PG_dirty)
            self.delete_from_swap_cache(pfn, "shrink_folio_list")
            n += 1
        return n
