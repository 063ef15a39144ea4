"""Reverse mapping: anon_vma set-up and the rmap walk of reclaim.

Models ``mm/rmap.c`` of 6.2: ``anon_vma_prepare``, ``anon_vma_fork``,
``page_add_new_anon_rmap``, ``page_remove_rmap``, ``rmap_walk_anon`` with
``page_vma_mapped_walk`` (``mm/page_vma_mapped.c``; its ``map_pte`` is
``_rmap_map_pte``), ``folio_referenced`` and ``try_to_unmap`` / ``try_to_unmap_one``.
Walkers hold no mmap_lock: only the anon_vma lock and the PTL.

Simplification: one anon_vma per VMA chain root (no ``anon_vma_chain`` lists); the walk
visits the VMAs of every live mm that share the page's anon_vma, in VMA-id order.
"""

from __future__ import annotations

import numpy as np

from .locks import READ, WRITE
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_swapbacked,
)
from .mm import (
    MM_ANONPAGES,
    MM_SWAPENTS,
    AnonVma,
    MmStruct,
    Vma,
)
from .pgtable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SOFT_DIRTY,
    PTE_YOUNG,
    PteTable,
    swp_entry_to_pte,
)
from .sched import Gen, Thread

#: ``page_vma_mapped_walk`` callers that pass COW PTE v4's ``PVMW_BREAK_COW_PTE``
#: (04/14) among those the model has: ``try_to_unmap_one``, ``try_to_migrate_one`` and
#: ``remove_migration_pte`` (not ``folio_referenced_one``).
PVMW_BREAK_COW_PTE_SITES = frozenset(
    ("try_to_unmap_one", "try_to_migrate_one", "remove_migration_pte"))


class RmapMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def page_remove_rmap(self, pfns: np.ndarray, site: str) -> None:
        """``page_remove_rmap`` on each pfn; a negative mapcount is ``print_bad_pte``."""
        n = len(pfns)
        if n == 0:
            return
        if n <= self.pool.SMALL_BATCH:  # scalar updates (the same; ufunc.at is slow)
            mcount = self.pool.mapcount
            pl = pfns.tolist()
            for p in pl:
                mcount[p] -= 1
            for p in pl:  # the first pfn whose (final) mapcount is negative
                if mcount[p] < 0:
                    self._report("accounting", site, f"Bad page map: mapcount of page {p} "
                                 f"is {int(mcount[p])}")
                    break
            return
        np.subtract.at(self.pool.mapcount, pfns, 1)
        mc = self.pool.mapcount[pfns]
        if np.count_nonzero(mc < 0):
            p = int(pfns[mc < 0][0])
            self._report("accounting", site, f"Bad page map: mapcount of page {p} is "
                         f"{int(self.pool.mapcount[p])}")
    def page_add_new_anon_rmap(self, pfn: int, vma: Vma, vpn: int,
                               index: int | None = None) -> None:
        """``page_add_new_anon_rmap``: mapcount 1, exclusive, linked to vma's anon_vma.

        ``page->index`` is ``linear_page_index(vma, address)`` (or ``index`` if given).
        """
        pool = self.pool
        pool.mapcount[pfn] = 1
        pool.flags[pfn] |= PG_anon | PG_anon_exclusive | PG_swapbacked
        assert vma.anon_vma is not None
        pool.anon_vma[pfn] = vma.anon_vma.id
        pool.index[pfn] = vma.linear_page_index(vpn) if index is None else index
        pool.lru_add([pfn])
    def page_add_anon_rmap(self, pfn: int, vma: Vma, vpn: int, exclusive: bool) -> None:
        """``page_add_anon_rmap`` (mm/rmap.c, 6.2) for a small page, e.g. a swap-cache folio.

        ::

            first = atomic_inc_and_test(&page->_mapcount);
            VM_BUG_ON_PAGE(!first && (flags & RMAP_EXCLUSIVE), page);
            VM_BUG_ON_PAGE(!first && PageAnonExclusive(page), page);
            ...
            if (first)
                __page_set_anon_rmap(folio, page, vma, address, !!(flags & RMAP_EXCLUSIVE));

        ``__page_set_anon_rmap`` links a folio that is not yet anon to the VMA's anon_vma
        (its root when not exclusive) and sets ``PageAnonExclusive`` if ``exclusive``. The
        ``VM_BUG_ON_PAGE``s are reported as accounting violations.
        """
        pool = self.pool
        first = int(pool.mapcount[pfn]) == 0
        pool.mapcount[pfn] += 1
        if not first and (exclusive or int(pool.flags[pfn]) & PG_anon_exclusive):
            self._report("accounting", "page_add_anon_rmap",
                         f"VM_BUG_ON_PAGE: page {pfn} mapped again while "
                         f"{'RMAP_EXCLUSIVE' if exclusive else 'PageAnonExclusive'}")
        if not first:
            return
        if not int(pool.flags[pfn]) & PG_anon:
            av = vma.anon_vma
            assert av is not None
            pool.flags[pfn] |= PG_anon
            pool.anon_vma[pfn] = av.id if exclusive else av.root.id
            pool.index[pfn] = vma.linear_page_index(vpn)
        if exclusive:
            pool.flags[pfn] |= PG_anon_exclusive
    def anon_vma_prepare(self, vma: Vma) -> None:
        """``anon_vma_prepare``: give the VMA its own anon_vma on first anon fault.

        Simplification: the anon_vma allocation itself cannot fail in the model.
        """
        if vma.anon_vma is None:
            av = AnonVma(self._id("anon_vma"))
            self.anon_vmas[av.id] = av
            av.vmas.append(vma)
            vma.anon_vma = av
            vma.chain.append(av)
    def anon_vma_fork(self, t: Thread, vma: Vma, pvma: Vma) -> Gen:
        """``anon_vma_fork``: link the child VMA into every anon_vma of the parent's.

        Then give it its own anon_vma (same root) for pages it faults in later.

        Lock contract: mmap_lock write; takes the root anon_vma's rwsem for write
        (``anon_vma_clone`` → ``lock_anon_vma_root``, then ``anon_vma_lock_write``), so
        fork waits for rmap walkers (reclaim) of the parent's pages to finish.
        """
        root = pvma.anon_vma.root if pvma.anon_vma is not None else None
        if root is not None:
            yield from self.lock(t, root.lock, WRITE, "anon_vma_fork")
        for av in pvma.chain:
            av.vmas.append(vma)
            vma.chain.append(av)
        av = AnonVma(self._id("anon_vma"), root)
        self.anon_vmas[av.id] = av
        av.vmas.append(vma)
        vma.chain.append(av)
        vma.anon_vma = av
        if root is not None:
            self.unlock(t, root.lock, WRITE, "anon_vma_fork")
    def rmap_walk_anon(self, t: Thread, pfn: int, site: str) -> Gen:
        """``rmap_walk_anon`` under ``anon_vma_lock_read``: the candidate mappings of ``pfn``.

        Takes the anon_vma root's rwsem for read and returns ``(root, candidates)``, the
        candidates being ``(vma, vpn)`` for every VMA of the anon_vma that covers the
        page's index; the caller visits each with :meth:`_rmap_map_pte` and then releases
        ``root.lock``. Returns ``[]`` (no lock taken) for a page with no anon_vma.
        """
        av = self.anon_vmas.get(int(self.pool.anon_vma[pfn]))
        if av is None:
            return []
        # anon_vma_lock_read: the root's rwsem (returned for the caller to release).
        yield from self.lock(t, av.root.lock, READ, site)
        index = int(self.pool.index[pfn])
        cands = []
        for v in list(av.vmas):
            vpn = v.vpn_of_index(index)  # vma_address(): pgoff, not the address
            if vpn is not None and not v.detached:
                cands.append((v, vpn))
        return av.root, cands
    def _rmap_map_pte(self, t: Thread, vma: Vma, vpn: int, pfn: int, site: str) -> Gen:
        """``page_vma_mapped_walk``: find the table, then lock it and check the PTE maps ``pfn``.

        Find the table (no lock), preemption point, then lock it and check the PTE maps
        ``pfn``. Returns ``(table, ptl, off)`` or None.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        pmd = mm.pmd.get(idx)
        if pmd is None:
            return None
        table = pmd.table
        yield f"{site}:table_found"
        table = yield from self.cow_rmap_table(t, vma, idx, table, site)
        if table is None:
            return None
        # The table was read with no lock: its split PTL lives in the table's struct page,
        # so taking it (or spinning on it) after the table was freed is a use after free
        # unless table freeing is deferred past this walk (RCU). Upstream rmap is safe by
        # construction (free_pgtables runs after unlink_anon_vmas, and the walker holds
        # the anon_vma lock); checked here for designs that replace PMDs under rmap.
        if not self.check_table_live(table, site):
            return None
        ptl = self.pte_lockptr(mm, table)
        yield from self.lock(t, ptl, WRITE, site)
        if not self.check_table_live(table, site):
            self.unlock(t, ptl, WRITE, site)
            return None
        if not self.rmap_table_still_valid(mm, idx, table, site):
            self.unlock(t, ptl, WRITE, site)
            return None
        pte = int(table.entries[off])
        if not self.pvmw_check_pte(pte, pfn, site):
            self.unlock(t, ptl, WRITE, site)
            return None
        return table, ptl, off
    @staticmethod
    def pvmw_check_pte(pte: int, pfn: int, site: str) -> bool:
        """``check_pte`` (mm/page_vma_mapped.c): does the PTE map ``pfn``?

        With ``PVMW_MIGRATION`` (``remove_migration_pte``) it must be a migration entry
        naming ``pfn``; otherwise a present PTE of ``pfn``.
        """
        if site == "remove_migration_pte":
            return bool(pte & PTE_MIGRATION) and pte >> PFN_SHIFT == pfn
        return bool(pte & PTE_PRESENT) and pte >> PFN_SHIFT == pfn
    def rmap_table_still_valid(self, mm: MmStruct, idx: int, table: PteTable,
                               site: str = "") -> bool:
        """Re-validate under the PTL that the PMD still points at ``table``.

        As ``pte_offset_map_nolock`` + ``pmd_same`` do. Upstream this always holds for rmap
        because tables are freed only after ``unlink_anon_vmas``.
        """
        cur = mm.pmd.get(idx)
        return cur is not None and cur.table is table
    def folio_referenced(self, t: Thread, pfn: int) -> Gen:
        """``folio_referenced``: test-and-clear the young bit of every mapping.

        This is allowed in shared tables: COW PTE v4 does not break COW here.
        """
        r = yield from self.rmap_walk_anon(t, pfn, "folio_referenced")
        if not r:
            return 0
        av, cands = r
        referenced = 0
        for vma, vpn in cands:
            got = yield from self._rmap_map_pte(t, vma, vpn, pfn, "folio_referenced_one")
            if got is None:
                continue
            table, ptl, off = got
            pte = int(table.entries[off])
            if pte & PTE_YOUNG:
                referenced += 1
                self.set_ptes(t, vma.mm, table, off, pte & ~PTE_YOUNG, "folio_referenced_one")
                # ptep_clear_flush_young: x86 skips the flush ("clearing the accessed bit
                # without a TLB flush doesn't cause data corruption", arch/x86/mm/
                # pgtable.c) and lets context switches and TLB capacity refresh A. A model
                # thread's TLB has neither, so the model flushes the page, as arm64's
                # ptep_clear_flush_young does: the next access walks and sets A again.
                self.flush_tlb_page(vma.mm, vpn)
            self.unlock(t, ptl, WRITE, "folio_referenced_one")
        self.unlock(t, av.lock, READ, "folio_referenced")
        return referenced
    def try_to_unmap(self, t: Thread, pfn: int, slot: int | None) -> Gen:
        """``try_to_unmap`` → ``try_to_unmap_one`` per mapping (mm/rmap.c, 6.2).

        Lazyfree (``slot is None``): discard a mapping only if the folio is clean and
        its refcount is just isolation + mappings; a dirty PTE or PG_dirty redirties it
        (PG_swapbacked set again) and the walk stops. Otherwise the folio is in the swap
        cache (``slot`` is ``folio->swap``) and each PTE becomes a swap entry for it::

            if (swap_duplicate(entry) < 0) { ... }
            ...
            if (anon_exclusive && page_try_share_anon_rmap(subpage)) {
                swap_free(entry);
                set_pte_at(mm, address, pvmw.pte, pteval);
                ret = false;
                page_vma_mapped_walk_done(&pvmw);
                break;
            }
            ...
            swp_pte = swp_entry_to_pte(entry);
            if (anon_exclusive)
                swp_pte = pte_swp_mkexclusive(swp_pte);

        ``page_try_share_anon_rmap`` clears ``PageAnonExclusive`` (fails on a maybe-pinned
        page): exclusivity now lives in the swap PTE. The data is written later by
        ``pageout`` (:mod:`cowenv.kernel.vmscan`); the swap cache keeps the folio.
        """
        pool = self.pool
        r = yield from self.rmap_walk_anon(t, pfn, "try_to_unmap")
        if not r:
            return
        av, cands = r
        for vma, vpn in cands:
            got = yield from self._rmap_map_pte(t, vma, vpn, pfn, "try_to_unmap_one")
            if got is None:
                continue
            table, ptl, off = got
            mm = vma.mm
            pte = int(table.entries[off])
            if pte & PTE_DIRTY:
                pool.flags[pfn] |= PG_dirty
            if slot is None:
                lazy = not int(pool.flags[pfn]) & PG_swapbacked
                if lazy and int(pool.refcount[pfn]) == 1 + int(pool.mapcount[pfn]) and not (
                        int(pool.flags[pfn]) & PG_dirty):
                    self.set_ptes(t, mm, table, off, 0, "try_to_unmap_one")
                    self.flush_tlb_page(mm, vpn)  # ptep_clear_flush
                    self.cost.charge("pte_write")
                    self.cost.charge("page_account")
                    mm.rss[MM_ANONPAGES] -= 1
                    self.page_remove_rmap(np.array([pfn]), "try_to_unmap_one")
                    self.put_page(pfn, "try_to_unmap_one")
                    self.unlock(t, ptl, WRITE, "try_to_unmap_one")
                    continue
                pool.flags[pfn] |= PG_swapbacked
                self.unlock(t, ptl, WRITE, "try_to_unmap_one")
                break
            excl = bool(int(pool.flags[pfn]) & PG_anon_exclusive)
            if excl and int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:
                # page_try_share_anon_rmap() fails on a maybe-pinned exclusive page (a
                # pin taken since shrink_folio checked): restore and stop (mm/rmap.c).
                self.unlock(t, ptl, WRITE, "try_to_unmap_one")
                break
            # if (pte_soft_dirty(pteval)) swp_pte = pte_swp_mksoft_dirty(swp_pte);
            self.set_ptes(t, mm, table, off,
                          swp_entry_to_pte(slot, excl) | (pte & PTE_SOFT_DIRTY),
                          "try_to_unmap_one")
            # ptep_clear_flush. 6.2 reclaim defers it (TTU_BATCH_FLUSH, try_to_unmap_flush
            # before pageout/free); flushing here is what that guarantees before the folio
            # is written or freed.
            self.flush_tlb_page(mm, vpn)
            if excl:
                pool.flags[pfn] &= ~np.int64(PG_anon_exclusive)  # page_try_share_anon_rmap
            self.cost.charge("pte_write")
            self.cost.charge("page_account")
            self.swap_duplicate(slot)
            mm.rss[MM_ANONPAGES] -= 1
            mm.rss[MM_SWAPENTS] += 1
            self.page_remove_rmap(np.array([pfn]), "try_to_unmap_one")
            self.put_page(pfn, "try_to_unmap_one")
            self.unlock(t, ptl, WRITE, "try_to_unmap_one")
        self.unlock(t, av.lock, READ, "try_to_unmap")
