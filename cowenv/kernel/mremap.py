"""mremap: moving, growing and shrinking a mapping.

Models ``mm/mremap.c`` of 6.2 (v4's base, v6.2-rc7): the ``mremap`` system call with
``MREMAP_MAYMOVE`` and ``MREMAP_FIXED`` (``mremap_to``), shrinking in place
(``do_vmi_munmap`` of the tail), growing in place (``vma_expandable`` + ``vma_adjust``),
and moving: ``move_vma`` → ``copy_vma`` (``mm/mmap.c``) → ``move_page_tables`` →
``move_pgt_entry(NORMAL_PMD)``/``move_normal_pmd`` for a whole, PMD-aligned extent, else
``pte_alloc`` + ``move_ptes``; on a short move (``-ENOMEM``) the entries are moved back
and the new range is unmapped instead of the old one, as ``move_vma`` does. The COW PTE
patch enters through :meth:`cow_mremap_break` (v4 03/14's ``break_cow_pte`` in
``move_page_tables``) and :meth:`cow_mremap_dst` (nothing in v4; the fixed design's
destination break).

Locks, as 6.2 takes them: ``mmap_lock`` for write over the whole call (a shrink
downgrades to read inside ``do_vmi_munmap``, as ``mremap`` passes ``downgrade=true``);
``anon_vma_clone`` (from ``copy_vma``) takes the anon_vma root for write;
``move_ptes`` takes the old table's PTL (``pte_offset_map_lock``) then the new one's
nested (``spin_lock_nested(new_ptl, SINGLE_DEPTH_NESTING)``) if it differs, inside the
rmap locks when ``need_rmap_locks``; ``move_normal_pmd`` takes ``pmd_lock`` of the old
PMD (the model's ``page_table_lock``) and the new one's, which is the same lock in the
model, inside the rmap locks (``move_pgt_entry`` always takes them for ``NORMAL_PMD``).

rss and ``nr_ptes``: ``move_ptes`` moves entries within one mm and touches no counter;
``move_normal_pmd`` moves a table from one PMD slot to another (``nr_ptes`` unchanged);
tables are charged by ``pte_alloc`` and uncharged by ``free_pgtables`` of the old range.

Simplifications (README "What is simplified"): no ``vma_merge`` (``copy_vma`` always
creates a new VMA, so ``need_rmap_locks`` is false for ``move_ptes``, as 6.2 sets it for
a VMA it did not merge); no ``i_mmap_rwsem`` (shmem has no rmap walker in the model);
``alloc_new_pmd`` cannot fail (upper levels are collapsed); ``get_unmapped_area`` is the
top-down search below a fixed ``mmap_base`` without randomisation; a grown ``MAP_SHARED``
mapping keeps its shmem object's size (``i_size`` of ``shmem_zero_setup``'s file), so its
new pages SIGBUS on access, as in Linux; no ``MREMAP_DONTUNMAP``, no ``vm_ops->mremap``,
no accounting of ``VM_ACCOUNT``/``total_vm``; the TLB flushes of ``move_ptes`` and
``move_normal_pmd`` call :meth:`_mremap_flush`, which flushes the TLB model.
"""

from __future__ import annotations

import numpy as np

from .locks import READ, SINGLE_DEPTH_NESTING, WRITE
from .mm import MmStruct, Vma
from .ops import EFAULT, EINVAL, ENOMEM, TASK_SIZE
from .pgtable import PTE_PRESENT, PmdEntry
from .sched import Gen, Thread, _done

#: ``mmap_base`` of the top-down layout in pages: ``TASK_SIZE`` minus a 1 GiB gap
#: (``mmap_base()`` in ``arch/x86/mm/mmap.c`` subtracts the stack gap and a random
#: offset; the model has no ASLR).
MMAP_BASE_GAP = 1 << 30


class MremapMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    # COW PTE hooks (overridden by cowpte.CowPteKernel).
    def cow_mremap_break(self, t: Thread, vma: Vma, idx: int) -> Gen:
        """``move_page_tables``: v4's ``break_cow_pte(vma, old_pmd, old_addr)``.

        Returns True to go on with this extent, False to stop the move (short move).
        """
        return (yield from _done(True))
    def cow_mremap_dst(self, t: Thread, new_vma: Vma, idx: int) -> Gen:
        """Before ``move_ptes`` writes into the new PMD's table; True to go on."""
        return (yield from _done(True))

    def _mremap_flush(self, mm: MmStruct, start: int, end: int) -> None:
        """``flush_tlb_range(vma, start, end)`` of ``move_ptes``/``move_normal_pmd``.

        Flushes the TLB model (:meth:`TlbMixin.flush_tlb_range`) and charges the cost.
        """
        self.cost.charge("tlb_flush_range")
        self.flush_tlb_range(mm, start, end)

    def sys_mremap(self, t: Thread, addr: int, old_length: int, new_length: int,
                   maymove: bool = True, new_addr: int = -1) -> Gen:
        """``mremap(addr, old_length, new_length, flags, new_addr)`` (mm/mremap.c, 6.2).

        ``maymove`` is ``MREMAP_MAYMOVE``; ``new_addr >= 0`` adds ``MREMAP_FIXED``.
        Returns the (new) address, or -EINVAL, -EFAULT or -ENOMEM as Linux does.

        Lock contract: takes mmap_lock for write (a shrink ends holding it for read).
        """
        fixed = new_addr >= 0
        if fixed and not maymove:
            return -EINVAL  # if (flags & MREMAP_FIXED && !(flags & MREMAP_MAYMOVE))
        mm = self.mm_of(t)
        start, old_end = self._vpn_range(addr, old_length)
        new_pages = new_length // self.config.page_size
        yield from self.lock(t, mm.mmap_lock, WRITE, "mremap")
        vma = mm.find_vma(start)
        if vma is None:
            self.mmap_write_unlock(t, mm, "mremap")
            return -EFAULT
        if fixed:
            ret = yield from self.mremap_to(t, mm, start, old_end - start, new_addr, new_pages)
            self.mmap_write_unlock(t, mm, "mremap")
            return ret
        old_pages = old_end - start
        if old_pages >= new_pages:
            # "Always allow a shrinking remap: that just unmaps the unnecessary pages."
            if old_pages == new_pages:
                self.mmap_write_unlock(t, mm, "mremap")
                return addr
            ret = yield from self.do_vmi_munmap(t, mm, start + new_pages, old_end,
                                                downgrade=True)
            self.unlock(t, mm.mmap_lock, READ, "mremap")
            return addr if ret >= 0 else ret
        vma, err = self.vma_to_resize(mm, start, old_pages, new_pages)
        if vma is None:
            self.mmap_write_unlock(t, mm, "mremap")
            return err
        if old_end == vma.end and self.vma_expandable(mm, vma, new_pages - old_pages):
            # vma_adjust(vma, vma->vm_start, addr + new_len, vma->vm_pgoff, NULL)
            yield from self.vma_start_write(t, vma)
            vma.end = start + new_pages
            if self.oracle is not None:
                self.oracle.on_mremap_expand(mm, old_end, vma.end)
            self.mmap_write_unlock(t, mm, "mremap")
            return addr
        ret = -ENOMEM
        if maymove:
            dst = self.get_unmapped_area(mm, new_pages)
            if dst is None:
                ret = -ENOMEM
            else:
                ret = yield from self.move_vma(t, vma, start, old_pages, new_pages, dst)
        self.mmap_write_unlock(t, mm, "mremap")
        return ret

    def mremap_to(self, t: Thread, mm: MmStruct, start: int, old_pages: int, new_addr: int,
                  new_pages: int) -> Gen:
        """``mremap_to``: ``MREMAP_FIXED``: unmap the target, shrink, then ``move_vma``.

        Lock contract: mmap_lock write.
        """
        ps = self.config.page_size
        new = new_addr // ps
        if new_pages * ps > TASK_SIZE or new_addr > TASK_SIZE - new_pages * ps:
            return -EINVAL
        # Ensure the old/new locations do not overlap.
        if start + old_pages > new and new + new_pages > start:
            return -EINVAL
        ret = yield from self.do_vmi_munmap(t, mm, new, new + new_pages, downgrade=False)
        if ret:
            return ret
        if old_pages > new_pages:
            ret = yield from self.do_vmi_munmap(t, mm, start + new_pages, start + old_pages,
                                                downgrade=False)
            if ret:
                return ret
            old_pages = new_pages
        vma, err = self.vma_to_resize(mm, start, old_pages, new_pages)
        if vma is None:
            return err
        return (yield from self.move_vma(t, vma, start, old_pages, new_pages, new))

    def vma_to_resize(self, mm: MmStruct, start: int, old_pages: int,
                      new_pages: int) -> tuple[Vma | None, int]:
        """``vma_to_resize`` (mm/mremap.c, 6.2): the VMA holding the range, or an errno.

        ::

            vma = vma_lookup(mm, addr);
            if (!vma) return ERR_PTR(-EFAULT);
            ...
            /* We can't remap across vm area boundaries */
            if (old_len > vma->vm_end - addr) return ERR_PTR(-EFAULT);
            if (new_len == old_len) return vma;
            /* Need to be careful about a growing mapping */
            pgoff = (addr - vma->vm_start) >> PAGE_SHIFT; pgoff += vma->vm_pgoff;
            if (pgoff + (new_len >> PAGE_SHIFT) < pgoff) return ERR_PTR(-EINVAL);
            if (vma->vm_flags & (VM_DONTEXPAND | VM_PFNMAP)) return ERR_PTR(-EFAULT);
            if (mlock_future_check(mm, vma->vm_flags, new_len - old_len))
                return ERR_PTR(-EAGAIN);
            if (!may_expand_vm(mm, vma->vm_flags, (new_len - old_len) >> PAGE_SHIFT))
                return ERR_PTR(-ENOMEM);

        Nothing rejects ``VM_SHARED``: a shared anonymous mapping (``shmem_zero_setup``
        sets no ``VM_DONTEXPAND``) grows like a private one. The ``!old_len``
        (duplicate a shared mapping) and ``MREMAP_DONTUNMAP`` checks do not arise: the
        model's lengths are positive and it has no ``MREMAP_DONTUNMAP``.
        """
        vma = mm.find_vma(start)
        if vma is None:
            return None, -EFAULT
        if old_pages > vma.end - start:  # the range must lie in one VMA
            return None, -EFAULT
        if new_pages == old_pages:
            return vma, 0
        # 6.2's remaining refusals of a growing mapping are for what the model has not:
        # pgoff overflow (-EINVAL), VM_DONTEXPAND|VM_PFNMAP (-EFAULT), the mlock limit
        # (-EAGAIN), may_expand_vm/VM_ACCOUNT (-ENOMEM). A MAP_SHARED (shmem) mapping
        # may grow: the pages past the shmem file's i_size SIGBUS on access
        # (shmem_get_folio_gfp's SGP_CACHE check; fault:do_shared_fault).
        return vma, 0

    def vma_expandable(self, mm: MmStruct, vma: Vma, delta: int) -> bool:
        """``vma_expandable``: nothing mapped in ``[vm_end, vm_end + delta)``."""
        end = vma.end + delta
        if end * self.config.page_size > TASK_SIZE:
            return False
        return not mm.vmas_in(vma.end, end)

    def get_unmapped_area(self, mm: MmStruct, pages: int) -> int | None:
        """``arch_get_unmapped_area_topdown``: the highest gap below ``mmap_base``.

        Returns its first page, or None (-ENOMEM).
        """
        top = (TASK_SIZE - MMAP_BASE_GAP) // self.config.page_size
        for v in reversed(mm.vmas):
            if v.start >= top:
                continue
            if v.end <= top - pages:
                return top - pages
            top = v.start
        return top - pages if top >= pages else None

    def copy_vma(self, t: Thread, vma: Vma, new_start: int, pages: int, pgoff: int) -> Gen:
        """``copy_vma`` (mm/mmap.c, 6.2): a new VMA for the destination (no merging).

        Returns ``(new_vma, need_rmap_locks)``. Lock contract: mmap_lock write; takes the
        anon_vma root for write (``anon_vma_clone``).
        """
        mm = vma.mm
        if not vma.shared and vma.anon_vma is None:
            # "If anonymous vma has not yet been faulted, update new pgoff to match new
            # location, to increase its chance of merging."
            pgoff = new_start
        new = Vma(self._id("vma"), mm, new_start, new_start + pages, vma.flags, vma.shmem,
                  pgoff)
        # vm_area_dup copies vm_lock_seq, and 6.4's copy_vma does vma_start_write(new_vma)
        # before vma_link ("mm/mremap: write-lock VMA while remapping it to a new address
        # range", Suren Baghdasaryan, 6.4-rc1; later kernels lock it in vma_link): the new
        # VMA is write-locked before it becomes visible, so no per-VMA-lock fault can
        # populate the destination while move_page_tables fills it. It is not linked yet,
        # so no reader can hold its lock: marking it is all vma_start_write does here.
        new.lock_seq = mm.mm_lock_seq
        root = vma.anon_vma.root if vma.anon_vma is not None else None
        if root is not None:
            yield from self.lock(t, root.lock, WRITE, "anon_vma_clone")
        new.anon_vma = vma.anon_vma
        new.chain = list(vma.chain)
        for av in vma.chain:
            av.vmas.append(new)  # after vma in rmap traversal order (see move_ptes)
        if root is not None:
            self.unlock(t, root.lock, WRITE, "anon_vma_clone")
        self.get_file(new.shmem)
        mm.insert_vma(new)
        return new, False

    def move_vma(self, t: Thread, vma: Vma, start: int, old_pages: int, new_pages: int,
                 new_start: int) -> Gen:
        """``move_vma``: copy the VMA, move the tables, unmap the old range.

        On a short move, the entries are moved back ("which will succeed since page
        tables still there") and the *new* range is unmapped instead; -ENOMEM.

        Lock contract: mmap_lock write.
        """
        mm = vma.mm
        # "We don't want racing faults." (move_vma, 6.4+; mm/mremap.c): a fault under the
        # per-VMA lock on the old range could install an entry behind move_ptes (or into
        # a table move_normal_pmd has already moved), and it would be lost. 6.2 has no
        # VMA-lock readers; the model write-locks on every base (docs/kernel-bases.md).
        yield from self.vma_start_write(t, vma)
        new_pgoff = vma.pgoff + (start - vma.start)
        new_vma, need_rmap_locks = yield from self.copy_vma(t, vma, new_start, new_pages,
                                                            new_pgoff)
        if self.oracle is not None:
            self.oracle.on_mremap_begin(mm, start, old_pages, new_start, new_pages)
        moved = yield from self.move_page_tables(t, vma, start, new_vma, new_start,
                                                 old_pages, need_rmap_locks)
        err = 0
        if moved < old_pages:
            err = -ENOMEM
            yield from self.move_page_tables(t, new_vma, new_start, vma, start, moved, True)
            start, old_pages, ret = new_start, new_pages, err
        else:
            ret = new_start * self.config.page_size
        if self.oracle is not None:
            self.oracle.on_mremap_end(mm, moved_back=err != 0)
        # do_vmi_munmap(&vmi, mm, old_addr, old_len, uf_unmap, false): a failure (OOM
        # splitting a VMA) only leaves the old range mapped, as 6.2 ignores it too.
        yield from self.do_vmi_munmap(t, mm, start, start + old_pages, downgrade=False)
        return ret

    def move_page_tables(self, t: Thread, vma: Vma, old: int, new_vma: Vma, new: int,
                         pages: int, need_rmap_locks: bool) -> Gen:
        """``move_page_tables``: move ``pages`` pages of entries from ``old`` to ``new``.

        Per extent (the part of the range up to the next PMD boundary of the old *and*
        the new address, ``get_extent(NORMAL_PMD, ...)``): skip a ``pmd_none`` source
        (``get_old_pmd``); COW PTE's break (v4); a whole PMD-sized extent tries
        ``move_normal_pmd``; else ``pte_alloc`` the new table (failure: stop) and
        ``move_ptes``. ``cond_resched`` at each extent. Returns the number of pages
        moved (``len + old_addr - old_end``).

        Lock contract: mmap_lock write.
        """
        mm = vma.mm
        P = self.P
        old_end = old + pages
        while old < old_end:
            yield "move_page_tables:cond_resched"
            extent = min(P - old % P, old_end - old, P - new % P)
            oidx, nidx = old // P, new // P
            if oidx in mm.pmd:
                go = yield from self.cow_mremap_break(t, vma, oidx)
                if not go:
                    break
                if extent == P:
                    moved = yield from self.move_pgt_entry(t, vma, oidx, nidx)
                    if moved:
                        old, new = old + extent, new + extent
                        continue
                if oidx in mm.pmd:  # a concurrent break may not clear it (mmap_lock held)
                    if nidx not in mm.pmd:
                        table = self.pte_alloc_one(mm, "__pte_alloc")
                        if table is None:
                            break
                        yield from self.lock(t, mm.page_table_lock, WRITE, "pmd_install")
                        self.pmd_populate(mm, nidx, table)
                        self.unlock(t, mm.page_table_lock, WRITE, "pmd_install")
                    go = yield from self.cow_mremap_dst(t, new_vma, nidx)
                    if not go:
                        break
                    yield from self.move_ptes(t, vma, old, old + extent, new_vma, new,
                                              need_rmap_locks)
            old, new = old + extent, new + extent
        return pages - (old_end - old)

    def take_rmap_locks(self, t: Thread, vma: Vma) -> Gen:
        """``take_rmap_locks``: ``anon_vma_lock_write(vma->anon_vma)`` (no i_mmap here)."""
        if vma.anon_vma is not None:
            yield from self.lock(t, vma.anon_vma.root.lock, WRITE, "take_rmap_locks")

    def drop_rmap_locks(self, t: Thread, vma: Vma) -> None:
        """``drop_rmap_locks``."""
        if vma.anon_vma is not None:
            self.unlock(t, vma.anon_vma.root.lock, WRITE, "drop_rmap_locks")

    def move_pgt_entry(self, t: Thread, vma: Vma, oidx: int, nidx: int) -> Gen:
        """``move_pgt_entry(NORMAL_PMD, ...)`` → ``move_normal_pmd`` under the rmap locks.

        ``move_normal_pmd`` (6.2): refuse if the new PMD is populated
        (``WARN_ON_ONCE(!pmd_none(*new_pmd))``); under ``pmd_lock`` of both PMDs:
        ``pmd = *old_pmd; pmd_clear(old_pmd); pmd_populate(mm, new_pmd,
        pmd_pgtable(pmd)); flush_tlb_range(vma, old_addr, old_addr + PMD_SIZE)``.
        ``pmd_populate`` installs a *writable* PMD entry whatever the old one was.
        Returns True if the table was moved.
        """
        mm = vma.mm
        if nidx in mm.pmd:
            # WARN_ON_ONCE(!pmd_none(*new_pmd)): only execve's overlapping stack move
            # gets here in Linux; the model's callers unmapped the target first.
            return False
        yield from self.take_rmap_locks(t, vma)
        yield from self.lock(t, mm.page_table_lock, WRITE, "move_normal_pmd")
        pmd = mm.pmd.pop(oidx, None)
        if pmd is not None:
            mm.pmd[nidx] = PmdEntry(pmd.table, True)  # pmd_populate: _PAGE_TABLE (RW)
            self.cost.charge("pmd_update", 2)
            self._mremap_flush(mm, oidx * self.P, (oidx + 1) * self.P)
        self.unlock(t, mm.page_table_lock, WRITE, "move_normal_pmd")
        self.drop_rmap_locks(t, vma)
        return pmd is not None

    def move_ptes(self, t: Thread, vma: Vma, old: int, old_end: int, new_vma: Vma,
                  new: int, need_rmap_locks: bool) -> Gen:
        """``move_ptes``: move the entries of ``[old, old_end)`` to ``new`` (one table each).

        Every non-none entry is cleared (``ptep_get_and_clear``) and set at the new
        address (``set_pte_at``); a present one forces ``flush_tlb_range`` before the
        PTLs are dropped. No counter changes: the pages stay mapped once, in this mm.

        Lock contract: mmap_lock write; takes the rmap locks if ``need_rmap_locks``, the
        old PTL, then the new PTL nested if different.
        """
        mm = vma.mm
        P = self.P
        oidx, nidx = old // P, new // P
        n = old_end - old
        if need_rmap_locks:
            yield from self.take_rmap_locks(t, vma)
        got = yield from self.pte_offset_map_lock(t, mm, oidx, "move_ptes")
        if got is None:
            if need_rmap_locks:
                self.drop_rmap_locks(t, vma)
            return
        otable, optl = got
        npmd = mm.pmd.get(nidx)
        if npmd is None:  # cannot happen: pte_alloc just populated it under mmap_lock
            self.unlock(t, optl, WRITE, "move_ptes")
            if need_rmap_locks:
                self.drop_rmap_locks(t, vma)
            return
        ntable = npmd.table  # pte_offset_map(new_pmd, new_addr)
        nptl = self.pte_lockptr(mm, ntable)
        if nptl is not optl:
            # spin_lock_nested(new_ptl, SINGLE_DEPTH_NESTING);  (mm/mremap.c move_ptes)
            yield from self.lock(t, nptl, WRITE, "move_ptes", SINGLE_DEPTH_NESTING)
        olo, nlo = old % P, new % P
        src = otable.entries[olo:olo + n].copy()
        live = src != 0
        if np.count_nonzero(live):
            dst = ntable.entries[nlo:nlo + n].copy()
            dst[live] = src[live]
            self.set_ptes(t, mm, otable, olo, np.where(live, 0, src), "move_ptes")
            self.set_ptes(t, mm, ntable, nlo, dst, "move_ptes")
            self.cost.charge("pte_write", 2 * int(np.count_nonzero(live)))  # no rss change: same mm
            if np.count_nonzero(src & PTE_PRESENT):
                self._mremap_flush(mm, old, old_end)  # force_flush
        if nptl is not optl:
            self.unlock(t, nptl, WRITE, "move_ptes")
        self.unlock(t, optl, WRITE, "move_ptes")
        if need_rmap_locks:
            self.drop_rmap_locks(t, vma)
