"""Page and page-table primitives: allocate, free, reference, write PTEs.

Models ``alloc_pages`` / ``__free_pages`` (``mm/page_alloc.c``), ``put_page`` /
``folio_put`` (``mm/swap.c``), ``pte_alloc_one`` / ``pte_free`` (``include/asm-generic/
pgalloc.h``; ``tlb_remove_table``'s deferral is in :mod:`cowenv.kernel.tlb`),
``pmd_populate``, ``set_ptes`` (``include/linux/pgtable.h``) and
``page_maybe_dma_pinned`` (``include/linux/mm.h``). Semantics of 6.2. Data pages and
table pages come from one frame pool (:mod:`cowenv.kernel.memory`), so ``fail_nth`` and
pool exhaustion hit both.
"""

from __future__ import annotations

import numpy as np

from .locks import SpinLock
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_anon,
    PG_swapcache,
    PG_table,
)
from .mm import (
    MmStruct,
)
from .pgtable import (
    PTE_DIRTY,
    PTE_YOUNG,
    PmdEntry,
    PteTable,
)
from .sched import Gen, Thread

#: What :meth:`PageAllocMixin.set_ptes` takes as one entry.
_INT_TYPES = (int, np.integer)


class PageAllocMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def alloc_pages(self, n: int, site: str, nofail: bool = False) -> np.ndarray | None:
        """``alloc_pages``: ``n`` frames, honouring ``fail_nth`` and pool exhaustion.

        ``nofail`` is *one attempt* of a ``__GFP_NOFAIL`` allocation: fault injection does
        not apply (as ``should_fail_alloc_page`` skips it), the memory reserve may be used
        (``__alloc_pages_cpuset_fallback(..., ALLOC_NO_WATERMARKS)``) and direct reclaim
        runs. It may still return None: only :meth:`pte_alloc_one_nofail`, the slow path's
        retry loop, gives ``__GFP_NOFAIL``'s guarantee, and callers needing it use that.
        The current thread's ``fail_nth`` (``/proc/thread-self/fail-nth``) is consulted
        first, then the kernel-wide pressure counter. ``alloc_fail_injected`` tells a
        failure's caller whether it was injected or the pool is exhausted (the fault
        path then calls the OOM killer; see :meth:`FaultMixin._user_access`).
        """
        if nofail:
            got = self.pool.take(n, reserve_ok=True)
            if got is None and self.swap.cache and self.drain_swap_cache():
                got = self.pool.take(n, reserve_ok=True)
            return got
        cur = self._cur
        # should_fail_alloc_page → should_fail_ex: current->fail_nth first (per task).
        if cur is not None and cur.fail_nth > 0:
            cur.fail_nth -= 1
            if cur.fail_nth == 0:
                self._ev(cur.tid, "event", "alloc_fail", site)
                self.alloc_fail_injected = True
                return None
        if self.fail_nth > 0:
            self.fail_nth -= 1
            if self.fail_nth == 0:
                self._ev(cur.tid if cur else -1, "event", "alloc_fail", site)
                self.alloc_fail_injected = True
                return None
        self.alloc_fail_injected = False
        got = self.pool.take(n)
        if got is None and self.swap.cache and self.drain_swap_cache():
            got = self.pool.take(n)  # direct reclaim freed swap-cache-only folios
        return got
    def alloc_page(self, site: str) -> int | None:
        """One frame or None."""
        p = self.alloc_pages(1, site)
        return None if p is None else int(p[0])
    def pte_alloc_one(self, mm: MmStruct, site: str) -> PteTable | None:
        """``pte_alloc_one`` + ``pgtable_pte_page_ctor``: a zeroed table, refcount 1."""
        pfn = self.alloc_page(site)
        return None if pfn is None else self._pte_page_ctor(pfn)
    def pte_alloc_one_nofail(self, t: Thread, mm: MmStruct, site: str) -> Gen:
        """``pte_alloc_one`` with ``GFP_PGTABLE_USER | __GFP_NOFAIL``: never returns None.

        ``__alloc_pages_slowpath`` (``mm/page_alloc.c``, 6.2) never fails a
        ``__GFP_NOFAIL`` request: after reclaim it calls ``__alloc_pages_may_oom``, whose
        ``out_of_memory`` picks a victim (or, when a victim is already exiting or
        ``current`` is one, kills nothing), retries with ``ALLOC_NO_WATERMARKS``, and
        otherwise ``cond_resched(); goto retry;`` — forever. Modelled as that loop: an
        attempt (:meth:`alloc_pages` with ``nofail``: reserve + reclaim), then
        :meth:`~cowenv.kernel.sched.SchedMixin.out_of_memory`, then a preemption point at
        which the victim's threads can run their exit, and again.

        Simplified: the model has no ``oom_reaper`` and no ``MMF_OOM_SKIP``, so if no
        process other than a victim that cannot exit (e.g. the caller's own, killed,
        process) can free memory, the loop spins until teardown's step cap and the
        episode ends "not quiescent" — visible, never a silent NULL. Callers on the exit
        path must not need it (see ``cowpte:cow_zap_hook``), as upstream's
        ``exit_mmap`` allocates nothing.
        """
        while True:
            got = self.alloc_pages(1, site, nofail=True)
            if got is not None:
                return self._pte_page_ctor(int(got[0]))
            self._ev(t.tid, "event", "nofail_retry", site)
            self.out_of_memory(t)  # __alloc_pages_may_oom
            yield "__alloc_pages_slowpath:nofail_retry"
    def _pte_page_ctor(self, pfn: int) -> PteTable:
        """``pgtable_pte_page_ctor`` on a fresh frame: a zeroed table, refcount 1."""
        self.pool.flags[pfn] |= PG_table
        self.cost.charge("table_alloc")
        ptl = SpinLock(f"ptl:{pfn}.{int(self.pool.gen[pfn])}", "ptl")
        table = PteTable(pfn, self.P, ptl, int(self.pool.gen[pfn]))
        self.tables[pfn] = table
        return table
    def pte_free(self, table: PteTable, site: str) -> None:
        """``pte_free``: return a table page to the allocator.

        With ``config.tlb`` this is the kernel's ``pte_free``: at once, for a table no
        PMD ever pointed at (``__pte_alloc``'s loser, a break's unused table); a table
        that was reachable is freed through :meth:`TlbMixin.tlb_remove_table` (after the
        flush and the GUP-fast grace period). Without the TLB model every table free
        waits for the GUP-fast walkers inside (the model before the TLB existed).
        """
        if table.freed:
            self._report("memory-safety", site, f"double free of page table {table.pfn}")
            return
        table.freed = True
        self.cost.charge("table_free")
        self.tables.pop(table.pfn, None)
        if self.gup_fast_walkers and not self.config.tlb:
            # tlb_remove_table() (mm/mmu_gather.c): a page table is freed only after an
            # RCU grace period / IPI, which a GUP-fast walker (IRQs off) holds off.
            self.deferred_tables.append(table)
            return
        self.pool.refcount[table.pfn] = 0
        self.pool.give_back_one(int(table.pfn))
    def pmd_populate(self, mm: MmStruct, idx: int, table: PteTable) -> None:
        """``pmd_populate`` + ``mm_inc_nr_ptes`` (``pmd_install``).

        Lock contract: caller holds ``mm->page_table_lock``.
        """
        mm.pmd[idx] = PmdEntry(table, True)
        mm.mm_inc_nr_ptes()
        self.cost.charge("pmd_update")
    def check_table_live(self, table: PteTable, site: str) -> bool:
        """Memory safety: a table about to be used must not have been freed."""
        if table.freed:
            self._report("memory-safety", site, f"use of freed page table {table.pfn}")
            return False
        return True
    def set_ptes(self, t: Thread | None, mm: MmStruct, table: PteTable, lo: int,
                 new: np.ndarray | int, site: str, hw: bool = False) -> None:
        """``set_pte_at`` for one or more consecutive entries starting at ``lo``.

        Checks, independently of any flaw: the table is alive (memory safety), the
        writer holds the table's PTL (lock discipline; ``hw`` = a hardware A/D-bit update,
        which needs no lock), and — DH's suggested sanity check — that a table with
        refcount > 1 is not modified except for the young bit.
        """
        if not self.check_table_live(table, site):
            return
        if not hw and t is not None and not self.holds(t, self.pte_lockptr(mm, table)):
            self._report("lock-discipline", site, f"PTE write to table {table.pfn} without its PTL")
        if isinstance(new, _INT_TYPES) and self.pool.SMALL_BATCH:
            # One entry: scalar reads and stores (what the one-element slices below do).
            e = table.entries
            if table.refcount > 1 and (t is None or t.tid != table.fork_tid):
                mask = ~(PTE_YOUNG | (PTE_DIRTY if hw else 0))
                if (int(e[lo]) ^ int(new)) & mask:
                    self._report("shared-table-write", site,
                                 f"modified 1 PTE(s) of table {table.pfn} shared by "
                                 f"{table.refcount} PMDs")
            e[lo] = new
            return
        if isinstance(new, _INT_TYPES):
            new = np.array([new], dtype=np.int64)
        old = table.entries[lo:lo + len(new)]
        if table.refcount > 1 and (t is None or t.tid != table.fork_tid):
            # The hardware walker's accessed/dirty-bit update is no software write; a walk
            # through a stale paging-structure-cache entry may set D in a table that fork
            # just shared (before its flush), harmlessly.
            changed = (old ^ new) & ~np.int64(PTE_YOUNG | (PTE_DIRTY if hw else 0))
            if np.count_nonzero(changed):
                self._report("shared-table-write", site,
                             f"modified {int(np.count_nonzero(changed))} PTE(s) of table "
                             f"{table.pfn} shared by {table.refcount} PMDs")
        table.entries[lo:lo + len(new)] = new
    def get_pages(self, pfns: np.ndarray, n: int = 1) -> None:
        """``get_page`` / ``folio_ref_add`` on each pfn."""
        np.add.at(self.pool.refcount, pfns, n)
    def put_pages(self, pfns: np.ndarray, site: str) -> None:
        """``put_page`` on each pfn; frees pages whose refcount reaches 0."""
        n = len(pfns)
        if n == 0:
            return
        pool = self.pool
        if n <= pool.SMALL_BATCH:  # scalar updates: the same checks, the same order
            flags, refc = pool.flags, pool.refcount
            live = []
            bad_p = -1
            for p in pfns.tolist():
                if int(flags[p]) & 1:
                    live.append(p)
                elif bad_p < 0:
                    bad_p = p
            if bad_p >= 0:
                self._report("memory-safety", site, f"put_page on free page {bad_p}")
            for p in live:
                refc[p] -= 1
            for p in live:
                if refc[p] < 0:
                    self._report("memory-safety", site, f"refcount underflow on page {p}")
                    break
            dead = sorted({p for p in live if refc[p] <= 0})  # == np.unique(dead)
            if dead:
                self.free_pages(np.array(dead, dtype=np.int64), site)
            return
        bad = pfns[(pool.flags[pfns] & 1) == 0]
        if len(bad):
            self._report("memory-safety", site, f"put_page on free page {int(bad[0])}")
            pfns = pfns[(pool.flags[pfns] & 1) != 0]
        np.subtract.at(pool.refcount, pfns, 1)
        rc = pool.refcount[pfns]
        if np.count_nonzero(rc < 0):
            self._report("memory-safety", site,
                         f"refcount underflow on page {int(pfns[rc < 0][0])}")
        dead = pfns[rc <= 0]
        if len(dead):  # (np.unique costs microseconds even on an empty array)
            self.free_pages(np.unique(dead), site)
    def put_page(self, pfn: int, site: str) -> None:
        """``put_page`` on one page (scalar fast path of :meth:`put_pages`)."""
        pool = self.pool
        if not int(pool.flags[pfn]) & 1:
            self._report("memory-safety", site, f"put_page on free page {pfn}")
            return
        rc = int(pool.refcount[pfn]) - 1
        pool.refcount[pfn] = rc
        if rc < 0:
            self._report("memory-safety", site, f"refcount underflow on page {pfn}")
        if rc <= 0:
            if pool.SMALL_BATCH:
                self._free_page(pfn, site)
            else:
                self.free_pages(np.array([pfn], dtype=np.int64), site)
    def free_pages(self, pfns: np.ndarray, site: str) -> None:
        """``free_unref_page``: drop from LRU, release swap-less state, return to pool."""
        if len(pfns) == 1 and self.pool.SMALL_BATCH:
            self._free_page(int(pfns[0]), site)
            return
        pool = self.pool
        mapped = pfns[pool.mapcount[pfns] > 0]
        if len(mapped):
            p = int(mapped[0])
            self._report("memory-safety", site, f"page {p} freed while mapped "
                         f"{int(pool.mapcount[p])} time(s)")
        sc = pfns[(pool.flags[pfns] & PG_swapcache) != 0]
        if len(sc):
            self._report("memory-safety", site, f"swap-cache page {int(sc[0])} freed while "
                         "the swap cache holds it")
            for p in sc.tolist():
                self.put_swap_folio(self._delete_from_swap_cache_xa(int(p)))
        for p in pfns[pool.shmem[pfns] >= 0].tolist():
            obj = self.shmem.get(int(pool.shmem[p]))
            if obj is not None and obj.pages.get(int(pool.index[p])) == p:
                del obj.pages[int(pool.index[p])]
        pool.refcount[pfns] = 0
        pool.give_back(pfns)
        self.cost.charge("page_free", len(pfns))
    def _free_page(self, p: int, site: str) -> None:
        """:meth:`free_pages` of one page (``p`` a Python int): the same checks and steps."""
        pool = self.pool
        mc = int(pool.mapcount[p])
        if mc > 0:
            self._report("memory-safety", site, f"page {p} freed while mapped {mc} time(s)")
        if int(pool.flags[p]) & PG_swapcache:
            self._report("memory-safety", site, f"swap-cache page {p} freed while "
                         "the swap cache holds it")
            self.put_swap_folio(self._delete_from_swap_cache_xa(p))
        sh = int(pool.shmem[p])
        if sh >= 0:
            obj = self.shmem.get(sh)
            if obj is not None and obj.pages.get(int(pool.index[p])) == p:
                del obj.pages[int(pool.index[p])]
        pool.refcount[p] = 0
        pool.give_back_one(p)
        self.cost.charge("page_free", 1)
    def is_anon(self, pfn: int) -> bool:
        """``PageAnon``."""
        return bool(int(self.pool.flags[pfn]) & PG_anon)
    def page_maybe_dma_pinned(self, pfns: np.ndarray) -> np.ndarray:
        """``page_maybe_dma_pinned`` for small folios: refcount >= GUP_PIN_COUNTING_BIAS."""
        return self.pool.refcount[pfns] >= GUP_PIN_COUNTING_BIAS
