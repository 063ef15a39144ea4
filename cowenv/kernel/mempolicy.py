"""NUMA-hinting scan: ``task_numa_work`` and ``change_prot_numa`` of 6.2.

``task_numa_work`` is in kernel/sched/fair.c, ``change_prot_numa`` in mm/mempolicy.c.

Automatic NUMA balancing periodically makes a window of a task's address space
inaccessible (protnone entries through ``change_pte_range`` with ``MM_CP_PROT_NUMA``);
the next access takes a NUMA-hinting fault (``do_numa_page``, :mod:`cowenv.kernel.fault`)
that restores the entry with the VMA's protection. It is a page-table walker that
modifies tables behind the process's back, under ``mmap_lock`` held for *read*.

The model is a single-node machine with ``kernel.numa_balancing=1`` forced on (Linux
enables it by default only with more than one node): no page is ever misplaced, so the
hinting fault never migrates (``numa_migrate_prep`` returns ``NUMA_NO_NODE``). The scan
runs as the ``numa_hint`` operation on a user thread of the mm -- ``task_numa_work`` is
task work the scheduler queues on the task itself (``task_tick_numa``) and runs on its
return to user space -- over an explicit ``[addr, addr + length)`` window instead of
``mm->numa_scan_offset`` and ``numa_scan_period``/``sysctl_numa_balancing_scan_size``.
"""

from __future__ import annotations

from .locks import READ
from .mm import Vma, vma_is_accessible
from .sched import Gen, Thread


class MempolicyMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def sys_numa_hint(self, t: Thread, addr: int, length: int) -> Gen:
        """``task_numa_work`` over ``[addr, addr + length)`` of the thread's mm.

        ::

            if (!mmap_read_trylock(mm))
                return;
            ...
            for (; vma; vma = mas_find(&mas, ULONG_MAX)) {
                if (!vma_migratable(vma) || !vma_policy_mof(vma) ||
                    is_vm_hugetlb_page(vma) || (vma->vm_flags & VM_MIXEDMAP))
                    continue;
                ...
                /* Skip inaccessible VMAs to avoid any confusion between
                 * PROT_NONE and NUMA hinting ptes */
                if (!vma_is_accessible(vma))
                    continue;
                do {
                    ...
                    nr_pte_updates = change_prot_numa(vma, start, end);
                    ...
                    cond_resched();
                } while (end != vma->vm_end);
            }
            mmap_read_unlock(mm);

        Every modelled VMA is migratable with the default policy (``MPOL_F_MOF``), not
        hugetlb, not ``VM_MIXEDMAP``, not a read-only file mapping. Returns the number of
        entries made protnone, or 0 when ``mmap_read_trylock`` fails (the scan is skipped).

        Lock contract: takes mmap_lock for read (trylock); the PTLs inside.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        lk = mm.mmap_lock
        if not lk.can_acquire(t.tid, READ):
            return 0  # mmap_read_trylock failed
        yield from self.lock(t, lk, READ, "task_numa_work")
        total = 0
        for vma in mm.vmas_in(start, end):
            if vma.detached or not vma_is_accessible(vma):
                continue
            n = yield from self.change_prot_numa(t, vma, max(start, vma.start),
                                                 min(end, vma.end))
            total += n
            yield "task_numa_work:vma_done"
        self.unlock(t, lk, READ, "task_numa_work")
        return total

    def change_prot_numa(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``change_prot_numa`` (mm/mempolicy.c, 6.2) over virtual pages ``[start, end)``.

        ::

            tlb_gather_mmu(&tlb, vma->vm_mm);
            nr_updated = change_protection(&tlb, vma, addr, end, PAGE_NONE,
                                           MM_CP_PROT_NUMA);
            ...
            tlb_finish_mmu(&tlb);

        The gather (``tlb_gather_mmu`` → ``inc_tlb_flush_pending``) is open over the
        whole walk: ``change_pte_range`` only records each protnone entry in it
        (``tlb_flush_pte_range``) and the flush comes at ``tlb_finish_mmu``, so a store
        through a writable TLB entry of a page already made protnone is the kernel's
        accepted window until then (``mm_tlb_flush_pending`` is true), not a stale write.

        With COW PTE, ``change_pte_range`` breaks a shared table first (v4 09/14) and
        skips the PMD if that fails. Returns the number of entries updated.

        Lock contract: mmap_lock read; takes the PTLs.
        """
        tlb = self.tlb_gather_mmu(t, vma.mm)
        n = yield from self.change_protection(t, vma, 0, prot_numa=True,
                                              lo_vpn=start, hi_vpn=end)
        self.tlb_finish_mmu(t, tlb)
        return n
