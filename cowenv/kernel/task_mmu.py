"""``/proc/PID/clear_refs`` and ``/proc/PID/pagemap``: ``fs/proc/task_mmu.c`` of 6.2.

``clear_refs_write`` → ``walk_page_range`` → ``clear_refs_pte_range``: writing 1 (all),
2 (anonymous) or 3 (file-mapped) clears the accessed bits; writing 4
(``CLEAR_REFS_SOFT_DIRTY``) clears every VMA's ``VM_SOFTDIRTY`` and every entry's
soft-dirty bit, write-protecting present entries so that the next write faults and marks
the entry soft-dirty again (``Documentation/admin-guide/mm/soft-dirty.rst``), then
``flush_tlb_mm``. COW PTE v4 12/14 breaks a shared table first, for type 4 only::

    /* Only break COW when we modify the soft-dirty bit. */
    if (cp->type == CLEAR_REFS_SOFT_DIRTY &&
        break_cow_pte(vma, pmd, addr))
            return 0;

A failed break skips the PMD: its entries keep their soft-dirty bits, so pagemap reports
pages soft-dirty that were not written since the clear -- a false positive, which the
soft-dirty contract tolerates (a tracker copies more than it had to), so not a flaw.
Types 1-3 write only accessed bits, which DH's shared-table check allows.

``pagemap_read`` for one page (``pte_to_pagemap_entry``, ``pagemap_pte_hole``) returns
the entry's flag bits 55-63 shifted down by 55 (:data:`PM_SOFT_DIRTY` ...): the frame
number is zero for a reader without ``CAP_SYS_ADMIN`` (``pm->show_pfn``).

Simplified: type 5 (``CLEAR_REFS_MM_HIWATER_RSS``) is rejected with -EINVAL (the model
keeps no ``hiwater_rss``); ``PG_referenced``/``PG_young`` page flags do not exist here.
"""

from __future__ import annotations

import numpy as np

from .locks import READ, WRITE
from .memory import PG_anon
from .mm import MMF_HAS_PINNED, VM_SOFTDIRTY, MmStruct, Vma
from .ops import EINVAL, ESRCH
from .pgtable import (
    PFN_SHIFT,
    PTE_PRESENT,
    PTE_SOFT_DIRTY,
    PTE_SWAP,
    PTE_WRITE,
    PTE_YOUNG,
    ZERO_PFN,
)
from .sched import Gen, Thread

#: ``enum clear_refs_types``.
CLEAR_REFS_ALL = 1
CLEAR_REFS_ANON = 2
CLEAR_REFS_MAPPED = 3
CLEAR_REFS_SOFT_DIRTY = 4

#: pagemap flag bits (``PM_*`` of fs/proc/task_mmu.c) after the shift by 55.
PM_SOFT_DIRTY = 1 << 0  # bit 55
PM_MMAP_EXCLUSIVE = 1 << 1  # bit 56
PM_FILE = 1 << 6  # bit 61
PM_SWAP = 1 << 7  # bit 62
PM_PRESENT = 1 << 8  # bit 63


class TaskMmuMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def _proc_mm(self, t: Thread, pid: int) -> MmStruct | None:
        """``get_proc_task`` + ``get_task_mm``: the mm of ``pid`` (0 = the caller's)."""
        p = self.procs.get(pid or t.pid)
        if p is None or not p.alive:
            return None
        return p.mm

    def sys_clear_refs(self, t: Thread, type: int = CLEAR_REFS_SOFT_DIRTY,  # noqa: A002
                       pid: int = 0) -> Gen:
        """``clear_refs_write``: ``echo TYPE > /proc/PID/clear_refs`` (6.2).

        ::

            if (mmap_write_lock_killable(mm)) ...
            if (type == CLEAR_REFS_SOFT_DIRTY) {
                mas_for_each(&mas, vma, ULONG_MAX) {
                    if (!(vma->vm_flags & VM_SOFTDIRTY))
                        continue;
                    vma->vm_flags &= ~VM_SOFTDIRTY;
                    vma_set_page_prot(vma);
                }
                inc_tlb_flush_pending(mm);
                ...
            }
            walk_page_range(mm, 0, -1, &clear_refs_walk_ops, &cp);
            if (type == CLEAR_REFS_SOFT_DIRTY) {
                ...
                flush_tlb_mm(mm);
                dec_tlb_flush_pending(mm);
            }
            mmap_write_unlock(mm);

        Returns 0 (the write's count), -EINVAL for a type other than 1-4, -ESRCH if
        ``pid`` is not a live process.

        Lock contract: takes the target mm's mmap_lock for write; the PTLs inside.
        """
        if type not in (CLEAR_REFS_ALL, CLEAR_REFS_ANON, CLEAR_REFS_MAPPED,
                        CLEAR_REFS_SOFT_DIRTY):
            return -EINVAL
        mm = self._proc_mm(t, pid)
        if mm is None:
            return -ESRCH
        yield from self.lock(t, mm.mmap_lock, WRITE, "clear_refs_write")
        soft = type == CLEAR_REFS_SOFT_DIRTY
        if soft:
            for v in mm.vmas:
                v.flags &= ~VM_SOFTDIRTY
            self.tlb_flush_pending_begin(mm)  # inc_tlb_flush_pending(mm)
        for v in list(mm.vmas):
            # clear_refs_test_walk: shmem VMAs have a vm_file.
            if (type == CLEAR_REFS_ANON and v.shared) or (
                    type == CLEAR_REFS_MAPPED and not v.shared):
                continue
            yield from self.clear_refs_vma(t, v, type)
        if soft:
            self.flush_tlb_mm(mm)
            self.tlb_flush_pending_end(mm)  # dec_tlb_flush_pending(mm)
        self.mmap_write_unlock(t, mm, "clear_refs_write")
        return 0

    def clear_refs_vma(self, t: Thread, vma: Vma, type: int) -> Gen:  # noqa: A002
        """``walk_page_range`` over one VMA: ``clear_refs_pte_range`` per populated PMD.

        ``clear_soft_dirty`` (type 4)::

            if (pte_present(ptent)) {
                if (pte_is_pinned(vma, addr, ptent))
                    return;
                old_pte = ptep_modify_prot_start(vma, addr, pte);
                ptent = pte_wrprotect(old_pte);
                ptent = pte_clear_soft_dirty(ptent);
                ptep_modify_prot_commit(vma, addr, pte, old_pte, ptent);
            } else if (is_swap_pte(ptent)) {
                ptent = pte_swp_clear_soft_dirty(ptent);
                set_pte_at(vma->vm_mm, addr, pte, ptent);
            }

        where ``pte_is_pinned`` is ``pte_write && is_cow_mapping && MMF_HAS_PINNED &&
        page_maybe_dma_pinned``. Types 1-3: ``ptep_test_and_clear_young`` on present
        entries of normal pages (``vm_normal_page``: not the zero page).

        Lock contract: mmap_lock write; takes each table's PTL.
        """
        mm = vma.mm
        P = self.P
        soft = type == CLEAR_REFS_SOFT_DIRTY
        for idx in range(vma.start // P, (vma.end - 1) // P + 1):
            if idx not in mm.pmd:
                continue  # walk_page_range: pte_hole
            if soft:
                ret = yield from self.cow_break_for_walker(t, vma, idx, "clear_refs_pte_range")
                if ret:
                    continue  # v4 12/14: `return 0;` for this PMD
            got = yield from self.pte_offset_map_lock(t, mm, idx, "clear_refs_pte_range")
            if got is None:
                continue
            table, ptl = got
            lo = max(vma.start, idx * P) - idx * P
            hi = min(vma.end, (idx + 1) * P) - idx * P
            e = table.entries[lo:hi]
            present = (e & PTE_PRESENT) != 0
            pfn = np.where(present, e >> PFN_SHIFT, 0)
            new = e.copy()
            if soft:
                pinned = present & ((e & PTE_WRITE) != 0)
                if vma.shared or not mm.flags & MMF_HAS_PINNED:
                    pinned[:] = False
                else:
                    pinned &= (pfn != ZERO_PFN) & self.page_maybe_dma_pinned(pfn)
                pres = present & ~pinned
                new[pres] &= ~np.int64(PTE_WRITE | PTE_SOFT_DIRTY)
                swp = (e & PTE_SWAP) != 0
                new[swp] &= ~np.int64(PTE_SOFT_DIRTY)
            else:
                new[present & (pfn != ZERO_PFN)] &= ~np.int64(PTE_YOUNG)
            if np.count_nonzero(new != e):
                self.cost.charge("pte_write", int(np.count_nonzero(new != e)))
                self.set_ptes(t, mm, table, lo, new, "clear_refs_pte_range")
            self.unlock(t, ptl, WRITE, "clear_refs_pte_range")
            yield "clear_refs_pte_range:table_done"
        return 0

    def sys_pagemap(self, t: Thread, addr: int, pid: int = 0) -> Gen:
        """Read the ``/proc/PID/pagemap`` entry of ``addr`` (``pagemap_read``, 6.2).

        Returns the entry's bits 55-63 shifted down by 55 (:data:`PM_SOFT_DIRTY` = 1,
        :data:`PM_MMAP_EXCLUSIVE` = 2, :data:`PM_FILE` = 64, :data:`PM_SWAP` = 128,
        :data:`PM_PRESENT` = 256), or -ESRCH. ``pte_to_pagemap_entry``: a present (or
        protnone) entry is ``PM_PRESENT``, soft-dirty if ``pte_soft_dirty``; a swap entry
        ``PM_SWAP``, soft-dirty if ``pte_swp_soft_dirty``; ``PM_FILE`` for a non-anon
        page; ``PM_MMAP_EXCLUSIVE`` if ``page_mapcount(page) == 1``; and every entry of a
        VMA with ``VM_SOFTDIRTY`` is soft-dirty (also a hole, ``pagemap_pte_hole``).
        Outside any VMA the entry is 0.

        Lock contract: takes mmap_lock for read, then the PTL.
        """
        mm = self._proc_mm(t, pid)
        if mm is None:
            return -ESRCH
        vpn = addr // self.config.page_size
        yield from self.lock(t, mm.mmap_lock, READ, "pagemap_read")
        vma = mm.find_vma(vpn)
        flags = 0
        if vma is not None:
            if vma.flags & VM_SOFTDIRTY:
                flags |= PM_SOFT_DIRTY
            idx, off = divmod(vpn, self.P)
            got = yield from self.pte_offset_map_lock(t, mm, idx, "pagemap_pmd_range")
            if got is not None:
                table, ptl = got
                pte = int(table.entries[off])
                self.unlock(t, ptl, WRITE, "pagemap_pmd_range")
                if pte & PTE_SOFT_DIRTY:
                    flags |= PM_SOFT_DIRTY
                if pte & PTE_PRESENT:
                    flags |= PM_PRESENT
                    pfn = pte >> PFN_SHIFT
                    if pfn != ZERO_PFN:
                        if not int(self.pool.flags[pfn]) & PG_anon:
                            flags |= PM_FILE
                        if int(self.pool.mapcount[pfn]) == 1:
                            flags |= PM_MMAP_EXCLUSIVE
                elif pte & PTE_SWAP:
                    flags |= PM_SWAP
        self.unlock(t, mm.mmap_lock, READ, "pagemap_read")
        return flags
