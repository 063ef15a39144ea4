"""COW PTE v4 ("Introduce Copy-On-Write to Page Table", Chih-En Lin, Feb 2023).

:class:`CowPteKernel` overrides the ``cow_*`` hooks of the upstream kernel with the
functions of the patch series, named as in the patches: ``copy_cow_pte_range``,
``recover_pte_range``, ``handle_cow_pte_fault``, ``break_cow_pte``,
``break_cow_pte_range``, ``pmd_get_pte``/``pmd_put_pte``, ``cow_pte_count``.

Design (BRIEF §3, reference notes §1): enabled per process by ``prctl(PR_SET_COW_PTE)``
(``MMF_COW_PTE_READY``, turned into ``MMF_COW_PTE`` at the next fork, inherited, never
cleared). At fork every populated PMD of an ``MMF_COW_PTE`` mm is shared: the child's
PMD points at the parent's table (table refcount + 1) and both PMD entries are
write-protected, while the per-page accounting of ``copy_present_pte`` is still done
for every entry. A write/unshare fault, or a walker that modifies entries, breaks the
COW first: a table with refcount 1 is just made writable again; otherwise the entries
are copied into a new table for this mm.

Every flaw of the catalogue (BRIEF §4) is the flawed code path itself, chosen by
``config.has(flaw)``; a comment above each says what v4 does, where the flaw comes
from, and what the fixed path does instead. Oracles know nothing of flaws.
"""

from __future__ import annotations

import numpy as np

from .fault import (
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_VMA_LOCK,
    FAULT_FLAG_WRITE,
    VM_FAULT_OK,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
)
from .kernel import Kernel
from .locks import SINGLE_DEPTH_NESTING, WRITE, SpinLock
from .mm import MMF_COW_PTE, VM_DONTCOPY, VM_WIPEONFORK, MmStruct, Vma
from .ops import EAGAIN, EINVAL, ENOMEM
from .pgtable import PTE_MIGRATION, PmdEntry, PteTable
from .rmap import PVMW_BREAK_COW_PTE_SITES
from .sched import Gen, Thread


class CowPteKernel(Kernel):
    """The ``cowpte`` variant: upstream plus COW PTE v4, with switchable flaws."""

    variant = "cowpte"

    # ------------------------------------------------------------------ table refcount
    @staticmethod
    def cow_pte_count(table: PteTable) -> int:
        """``cow_pte_count``: the table page's refcount = number of sharing PMDs."""
        return table.refcount

    @staticmethod
    def pmd_get_pte(pmd: PmdEntry) -> int:
        """``pmd_get_pte``: ``page_ref_inc_return`` on the table page."""
        pmd.table.refcount += 1
        return pmd.table.refcount

    @staticmethod
    def pmd_put_pte(pmd: PmdEntry) -> bool:
        """``pmd_put_pte``: ``page_ref_add_unless(page, -1, 1)`` on the table's refcount.

        True only if it decremented (the count was above 1).
        """
        if pmd.table.refcount > 1:
            pmd.table.refcount -= 1
            return True
        return False

    def _flush_tlb_range(self, t: Thread, mm: MmStruct, idx: int) -> None:
        """``flush_tlb_range(vma, start, end)`` over the PMD (recorded in the trace).

        v4 03/14 ends ``handle_cow_pte_fault`` with it (after ``pte_unmap_unlock`` of the
        old table); :meth:`TlbMixin.flush_tlb_range` drops the mm's entries of the PMD and
        its paging-structure caches.
        """
        self._ev(t.tid, "event", "flush_tlb_range", {"mm": mm.id, "pmd": idx})
        self.flush_tlb_range(mm, idx * self.P, (idx + 1) * self.P)
        self.cost.charge("tlb_flush_range")

    # ------------------------------------------------------------------ fork
    def cow_fork_seq_brackets_sharing(self, src_mm: MmStruct) -> bool:
        """Whether ``copy_page_range``'s seqcount section covers table sharing.

        Flaw ``gup-fast-fork-race``, *seeded* (review R8, DH: "GUP-fast can race with
        pretty much anything, even with concurrent fork"; v4 02/14 shares from
        ``copy_pmd_range``, inside ``copy_page_range``'s
        ``raw_write_seqcount_begin(&src_mm->write_protect_seq)``, so as-posted does not
        have it): the sharing outside the ``write_protect_seq`` handshake, so GUP-fast
        does not back off while fork clears PageAnonExclusive and write-protects the
        shared entries; a pin taken in that window ends up in a shared table. Fixed (and
        v4): the seqcount brackets the COW PTE path exactly as it brackets
        ``copy_pte_range`` upstream.
        """
        return not (src_mm.flags & MMF_COW_PTE and self.config.has("gup-fast-fork-race"))

    def cow_copy_pmd(self, t: Thread, dst_vma: Vma, src_vma: Vma, idx: int, lo: int,
                     hi: int) -> Gen:
        """``copy_pmd_range`` with COW PTE (v4 02/14): share the table, or fall back to copying.

        v4::

            if (pmd_none(*src_pmd))
                    continue;
            /* Skip if the PTE already did COW PTE this time. */
            if (!pmd_none(*dst_pmd) && !pmd_write(*dst_pmd))
                    continue;
            ret = copy_cow_pte_range(dst_vma, src_vma, dst_pmd, src_pmd, addr, next,
                                     &recover_end);
            if (!ret) continue;
            else if (ret == -EAGAIN) {
                    if (recover_pte_range(dst_vma, src_vma, dst_pmd, src_pmd, recover_end))
                            return -ENOMEM;
                    if (!range_in_vma(src_vma, recover_end, recover_end + PAGE_SIZE))
                            continue;
                    else
                            addr = recover_end;
            } else if (ret) return -ENOMEM;

        Returns ``(status, resume)``: ``"done"``, ``"copy"`` (``copy_pte_range`` from
        ``resume``), ``"fill"`` (``copy_pte_range`` into the ``pte_none`` slots of the
        child's existing table), or an errno.

        Flaw ``recover-double-copy`` (reference notes C7): v4 skips only a *write-protected*
        child PMD. A child table made by ``recover_pte_range`` for an earlier VMA of the
        same PMD is writable, so the next VMA's ``copy_pmd_range`` calls
        ``copy_cow_pte_range`` again: every entry of the PMD is accounted to the child a
        second time (``copy_present_pte``: ``get_page``, ``page_try_dup_anon_rmap``, rss),
        ``pmd_install`` does nothing (the PMD is populated), and either ``set_pmd_at(dst_mm,
        orig_addr, dst_pmd, pmd_wrprotect(*src_pmd))`` or a second ``recover_pte_range``
        (``pmd_clear(dst_pmd)``) drops the first private table without freeing it. Fixed,
        with no per-fork bookkeeping: the child's table itself says what is done — every
        entry in it is already accounted, so the later VMA copies only into its
        ``pte_none`` slots (a fork holds both mmap_locks for write: no fault can fill a slot
        meanwhile).
        """
        src_mm, dst_mm = src_vma.mm, dst_vma.mm
        if not src_mm.flags & MMF_COW_PTE:
            return ("copy", lo)
        dpmd = dst_mm.pmd.get(idx)
        if dpmd is not None and not dpmd.write:
            return ("done", lo)  # already shared by this fork
        if dpmd is not None and not self.config.has("recover-double-copy"):
            return ("fill", lo)
        ret, recover_end, snapshot = yield from self.copy_cow_pte_range(t, dst_vma, src_vma,
                                                                        idx)
        if ret == 0:
            return ("done", lo)
        if ret != -EAGAIN:
            return (ret, lo)
        ret = yield from self.recover_pte_range(t, dst_vma, src_vma, idx, recover_end,
                                                snapshot)
        if ret:
            return (ret, lo)
        # Flaw recover-skips-vma (found by cowenv's random-schedule soak): v4 falls back
        # to copy_pte_range from recover_end only "if recover_end lies inside src_vma",
        # otherwise it continues. When the VMA that refused sharing (VM_DONTCOPY) lies
        # *before* src_vma in the PMD, recover_end is below src_vma and src_vma's
        # entries are never copied: the child silently loses that memory. Fixed: copy
        # src_vma's part from max(lo, recover_end).
        if self.config.has("recover-skips-vma"):
            if lo <= recover_end < hi:
                return ("copy", recover_end)
            return ("done", lo)
        start = max(lo, recover_end)
        return ("copy", start) if start < hi else ("done", lo)

    def _vmas_refuse_sharing(self, curr: Vma) -> bool:
        """``copy_cow_pte_range``'s test of a VMA in the PMD: must the table stay private?

        Flaw ``wipeonfork-shared`` (analysis C4): v4 checks only ``VM_DONTCOPY``, so a
        ``VM_WIPEONFORK`` VMA inside the PMD is shared and the child sees the parent's
        data. Fixed: ``VM_WIPEONFORK`` also refuses sharing (-EAGAIN).
        """
        if curr.flags & VM_DONTCOPY:
            return True
        return not self.config.has("wipeonfork-shared") and bool(curr.flags & VM_WIPEONFORK)

    def _lock_fork_pmds(self, t: Thread, dst_mm: MmStruct, ptl: SpinLock) -> Gen:
        """Take the child's PMD lock and the source table's PTL for ``copy_cow_pte_range``.

        Upstream order (``pmd_lock`` → PTE lock) unless flaw ``fork-ptl-nesting`` is on:
        then the PMD lock is taken inside the PTL, where v4 02/14's ``pmd_install`` takes
        it (``spin_lock(src_ptl); pmd_get_pte(src_pmd); pmd_install(...)``), and held
        over the section. Returns whether the order was upstream's (the callers unlock
        accordingly).
        """
        nested = not self.config.has("fork-ptl-nesting")
        if nested:
            yield from self.lock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
            # spin_lock_nested(ptl, SINGLE_DEPTH_NESTING), as retract_page_tables (6.5)
            yield from self.lock(t, ptl, WRITE, "copy_cow_pte_range", SINGLE_DEPTH_NESTING)
        else:
            # v4: spin_lock(src_ptl) ... pmd_install() -> pmd_lock(dst_mm, dst_pmd): two
            # ptlocks (split PMD ptlocks: one lockdep class) with no nesting annotation;
            # lockdep says "possible recursive locking detected".
            yield from self.lock(t, ptl, WRITE, "copy_cow_pte_range")
            yield from self.lock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        return nested

    def copy_cow_pte_range(self, t: Thread, dst_vma: Vma, src_vma: Vma, idx: int) -> Gen:
        """``copy_cow_pte_range``: share the whole PMD's table with the child.

        For **every VMA overlapping the PMD** (``for_each_vma_range``) the per-entry work
        of ``copy_present_pte``/``copy_nonpresent_pte`` with ``dst_pte == src_pte`` and
        rss charged to the child; a VMA that refuses sharing (:meth:`_vmas_refuse_sharing`),
        or a page that may be pinned, gives -EAGAIN with ``recover_end``.

        Fixed design: everything under the source PTL, taken once for the whole PMD
        (after the child's PMD lock: upstream's ``pmd_lock`` → PTE lock), and on success
        ``pmd_get_pte`` + link the child's PMD write-protected + write-protect the
        parent's, still under that lock; the PTL is dropped after (``cond_resched``).
        No walker can see the table shared behind a writable PMD, nor an entry change
        between being accounted for the child and being shared.

        Flaw ``fork-late-wrprotect`` (v4 02/14, line by line; see
        :meth:`_copy_cow_pte_range_v4`): v4 links the child's PMD *writable* first,
        processes the VMAs under the PTL one at a time with ``cond_resched()`` between
        them, and write-protects both PMDs at ``out:`` with no lock held.

        Flaw ``fork-ptl-nesting`` (v4 02/14): v4 takes the child's PMD lock inside the
        source PTE lock (``spin_lock(src_ptl); pmd_get_pte(src_pmd);
        pmd_install(dst_mm, dst_pmd, &pte_table);``), against upstream's pmd_lock ->
        PTE lock order (locks.LOCK_ORDER); on x86-64 with split PMD ptlocks both are
        ptlocks, of the one lockdep class of ptlock_init()'s spin_lock_init, so lockdep
        reports recursive locking there.

        Returns ``(0 | -EAGAIN | -ENOMEM, recover_end offset, snapshot)``; the snapshot
        (fixed design) holds the processed entries ``[0, recover_end)`` taken under the
        src PTL, None when v4's order is modelled (v4 re-reads them in
        ``recover_pte_range``). Lock contract: both mmap_locks write; takes the src PTL
        (+ the child's ``pmd_lock`` for ``pmd_install``).
        """
        src_mm, dst_mm = src_vma.mm, dst_vma.mm
        P = self.P
        if not self.config.has("vma-lock-fault-breaks-shared"):
            # Per-VMA locks (6.4) postdate v4: dup_mmap write-locks each VMA just before
            # copying it, but sharing the table also exposes the PMD's later VMAs, whose
            # VMA-locked faults may still be running. The fixed design write-locks every
            # VMA of the PMD first. As posted (flaw vma-lock-fault-breaks-shared: the
            # design ignores per-VMA locks) it does not.
            for v in src_mm.vmas_in(idx * P, (idx + 1) * P):
                yield from self.vma_start_write(t, v)
            if idx not in src_mm.pmd:
                # Emptied while fork waited for a VMA lock (only v4's pmd_clear window
                # can do that under fork's mmap_lock): nothing left to share.
                return 0, 0, None
        if self.config.has("fork-late-wrprotect"):
            return (yield from self._copy_cow_pte_range_v4(t, dst_vma, src_vma, idx))
        spmd = src_mm.pmd[idx]
        table = spmd.table
        ptl = self.pte_lockptr(src_mm, table)
        nested = yield from self._lock_fork_pmds(t, dst_mm, ptl)
        ret, recover_end = 0, 0
        snapshot = np.zeros(0, dtype=np.int64)
        for curr in src_mm.vmas_in(idx * P, (idx + 1) * P):
            vlo = max(curr.start, idx * P) - idx * P
            vhi = min(curr.end, (idx + 1) * P) - idx * P
            refuse = self._vmas_refuse_sharing(curr)
            # Flaw fork-shares-migration-entry (v4 02/14): the entries of the PMD's
            # later VMAs are shared (copy_nonpresent_pte: a migration entry is copied
            # for the child, readable) before dup_mmap reaches those VMAs and
            # anon_vma_fork links the child's copies into the rmap, so a
            # remove_migration_ptes walk in between does not see the child's mapping
            # and leaves its migration entry behind. Upstream copies each VMA's entries
            # only after its anon_vma_fork. Fixed: a VMA of the PMD with a migration
            # entry refuses sharing before its entries are processed (-EAGAIN:
            # recovery, then a private copy per VMA, as upstream copies them). src_vma
            # too: recovery installs a snapshot of the processed entries after the PTL
            # was dropped, and a migration entry in it could be resolved meanwhile
            # (found by the soak).
            if (not refuse
                    and not self.config.has("fork-shares-migration-entry")
                    and np.count_nonzero(table.entries[vlo:vhi] & PTE_MIGRATION)):
                refuse = True
            if refuse:
                ret, recover_end = -EAGAIN, vlo
                break
            r = yield from self.copy_pte_entries(t, curr, curr, table, table, vlo, vhi,
                                                 dst_mm=dst_mm)
            if r:
                # -EAGAIN: copy_pte_entries processed none of [vlo, vhi) (see its
                # docstring).
                ret, recover_end = r, vlo
                break
        if ret == -EAGAIN:
            # Snapshot the processed entries under the src PTL: recover_pte_range runs
            # after the PTL is dropped, and an rmap walker (no mmap_lock) may change the
            # parent's entries meanwhile; the child must get what was accounted for it.
            snapshot = table.entries[:recover_end].copy()
        if ret == 0:
            self.pmd_get_pte(spmd)
            self._set_child_pmd(dst_mm, idx, table)
            spmd.write = False  # pmdp_set_wrprotect(src)
            self.cost.charge("table_ref")
            self.cost.charge("pmd_update", 2)
        if not nested:
            self.unlock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        self.unlock(t, ptl, WRITE, "copy_cow_pte_range")
        if nested:
            self.unlock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        yield "copy_cow_pte_range:done"
        return ret, recover_end, snapshot

    def _set_child_pmd(self, dst_mm: MmStruct, idx: int, table: PteTable) -> None:
        """``set_pmd_at(dst_mm, orig_addr, dst_pmd, pmd_wrprotect(*src_pmd))``.

        Links ``table`` write-protected. A child PMD that ``pmd_install`` found populated
        (flaw ``recover-double-copy``: the private table of an earlier
        ``recover_pte_range``) is overwritten and that table leaked, as in v4; otherwise
        the link is charged to the child's ``nr_ptes`` (``pmd_install``'s
        ``mm_inc_nr_ptes``).
        """
        cur = dst_mm.pmd.get(idx)
        if cur is None:
            dst_mm.mm_inc_nr_ptes()
        dst_mm.pmd[idx] = PmdEntry(table, False)

    def _copy_cow_pte_range_v4(self, t: Thread, dst_vma: Vma, src_vma: Vma,
                               idx: int) -> Gen:
        """v4's ``copy_cow_pte_range`` in v4's order (flaw ``fork-late-wrprotect``).

        v4 02/14, ``mm/memory.c``::

            src_ptl = pte_lockptr(src_mm, src_pmd);
            spin_lock(src_ptl);
            pmd_get_pte(src_pmd);
            pmd_install(dst_mm, dst_pmd, &pte_table);
            spin_unlock(src_ptl);
            ...
            for_each_vma_range(vmi, curr, end) {
                    ...
                    if (curr->vm_flags & VM_DONTCOPY) {
                            *recover_end = addr;
                            return -EAGAIN;
                    }
            again:
                    ...
                    spin_lock(src_ptl);
                    do { ... copy_present_pte(curr, curr, src_pte, src_pte, addr, rss,
                                               NULL); ... } while (...);
                    ...
                    spin_unlock(src_ptl);
                    pte_unmap(orig_src_pte);
                    cond_resched();
                    ...
                    } else if (ret == -EAGAIN) {
                            *recover_end = addr;
                            return -EAGAIN;
                    }
                    ...
            }
            out:
            pmdp_set_wrprotect(src_mm, orig_addr, src_pmd);
            set_pmd_at(dst_mm, orig_addr, dst_pmd, pmd_wrprotect(*src_pmd));

        ``pmd_install`` (v6.2 ``mm/memory.c``) populates a still-empty PMD with
        ``pmd_populate``, a *writable* table entry (x86 ``_PAGE_TABLE`` has ``_PAGE_RW``),
        so from the first ``spin_unlock`` until ``out:`` the table has refcount 2 and
        both PMDs are writable, and the PTL is dropped after every VMA. An rmap walker
        holds no mmap_lock (only the anon_vma lock of its VMA, which fork does not hold
        while copying): ``try_to_unmap_one`` → ``page_vma_mapped_walk`` →
        ``break_cow_pte`` returns 0 at ``if (pmd_none(*pmd) || pmd_write(*pmd))``, and the
        walker rewrites an entry fork has already accounted to the child — a write to a
        shared table, accounted for the parent only. The same holds on the -EAGAIN path
        until ``recover_pte_range``'s ``pmd_put_pte``: there the walker's change is what
        ``recover_pte_range`` then copies into the child (``set_pte_at(dst_mm, addr,
        dst_pte, *src_pte)``), although the child was accounted for the old entry.

        The preemption point ``copy_cow_pte_range:cond_resched`` is v4's
        ``cond_resched()`` after each VMA (any point with no lock held is one on
        ``CONFIG_PREEMPT``, which ``CONFIG_COW_PTE`` allows; on SMP a walker on another
        CPU needs no preemption at all, only the dropped PTL).
        Not modelled: ``copy_nonpresent_pte``'s -EIO (``add_swap_count_continuation``)
        and -EBUSY (device-exclusive) returns.
        """
        src_mm, dst_mm = src_vma.mm, dst_vma.mm
        P = self.P
        spmd = src_mm.pmd[idx]
        table = spmd.table
        ptl = self.pte_lockptr(src_mm, table)
        # spin_lock(src_ptl); pmd_get_pte(src_pmd); pmd_install(dst_mm, dst_pmd, &pte_table);
        nested = yield from self._lock_fork_pmds(t, dst_mm, ptl)
        self.pmd_get_pte(spmd)
        self.cost.charge("table_ref")
        if dst_mm.pmd.get(idx) is None:
            self.pmd_populate(dst_mm, idx, table)  # writable, nr_ptes++
        if not nested:
            self.unlock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        self.unlock(t, ptl, WRITE, "copy_cow_pte_range")
        if nested:
            self.unlock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        table.fork_tid = t.tid
        ret, recover_end = 0, 0
        try:
            for curr in src_mm.vmas_in(idx * P, (idx + 1) * P):
                vlo = max(curr.start, idx * P) - idx * P
                vhi = min(curr.end, (idx + 1) * P) - idx * P
                if self._vmas_refuse_sharing(curr):
                    return -EAGAIN, vlo, None
                yield from self.lock(t, ptl, WRITE, "copy_cow_pte_range")
                r = yield from self.copy_pte_entries(t, curr, curr, table, table, vlo, vhi,
                                                     dst_mm=dst_mm)
                self.unlock(t, ptl, WRITE, "copy_cow_pte_range")
                yield "copy_cow_pte_range:cond_resched"
                if r:
                    return r, vlo, None
        finally:
            table.fork_tid = None
        # out: no lock held. *src_pmd is read again here: if the parent's PMD was already
        # write-protected (shared by an earlier fork), an rmap walker may have broken it
        # meanwhile, and the child is linked to whatever the parent has now (with no
        # reference taken on it), or, inside v4's pmd_clear window, to an empty PMD.
        cur = src_mm.pmd.get(idx)
        if cur is None:
            dst_mm.pmd.pop(idx, None)  # set_pmd_at(dst, pmd_wrprotect(none)): nr_ptes kept
        else:
            cur.write = False  # pmdp_set_wrprotect(src_mm, orig_addr, src_pmd)
            self._set_child_pmd(dst_mm, idx, cur.table)
        self.cost.charge("pmd_update", 2)
        yield "copy_cow_pte_range:done"
        return ret, recover_end, None

    def recover_pte_range(self, t: Thread, dst_vma: Vma, src_vma: Vma, idx: int,
                          recover_end: int, snapshot: np.ndarray | None) -> Gen:
        """``recover_pte_range``: give the child a private table holding the processed entries.

        v4 02/14::

            mm_dec_nr_ptes(dst_mm);
            pmd_clear(dst_pmd);
            if (pte_alloc(dst_mm, dst_pmd))
                    return -ENOMEM;
            ... for each VMA up to recover_end, under dst_ptl then src_ptl:
                    set_pte_at(dst_mm, addr, dst_pte, *src_pte);
            spin_lock(src_ptl);
            pmd_put_pte(src_pmd);
            spin_unlock(src_ptl);

        The table holds the entries ``[PMD start, recover_end)`` already processed
        (accounted, write-protected): the fixed design's ``snapshot`` taken under the src
        PTL, or (``snapshot`` None, v4's order) the source entries as they are now. The
        child's PMD is unlinked first if populated: by v4's early ``pmd_install``
        (``fork-late-wrprotect``, whose table reference is dropped at the end), or by an
        earlier ``recover_pte_range`` of this fork (``recover-double-copy``: that private
        table is leaked, as in v4).

        v4 leaks the parent's table reference if this ``pte_alloc`` fails (reference
        notes C3); the model instead undoes the child's accounting of the processed
        entries and fails the fork with -ENOMEM (not catalogued as a flaw).
        Lock contract: both mmap_locks write; takes both PTLs.
        """
        src_mm, dst_mm = src_vma.mm, dst_vma.mm
        early = snapshot is None  # v4's order: the child's PMD points at ``table``
        spmd = src_mm.pmd.get(idx)
        if spmd is None:
            # Only in v4's order: the parent's PMD, already shared by an earlier fork, was
            # broken by an rmap walker and is inside v4's pmd_clear window; v6.2's
            # pte_offset_map(src_pmd) walks it as it is.
            self._report("memory-safety", "recover_pte_range",
                         "pte_offset_map walks a cleared PMD (v6.2 has no pmd_none check)")
            return -ENOMEM
        table = spmd.table
        cur = dst_mm.pmd.get(idx)
        if cur is not None:
            dst_mm.mm_dec_nr_ptes()
            del dst_mm.pmd[idx]  # pmd_clear(dst_pmd)
        new = self.pte_alloc_one(dst_mm, "recover_pte_range")
        sptl = self.pte_lockptr(src_mm, table)
        if new is None:
            yield from self.lock(t, sptl, WRITE, "recover_pte_range")
            snap = PteTable(-1, self.P, None, -1)
            snap.entries[:recover_end] = (table.entries[:recover_end] if early
                                          else snapshot)
            self.zap_pte_range(t, _VmaView(dst_mm, src_vma), snap, idx, 0, recover_end,
                               clear=False)
            if early and idx in src_mm.pmd:
                self.pmd_put_pte(src_mm.pmd[idx])
            self.unlock(t, sptl, WRITE, "recover_pte_range")
            return -ENOMEM
        yield from self.lock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        self.pmd_populate(dst_mm, idx, new)
        self.unlock(t, dst_mm.page_table_lock, WRITE, "pmd_install")
        dptl = self.pte_lockptr(dst_mm, new)
        yield from self.lock(t, dptl, WRITE, "recover_pte_range")
        # v4 02/14: dst_pte = pte_offset_map_lock(dst_mm, dst_pmd, ...); then
        # src_pte = pte_offset_map_lock(src_mm, src_pmd, ...): plain spin_lock, flaw
        # ptl-recursive-nesting; else spin_lock_nested as copy_pte_range.
        nest = 0 if self.config.has("ptl-recursive-nesting") else SINGLE_DEPTH_NESTING
        yield from self.lock(t, sptl, WRITE, "recover_pte_range", nest)
        if recover_end:
            snap = table.entries[:recover_end].copy() if early else snapshot
            self.cost.charge("fork_pte_copy", int(np.count_nonzero(snap)))
            self.set_ptes(t, dst_mm, new, 0, snap, "recover_pte_range")
        self.unlock(t, sptl, WRITE, "recover_pte_range")
        self.unlock(t, dptl, WRITE, "recover_pte_range")
        if early:
            # spin_lock(src_ptl); pmd_put_pte(src_pmd); spin_unlock(src_ptl);
            yield from self.lock(t, sptl, WRITE, "recover_pte_range")
            cur = src_mm.pmd.get(idx)
            if cur is None:
                self._report("memory-safety", "recover_pte_range",
                             "pmd_put_pte of a cleared PMD (v6.2 has no pmd_none check)")
            else:
                self.pmd_put_pte(cur)
            self.unlock(t, sptl, WRITE, "recover_pte_range")
            yield "recover_pte_range:cond_resched"  # v4's cond_resched() at the end
        return 0

    # ------------------------------------------------------------------ breaking COW
    def break_cow_pte(self, t: Thread, vma: Vma, idx: int, site: str,
                      nofail: bool = False) -> Gen:
        """``break_cow_pte``: unshare the table behind ``vma``'s PMD ``idx``.

        Returns 0 (not shared, reused, or broken) or -ENOMEM.
        """
        return (yield from self.handle_cow_pte_fault(t, vma, idx, 0, site, nofail))

    def break_cow_pte_range(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``break_cow_pte_range``: break every PMD of ``[start, end)``.

        Returns the number of failures, or -EINVAL if the range is not inside the VMA.
        """
        if start < vma.start or end > vma.end:
            return -EINVAL
        fails = 0
        for idx in range(start // self.P, (end - 1) // self.P + 1):
            r = yield from self.break_cow_pte(t, vma, idx, "break_cow_pte_range")
            fails += r != 0
        return fails

    def handle_cow_pte_fault(self, t: Thread, vma: Vma, idx: int, flags: int, site: str,
                             nofail: bool = False) -> Gen:
        """``handle_cow_pte_fault`` (v4 03/14): returns 0, -ENOMEM or VM_FAULT_RETRY.

        Entry: nothing to do if ``pmd_none`` or ``pmd_write``. Fast path (under the
        table's PTL): ``cow_pte_count == 1`` → make the PMD writable. Slow path: copy the
        entries (already accounted and write-protected) into a new table for this mm
        and drop the old table's reference; flush the TLB.
        """
        mm = vma.mm
        pmd = mm.pmd.get(idx)
        if pmd is None or pmd.write:
            return 0
        # Flaw fault-asserts-write-lock (seed thread, review R3): v4 asserts
        # mmap_assert_write_locked() here although faults, MADV_DONTNEED/FREE and
        # rmap callers do not hold mmap_lock for write — a lockdep splat (DH: "you
        # didn't test with lockdep enabled"). Fixed: assert what callers hold
        # (mmap_lock in any mode, or the VMA lock, or the rmap/anon_vma lock).
        if self.config.has("fault-asserts-write-lock"):
            self.mmap_assert_write_locked(t, mm, "handle_cow_pte_fault")
        # Flaw vma-lock-fault-breaks-shared (seed, review R4): under a per-VMA lock v4
        # breaks a table that also maps neighbouring VMAs which that lock does not
        # cover, with the same slow path it uses under mmap_lock; munmap/mprotect of a
        # neighbour (mmap_lock write) runs concurrently. Fixed: a fault that meets a
        # shared table under the VMA lock returns VM_FAULT_RETRY and is retried under
        # mmap_lock.
        if flags & FAULT_FLAG_VMA_LOCK and not self.config.has("vma-lock-fault-breaks-shared"):
            return VM_FAULT_RETRY
        mm.write_protect_seq += 1  # raw_write_seqcount_begin: GUP-fast backs off
        self.cost.enter(t, "deferred")  # a break is a cost the fork deferred
        try:
            ret = yield from self._break_table(t, vma, idx, nofail,
                                               racy=bool(flags & FAULT_FLAG_VMA_LOCK))
        finally:
            self.cost.leave(t)
            mm.write_protect_seq += 1
        return ret

    def _break_table(self, t: Thread, vma: Vma, idx: int, nofail: bool, racy: bool) -> Gen:
        mm = vma.mm
        pmd = mm.pmd.get(idx)
        if pmd is None or pmd.write:
            return 0
        table = pmd.table
        ptl = self.pte_lockptr(mm, table)
        yield from self.lock(t, ptl, WRITE, "handle_cow_pte_fault")
        cur = mm.pmd.get(idx)
        if cur is not pmd or pmd.write:
            self.unlock(t, ptl, WRITE, "handle_cow_pte_fault")
            return 0
        if self.cow_pte_count(table) == 1:
            pmd.write = True  # fast path: reuse the table
            self.cost.charge("pmd_update")
            self.unlock(t, ptl, WRITE, "handle_cow_pte_fault")
            self._flush_tlb_range(t, mm, idx)
            return 0
        self.unlock(t, ptl, WRITE, "handle_cow_pte_fault")
        window = self.config.has("pmd-clear-window") or (
            racy and self.config.has("vma-lock-fault-breaks-shared"))
        if window or self.config.has("table-free-no-deferral") or self.config.has(
                "ptl-recursive-nesting"):
            return (yield from self._break_slow_v4(t, vma, idx, pmd, nofail, window))
        if self.config.has("nr-ptes-on-oom"):
            # v4 uncharges the table before allocating (see _break_slow_v4).
            mm.mm_dec_nr_ptes()
            ret = yield from self._break_slow_fixed(t, vma, idx, pmd, nofail)
            if ret == 0:
                mm.mm_inc_nr_ptes()
            return ret
        return (yield from self._break_slow_fixed(t, vma, idx, pmd, nofail))

    def _break_slow_v4(self, t: Thread, vma: Vma, idx: int, cowed: PmdEntry,
                       nofail: bool, window: bool = True) -> Gen:
        """v4's slow path of ``handle_cow_pte_fault`` (03/14, ``mm/memory.c``), line by line.

        v4::

            cowed_entry = READ_ONCE(*pmd);
            mm_dec_nr_ptes(mm);
            pmd_clear(pmd);
            orig_dst_pte = dst_pte = pte_alloc_map_lock(mm, pmd, addr, &dst_ptl);
            if (unlikely(!dst_pte)) {
                set_pmd_at(mm, addr, pmd, cowed_entry);
                ret = -ENOMEM; goto out;
            }
            src_pte = pte_offset_map_lock(mm, &cowed_entry, addr, &src_ptl);
            do { if (pte_none(*src_pte)) continue;
                 set_pte_at(mm, addr, dst_pte, *src_pte); } while (...);
            pte_unmap_unlock(orig_dst_pte, dst_ptl);
            if (!pmd_put_pte(&cowed_entry)) { ... clear the new table; pmd_clear(pmd);
                 pte_free(mm, token); set_pmd_at(mm, start, pmd, pmd_mkwrite(cowed)); }
            pte_unmap_unlock(orig_src_pte, src_ptl);

        ``pte_alloc_map_lock`` (v6.2 ``include/linux/mm.h``) is ``pte_alloc(mm, pmd) ?
        NULL : pte_offset_map_lock(...)``; ``pte_alloc`` allocates only if
        ``pmd_none(*pmd)``, and ``__pte_alloc`` → ``pmd_install`` (``mm/memory.c``) takes
        ``pmd_lock`` and installs only ``if (likely(pmd_none(*pmd)))``, else frees its
        table. So no PMD is overwritten: a table that a concurrent fault installed in the
        window is reused as ``dst``.

        Flaw ``pmd-clear-window`` (review R3; DH: "what stops another page fault
        stumbling over that pmd_none() and allocating an empty page table?"): between
        ``pmd_clear`` and ``pte_alloc_map_lock`` no lock is held; a concurrent fault of
        the same mm (mmap_lock read) sees ``pmd_none``, installs its own table and maps a
        fresh page. The breaker then copies every non-none entry of the old shared table
        into that table with ``set_pte_at``: at an offset the shared table maps, the
        concurrent fault's fresh page is overwritten (leaked: mapcount, refcount and
        MM_ANONPAGES still count it) and its write is lost. At an offset the shared table
        leaves empty nothing is lost. Fixed (:meth:`_break_slow_fixed`): no ``pmd_none``
        window at all. With ``window`` False (``table-free-no-deferral`` on without
        ``pmd-clear-window``) the window is closed: the new table replaces the old one
        under ``pmd_lock`` after ``pmd_same``, so only the table free differs from the
        fixed design; from the copy on the lines are v4's.

        Flaw ``table-free-no-deferral`` (analysis C6): when ``pmd_put_pte`` fails, v4
        frees the new table, which has been visible in the PMD since ``pmd_install``,
        with ``pmd_clear(pmd); pte_free(mm, token);``: no ``tlb_remove_table`` (no RCU
        grace period, no IPI) and no TLB flush before the free (``flush_tlb_range`` comes
        after ``pte_unmap_unlock(orig_src_pte, src_ptl)``). A GUP-fast walker of the same
        mm (IRQs off, no locks) that read the PMD meanwhile then walks a freed page table,
        and another thread's paging-structure cache may still point at it. Fixed: the
        table goes through :meth:`TlbMixin.tlb_remove_table` (flushed, then freed after
        the grace period).
        """
        mm = vma.mm
        old = cowed.table
        if not window:
            if nofail:
                new = yield from self.pte_alloc_one_nofail(t, mm, "handle_cow_pte_fault")
            else:
                new = self.pte_alloc_one(mm, "handle_cow_pte_fault")
            if new is None:
                return -ENOMEM
            yield "handle_cow_pte_fault:allocated"
            yield from self.lock(t, mm.page_table_lock, WRITE, "pmd_install")
            cur = mm.pmd.get(idx)
            if not (cur is cowed and not cur.write):  # pmd_same
                self.unlock(t, mm.page_table_lock, WRITE, "pmd_install")
                self.pte_free(new, "pmd_install")  # never visible: freed at once
                return 0
            mm.pmd[idx] = PmdEntry(new, True)
            # The new table's PTL before the PMD lock goes (pmd_lock -> PTE lock), as
            # pte_alloc_map_lock returns with it held: a concurrent fault waits for the copy.
            nptl = self.pte_lockptr(mm, new)
            if nptl is not mm.page_table_lock:
                yield from self.lock(t, nptl, WRITE, "handle_cow_pte_fault",
                                     SINGLE_DEPTH_NESTING)
                self.unlock(t, mm.page_table_lock, WRITE, "pmd_install")
                # v4 holds dst_ptl as pte_alloc_map_lock took it, a plain spin_lock with
                # no PMD lock held (the model took it under pmd_lock only to close the
                # pmd_clear window): lockdep's lock_set_subclass back to 0.
                self.lock_set_subclass(t, nptl, 0)
            dst = new
            # The PMD points at the new table (still empty, its PTL held): other CPUs'
            # hardware walks and GUP-fast, which take no lock, may use it from here.
            yield "handle_cow_pte_fault:installed"
        else:
            mm.mm_dec_nr_ptes()
            if mm.pmd.get(idx) is cowed:
                del mm.pmd[idx]  # pmd_clear
            yield "handle_cow_pte_fault:pmd_cleared"
        # pte_alloc_map_lock -> pte_alloc: only if pmd_none(*pmd).
        if window and mm.pmd.get(idx) is None:
            if nofail:
                new = yield from self.pte_alloc_one_nofail(t, mm, "handle_cow_pte_fault")
            else:
                new = self.pte_alloc_one(mm, "handle_cow_pte_fault")
            if new is None:
                mm.pmd[idx] = cowed  # set_pmd_at(mm, addr, pmd, cowed_entry): blind
                # Flaw nr-ptes-on-oom (analysis C3): the mm_dec_nr_ptes above is not
                # undone. Fixed: re-charge it.
                if not self.config.has("nr-ptes-on-oom"):
                    mm.mm_inc_nr_ptes()
                return -ENOMEM
            yield "handle_cow_pte_fault:allocated"
            # pmd_install: under pmd_lock, populate only a still-empty PMD.
            yield from self.lock(t, mm.page_table_lock, WRITE, "pmd_install")
            if mm.pmd.get(idx) is None:
                self.pmd_populate(mm, idx, new)
                new = None
            self.unlock(t, mm.page_table_lock, WRITE, "pmd_install")
            if new is not None:
                self.pte_free(new, "pmd_install")  # __pte_alloc: if (new) pte_free(mm, new)
        if window:
            got = yield from self.pte_offset_map_lock(t, mm, idx, "handle_cow_pte_fault")
            if got is None:  # only on base 6.5, where pte_offset_map_lock may fail
                return -ENOMEM
            dst, nptl = got
            # pte_alloc_map_lock returned: the PMD points at the new table and its PTL is
            # held; other CPUs' hardware walks and GUP-fast, which take no lock, may use
            # the table from here.
            yield "handle_cow_pte_fault:installed"
        optl = self.pte_lockptr(mm, old)
        same = optl is nptl
        # v4: src_pte = pte_offset_map_lock(mm, &cowed_entry, addr, &src_ptl); with
        # dst_ptl held: flaw ptl-recursive-nesting (no spin_lock_nested); else annotated.
        nest = 0 if self.config.has("ptl-recursive-nesting") else SINGLE_DEPTH_NESTING
        if not same:
            yield from self.lock(t, optl, WRITE, "pte_offset_map_lock", nest)
        if not self.check_table_live(old, "handle_cow_pte_fault"):
            if not same:
                self.unlock(t, optl, WRITE, "handle_cow_pte_fault")
            self.unlock(t, nptl, WRITE, "handle_cow_pte_fault")
            return 0
        self._charge_break_copy(old)
        src = old.entries.copy()
        nz = np.flatnonzero(src)  # if (pte_none(*src_pte)) continue;
        for off in nz:
            self.set_ptes(t, mm, dst, int(off), int(src[off]), "handle_cow_pte_fault")
        self.unlock(t, nptl, WRITE, "handle_cow_pte_fault")  # pte_unmap_unlock(dst)
        # The new table is complete and unlocked: other CPUs' walks may cache it.
        yield "handle_cow_pte_fault:copied"
        if not self.pmd_put_pte(cowed):
            # The count was 1: someone else dropped theirs meanwhile. Clear the new table,
            # pmd_clear, pte_free it (v4: no RCU/IPI deferral) and re-install the old one
            # writable.
            cur = mm.pmd.get(idx)
            if cur is not None:
                ct = cur.table
                cptl = self.pte_lockptr(mm, ct)
                if cptl is not optl:
                    # dst_pte = pte_offset_map_lock(mm, pmd, addr, &dst_ptl); under src_ptl.
                    # Subclass 0: dst_ptl was released above, and src_ptl holds subclass
                    # ``nest``. With ptl-recursive-nesting (``nest`` 0) the two plain
                    # spin_locks of one class are lockdep's splat; annotated (src_ptl
                    # taken with SINGLE_DEPTH_NESTING) this plain lock is not.
                    yield from self.lock(t, cptl, WRITE, "pte_offset_map_lock", 0)
                self.set_ptes(t, mm, ct, 0, np.zeros(self.P, dtype=np.int64),
                              "handle_cow_pte_fault")
                if cptl is not optl:
                    self.unlock(t, cptl, WRITE, "handle_cow_pte_fault")
                del mm.pmd[idx]
                if ct is not old:
                    if self.config.has("table-free-no-deferral"):
                        self.pte_free(ct, "handle_cow_pte_fault")  # pte_free(mm, token)
                    else:
                        self.tlb_remove_table(t, mm, ct, idx)
            mm.pmd[idx] = PmdEntry(old, True)
        if not same:
            self.unlock(t, optl, WRITE, "handle_cow_pte_fault")
        # pte_unmap_unlock(orig_src_pte, src_ptl); then (v4: "Should we flush TLB when
        # holding the pte lock?") flush_tlb_range(vma, start, end).
        yield "handle_cow_pte_fault:unlocked"
        self._flush_tlb_range(t, mm, idx)
        return 0

    def _break_slow_fixed(self, t: Thread, vma: Vma, idx: int, cowed: PmdEntry,
                          nofail: bool) -> Gen:
        """The fixed slow path: allocate, re-check ``pmd_same``, then reuse or copy the table.

        Allocate, then under ``page_table_lock`` (the PMD lock) and the old table's PTL
        re-check ``pmd_same`` and either reuse (count fell to 1), or copy, install and drop
        the reference. No ``pmd_none`` window; an allocation failure changes nothing.
        With ``nofail`` (``__GFP_NOFAIL``) the allocation cannot fail: it waits for the
        OOM killer (:meth:`~cowenv.kernel.page_alloc.PageAllocMixin.pte_alloc_one_nofail`).
        """
        mm = vma.mm
        if nofail:
            new = yield from self.pte_alloc_one_nofail(t, mm, "break_cow_pte")
        else:
            new = self.pte_alloc_one(mm, "break_cow_pte")
        if new is None:
            return -ENOMEM
        yield "handle_cow_pte_fault:allocated"
        old = cowed.table
        # Upstream's order: pmd_lock, then the PTE lock nested (``pml = pmd_lock(mm,
        # pmd); if (ptl != pml) spin_lock_nested(ptl, SINGLE_DEPTH_NESTING);`` as in
        # 6.5's retract_page_tables). Without split PTLs both are mm->page_table_lock.
        # ``old`` cannot have been freed: it is only freed after every PMD pointing at it
        # was cleared, and pmd_same below proves ours was not, and we hold the PMD lock.
        # The old table's PTL is looked up under the PMD lock, after pmd_same.
        yield from self.lock(t, mm.page_table_lock, WRITE, "break_cow_pte")
        cur = mm.pmd.get(idx)
        same = cur is cowed and not cur.write  # pmd_same(*pmd, cowed_entry)
        optl = self.pte_lockptr(mm, old) if same else mm.page_table_lock
        if optl is not mm.page_table_lock:
            yield from self.lock(t, optl, WRITE, "break_cow_pte", SINGLE_DEPTH_NESTING)
        if not same:
            pass  # somebody else broke or unmapped it meanwhile
        elif self.cow_pte_count(old) == 1:
            cowed.write = True
            self.cost.charge("pmd_update")
        else:
            self._charge_break_copy(old)
            new.entries[:] = old.entries  # populating a private, unreachable table
            mm.pmd[idx] = PmdEntry(new, True)
            old.refcount -= 1
            new = None
        # Fixed: flush before the locks go (v4 asks "Should we flush TLB when holding the
        # pte lock?" and flushes after). Once the old table's PTL is dropped its other
        # sharer may free it through *its* mm's gather, which flushes only its own CPUs:
        # this mm's paging-structure caches must not point at it any more by then.
        self._flush_tlb_range(t, mm, idx)
        if optl is not mm.page_table_lock:
            self.unlock(t, optl, WRITE, "break_cow_pte")
        self.unlock(t, mm.page_table_lock, WRITE, "break_cow_pte")
        if new is not None:
            self.pte_free(new, "break_cow_pte")  # never visible: freed at once
        yield "handle_cow_pte_fault:installed"
        return 0

    def _charge_break_copy(self, old: PteTable) -> None:
        """Charge the copy of a shared table into the breaker's new one.

        The fixed work, a ``pte_none`` test per slot and a ``set_pte_at`` per non-none
        entry.
        """
        self.cost.charge("cow_break_fixed")
        self.cost.charge("cow_break_scan", len(old.entries))
        self.cost.charge("cow_break_copy", int(np.count_nonzero(old.entries)))

    # ------------------------------------------------------------------ fault hooks
    def cow_fault_hook(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """``__handle_mm_fault`` hook: break on write/unshare faults and on shmem faults.

        Break on write/unshare faults and on any fault in a VMA with ``vm_ops`` (shmem);
        anonymous read faults do not break.
        """
        idx = vpn // self.P
        if not (flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE) or vma.shared):
            # Flaw read-fault-fills-shared (reference notes C8): v4 does not break on an
            # anonymous read fault, so do_anonymous_page installs the zero-page PTE into
            # the shared table (DH's shared-table-write check fires; harmless only while
            # every sharer's VMA is identical). Fixed: a read fault that would fill a
            # pte_none entry of a shared table breaks COW first.
            pmd = vma.mm.pmd.get(idx)
            if (self.config.has("read-fault-fills-shared") or pmd is None or pmd.write
                    or int(pmd.table.entries[vpn % self.P]) != 0):
                return VM_FAULT_OK
        ret = yield from self.handle_cow_pte_fault(t, vma, idx, flags, "handle_mm_fault")
        if ret == VM_FAULT_RETRY:
            return VM_FAULT_RETRY
        return VM_FAULT_OOM if ret == -ENOMEM else VM_FAULT_OK

    def cow_swapin_hook(self, t: Thread, vma: Vma, vpn: int) -> Gen:
        """``handle_pte_fault`` breaks COW before ``do_swap_page``.

        Flaw ``swapin-ignores-break-failure`` (analysis C2): v4 ignores the result, so
        when the break fails ``do_swap_page`` installs a present PTE in the shared
        table: the other process's rss (MM_SWAPENTS/MM_ANONPAGES) drifts. Fixed: the
        failure becomes VM_FAULT_OOM.
        """
        ret = yield from self.handle_cow_pte_fault(t, vma, vpn // self.P, 0, "do_swap_page")
        if ret == VM_FAULT_RETRY:
            return VM_FAULT_RETRY
        if ret and not self.config.has("swapin-ignores-break-failure"):
            return VM_FAULT_OOM
        return VM_FAULT_OK

    def cow_numa_fault_hook(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """``handle_pte_fault`` before ``do_numa_page`` (a protnone entry, accessible VMA).

        Flaw ``numa-fault-writes-shared`` (v4 03/14): v4 breaks COW only before
        ``do_swap_page`` and in ``__handle_mm_fault`` for write/unshare faults and VMAs
        with ``vm_ops``; an anonymous *read* fault on a NUMA-hinting entry reaches::

            if (pte_protnone(vmf->orig_pte) && vma_is_accessible(vmf->vma))
                return do_numa_page(vmf);

        with the table still shared (fork shares a table whose entries
        ``change_prot_numa`` made protnone), and ``do_numa_page`` rewrites the entry in
        the shared table (``ptep_modify_prot_commit``), for every sharer. Fixed: break
        first, as before swap-in; a failure is VM_FAULT_OOM; under a per-VMA lock the
        break asks for a retry under mmap_lock (``handle_cow_pte_fault``).
        """
        if self.config.has("numa-fault-writes-shared"):
            return VM_FAULT_OK
        ret = yield from self.handle_cow_pte_fault(t, vma, vpn // self.P,
                                                   flags & FAULT_FLAG_VMA_LOCK, "do_numa_page")
        if ret == VM_FAULT_RETRY:
            return VM_FAULT_RETRY
        return VM_FAULT_OOM if ret else VM_FAULT_OK

    # ------------------------------------------------------------------ walkers
    def cow_break_for_walker(self, t: Thread, vma: Vma, idx: int, site: str) -> Gen:
        """Walkers that modify entries call ``break_cow_pte`` first."""
        return (yield from self.break_cow_pte(t, vma, idx, site))

    def cow_madvise_break(self, t: Thread, vma: Vma, idx: int, site: str) -> Gen:
        """``madvise_free_pte_range``'s break.

        Flaw ``walker-skips-break`` (seed, review R1; DH: "forgetting to break COW on a
        PTE in some pgtable walker feels quite likely"): the MADV_FREE walker modifies
        the shared table without breaking it, so the other process's PTEs lose their
        dirty bits and its pages become lazyfree; reclaim then discards its data.
        Fixed: break first (a failure skips the PMD: MADV_FREE is only a hint).
        """
        if self.config.has("walker-skips-break"):
            return 0
        return (yield from self.break_cow_pte(t, vma, idx, site))

    def cow_mprotect_prepare(self, t: Thread, mm: MmStruct, start: int, end: int) -> Gen:
        """Fixed mprotect is all-or-nothing: first break every shared table in the range.

        Every shared table in the range is broken before any entry or VMA changes; a failure
        returns -ENOMEM with nothing changed. (As posted there is no such pass; see
        :meth:`cow_change_prot_failed`.)
        """
        if self.config.has("mprotect-ignores-break-failure"):
            return 0
        P = self.P
        for v in mm.vmas_in(start, end):
            s, e = max(v.start, start), min(v.end, end)
            for idx in range(s // P, (e - 1) // P + 1):
                r = yield from self.break_cow_pte(t, v, idx, "change_protection")
                if r:
                    return -ENOMEM
        return 0

    def cow_change_prot_failed(self, t: Thread, vma: Vma, idx: int, err: int) -> int:
        """``change_pte_range`` after ``break_cow_pte`` failed.

        Flaw ``mprotect-ignores-break-failure`` (seed, review R2; DH: "looking at your
        change_pte_range() change, I suspect it's wrong"): v4 returns 0 for the PMD,
        skipping it, and mprotect still succeeds and updates the VMA: the PTEs keep
        their old protection. Fixed: cannot happen (tables were broken up front by
        :meth:`cow_mprotect_prepare`); if it does, the error propagates.
        """
        if self.config.has("mprotect-ignores-break-failure"):
            return 0
        return err

    def cow_zap_hook(self, t: Thread, vma: Vma, idx: int, lo: int, hi: int) -> Gen:
        """``zap_pte_range`` on a COW-ed PMD.

        Flaw ``zap-partial-shared`` (analysis C1): v4 tests whether the *VMA* covers
        the whole PMD, not whether the *zap range* does. If it does and the table is
        shared, v4 leaves the entries in place (``pte_is_shared``) while still doing
        rmap, rss and page-put per entry — correct for munmap/exit, where
        ``free_pgtables`` then drops the PMD, but MADV_DONTNEED keeps the PMD: the
        caller keeps reading old data and a later zap decrements again. Otherwise v4
        breaks and ignores a failure. Fixed:

        * A zap covering the whole PMD drops this mm's reference (accounting of its
          entries, then ``pmd_put_pte`` + ``pmd_clear``): the other sharers' view is
          unchanged and nothing is allocated.
        * Teardown (``exit_mmap``: ``mm_users`` is 0) does the same for *every* PMD, even
          one this VMA covers only in part. ``exit_mmap`` (``mm/mmap.c``, 6.2) calls
          ``unmap_vmas(&tlb, &mm->mm_mt, vma, 0, ULONG_MAX)``: the whole address
          space goes, so the union of the per-VMA zaps of a PMD is everything this mm
          maps there, and ``free_pgtables`` then clears every PMD. So the first VMA to
          reach a shared PMD does the accounting of *all* of this mm's VMAs in it
          (``zap_pte_range``'s per-entry work with the entries left in place, as v4's
          ``pte_is_shared`` path) and drops the reference; the later VMAs find the PMD
          none. Accounting is per mm, not per table: ``copy_cow_pte_range`` charged the
          child rss, mapcount and a page reference for every entry inside its VMAs, so
          exactly those entries are uncharged. The reference is dropped at once, not left
          for ``free_pgtables`` as v4 does, because between ``unmap_vmas`` (mmap_lock
          read) and ``free_pgtables`` the VMAs are still on the anon_vma chains: a
          ``try_to_unmap_one`` there would break COW and copy entries already uncharged.
          Breaking instead would allocate on the exit path, where upstream allocates
          nothing, and ``__GFP_NOFAIL`` would not rescue it: the exiting task is often
          the OOM victim itself (seed 184 of the fixed soak,
          ``tests/test_zap_shared_nofail.py``), ``out_of_memory`` kills nobody else while
          a victim is exiting (``oom_evaluate_task``: ``tsk_is_oom_victim`` → abort), so
          the allocation could only wait for the memory its own exit would free.
        * Any other partial zap (``munmap``/``MADV_DONTNEED`` of part of a PMD while the
          mm lives on) breaks COW first with a ``__GFP_NOFAIL`` allocation, which cannot
          fail (:meth:`~cowenv.kernel.page_alloc.PageAllocMixin.pte_alloc_one_nofail`:
          it waits for the OOM killer). It cannot avoid allocating: this mm's view of
          the PMD must lose ``[lo, hi)`` and keep the rest, the other sharers' must keep
          everything, and one PTE table cannot be both; there is no "partially
          shared" table (the PMD entry points at a whole page of PTEs).

        Returns True if the entries must not be zapped by the caller.
        """
        mm = vma.mm
        P = self.P
        pmd = mm.pmd.get(idx)
        if pmd is None or pmd.write:
            return False
        if self.config.has("zap-partial-shared"):
            covers = vma.start <= idx * P and vma.end >= (idx + 1) * P
            if not covers:
                yield from self.break_cow_pte(t, vma, idx, "zap_pte_range")
                return False
            got = yield from self.pte_offset_map_lock(t, mm, idx, "zap_pte_range")
            if got is None:
                return True
            table, ptl = got
            cur = mm.pmd.get(idx)
            if self.cow_pte_count(table) == 1:
                cur.write = True
                self.unlock(t, ptl, WRITE, "zap_pte_range")
                return False
            self.zap_pte_range(t, vma, table, idx, lo, hi, clear=False)
            self.unlock(t, ptl, WRITE, "zap_pte_range")
            return True
        teardown = mm.users == 0  # exit_mmap: every VMA of the mm is being zapped
        # v4's zap of a munmapped VMA covering the whole PMD (pte_is_shared; flaw
        # free-pmd-deferred-flush): the entries stay, rmap/rss/page references go, and
        # free_pgtables drops the reference (cow_free_table) with the flush deferred to
        # tlb_finish_mmu -- so the same zap as the fixed design's, without the drop.
        deferred = (self.config.has("free-pmd-deferred-flush") and vma.detached
                    and not teardown and vma.start <= idx * P and vma.end >= (idx + 1) * P)
        if deferred or (lo == 0 and hi == P) or teardown:
            got = yield from self.pte_offset_map_lock(t, mm, idx, "zap_pte_range")
            if got is None:
                return True
            table, ptl = got
            cur = mm.pmd.get(idx)
            if cur.write or self.cow_pte_count(table) == 1:
                cur.write = True
                self.unlock(t, ptl, WRITE, "zap_pte_range")
                return False
            if teardown:
                for v in mm.vmas_in(idx * P, (idx + 1) * P):
                    vlo = max(v.start, idx * P) - idx * P
                    vhi = min(v.end, (idx + 1) * P) - idx * P
                    self.zap_pte_range(t, v, table, idx, vlo, vhi, clear=False)
            else:
                self.zap_pte_range(t, vma, table, idx, lo, hi, clear=False)
            if deferred:
                self.unlock(t, ptl, WRITE, "zap_pte_range")
                return True
            self.pmd_put_pte(cur)
            self.cost.charge("table_ref")
            self.cost.charge("pmd_update")
            del mm.pmd[idx]
            mm.mm_dec_nr_ptes()
            self.unlock(t, ptl, WRITE, "zap_pte_range")
            self._flush_tlb_range(t, mm, idx)
            return True
        # The fixed slow path cannot fail with __GFP_NOFAIL. Only v4's slow path (flaw
        # pmd-clear-window, in a mixed config) may still return -ENOMEM, when its
        # pte_offset_map_lock fails on 6.5; the PMD is then none or another table, and the
        # caller's pte_offset_map_lock re-reads it.
        yield from self.break_cow_pte(t, vma, idx, "zap_pte_range", nofail=True)
        return False

    def cow_free_table(self, t: Thread, mm: MmStruct, idx: int, pmd: PmdEntry) -> bool:
        """``free_pmd_range`` with COW PTE: a shared table may outlive this PMD.

        If ``pmd_put_pte`` succeeds the table lives on for its other sharers (only this PMD
        is cleared). v4 03/14 (``mm/memory.c`` ``free_pmd_range``)::

            spin_lock(ptl);
            if (!pmd_put_pte(pmd)) { ... free_pte_range(tlb, pmd, addr); continue; }
            spin_unlock(ptl);
            pmd_clear(pmd);
            mm_dec_nr_ptes(tlb->mm);
            tlb_flush_pmd_range(tlb, addr, PAGE_SIZE);

        ``tlb_flush_pmd_range`` only widens the gather: this mm's CPUs are flushed at
        ``tlb_finish_mmu``. Once the reference is dropped, the last sharer may free the
        table (its ``free_pte_range`` → ``pte_free_tlb`` → ``tlb_remove_table``), and its
        flush and grace period cover *its* mm's CPUs only: this mm's paging-structure
        caches may still point at the freed table. Flaw ``free-pmd-deferred-flush``.
        Fixed (flaw off): this mm's translations of the PMD are flushed before the
        reference goes, under the table's PTL, as the fixed break does. (The fixed zap
        never leaves a shared table to ``free_pgtables``: this runs with v4's zap.)
        """
        self.cost.charge("table_ref")
        if not self.config.has("free-pmd-deferred-flush") and self.cow_pte_count(
                pmd.table) > 1:
            self._flush_tlb_range(t, mm, idx)
        return self.pmd_put_pte(pmd)

    def _rmap_map_pte(self, t: Thread, vma: Vma, vpn: int, pfn: int, site: str) -> Gen:
        """``page_vma_mapped_walk`` with v4's ``PVMW_BREAK_COW_PTE`` (04/14).

        Fixed: as upstream (:meth:`RmapMixin._rmap_map_pte`) with the break of
        :meth:`cow_rmap_table` and the re-validation of :meth:`rmap_table_still_valid`.

        Flaw ``rmap-stale-table`` (review R5; DH: "when a page table gets replaced and
        modified, while rmap code still walks the shared copy"): v4, line by line. 04/14
        ``mm/page_vma_mapped.c``::

            if (pvmw->flags & PVMW_BREAK_COW_PTE) {
                    if (break_cow_pte(vma, pvmw->pmd, pvmw->address))
                            return not_found(pvmw);
            }
            if (!map_pte(pvmw))
                    goto next_pte;

        and v6.2's ``map_pte``: ``pvmw->pte = pte_offset_map(pvmw->pmd, pvmw->address);``
        … ``pvmw->ptl = pte_lockptr(pvmw->vma->vm_mm, pvmw->pmd); spin_lock(pvmw->ptl);``
        The walker holds no mmap_lock, only the anon_vma lock of *this* VMA, so between
        the break and ``spin_lock`` a fork (which shares the whole PMD from
        ``copy_pmd_range`` of an earlier VMA of that PMD) may share the freshly broken
        table again, and ``try_to_unmap_one`` then rewrites an entry of a shared table;
        and the two PMD reads of ``map_pte`` may see different tables (a concurrent break
        of a re-shared table in between), or a PMD cleared by v4's slow path, which v6.2's
        ``pte_offset_map`` walks as it is (no ``pmd_none`` check; a crash). Nothing is
        re-validated under the PTL.
        """
        if not self.config.has("rmap-stale-table"):
            if site != "remove_migration_pte" or self.config.has("fork-shares-migration-entry"):
                # (with that flaw a failed break is v4's not_found: no retry)
                return (yield from super()._rmap_map_pte(t, vma, vpn, pfn, site))
            # Fixed, remove_migration_pte: it must not miss an entry (remove_migration_ptes
            # is void; an entry left behind names a freed page). A fork that shared the
            # table again while the walk waited for the PTL (rmap_table_still_valid
            # refuses it) is broken again and the walk retried, until the entry is found
            # in an unshared table or is not there.
            while True:
                got = yield from super()._rmap_map_pte(t, vma, vpn, pfn, site)
                if got is not None:
                    return got
                cur = vma.mm.pmd.get(vpn // self.P)
                if cur is None or cur.write or self.cow_pte_count(cur.table) == 1 or \
                        not self.pvmw_check_pte(int(cur.table.entries[vpn % self.P]), pfn,
                                                site):
                    return None
                yield f"{site}:reshared"
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        if mm.pmd.get(idx) is None:
            return None  # if (!pmd_present(pmde)) { step_forward(...); continue; }
        yield f"{site}:table_found"
        if site in PVMW_BREAK_COW_PTE_SITES:  # PVMW_BREAK_COW_PTE
            r = yield from self.break_cow_pte(t, vma, idx, "page_vma_mapped_walk",
                                              nofail=self._pvmw_break_nofail(site))
            if r:
                return None  # not_found()
            yield f"{site}:broken"
        # map_pte: pte_offset_map(pvmw->pmd, ...) reads the PMD ...
        cur = mm.pmd.get(idx)
        if cur is None:
            if not self.config.base_at_least("6.5"):
                self._report("memory-safety", site,
                             "pte_offset_map walks a cleared PMD (v6.2 has no pmd_none check)")
            return None
        table = cur.table
        yield f"{site}:pte_offset_map"
        # ... and pte_lockptr(mm, pvmw->pmd) reads it again.
        cur = mm.pmd.get(idx)
        if cur is None:
            if not self.config.base_at_least("6.5"):
                self._report("memory-safety", site,
                             "pte_lockptr of a cleared PMD (v6.2 has no pmd_none check)")
            return None
        ptl = self.pte_lockptr(mm, cur.table)
        yield from self.lock(t, ptl, WRITE, site)
        if not self.check_table_live(table, site):
            self.unlock(t, ptl, WRITE, site)
            return None
        pte = int(table.entries[off])
        if not self.pvmw_check_pte(pte, pfn, site):  # check_pte()
            self.unlock(t, ptl, WRITE, site)
            return None
        return table, ptl, off

    def cow_rmap_table(self, t: Thread, vma: Vma, idx: int, table: PteTable,
                       site: str) -> Gen:
        """``page_vma_mapped_walk`` with ``PVMW_BREAK_COW_PTE`` (fixed design).

        ``try_to_unmap_one`` breaks first; ``folio_referenced_one`` (no
        ``PVMW_BREAK_COW_PTE`` in v4) may clear young bits in a shared table. Returns the
        table the PMD points at after the break (re-validated under the PTL by
        :meth:`rmap_table_still_valid`), or None (``not_found``).
        """
        mm = vma.mm
        if site in PVMW_BREAK_COW_PTE_SITES:
            pmd = mm.pmd.get(idx)
            if pmd is not None and not pmd.write:
                r = yield from self.break_cow_pte(t, vma, idx, "page_vma_mapped_walk",
                                                  nofail=self._pvmw_break_nofail(site))
                if r:
                    return None  # not_found()
                yield f"{site}:broken"
        cur = mm.pmd.get(idx)
        return None if cur is None else cur.table

    def rmap_table_still_valid(self, mm: MmStruct, idx: int, table: PteTable,
                               site: str = "") -> bool:
        """Fixed design's re-validation under the PTL (``pmd_same``, as 6.5's walkers do).

        Fixed: besides ``pmd_same``, a walker that modifies entries
        (``try_to_unmap_one``) needs the table to be still unshared: a fork may have
        shared it while the walker waited for the PTL; it then skips the mapping, as
        ``page_vma_mapped_walk`` returning ``not_found`` does.
        """
        if not super().rmap_table_still_valid(mm, idx, table, site):
            return False
        if site in PVMW_BREAK_COW_PTE_SITES:
            cur = mm.pmd[idx]
            return cur.write or self.cow_pte_count(table) == 1
        return True

    def _pvmw_break_nofail(self, site: str) -> bool:
        """Whether ``page_vma_mapped_walk``'s break may not fail at ``site``.

        Flaw ``fork-shares-migration-entry``, its rmap half (v4 04/14): a table holding
        a migration entry is shared only by that flaw's fork; ``remove_migration_pte`` walks
        with ``PVMW_BREAK_COW_PTE``; ``break_cow_pte`` failing makes the walk return
        ``not_found`` and ``remove_migration_ptes`` (void) leaves the migration entry in
        place, naming a folio that is then freed: every later fault there waits on it
        and retries forever. Fixed: the break in ``remove_migration_pte`` allocates with
        ``__GFP_NOFAIL`` (the walk sleeps only in the allocator; the anon_vma rwsem and
        the folio lock are sleeping locks). ``try_to_migrate_one``/``try_to_unmap_one``
        may fail: the folio then stays mapped and is not migrated/reclaimed.
        """
        return site == "remove_migration_pte" and not self.config.has(
            "fork-shares-migration-entry")

    # ------------------------------------------------------------------ mremap, split
    def cow_split_vma(self, t: Thread, vma: Vma, at: int) -> Gen:
        """``__split_vma`` breaks the table of the split address (v4 03/14, ``mm/mmap.c``).

        ::

            err = break_cow_pte(vma, NULL, addr);
            if (err)
                return err;

        The table mapping the split address is unshared before the VMA is split (both
        presets: v4 handles this walker correctly), so that neither half's zap or
        protection change later meets a table shared past its VMA boundary.
        """
        return (yield from self.break_cow_pte(t, vma, at // self.P, "__split_vma"))

    def cow_mremap_break(self, t: Thread, vma: Vma, idx: int) -> Gen:
        """``move_page_tables``'s break of the old PMD (v4 03/14, ``mm/mremap.c``).

        ::

            old_pmd = get_old_pmd(vma->vm_mm, old_addr);
            if (!old_pmd)
                    continue;
            /* TLB flush twice time here? */
            break_cow_pte(vma, old_pmd, old_addr);
            new_pmd = alloc_new_pmd(vma->vm_mm, vma, new_addr);

        Flaw ``mremap-ignores-break-failure`` (v4; analysis C2): the result is ignored.
        When the slow path fails to allocate, the still-shared table is moved anyway:
        ``move_ptes`` clears the entries of the table the other process still maps (its
        rss and the pages' mapcounts still count them: its data is gone, and the
        counters go bad at its exit), or, for a whole aligned PMD, ``move_normal_pmd``'s
        ``pmd_populate`` installs the shared table behind a *writable* PMD (writes no
        longer fault, so COW of the other process's pages is lost). Fixed: a failed
        break stops the move like a failed ``pte_alloc`` (``move_vma`` moves back and
        returns -ENOMEM).
        """
        r = yield from self.break_cow_pte(t, vma, idx, "move_page_tables")
        return not r or self.config.has("mremap-ignores-break-failure")

    def cow_mremap_dst(self, t: Thread, new_vma: Vma, idx: int) -> Gen:
        """``move_ptes`` into the new PMD's table: v4 does not break it.

        Flaw ``mremap-dst-shared`` (v4 03/14 breaks only ``old_pmd``): when the target
        PMD already holds a COW-ed table (a neighbouring VMA of that PMD was shared at
        fork and the target range is a hole in it), 6.2's ``move_ptes``
        (``new_pte = pte_offset_map(new_pmd, new_addr); ... set_pte_at(mm, new_addr,
        new_pte, pte);``) writes the moved entries into the table the other process
        still maps: it now maps this process's pages at an address where it has no VMA,
        without rss or mapcount for them. Fixed: break the target table first (a failure
        stops the move; -ENOMEM).
        """
        if self.config.has("mremap-dst-shared"):
            return True
        r = yield from self.break_cow_pte(t, new_vma, idx, "move_ptes")
        return not r


class _VmaView:
    """A VMA as seen from another mm (for undoing the child's accounting)."""

    def __init__(self, mm: MmStruct, vma: Vma) -> None:
        self.mm = mm
        self.start = vma.start
        self.end = vma.end
        self.flags = vma.flags
        self.shared = vma.shared

