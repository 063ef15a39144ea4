"""fork: ``kernel/fork.c`` (``copy_process`` → ``dup_mmap``) and ``copy_page_range``.

The copy half of ``mm/memory.c``:
``copy_page_range`` → ``copy_pte_range`` → ``copy_present_pte`` / ``copy_nonpresent_pte``
(here ``copy_pte_entries``, vectorised over a table), with the ``write_protect_seq``
bracket GUP-fast backs off on, ``page_try_dup_anon_rmap`` and the eager copy of
maybe-pinned pages (``page_needs_cow_for_dma``). Semantics of 6.2. ``clone`` adds a
thread (``CLONE_VM``); ``prctl(PR_SET_COW_PTE)`` is the v4 patch's prctl
(``kernel/sys.c``), which sets ``MMF_COW_PTE_READY``. The COW PTE patch enters
through ``cow_copy_pmd`` and ``cow_fork_seq_brackets_sharing``.
"""

from __future__ import annotations

import numpy as np

from .locks import SINGLE_DEPTH_NESTING, WRITE
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_anon,
    PG_anon_exclusive,
    PG_shmem,
)
from .mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    MMF_COW_PTE,
    MMF_COW_PTE_READY,
    MMF_HAS_PINNED,
    VM_DONTCOPY,
    VM_WIPEONFORK,
    VM_WRITE,
    MmStruct,
    Vma,
)
from .ops import EAGAIN, EINVAL, ENOMEM
from .pgtable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SWAP,
    PTE_SWP_EXCLUSIVE,
    PTE_USER,
    PTE_WRITE,
    PTE_YOUNG,
    ZERO_PFN,
    PteTable,
    mk_pte,
)
from .sched import Gen, Thread, _done


class ForkMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def sys_prctl_cow_pte(self, t: Thread) -> Gen:
        """``prctl(PR_SET_COW_PTE)`` (v4 01/14): set MMF_COW_PTE_READY.

        -EINVAL if MMF_COW_PTE is already set, else set MMF_COW_PTE_READY. Upstream has no
        such prctl; the classic variant records the flag and never acts on it.
        """
        mm = self.mm_of(t)
        if mm.flags & MMF_COW_PTE:
            return (yield from _done(-EINVAL))
        mm.flags |= MMF_COW_PTE_READY
        return (yield from _done(0))
    def sys_clone(self, t: Thread) -> Gen:
        """``clone(CLONE_VM|CLONE_THREAD)``: a new thread in this process.

        Returns its tid or -EAGAIN at the thread cap.
        """
        p = self.procs[t.pid]
        nt = self._new_thread(p)
        return (yield from _done(-EAGAIN if nt is None else nt.tid))
    def sys_fork(self, t: Thread) -> Gen:
        """``fork`` → ``kernel_clone`` → ``copy_mm`` → ``dup_mmap``.

        Returns the child's pid (its single thread gets the lowest free tid), -EAGAIN at
        the process/thread cap, -ENOMEM if copying failed (the child mm is torn down).

        Lock contract: takes the parent's mmap_lock for write (and the child's, nested).
        """
        parent = self.procs[t.pid]
        if len(self.live_procs()) >= self.config.max_processes or self._free_tid() is None:
            return (yield from _done(-EAGAIN))
        oldmm = parent.mm
        # kernel_clone: MMF_COW_PTE_READY turns into MMF_COW_PTE (v4 14/14).
        if oldmm.flags & MMF_COW_PTE_READY:
            oldmm.flags = (oldmm.flags & ~MMF_COW_PTE_READY) | MMF_COW_PTE
        mm = self._new_mm()
        yield from self.lock(t, oldmm.mmap_lock, WRITE, "dup_mmap")
        yield from self.lock(t, mm.mmap_lock, WRITE, "dup_mmap")
        # MMF_INIT_MASK: MMF_COW_PTE_MASK is inherited (v4 01/14); MMF_HAS_PINNED is not.
        mm.flags = oldmm.flags & (MMF_COW_PTE | MMF_COW_PTE_READY)
        if self.oracle is not None:
            self.oracle.on_fork_begin(oldmm)
        # The parent's PTEs are write-protected from here to flush_tlb_mm(oldmm) below
        # (Linux: under mmap_write_lock(oldmm)); the TLB oracle treats it as pending.
        self.tlb_flush_pending_begin(oldmm)
        ret = 0
        for mpnt in list(oldmm.vmas):
            yield from self.vma_start_write(t, mpnt)
            if mpnt.flags & VM_DONTCOPY:
                continue
            tmp = Vma(self._id("vma"), mm, mpnt.start, mpnt.end, mpnt.flags, mpnt.shmem,
                      mpnt.pgoff)
            self.get_file(tmp.shmem)
            if mpnt.flags & VM_WIPEONFORK:
                pass  # tmp->anon_vma = NULL: the child starts with an empty range
            elif mpnt.anon_vma is not None:
                yield from self.anon_vma_fork(t, tmp, mpnt)
            mm.insert_vma(tmp)
            self.cost.charge("fork_vma")
            if not mpnt.flags & VM_WIPEONFORK and self.vma_needs_copy(tmp, mpnt):
                ret = yield from self.copy_page_range(t, tmp, mpnt)
                if ret:
                    break
        self.unlock(t, mm.mmap_lock, WRITE, "dup_mmap")
        mm.mm_lock_seq += 1
        # flush_tlb_mm(oldmm): copy_present_pte's ptep_set_wrprotect (and COW PTE's
        # pmdp_set_wrprotect) left the parent's threads writable TLB entries until here.
        self.flush_tlb_mm(oldmm)
        self.tlb_flush_pending_end(oldmm)
        self.cost.charge("tlb_flush_range")  # flush_tlb_mm(oldmm)
        self.mmap_write_unlock(t, oldmm, "dup_mmap")
        if not ret and (len(self.live_procs()) >= self.config.max_processes
                        or self._free_tid() is None):
            # The caps checked on entry are racy (as copy_process's nr_threads check
            # is): a concurrent fork/clone may have taken the last slot meanwhile. Like a
            # failing alloc_pid() after copy_mm() (kernel/fork.c), undo: mmput the child.
            ret = -EAGAIN
        if ret:
            # dup_mmap failed: mmput() the half-built child.
            yield from self.exit_mmap(t, mm)
            if self.oracle is not None:
                self.oracle.on_fork_end(oldmm, None)
            return ret
        child = self._new_process(mm)
        self._new_thread(child)
        if self.oracle is not None:
            self.oracle.on_fork_end(oldmm, mm)
        return child.pid
    @staticmethod
    def vma_needs_copy(dst: Vma, src: Vma) -> bool:
        """``vma_needs_copy``: copy page tables only for anonymous content (anon_vma).

        Shared/shmem VMAs without one are refaulted lazily by the child.
        """
        return src.anon_vma is not None
    def copy_page_range(self, t: Thread, dst: Vma, src: Vma) -> Gen:
        """``copy_page_range``: ``copy_pmd_range`` per populated PMD, seqcount-bracketed.

        Brackets a COW mapping's copy with
        ``raw_write_seqcount_begin/end(&src_mm->write_protect_seq)`` for GUP-fast, then
        ``copy_pmd_range`` per populated PMD.

        Lock contract: both mmap_locks held for write.
        """
        src_mm = src.mm
        cow = src.is_cow_mapping()
        # Upstream brackets the whole copy; COW PTE's flawed fork only the plain copies.
        whole = cow and self.cow_fork_seq_brackets_sharing(src_mm)
        if whole:
            src_mm.write_protect_seq += 1  # odd: GUP-fast backs off
        P = self.P
        ret = 0
        for idx in range(src.start // P, (src.end - 1) // P + 1):
            if idx not in src_mm.pmd:
                continue
            lo = max(src.start, idx * P) - idx * P
            hi = min(src.end, (idx + 1) * P) - idx * P
            status, resume = yield from self.cow_copy_pmd(t, dst, src, idx, lo, hi)
            if isinstance(status, int):
                ret = status
                break
            if status in ("copy", "fill"):
                local = cow and not whole
                if local:
                    src_mm.write_protect_seq += 1
                ret = yield from self.copy_pte_range(t, dst, src, idx, resume, hi,
                                                     fill_none=status == "fill")
                if local:
                    src_mm.write_protect_seq += 1
                if ret:
                    break
        if whole:
            src_mm.write_protect_seq += 1
        return ret
    def copy_pte_range(self, t: Thread, dst_vma: Vma, src_vma: Vma, idx: int, lo: int,
                       hi: int, fill_none: bool = False) -> Gen:
        """``copy_pte_range`` for entries ``[lo, hi)`` of PMD ``idx`` (vectorised).

        Per entry, as ``copy_present_pte``/``copy_nonpresent_pte``: swap entries get
        ``swap_duplicate`` and lose ``pte_swp_exclusive``; anon pages get
        ``page_try_dup_anon_rmap`` (clears PageAnonExclusive) unless they may be
        DMA-pinned (``page_needs_cow_for_dma``), in which case the child gets an eager
        copy (``copy_present_page``); COW mappings are write-protected in both; the
        child's PTE is made old. Between checking for pins and committing there is a
        preemption point: the PTLs are held, but lockless GUP-fast on another CPU may
        run there (that is why ``write_protect_seq`` exists).

        ``fill_none`` (COW PTE, fixed design only): the child's table already exists
        and every entry in it is accounted (``recover_pte_range`` put it there earlier
        in this fork); copy only into its ``pte_none`` slots.

        Lock contract: both mmap_locks write; takes the dst PTL then the src PTL.
        Returns 0 or -ENOMEM.
        """
        dst_mm, src_mm = dst_vma.mm, src_vma.mm
        if idx not in dst_mm.pmd:
            table = self.pte_alloc_one(dst_mm, "copy_pte_range")
            if table is None:
                return -ENOMEM
            yield from self.lock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
            self.pmd_populate(dst_mm, idx, table)
            self.unlock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        dst_t = dst_mm.pmd[idx].table
        dst_ptl = self.pte_lockptr(dst_mm, dst_t)
        yield from self.lock(t, dst_ptl, WRITE, "copy_pte_range")
        # src_pte = pte_offset_map(src_pmd, addr); src_ptl = pte_lockptr(src_mm, src_pmd);
        # spin_lock_nested(src_ptl, SINGLE_DEPTH_NESTING);  (mm/memory.c, 6.2)
        got = yield from self.pte_offset_map_lock(t, src_mm, idx, "copy_pte_range",
                                                  SINGLE_DEPTH_NESTING)
        if got is None:
            self.unlock(t, dst_ptl, WRITE, "copy_pte_range")
            return 0
        src_t, src_ptl = got
        ret = yield from self.copy_pte_entries(t, dst_vma, src_vma, dst_t, src_t, lo, hi,
                                               fill_none=fill_none)
        self.unlock(t, src_ptl, WRITE, "copy_pte_range")
        self.unlock(t, dst_ptl, WRITE, "copy_pte_range")
        yield "copy_pte_range:table_done"
        return ret
    def copy_pte_entries(self, t: Thread, dst_vma: Vma, src_vma: Vma, dst_t: PteTable,
                         src_t: PteTable, lo: int, hi: int,
                         dst_mm: MmStruct | None = None, fill_none: bool = False) -> Gen:
        """The per-entry body of ``copy_pte_range`` over ``[lo, hi)``.

        That is ``copy_present_pte`` and ``copy_nonpresent_pte``. ``dst_t`` may be ``src_t``
        (COW PTE v4 calls it with ``dst_pte == src_pte``).

        Lock contract: the src (and dst) PTL held. Returns 0, -ENOMEM, or -EAGAIN
        (only when ``dst_t is src_t``: a page may be pinned, so the table cannot be
        shared — ``page_try_dup_anon_rmap`` failed). ``dst_mm`` overrides the mm rss
        is charged to (COW PTE passes ``dst_vma == src_vma`` and the child's mm).
        ``fill_none``: skip every slot whose ``dst_t`` entry is not ``pte_none`` (it is
        left as it is, in both tables, and not accounted again).
        """
        src_mm = src_vma.mm
        dst_mm = dst_mm or dst_vma.mm
        pool = self.pool
        e = src_t.entries[lo:hi].copy()
        have = (dst_t.entries[lo:hi] != 0) if fill_none else None
        if have is not None:
            e[have] = 0
        if not np.count_nonzero(e):
            return 0
        present = (e & PTE_PRESENT) != 0
        pfn = np.where(present, e >> PFN_SHIFT, 0)
        normal = present & (pfn != ZERO_PFN)
        fl = pool.flags[pfn]
        anon = normal & ((fl & PG_anon) != 0)
        cow = src_vma.is_cow_mapping()
        # page_needs_cow_for_dma: cow mapping, MMF_HAS_PINNED, page_maybe_dma_pinned,
        # and page_try_dup_anon_rmap only fails for exclusive pages.
        if cow and src_mm.flags & MMF_HAS_PINNED:
            pinned = anon & ((fl & PG_anon_exclusive) != 0) & (
                pool.refcount[pfn] >= GUP_PIN_COUNTING_BIAS)
        else:
            pinned = np.zeros(len(e), dtype=bool)
        if np.count_nonzero(pinned) and dst_t is src_t:
            # v4 processes entry by entry and stops at the first maybe-pinned page; the
            # vectorised model checks the whole range first and processes none of it,
            # so recovery starts at ``lo`` (the entries before the pinned one are then
            # copied by the copy_pte_range fallback, with the same accounting).
            return -EAGAIN
        t.walk = (src_t.pfn, lo, hi)  # what it checked and will now process
        try:
            yield "copy_present_pte:checked"
        finally:
            t.walk = None
        # Re-read: entries may have changed only through lockless paths (hardware A/D).
        e = src_t.entries[lo:hi].copy()
        if have is not None:
            e[have] = 0
        present = (e & PTE_PRESENT) != 0
        pfn = np.where(present, e >> PFN_SHIFT, 0)
        normal = present & (pfn != ZERO_PFN)
        fl = pool.flags[pfn]
        anon = normal & ((fl & PG_anon) != 0)
        shm = normal & ((fl & PG_shmem) != 0)
        # Eager copies for maybe-pinned pages (copy_present_page). If the allocation
        # fails at entry i, copy_pte_range returns -ENOMEM with entries [lo, lo + i)
        # already copied (mm/memory.c: -EAGAIN, page_copy_prealloc fails); the caller
        # tears the half-built child down, so those entries must be fully accounted.
        dst = e.copy()
        err = 0
        for i in pinned.nonzero()[0].tolist():
            new = self.alloc_page("copy_present_page")
            if new is None:
                err = -ENOMEM
                e, dst, present, pfn = e[:i], dst[:i], present[:i], pfn[:i]
                if have is not None:
                    have = have[:i]
                normal, anon, shm, pinned = normal[:i], anon[:i], shm[:i], pinned[:i]
                break
            pool.content[new] = pool.content[int(pfn[i])]
            for c in ("page_alloc", "page_copy", "page_account"):
                self.cost.charge(c)
            # copy_present_page: page_add_new_anon_rmap(new_page, dst_vma, addr); the
            # child's VMA has the parent's vm_pgoff, so the index is the parent page's.
            self.page_add_new_anon_rmap(new, dst_vma, 0, index=int(pool.index[int(pfn[i])]))
            dst[i] = mk_pte(new, write=bool(dst_vma.flags & VM_WRITE), dirty=True,
                            young=True, user=bool(e[i] & PTE_USER))
            dst_mm.rss[MM_ANONPAGES] += 1
        share = normal & ~pinned
        sp = pfn[share]
        if len(sp):
            self.get_pages(sp)
            np.add.at(pool.mapcount, sp, 1)
            pool.flags[pfn[share & anon]] &= ~np.int64(PG_anon_exclusive)
        dst_mm.rss[MM_ANONPAGES] += int(np.count_nonzero(share & anon))
        dst_mm.rss[MM_SHMEMPAGES] += int(np.count_nonzero(share & shm))
        swp = (e & PTE_SWAP) != 0
        # copy_present_pte / copy_nonpresent_pte: every entry copied, every page and
        # swap entry accounted (get_page + page_try_dup_anon_rmap + rss, swap_duplicate).
        self.cost.charge("fork_pte_copy", int(np.count_nonzero(e)))
        self.cost.charge("fork_page_account", len(sp) + int(np.count_nonzero(swp)))
        if np.count_nonzero(swp):
            for s in (e[swp] >> PFN_SHIFT).tolist():
                self.swap.swap_map[s] += 1
            dst_mm.rss[MM_SWAPENTS] += int(np.count_nonzero(swp))
        # copy_nonpresent_pte, migration entries (6.2): rss[mm_counter(page)]++, and
        # "COW mappings require pages in both parent and child to be set to read. A
        # previously exclusive entry is now shared": make_readable_migration_entry.
        mig = (e & PTE_MIGRATION) != 0
        dst_mm.rss[MM_ANONPAGES] += int(np.count_nonzero(mig))
        src_new = e.copy()
        src_new[swp] &= ~np.int64(PTE_SWP_EXCLUSIVE)
        if cow:
            src_new[share] &= ~np.int64(PTE_WRITE)
            src_new[mig] &= ~np.int64(PTE_WRITE | PTE_SWP_EXCLUSIVE)
        mask = share | swp | mig
        dst[mask] = src_new[mask]
        dst[share] &= ~np.int64(PTE_YOUNG)
        if dst_vma.shared:
            dst[share] &= ~np.int64(PTE_DIRTY)
        if dst_t is src_t:
            # COW PTE: one entry serves both; the parent's PTE is made old/clean too.
            if np.count_nonzero(dst != e):
                self.set_ptes(t, src_mm, src_t, lo, dst, "copy_present_pte")
        elif len(e):
            if have is not None:
                # Slots the child already has keep their entries in both tables.
                cur = src_t.entries[lo:lo + len(e)]
                src_new[have] = cur[have]
                e[have] = cur[have]
                dst[have] = dst_t.entries[lo:lo + len(e)][have]
            if np.count_nonzero(src_new != e):
                self.set_ptes(t, src_mm, src_t, lo, src_new, "copy_present_pte")
            self.set_ptes(t, dst_mm, dst_t, lo, dst, "copy_present_pte")
        return err
