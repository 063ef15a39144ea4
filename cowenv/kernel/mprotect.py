"""mprotect: ``mm/mprotect.c`` of 6.2.

``do_mprotect_pkey`` → ``change_protection`` → ``change_pte_range``.
mmap_lock held for write; VMAs split at the range's ends; PTEs changed under the PTL.
The COW PTE patch breaks shared tables first (``cow_mprotect_prepare``,
``cow_break_for_walker``) and decides what a failed break does
(``cow_change_prot_failed``).
"""

from __future__ import annotations

import numpy as np

from .locks import WRITE
from .memory import (
    PG_anon,
    PG_anon_exclusive,
)
from .mm import (
    VM_READ,
    VM_SOFTDIRTY,
    VM_WRITE,
    MmStruct,
    Vma,
)
from .ops import ENOMEM, parse_prot
from .pgtable import (
    PFN_SHIFT,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SOFT_DIRTY,
    PTE_SWP_EXCLUSIVE,
    PTE_USER,
    PTE_WRITE,
    ZERO_PFN,
)
from .sched import Gen, Thread


class MprotectMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def sys_mprotect(self, t: Thread, addr: int, length: int, prot: str) -> Gen:
        """``mprotect`` → ``mprotect_fixup`` → ``change_protection`` per VMA.

        Returns -ENOMEM if part of the range is unmapped, after changing the VMAs before
        the first hole (as the kernel does; nothing changes if the range starts in one).

        Lock contract: mmap_lock write; takes each table's PTL.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        bits = parse_prot(prot)
        yield from self.lock(t, mm.mmap_lock, WRITE, "do_mprotect_pkey")
        # A hole at the start: nothing changes. A hole further on: the VMAs before it
        # are changed, then -ENOMEM (do_mprotect_pkey's loop stops at the hole).
        hole = start
        for v in mm.vmas_in(start, end):
            if v.start > hole:
                break
            hole = min(v.end, end)
        if hole == start:
            self.mmap_write_unlock(t, mm, "do_mprotect_pkey")
            return -ENOMEM
        end, partial = hole, hole < end
        # mprotect_fixup: a VMA whose flags do not change is neither split nor walked.
        newf = (VM_READ if bits & 1 else 0) | (VM_WRITE if bits & 2 else 0)
        for v in mm.vmas_in(start, end):
            yield from self.vma_start_write(t, v)
        for v in mm.vmas_in(start, end):
            if v.flags & (VM_READ | VM_WRITE) != newf:
                if v.start < start:
                    v = yield from self.split_vma_checked(t, mm, v, start)
                if not isinstance(v, int) and end < v.end:
                    v = yield from self.split_vma_checked(t, mm, v, end)
                if isinstance(v, int):
                    # mprotect_fixup → split_vma failed (COW PTE's break): -ENOMEM.
                    # Simplification: the model splits every VMA before changing any,
                    # so no VMA has changed yet (the kernel changes those before it).
                    self.mmap_write_unlock(t, mm, "do_mprotect_pkey")
                    return v
        vmas = [v for v in mm.vmas_in(start, end) if v.flags & (VM_READ | VM_WRITE) != newf]
        ret = yield from self.cow_mprotect_prepare(t, mm, start, end)
        if ret:
            self.mmap_write_unlock(t, mm, "do_mprotect_pkey")
            return ret
        if self.oracle is not None:
            self.oracle.on_mprotect_begin(mm, start, end, bits)
        # 6.2 do_mprotect_pkey: tlb_gather_mmu(&tlb, current->mm); ... mprotect_fixup(&tlb,
        # ...) per VMA ...; tlb_finish_mmu(&tlb) (mm/mprotect.c, mmu_gather since 6.0).
        tlb = self.tlb_gather_mmu(t, mm)
        for v in vmas:
            # mprotect_fixup: "vma->vm_flags = newflags; ... vma_set_page_prot(vma);
            # change_protection(...)": the new protection is visible to rmap walkers
            # (remove_migration_pte's mk_pte(new, READ_ONCE(vma->vm_page_prot))) before
            # the PTEs change. The model's change_protection may fail (the fixed COW
            # PTE design); then the old flags come back.
            old_flags = v.flags
            v.flags = (v.flags & ~(VM_READ | VM_WRITE)) | (VM_READ if bits & 1 else 0) | (
                VM_WRITE if bits & 2 else 0)
            r = yield from self.change_protection(t, v, bits)
            if r < 0:
                v.flags = old_flags
                ret = r
                break
        self.tlb_finish_mmu(t, tlb)
        if self.oracle is not None:
            if ret == 0:
                self.oracle.on_mprotect(t, mm, start, end, bits)
            else:
                self.oracle.on_mprotect_failed(mm, start, end, bits)
        self.mmap_write_unlock(t, mm, "do_mprotect_pkey")
        return -ENOMEM if ret == 0 and partial else ret
    def vm_page_prot_writable(self, vma: Vma) -> bool:
        """Whether ``vma->vm_page_prot`` is writable (``vma_set_page_prot``, 6.2).

        Only for a shared writable VMA that wants no write-notify: shmem, unless
        soft-dirty tracking is on (``vma_wants_writenotify``: ``if
        (vma_soft_dirty_enabled(vma) && !is_vm_hugetlb_page(vma)) return 1;``). A private
        VMA's ``vm_page_prot`` is never writable (``PAGE_COPY``): COW.
        """
        return bool(vma.shared and vma.flags & VM_WRITE and vma.flags & VM_SOFTDIRTY)
    def can_change_pte_writable(self, vma: Vma, pte: int) -> bool:
        """``can_change_pte_writable`` (mm/mprotect.c, 6.2) for one non-writable entry.

        ::

            if (pte_protnone(pte)) return false;
            /* Do we need write faults for softdirty tracking? */
            if (vma_soft_dirty_enabled(vma) && !pte_soft_dirty(pte)) return false;
            ...
            if (!(vma->vm_flags & VM_SHARED)) {
                page = vm_normal_page(vma, addr, pte);
                if (!page || !PageAnon(page) || !PageAnonExclusive(page)) return false;
            }
            return true;
        """
        if not pte & PTE_PRESENT or not pte & PTE_USER:
            return False
        if not vma.flags & VM_SOFTDIRTY and not pte & PTE_SOFT_DIRTY:
            return False
        if vma.shared:
            return True
        pfn = pte >> PFN_SHIFT
        fl = int(self.pool.flags[pfn])
        return pfn != ZERO_PFN and bool(fl & PG_anon) and bool(fl & PG_anon_exclusive)
    def change_protection(self, t: Thread, vma: Vma, bits: int, prot_numa: bool = False,
                          lo_vpn: int = -1, hi_vpn: int = -1) -> Gen:
        """``change_protection`` → ``change_pte_range`` per table (vectorised).

        New permissions: USER iff PROT_READ or PROT_WRITE (x86 ``protection_map``:
        ``VM_WRITE`` alone is ``PAGE_COPY``, readable; ``PAGE_NONE`` is a protnone entry,
        see :mod:`cowenv.kernel.pgtable`); WRITE only where PROT_WRITE and
        ``can_change_pte_writable`` for a private VMA (exclusive anon pages — the
        "mprotect() optimization" cow.c tests); in a shared (shmem) VMA every present PTE,
        as shmem wants no write-notify (``vma_wants_writenotify`` is false, so the new
        ``vm_page_prot`` is writable); the zero page is never writable. While soft-dirty
        tracking is on (``VM_SOFTDIRTY`` clear), only soft-dirty entries are made
        writable, in both kinds of VMA (``can_change_pte_writable``).

        ``prot_numa`` is ``change_prot_numa``'s ``MM_CP_PROT_NUMA`` over
        ``[lo_vpn, hi_vpn)`` (default: the VMA): newprot ``PAGE_NONE`` on the entries
        ``change_pte_range`` (6.2) does not skip::

            if (prot_numa) {
                if (pte_protnone(oldpte)) continue;
                page = vm_normal_page(vma, addr, oldpte);
                if (!page || is_zone_device_page(page) || PageKsm(page)) continue;
                /* Also skip shared copy-on-write pages */
                if (is_cow_mapping(vma->vm_flags) && page_count(page) != 1) continue;
                ...
                nid = page_to_nid(page);
                if (target_node == nid) continue;

        where ``target_node`` is ``numa_node_id()`` for a private VMA of a
        single-threaded mm (``atomic_read(&vma->vm_mm->mm_users) == 1``), else
        ``NUMA_NO_NODE``: on the model's single node a single-threaded process's private
        entries are all skipped. Swap entries are left alone; nothing becomes writable.
        Returns 0 or -errno (``prot_numa``: the number of entries made protnone; a failed
        COW PTE break skips the PMD, as v4's ``return 0`` does for every caller).

        Lock contract: mmap_lock write (``prot_numa``: read); takes the PTL.
        """
        mm = vma.mm
        P = self.P
        pool = self.pool
        lo_vpn = vma.start if lo_vpn < 0 else max(lo_vpn, vma.start)
        hi_vpn = vma.end if hi_vpn < 0 else min(hi_vpn, vma.end)
        site = "change_prot_numa" if prot_numa else "change_pte_range"
        pages = 0
        for idx in range(lo_vpn // P, (hi_vpn - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            ret = yield from self.cow_break_for_walker(t, vma, idx, site)
            if ret:
                if prot_numa:
                    continue  # v4: `if (break_cow_pte(vma, pmd, addr)) return 0;`
                r = self.cow_change_prot_failed(t, vma, idx, ret)
                if r:
                    return r
                continue
            lo = max(lo_vpn, idx * P) - idx * P
            hi = min(hi_vpn, (idx + 1) * P) - idx * P
            got = yield from self.pte_offset_map_lock(t, mm, idx, "change_pte_range")
            if got is None:
                continue
            table, ptl = got
            e = table.entries[lo:hi]
            present = (e & PTE_PRESENT) != 0
            mig_w = (e & (PTE_MIGRATION | PTE_WRITE)) == (PTE_MIGRATION | PTE_WRITE)
            if np.count_nonzero(mig_w):
                # change_pte_range, 6.2: "A protection check is difficult so just be
                # safe and disable write": make_readable_exclusive_migration_entry for
                # an anonymous page (the only kind that migrates in the model).
                new = e.copy()
                new[mig_w] = (new[mig_w] & ~np.int64(PTE_WRITE)) | PTE_SWP_EXCLUSIVE
                self.cost.charge("pte_write", int(np.count_nonzero(mig_w)))
                self.set_ptes(t, mm, table, lo, new, "change_pte_range")
                e = table.entries[lo:hi]
            if prot_numa:
                present &= (e & PTE_USER) != 0  # if (pte_protnone(oldpte)) continue;
                pfn = e >> PFN_SHIFT
                idxs = np.where(present, pfn, 0)
                present &= (pfn != ZERO_PFN)
                if not vma.shared:
                    present &= pool.refcount[idxs] == 1
                    if mm.users == 1:
                        present[:] = False  # target_node == nid: the only node
                if np.count_nonzero(present):
                    new = e.copy()
                    new[present] &= ~np.int64(PTE_WRITE | PTE_USER)  # pte_modify(PAGE_NONE)
                    n = int(np.count_nonzero(present))
                    pages += n
                    self.cost.charge("pte_write", n)
                    self.set_ptes(t, mm, table, lo, new, "change_pte_range")
                    self._tlb_flush_pte_range(t, mm, idx * P + lo, idx * P + hi)
            elif np.count_nonzero(present):
                new = e.copy()
                new[present] &= ~np.int64(PTE_WRITE | PTE_USER)
                if bits & 3:
                    new[present] |= PTE_USER
                if bits & 2:
                    pfn = e >> PFN_SHIFT
                    if vma.shared:
                        # shmem has no write-notify: vma_wants_manual_pte_write_upgrade()
                        # is vma_wants_writenotify() == false for a VM_SHARED shmem VMA, so
                        # MM_CP_TRY_CHANGE_WRITABLE is not set and newprot (PAGE_SHARED)
                        # itself is writable: every present PTE becomes writable.
                        ok = present & (pfn != ZERO_PFN)
                    else:
                        fl = pool.flags[np.where(present, pfn, 0)]
                        ok = present & (pfn != ZERO_PFN) & ((fl & PG_anon_exclusive) != 0)
                    if not vma.flags & VM_SOFTDIRTY:
                        # Soft-dirty tracking: vm_page_prot is not writable (write-notify)
                        # and can_change_pte_writable() wants pte_soft_dirty().
                        ok &= (e & PTE_SOFT_DIRTY) != 0
                    new[ok] |= PTE_WRITE
                if np.count_nonzero(new != e):
                    self.cost.charge("pte_write", int(np.count_nonzero(new != e)))
                    self.set_ptes(t, mm, table, lo, new, "change_pte_range")
                    self._tlb_flush_pte_range(t, mm, idx * P + lo, idx * P + hi)
            self.unlock(t, ptl, WRITE, "change_pte_range")
            if prot_numa:
                yield "change_prot_numa:table_done"
            else:
                yield "change_pte_range:table_done"
        return pages if prot_numa else 0

    def _tlb_flush_pte_range(self, t: Thread, mm: MmStruct, start: int, end: int) -> None:
        """``tlb_flush_pte_range(tlb, addr, PAGE_SIZE)`` of ``change_pte_range`` (6.2).

        Records ``[start, end)`` in the caller's gather (``do_mprotect_pkey``'s or
        ``change_prot_numa``'s), flushed at its ``tlb_finish_mmu``; with no gather open
        (no 6.2 caller of ``change_protection`` has none) the range is flushed now.
        """
        gather = self.tlb_current(t, mm)
        if gather is not None:
            gather.add_range(start, end)
        else:
            self.flush_tlb_range(mm, start, end)
