"""Page faults: the fault half of ``mm/memory.c`` and ``arch/x86/mm/fault.c``.

``do_user_addr_fault`` → ``handle_mm_fault`` → ``handle_pte_fault`` →
``do_anonymous_page`` / ``do_shared_fault`` / ``do_wp_page`` (``wp_page_copy``) /
``do_swap_page``, with user loads and stores (``sys_read`` / ``sys_write``) walking the
tables like the MMU first (``_hw_walk``). Semantics of 6.2, with the per-VMA-lock fault
path of 6.4 (``lock_vma_under_rcu``) as the ``vma_lock`` fault mode. The COW PTE patch
enters through ``cow_fault_hook`` and ``cow_swapin_hook`` (no-ops upstream).

Also the ``vm_fault_t`` results and ``FAULT_FLAG_*`` bits (``include/linux/mm_types.h``).
"""

from __future__ import annotations

import numpy as np

from .locks import READ, WRITE
from .memory import (
    PG_anon_exclusive,
    PG_locked,
    PG_shmem,
    PG_swapbacked,
    PG_swapcache,
    ShmemObject,
)
from .mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    VM_READ,
    VM_WRITE,
    MmStruct,
    Vma,
    vma_is_accessible,
)
from .ops import EAGAIN, EFAULT
from .pgtable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SOFT_DIRTY,
    PTE_SWAP,
    PTE_SWP_EXCLUSIVE,
    PTE_USER,
    PTE_WRITE,
    PTE_YOUNG,
    ZERO_PFN,
    PteTable,
    mk_pte,
)
from .sched import Gen, Thread

# vm_fault_t results (include/linux/mm_types.h), as small ints.
VM_FAULT_OK = 0

VM_FAULT_OOM = 1

VM_FAULT_SIGSEGV = 2

VM_FAULT_RETRY = 3

VM_FAULT_SIGBUS = 4

FAULT_FLAG_WRITE = 1

FAULT_FLAG_UNSHARE = 2

FAULT_FLAG_VMA_LOCK = 4

#: ``fault_around_bytes`` (64 KiB) in pages: shmem read faults map this window.
FAULT_AROUND_PAGES = 16


class FaultMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def _hw_walk(self, mm: MmStruct, vpn: int, write: bool) -> tuple[PteTable, int, int] | None:
        """The MMU's walk: returns (table, off, pte) if the access may proceed."""
        pmd = mm.pmd.get(vpn // self.P)
        if pmd is None:
            return None
        table = pmd.table
        off = vpn % self.P
        pte = int(table.entries[off])
        if not (pte & PTE_PRESENT) or not (pte & PTE_USER):
            return None
        if write and not (pte & PTE_WRITE and pmd.write):
            return None
        return table, off, pte
    def _access_frame(self, t: Thread, mm: MmStruct, vpn: int, pfn: int, write: bool) -> int:
        """The load or store itself, once the MMU has a translation to frame ``pfn``.

        A store writes a fresh token (the page's new content) and returns it; a load
        returns the content. The oracle sees either (isolation is checked on the read).
        """
        if write:
            tok = self.new_token()
            self.pool.content[pfn] = tok
            if self.oracle is not None:
                self.oracle.on_user_write(t, mm, vpn, tok)
            return tok
        val = int(self.pool.content[pfn])
        if self.oracle is not None:
            self.oracle.on_user_read(t, mm, vpn, val, t.fault_site or "user_access")
        return val

    def _user_access(self, t: Thread, addr: int, write: bool) -> Gen:
        """A user load/store at ``addr``: the MMU access, faulting until it succeeds.

        Returns the content token read (load), the token written (store), -EFAULT
        (SIGSEGV or SIGBUS: ``VM_FAULT_SIGSEGV``/``VM_FAULT_SIGBUS``, the access is not
        made; the model delivers the signal to a handler, it does not kill), or None when the task
        was killed (an OOM victim) before the access could complete. A user access never
        returns -ENOMEM: ``VM_FAULT_OOM`` goes to :meth:`pagefault_out_of_memory` and
        the access is retried. With ``config.tlb`` the MMU translates through the
        thread's TLB and paging-structure cache (:meth:`TlbMixin.tlb_translate`);
        without, it walks the live page tables on every access.
        """
        mm = self.mm_of(t)
        vpn = addr // self.config.page_size
        t.fault_site = ""
        tries = 0
        tlb = self.config.tlb
        while tries < 64:
            if tlb:
                pfn = self.tlb_translate(t, mm, vpn, write)
                if pfn == -2:
                    return -EFAULT
                if pfn >= 0:
                    return self._access_frame(t, mm, vpn, pfn, write)
                w = None
            else:
                w = self._hw_walk(mm, vpn, write)
            if w is not None:
                table, off, pte = w
                pfn = pte >> PFN_SHIFT
                if not self.check_table_live(table, "user_access"):
                    return -EFAULT
                if self.pool.is_free(pfn):
                    self._report("memory-safety", "user_access",
                                 f"access to freed page {pfn} at {addr:#x} (mm{mm.id})")
                bits = PTE_YOUNG | (PTE_DIRTY if write else 0)
                self.set_ptes(t, mm, table, off, pte | bits, "user_access", hw=True)
                return self._access_frame(t, mm, vpn, pfn, write)
            self.cost.begin_fault(t)
            ret = yield from self.do_user_addr_fault(t, mm, vpn,
                                                     FAULT_FLAG_WRITE if write else 0)
            self.cost.end_fault(t)
            if ret in (VM_FAULT_SIGSEGV, VM_FAULT_SIGBUS):
                return -EFAULT
            if ret == VM_FAULT_OOM:
                if not (yield from self.pagefault_out_of_memory(t)):
                    return None
                continue  # the faulting access is retried; not counted against the cap
            tries += 1
        return -EAGAIN
    def pagefault_out_of_memory(self, t: Thread) -> Gen:
        """``VM_FAULT_OOM`` reaching the #PF handler: ``pagefault_out_of_memory`` (6.2).

        Since 5.16 it kills nothing itself::

            if (mem_cgroup_oom_synchronize(true))
                return;
            if (fatal_signal_pending(current))
                return;
            if (__ratelimit(&pfoom_rs))
                pr_warn("Huh VM_FAULT_OOM leaked out to the #PF handler. Retrying PF");

        -- the OOM killer already ran inside the page allocator
        (``__alloc_pages_may_oom`` → ``out_of_memory``) before the allocation failed.
        The model calls :meth:`out_of_memory` here instead, when the failure was pool
        exhaustion (an injected failure kills nothing: the fault is simply retried).
        Then, unless the faulting task itself is now dying, the fault is retried after a
        preemption point (where the victim can run its exit).

        Returns False if the task has a fatal signal pending (the access is abandoned;
        the thread exits when the operation returns), True to retry.
        """
        p = self.procs[t.pid]
        if not p.killed and not self.alloc_fail_injected:
            self.out_of_memory(t)
        if p.killed:
            return False
        yield "pagefault_out_of_memory:retry"
        return True
    def sys_read(self, t: Thread, addr: int) -> Gen:
        """A user load. Returns the token read, -EFAULT, or None if the task was killed."""
        return (yield from self._user_access(t, addr, False))
    def sys_write(self, t: Thread, addr: int) -> Gen:
        """A user store of a fresh token. Returns the token or -errno."""
        return (yield from self._user_access(t, addr, True))
    def do_user_addr_fault(self, t: Thread, mm: MmStruct, vpn: int, flags: int) -> Gen:
        """``do_user_addr_fault``: per-VMA lock first (6.4) if configured, else mmap_lock.

        Lock contract: takes ``vma->vm_lock`` for read (``lock_vma_under_rcu``) or
        ``mmap_lock`` for read; releases it before returning.
        """
        if self.config.fault_mode == "vma_lock":
            vma = mm.find_vma(vpn)
            # lock_vma_under_rcu (mm/memory.c, 6.4): only anonymous VMAs with an anon_vma
            #     /* Only anonymous vmas are supported for now */
            #     if (!vma_is_anonymous(vma)) goto inval;
            #     /* find_mergeable_anon_vma uses adjacent vmas which are not locked */
            #     if (!vma->anon_vma) goto inval;
            # and a VMA write-locked in the current mmap_lock write cycle falls back too.
            usable = vma is not None and not vma.shared and vma.anon_vma is not None
            if usable and vma.lock_seq != mm.mm_lock_seq and vma.lock.try_acquire(t.tid, READ):
                t.held.append((vma.lock, READ))
                self._ev(t.tid, "lock", vma.lock.name, READ)
                if vma.detached:
                    ret = VM_FAULT_RETRY
                else:
                    ret = yield from self.handle_mm_fault(t, vma, vpn, flags | FAULT_FLAG_VMA_LOCK)
                self.unlock(t, vma.lock, READ, "do_user_addr_fault")
                if ret != VM_FAULT_RETRY:
                    return ret
                yield "do_user_addr_fault:vma_lock_retry"
        yield from self.lock(t, mm.mmap_lock, READ, "do_user_addr_fault")
        vma = mm.find_vma(vpn)
        if vma is None:
            ret = VM_FAULT_SIGSEGV
        else:
            ret = yield from self.handle_mm_fault(t, vma, vpn, flags)
        self.unlock(t, mm.mmap_lock, READ, "do_user_addr_fault")
        return ret
    def handle_mm_fault(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """``handle_mm_fault``: access check, PTE table allocation, ``handle_pte_fault``.

        ``handle_mm_fault`` → ``__handle_mm_fault``: access check, PTE table allocation
        (``__pte_alloc``), then ``handle_pte_fault``.

        Lock contract: mmap_lock held for read, or the VMA's lock for read with
        ``FAULT_FLAG_VMA_LOCK``.
        """
        mm = vma.mm
        # arch/x86/mm/fault.c access_error(): a write needs VM_WRITE; a read only needs
        # vma_is_accessible() (VM_READ|VM_WRITE|VM_EXEC): x86 has no write-only pages.
        if flags & FAULT_FLAG_WRITE and not vma.flags & VM_WRITE:
            return VM_FAULT_SIGSEGV
        if not flags & FAULT_FLAG_WRITE and not vma.flags & (VM_READ | VM_WRITE):
            return VM_FAULT_SIGSEGV
        ret = yield from self.cow_fault_hook(t, vma, vpn, flags)
        if ret != VM_FAULT_OK:
            return ret
        idx = vpn // self.P
        if idx not in mm.pmd:
            # __pte_alloc: allocate outside the lock, install under page_table_lock.
            table = self.pte_alloc_one(mm, "__pte_alloc")
            if table is None:
                return VM_FAULT_OOM
            yield "__pte_alloc:allocated"
            yield from self.lock(t, mm.page_table_lock, WRITE, "pmd_install")
            if idx not in mm.pmd:
                self.pmd_populate(mm, idx, table)
                table = None
            self.unlock(t, mm.page_table_lock, WRITE, "pmd_install")
            if table is not None:
                self.pte_free(table, "pmd_install")
        return (yield from self.handle_pte_fault(t, vma, vpn, flags))
    def handle_pte_fault(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """``handle_pte_fault``: dispatch on the (locklessly read) PTE."""
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        pmd = mm.pmd.get(idx)
        if pmd is None:
            return VM_FAULT_RETRY if flags & FAULT_FLAG_VMA_LOCK else VM_FAULT_OK
        orig = int(pmd.table.entries[off])
        if orig == 0:
            if vma.shared:
                return (yield from self.do_shared_fault(t, vma, vpn, flags))
            return (yield from self.do_anonymous_page(t, vma, vpn, flags))
        if orig & (PTE_SWAP | PTE_MIGRATION):  # !pte_present(vmf->orig_pte)
            ret = yield from self.cow_swapin_hook(t, vma, vpn)
            if ret != VM_FAULT_OK:
                return ret
            if orig & PTE_MIGRATION:
                # do_swap_page: if (is_migration_entry(entry)) migration_entry_wait(...)
                yield from self.migration_entry_wait(t, vma, vpn)
                return VM_FAULT_OK
            return (yield from self.do_swap_page(t, vma, vpn, orig, flags))
        # if (pte_protnone(vmf->orig_pte) && vma_is_accessible(vmf->vma))
        #         return do_numa_page(vmf);
        # (A protnone entry in a PROT_NONE VMA never gets here: access_error() above.)
        if not orig & PTE_USER and vma_is_accessible(vma):
            ret = yield from self.cow_numa_fault_hook(t, vma, vpn, flags)
            if ret != VM_FAULT_OK:
                return ret
            return (yield from self.do_numa_page(t, vma, vpn, orig, flags))
        if flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE):
            if not (orig & PTE_WRITE and pmd.write) or flags & FAULT_FLAG_UNSHARE:
                return (yield from self.do_wp_page(t, vma, vpn, orig, flags))
        # Otherwise a spurious fault: the entry already allows the access (another thread
        # fixed it first); the MMU retries.
        return VM_FAULT_OK
    def do_numa_page(self, t: Thread, vma: Vma, vpn: int, orig: int, flags: int) -> Gen:
        """``do_numa_page`` (mm/memory.c, 6.2): a NUMA-hinting fault on a protnone entry.

        ::

            vmf->ptl = pte_lockptr(vma->vm_mm, vmf->pmd);
            spin_lock(vmf->ptl);
            if (unlikely(!pte_same(*vmf->pte, vmf->orig_pte))) { ... goto out; }
            old_pte = ptep_get(vmf->pte);
            pte = pte_modify(old_pte, vma->vm_page_prot);
            writable = pte_write(pte);
            if (!writable && vma_wants_manual_pte_write_upgrade(vma) &&
                can_change_pte_writable(vma, vmf->address, pte))
                writable = true;
            page = vm_normal_page(vma, vmf->address, pte);
            if (!page || is_zone_device_page(page)) goto out_map;
            ...
            target_nid = numa_migrate_prep(page, vma, vmf->address, page_nid, &flags);
            if (target_nid == NUMA_NO_NODE) { put_page(page); goto out_map; }
            ...
        out_map:
            old_pte = ptep_modify_prot_start(vma, vmf->address, vmf->pte);
            pte = pte_modify(old_pte, vma->vm_page_prot);
            pte = pte_mkyoung(pte);
            if (writable)
                pte = pte_mkwrite(pte);
            ptep_modify_prot_commit(vma, vmf->address, vmf->pte, old_pte, pte);

        Single node: every page is on node 0, the only node, so ``numa_migrate_prep``
        (``mpol_misplaced``) always returns ``NUMA_NO_NODE`` and the page is never
        migrated (its ``get_page``/``put_page`` pair nets out and is not modelled); the
        fault only restores the entry. ``vm_page_prot`` is writable only for a shared
        writable VMA that wants no write-notify (shmem, unless soft-dirty tracking is on);
        a private writable VMA upgrades through ``can_change_pte_writable``.

        Lock contract: mmap_lock (or VMA lock) read; takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        t.fault_site = "do_numa_page"
        got = yield from self.pte_offset_map_lock(t, mm, idx, "do_numa_page")
        if got is None:
            return VM_FAULT_OK
        table, ptl = got
        if int(table.entries[off]) != orig:
            self.unlock(t, ptl, WRITE, "do_numa_page")
            return VM_FAULT_OK
        pte = (orig & ~(PTE_WRITE | PTE_USER)) | PTE_USER  # pte_modify(old, vm_page_prot)
        writable = self.vm_page_prot_writable(vma)
        if not writable and vma.flags & VM_WRITE and self.can_change_pte_writable(vma, pte):
            writable = True
        pte |= PTE_YOUNG | (PTE_WRITE if writable else 0)
        self.cost.charge("pte_write")
        self.set_ptes(t, mm, table, off, pte, "do_numa_page")
        self.unlock(t, ptl, WRITE, "do_numa_page")
        return VM_FAULT_OK
    def do_anonymous_page(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """``do_anonymous_page``: a read maps the shared zero page; a write allocates a page.

        A write allocates an exclusive zero-filled page (``page_add_new_anon_rmap``).

        Lock contract: mmap_lock (or VMA lock) read; takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        write = bool(flags & FAULT_FLAG_WRITE)
        t.fault_site = "do_anonymous_page"
        pfn = None
        if write:
            if vma.anon_vma is None:
                if flags & FAULT_FLAG_VMA_LOCK:
                    return VM_FAULT_RETRY
                self.anon_vma_prepare(vma)
            pfn = self.alloc_page("do_anonymous_page")
            if pfn is None:
                return VM_FAULT_OOM
            self.cost.charge("page_alloc")
            self.cost.charge("page_zero")
            yield "do_anonymous_page:allocated"
        got = yield from self.pte_offset_map_lock(t, mm, idx, "do_anonymous_page")
        if got is None:
            if pfn is not None:
                self.put_page(pfn, "do_anonymous_page")
            return VM_FAULT_OK
        table, ptl = got
        if int(table.entries[off]) != 0:
            self.unlock(t, ptl, WRITE, "do_anonymous_page")
            if pfn is not None:
                self.put_page(pfn, "do_anonymous_page")
            return VM_FAULT_OK
        if pfn is None:
            entry = mk_pte(ZERO_PFN, write=False, young=True)
        else:
            self.page_add_new_anon_rmap(pfn, vma, vpn)
            mm.rss[MM_ANONPAGES] += 1
            entry = mk_pte(pfn, write=bool(vma.flags & VM_WRITE), dirty=True, young=True)
            self.cost.charge("page_account")
        self.cost.charge("pte_write")
        self.set_ptes(t, mm, table, off, entry, "do_anonymous_page")
        self.unlock(t, ptl, WRITE, "do_anonymous_page")
        return VM_FAULT_OK
    def do_shared_fault(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """``do_read_fault``/``do_shared_fault`` on shmem: find or allocate the page, map it.

        Find or allocate the page-cache page (``shmem_get_folio``) and map it; writable only
        for write faults.

        Lock contract: mmap_lock (or VMA lock) read; takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        obj = vma.shmem
        assert isinstance(obj, ShmemObject)
        pgoff = vma.pgoff + (vpn - vma.start)
        t.fault_site = "do_shared_fault"
        if pgoff >= obj.nr_pages:
            # shmem_fault → shmem_get_folio_gfp(..., SGP_CACHE, ...) (mm/shmem.c, 6.2):
            #   if (sgp <= SGP_CACHE &&
            #       ((loff_t)index << PAGE_SHIFT) >= i_size_read(inode))
            #           return -EINVAL;
            # and vmf_error(-EINVAL) is VM_FAULT_SIGBUS: a page of a mapping grown by
            # mremap past the shmem file's size.
            return VM_FAULT_SIGBUS
        pfn = obj.pages.get(pgoff)
        if pfn is None:
            pfn = self.alloc_page("shmem_get_folio")
            if pfn is None:
                return VM_FAULT_OOM
            self.pool.flags[pfn] |= PG_shmem | PG_swapbacked
            self.pool.shmem[pfn] = obj.id
            self.pool.index[pfn] = pgoff
            obj.pages[pgoff] = pfn  # the page cache's reference is the allocation's
            self.cost.charge("page_alloc")
            self.cost.charge("page_zero")
            yield "shmem_get_folio:allocated"
        got = yield from self.pte_offset_map_lock(t, mm, idx, "do_shared_fault")
        if got is None:
            return VM_FAULT_OK
        table, ptl = got
        if int(table.entries[off]) != 0 or obj.pages.get(pgoff) != pfn:
            self.unlock(t, ptl, WRITE, "do_shared_fault")
            return VM_FAULT_OK
        self.get_pages(np.array([pfn]))
        self.pool.mapcount[pfn] += 1
        mm.rss[MM_SHMEMPAGES] += 1
        self.cost.charge("page_account")
        self.cost.charge("pte_write")
        write = bool(flags & FAULT_FLAG_WRITE) and bool(vma.flags & VM_WRITE)
        self.set_ptes(t, mm, table, off, mk_pte(pfn, write=write, dirty=write),
                      "do_shared_fault")
        if not flags & FAULT_FLAG_WRITE:
            self.do_fault_around(t, vma, vpn, table)
        self.unlock(t, ptl, WRITE, "do_shared_fault")
        return VM_FAULT_OK
    def do_fault_around(self, t: Thread, vma: Vma, vpn: int, table: PteTable) -> None:
        """``do_fault_around`` → ``filemap_map_pages`` (6.2) of a shmem read fault.

        Maps, read-only, every other page already in the page cache within the
        ``fault_around_bytes`` (64 KiB) window around ``vpn``, clamped to the VMA and to
        the page table, where the PTE is none. The kernel does this before looking the
        faulting page up; the model does it in the same PTL section as mapping that page
        (same result: the lookup only adds the faulting page to the cache).

        Lock contract: the table's PTL held.
        """
        mm = vma.mm
        obj = vma.shmem
        assert isinstance(obj, ShmemObject)
        P = self.P
        address = max(vpn & ~(FAULT_AROUND_PAGES - 1), vma.start)
        first = vpn - ((vpn - address) & (P - 1))
        last = min(first - (address & (P - 1)) + P - 1, vma.end - 1,
                   first + FAULT_AROUND_PAGES - 1)
        for v in range(first, last + 1):
            pfn = obj.pages.get(vma.pgoff + (v - vma.start))
            if pfn is None or v == vpn or v // P != vpn // P or int(table.entries[v % P]):
                continue
            self.get_pages(np.array([pfn]))
            self.pool.mapcount[pfn] += 1
            mm.rss[MM_SHMEMPAGES] += 1
            self.cost.charge("page_account")
            self.cost.charge("pte_write")
            self.set_ptes(t, mm, table, v % P, mk_pte(pfn, write=False), "filemap_map_pages")
    def do_wp_page(self, t: Thread, vma: Vma, vpn: int, orig: int, flags: int) -> Gen:
        """``do_wp_page`` (6.2): write (or unshare) fault on a present PTE.

        Shared mappings are made writable (``wp_page_shared``). An anonymous page is
        reused if ``PageAnonExclusive``, or if its refcount is 1 (then
        ``page_move_anon_rmap`` makes it exclusive); otherwise ``wp_page_copy``. For an
        unshare fault, reuse means "nothing to do" and a copy is mapped read-only.

        Lock contract: mmap_lock (or VMA lock) read; takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        unshare = bool(flags & FAULT_FLAG_UNSHARE) and not flags & FAULT_FLAG_WRITE
        t.fault_site = "do_wp_page"
        got = yield from self.pte_offset_map_lock(t, mm, idx, "do_wp_page")
        if got is None:
            return VM_FAULT_OK
        table, ptl = got
        if int(table.entries[off]) != orig:
            self.unlock(t, ptl, WRITE, "do_wp_page")
            return VM_FAULT_OK
        pfn = orig >> PFN_SHIFT
        pool = self.pool
        if vma.shared and pfn != ZERO_PFN:
            if not unshare:
                self.cost.charge("pte_write")
                self.set_ptes(t, mm, table, off,
                              orig | PTE_WRITE | PTE_DIRTY | PTE_SOFT_DIRTY | PTE_YOUNG,
                              "wp_page_shared")
            self.unlock(t, ptl, WRITE, "do_wp_page")
            return VM_FAULT_OK
        if pfn != ZERO_PFN and self.is_anon(pfn):
            fl = int(pool.flags[pfn])
            if not fl & PG_anon_exclusive:
                self.cost.mark_fork_fault(t)  # fork made the page non-exclusive
            # 6.2: if (PageAnonExclusive(vmf->page)) goto reuse; ... if
            # (folio_ref_count(folio) > 1 + folio_test_swapcache(folio)) goto copy; ...
            # if (folio_test_swapcache(folio)) folio_free_swap(folio);
            # if (folio_test_ksm(folio) || folio_ref_count(folio) != 1) goto copy;
            reuse = bool(fl & PG_anon_exclusive)
            if (not reuse and fl & PG_swapcache and not fl & PG_locked
                    and int(pool.refcount[pfn]) == 2):
                self.folio_free_swap(pfn)
            reuse = reuse or int(pool.refcount[pfn]) == 1
            if reuse:
                if not fl & PG_anon_exclusive:
                    # page_move_anon_rmap: the page now belongs to this VMA's anon_vma.
                    if vma.anon_vma is not None:
                        pool.anon_vma[pfn] = vma.anon_vma.id
                    pool.flags[pfn] |= PG_anon_exclusive
                if not unshare:
                    self.cost.charge("pte_write")
                    self.set_ptes(t, mm, table, off,
                                  orig | PTE_WRITE | PTE_DIRTY | PTE_SOFT_DIRTY | PTE_YOUNG,
                                  "wp_page_reuse")
                self.unlock(t, ptl, WRITE, "do_wp_page")
                return VM_FAULT_OK
        # The shared zero page has no struct page to reuse (vm_normal_page() is NULL), so
        # an unshare fault on it -- which follow_page_pte requests for a FOLL_LONGTERM R/O
        # pin -- copies it into a fresh R/O-mapped anon page like any other (mm/memory.c
        # do_wp_page -> wp_page_copy, is_zero_pfn branch). Treating it as "nothing to do"
        # made GUP retry until it gave up with -EFAULT.
        # wp_page_copy
        if pfn != ZERO_PFN:
            self.get_pages(np.array([pfn]))
        self.unlock(t, ptl, WRITE, "do_wp_page")
        return (yield from self.wp_page_copy(t, vma, vpn, orig, unshare))
    def wp_page_copy(self, t: Thread, vma: Vma, vpn: int, orig: int, unshare: bool) -> Gen:
        """``wp_page_copy``: allocate, copy, and replace the mapping if the PTE is unchanged.

        Lock contract: mmap_lock (or VMA lock) read; caller holds a reference on the
        old page (dropped here); takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        old = orig >> PFN_SHIFT
        pool = self.pool
        if vma.anon_vma is None:
            self.anon_vma_prepare(vma)
        new = self.alloc_page("wp_page_copy")
        if new is None:
            if old != ZERO_PFN:
                self.put_page(old, "wp_page_copy")
            return VM_FAULT_OOM
        pool.content[new] = 0 if old == ZERO_PFN else pool.content[old]
        self.cost.charge("page_alloc")
        self.cost.charge("page_zero" if old == ZERO_PFN else "page_copy")
        yield "wp_page_copy:copied"
        got = yield from self.pte_offset_map_lock(t, mm, idx, "wp_page_copy")
        if got is None or int(got[0].entries[off]) != orig:
            if got is not None:
                self.unlock(t, got[1], WRITE, "wp_page_copy")
            self.put_page(new, "wp_page_copy")
            if old != ZERO_PFN:
                self.put_page(old, "wp_page_copy")
            return VM_FAULT_OK
        table, ptl = got
        if old == ZERO_PFN:
            mm.rss[MM_ANONPAGES] += 1
        self.page_add_new_anon_rmap(new, vma, vpn)
        entry = mk_pte(new, write=not unshare and bool(vma.flags & VM_WRITE),
                       dirty=not unshare, young=True)
        # ptep_clear_flush (flush_tlb_page on every CPU of the mm) + set_pte_at; the new
        # page's rmap, the old one's removal.
        self.flush_tlb_page(mm, vpn)
        self.set_ptes(t, mm, table, off, entry, "wp_page_copy")
        self.cost.charge("pte_write")
        self.cost.charge("tlb_flush_page")
        self.cost.charge("page_account", 1 if old == ZERO_PFN else 2)
        if old != ZERO_PFN:
            self.page_remove_rmap(np.array([old]), "wp_page_copy")
        self.unlock(t, ptl, WRITE, "wp_page_copy")
        if old != ZERO_PFN:
            self.put_page(old, "wp_page_copy")  # the mapping's reference
            self.put_page(old, "wp_page_copy")  # do_wp_page's get_page
        return VM_FAULT_OK
    def should_try_to_free_swap(self, pfn: int, vma: Vma, flags: int) -> bool:
        """``should_try_to_free_swap`` (mm/memory.c, 6.2).

        ::

            if (!folio_test_swapcache(folio))
                return false;
            if (mem_cgroup_swap_full(folio) || (vma->vm_flags & VM_LOCKED) ||
                folio_test_mlocked(folio))
                return true;
            /*
             * If we want to map a page that's in the swapcache writable, we
             * have to detect via the refcount if we're really the exclusive
             * user. Try freeing the swapcache to get rid of the swapcache
             * reference only in case it's likely that we'll be the exlusive user.
             */
            return (fault_flags & FAULT_FLAG_WRITE) && !folio_test_ksm(folio) &&
                folio_ref_count(folio) == 2;

        No memcg (``mem_cgroup_swap_full`` is ``vm_swap_full``), no mlock, no KSM.
        """
        if not int(self.pool.flags[pfn]) & PG_swapcache:
            return False
        if self.swap.full():
            return True
        return bool(flags & FAULT_FLAG_WRITE) and int(self.pool.refcount[pfn]) == 2
    def do_swap_page(self, t: Thread, vma: Vma, vpn: int, orig: int, flags: int) -> Gen:
        """``do_swap_page`` (mm/memory.c, 6.2) through the swap cache.

        ``swap_cache_get_folio`` finds the folio every swap PTE of the slot shares; on a
        miss ``swapin_readahead`` reads it into a new swap-cache folio (the device is not
        ``SWP_SYNCHRONOUS_IO``, so the skip-the-cache path is never taken). Under the PTL,
        with the PTE unchanged and the folio still the slot's (``folio_test_swapcache &&
        page_private(page) == entry.val``, else ``goto out_page``)::

            exclusive = pte_swp_exclusive(vmf->orig_pte);
            ...
            swap_free(entry);
            if (should_try_to_free_swap(folio, vma, vmf->flags))
                folio_free_swap(folio);
            ...
            if (!folio_test_ksm(folio) &&
                (exclusive || folio_ref_count(folio) == 1)) {
                if (vmf->flags & FAULT_FLAG_WRITE) {
                    pte = maybe_mkwrite(pte_mkdirty(pte), vma);
                    vmf->flags &= ~FAULT_FLAG_WRITE;
                }
                rmap_flags |= RMAP_EXCLUSIVE;
            }
            ...
            page_add_anon_rmap(page, vma, vmf->address, rmap_flags);
            ...
            if (vmf->flags & FAULT_FLAG_WRITE) {
                ret |= do_wp_page(vmf);

        The final ``do_wp_page`` is entered after the PTL is dropped (it re-takes it and
        re-checks the PTE). In the 6.4 per-VMA-lock mode swap-in returns
        ``VM_FAULT_RETRY`` (``if (vmf->flags & FAULT_FLAG_VMA_LOCK) { ret =
        VM_FAULT_RETRY; goto out; }``).

        Lock contract: mmap_lock read; takes the PTL.
        """
        if flags & FAULT_FLAG_VMA_LOCK:
            return VM_FAULT_RETRY
        mm = vma.mm
        pool = self.pool
        idx, off = divmod(vpn, self.P)
        slot = orig >> PFN_SHIFT
        t.fault_site = "do_swap_page"
        if vma.anon_vma is None:
            self.anon_vma_prepare(vma)
        pfn = self.swap_cache_get_folio(slot)
        if pfn is None:
            pfn = self.read_swap_cache_async(slot, "swapin_readahead")
            if pfn is None:
                # if (!folio) { ... if (likely(pte_same(*vmf->pte, vmf->orig_pte)))
                #         ret = VM_FAULT_OOM; goto unlock; }
                pmd = mm.pmd.get(idx)
                if pmd is not None and int(pmd.table.entries[off]) == orig:
                    return VM_FAULT_OOM
                return VM_FAULT_OK
            yield "do_swap_page:read"
        got = yield from self.pte_offset_map_lock(t, mm, idx, "do_swap_page")
        if got is None or int(got[0].entries[off]) != orig or not (
                int(pool.flags[pfn]) & PG_swapcache and int(pool.swap[pfn]) == slot):
            if got is not None:
                self.unlock(t, got[1], WRITE, "do_swap_page")
            self.put_page(pfn, "do_swap_page")
            return VM_FAULT_OK
        table, ptl = got
        exclusive = bool(orig & PTE_SWP_EXCLUSIVE)
        self.swap_free(slot, "do_swap_page")
        # Simplification: the kernel sleeps in folio_lock_or_retry while reclaim holds
        # the folio lock; here the fault goes on and only skips folio_free_swap then.
        if self.should_try_to_free_swap(pfn, vma, flags) and not (
                int(pool.flags[pfn]) & PG_locked):
            self.folio_free_swap(pfn)
        mm.rss[MM_SWAPENTS] -= 1
        mm.rss[MM_ANONPAGES] += 1
        write = bool(flags & FAULT_FLAG_WRITE)
        exclusive = exclusive or int(pool.refcount[pfn]) == 1
        mkwrite = write and exclusive
        self.page_add_anon_rmap(pfn, vma, vpn, exclusive)
        # The lookup's (or the read's) reference becomes the mapping's.
        entry = mk_pte(pfn, write=mkwrite and bool(vma.flags & VM_WRITE), dirty=mkwrite,
                       young=True, user=bool(vma.flags & (VM_READ | VM_WRITE)))
        # if (pte_swp_soft_dirty(vmf->orig_pte)) pte = pte_mksoft_dirty(pte);
        entry |= orig & PTE_SOFT_DIRTY
        self.cost.charge("page_account")
        self.cost.charge("pte_write")
        self.set_ptes(t, mm, table, off, entry, "do_swap_page")
        self.unlock(t, ptl, WRITE, "do_swap_page")
        if write and not mkwrite:
            return (yield from self.do_wp_page(t, vma, vpn, entry, flags))
        return VM_FAULT_OK
