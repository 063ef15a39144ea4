"""The TLB, the paging-structure cache and the mmu_gather.

Models ``mm/mmu_gather.c`` + ``include/asm-generic/tlb.h`` (the mmu_gather: pages and
page tables are freed only after the TLB flush) and the flush semantics of
``arch/x86/mm/tlb.c`` (``flush_tlb_mm_range``) of 6.2, with the MMU side of the user
access: every user thread (a CPU) caches translations, so a race with a missing or late
flush is expressible.

**What a CPU caches.** Per thread:

* ``t.tlb``: ``vpn -> (pfn, page generation, writable, dirty)``, filled by the MMU
  walk of a user access. ``writable`` is the combined R/W right of the PMD and the PTE
  (x86 ANDs the R/W bits of every level). A user access that hits uses the cached
  translation and does not read the page tables: no accessed/dirty-bit update, as on
  x86, except that a store through an entry cached with the dirty bit clear walks again
  (x86 re-walks to set D).
* ``t.psc``: the paging-structure cache, ``pmd index -> (table, table generation,
  PMD writable)``: the PMD → PTE-table translation a walk used. A TLB miss walks from
  the cached table, not from the PMD.

A page fault invalidates the faulting address's TLB entry and paging-structure-cache
entries (Intel SDM vol. 3A §4.10.4.1 "operations that invalidate TLBs and
paging-structure caches"), so the fault handler's permission upgrades (COW reuse, the
COW PTE fast path, ``do_swap_page``) need no flush, as in Linux.

**Context switch** (a decision, documented in the README): a model thread is a CPU that
runs its process's mm for its whole life; there is no PCID and no lazy-TLB mode. A new
thread (clone, fork) starts with an empty TLB; an exiting thread's is dropped with it.
So ``mm_cpumask(mm)`` is the set of live threads of the mm's process.

**Flushes** (``flush_tlb_mm_range``, x86 6.2): synchronous on every thread of the mm (the
IPIs are waited for). A range of at most ``tlb_single_page_flush_ceiling`` (33) pages is
flushed page by page (``INVLPG``), a larger one entirely; either way every
paging-structure-cache entry of the mm goes, as ``INVLPG`` "invalidates all entries in
all paging-structure caches associated with the current PCID, regardless of the linear
addresses to which they correspond" (Intel SDM §4.10.4.1). That is Intel's rule; AMD's
differs and is not modelled.

**mmu_gather** (``tlb_gather_mmu`` → ``tlb_remove_page`` / ``pte_free_tlb`` →
``tlb_finish_mmu``): pages and tables given to a gather are freed after the flush of
the gathered range. Tables go through ``tlb_remove_table``: x86 6.2 selects
``CONFIG_MMU_GATHER_RCU_TABLE_FREE`` (with ``PARAVIRT``; without it the flush IPI that
GUP-fast's ``local_irq_save`` holds off does the same job), so a table is freed only
after the flush and after every GUP-fast walker in its IRQs-off section left (the
grace period). Simplifications: the gather never fills up (Linux flushes early when a
batch page cannot be allocated, and after ``MAX_GATHER_BATCH_COUNT`` batches); 6.2's
delayed rmap removal of dirty shared file pages is not modelled (rmap is removed at the
zap); reclaim's batched flush (``TTU_BATCH_FLUSH``, ``try_to_unmap_flush``) is the
immediate ``ptep_clear_flush``, which is what it guarantees before the page is freed.

**Pending flushes** (``inc_tlb_flush_pending`` / ``mm_tlb_flush_pending``): a gather
raises ``tlb_pending[mm]`` from ``tlb_gather_mmu`` to ``tlb_finish_mmu``; fork raises it
from the first write-protection to ``flush_tlb_mm(oldmm)`` (Linux relies on the mmap
write lock there). A store through a stale writable entry while a flush is pending is
the kernel's accepted race (the shadow oracles already allow the syscall's effect to
fall before or after such a store); one after the flush that should have removed the
entry is a violation.

**Oracles** (signatures; reported by the MMU model at the access, see
:meth:`TlbMixin.tlb_translate`):

* ``memory-safety@tlb_stale_entry``: an access through a TLB entry whose frame was
  freed or reallocated (the page was freed before the flush: the bug
  ``tlb_remove_page``'s batching exists to prevent).
* ``memory-safety@tlb_stale_table``: a walk through a paging-structure-cache entry
  whose table was freed or reallocated (a table freed without ``tlb_remove_table``).
* ``isolation@tlb_stale_write``: a store through a TLB entry whose translation the page
  tables no longer grant (the PTE or PMD was write-protected, cleared or changed — e.g.
  fork made the page COW-shared) with no flush pending for the mm.

The flush API for walkers (a small, stable surface): :meth:`TlbMixin.flush_tlb_range`,
:meth:`TlbMixin.flush_tlb_page`, :meth:`TlbMixin.flush_tlb_mm`,
:meth:`TlbMixin.tlb_gather_mmu` → :meth:`MmuGather.remove_pages`,
:meth:`MmuGather.remove_table`, :meth:`MmuGather.add_range` → :meth:`TlbMixin.tlb_finish_mmu`,
and :meth:`TlbMixin.tlb_remove_table` for a table freed outside a gather.
"""

from __future__ import annotations

import numpy as np

from .memory import PG_allocated
from .mm import MmStruct
from .pgtable import PFN_SHIFT, PTE_DIRTY, PTE_PRESENT, PTE_USER, PTE_WRITE, PTE_YOUNG, PteTable
from .sched import Thread

#: ``tlb_single_page_flush_ceiling`` (arch/x86/mm/tlb.c): above this many pages a
#: range flush is a full flush.
TLB_SINGLE_PAGE_FLUSH_CEILING = 33


class MmuGather:
    """``struct mmu_gather``: the range to flush and the pages/tables to free after it.

    Attributes:
        mm: The mm whose TLB entries are flushed.
        start: First virtual page number gathered (``tlb->start``).
        end: One past the last (``tlb->end``); ``start >= end`` means nothing to flush.
        pages: Batches of pages (``tlb_remove_page``), freed in gather order after the
            flush, one ``put_page`` each.
        tables: Tables (``tlb_remove_table``) freed after the flush and the grace period.
        freed_tables: ``tlb->freed_tables``.
    """

    __slots__ = ("mm", "start", "end", "pages", "tables", "freed_tables", "tid")

    def __init__(self, mm: MmStruct, tid: int) -> None:
        self.mm = mm
        self.start = 1 << 62
        self.end = 0
        self.pages: list[tuple[np.ndarray, str]] = []
        self.tables: list[PteTable] = []
        self.freed_tables = False
        self.tid = tid

    def add_range(self, start: int, end: int) -> None:
        """``tlb_flush_pte_range`` / ``tlb_remove_tlb_entry``: extend the flush range."""
        if start < self.start:
            self.start = start
        if end > self.end:
            self.end = end

    def remove_pages(self, pfns: np.ndarray, start: int, end: int, site: str) -> None:
        """``tlb_remove_page`` of ``pfns`` unmapped from ``[start, end)``: put after the flush."""
        self.add_range(start, end)
        if len(pfns):
            self.pages.append((pfns, site))

    def remove_table(self, table: PteTable, start: int, end: int) -> None:
        """``pte_free_tlb`` → ``tlb_remove_table``: the table is unlinked; free it later."""
        self.add_range(start, end)
        self.freed_tables = True
        self.tables.append(table)


class TlbMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    # ------------------------------------------------------------------ the MMU side
    def tlb_translate(self, t: Thread, mm: MmStruct, vpn: int, write: bool) -> int:
        """The MMU's translation of a user access with the TLB: a pfn, or -1 to fault.

        A hit uses the cached translation (no page-table read, no A/D update); a miss
        walks from the paging-structure cache (or the PMD, filling it), sets the
        accessed (and, for a store, dirty) bit in the PTE as the hardware walker does, and
        fills the TLB. A translation that does not permit the access invalidates the
        address's entries (the page fault does) and returns -1.
        """
        pool = self.pool
        e = t.tlb.get(vpn)
        if e is not None and (not write or (e[2] and e[3])):
            pfn = e[0]
            if pool.gen[pfn] != e[1] or not pool.flags[pfn] & PG_allocated:
                self._report("memory-safety", "tlb_stale_entry",
                             f"{'store' if write else 'load'} at page {vpn:#x} (mm{mm.id}) "
                             f"through a TLB entry for page {pfn}, freed or reused since")
            elif write:
                self._tlb_check_store(mm, vpn, pfn)
            return pfn
        P = self.P
        idx, off = divmod(vpn, P)
        ps = t.psc.get(idx)
        table = None
        if ps is not None:
            table, tgen, pmd_write = ps
            tp = table.pfn
            if pool.gen[tp] != tgen or not pool.flags[tp] & PG_allocated:
                self._report("memory-safety", "tlb_stale_table",
                             f"walk of page {vpn:#x} (mm{mm.id}) through a paging-structure "
                             f"cache entry for page table {tp}, freed or reused since")
                del t.psc[idx]
                table = None
            elif table.freed:
                # Unlinked, its free still pending behind the flush: the walker reads
                # the cleared entries and faults, and the fault drops the entry. Same
                # outcome as walking from the PMD now.
                del t.psc[idx]
                table = None
        if table is None:
            pmd = mm.pmd.get(idx)
            if pmd is None:
                t.tlb.pop(vpn, None)
                return -1
            table = pmd.table
            pmd_write = pmd.write
            if not self.check_table_live(table, "user_access"):
                return -2
            t.psc[idx] = (table, table.gen, pmd_write)
        pte = int(table.entries[off])
        if not (pte & PTE_PRESENT) or not (pte & PTE_USER) or (
                write and not (pte & PTE_WRITE and pmd_write)):
            # #PF: the faulting address's TLB and paging-structure entries are dropped.
            t.tlb.pop(vpn, None)
            t.psc.pop(idx, None)
            return -1
        pfn = pte >> PFN_SHIFT
        if not pool.flags[pfn] & PG_allocated:
            self._report("memory-safety", "user_access",
                         f"access to freed page {pfn} at {vpn * self.config.page_size:#x} "
                         f"(mm{mm.id})")
        bits = PTE_YOUNG | (PTE_DIRTY if write else 0)
        if pte | bits != pte:
            self.set_ptes(t, mm, table, off, pte | bits, "user_access", hw=True)
        t.tlb[vpn] = (pfn, int(pool.gen[pfn]), bool(pte & PTE_WRITE) and pmd_write,
                      write or bool(pte & PTE_DIRTY))
        return pfn

    def _tlb_check_store(self, mm: MmStruct, vpn: int, pfn: int) -> None:
        """Oracle ``isolation@tlb_stale_write`` for a store that hit a writable entry.

        The page tables must still grant the store to the same frame, unless a flush is
        pending for the mm (an operation between its PTE change and its flush: the
        kernel's accepted window).
        """
        if self.tlb_pending.get(mm.id, 0):
            return
        idx, off = divmod(vpn, self.P)
        pmd = mm.pmd.get(idx)
        ok = False
        if pmd is not None and pmd.write:
            pte = int(pmd.table.entries[off])
            ok = (pte & (PTE_PRESENT | PTE_USER | PTE_WRITE) == PTE_PRESENT | PTE_USER | PTE_WRITE
                  and pte >> PFN_SHIFT == pfn)
        if not ok:
            self._report("isolation", "tlb_stale_write",
                         f"store at page {vpn:#x} (mm{mm.id}) through a stale writable TLB "
                         f"entry for page {pfn}: the page tables no longer grant it and no "
                         "flush is pending")

    # ------------------------------------------------------------------ flushes
    def _mm_threads(self, mm: MmStruct) -> list[Thread]:
        """``mm_cpumask(mm)``: the live threads running ``mm``."""
        p = self.procs.get(mm.pid)
        if p is None or p.mm is not mm:
            return []
        return [self.threads[tid] for tid in p.tids]

    def flush_tlb_mm_range(self, mm: MmStruct, start: int, end: int,
                           freed_tables: bool = False) -> None:
        """``flush_tlb_mm_range`` (arch/x86/mm/tlb.c, 6.2) over pages ``[start, end)``.

        Every thread of the mm drops its entries in the range (all of them above the
        ceiling) and its whole paging-structure cache (``INVLPG``'s rule, see the
        module docstring). ``freed_tables`` also reaches lazy-TLB CPUs in Linux; the model
        has none, so it changes nothing here.
        """
        if not self.config.tlb or end <= start:
            return
        full = end - start > TLB_SINGLE_PAGE_FLUSH_CEILING
        for th in self._mm_threads(mm):
            tlb = th.tlb
            if full:
                tlb.clear()
            elif tlb:
                for v in range(start, end):
                    tlb.pop(v, None)
            th.psc.clear()

    def flush_tlb_range(self, mm: MmStruct, start: int, end: int) -> None:
        """``flush_tlb_range(vma, start, end)`` in pages."""
        self.flush_tlb_mm_range(mm, start, end)

    def flush_tlb_page(self, mm: MmStruct, vpn: int) -> None:
        """``flush_tlb_page`` (as in ``ptep_clear_flush``)."""
        self.flush_tlb_mm_range(mm, vpn, vpn + 1)

    def flush_tlb_mm(self, mm: MmStruct) -> None:
        """``flush_tlb_mm``: everything of the mm."""
        self.flush_tlb_mm_range(mm, 0, 1 << 62)

    def tlb_flush_pending_begin(self, mm: MmStruct) -> None:
        """``inc_tlb_flush_pending``: a PTE change whose flush comes later."""
        self.tlb_pending[mm.id] = self.tlb_pending.get(mm.id, 0) + 1

    def tlb_flush_pending_end(self, mm: MmStruct) -> None:
        """``dec_tlb_flush_pending``."""
        n = self.tlb_pending.get(mm.id, 0) - 1
        if n > 0:
            self.tlb_pending[mm.id] = n
        else:
            self.tlb_pending.pop(mm.id, None)

    # ------------------------------------------------------------------ mmu_gather
    def tlb_gather_mmu(self, t: Thread, mm: MmStruct) -> MmuGather:
        """``tlb_gather_mmu`` (``__tlb_gather_mmu`` does ``inc_tlb_flush_pending``).

        The gather is also the thread's current one (:meth:`tlb_current`) until
        :meth:`tlb_finish_mmu`, so that code called below it (``zap_pte_range``,
        ``free_pte_range``) finds it as Linux passes ``tlb`` down.
        """
        tlb = MmuGather(mm, t.tid)
        t.gathers.append(tlb)
        self.tlb_flush_pending_begin(mm)
        return tlb

    @staticmethod
    def tlb_current(t: Thread, mm: MmStruct) -> MmuGather | None:
        """The innermost gather ``t`` has open on ``mm``, if any."""
        for g in reversed(t.gathers):
            if g.mm is mm:
                return g
        return None

    def tlb_flush_mmu(self, tlb: MmuGather) -> None:
        """``tlb_flush_mmu``: flush the gathered range, then free pages and tables."""
        if tlb.end > tlb.start:
            self.flush_tlb_mm_range(tlb.mm, tlb.start, tlb.end, tlb.freed_tables)
        tlb.start, tlb.end = 1 << 62, 0
        pages, tlb.pages = tlb.pages, []
        for pfns, site in pages:
            self.put_pages(pfns, site)
        tables, tlb.tables = tlb.tables, []
        for table in tables:
            self._tlb_table_free(table)
        tlb.freed_tables = False

    def tlb_finish_mmu(self, t: Thread, tlb: MmuGather) -> None:
        """``tlb_finish_mmu``: :meth:`tlb_flush_mmu` and ``dec_tlb_flush_pending``."""
        self.tlb_flush_mmu(tlb)
        if tlb in t.gathers:
            t.gathers.remove(tlb)
        self.tlb_flush_pending_end(tlb.mm)

    def tlb_remove_pages(self, t: Thread, mm: MmStruct, pfns: np.ndarray, start: int,
                         end: int, site: str) -> None:
        """Unmapped pages: into the current gather, or flush now and put (``ptep_clear_flush``)."""
        tlb = self.tlb_current(t, mm) if self.config.tlb else None
        if tlb is not None:
            tlb.remove_pages(pfns, start, end, site)
            return
        self.flush_tlb_mm_range(mm, start, end)
        if len(pfns):
            self.put_pages(pfns, site)

    def tlb_remove_table(self, t: Thread, mm: MmStruct, table: PteTable, idx: int) -> None:
        """``pte_free_tlb`` → ``tlb_remove_table`` of an unlinked table of PMD ``idx``.

        Into the current gather if there is one; otherwise flushed now (``tlb_flush_pmd_range``
        + ``tlb_finish_mmu`` of a one-off gather). Either way the table is freed after the
        flush and after the GUP-fast grace period.
        """
        if table.freed:
            self._report("memory-safety", "tlb_remove_table",
                         f"double free of page table {table.pfn}")
            return
        table.freed = True
        self.tables.pop(table.pfn, None)
        self.cost.charge("table_free")
        P = self.P
        tlb = self.tlb_current(t, mm) if t is not None else None
        if tlb is not None:
            tlb.remove_table(table, idx * P, (idx + 1) * P)
            return
        self.flush_tlb_mm_range(mm, idx * P, (idx + 1) * P, True)
        self._tlb_table_free(table)

    def _tlb_table_free(self, table: PteTable) -> None:
        """``tlb_remove_table_rcu``: give the frame back once no GUP-fast walker is inside."""
        if self.gup_fast_walkers:
            self.deferred_tables.append(table)
            return
        self.pool.refcount[table.pfn] = 0
        self.pool.give_back_one(int(table.pfn))
