"""Swap slots: ``mm/swapfile.c`` of 6.2.

``swap_duplicate``, ``swap_free``, ``put_swap_folio``, ``free_swap_and_cache`` (with
``__try_to_reclaim_swap``), ``folio_swapped`` and ``folio_free_swap``; and ``swapoff``
(``try_to_unuse`` → ``unuse_mm`` → ``unuse_vma`` → ``unuse_pmd_range`` →
``unuse_pte_range`` → ``unuse_pte``), the walker that brings every swap entry of every
mm back in. The swap device
itself (slots, counts, ``SWAP_HAS_CACHE``, data, the cache's xarray) is
:class:`cowenv.kernel.memory.SwapDevice`; the swap cache's own functions are in
:mod:`cowenv.kernel.swap_state`.

Simplifications: one swap device, no clusters, no ``swap_info_struct`` locking (slots
change only under the PTL or with the folio isolated, as the callers' contracts say),
``folio_lock`` is not modelled (the callers' sections run without a preemption point
where the kernel holds the folio lock).
"""

from __future__ import annotations

from .locks import READ, WRITE
from .memory import PG_dirty, PG_locked, PG_swapcache
from .mm import MM_ANONPAGES, MM_SWAPENTS, VM_READ, VM_WRITE, MmStruct, Vma
from .ops import EBUSY, EINTR, ENOMEM
from .pgtable import PFN_SHIFT, PTE_SOFT_DIRTY, PTE_SWAP, PTE_SWP_EXCLUSIVE, mk_pte
from .sched import Gen, Thread

#: Passes of ``try_to_unuse`` (each over every mm and the swap cache) before the model's
#: swapoff gives up with -EINTR, standing in for the signal that interrupts a swapoff
#: that does not finish (the kernel retries until ``signal_pending``). The cap is needed
#: because the model's swapoff skips what it would sleep on in the kernel (a folio
#: reclaim holds locked, a slot a swap-in is filling, an mm being torn down) and so can
#: spin while the scheduler keeps the other task paused; a pass during which no other
#: task was in the kernel must leave nothing in use (the oracle's ``on_unuse_pass``).
SWAPOFF_MAX_PASSES = 16


class SwapfileMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def swap_duplicate(self, slot: int, n: int = 1) -> None:
        """``swap_duplicate``: one more swap PTE names ``slot`` (fork, try_to_unmap_one)."""
        self.swap.swap_map[slot] += n

    def _swap_slot_maybe_free(self, slot: int) -> None:
        """``swap_entry_free`` when neither a count nor ``SWAP_HAS_CACHE`` remains."""
        sw = self.swap
        if sw.swap_map[slot] == 0 and not sw.has_cache[slot]:
            sw.free_slot(slot)

    def swap_free(self, slot: int, site: str, n: int = 1) -> None:
        """``swap_free`` → ``__swap_entry_free``: drop ``n`` swap-PTE references.

        The slot itself is freed only when no count and no ``SWAP_HAS_CACHE`` remain.
        """
        sw = self.swap
        sw.swap_map[slot] -= n
        if sw.swap_map[slot] < 0:
            self._report("accounting", site, f"swap_map underflow on slot {slot}")
            sw.swap_map[slot] = 0
        self._swap_slot_maybe_free(slot)

    def put_swap_folio(self, slot: int) -> None:
        """``put_swap_folio``: clear ``SWAP_HAS_CACHE`` (the slot may become free)."""
        self.swap.has_cache[slot] = False
        self._swap_slot_maybe_free(slot)

    def free_swap_and_cache(self, slot: int, site: str) -> None:
        """``free_swap_and_cache`` (mm/swapfile.c, 6.2): zap of a swap entry.

        ::

            count = __swap_entry_free(p, entry);
            if (count == SWAP_HAS_CACHE && !swap_page_trans_huge_swapped(p, entry))
                __try_to_reclaim_swap(p, swp_offset(entry), TTRS_UNMAPPED | TTRS_FULL);

        ``__try_to_reclaim_swap`` frees the swap-cache folio if it is not mapped
        (``TTRS_UNMAPPED``) or swap is more than half full (``TTRS_FULL``), through
        ``folio_free_swap``; the lookup reference is dropped after, which frees an
        unmapped folio nobody else holds.
        """
        self.swap_free(slot, site)
        sw = self.swap
        if sw.swap_map[slot] == 0 and sw.has_cache[slot]:
            pfn = sw.cache.get(slot)
            if pfn is None:
                return  # SWAP_HAS_CACHE before the folio is in the cache (swapin race)
            if int(self.pool.flags[pfn]) & PG_locked:
                return  # if (!folio_trylock(folio)) goto out;
            if int(self.pool.mapcount[pfn]) == 0 or sw.full():
                self.get_pages_one(pfn)  # filemap_get_folio's reference
                self.folio_free_swap(pfn)
                self.put_page(pfn, "__try_to_reclaim_swap")

    def folio_swapped(self, pfn: int) -> bool:
        """``folio_swapped`` (small folio): ``swap_swapcount(entry) != 0``."""
        slot = int(self.pool.swap[pfn])
        return slot >= 0 and int(self.swap.swap_map[slot]) > 0

    def folio_free_swap(self, pfn: int) -> bool:
        """``folio_free_swap`` (mm/swapfile.c, 6.2): drop the swap cache if no PTE names the slot.

        ::

            if (!folio_test_swapcache(folio))
                return false;
            if (folio_test_writeback(folio))
                return false;
            if (folio_swapped(folio))
                return false;
            ...
            delete_from_swap_cache(folio);
            folio_set_dirty(folio);
            return true;

        The folio is dirty afterwards: memory holds the only copy of the data. The
        caller holds a reference on the folio (the cache's is dropped here).
        """
        if not int(self.pool.flags[pfn]) & PG_swapcache:
            return False
        if self.folio_swapped(pfn):
            return False
        self.delete_from_swap_cache(pfn, "folio_free_swap")
        self.pool.flags[pfn] |= PG_dirty
        return True

    # ------------------------------------------------------------------ swapoff
    def sys_swapoff(self, t: Thread) -> Gen:
        """``swapoff(2)`` of the one swap device, then ``swapon`` again (6.2).

        ::

            del_from_avail_list(p);
            ...
            p->flags &= ~SWP_WRITEOK;
            ...
            err = try_to_unuse(p->type);
            if (err) {
                /* re-insert swap space back into swap_list */
                reinsert_swap_info(p);
                goto out_dput;
            }

        While it runs no slot is handed out (``SWP_WRITEOK`` clear: reclaim keeps its
        pages). The model has a single swap device, so instead of tearing it down the
        device is usable again when ``swapoff`` returns -- the pair ``swapoff; swapon``
        -- with every slot free after a success. Returns 0, -ENOMEM (a swap-in failed to
        allocate) or -EINTR (the model's stand-in for the signal that ends a swapoff
        whose passes stop making progress: :data:`SWAPOFF_MAX_PASSES` passes).

        Lock contract: none held on entry; ``unuse_mm`` takes each mmap_lock for read.
        """
        sw = self.swap
        if not sw.writeok:
            return -EBUSY  # another swapoff is running (SWP_WRITEOK already clear)
        sw.writeok = False
        try:
            err = yield from self.try_to_unuse(t)
        finally:
            sw.writeok = True  # reinsert_swap_info, or the swapon that follows
        return err

    def try_to_unuse(self, t: Thread) -> Gen:
        """``try_to_unuse`` (mm/swapfile.c, 6.2): unuse every mm, then the swap cache.

        ::

        retry:
            ...
            while (READ_ONCE(si->inuse_pages) && !signal_pending(current) &&
                   (p = p->next) != &init_mm.mmlist) {
                ...
                retval = unuse_mm(mm, type);
                if (retval) { mmput(prev_mm); return retval; }
                cond_resched();
                ...
            }
            ...
            while (READ_ONCE(si->inuse_pages) && !signal_pending(current) &&
                   (i = find_next_to_unuse(si, i)) != 0) {
                ...
                folio = filemap_get_folio(swap_address_space(entry), i);
                if (!folio) continue;
                folio_lock(folio);
                folio_wait_writeback(folio);
                folio_free_swap(folio);
                folio_unlock(folio);
                folio_put(folio);
            }
            if (READ_ONCE(si->inuse_pages)) {
                if (!signal_pending(current))
                    goto retry;
                return -EINTR;
            }

        ``init_mm.mmlist`` holds every mm that ever had a swap entry (added by
        ``try_to_unmap_one`` and ``dup_mmap``); the model walks every live mm by pid
        (an mm never on the list has no swap entry to unuse). No shmem page is ever
        swapped here (reclaim scans the anon LRU only), so ``shmem_unuse`` has nothing
        to do. A swap-cache folio locked by reclaim is skipped on this pass
        (``folio_lock`` would sleep); the retry reaches it.

        A *solitary* pass -- every other task idle when it starts and no operation
        started before it ends -- is judged by the oracle (``Oracle.on_unuse_pass``): it
        must leave no slot in use, since nothing could hide an entry from it.
        """
        sw = self.swap
        judged = False
        for _ in range(SWAPOFF_MAX_PASSES):
            # A solitary pass: every other task idle when it starts, and none starts an
            # operation before it ends (the oracle's on_unuse_pass).
            alone = all(o is t or o.gen is None for o in self.threads.values())
            ops = self.op_count
            for mm in self.unuse_mm_list():
                if sw.inuse_pages() == 0:
                    break
                if mm.dead or mm.users == 0:
                    continue  # mmget_not_zero() failed: exit_mmap frees its swap itself
                ret = yield from self.unuse_mm(t, mm)
                if ret:
                    return ret
                yield "try_to_unuse:mm_done"
            for _slot, pfn in sorted(sw.cache.items()):
                if sw.inuse_pages() == 0:
                    break
                if int(self.pool.flags[pfn]) & PG_locked:
                    continue
                self.get_pages_one(pfn)  # filemap_get_folio
                self.folio_free_swap(pfn)
                self.put_page(pfn, "try_to_unuse")
            if alone and self.op_count == ops and not judged and self.oracle is not None:
                judged = self.oracle.on_unuse_pass()
            if sw.inuse_pages() == 0:
                return 0
            yield "try_to_unuse:retry"
        return -EINTR

    def unuse_mm_list(self) -> list[MmStruct]:
        """The mms ``try_to_unuse`` walks (``init_mm.mmlist``): every live mm, by pid."""
        return self.live_mms()

    def unuse_mm(self, t: Thread, mm: MmStruct) -> Gen:
        """``unuse_mm`` (6.2): every VMA with an ``anon_vma``, under mmap_lock read.

        ::

            mmap_read_lock(mm);
            for_each_vma(vmi, vma) {
                if (vma->anon_vma) {
                    ret = unuse_vma(vma, type);
                    if (ret) break;
                }
                cond_resched();
            }
            mmap_read_unlock(mm);

        Lock contract: takes mm's mmap_lock for read.
        """
        yield from self.lock(t, mm.mmap_lock, READ, "unuse_mm")
        ret = 0
        for vma in list(mm.vmas):
            if vma.anon_vma is None or vma.detached:
                continue
            ret = yield from self.unuse_vma(t, vma)
            if ret:
                break
        self.unlock(t, mm.mmap_lock, READ, "unuse_mm")
        return ret

    def unuse_vma(self, t: Thread, vma: Vma) -> Gen:
        """``unuse_vma`` → ``unuse_pmd_range`` (6.2, with v4 03/14's break).

        ``unuse_pmd_range``::

            if (pmd_none_or_trans_huge_or_clear_bad(pmd))
                continue;
            if (break_cow_pte(vma, pmd, addr))      /* v4 03/14 */
                return -ENOMEM;
            ret = unuse_pte_range(vma, pmd, addr, next, type);
            if (ret)
                return ret;

        Lock contract: mmap_lock read.
        """
        mm = vma.mm
        P = self.P
        for idx in range(vma.start // P, (vma.end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            ret = yield from self.cow_break_for_walker(t, vma, idx, "unuse_pmd_range")
            if ret:
                return -ENOMEM
            lo = max(vma.start, idx * P)
            hi = min(vma.end, (idx + 1) * P)
            ret = yield from self.unuse_pte_range(t, vma, idx, lo, hi)
            if ret:
                return ret
        return 0

    def unuse_pte_range(self, t: Thread, vma: Vma, idx: int, lo: int, hi: int) -> Gen:
        """``unuse_pte_range`` (6.2) over virtual pages ``[lo, hi)`` of PMD ``idx``.

        ::

            if (!is_swap_pte(*pte)) continue;
            ...
            folio = swap_cache_get_folio(entry, vma, addr);
            if (!folio) {
                page = swapin_readahead(entry, GFP_HIGHUSER_MOVABLE, &vmf);
                ...
            }
            if (!folio) {
                if (*swap_map == 0 || *swap_map == SWAP_MAP_BAD)
                    goto try_next;
                return -ENOMEM;
            }
            folio_lock(folio);
            folio_wait_writeback(folio);
            ret = unuse_pte(vma, pmd, addr, entry, &folio->page);
            if (ret < 0) { ... goto out; }
            folio_free_swap(folio);
            folio_unlock(folio);
            folio_put(folio);

        The entry is read without the PTL (``pte_offset_map``); ``unuse_pte`` re-checks
        it under the lock.

        Lock contract: mmap_lock read; ``unuse_pte`` takes the PTL.
        """
        mm = vma.mm
        P = self.P
        sw = self.swap
        for vpn in range(lo, hi):
            pmd = mm.pmd.get(idx)
            if pmd is None:
                return 0
            pte = int(pmd.table.entries[vpn % P])
            if not pte & PTE_SWAP:
                continue
            slot = pte >> PFN_SHIFT
            pfn = self.swap_cache_get_folio(slot)
            if pfn is None:
                pfn = self.read_swap_cache_async(slot, "unuse_pte_range")
                if pfn is None:
                    if sw.swap_map[slot] == 0:
                        continue
                    return -ENOMEM
                yield "unuse_pte_range:read"
            ret = yield from self.unuse_pte(t, vma, vpn, slot, pfn)
            # As in do_swap_page, the model does not sleep in folio_lock while reclaim
            # holds the folio: it maps the page and leaves folio_free_swap to later.
            if ret >= 0 and not int(self.pool.flags[pfn]) & PG_locked:
                self.folio_free_swap(pfn)
            self.put_page(pfn, "unuse_pte_range")  # folio_put: the lookup's reference
            if ret < 0:
                return ret
        return 0

    def unuse_pte(self, t: Thread, vma: Vma, vpn: int, slot: int, pfn: int) -> Gen:
        """``unuse_pte`` (6.2): map the swap-cache page where the swap entry was.

        ::

            pte = pte_offset_map_lock(vma->vm_mm, pmd, addr, &ptl);
            if (unlikely(!pte_same_as_swp(*pte, swp_entry_to_pte(entry)))) {
                ret = 0; goto out;
            }
            ...
            dec_mm_counter(vma->vm_mm, MM_SWAPENTS);
            inc_mm_counter(vma->vm_mm, MM_ANONPAGES);
            get_page(page);
            if (pte_swp_exclusive(*pte))
                rmap_flags |= RMAP_EXCLUSIVE;
            page_add_anon_rmap(page, vma, addr, rmap_flags);
            new_pte = pte_mkold(mk_pte(page, vma->vm_page_prot));
            if (pte_swp_soft_dirty(*pte))
                new_pte = pte_mksoft_dirty(new_pte);
            ...
            set_pte_at(vma->vm_mm, addr, pte, new_pte);
            swap_free(entry);

        ``pte_same_as_swp`` ignores the swap PTE's software bits (exclusive, soft-dirty).
        The new entry is read-only (``vm_page_prot`` of a private VMA) and protnone in a
        PROT_NONE VMA; not KSM, so the swap-cache page itself is mapped. Returns 1 (mapped)
        or 0 (the entry changed).

        Lock contract: mmap_lock read; takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        got = yield from self.pte_offset_map_lock(t, mm, idx, "unuse_pte")
        if got is None:
            return 0
        table, ptl = got
        pte = int(table.entries[off])
        if not pte & PTE_SWAP or pte >> PFN_SHIFT != slot:
            self.unlock(t, ptl, WRITE, "unuse_pte")
            return 0
        mm.rss[MM_SWAPENTS] -= 1
        mm.rss[MM_ANONPAGES] += 1
        self.get_pages_one(pfn)
        self.page_add_anon_rmap(pfn, vma, vpn, bool(pte & PTE_SWP_EXCLUSIVE))
        new = mk_pte(pfn, write=False, young=False,
                     user=bool(vma.flags & (VM_READ | VM_WRITE))) | (pte & PTE_SOFT_DIRTY)
        self.cost.charge("page_account")
        self.cost.charge("pte_write")
        self.set_ptes(t, mm, table, off, new, "unuse_pte")
        self.swap_free(slot, "unuse_pte")
        self.unlock(t, ptl, WRITE, "unuse_pte")
        return 1
