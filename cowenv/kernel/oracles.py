"""Oracles: what counts as a violation (BRIEF §5).

Two families, kept independent of the code they judge:

* **Shadow oracles** (isolation, pin coherence, user-visible syscall contract) keep
  their own model of what each process and each pin should see, computed from syscall
  semantics alone — the ranges passed to mmap/munmap/madvise/mprotect/fork and the tokens
  written — and never read the page tables under test.
* **Recount oracles** (accounting, sharing, exclusivity, leaks, mprotect contract)
  recount from the page tables and never trust the counters they check.

Neither knows anything about flaws. The kernel itself reports what the real kernel
would print at the site where it happens (``print_bad_pte``, ``check_mm``, lockdep
splats, refcount underflow, use of freed pages/tables, DH's shared-table write check).
The MMU model reports the TLB oracles at the access (:mod:`cowenv.kernel.tlb`):
``memory-safety@tlb_stale_entry`` (an access through a TLB entry whose frame was freed
or reused: a page freed before the flush), ``memory-safety@tlb_stale_table`` (a walk
through a paging-structure-cache entry whose table was freed: a table freed without
``tlb_remove_table``) and ``isolation@tlb_stale_write`` (a store through a writable
entry the page tables no longer grant, e.g. to a page fork made COW-shared, with no
flush pending for the mm).

Invariants checked by :meth:`Oracle.check_accounting` (at every quiescent point, i.e.
no operation in progress on any thread, and at the end of a run):

1. table refcount == number of PMD entries (over live mms) pointing at the table;
   a table no PMD points at is leaked.
2. a table with refcount > 1 is reached only through read-only PMDs.
3. page mapcount == number of (mm, address) whose page tables map the page.
4. page refcount == mapcount + 1024 × active pins (+1 for a shmem page-cache page, +1
   for a swap-cache folio); an allocated page nobody references is leaked.
5. PageAnonExclusive ⇒ mapcount == 1 and not reached through a shared table; a pinned
   anon page is never in a shared table.
6. rss counters (MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES) == what the tables hold;
   nr_ptes == populated PMD entries.
7. swap_map[slot] == number of swap PTEs naming the slot; the swap cache is coherent
   (``PG_swapcache`` ⇔ in the cache under ``folio->swap`` ⇔ the slot's
   ``SWAP_HAS_CACHE``); a slot is in use iff it has a count or a cached folio.
8. no mm has a live (present or swap) entry outside its VMAs.

At the same quiescent points :meth:`Oracle.after_op` also runs the counterparts of the
kernel's debug checks (:mod:`cowenv.kernel.debug_vm`: page-table-check, writable ⇒
``PageAnonExclusive``, ``sanity_check_pinned_pages``, exclusive swap entries) and the
shadow sweep (:meth:`Oracle.check_shadow`), which compares every mapped page and every
pin with the shadow without waiting for a read.
9. no migration entry is left when no migration is in progress (migration entries count
   in MM_ANONPAGES, as ``mm_counter(page)`` does in the kernel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .debug_vm import check_debug_vm
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PG_allocated,
    PG_anon,
    PG_anon_exclusive,
    PG_shmem,
    PG_swapcache,
    PG_table,
)
from .mm import MM_ANONPAGES, MM_COUNTER_NAMES, MM_SHMEMPAGES, MM_SWAPENTS, MmStruct
from .pgtable import (
    PFN_SHIFT,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SWAP,
    PTE_USER,
    PTE_WRITE,
    ZERO_PFN,
)

if TYPE_CHECKING:
    from .memory import PagePool, ShmemObject, SwapDevice
    from .pgtable import PteTable
    from .sched import Pin, Thread


class KernelView(Protocol):
    """What the oracles read of a kernel (they never import the kernel they judge)."""

    P: int
    pool: PagePool
    swap: SwapDevice
    tables: dict[int, PteTable]
    shmem: dict[int, ShmemObject]
    pins: dict[int, Pin]

    def report(self, kind: str, site: str, message: str) -> None:
        """Record a violation."""

    def quiescent(self) -> bool:
        """No operation in progress."""

    def live_mms(self) -> list[MmStruct]:
        """The mms of live processes."""


class Region:
    """The shadow's idea of one mapped range of an mm (page numbers)."""

    __slots__ = ("start", "end", "shm", "shm_base", "prot", "wipe", "dontcopy", "dying")

    def __init__(self, start: int, end: int, shm: int | None, shm_base: int, prot: int,
                 wipe: bool = False, dontcopy: bool = False) -> None:
        self.start = start
        self.end = end
        self.shm = shm
        self.shm_base = shm_base
        self.prot = prot
        self.wipe = wipe
        self.dontcopy = dontcopy
        # munmap in progress: the VMAs are detached (no syscall finds them) but the
        # pages stay mapped, and readable through the old PTEs, until the zap.
        self.dying = False

    def clone(self, start: int, end: int) -> Region:
        """A copy of this region restricted to ``[start, end)``."""
        r = Region(start, end, self.shm, self.shm_base + (start - self.start), self.prot,
                   self.wipe, self.dontcopy)
        r.dying = self.dying
        return r


Entry = tuple[tuple[int, ...], bool]  # (allowed values, collapse on observation)
ZERO: Entry = ((0,), True)


class Oracle:
    """All oracles of one kernel instance. The kernel calls the ``on_*`` hooks."""

    def __init__(self, kernel: KernelView) -> None:
        self.k = kernel
        self.regions: dict[int, list[Region]] = {}
        self.anon: dict[int, dict[int, Entry]] = {}
        self.shm: dict[tuple[int, int], Entry] = {}
        # Range operations in progress per mm: [kind, start, end, {vpn: [tokens]}].
        self.flux: dict[int, list[list[Any]]] = {}
        self.forking: dict[int, dict[int, set[int]]] = {}
        self.pins: dict[int, dict[str, Any]] = {}
        # mprotect calls in progress per mm: (start, end, new prot). While one runs, user
        # accesses may see the old or the new protection (PTEs change table by table).
        self.mprotecting: dict[int, list[tuple[int, int, int]]] = {}
        # mremap moves in progress per mm: (old start, old end, new - old, the pins that
        # followed their pages: [(pin id, old vpn, loose before the move)]).
        self.moving: dict[int, list[tuple[int, int, int, list[tuple[int, int, bool]]]]] = {}
        self.pin_seq = 0
        self.accounting_enabled = True
        # (address key or ("pin", id), value) pairs the shadow sweep already reported.
        self._swept: set[tuple[Any, ...]] = set()

    # ------------------------------------------------------------------ regions
    def _regions(self, mm: MmStruct) -> list[Region]:
        return self.regions.setdefault(mm.id, [])

    def _carve(self, mm: MmStruct, start: int, end: int) -> list[Region]:
        """Split regions at start/end; return those inside (like ``__split_vma``)."""
        out: list[Region] = []
        for r in self._regions(mm):
            if r.end <= start or r.start >= end or (r.start >= start and r.end <= end):
                out.append(r)  # outside, or wholly inside: kept as it is (no copy needed)
                continue
            if r.start < start:
                out.append(r.clone(r.start, start))
            out.append(r.clone(max(r.start, start), min(r.end, end)))
            if r.end > end:
                out.append(r.clone(end, r.end))
        out.sort(key=lambda r: r.start)
        self.regions[mm.id] = out
        return [r for r in out if r.start >= start and r.end <= end]

    def _region_at(self, mm: MmStruct, vpn: int) -> Region | None:
        for r in self._regions(mm):
            if r.start <= vpn < r.end:
                return r
        return None

    def _key(self, mm: MmStruct, vpn: int) -> tuple[Any, ...] | None:
        r = self._region_at(mm, vpn)
        if r is None:
            return None
        if r.shm is not None:
            return ("s", r.shm, r.shm_base + vpn - r.start)
        return ("a", mm.id, vpn)

    def _get(self, key: tuple[Any, ...]) -> Entry:
        if key[0] == "s":
            return self.shm.get((key[1], key[2]), ZERO)
        return self.anon.get(key[1], {}).get(key[2], ZERO)

    def _set(self, key: tuple[Any, ...], e: Entry) -> None:
        if key[0] == "s":
            self.shm[(key[1], key[2])] = e
        else:
            d = self.anon.setdefault(key[1], {})
            if e == ZERO:
                d.pop(key[2], None)
            else:
                d[key[2]] = e

    # ------------------------------------------------------------------ syscall hooks
    def on_mmap(self, mm: MmStruct, start: int, end: int, prot: int, shm: int | None) -> None:
        """A new mapping: zero-filled (anon) or a new shmem object."""
        self._carve(mm, start, end)
        regs = [r for r in self._regions(mm) if r.end <= start or r.start >= end]
        regs.append(Region(start, end, shm, 0, prot))
        regs.sort(key=lambda r: r.start)
        self.regions[mm.id] = regs
        d = self.anon.get(mm.id, {})
        for v in [v for v in d if start <= v < end]:
            del d[v]

    def on_munmap_begin(self, mm: MmStruct, start: int, end: int) -> None:
        """Note that munmap detached the VMAs of ``[start, end)``.

        The data stays readable until zapped, but no other syscall (a concurrent
        MADV_DONTNEED, say) finds the range any more.
        """
        for r in self._carve(mm, start, end):
            r.dying = True

    def on_munmap(self, mm: MmStruct, start: int, end: int) -> None:
        """The range is gone: forget it, detach pins on it."""
        self._carve(mm, start, end)
        self.regions[mm.id] = [r for r in self._regions(mm) if r.end <= start or r.start >= end]
        d = self.anon.get(mm.id, {})
        for v in [v for v in d if start <= v < end]:
            del d[v]
        self._detach_pins(mm, start, end)

    def on_mremap_expand(self, mm: MmStruct, old_end: int, new_end: int) -> None:
        """Mremap grew the mapping ending at ``old_end`` in place: the new pages are zero."""
        for r in self._regions(mm):
            if r.end == old_end:
                r.end = new_end
                break
        d = self.anon.get(mm.id, {})
        for v in [v for v in d if old_end <= v < new_end]:
            del d[v]

    def on_mremap_begin(self, mm: MmStruct, old: int, old_pages: int, new: int,
                        new_pages: int) -> None:
        """``move_vma`` starts: the new range holds what the old one holds (zero beyond).

        Until :meth:`on_mremap_end`, the two ranges are linked: a store or DMA write at
        one page is also what the other may show, since the entry moves at some point
        the shadow cannot see (stores go through the old PTE before the move, through
        the new one after). Pins on the old range follow their pages to the new one,
        loosely (a DMA write may be seen at either address).
        """
        src = next((r for r in self._regions(mm) if r.start <= old < r.end), None)
        if src is None:
            return
        self._carve(mm, new, new + new_pages)
        regs = [r for r in self._regions(mm) if r.end <= new or r.start >= new + new_pages]
        nr = Region(new, new + new_pages, src.shm, src.shm_base + (old - src.start), src.prot,
                    src.wipe, src.dontcopy)
        regs.append(nr)
        regs.sort(key=lambda r: r.start)
        self.regions[mm.id] = regs
        d = self.anon.setdefault(mm.id, {})
        for v in [v for v in d if new <= v < new + new_pages]:
            del d[v]
        n = min(old_pages, new_pages)
        if src.shm is None:
            for v, ent in sorted(d.items()):
                if old <= v < old + n:
                    d[v - old + new] = ent
        moved: list[tuple[int, int, bool]] = []  # (pin id, old vpn, old loose)
        for pid, p in sorted(self.pins.items()):
            if p["mm"] == mm.id and old <= p["vpn"] < old + n and p["key"] is not None \
                    and p["key"][0] == "a":
                moved.append((pid, p["vpn"], p["loose"]))
                p["vpn"] = p["vpn"] - old + new
                p["key"] = ("a", mm.id, p["vpn"])
                p["loose"] = True
        self.moving.setdefault(mm.id, []).append((old, old + n, new - old, moved))

    def on_mremap_end(self, mm: MmStruct, moved_back: bool = False) -> None:
        """``move_vma`` moved (or moved back) the entries; the old or new range is unmapped next.

        Ends the link of :meth:`on_mremap_begin`. Every entry is now at one address: the
        new one after a complete move, the old one when ``moved_back`` (a short move:
        ``move_vma`` in mm/mremap.c, 6.2, "On error, move entries back from new area to
        old ... and then proceed to unmap new area instead of old"). Each anonymous pin
        of the mm on the side that is unmapped next goes to the other side, where its page
        now is (else that unmap would detach it while its page stays mapped): after a
        short move, the pins that followed their pages to the new range; after a complete
        one, the pins GUP-fast took at the old address during the move (mmap_lock does
        not hold it off) before their entries moved. The pins that followed their pages
        at :meth:`on_mremap_begin` are coupled as before the move again (exactly, unless
        they were loose already).

        After a complete move the old range holds no anonymous entry any more: its
        tables were emptied (``move_ptes``) or moved away (``move_normal_pmd``). It is
        unmapped next, but that unmap is best effort: ``move_vma`` (6.2, ``mm/mremap.c``)
        ignores a failing ``do_vmi_munmap`` ("OOM: unable to split vma, just get accounts
        right"; upstream's ``unmap_source_vma``: "if we fail to unmap then we simply try
        to correct accounting and exit") and still returns the new address, so the old
        range stays mapped, empty, and a load there zero-fills (``do_anonymous_page``).
        The shadow therefore forgets the old range's anonymous contents here, not only at
        :meth:`on_munmap`. (Shmem ranges keep mapping the object: nothing to forget.)
        """
        recs = self.moving.get(mm.id)
        if not recs:
            return
        s, e, delta, moved = recs.pop()
        if not recs:
            del self.moving[mm.id]
        if not moved_back:
            d = self.anon.get(mm.id, {})
            for v in [v for v in d if s <= v < e]:
                del d[v]
        lo, hi, shift = (s + delta, e + delta, -delta) if moved_back else (s, e, delta)
        for _, p in sorted(self.pins.items()):
            if p["mm"] == mm.id and lo <= p["vpn"] < hi and p["key"] is not None \
                    and p["key"][0] == "a":
                p["vpn"] += shift
                p["key"] = ("a", mm.id, p["vpn"])
        for pid, vpn, loose in moved:
            p = self.pins.get(pid)
            if p is not None and p["vpn"] == (vpn if moved_back else vpn + delta):
                p["loose"] = loose

    def _linked(self, key: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Anonymous keys linked with ``key`` by an mremap in progress (see above)."""
        if key[0] != "a":
            return []
        out = []
        for s, e, delta, _ in self.moving.get(key[1], []):
            if s <= key[2] < e:
                out.append(("a", key[1], key[2] + delta))
            elif s + delta <= key[2] < e + delta:
                out.append(("a", key[1], key[2] - delta))
        return out

    def on_mprotect_begin(self, mm: MmStruct, start: int, end: int, prot: int) -> None:
        """Note an mprotect that starts changing PTEs.

        Until it returns, an access in the range may see the old or the new protection.
        """
        self.mprotecting.setdefault(mm.id, []).append((start, end, prot))

    def _end_mprotect(self, mm: MmStruct, start: int, end: int, prot: int) -> None:
        lst = self.mprotecting.get(mm.id, [])
        if (start, end, prot) in lst:
            lst.remove((start, end, prot))

    def on_mprotect_failed(self, mm: MmStruct, start: int, end: int, prot: int) -> None:
        """Note an mprotect that failed after changing part of the range.

        ``do_mprotect_pkey`` stops at the first failing VMA: each page now has either the
        old or the new protection, and the caller cannot tell which.
        """
        self._end_mprotect(mm, start, end, prot)
        for r in self._carve(mm, start, end):
            r.prot |= prot

    def on_mprotect(self, t: Thread, mm: MmStruct, start: int, end: int, prot: int) -> None:
        """On mprotect success: record the new protection and check the syscall contract.

        The contract: every present PTE in range has at most the new permissions.
        """
        self._end_mprotect(mm, start, end, prot)
        for r in self._carve(mm, start, end):
            r.prot = prot
        self.check_mprotect_contract(mm, start, end, prot)

    def on_madvise_flags(self, mm: MmStruct, start: int, end: int, advice: str) -> None:
        """MADV_WIPEONFORK/KEEPONFORK/DONTFORK/DOFORK."""
        for r in self._carve(mm, start, end):
            if advice == "WIPEONFORK":
                r.wipe = r.shm is None
            elif advice == "KEEPONFORK":
                r.wipe = False
            elif advice == "DONTFORK":
                r.dontcopy = True
            elif advice == "DOFORK":
                r.dontcopy = False

    def _anon_vpns(self, mm: MmStruct, start: int, end: int) -> list[tuple[int, int]]:
        return [(max(r.start, start), min(r.end, end)) for r in self._regions(mm)
                if r.shm is None and not r.dying and r.start < end and r.end > start]

    def on_madvise_begin(self, mm: MmStruct, start: int, end: int, advice: str) -> None:
        """DONTNEED/FREE: until the call returns, a page reads old data or zero."""
        if advice not in ("DONTNEED", "FREE"):
            return
        rec = [advice, start, end, {}, self.pin_seq]
        self.flux.setdefault(mm.id, []).append(rec)
        d = self.anon.setdefault(mm.id, {})
        for s, e in self._anon_vpns(mm, start, end):
            for v, (allowed, _c) in list(d.items()):
                if s <= v < e:
                    d[v] = (tuple(sorted(set(allowed) | {0})), advice == "DONTNEED")

    def on_madvise_end(self, mm: MmStruct, start: int, end: int, advice: str) -> None:
        """End of a DONTNEED or FREE madvise: update what private anon pages may read back.

        DONTNEED: private anon reads back zero (or what was written meanwhile).
        FREE: old data or zero, until the next write.
        """
        if advice not in ("DONTNEED", "FREE"):
            return
        recs = self.flux.get(mm.id, [])
        for i, rec in enumerate(recs):  # the first record of this call (a plain loop:
            if rec[1] == start and rec[2] == end and rec[0] == advice:  # no generator)
                del recs[i]
                break
        else:
            raise StopIteration  # as next() over no match did
        if advice == "DONTNEED":
            d = self.anon.setdefault(mm.id, {})
            for s, e in self._anon_vpns(mm, start, end):
                for v in [v for v in d if s <= v < e]:
                    w = rec[3].get(v)
                    if w:
                        d[v] = (tuple(sorted({0, *w})), True)
                    else:
                        del d[v]
            # Pages zapped lose their pins' link to the address. Pins taken while the
            # zap ran may be on a page faulted in after it: they stay (loosely) attached.
            for s, e in self._anon_vpns(mm, start, end):
                self._detach_pins(mm, s, e, max_seq=rec[4])

    def _flux_write(self, mm_id: int, vpn: int, tok: int) -> Entry:
        e: Entry = ((tok,), True)
        for rec in self.flux.get(mm_id, []):
            kind, s, end, written = rec[0], rec[1], rec[2], rec[3]
            if s <= vpn < end:
                written.setdefault(vpn, []).append(tok)
                if kind == "FREE":
                    e = ((0, tok), False)
                else:
                    e = ((0, tok), True)
        return e

    def _in_dontneed(self, key: tuple[Any, ...] | None) -> bool:
        """Whether a MADV_DONTNEED in progress covers anon ``key`` (zapped or not yet)."""
        if key is None or key[0] != "a":
            return False
        return any(rec[0] == "DONTNEED" and rec[1] <= key[2] < rec[2]
                   for rec in self.flux.get(key[1], []))

    @staticmethod
    def _add(e: Entry, tok: int) -> Entry:
        """Entry ``e`` that may also hold ``tok`` now."""
        return (tuple(sorted(set(e[0]) | {tok})), e[1])

    def on_fork_begin(self, oldmm: MmStruct) -> None:
        """Writes by other threads during fork may or may not reach the child."""
        self.forking[oldmm.id] = {}

    def on_fork_end(self, oldmm: MmStruct, mm: MmStruct | None) -> None:
        """The child sees the parent's data (DONTCOPY: nothing; WIPEONFORK: zero)."""
        extra = self.forking.pop(oldmm.id, {})
        if mm is None:
            return
        regs: list[Region] = []
        child: dict[int, Entry] = {}
        pd = self.anon.get(oldmm.id, {})
        for r in self._regions(oldmm):
            if r.dontcopy:
                continue
            regs.append(r.clone(r.start, r.end))
            if r.shm is not None or r.wipe:
                continue
            for v, ent in pd.items():
                if r.start <= v < r.end:
                    child[v] = ent
        for v, vals in extra.items():
            if v in child or any(r.start <= v < r.end and r.shm is None and not r.wipe
                                 for r in regs):
                allowed, c = child.get(v, ZERO)
                child[v] = (tuple(sorted(set(allowed) | vals)), c)
        self.regions[mm.id] = regs
        self.anon[mm.id] = child

    def on_exit(self, mm: MmStruct) -> None:
        """The mm is gone."""
        self._detach_pins(mm, 0, 1 << 62)
        self.regions.pop(mm.id, None)
        self.anon.pop(mm.id, None)
        self.flux.pop(mm.id, None)
        self.mprotecting.pop(mm.id, None)
        self.moving.pop(mm.id, None)

    def on_unuse_pass(self) -> bool:
        """``swapoff``: a pass of ``try_to_unuse`` ran alone; no slot may be left in use.

        6.2 ``try_to_unuse`` (mm/swapfile.c) ends only when ``si->inuse_pages`` is 0, or
        with -EINTR when ``signal_pending(current)``::

            if (READ_ONCE(si->inuse_pages)) {
                if (!signal_pending(current))
                    goto retry;
                return -EINTR;
            }

        ``SWP_WRITEOK`` is cleared first, so no slot is handed out while it runs. A pass
        during which no other task was inside the kernel (nothing can move, create,
        lock or half-free a swap entry meanwhile) visits every swap PTE of every mm on
        ``init_mm.mmlist`` and every swap-cache folio: afterwards no slot is in use, or
        the kernel would retry the same pass for ever (a swapoff that never finishes).
        The model's pass cap (the stand-in for the signal) is therefore legitimate only
        while another task is inside the kernel. Called by the kernel after such a
        solitary pass; recounts from the page tables where the slots still in use are
        named. Reported as ``syscall-contract@swapoff``.

        Returns:
            Whether it reported (the kernel calls it at most until it has).
        """
        k = self.k
        if k.swap.inuse_pages() == 0:
            return False
        named: list[str] = []
        for mm in k.live_mms():
            for idx in sorted(mm.pmd):
                e = mm.pmd[idx].table.entries
                for off in ((e & PTE_SWAP) != 0).nonzero()[0]:
                    named.append(f"mm{mm.id} vpn {idx * k.P + int(off):#x} slot "
                                 f"{int(e[off]) >> PFN_SHIFT}")
        where = "; ".join(named[:3]) + (" ..." if len(named) > 3 else "")
        k.report("syscall-contract", "swapoff",
                 f"a try_to_unuse pass with no other task in the kernel left "
                 f"{k.swap.inuse_pages()} slot(s) in use"
                 + (f" (swap PTEs: {where})" if named else " (no swap PTE names them)"))
        return True

    # ------------------------------------------------------------------ user access
    def _contract_access(self, t: Thread, mm: MmStruct, vpn: int, write: bool) -> bool:
        r = self._region_at(mm, vpn)
        if r is None:
            self.k.report("syscall-contract", "munmap",
                          f"{'store' if write else 'load'} at page {vpn:#x} of mm{mm.id} "
                          f"succeeded after munmap")
            return False
        # x86 semantics (arch/x86/mm/fault.c access_error, vma_is_accessible): a store
        # needs PROT_WRITE; a load needs any of PROT_READ/PROT_WRITE (no write-only pages).
        need = 2 if write else 3
        prot = r.prot
        for s, e, p in self.mprotecting.get(mm.id, []):
            if s <= vpn < e:
                prot |= p
        if not prot & need:
            self.k.report("syscall-contract", "mprotect",
                          f"{'store' if write else 'load'} at page {vpn:#x} of mm{mm.id} "
                          "succeeded although the range is "
                          f"PROT_{'NONE' if not r.prot else 'READ'}")
        return True

    def on_user_write(self, t: Thread, mm: MmStruct, vpn: int, tok: int) -> None:
        """A store completed: the address now holds ``tok`` (and attached pins see it)."""
        if not self._contract_access(t, mm, vpn, True):
            return
        key = self._key(mm, vpn)
        assert key is not None
        if key[0] == "a":
            f = self.forking.get(mm.id)
            if f is not None:
                f.setdefault(vpn, set()).update(self._get(key)[0])
                f[vpn].add(tok)
            self._set(key, self._flux_write(mm.id, vpn, tok))
        else:
            self._set(key, ((tok,), True))
        for k2 in self._linked(key):  # an mremap in progress moves this page
            self._set(k2, ((tok,), True))
            for p in self.pins.values():
                if self._coupling(p, k2) is not None:
                    p["expect"] = self._add(p["expect"], tok)
        for p in self.pins.values():
            c = self._coupling(p, key)
            if c == "exact":
                p["expect"] = ((tok,), True)
            elif c == "loose":
                p["expect"] = self._add(p["expect"], tok)

    def on_user_read(self, t: Thread, mm: MmStruct, vpn: int, val: int, site: str) -> None:
        """A load completed: it must return what this process last wrote there.

        Or what it inherited, or zero after DONTNEED/WIPEONFORK; old or zero after
        MADV_FREE.
        """
        if not self._contract_access(t, mm, vpn, False):
            return
        key = self._key(mm, vpn)
        assert key is not None
        allowed, collapse = self._get(key)
        if val not in allowed:
            self.k.report("isolation", site,
                          f"mm{mm.id} read {val} at page {vpn:#x}, expected "
                          f"{' or '.join(map(str, allowed))}")
            self._set(key, ((val,), True))
        elif collapse and len(allowed) > 1:
            self._set(key, ((val,), True))

    # ------------------------------------------------------------------ pins
    def _detach_pins(self, mm: MmStruct, start: int, end: int,
                     max_seq: int | None = None) -> None:
        """Detach anonymous pins from addresses that are unmapped or zapped.

        With ``max_seq``, only pins taken up to that sequence number are detached.

        A pin of a shmem page stays attached: the pinned page is the shmem object's
        page-cache page, which every other mapping of the object keeps reading and
        writing (until the object is truncated, when nothing maps it any more).
        """
        for p in self.pins.values():
            key = p["key"]
            if key is not None and key[0] == "s":
                continue
            if max_seq is not None and p["seq"] > max_seq:
                continue
            if p["mm"] == mm.id and start <= p["vpn"] < end:
                p["attached"] = False

    def _coupling(self, p: dict[str, Any], key: tuple[Any, ...] | None) -> str | None:
        """How pin ``p`` relates to address ``key``.

        None (not at all), ``exact`` (the pin's page is the page mapped there) or
        ``loose`` (it may or may not be: the pin was taken, or the access happens, while
        a MADV_DONTNEED of the address runs, so the zap may fall before or after it -- a
        race the kernel does not order and the shadow cannot see). Loose couplings add
        possible values instead of replacing them.
        """
        if key is None or not p["attached"] or p["key"] != key:
            return None
        return "loose" if p["loose"] or self._in_dontneed(key) else "exact"

    def on_pin(self, pin: Pin) -> None:
        """A pin sees what the process sees at that address while the mapping stands."""
        key = self._key(pin.mm, pin.vpn)
        expect = self._get(key) if key is not None else ZERO
        # Pins taken at the same address while the mapping stands must all be pins of the
        # one page mapped there (pin coherence), so they form a group that keeps seeing
        # each other's DMA writes even after the address is unmapped. While a DONTNEED
        # of the address runs, that is only possibly so ("loose_groups").
        in_dn = self._in_dontneed(key)
        group = pin.id
        loose_groups: list[int] = []
        for _, q in sorted(self.pins.items()):
            c = self._coupling(q, key)
            if c == "exact" and not in_dn and group == pin.id:
                group = q["group"]
            elif c is not None and q["group"] not in loose_groups:
                loose_groups.append(q["group"])
        self.pin_seq += 1
        self.pins[pin.id] = {"mm": pin.mm.id, "vpn": pin.vpn, "key": key,
                             "attached": key is not None, "expect": expect, "group": group,
                             "loose": in_dn, "loose_groups": [g for g in loose_groups
                                                              if g != group],
                             "seq": self.pin_seq}

    def on_unpin(self, pin: Pin) -> None:
        """The pin is gone."""
        self.pins.pop(pin.id, None)

    def on_dev_read(self, pin: Pin, val: int) -> None:
        """Data read through a pin must be what the pinning process wrote there."""
        p = self.pins.get(pin.id)
        if p is None:
            return
        allowed, collapse = p["expect"]
        if val not in allowed:
            self.k.report("pin-coherence", "dev_read",
                          f"pin {pin.id} (mm{p['mm']} page {p['vpn']:#x}) read {val}, "
                          f"expected {' or '.join(map(str, allowed))}")
            p["expect"] = ((val,), True)
        elif collapse and len(allowed) > 1:
            p["expect"] = ((val,), True)

    def on_dev_write(self, pin: Pin, tok: int) -> None:
        """A DMA write must be visible at the address while the mapping stands."""
        p = self.pins.get(pin.id)
        if p is None:
            return
        p["expect"] = ((tok,), True)
        for q in self.pins.values():
            if q is p:
                continue
            if q["group"] == p["group"]:
                q["expect"] = ((tok,), True)
            elif p["group"] in q["loose_groups"] or q["group"] in p["loose_groups"]:
                q["expect"] = self._add(q["expect"], tok)
        key = p["key"]
        c = self._coupling(p, key)
        if c is None:
            return
        assert key is not None
        if key[0] == "a":
            # A DMA write during a fork of this mm may or may not reach the child (the
            # eager copy of the pinned page is taken at some point of the fork), exactly
            # like a store by another thread (on_user_write).
            f = self.forking.get(key[1])
            if f is not None:
                f.setdefault(key[2], set()).update(self._get(key)[0])
                f[key[2]].add(tok)
            e = self._flux_write(key[1], key[2], tok)
            if c == "loose":
                e = self._add(self._get(key), tok)
            self._set(key, e)
            for k2 in self._linked(key):
                self._set(k2, self._add(self._get(k2), tok))
        else:
            self._set(key, ((tok,), True))
        for q in self.pins.values():
            if q is p or q["group"] == p["group"]:
                continue
            cq = self._coupling(q, key)
            if cq == "exact" and c == "exact":
                q["expect"] = ((tok,), True)
            elif cq is not None:
                q["expect"] = self._add(q["expect"], tok)

    # ------------------------------------------------------------------ scheduling hooks
    def after_op(self, t: Thread, value: Any) -> None:
        """Called when an operation returns: the quiescent-point checks.

        A *quiescent point* is the moment an operation returns while no thread (kswapd
        included) is inside any operation: no lock is held, no walk or fork is half done,
        every PTE change of every syscall so far is complete. There the recount
        (:meth:`check_accounting`), the debug-check counterparts
        (:func:`~cowenv.kernel.debug_vm.check_debug_vm`) and the shadow sweep
        (:meth:`check_shadow`) run, in that order.
        """
        if self.accounting_enabled and self.k.quiescent():
            self.check_accounting()
            check_debug_vm(self.k)
            self.check_shadow()

    # ------------------------------------------------------------------ shadow sweep
    def check_shadow(self) -> None:
        """Compare every mapped page and every pin with the shadow (a read of everything).

        At a quiescent point, for every address of every live mm's shadow regions, the
        value a load would return -- without running the fault that would fetch it: the
        mapped page's content; for a swap entry the swap-cache folio's content, else the
        slot's data; for ``pte_none`` zero (anon) or the shmem object's page -- must be
        one the shadow allows (as :meth:`on_user_read` checks); and every active pin's
        page must hold what the shadow expects of it (as :meth:`on_dev_read` checks).
        Reported as ``isolation@shadow_sweep`` / ``pin-coherence@shadow_sweep``, once per
        (address or pin, value). The sweep changes neither the shadow (a later read of
        the same corruption still reports at its own site, e.g.
        ``isolation@user_access``) nor any kernel state, and observes nothing a program
        could not: its values are what a read at this point would return.
        """
        k = self.k
        pool = k.pool
        P = k.P
        for mm in k.live_mms():
            for r in self._regions(mm):
                if r.dying:
                    continue
                vals = self._sweep_values(mm, r, P)
                if r.shm is None:
                    d = self.anon.get(mm.id, {})
                    nz = vals.nonzero()[0]
                    # Addresses the shadow holds a value for, and non-zero ones it
                    # does not (which must then be zero).
                    vpns = sorted({r.start + int(i) for i in nz}
                                  | {v for v in d if r.start <= v < r.end})
                    for v in vpns:
                        val = int(vals[v - r.start])
                        allowed = d.get(v, ZERO)[0]
                        if val not in allowed:
                            self._sweep_report(mm, ("a", mm.id, v), v, val, allowed)
                else:
                    for i in range(r.end - r.start):
                        key = ("s", r.shm, r.shm_base + i)
                        val = int(vals[i])
                        allowed = self._get(key)[0]
                        if val not in allowed:
                            self._sweep_report(mm, key, r.start + i, val, allowed)
        for pid, pin in sorted(k.pins.items()):
            if not pin.active:
                continue
            p = self.pins.get(pid)
            if p is None:
                continue
            val = int(pool.content[pin.pfn])
            allowed = p["expect"][0]
            if val not in allowed and ("pin", pid, val) not in self._swept:
                self._swept.add(("pin", pid, val))
                k.report("pin-coherence", "shadow_sweep",
                         f"pin {pid} (mm{p['mm']} page {p['vpn']:#x}) holds {val}, "
                         f"expected {' or '.join(map(str, allowed))}")

    def _sweep_report(self, mm: MmStruct, key: tuple[Any, ...], vpn: int, val: int,
                      allowed: tuple[int, ...]) -> None:
        if (*key, val) in self._swept:
            return
        self._swept.add((*key, val))
        self.k.report("isolation", "shadow_sweep",
                      f"mm{mm.id} page {vpn:#x} holds {val}, expected "
                      f"{' or '.join(map(str, allowed))}")

    def _sweep_values(self, mm: MmStruct, r: Region, P: int) -> np.ndarray:
        """What a load at each page of region ``r`` of ``mm`` would return now."""
        k = self.k
        pool = k.pool
        n = r.end - r.start
        e = np.zeros(n, dtype=np.int64)
        for idx in range(r.start // P, (r.end - 1) // P + 1):
            pmd = mm.pmd.get(idx)
            if pmd is None or pmd.table.freed:
                continue
            lo, hi = max(r.start, idx * P), min(r.end, (idx + 1) * P)
            e[lo - r.start:hi - r.start] = pmd.table.entries[lo - idx * P:hi - idx * P]
        vals = np.zeros(n, dtype=np.int64)
        pres = (e & PTE_PRESENT) != 0
        if np.count_nonzero(pres):
            vals[pres] = pool.content[e[pres] >> PFN_SHIFT]
        swp = ((e & PTE_SWAP) != 0).nonzero()[0]
        if len(swp):
            cache = k.swap.cache
            for i in swp.tolist():
                s = int(e[i]) >> PFN_SHIFT
                c = cache.get(s)
                vals[i] = int(pool.content[c]) if c is not None else int(k.swap.data[s])
        if r.shm is not None:
            obj = k.shmem.get(r.shm)
            if obj is not None:
                for i in (e == 0).nonzero()[0].tolist():
                    p = obj.pages.get(r.shm_base + i)
                    if p is not None:
                        vals[i] = int(pool.content[p])
        return vals

    # ------------------------------------------------------------------ recount oracles
    def check_mprotect_contract(self, mm: MmStruct, start: int, end: int, prot: int) -> None:
        """After a successful mprotect every present PTE in range has at most the new rights.

        Writable only with PROT_WRITE, accessible only with PROT_READ or PROT_WRITE: on x86 a
        write-only mapping is readable.
        """
        P = self.k.P
        for idx in range(start // P, (end - 1) // P + 1):
            pmd = mm.pmd.get(idx)
            if pmd is None:
                continue
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            e = pmd.table.entries[lo:hi]
            pres = (e & PTE_PRESENT) != 0
            bad = np.zeros(len(e), dtype=bool)
            if not prot & 2:
                bad |= pres & ((e & PTE_WRITE) != 0) & pmd.write
            if not prot & 3:
                bad |= pres & ((e & PTE_USER) != 0)
            if np.count_nonzero(bad):
                i = int(bad.nonzero()[0][0])
                self.k.report("syscall-contract", "mprotect",
                              f"mprotect returned 0 but {int(bad.sum())} PTE(s) keep old "
                              f"permissions (mm{mm.id} page {idx * P + lo + i:#x})")
                return

    def check_accounting(self) -> None:
        """Recount invariants 1-7 from the page tables (see module docstring)."""
        k = self.k
        pool = k.pool
        rep = k.report
        mms = k.live_mms()
        table_refs: dict[int, int] = {}
        table_obj: dict[int, Any] = {}
        ro_refs: dict[int, int] = {}
        mapped: list[np.ndarray] = []
        shared_mapped: list[np.ndarray] = []
        swaps: list[np.ndarray] = []
        for mm in mms:
            anon = shm = swp = 0
            live_tables: list[np.ndarray] = []
            for idx in sorted(mm.pmd):
                pmd = mm.pmd[idx]
                tb = pmd.table
                if tb.freed:
                    rep("memory-safety", "pmd_none_or_clear_bad",
                        f"mm{mm.id} PMD {idx} points at freed table {tb.pfn}")
                    continue
                table_refs[tb.pfn] = table_refs.get(tb.pfn, 0) + 1
                table_obj[tb.pfn] = tb
                if not pmd.write:
                    ro_refs[tb.pfn] = ro_refs.get(tb.pfn, 0) + 1
                e = tb.entries
                live_tables.append(e)  # counted below, all of this mm's tables at once
                # 8. No entry outside the mm's VMAs: unmap_region zaps what it unmaps.
                ne = len(e)
                base = idx * ne
                vs = mm.vmas_in(base, base + ne) if np.count_nonzero(e) else None
                # (A VMA spanning the whole table leaves nothing to look at.)
                if vs is not None and not any(v.start <= base and v.end >= base + ne
                                              for v in vs):
                    live = e != 0
                    covered = np.zeros(ne, dtype=bool)
                    for v in vs:
                        covered[max(v.start, base) - base:min(v.end, base + ne) - base] = True
                    stray = live & ~covered
                    if np.count_nonzero(stray):
                        rep("accounting", "unmap_region",
                            f"mm{mm.id} maps page {base + int(stray.nonzero()[0][0]):#x} "
                            f"outside any VMA ({int(stray.sum())} entr(ies) left behind)")
            if live_tables:
                e = live_tables[0] if len(live_tables) == 1 else np.concatenate(live_tables)
                pres = (e & PTE_PRESENT) != 0
                pf = e[pres] >> PFN_SHIFT
                pf = pf[pf != ZERO_PFN]
                mapped.append(pf)
                fl = pool.flags[pf]
                anon = int(np.count_nonzero(fl & PG_anon))
                shm = int(np.count_nonzero(fl & PG_shmem))
                sw = e[(e & PTE_SWAP) != 0] >> PFN_SHIFT
                swaps.append(sw)
                swp = len(sw)
                # A migration entry counts as its page (mm_counter(page); only anon
                # pages migrate). 9. None is left at a quiescent point: every migration
                # ends with remove_migration_ptes.
                nmig = int(np.count_nonzero(e & PTE_MIGRATION))
                anon += nmig
                if nmig:
                    at = int((e & PTE_MIGRATION).nonzero()[0][0])
                    rep("accounting", "remove_migration_ptes",
                        f"mm{mm.id} holds {nmig} migration entr(ies) with no migration in "
                        f"progress (first: entry {at} of its tables, naming page "
                        f"{int(e[at] >> PFN_SHIFT)})")
            for i, n in ((MM_ANONPAGES, anon), (MM_SHMEMPAGES, shm), (MM_SWAPENTS, swp)):
                if mm.rss[i] != n:
                    rep("accounting", "get_mm_counter",
                        f"mm{mm.id} {MM_COUNTER_NAMES[i]} is {mm.rss[i]}, tables hold {n}")
            if mm.nr_ptes != len(mm.pmd):
                rep("accounting", "mm_pgtables_bytes",
                    f"mm{mm.id} nr_ptes is {mm.nr_ptes}, {len(mm.pmd)} PMDs populated")
        for pfn in sorted(table_refs):
            tb = table_obj[pfn]
            if tb.refcount != table_refs[pfn]:
                rep("accounting", "cow_pte_count",
                    f"table {pfn} refcount {tb.refcount}, {table_refs[pfn]} PMD(s) point at it")
            if table_refs[pfn] > 1 and ro_refs.get(pfn, 0) != table_refs[pfn]:
                rep("accounting", "cow_pte_count",
                    f"table {pfn} shared by {table_refs[pfn]} PMDs, one of them writable")
            if table_refs[pfn] > 1:
                e = tb.entries
                pf = e[(e & PTE_PRESENT) != 0] >> PFN_SHIFT
                shared_mapped.append(pf[pf != ZERO_PFN])
        for pfn in sorted(k.tables):
            if pfn not in table_refs:
                rep("accounting", "pte_free", f"page table {pfn} leaked (no PMD points at it)")
        nr = pool.nr
        mc = np.bincount(np.concatenate(mapped) if mapped else np.zeros(0, np.int64),
                         minlength=nr)[:nr]
        alloc = (pool.flags & PG_allocated) != 0
        alloc[ZERO_PFN] = False
        data = alloc & ((pool.flags & PG_table) == 0)
        bad = data & (mc != pool.mapcount)
        if np.count_nonzero(bad):
            p = int(bad.nonzero()[0][0])
            rep("accounting", "page_mapcount",
                f"page {p} mapcount {int(pool.mapcount[p])}, mapped {int(mc[p])} time(s)")
        unalloc_mapped = (~alloc) & (mc > 0)
        unalloc_mapped[ZERO_PFN] = False
        if np.count_nonzero(unalloc_mapped):
            p = int(unalloc_mapped.nonzero()[0][0])
            rep("memory-safety", "page_mapcount", f"free page {p} is still mapped")
        pins = np.zeros(nr, dtype=np.int64)
        npins = 0
        for _, pin in sorted(k.pins.items()):
            if pin.active:
                pins[pin.pfn] += 1
                npins += 1
        cache = None
        sw_cache = k.swap.cache
        if sw_cache:
            cache = np.zeros(nr, dtype=np.int64)
            for p in sw_cache.values():
                cache[p] += 1
        for _, obj in sorted(k.shmem.items()):
            for p in obj.pages.values():
                if cache is None:
                    cache = np.zeros(nr, dtype=np.int64)
                cache[p] += 1
        # expect = mc + GUP_PIN_COUNTING_BIAS * pins + cache, leaving out all-zero terms
        expect = mc
        if npins:
            expect = expect + GUP_PIN_COUNTING_BIAS * pins
        if cache is not None:
            expect = expect + cache
        bad = data & (pool.refcount != expect)
        if np.count_nonzero(bad):
            p = int(bad.nonzero()[0][0])
            what = "leaked (nothing references it)" if expect[p] == 0 else "wrong"
            rep("accounting", "page_ref_count",
                f"page {p} refcount {int(pool.refcount[p])}, expected {int(expect[p])}: {what}")
        excl = data & ((pool.flags & PG_anon_exclusive) != 0)
        bad = excl & (mc > 1)
        if np.count_nonzero(bad):
            p = int(bad.nonzero()[0][0])
            rep("accounting", "PageAnonExclusive",
                f"exclusive page {p} mapped {int(mc[p])} times")
        if shared_mapped:
            sm = np.unique(np.concatenate(shared_mapped))
            bad = sm[(pool.flags[sm] & PG_anon_exclusive) != 0]
            if len(bad):
                rep("accounting", "PageAnonExclusive",
                    f"exclusive page {int(bad[0])} in a shared page table")
            bad = sm[(pins[sm] > 0) & ((pool.flags[sm] & PG_anon) != 0)]
            if len(bad):
                rep("accounting", "page_maybe_dma_pinned",
                    f"pinned page {int(bad[0])} in a shared page table")
        sw = np.bincount(np.concatenate(swaps) if swaps else np.zeros(0, np.int64),
                         minlength=len(k.swap.swap_map))[:len(k.swap.swap_map)]
        bad = sw != k.swap.swap_map
        if np.count_nonzero(bad):
            s = int(bad.nonzero()[0][0])
            rep("accounting", "swap_map",
                f"swap slot {s} swap_map {int(k.swap.swap_map[s])}, {int(sw[s])} PTE(s) name it")
        # 7'. Swap-cache coherence and slot leaks.
        sc = (data & ((pool.flags & PG_swapcache) != 0)).nonzero()[0]
        for p in sc.tolist():
            s = int(pool.swap[p])
            if sw_cache.get(s) != p:
                rep("accounting", "swap_cache",
                    f"page {p} is PG_swapcache for slot {s}, the swap cache has "
                    f"{sw_cache.get(s)}")
                break
        if len(sc) != len(sw_cache):
            rep("accounting", "swap_cache",
                f"{len(sw_cache)} swap-cache entries, {len(sc)} PG_swapcache page(s)")
        hc = k.swap.has_cache[:len(k.swap.swap_map)]
        nc = np.zeros(len(hc), dtype=bool)
        if sw_cache:
            nc[list(sw_cache)] = True
        bad = hc != nc
        if np.count_nonzero(bad):
            s = int(bad.nonzero()[0][0])
            rep("accounting", "swap_cache",
                f"swap slot {s} SWAP_HAS_CACHE {bool(hc[s])}, cached folio {bool(nc[s])}")
        if k.swap.nr:
            free = np.zeros(len(hc), dtype=bool)
            free[k.swap.free] = True
            used = (k.swap.swap_map > 0) | hc
            bad = free == used
            if np.count_nonzero(bad):
                s = int(bad.nonzero()[0][0])
                what = "free but in use" if free[s] else "leaked (no count, no cache)"
                rep("accounting", "swap_entry_free", f"swap slot {s} {what}")
