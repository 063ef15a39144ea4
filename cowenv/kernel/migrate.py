"""Page migration: ``move_pages(2)`` and compaction, through migration entries.

Models ``mm/migrate.c`` of 6.2 (v4's base): ``do_pages_move`` →
``add_page_for_migration`` (``follow_page(FOLL_GET|FOLL_DUMP)``, the
``page_mapcount > 1 && !migrate_all`` → -EACCES rule, ``isolate_lru_page``), and
``migrate_pages`` (``NR_MAX_MIGRATE_PAGES_RETRY`` = 10 passes over -EAGAIN) →
``unmap_and_move`` → ``__unmap_and_move``: ``folio_trylock`` (``folio_lock`` when
``force``, i.e. from the third pass), ``try_to_migrate`` (``mm/rmap.c``:
``try_to_migrate_one`` turns each PTE into a migration entry --
``make_writable_migration_entry`` for a writable PTE, else
``make_readable_exclusive_migration_entry`` for a ``PageAnonExclusive`` page, else
``make_readable_migration_entry``, keeping young/dirty (6.1) -- after
``page_try_share_anon_rmap``, which fails on a maybe-pinned exclusive page and restores
the PTE), ``move_to_new_folio`` → ``migrate_folio`` → ``folio_migrate_mapping`` (the
reference check: ``folio_ref_count == folio_expected_refs`` = 1 for the isolation
reference, +1 for a swap-cache folio; a GUP pin makes it fail with -EAGAIN) and
``folio_migrate_copy``, then ``remove_migration_ptes`` (``remove_migration_pte`` maps the
new folio, or the old one when the move failed, with ``RMAP_EXCLUSIVE`` unless the entry
was readable). A fault on a migration entry waits (``migration_entry_wait`` →
``migration_entry_wait_on_locked``: until the old folio is unlocked) and retries.

Compaction (``mm/compaction.c``): a kcompactd pressure event on the kthread slot
isolates LRU pages in pfn order (the migrate scanner), skipping anonymous pages whose
``page_count`` exceeds their ``page_mapcount`` (``isolate_migratepages_block``'s pinned
check), and migrates them with ``MIGRATE_SYNC_LIGHT``.

COW PTE v4 enters through ``page_vma_mapped_walk``'s ``PVMW_BREAK_COW_PTE`` (04/14), which
``try_to_migrate_one`` and ``remove_migration_pte`` pass (see
:mod:`cowenv.kernel.cowpte`), and through ``handle_pte_fault``'s break before
``do_swap_page`` for any non-present PTE, migration entries included (03/14).

Simplifications (README "What is simplified"): one NUMA node: every page
``move_pages`` is asked to move is migrated to a new frame (the kernel skips pages
already on the target node); ``move_pages`` reports per page in its status array as
``do_pages_move`` does (see :meth:`MigrateMixin.sys_move_pages`); only anonymous pages migrate
(shmem page-cache pages are not movable in the model); the target frame comes from the
ordinary allocator, not compaction's free scanner; no THP splitting, no
``MIGRATE_ASYNC``, no deferred ``lru_add_drain``.
"""

from __future__ import annotations

import numpy as np

from .locks import READ, WRITE
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_locked,
    PG_swapbacked,
    PG_swapcache,
)
from .mm import VM_READ, VM_WRITE, MmStruct, Vma
from .ops import EACCES, EAGAIN, EBUSY, EFAULT, ENOENT, ENOMEM
from .pgtable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SOFT_DIRTY,
    PTE_SWP_EXCLUSIVE,
    PTE_WRITE,
    PTE_YOUNG,
    ZERO_PFN,
    make_migration_entry,
    mk_pte,
)
from .sched import Gen, Thread

#: ``NR_MAX_MIGRATE_PAGES_RETRY`` (mm/migrate.c, 6.2).
NR_MAX_MIGRATE_PAGES_RETRY = 10
MIGRATEPAGE_SUCCESS = 0


class MigrateMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    # ------------------------------------------------------------------ entry points
    def sys_move_pages(self, t: Thread, addr: int, length: int, all: bool = False,
                       stat: bool = False) -> Gen:
        """``move_pages(0, count, pages, nodes, status, MPOL_MF_MOVE[_ALL])`` of this process.

        ``pages`` are the pages of ``[addr, addr + length)`` in order; every ``nodes[i]``
        is node 0 (the model's only node); ``all`` is ``MPOL_MF_MOVE_ALL``; ``stat``
        passes ``nodes == NULL`` (``do_pages_stat``: report, move nothing).

        ``do_pages_move`` (mm/migrate.c, 6.2), one node, so one batch from ``start``::

            err = add_page_for_migration(mm, addr, current_node, &pagelist, ...);
            if (err > 0) continue;                 /* queued */
            if (err == -EEXIST) err = -EFAULT;
            err = store_status(status, i, err ? : current_node, 1);
            ...
            err = move_pages_and_store_status(mm, current_node, &pagelist,
                                              status, start, i, nr_pages);
            if (err) { if (err > 0) err--; goto out; }   /* page i accounted */
            current_node = NUMA_NO_NODE;
          out_flush:
            err1 = move_pages_and_store_status(mm, current_node, &pagelist, status,
                                               start, i, nr_pages);

        and ``move_pages_and_store_status``: ``err = do_move_pages_to_node(...); if
        (err) { if (err > 0) err += nr_pages - i; return err; } return
        store_status(status, start, node, i - start);``. So a page that cannot be
        looked up or isolated is not an error of the call: its status slot says why,
        and the pages queued before it are migrated at once. If ``migrate_pages``
        fails some of a batch (e.g. a GUP-pinned page: -EAGAIN ten times), the call
        returns the number of pages not migrated plus the pages not attempted, and the
        batch's status slots are **not written** (``None`` here; the caller's array
        keeps whatever it held). A pinned page is therefore not ``-EBUSY``: it is
        isolated, and its migration fails; ``-EBUSY`` is ``isolate_lru_page`` failing
        (the page is off the LRU, isolated by another migration or by reclaim).

        The status array is :attr:`Thread.out` ``["status"]`` and a trace event
        ``("out", "move_pages", {"status": [...]})`` just before the operation ends,
        so a scenario can assert it (step field ``status:``).

        Simplified: the model migrates every queued page to a new frame although it
        is "already on the target node" (one node), where the kernel would store the
        node and move nothing (``err = 0``).

        Lock contract: takes mmap_lock for read per page; migration takes the anon_vma
        lock for read and the PTLs.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        nr_pages = end - start
        status: list[int | None] = [None] * nr_pages
        t.out = {"status": status}
        if stat:
            yield from self.do_pages_stat(t, mm, start, status)
            self._ev(t.tid, "out", "move_pages", {"status": list(status)})
            return 0
        pages: list[int] = []
        first = 0  # ``start`` of the batch in do_pages_move
        err = 0
        batch = False  # current_node != NUMA_NO_NODE
        for i in range(nr_pages):
            if not batch:
                batch, first = True, i
            r = yield from self.add_page_for_migration(t, mm, start + i, all)
            if r > 0:
                pages.append(r)
                continue
            status[i] = r  # store_status(status, i, err ? : current_node, 1)
            err = yield from self._move_pages_and_store_status(t, pages, status, first, i,
                                                               nr_pages)
            pages = []
            if err:
                err = err - 1 if err > 0 else err  # "We have accounted for page i"
                break
            batch = False
        else:
            err = yield from self._move_pages_and_store_status(t, pages, status, first,
                                                               nr_pages, nr_pages)
        self._ev(t.tid, "out", "move_pages", {"status": list(status)})
        return err

    def _move_pages_and_store_status(self, t: Thread, pages: list[int],
                                     status: list[int | None], first: int, i: int,
                                     nr_pages: int) -> Gen:
        """``move_pages_and_store_status`` (mm/migrate.c, 6.2) for node 0."""
        if not pages:
            return 0
        failed = yield from self.migrate_pages(t, pages)
        if failed:
            return failed + nr_pages - i
        for j in range(first, i):
            status[j] = 0
        return 0

    def follow_page_dump(self, t: Thread, mm: MmStruct, vma: Vma, vpn: int,
                         site: str) -> Gen:
        """``follow_page(vma, addr, FOLL_GET | FOLL_DUMP)`` (mm/gup.c, 6.2): pfn or -errno.

        Returns the pfn of a normal page (present entry, PROT_NONE/NUMA-hinting ones
        included: ``follow_page`` does not pass ``FOLL_NUMA``), ``-ENOENT`` for a
        non-present, non-none entry (swap or migration entry: ``no_page``'s ``if
        (!pte_none(pte)) return NULL;``), and ``-EFAULT`` for the zero page
        (``vm_normal_page`` is NULL: "Avoid special (like zero) pages in core dumps")
        and for a none entry or missing table of an anonymous VMA (``no_page_table``:
        ``if ((flags & FOLL_DUMP) && (vma_is_anonymous(vma) || !vma->vm_ops->fault))
        return ERR_PTR(-EFAULT);``); a shmem VMA has ``->fault``, so -ENOENT there.

        Lock contract: takes and drops the PTL.
        """
        hole = -ENOENT if vma.shmem is not None else -EFAULT
        idx, off = divmod(vpn, self.P)
        got = yield from self.pte_offset_map_lock(t, mm, idx, site)
        if got is None:
            return hole
        table, ptl = got
        pte = int(table.entries[off])
        self.unlock(t, ptl, WRITE, site)
        if not pte & PTE_PRESENT:
            return -ENOENT if pte else hole
        pfn = pte >> PFN_SHIFT
        if pfn == ZERO_PFN:
            return -EFAULT
        return pfn

    def do_pages_stat(self, t: Thread, mm: MmStruct, start: int,
                      status: list[int | None]) -> Gen:
        """``do_pages_stat_array`` (mm/migrate.c, 6.2): the node of each page, or -errno.

        Under one ``mmap_read_lock``: ``vma_lookup`` (-EFAULT), ``follow_page(FOLL_GET |
        FOLL_DUMP)`` (its -errno, or -ENOENT for no page), else ``page_to_nid`` (0).
        """
        yield from self.lock(t, mm.mmap_lock, READ, "do_pages_stat")
        try:
            for i in range(len(status)):
                vma = mm.find_vma(start + i)
                if vma is None:
                    status[i] = -EFAULT
                    continue
                r = yield from self.follow_page_dump(t, mm, vma, start + i, "follow_page_pte")
                status[i] = 0 if r > 0 else r
        finally:
            self.unlock(t, mm.mmap_lock, READ, "do_pages_stat")

    def add_page_for_migration(self, t: Thread, mm: MmStruct, vpn: int, migrate_all: bool) -> Gen:
        """``add_page_for_migration`` (mm/migrate.c, 6.2): the isolated pfn (> 0) or -errno.

        ``vma_lookup`` (-EFAULT), :meth:`follow_page_dump` (-EFAULT/-ENOENT),
        ``page_mapcount(page) > 1 && !migrate_all`` → -EACCES, ``isolate_lru_page``
        failing → -EBUSY. The model's own refusal: a non-anonymous (shmem) page is
        -EBUSY (only anonymous pages are movable here).

        Lock contract: takes and drops mmap_lock for read; the PTL inside follow_page.
        """
        yield from self.lock(t, mm.mmap_lock, READ, "add_page_for_migration")
        try:
            vma = mm.find_vma(vpn)
            if vma is None:
                return -EFAULT
            pfn = yield from self.follow_page_dump(t, mm, vma, vpn, "follow_page_pte")
            if pfn < 0:
                return pfn
            if not int(self.pool.flags[pfn]) & PG_anon:
                return -EBUSY  # model: only anonymous pages are movable
            if int(self.pool.mapcount[pfn]) > 1 and not migrate_all:
                return -EACCES
            if not self.pool.on_lru(pfn):
                return -EBUSY  # isolate_lru_page failed (isolated elsewhere)
            self.folio_isolate_lru(pfn)
            return pfn
        finally:
            self.unlock(t, mm.mmap_lock, READ, "add_page_for_migration")

    def sys_compact(self, t: Thread, nr: int = 1, pid: int = 0, addr: int = -1) -> Gen:
        """kcompactd: isolate up to ``nr`` movable LRU pages in pfn order and migrate them.

        ``isolate_migratepages_block`` (mm/compaction.c, 6.2) in pfn order, skipping a
        page that is not on the LRU, not anonymous, or whose references exceed its
        mappings (``if (!page_mapping(page) && page_count(page) > page_mapcount(page))
        goto isolate_fail;``), then ``migrate_pages(MIGRATE_SYNC_LIGHT)``. ``pid``/``addr``
        (a scenario convenience, as for ``reclaim``) put the page mapped there first.

        Returns the number of pages migrated. Lock contract: no mmap_lock.
        """
        pool = self.pool
        order = sorted(pool.lru_order())
        if pid and addr >= 0 and pid in self.procs:
            mm = self.procs[pid].mm
            vpn = addr // self.config.page_size
            w = mm.pmd.get(vpn // self.P)
            if w is not None:
                pte = int(w.table.entries[vpn % self.P])
                p = pte >> PFN_SHIFT
                if pte & PTE_PRESENT and p in order:
                    order.remove(p)
                    order.insert(0, p)
        pages: list[int] = []
        for pfn in order:
            if len(pages) >= nr:
                break
            if not pool.on_lru(pfn) or not self.is_anon(pfn):
                continue
            extra = 1 if int(pool.flags[pfn]) & PG_swapcache else 0
            if int(pool.refcount[pfn]) > int(pool.mapcount[pfn]) + extra:
                continue  # pinned (page_count > page_mapcount): migration would fail
            self.folio_isolate_lru(pfn)
            pages.append(pfn)
        if not pages:
            return 0
        yield "isolate_migratepages:isolated"
        failed = yield from self.migrate_pages(t, pages)
        return len(pages) - failed

    # ------------------------------------------------------------------ migrate_pages
    def migrate_pages(self, t: Thread, pages: list[int]) -> Gen:
        """``migrate_pages``: up to 10 passes while some page returns -EAGAIN.

        Returns ``nr_failed``: pages not migrated (put back on the LRU).
        """
        todo = list(pages)
        failed = 0
        for npass in range(NR_MAX_MIGRATE_PAGES_RETRY):
            if not todo:
                break
            if npass:
                yield "migrate_pages:retry"
            retry: list[int] = []
            for i, pfn in enumerate(todo):
                rc = yield from self.unmap_and_move(t, pfn, force=npass > 2)
                if rc == -EAGAIN:
                    retry.append(pfn)
                elif rc == -ENOMEM:
                    # "case -ENOMEM: ... goto out": the rest goes back unmigrated.
                    for p in [pfn, *todo[i + 1:], *retry]:
                        failed += 1
                        self.folio_putback_lru(p)
                    return failed
                elif rc != MIGRATEPAGE_SUCCESS:
                    failed += 1
                    self.folio_putback_lru(pfn)
            todo = retry
        for pfn in todo:  # still -EAGAIN after the last pass
            failed += 1
            self.folio_putback_lru(pfn)
        return failed

    def unmap_and_move(self, t: Thread, pfn: int, force: bool) -> Gen:
        """``unmap_and_move``: allocate the target and ``__unmap_and_move``.

        A folio whose only reference is the isolation one was freed meanwhile: done.
        Returns 0, -EAGAIN (retry) or -ENOMEM. On success the isolation reference of
        the old folio is dropped here (it is freed).
        """
        pool = self.pool
        if int(pool.refcount[pfn]) == 1:
            self.put_page(pfn, "unmap_and_move")  # "page was freed from under us"
            return MIGRATEPAGE_SUCCESS
        dst = self.alloc_page("alloc_migration_target")
        if dst is None:
            return -ENOMEM
        self.cost.charge("page_alloc")
        rc = yield from self._unmap_and_move(t, pfn, dst, force)
        # __unmap_and_move's "out:": if (rc == MIGRATEPAGE_SUCCESS) folio_put(dst); --
        # the allocation's reference; the mappings (remove_migration_pte) and the LRU
        # keep dst. unmap_and_move then drops src's isolation reference (freeing it),
        # or, on failure, puts dst back (put_new_page / put_page).
        self.put_page(dst, "unmap_and_move")
        if rc == MIGRATEPAGE_SUCCESS:
            self.put_page(pfn, "unmap_and_move")
        return rc

    def _unmap_and_move(self, t: Thread, src: int, dst: int, force: bool) -> Gen:
        """``__unmap_and_move``: lock, unmap to migration entries, copy, remap.

        Lock contract: takes the folio lock of ``src`` (``PG_locked``) for the whole
        move; ``try_to_migrate``/``remove_migration_ptes`` take the anon_vma lock for
        read and each PTL.
        """
        pool = self.pool
        if int(pool.flags[src]) & PG_locked:
            if not force:
                return -EAGAIN  # if (!folio_trylock(src)) { if (!force ...) goto out; }
            while int(pool.flags[src]) & PG_locked:
                yield "__unmap_and_move:folio_lock"
        pool.flags[src] |= PG_locked
        pool.flags[dst] |= PG_locked  # folio_trylock(dst): nobody else knows dst
        rc = -EAGAIN
        try:
            was_mapped = False
            if int(pool.mapcount[src]) > 0:
                yield from self.try_to_migrate(t, src)
                was_mapped = True
            if int(pool.mapcount[src]) == 0:
                rc = self.move_to_new_folio(dst, src)
                yield "move_to_new_folio:done"
            if rc == MIGRATEPAGE_SUCCESS:
                pool.lru_add([dst])  # folio_add_lru(dst)
            if was_mapped:
                yield from self.remove_migration_ptes(
                    t, src, dst if rc == MIGRATEPAGE_SUCCESS else src)
        finally:
            pool.flags[dst] &= ~np.int64(PG_locked)
            pool.flags[src] &= ~np.int64(PG_locked)
        return rc

    def folio_expected_refs(self, pfn: int) -> int:
        """``folio_expected_refs`` + the isolation reference of ``folio_migrate_mapping``.

        ``refs = 1; if (!mapping) return refs; refs += folio_nr_pages(folio);`` -- an
        anonymous folio has no mapping unless it is in the swap cache.
        """
        return 1 + (1 if int(self.pool.flags[pfn]) & PG_swapcache else 0)

    def move_to_new_folio(self, dst: int, src: int) -> int:
        """``move_to_new_folio`` → ``migrate_folio``: reference check, then copy.

        ``folio_migrate_mapping``: ``if (folio_ref_count(folio) != expected_count)
        return -EAGAIN;`` (a GUP pin adds ``GUP_PIN_COUNTING_BIAS``); a swap-cache folio
        is replaced in the swap cache by ``dst``, which takes over the cache's
        reference. ``folio_migrate_copy``: data, ``PG_dirty``, ``folio->mapping``
        (anon_vma) and ``index``; ``PageAnonExclusive`` is not copied, the migration
        entries carry it back (``RMAP_EXCLUSIVE`` in ``remove_migration_pte``).
        """
        pool = self.pool
        if int(pool.refcount[src]) != self.folio_expected_refs(src):
            return -EAGAIN
        keep = PG_anon | PG_dirty | PG_swapbacked | PG_swapcache
        pool.flags[dst] |= int(pool.flags[src]) & keep
        if pool.flags[src] & PG_swapcache:
            slot = int(pool.swap[src])
            self.swap.cache[slot] = dst
            pool.swap[dst] = slot
            pool.swap[src] = -1
            pool.flags[src] &= ~np.int64(PG_swapcache)
            pool.refcount[dst] += 1  # folio_ref_add(newfolio, nr): the cache's
            pool.refcount[src] -= 1  # folio_ref_unfreeze(folio, expected_count - nr)
        pool.content[dst] = pool.content[src]
        pool.anon_vma[dst] = pool.anon_vma[src]
        pool.index[dst] = pool.index[src]
        self.cost.charge("page_copy")
        return MIGRATEPAGE_SUCCESS

    # ------------------------------------------------------------------ rmap side
    def try_to_migrate(self, t: Thread, pfn: int) -> Gen:
        """``try_to_migrate`` → ``try_to_migrate_one`` per mapping (mm/rmap.c, 6.2).

        ::

            pteval = ptep_clear_flush(vma, address, pvmw.pte);
            if (pte_dirty(pteval)) folio_mark_dirty(folio);
            anon_exclusive = folio_test_anon(folio) && PageAnonExclusive(subpage);
            ...
            if (anon_exclusive && page_try_share_anon_rmap(subpage)) {
                set_pte_at(mm, address, pvmw.pte, pteval);
                ret = false; page_vma_mapped_walk_done(&pvmw); break;
            }
            if (pte_write(pteval)) entry = make_writable_migration_entry(pfn);
            else if (anon_exclusive) entry = make_readable_exclusive_migration_entry(pfn);
            else entry = make_readable_migration_entry(pfn);
            ... set_pte_at(mm, address, pvmw.pte, swp_pte);
            page_remove_rmap(subpage, vma, false); folio_put(folio);

        The rss counters do not change: a migration entry counts as the page it names
        (``copy_nonpresent_pte``/``zap_pte_range`` use ``mm_counter(page)``).
        """
        pool = self.pool
        r = yield from self.rmap_walk_anon(t, pfn, "try_to_migrate")
        if not r:
            return
        av, cands = r
        for vma, vpn in cands:
            got = yield from self._rmap_map_pte(t, vma, vpn, pfn, "try_to_migrate_one")
            if got is None:
                continue
            table, ptl, off = got
            mm = vma.mm
            pte = int(table.entries[off])
            if pte & PTE_DIRTY:
                pool.flags[pfn] |= PG_dirty
            excl = bool(int(pool.flags[pfn]) & PG_anon_exclusive)
            if excl and int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:
                # page_try_share_anon_rmap() fails on a maybe-pinned exclusive page.
                self.unlock(t, ptl, WRITE, "try_to_migrate_one")
                break
            if excl:
                pool.flags[pfn] &= ~np.int64(PG_anon_exclusive)
            entry = make_migration_entry(pfn, bool(pte & PTE_WRITE), excl,
                                         bool(pte & PTE_YOUNG), bool(pte & PTE_DIRTY))
            # if (pte_soft_dirty(pteval)) swp_pte = pte_swp_mksoft_dirty(swp_pte);
            entry |= pte & PTE_SOFT_DIRTY
            self.set_ptes(t, mm, table, off, entry, "try_to_migrate_one")
            # ptep_clear_flush(vma, address, pvmw.pte): the old translation goes before
            # the page is copied and freed.
            self.flush_tlb_page(mm, vpn)
            self.cost.charge("pte_write")
            self.cost.charge("page_account")
            self.page_remove_rmap(np.array([pfn]), "try_to_migrate_one")
            self.put_page(pfn, "try_to_migrate_one")
            self.unlock(t, ptl, WRITE, "try_to_migrate_one")
        self.unlock(t, av.lock, READ, "try_to_migrate")

    def remove_migration_ptes(self, t: Thread, src: int, dst: int) -> Gen:
        """``remove_migration_ptes(src, dst, false)``: ``rmap_walk(dst, remove_migration_pte)``.

        ``dst`` has ``src``'s anon_vma and index (``folio_migrate_copy``), so the walk
        visits the same VMAs; each looks for migration entries naming ``src``.
        """
        r = yield from self.rmap_walk_anon(t, dst, "remove_migration_ptes")
        if not r:
            return
        av, cands = r
        for vma, vpn in cands:
            yield from self.remove_migration_pte(t, vma, vpn, src, dst)
        self.unlock(t, av.lock, READ, "remove_migration_ptes")

    def remove_migration_pte(self, t: Thread, vma: Vma, vpn: int, src: int, dst: int) -> Gen:
        """``remove_migration_pte``: map ``dst`` where a migration entry names ``src``.

        ``page_vma_mapped_walk`` with ``PVMW_SYNC | PVMW_MIGRATION`` (v4 adds
        ``PVMW_BREAK_COW_PTE``)::

            folio_get(folio);
            pte = mk_pte(new, READ_ONCE(vma->vm_page_prot));
            if (!is_migration_entry_young(entry)) pte = pte_mkold(pte);
            if (folio_test_dirty(folio) && is_migration_entry_dirty(entry))
                pte = pte_mkdirty(pte);
            if (is_writable_migration_entry(entry)) pte = maybe_mkwrite(pte, vma);
            if (folio_test_anon(folio) && !is_readable_migration_entry(entry))
                rmap_flags |= RMAP_EXCLUSIVE;
            page_add_anon_rmap(new, vma, pvmw.address, rmap_flags);
            set_pte_at(vma->vm_mm, pvmw.address, pvmw.pte, pte);
        """
        got = yield from self._rmap_map_pte(t, vma, vpn, src, "remove_migration_pte")
        if got is None:
            return
        table, ptl, off = got
        mm = vma.mm
        entry = int(table.entries[off])
        pool = self.pool
        pool.refcount[dst] += 1  # folio_get
        write = bool(entry & PTE_WRITE) and bool(vma.flags & VM_WRITE)
        dirty = bool(int(pool.flags[dst]) & PG_dirty) and bool(entry & PTE_DIRTY)
        pte = mk_pte(dst, write=write, dirty=dirty, young=bool(entry & PTE_YOUNG),
                     user=bool(vma.flags & (VM_READ | VM_WRITE)))
        if entry & PTE_SOFT_DIRTY:  # if (pte_swp_soft_dirty(*pvmw.pte))
            pte |= PTE_SOFT_DIRTY   #     pte = pte_mksoft_dirty(pte);
        exclusive = bool(entry & (PTE_WRITE | PTE_SWP_EXCLUSIVE))
        self.page_add_anon_rmap(dst, vma, vpn, exclusive)
        self.set_ptes(t, mm, table, off, pte, "remove_migration_pte")
        self.cost.charge("pte_write")
        self.cost.charge("page_account")
        self.unlock(t, ptl, WRITE, "remove_migration_pte")

    # ------------------------------------------------------------------ faults
    def migration_entry_wait(self, t: Thread, vma: Vma, vpn: int) -> Gen:
        """``migration_entry_wait`` (mm/migrate.c, 6.2): wait for the migration to end.

        Under the PTL, re-read the PTE; if it is still a migration entry,
        ``migration_entry_wait_on_locked`` drops the PTL and sleeps until the folio it
        names is unlocked. The fault then returns and the access is retried. (mmap_lock
        or the VMA lock stays held for read meanwhile, as in the kernel.)
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        got = yield from self.pte_offset_map_lock(t, mm, idx, "migration_entry_wait")
        if got is None:
            return
        table, ptl = got
        pte = int(table.entries[off])
        self.unlock(t, ptl, WRITE, "migration_entry_wait")
        if not pte & PTE_MIGRATION:
            return
        pfn = pte >> PFN_SHIFT
        while int(self.pool.flags[pfn]) & PG_locked:
            yield "migration_entry_wait:folio_wait"

    def migration_entries_rss(self, entries: np.ndarray) -> int:
        """How many of ``entries`` are migration entries (each counts as MM_ANONPAGES)."""
        return int(np.count_nonzero(entries & PTE_MIGRATION))


__all__ = ["MigrateMixin", "NR_MAX_MIGRATE_PAGES_RETRY"]
