"""Process exit: ``do_exit``, ``exit_mmap`` and ``check_mm``.

Models ``do_exit`` (``kernel/exit.c``), ``exit_mmap`` (``mm/mmap.c``) and ``check_mm``
(``kernel/fork.c``).
The last thread of a process tears its mm down: every VMA zapped and its tables freed,
then ``check_mm``'s end-of-life accounting (every rss counter and ``pgtables_bytes``
zero). Semantics of 6.2.
"""

from __future__ import annotations

from .locks import READ, WRITE
from .mm import (
    MmStruct,
)
from .sched import Gen, Thread


class ExitMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def sys_exit(self, t: Thread) -> Gen:
        """``do_exit``: the last thread of a process runs ``exit_mmap`` (``mmput``).

        It then releases the process's pins (the device objects are closed after the mm).
        """
        p = self.procs[t.pid]
        mm = p.mm
        p.tids.remove(t.tid)
        mm.users -= 1
        if mm.users == 0:
            p.alive = False
            yield from self.exit_mmap(t, mm)
            for pin in [x for _, x in sorted(self.pins.items()) if x.pid == p.pid]:
                self._unpin(pin)
            if self.oracle is not None:
                self.oracle.on_exit(mm)
        t.exited = True
        return 0
    def exit_mmap(self, t: Thread, mm: MmStruct) -> Gen:
        """``exit_mmap``: zap under mmap_lock read, free and remove under write, ``check_mm``.

        Zap every VMA under mmap_lock read, then ``free_pgtables`` and remove the VMAs under
        the write lock; finally ``check_mm``.

        Lock contract: takes mmap_lock read, then write.
        """
        yield from self.lock(t, mm.mmap_lock, READ, "exit_mmap")
        tlb = self.tlb_gather_mmu(t, mm)  # tlb_gather_mmu_fullmm
        vmas = list(mm.vmas)
        for v in vmas:
            yield from self.zap_page_range(t, v, v.start, v.end)
        self.unlock(t, mm.mmap_lock, READ, "exit_mmap")
        yield from self.lock(t, mm.mmap_lock, WRITE, "exit_mmap")
        for v in vmas:
            v.detached = True
        mm.vmas = []
        yield from self.free_pgtables(t, mm, vmas)
        # Tables the VMAs never covered (should not exist) are freed too.
        for idx in sorted(mm.pmd):
            yield from self.free_pte_range(t, mm, idx, mm.pmd[idx])
        self.tlb_finish_mmu(t, tlb)
        for v in vmas:
            self.fput(v.shmem)  # remove_vma
        self.mmap_write_unlock(t, mm, "exit_mmap")
        mm.dead = True
        self.check_mm(mm)
    def check_mm(self, mm: MmStruct) -> None:
        """``check_mm``: "BUG: Bad rss-counter state" and "non-zero pgtables_bytes"."""
        from .mm import MM_COUNTER_NAMES

        for i, name in enumerate(MM_COUNTER_NAMES):
            if mm.rss[i] != 0:
                self._report("accounting", "check_mm",
                             f"Bad rss-counter state mm{mm.id} type:{name} val:{mm.rss[i]}")
        if mm.pgtables_bytes() != 0:
            self._report("accounting", "check_mm",
                         f"non-zero pgtables_bytes on freeing mm{mm.id}: {mm.pgtables_bytes()}")
