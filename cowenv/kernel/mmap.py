"""Address-space changes: mmap, munmap, VMA splitting, zap and page-table freeing.

Models ``mm/mmap.c`` of 6.2 (``do_mmap`` + ``mm_populate``, ``__split_vma``,
``do_vmi_munmap``, ``unmap_region``, ``free_pgtables``) and the zap half of
``mm/memory.c`` (``zap_page_range`` → ``zap_pte_range``), plus ``free_pte_range``
(``mm/memory.c``) and the shmem file references ``get_file`` / ``fput``. munmap takes
mmap_lock for write and downgrades to read for the zap, as 6.2 does. The COW PTE patch
enters through ``cow_zap_hook`` and ``cow_free_table``.
"""

from __future__ import annotations

import numpy as np

from .fault import (
    FAULT_FLAG_WRITE,
    VM_FAULT_OOM,
)
from .locks import READ, WRITE
from .memory import (
    PG_anon,
    PG_anon_exclusive,
    PG_shmem,
    PG_swapbacked,
    ShmemObject,
)
from .mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    VM_MAYWRITE,
    VM_READ,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_WRITE,
    MmStruct,
    Vma,
)
from .ops import ENOMEM, parse_prot
from .pgtable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SOFT_DIRTY,
    PTE_SWAP,
    PTE_USER,
    PTE_WRITE,
    PTE_YOUNG,
    ZERO_PFN,
    PmdEntry,
    PteTable,
)
from .sched import Gen, Thread


class MmapMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def _vpn_range(self, addr: int, length: int) -> tuple[int, int]:
        ps = self.config.page_size
        return addr // ps, (addr + length) // ps
    def split_vma(self, mm: MmStruct, vma: Vma, at: int) -> Vma:
        """``__split_vma``: split ``vma`` at page ``at``; returns the upper part.

        Lock contract: mmap_lock write. The new VMA joins every anon_vma of the old one
        (``anon_vma_clone``).
        """
        new = Vma(self._id("vma"), mm, at, vma.end, vma.flags, vma.shmem,
                  vma.pgoff + (at - vma.start))
        self.get_file(new.shmem)
        new.anon_vma = vma.anon_vma
        new.chain = list(vma.chain)
        for av in vma.chain:
            av.vmas.append(new)
        new.lock_seq = vma.lock_seq
        vma.end = at
        mm.insert_vma(new)
        return new
    def vma_split_range(self, t: Thread, mm: MmStruct, start: int, end: int) -> Gen:
        """Write-lock the VMAs overlapping ``[start, end)``, then split at its boundaries.

        Returns the VMAs inside. ``vma_start_write`` comes first because ``__split_vma``
        write-locks the VMA it shrinks and the new one (mm/mmap.c), so a
        fault holding the old VMA's read lock (per-VMA-lock mode) finishes before the
        boundary moves under it.

        Lock contract: mmap_lock write.
        """
        for v in mm.vmas_in(start, end):
            yield from self.vma_start_write(t, v)
        return (yield from self._split_range(t, mm, start, end))
    def _split_range(self, t: Thread, mm: MmStruct, start: int, end: int) -> Gen:
        """Split VMAs at ``start``/``end``; return the VMAs inside ``[start, end)``.

        Returns -ENOMEM if a split fails (COW PTE's break in ``__split_vma``), with the
        splits made before it left in place, as ``do_vmi_align_munmap`` leaves them.
        """
        for v in mm.vmas_in(start, end):
            if v.start < start < v.end:
                r = yield from self.split_vma_checked(t, mm, v, start)
                if isinstance(r, int):
                    return r
        for v in mm.vmas_in(start, end):
            if v.start < end < v.end:
                r = yield from self.split_vma_checked(t, mm, v, end)
                if isinstance(r, int):
                    return r
        return mm.vmas_in(start, end)
    def split_vma_checked(self, t: Thread, mm: MmStruct, vma: Vma, at: int) -> Gen:
        """``__split_vma`` with its failure: COW PTE v4 03/14 breaks COW first.

        v4 (``mm/mmap.c``)::

            err = break_cow_pte(vma, NULL, addr);
            if (err)
                return err;
            new = vm_area_dup(vma);

        Returns the upper VMA, or -ENOMEM. Lock contract: mmap_lock write.
        """
        err = yield from self.cow_split_vma(t, vma, at)
        if err:
            return err
        # __split_vma → __vma_adjust (6.2): anon_vma_lock_write(vma->anon_vma) around
        # the boundary change, so an rmap walk (migration's remove_migration_ptes,
        # reclaim) never uses a VMA whose range moved under it.
        root = vma.anon_vma.root if vma.anon_vma is not None else None
        if root is not None:
            yield from self.lock(t, root.lock, WRITE, "__split_vma")
        new = self.split_vma(mm, vma, at)
        if root is not None:
            self.unlock(t, root.lock, WRITE, "__split_vma")
        return new
    def sys_mmap(self, t: Thread, addr: int, length: int, prot: str = "rw",
                 shared: bool = False, populate: bool = False) -> Gen:
        """``mmap(addr, length, prot, MAP_FIXED|MAP_ANONYMOUS|MAP_PRIVATE/SHARED)``.

        Existing mappings in the range are unmapped first (MAP_FIXED). ``populate``
        models MAP_POPULATE (``__mm_populate`` under mmap_lock read).

        Lock contract: mmap_lock write (read for the populate phase).
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        yield from self.lock(t, mm.mmap_lock, WRITE, "do_mmap")
        if mm.vmas_in(start, end):
            # mmap_region: if (do_vmi_munmap(&vmi, mm, addr, len, uf, false)) return
            # -ENOMEM; (a split can fail: COW PTE's break in __split_vma).
            ret = yield from self.do_vmi_munmap(t, mm, start, end, downgrade=False)
            if ret:
                self.mmap_write_unlock(t, mm, "do_mmap")
                return -ENOMEM
        bits = parse_prot(prot)
        # mmap_region: "New (or expanded) vma always get soft dirty status."
        flags = VM_MAYWRITE | VM_SOFTDIRTY | (VM_READ if bits & 1 else 0) | (
            VM_WRITE if bits & 2 else 0)
        obj = None
        if shared:
            flags |= VM_SHARED
            obj = ShmemObject(self._id("shmem"), end - start)
            self.shmem[obj.id] = obj
        # do_mmap: an anonymous mapping's vm_pgoff is addr >> PAGE_SHIFT.
        vma = Vma(self._id("vma"), mm, start, end, flags, obj, 0 if obj else start)
        self.get_file(obj)
        mm.insert_vma(vma)
        if self.oracle is not None:
            self.oracle.on_mmap(mm, start, end, bits, obj.id if obj else None)
        self.mmap_write_unlock(t, mm, "do_mmap")
        if populate:
            yield "do_mmap:populate"
            yield from self.lock(t, mm.mmap_lock, READ, "__mm_populate")
            # __mm_populate (mm/gup.c) works on the *range*: it looks the VMAs up again
            # under the read lock, since the one just created may have been split,
            # unmapped or replaced while no lock was held.
            ret = 0
            for v in mm.vmas_in(start, end):
                ret = yield from self.populate_range(t, mm, v, max(start, v.start),
                                                     min(end, v.end))
                if ret:
                    break
            self.unlock(t, mm.mmap_lock, READ, "__mm_populate")
            if ret:
                return ret
        return addr
    def populate_range(self, t: Thread, mm: MmStruct, vma: Vma, start: int, end: int) -> Gen:
        """``populate_vma_page_range`` for a private writable anon VMA, vectorised per table.

        Every ``pte_none`` entry gets a fresh exclusive page, exactly as a write fault through
        ``do_anonymous_page`` would leave it. Other VMAs fault page by page.

        Lock contract: mmap_lock read.
        """
        if vma.detached:
            return 0
        if vma.shared or not vma.flags & VM_WRITE:
            for vpn in range(start, end):
                ret = yield from self.handle_mm_fault(
                    t, vma, vpn, FAULT_FLAG_WRITE if vma.flags & VM_WRITE else 0)
                if ret == VM_FAULT_OOM:
                    return -ENOMEM
            return 0
        self.anon_vma_prepare(vma)
        pool = self.pool
        P = self.P
        for idx in range(start // P, (end - 1) // P + 1):
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            ret = yield from self.cow_break_for_walker(t, vma, idx, "populate_range")
            if ret:
                return -ENOMEM
            if idx not in mm.pmd:
                table = self.pte_alloc_one(mm, "__pte_alloc")
                if table is None:
                    return -ENOMEM
                yield from self.lock(t, mm.page_table_lock, WRITE, "pmd_install")
                self.pmd_populate(mm, idx, table)
                self.unlock(t, mm.page_table_lock, WRITE, "pmd_install")
            got = yield from self.pte_offset_map_lock(t, mm, idx, "populate_range")
            if got is None:
                continue
            table, ptl = got
            seg = table.entries[lo:hi]
            none = (seg == 0).nonzero()[0]
            if len(none):
                pfns = self.alloc_pages(len(none), "populate_range")
                if pfns is None:
                    self.unlock(t, ptl, WRITE, "populate_range")
                    return -ENOMEM
                vpns = idx * P + lo + none
                pool.mapcount[pfns] = 1
                pool.flags[pfns] |= PG_anon | PG_anon_exclusive | PG_swapbacked
                pool.anon_vma[pfns] = vma.anon_vma.id
                pool.index[pfns] = vma.pgoff + (vpns - vma.start)  # linear_page_index
                pool.lru_add(pfns)
                new = seg.copy()
                new[none] = ((pfns << PFN_SHIFT) | PTE_PRESENT | PTE_WRITE | PTE_DIRTY
                             | PTE_SOFT_DIRTY | PTE_YOUNG | PTE_USER)
                self.set_ptes(t, mm, table, lo, new, "populate_range")
                mm.rss[MM_ANONPAGES] += len(none)
                for c in ("page_alloc", "page_zero", "page_account", "pte_write"):
                    self.cost.charge(c, len(none))
            self.unlock(t, ptl, WRITE, "populate_range")
            yield "populate_range:table_done"
        return 0
    def sys_munmap(self, t: Thread, addr: int, length: int) -> Gen:
        """``munmap``: detach VMAs under the write lock, then downgrade to read for the zap.

        Detach VMAs under the write lock, then downgrade to read for ``unmap_region``
        (zap + ``free_pgtables``), as ``do_vmi_align_munmap`` does.

        Lock contract: mmap_lock write, downgraded to read.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        yield from self.lock(t, mm.mmap_lock, WRITE, "do_vmi_munmap")
        ret = yield from self.do_vmi_munmap(t, mm, start, end, downgrade=True)
        self.unlock(t, mm.mmap_lock, READ, "do_vmi_munmap")
        return ret
    def do_vmi_munmap(self, t: Thread, mm: MmStruct, start: int, end: int,
                      downgrade: bool) -> Gen:
        """``do_vmi_munmap``.

        With ``downgrade`` the caller's write lock becomes a read lock before the zap (the
        caller then releases READ).
        """
        vmas = yield from self.vma_split_range(t, mm, start, end)
        if isinstance(vmas, int):
            # __split_vma failed: nothing unmapped. 6.2's __vm_munmap then does
            # mmap_write_unlock; the model hands back the read lock its callers release.
            if downgrade:
                self.mmap_write_downgrade(t, mm)
            return vmas
        for v in vmas:
            mm.vmas.remove(v)
            v.detached = True
        if self.oracle is not None:
            self.oracle.on_munmap_begin(mm, start, end)
        if downgrade:
            self.mmap_write_downgrade(t, mm)
            yield "do_vmi_munmap:downgraded"
        yield from self.unmap_region(t, mm, vmas)
        for v in vmas:
            self.fput(v.shmem)  # remove_vma
        if self.oracle is not None:
            self.oracle.on_munmap(mm, start, end)
        return 0
    def get_file(self, obj: ShmemObject | None) -> None:
        """``get_file``: a new VMA (mmap, split, ``dup_mmap``) references its shmem file."""
        if obj is not None:
            self.shmem_users[obj.id] = self.shmem_users.get(obj.id, 0) + 1
    def fput(self, obj: ShmemObject | None) -> None:
        """``fput`` from ``remove_vma``: drop a VMA's reference on its shmem file.

        The last reference releases the shmem inode: ``shmem_evict_inode`` →
        ``shmem_truncate_range`` drops the page cache's
        reference on every page (mm/shmem.c, mm/truncate.c); a page still pinned lives
        on until it is unpinned. Nothing maps the object any more at this point.
        """
        if obj is None:
            return
        n = self.shmem_users.get(obj.id, 0) - 1
        if n > 0:
            self.shmem_users[obj.id] = n
            return
        self.shmem_users.pop(obj.id, None)
        self.shmem.pop(obj.id, None)
        pages = np.array([obj.pages[i] for i in sorted(obj.pages)], dtype=np.int64)
        obj.pages.clear()
        self.put_pages(pages, "shmem_undo_range")
    def unmap_region(self, t: Thread, mm: MmStruct, vmas: list[Vma]) -> Gen:
        """``unmap_region``: ``unmap_vmas`` then ``free_pgtables``, in one mmu_gather.

        ``tlb_gather_mmu`` … ``tlb_finish_mmu``: pages and tables are freed after the flush.

        Lock contract: mmap_lock held (read after a downgrade); the VMAs are detached.
        """
        tlb = self.tlb_gather_mmu(t, mm)
        for v in vmas:
            yield from self.zap_page_range(t, v, v.start, v.end)
        yield from self.free_pgtables(t, mm, vmas)
        if self.config.variant == "cowpte":
            # Preemptible between free_pgtables and tlb_finish_mmu (no lock held but
            # mmap_lock). A preemption point on the COW PTE variant only, where a table
            # this mm dropped may be freed by another mm meanwhile (flaw
            # free-pmd-deferred-flush); classic traces keep their shape.
            yield "unmap_region:pgtables_freed"
        self.tlb_finish_mmu(t, tlb)
    def free_pgtables(self, t: Thread, mm: MmStruct, vmas: list[Vma]) -> Gen:
        """``free_pgtables``: unlink the VMAs from rmap, then free the PTE tables left unused.

        Unlink the VMAs from rmap (``unlink_anon_vmas`` under the anon_vma write lock), then
        free every PTE table whose whole PMD range no remaining VMA covers (the floor/ceiling
        rule).

        Lock contract: mmap_lock held; takes anon_vma write locks and the PTL.
        """
        for v in vmas:
            for av in list(v.chain):
                yield from self.lock(t, av.root.lock, WRITE, "unlink_anon_vmas")
                if v in av.vmas:
                    av.vmas.remove(v)
                self.unlock(t, av.root.lock, WRITE, "unlink_anon_vmas")
            v.chain = []
        P = self.P
        idxs = sorted({i for v in vmas for i in range(v.start // P, (v.end - 1) // P + 1)})
        for idx in idxs:
            if mm.vmas_in(idx * P, (idx + 1) * P):
                continue
            pmd = mm.pmd.get(idx)
            if pmd is None:
                continue
            yield from self.free_pte_range(t, mm, idx, pmd)
    def free_pte_range(self, t: Thread, mm: MmStruct, idx: int, pmd: PmdEntry) -> Gen:
        """``free_pte_range``: clear the PMD, uncharge and free the table.

        Lock contract: mmap_lock held; the table is unreachable through rmap (VMAs
        unlinked). The table goes through the mmu_gather (``pte_free_tlb`` →
        ``tlb_remove_table``): freed after the flush and the GUP-fast grace period.
        """
        table = pmd.table
        ptl = self.pte_lockptr(mm, table)
        yield from self.lock(t, ptl, WRITE, "free_pte_range")
        still_used = self.cow_free_table(t, mm, idx, pmd)
        if mm.pmd.get(idx) is pmd:
            del mm.pmd[idx]
        mm.mm_dec_nr_ptes()
        self.cost.charge("pmd_update")
        self.unlock(t, ptl, WRITE, "free_pte_range")
        if not still_used:
            live = np.count_nonzero(table.entries)
            if live:
                self._report("accounting", "free_pte_range",
                             f"table {table.pfn} freed with {live} live entries")
            if self.config.tlb:
                self.tlb_remove_table(t, mm, table, idx)  # pte_free_tlb
            else:
                self.pte_free(table, "free_pte_range")
    def zap_page_range(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``zap_page_range_single``/``unmap_vmas`` → ``zap_pte_range`` per table.

        Lock contract: mmap_lock held (read suffices); takes each table's PTL.
        """
        mm = vma.mm
        P = self.P
        own = None
        if self.config.tlb and self.tlb_current(t, mm) is None:
            own = self.tlb_gather_mmu(t, mm)  # zap_page_range_single's own gather
        for idx in range(start // P, (end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            skip = yield from self.cow_zap_hook(t, vma, idx, lo, hi)
            if skip:
                continue
            got = yield from self.pte_offset_map_lock(t, mm, idx, "zap_pte_range")
            if got is None:
                continue
            table, ptl = got
            self.zap_pte_range(t, vma, table, idx, lo, hi)
            self.unlock(t, ptl, WRITE, "zap_pte_range")
            yield "zap_pte_range:table_done"
        if own is not None:
            self.tlb_finish_mmu(t, own)
        self.cost.charge("tlb_flush_range")  # tlb_finish_mmu
    def zap_pte_range(self, t: Thread, vma: Vma, table: PteTable, idx: int, lo: int,
                      hi: int, clear: bool = True) -> None:
        """``zap_pte_range`` on entries ``[lo, hi)`` (vectorised).

        Present pages: ``page_remove_rmap``, rss--, page queued in the thread's
        mmu_gather (:meth:`TlbMixin.tlb_remove_pages`) and freed after the flush; swap
        entries: ``free_swap_and_cache``, ``MM_SWAPENTS``--. With
        ``clear=False`` the entries are left in place (COW PTE v4's ``pte_is_shared``
        path) while the accounting is still done.

        Lock contract: the table's PTL held.
        """
        mm = vma.mm
        pool = self.pool
        e = table.entries[lo:hi]
        live = bool(np.count_nonzero(e))  # (e is a view: the clear below empties it)
        if not live:
            return  # all pte_none: nothing to account, clear, gather or free
        present = (e & PTE_PRESENT) != 0
        pfns = (e[present] >> PFN_SHIFT)
        pfns = pfns[pfns != ZERO_PFN]
        swaps = e[(e & PTE_SWAP) != 0] >> PFN_SHIFT
        # Migration entries: rss[mm_counter(page)]-- (anonymous pages only migrate).
        mig = int(np.count_nonzero(e & PTE_MIGRATION))
        mm.rss[MM_ANONPAGES] -= mig
        if len(pfns):
            fl = pool.flags[pfns]
            anon = (fl & PG_anon) != 0
            shm = (fl & PG_shmem) != 0
            mm.rss[MM_ANONPAGES] -= int(np.count_nonzero(anon))
            mm.rss[MM_SHMEMPAGES] -= int(np.count_nonzero(shm))
            self.page_remove_rmap(pfns, "zap_pte_range")
        for s in swaps.tolist():
            self.free_swap_and_cache(int(s), "zap_pte_range")
        mm.rss[MM_SWAPENTS] -= len(swaps)
        self.cost.charge("page_account", len(pfns) + len(swaps) + mig)
        if clear and live:
            self.cost.charge("pte_write", int(np.count_nonzero(e)))
            self.set_ptes(t, mm, table, lo, np.zeros(hi - lo, dtype=np.int64), "zap_pte_range")
        if self.config.tlb:
            # tlb_remove_tlb_entry + __tlb_remove_page: put after the flush.
            if len(pfns) or (clear and live):
                base = idx * self.P
                self.tlb_remove_pages(t, mm, pfns, base + lo, base + hi, "zap_pte_range")
        elif len(pfns):
            self.put_pages(pfns, "zap_pte_range")
