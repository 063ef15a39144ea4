"""madvise: ``mm/madvise.c`` of 6.2.

DONTNEED (zap, mmap_lock read), FREE (``madvise_free_pte_range``: clear dirty/young,
mark lazyfree), PAGEOUT (``madvise_pageout_page_range``: reclaim now), and the VMA-flag
advices WIPEONFORK / KEEPONFORK / DONTFORK / DOFORK (mmap_lock write). The COW PTE patch
breaks shared tables through ``cow_madvise_break``.
"""

from __future__ import annotations

import numpy as np

from .locks import READ, WRITE
from .memory import (
    PG_anon,
    PG_dirty,
    PG_locked,
    PG_swapbacked,
    PG_swapcache,
)
from .mm import (
    MM_SWAPENTS,
    VM_DONTCOPY,
    VM_WIPEONFORK,
    Vma,
)
from .ops import EINVAL, ENOMEM
from .pgtable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_SWAP,
    PTE_YOUNG,
    ZERO_PFN,
)
from .sched import Gen, Thread


class MadviseMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def sys_madvise(self, t: Thread, addr: int, length: int, advice: str) -> Gen:
        """``madvise``: DONTNEED/FREE/PAGEOUT under mmap_lock read, the fork advice under write.

        DONTNEED/FREE/PAGEOUT run under mmap_lock read (``madvise_need_mmap_write`` is 0 for
        them); WIPEONFORK/KEEPONFORK/DONTFORK/DOFORK change vm_flags under write.

        Returns -ENOMEM if the range has holes, -EINVAL for advice not applicable.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        write = advice in ("WIPEONFORK", "KEEPONFORK", "DONTFORK", "DOFORK")
        mode = WRITE if write else READ
        yield from self.lock(t, mm.mmap_lock, mode, "do_madvise")
        vmas = mm.vmas_in(start, end)
        covered = sum(min(v.end, end) - max(v.start, start) for v in vmas)
        ret = 0
        if write:
            if covered == 0:
                ret = -ENOMEM
            else:
                def newflags(f: int) -> int:
                    if advice == "WIPEONFORK":
                        return f | VM_WIPEONFORK
                    if advice == "KEEPONFORK":
                        return f & ~VM_WIPEONFORK
                    if advice == "DONTFORK":
                        return f | VM_DONTCOPY
                    return f & ~VM_DONTCOPY

                # madvise_update_vma: a VMA whose flags do not change is not split.
                for v in mm.vmas_in(start, end):
                    yield from self.vma_start_write(t, v)
                # madvise_walk_vmas visits the VMAs in order and returns at the first
                # error: WIPEONFORK on a shared VMA fails after the VMAs before it changed.
                stop = end
                for v in mm.vmas_in(start, end):
                    if advice == "WIPEONFORK" and v.shared:
                        ret = -EINVAL  # madvise_vma_behavior: only private anonymous
                        stop = max(v.start, start)
                        break
                    if newflags(v.flags) != v.flags:
                        at0 = max(v.start, start)
                        if v.start < start:
                            v = yield from self.split_vma_checked(t, mm, v, start)
                        if not isinstance(v, int) and end < v.end:
                            r = yield from self.split_vma_checked(t, mm, v, end)
                            if isinstance(r, int):
                                v = r
                        if isinstance(v, int):
                            # madvise_update_vma → split_vma failed (COW PTE's break)
                            ret, stop = v, at0  # the VMAs before it changed
                            break
                        v.flags = newflags(v.flags)
                if self.oracle is not None and stop > start:
                    self.oracle.on_madvise_flags(mm, start, stop, advice)
                if ret == 0 and covered != end - start:
                    ret = -ENOMEM
            self.mmap_write_unlock(t, mm, "do_madvise")
            return ret
        if self.oracle is not None:
            self.oracle.on_madvise_begin(mm, start, end, advice)
        for v in vmas:
            s, e = max(v.start, start), min(v.end, end)
            if advice == "DONTNEED":
                yield from self.zap_page_range(t, v, s, e)
            elif advice == "FREE":
                if v.shared:
                    ret = -EINVAL  # madvise_walk_vmas returns at the first error
                    break
                yield from self.madvise_free_range(t, v, s, e)
            elif advice == "PAGEOUT":
                yield from self.madvise_pageout_range(t, v, s, e)
        if covered != end - start and ret == 0:
            ret = -ENOMEM
        if self.oracle is not None:
            self.oracle.on_madvise_end(mm, start, end, advice)
        self.unlock(t, mm.mmap_lock, READ, "do_madvise")
        return ret
    def madvise_free_range(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``madvise_free_pte_range`` (6.2), vectorised per table.

        Swap entries are dropped (``free_swap_and_cache``, so a later access reads
        zero). For present anon pages: a PG_dirty page shared with others
        (``folio_mapcount != 1``) is skipped; otherwise young/dirty are cleared in the
        PTE, PG_dirty is cleared and the folio is marked lazyfree (``!PG_swapbacked``).

        Lock contract: mmap_lock read; takes the PTL.
        """
        mm = vma.mm
        P = self.P
        pool = self.pool
        tlb = self.tlb_gather_mmu(t, mm)  # madvise_free_single_vma
        for idx in range(start // P, (end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            ret = yield from self.cow_madvise_break(t, vma, idx, "madvise_free_pte_range")
            if ret:
                continue  # v4: "goto next" on failure (the PMD is skipped)
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            got = yield from self.pte_offset_map_lock(t, mm, idx, "madvise_free_pte_range")
            if got is None:
                continue
            table, ptl = got
            e = table.entries[lo:hi]
            new = e.copy()
            swp = (e & PTE_SWAP) != 0
            if np.count_nonzero(swp):
                for s in (e[swp] >> PFN_SHIFT).tolist():
                    self.free_swap_and_cache(int(s), "madvise_free_pte_range")
                mm.rss[MM_SWAPENTS] -= int(np.count_nonzero(swp))
                new[swp] = 0
            pfn = np.where((e & PTE_PRESENT) != 0, e >> PFN_SHIFT, 0)
            fl = pool.flags[pfn]
            cand = (pfn != ZERO_PFN) & ((fl & PG_anon) != 0)
            # 6.2: if (folio_test_swapcache(folio) || folio_test_dirty(folio)) {
            #     if (folio_mapcount(folio) != 1) continue;  /* shared: keep dirty */
            #     if (folio_test_swapcache(folio) && !folio_free_swap(folio)) continue;
            #     folio_clear_dirty(folio); }
            busy = cand & ((fl & (PG_dirty | PG_swapcache)) != 0)
            # folio_trylock fails (reclaim holds it) or shared: continue
            skip = busy & (((fl & PG_locked) != 0) | (pool.mapcount[pfn] != 1))
            for i in (busy & ~skip & ((fl & PG_swapcache) != 0)).nonzero()[0].tolist():
                if not self.folio_free_swap(int(pfn[i])):
                    skip[i] = True
            sel = cand & ~skip
            if np.count_nonzero(sel):
                new[sel] &= ~np.int64(PTE_DIRTY | PTE_YOUNG)
                ps = pfn[sel]
                pool.flags[ps] &= ~np.int64(PG_dirty | PG_swapbacked)
            if np.count_nonzero(new != e):
                self.cost.charge("pte_write", int(np.count_nonzero(new != e)))
                self.set_ptes(t, mm, table, lo, new, "madvise_free_pte_range")
                tlb.add_range(idx * P + lo, idx * P + hi)  # tlb_remove_tlb_entry
            self.unlock(t, ptl, WRITE, "madvise_free_pte_range")
            yield "madvise_free_pte_range:table_done"
        self.tlb_finish_mmu(t, tlb)
        return 0
    def madvise_pageout_range(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``madvise_cold_or_pageout_pte_range`` + ``reclaim_pages``: reclaim unshared pages.

        Isolate every present anon page mapped only here (``folio_mapcount == 1``) and
        reclaim it ignoring references.

        Lock contract: mmap_lock read; takes the PTL, then reclaim takes anon_vma locks.
        """
        mm = vma.mm
        P = self.P
        pool = self.pool
        isolated: list[int] = []
        for idx in range(start // P, (end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            ret = yield from self.cow_break_for_walker(t, vma, idx, "madvise_cold_or_pageout")
            if ret:
                # v4: madvise_cold_or_pageout_pte_range "return 0" on failure: this PMD
                # is skipped and walk_page_range goes on with the next one.
                continue
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            got = yield from self.pte_offset_map_lock(t, mm, idx, "madvise_cold_or_pageout")
            if got is None:
                continue
            table, ptl = got
            e = table.entries[lo:hi]
            pfn = np.where((e & PTE_PRESENT) != 0, e >> PFN_SHIFT, 0)
            fl = pool.flags[pfn]
            sel = (pfn != ZERO_PFN) & ((fl & PG_anon) != 0) & (pool.mapcount[pfn] == 1) & (
                pool.lru_seq[pfn] >= 0)
            for p in pfn[sel].tolist():
                self.folio_isolate_lru(p)
                isolated.append(p)
            self.unlock(t, ptl, WRITE, "madvise_cold_or_pageout")
        for p in isolated:
            yield from self.shrink_folio(t, p, ignore_references=True)
        return 0
