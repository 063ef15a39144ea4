"""Reclaim: ``mm/vmscan.c`` of 6.2, run by kswapd (tid 0).

``shrink_folio_list`` one folio at a time (``shrink_folio``): isolate from the LRU,
``folio_referenced``, ``try_to_unmap`` (:mod:`cowenv.kernel.rmap`), write anon pages
to swap, discard clean lazyfree pages (MADV_FREE), free. Simplification: one LRU list
in pfn order, no aging; ``nr`` pages per call.
"""

from __future__ import annotations

from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_swapbacked,
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
            reclaimed += ok
        return reclaimed
    def shrink_folio(self, t: Thread, pfn: int, ignore_references: bool) -> Gen:
        """``shrink_folio_list`` for one isolated anon folio.

        Referenced → rotate; pinned → keep; lazyfree → discard via ``try_to_unmap``; else
        swap out.

        Returns 1 if the folio was freed. The isolation reference is dropped here.
        """
        pool = self.pool
        if not ignore_references:
            referenced = yield from self.folio_referenced(t, pfn)
            if referenced:
                self.folio_putback_lru(pfn)
                return 0
        if int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:
            self.folio_putback_lru(pfn)  # page_maybe_dma_pinned: cannot be unmapped
            return 0
        lazy = not int(pool.flags[pfn]) & PG_swapbacked
        slot = None
        if not lazy:
            slot = self.swap.get_swap_page()
            if slot is None:
                self.folio_putback_lru(pfn)
                return 0
            # SWAP_HAS_CACHE: the swap cache holds the slot while the folio is unmapped
            # and written out, so a swap-in + free of one swap PTE meanwhile cannot free
            # (and recycle) the slot under the other mappings (mm/swap_state.c).
            self.swap.swap_map[slot] += 1
        yield from self.try_to_unmap(t, pfn, slot)
        if slot is not None:
            self.swap_free(slot, "delete_from_swap_cache")
        if int(pool.mapcount[pfn]) > 0 or int(pool.refcount[pfn]) > 1:
            self.folio_putback_lru(pfn)
            return 0
        self.put_page(pfn, "shrink_folio_list")
        return 1
