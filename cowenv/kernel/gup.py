"""GUP: pins (``FOLL_PIN``), ``mm/gup.c`` of 6.2, and the device I/O through them.

``pin_user_pages`` (slow path: ``follow_page_pte`` under mmap_lock read, unsharing a
maybe-shared anon page for a R/O ``FOLL_LONGTERM`` pin) and ``pin_user_pages_fast``
(``gup_fast`` / ``gup_pte_range``: no locks, IRQs off, backs off when
``mm->write_protect_seq`` is odd or the PTE changed). A pin adds
``GUP_PIN_COUNTING_BIAS`` to the refcount and sets ``MMF_HAS_PINNED``. ``dev_read`` /
``dev_write`` model a device (an io_uring fixed buffer, a vmsplice'd pipe) accessing
the pinned page directly.
"""

from __future__ import annotations

import numpy as np

from .fault import (
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
)
from .locks import READ, WRITE
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_allocated,
    PG_anon_exclusive,
    PG_dirty,
)
from .mm import (
    MMF_HAS_PINNED,
    VM_READ,
    VM_WRITE,
    MmStruct,
    Vma,
)
from .ops import EFAULT, EINVAL, ENOMEM
from .pgtable import (
    PFN_SHIFT,
    PTE_PRESENT,
    PTE_USER,
    PTE_WRITE,
    ZERO_PFN,
)
from .sched import Gen, Pin, Thread, _done


class GupMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def sys_pin(self, t: Thread, addr: int, write: bool = False, fast: bool = False) -> Gen:
        """``pin_user_pages[_fast]`` of one page with FOLL_PIN|FOLL_LONGTERM.

        GUP-fast: no locks; reads ``write_protect_seq`` (odd → slow path), reads the PTE,
        requires it present/accessible (writable for FOLL_WRITE) and, for R/O pins, an
        exclusive anon page (``gup_must_unshare``); grabs the pin, then re-checks the PTE
        and the seqcount and backs off on any change. Slow GUP: under mmap_lock read,
        ``follow_page_pte`` under the PTL, faulting (``FAULT_FLAG_WRITE`` or
        ``FAULT_FLAG_UNSHARE``) until the page can be pinned.

        Returns the pin id, or -errno.
        """
        mm = self.mm_of(t)
        vpn = addr // self.config.page_size
        mm.flags |= MMF_HAS_PINNED  # mm_set_has_pinned_flag
        if fast:
            pin = yield from self.gup_fast(t, mm, vpn, write)
            if pin is not None:
                return pin
            yield "gup_fast:fallback"
        yield from self.lock(t, mm.mmap_lock, READ, "__get_user_pages")
        ret = -EFAULT
        for _ in range(16):
            vma = mm.find_vma(vpn)
            # mm/gup.c check_vma_flags(): FOLL_WRITE needs VM_WRITE, a read needs VM_READ.
            if vma is None or (write and not vma.flags & VM_WRITE) or (
                    not write and not vma.flags & VM_READ):
                ret = -EFAULT
                break
            r = yield from self.follow_page_pte(t, vma, vpn, write)
            if isinstance(r, int) and r > 0:
                ret = r
                break
            flags = FAULT_FLAG_WRITE if write else (FAULT_FLAG_UNSHARE if r == "unshare" else 0)
            self.cost.begin_fault(t)
            fr = yield from self.handle_mm_fault(t, vma, vpn, flags)
            self.cost.end_fault(t, entry_exit=False)
            if fr == VM_FAULT_OOM:
                ret = -ENOMEM
                break
            if fr in (VM_FAULT_SIGSEGV, VM_FAULT_SIGBUS):  # vm_fault_to_errno: -EFAULT
                ret = -EFAULT
                break
        self.unlock(t, mm.mmap_lock, READ, "__get_user_pages")
        return ret
    def follow_page_pte(self, t: Thread, vma: Vma, vpn: int, write: bool) -> Gen:
        """``follow_page_pte`` + ``try_grab_page``: returns a pin id, or the fault needed.

        Returns ``"fault"`` / ``"unshare"`` when a fault is needed first.

        Lock contract: mmap_lock read; takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        got = yield from self.pte_offset_map_lock(t, mm, idx, "follow_page_pte")
        if got is None:
            return "fault"
        table, ptl = got
        pmd = mm.pmd[idx]
        pte = int(table.entries[off])
        need: str | None = None
        if not pte & PTE_PRESENT or not pte & PTE_USER:
            need = "fault"
        elif write and not (pte & PTE_WRITE and pmd.write):
            need = "fault"
        else:
            pfn = pte >> PFN_SHIFT
            if pfn == ZERO_PFN:
                # gup_must_unshare(vma, flags, page) of 84209e87c696 (v6.2-rc1, "mm/gup:
                # reliable R/O long-term pinning in COW mappings"): a non-anon page under
                # FOLL_LONGTERM in a COW mapping needs FAULT_FLAG_UNSHARE, which replaces
                # the zero page by a fresh anonymous page. On every modelled base.
                need = "unshare"
            elif not write and self.is_anon(pfn) and not (
                    int(self.pool.flags[pfn]) & PG_anon_exclusive):
                need = "unshare"  # gup_must_unshare
        if need is not None:
            self.unlock(t, ptl, WRITE, "follow_page_pte")
            return need
        pfn = pte >> PFN_SHIFT
        pin = self._grab_pin(t, mm, vpn, pfn, write)
        self.unlock(t, ptl, WRITE, "follow_page_pte")
        return pin
    def _grab_pin(self, t: Thread, mm: MmStruct, vpn: int, pfn: int, write: bool) -> int:
        """``try_grab_page(FOLL_PIN)``: refcount += GUP_PIN_COUNTING_BIAS."""
        self.pool.refcount[pfn] += GUP_PIN_COUNTING_BIAS
        self.pool.pincount[pfn] += 1
        pid = self._id("pin")
        pin = Pin(self.procs[t.pid].pid, pid, mm, vpn, pfn, write)
        self.pins[pid] = pin
        if self.oracle is not None:
            self.oracle.on_pin(pin)
        return pid
    def gup_fast(self, t: Thread, mm: MmStruct, vpn: int, write: bool) -> Gen:
        """``lockless_pages_from_mm``: :meth:`gup_pte_range` with IRQs disabled.

        While any walker is inside its ``local_irq_save`` section, page tables freed
        meanwhile stay allocated (``tlb_remove_table`` waits for the grace period / IPI).
        """
        self.gup_fast_walkers += 1
        try:
            return (yield from self.gup_pte_range(t, mm, vpn, write))
        finally:
            self.gup_fast_walkers -= 1
            if not self.gup_fast_walkers and self.deferred_tables:
                pfns = np.array(sorted(tb.pfn for tb in self.deferred_tables), dtype=np.int64)
                self.deferred_tables = []
                self.pool.refcount[pfns] = 0
                self.pool.give_back(pfns)
    def gup_pte_range(self, t: Thread, mm: MmStruct, vpn: int, write: bool) -> Gen:
        """``gup_pte_range`` for one page, IRQs off; returns a pin id or None = fall back."""
        seq = mm.write_protect_seq
        if seq & 1:
            return None
        # lockless_pages_from_mm reads the seqcount once, then walks pgd..pte with IRQs
        # off; nothing orders the walk itself against a concurrent PMD change (the
        # seqcount and PMD/PTE re-checks only discard the result afterwards), and only
        # the deferred table free (tlb_remove_table) keeps the tables it reads alive.
        yield "gup_fast:seq_read"
        pmd = mm.pmd.get(vpn // self.P)
        if pmd is None or (write and not pmd.write):
            return None
        table = pmd.table
        pmd_write = pmd.write
        off = vpn % self.P
        pte = int(table.entries[off])
        yield "gup_fast:pte_read"
        if table.freed:
            # Unlinked: still allocated while its free waits for the flush and for this
            # walker (tlb_remove_table); a frame already given back (or reused) is a
            # use-after-free.
            if (not self.pool.flags[table.pfn] & PG_allocated
                    or int(self.pool.gen[table.pfn]) != table.gen):
                self._report("memory-safety", "gup_pte_range",
                             f"GUP-fast walked freed page table {table.pfn}")
            return None  # unlinked but not yet freed: the PMD re-check fails
        if not pte & PTE_PRESENT or not pte & PTE_USER or (write and not pte & PTE_WRITE):
            return None
        pfn = pte >> PFN_SHIFT
        if pfn == ZERO_PFN or self.pool.is_free(pfn):
            return None
        # try_grab_folio
        self.pool.refcount[pfn] += GUP_PIN_COUNTING_BIAS
        self.pool.pincount[pfn] += 1
        yield "gup_fast:grabbed"
        cur = mm.pmd.get(vpn // self.P)
        # gup_pte_range: the whole PMD value (table and write bit) and the PTE must be
        # unchanged.
        changed = (cur is None or cur.table is not table or cur.write != pmd_write
                   or int(table.entries[off]) != pte)
        # 6.2 gup_pte_range, after the re-check of pmd and pte:
        #     if (!pte_write(pte) && gup_must_unshare(NULL, flags, page)) {
        #         gup_put_folio(folio, 1, flags);
        #         goto pte_unmap;
        #     }
        # gup_must_unshare (FOLL_PIN|FOLL_LONGTERM, no VMA): a non-anon page needs the
        # slow path ("if (!vma) return true;"), an anon page must be PageAnonExclusive.
        must_unshare = not pte & PTE_WRITE and (
            not self.is_anon(pfn) or not int(self.pool.flags[pfn]) & PG_anon_exclusive)
        if changed or mm.write_protect_seq != seq or must_unshare:
            # gup_put_folio: the page may have lost its last other reference meanwhile.
            self.pool.pincount[pfn] -= 1
            self.pool.refcount[pfn] -= GUP_PIN_COUNTING_BIAS - 1
            self.put_page(pfn, "gup_put_folio")
            return None
        self.pool.refcount[pfn] -= GUP_PIN_COUNTING_BIAS
        self.pool.pincount[pfn] -= 1
        return self._grab_pin(t, mm, vpn, pfn, write)
    def _unpin(self, pin: Pin) -> None:
        if not pin.active:
            return
        pin.active = False
        self.pool.pincount[pin.pfn] -= 1
        self.pool.refcount[pin.pfn] -= GUP_PIN_COUNTING_BIAS - 1
        self.put_page(pin.pfn, "unpin_user_page")
        if self.oracle is not None:
            self.oracle.on_unpin(pin)
    def _pin_of(self, t: Thread, pin: int) -> Pin | None:
        p = self.pins.get(pin)
        if p is None or not p.active or p.pid != t.pid:
            return None
        return p
    def sys_unpin(self, t: Thread, pin: int) -> Gen:
        """``unpin_user_page``. -EINVAL if the pin is not this process's."""
        p = self._pin_of(t, pin)
        if p is None:
            return (yield from _done(-EINVAL))
        self._unpin(p)
        return (yield from _done(0))
    def sys_dev_read(self, t: Thread, pin: int) -> Gen:
        """A device read (DMA) through a pin: the page's content token."""
        p = self._pin_of(t, pin)
        if p is None:
            return (yield from _done(-EINVAL))
        if self.pool.is_free(p.pfn):
            self._report("memory-safety", "dev_read", f"DMA from freed page {p.pfn}")
        val = int(self.pool.content[p.pfn])
        if self.oracle is not None:
            self.oracle.on_dev_read(p, val)
        return (yield from _done(val))
    def sys_dev_write(self, t: Thread, pin: int) -> Gen:
        """A device write (DMA) through a writable pin: a fresh token; -EPERM on R/O."""
        p = self._pin_of(t, pin)
        if p is None:
            return (yield from _done(-EINVAL))
        if not p.write:
            return (yield from _done(-1))
        if self.pool.is_free(p.pfn):
            self._report("memory-safety", "dev_write", f"DMA to freed page {p.pfn}")
        tok = self.new_token()
        self.pool.content[p.pfn] = tok
        self.pool.flags[p.pfn] |= PG_dirty
        if self.oracle is not None:
            self.oracle.on_dev_write(p, tok)
        return (yield from _done(tok))
