"""Reclaim: ``mm/vmscan.c`` of 6.2, run by kswapd (tid 0).

``shrink_folio_list`` one folio at a time (``shrink_folio``): isolate from the LRU,
``folio_referenced``, ``add_to_swap``, ``try_to_unmap`` (:mod:`cowenv.kernel.rmap`),
``pageout`` to the slot (the folio stays in the swap cache), discard clean lazyfree
pages (MADV_FREE), ``__remove_mapping`` of clean swap-cache folios. Simplification: one
LRU list, no aging; a call stops after ``nr`` folios were freed or written out.
"""

from __future__ import annotations

import numpy as np

from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_dirty,
    PG_locked,
    PG_swapbacked,
    PG_swapcache,
)
from .pgtable import (
    PFN_SHIFT,
    PTE_PRESENT,
)
from .sched import Gen, Thread


class VmscanMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def folio_isolate_lru(self, pfn: int) -> None:
        """``folio_isolate_lru``: off the LRU, +1 reference."""
        self.pool.lru_seq[pfn] = -1
        self.pool.refcount[pfn] += 1
    def folio_putback_lru(self, pfn: int) -> None:
        """``folio_putback_lru``: back on the LRU tail, drop the isolation reference."""
        if not self.pool.is_free(pfn):
            self.pool.lru_add([pfn])
        self.put_page(pfn, "folio_putback_lru")
    def sys_reclaim(self, t: Thread, nr: int = 1, pid: int = 0, addr: int = -1) -> Gen:
        """Reclaim as kswapd: ``shrink_inactive_list`` → ``shrink_folio_list`` over the anon LRU.

        Oldest first, until ``nr`` pages are reclaimed or the list was scanned once.

        ``pid``/``addr`` (a scenario convenience) move the anon page currently mapped
        there to the head of the LRU first, so that it is the next one scanned.

        Lock contract: no mmap_lock (rmap walkers take anon_vma and the PTL only).
        """
        pool = self.pool
        order = pool.lru_order()
        if pid and addr >= 0 and pid in self.procs:
            mm = self.procs[pid].mm
            w = mm.pmd.get(addr // self.config.page_size // self.P)
            if w is not None:
                pte = int(w.table.entries[(addr // self.config.page_size) % self.P])
                p = pte >> PFN_SHIFT
                if pte & PTE_PRESENT and p in order:
                    order.remove(p)
                    order.insert(0, p)
        reclaimed = 0
        for pfn in order:
            if reclaimed >= nr:
                break
            if not pool.on_lru(pfn) or not self.is_anon(pfn):
                continue
            self.folio_isolate_lru(pfn)
            yield "shrink_folio_list:isolated"
            ok = yield from self.shrink_folio(t, pfn, ignore_references=False)
            # nr_reclaimed + nr_pageout: a folio written out counts as progress.
            reclaimed += ok > 0
        return reclaimed
    def shrink_folio(self, t: Thread, pfn: int, ignore_references: bool) -> Gen:
        """``shrink_folio_list`` for one isolated folio, under ``folio_trylock``.

        The folio lock (``PG_locked``) is held across the whole of
        :meth:`shrink_folio_locked`, as ``shrink_folio_list`` holds it from
        ``folio_trylock`` to ``folio_unlock``; the paths that would drop the folio from
        the swap cache meanwhile (``__try_to_reclaim_swap``, ``do_wp_page``,
        ``madvise_free_pte_range``, ``do_swap_page``'s ``folio_free_swap``) try the lock
        and back off. Simplification: only reclaim takes the folio lock.
        """
        pool = self.pool
        if int(pool.flags[pfn]) & PG_locked:
            self.folio_putback_lru(pfn)  # if (!folio_trylock(folio)) goto keep;
            return 0
        pool.flags[pfn] |= PG_locked
        try:
            return (yield from self.shrink_folio_locked(t, pfn, ignore_references))
        finally:
            if not pool.is_free(pfn):
                pool.flags[pfn] &= ~np.int64(PG_locked)
    def shrink_folio_locked(self, t: Thread, pfn: int, ignore_references: bool) -> Gen:
        """``shrink_folio_list`` (mm/vmscan.c, 6.2) for one isolated, locked anon folio.

        In order, as the kernel does it:

        * referenced (``folio_check_references``) → ``activate_locked``: back on the LRU,
          and a swap-cache folio drops its slot if swap is more than half full
          (``if (folio_test_swapcache(folio) && (mem_cgroup_swap_full(folio) || ...))
          folio_free_swap(folio);``);
        * an anon swap-backed folio not in the swap cache: ``folio_maybe_dma_pinned`` →
          keep; ``add_to_swap`` (fails when swap is full → keep);
        * ``folio_mapped`` → ``try_to_unmap`` over every mapping (every process); still
          mapped afterwards → keep;
        * ``folio_test_dirty`` → ``pageout``: the data is written to the slot and, the
          write being asynchronous (``PAGE_SUCCESS`` with ``folio_test_writeback`` →
          ``goto keep``), the folio stays in the swap cache, back on the LRU;
        * clean: a lazyfree folio is freed if only the isolation reference is left; a
          swap-cache folio goes through ``__remove_mapping`` (its references must be
          exactly the cache's and the isolation's) and is freed.

        Returns 1 if the folio was freed, 2 if it was written out (and kept in the swap
        cache), 0 otherwise. The isolation reference is dropped here.
        Simplification: the pinned check is made for every folio up front (the kernel
        makes it before ``add_to_swap``; a pinned folio elsewhere fails later anyway).
        """
        pool = self.pool
        if not ignore_references:
            referenced = yield from self.folio_referenced(t, pfn)
            if referenced:
                if int(pool.flags[pfn]) & PG_swapcache and self.swap.full():
                    self.folio_free_swap(pfn)
                self.folio_putback_lru(pfn)
                return 0
        if int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:
            self.folio_putback_lru(pfn)  # page_maybe_dma_pinned: cannot be unmapped
            return 0
        lazy = not int(pool.flags[pfn]) & PG_swapbacked
        if not lazy and not int(pool.flags[pfn]) & PG_swapcache:
            if not self.add_to_swap(pfn):
                self.folio_putback_lru(pfn)
                return 0
        slot = None if lazy else int(pool.swap[pfn])
        if int(pool.mapcount[pfn]) > 0:
            yield from self.try_to_unmap(t, pfn, slot)
            if int(pool.mapcount[pfn]) > 0:
                self.folio_putback_lru(pfn)
                return 0
        if lazy:
            if int(pool.refcount[pfn]) > 1:
                self.folio_putback_lru(pfn)
                return 0
            self.put_page(pfn, "shrink_folio_list")
            return 1
        if int(pool.flags[pfn]) & PG_dirty:
            # pageout → swap_writepage: folio_clear_dirty_for_io, write, async completion.
            assert slot is not None
            pool.flags[pfn] &= ~np.int64(PG_dirty)
            self.swap.data[slot] = pool.content[pfn]
            self.cost.charge("swap_io")
            self.folio_putback_lru(pfn)
            return 2
        # __remove_mapping: folio_ref_freeze(folio, 1 + nr) -- isolation + swap cache.
        if int(pool.refcount[pfn]) != 2:
            self.folio_putback_lru(pfn)
            return 0
        self.remove_mapping_swapcache(pfn)
        self.put_page(pfn, "shrink_folio_list")
        return 1
