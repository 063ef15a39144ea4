"""Swap slots: ``mm/swapfile.c`` of 6.2.

``swap_duplicate``, ``swap_free``, ``put_swap_folio``, ``free_swap_and_cache`` (with
``__try_to_reclaim_swap``), ``folio_swapped`` and ``folio_free_swap``. The swap device
itself (slots, counts, ``SWAP_HAS_CACHE``, data, the cache's xarray) is
:class:`cowenv.kernel.memory.SwapDevice`; the swap cache's own functions are in
:mod:`cowenv.kernel.swap_state`.

Simplifications: one swap device, no clusters, no ``swap_info_struct`` locking (slots
change only under the PTL or with the folio isolated, as the callers' contracts say),
``folio_lock`` is not modelled (the callers' sections run without a preemption point
where the kernel holds the folio lock).
"""

from __future__ import annotations

from .memory import PG_dirty, PG_locked, PG_swapcache


class SwapfileMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def swap_duplicate(self, slot: int, n: int = 1) -> None:
        """``swap_duplicate``: one more swap PTE names ``slot`` (fork, try_to_unmap_one)."""
        self.swap.swap_map[slot] += n

    def _swap_slot_maybe_free(self, slot: int) -> None:
        """``swap_entry_free`` when neither a count nor ``SWAP_HAS_CACHE`` remains."""
        sw = self.swap
        if sw.swap_map[slot] == 0 and not sw.has_cache[slot]:
            sw.free_slot(slot)

    def swap_free(self, slot: int, site: str, n: int = 1) -> None:
        """``swap_free`` → ``__swap_entry_free``: drop ``n`` swap-PTE references.

        The slot itself is freed only when no count and no ``SWAP_HAS_CACHE`` remain.
        """
        sw = self.swap
        sw.swap_map[slot] -= n
        if sw.swap_map[slot] < 0:
            self._report("accounting", site, f"swap_map underflow on slot {slot}")
            sw.swap_map[slot] = 0
        self._swap_slot_maybe_free(slot)

    def put_swap_folio(self, slot: int) -> None:
        """``put_swap_folio``: clear ``SWAP_HAS_CACHE`` (the slot may become free)."""
        self.swap.has_cache[slot] = False
        self._swap_slot_maybe_free(slot)

    def free_swap_and_cache(self, slot: int, site: str) -> None:
        """``free_swap_and_cache`` (mm/swapfile.c, 6.2): zap of a swap entry.

        ::

            count = __swap_entry_free(p, entry);
            if (count == SWAP_HAS_CACHE && !swap_page_trans_huge_swapped(p, entry))
                __try_to_reclaim_swap(p, swp_offset(entry), TTRS_UNMAPPED | TTRS_FULL);

        ``__try_to_reclaim_swap`` frees the swap-cache folio if it is not mapped
        (``TTRS_UNMAPPED``) or swap is more than half full (``TTRS_FULL``), through
        ``folio_free_swap``; the lookup reference is dropped after, which frees an
        unmapped folio nobody else holds.
        """
        self.swap_free(slot, site)
        sw = self.swap
        if sw.swap_map[slot] == 0 and sw.has_cache[slot]:
            pfn = sw.cache.get(slot)
            if pfn is None:
                return  # SWAP_HAS_CACHE before the folio is in the cache (swapin race)
            if int(self.pool.flags[pfn]) & PG_locked:
                return  # if (!folio_trylock(folio)) goto out;
            if int(self.pool.mapcount[pfn]) == 0 or sw.full():
                self.get_pages_one(pfn)  # filemap_get_folio's reference
                self.folio_free_swap(pfn)
                self.put_page(pfn, "__try_to_reclaim_swap")

    def folio_swapped(self, pfn: int) -> bool:
        """``folio_swapped`` (small folio): ``swap_swapcount(entry) != 0``."""
        slot = int(self.pool.swap[pfn])
        return slot >= 0 and int(self.swap.swap_map[slot]) > 0

    def folio_free_swap(self, pfn: int) -> bool:
        """``folio_free_swap`` (mm/swapfile.c, 6.2): drop the swap cache if no PTE names the slot.

        ::

            if (!folio_test_swapcache(folio))
                return false;
            if (folio_test_writeback(folio))
                return false;
            if (folio_swapped(folio))
                return false;
            ...
            delete_from_swap_cache(folio);
            folio_set_dirty(folio);
            return true;

        The folio is dirty afterwards: memory holds the only copy of the data. The
        caller holds a reference on the folio (the cache's is dropped here).
        """
        if not int(self.pool.flags[pfn]) & PG_swapcache:
            return False
        if self.folio_swapped(pfn):
            return False
        self.delete_from_swap_cache(pfn, "folio_free_swap")
        self.pool.flags[pfn] |= PG_dirty
        return True
