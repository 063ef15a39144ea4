"""Quiescent-point counterparts of the kernel's debug checks (DEBUG_VM, PAGE_TABLE_CHECK).

``CONFIG_DEBUG_VM`` and ``CONFIG_PAGE_TABLE_CHECK`` of the v6.2 base.

The kernel checks these at the site that would break them (a ``BUG_ON`` in
``page_table_check_set``, a ``VM_BUG_ON`` in ``do_swap_page``, ...). The model checks the
*state* they protect at every quiescent point instead (see
:meth:`cowenv.kernel.oracles.Oracle.after_op`: after an operation returns and no thread
is inside any operation, so no lock is held and no walk is half done), so that a page
wrongly left writable or shared is seen when it happens, not when a later read happens
to hit it. Like the recount oracles they read the page tables and page flags and never
trust a counter they check; they know nothing of flaws or variants.

**Effective writability.** A PTE is writable for the hardware only if its PMD is too:
COW PTE v4 write-protects the PMD of every sharer of a table (``pmdp_set_wrprotect``),
so an entry of a shared table may keep ``_PAGE_RW`` and still map its page read-only in
every sharer. The checks below use ``pte_write && pmd_write``. A page mapped through a
table shared by ``n`` PMDs is mapped ``n`` times (once per sharer, as its mapcount
counts it), all read-only: the as-posted design's legitimate state passes, and a table
left shared behind a writable PMD, or a writable entry in a table that is not shared,
is judged like any other mapping.

Checks (each reports under its own signature ``kind@site``):

* ``isolation@page_table_check`` -- ``mm/page_table_check.c`` (``page_table_check_set``:
  ``BUG_ON(atomic_inc_return(&ptc->anon_map_count) > 1 && rw)`` and
  ``BUG_ON(atomic_read(&ptc->file_map_count))`` for anon pages): an anonymous page is
  mapped writable by exactly one PTE, or read-only by any number of them, never both;
  and it is never also a file (shmem) page.
* ``isolation@pte_write_anon_exclusive`` -- a writable PTE of a private anonymous page
  implies ``PageAnonExclusive`` (6.2 ``do_swap_page``:
  ``VM_BUG_ON(!folio_test_anon(folio) || (pte_write(pte) && !PageAnonExclusive(page)))``;
  ``wp_page_reuse``: ``VM_BUG_ON(page && PageAnon(page) && !PageAnonExclusive(page))``;
  ``mprotect.c`` ``can_change_pte_writable`` only makes exclusive anon pages writable).
* ``pin-coherence@sanity_check_pinned_pages`` -- ``mm/gup.c`` (6.2)
  ``sanity_check_pinned_pages``: "We only pin anonymous pages if they are exclusive.
  Once pinned, we can no longer turn them possibly shared and PageAnonExclusive() will
  stick around until the page is freed" (``VM_BUG_ON_PAGE(!PageAnonExclusive(...))``,
  run at unpin time). Checked for every active pin of an anonymous page, mapped or not:
  ``page_try_dup_anon_rmap`` (fork) and ``page_try_share_anon_rmap`` (try_to_unmap)
  refuse a maybe-pinned page for exactly this reason.
* ``accounting@pte_swp_exclusive`` -- an exclusive swap entry (``pte_swp_exclusive``)
  is the only reference to its slot: ``swp_swapcount(entry) == 1``. ``try_to_unmap_one``
  sets the marker only for a ``PageAnonExclusive`` page (one mapping, one swap
  reference), and ``copy_nonpresent_pte`` clears it in parent and child when
  ``swap_duplicate`` adds the second one; ``do_swap_page`` maps the page exclusive
  (writable at once) on the strength of it.
* ``accounting@PageAnonExclusive_flags`` -- ``PageAnonExclusive``'s own
  ``VM_BUG_ON_PGFLAGS(!PageAnon(page), page)`` (include/linux/page-flags.h): the flag is
  meaningful only on an anonymous page.

The other ``DEBUG_VM`` assertions that apply are already checked elsewhere and are not
repeated here: ``check_mm``'s rss counters and ``mm_pgtables_bytes`` (recount oracle,
invariant 6), a negative mapcount (``page_remove_rmap`` → ``print_bad_pte``),
refcount == mapcount + pins + cache references (invariant 4, which implies
``refcount >= mapcount``), ``PageAnonExclusive`` ⇒ mapped once (invariant 5), and
swap-count/swap-cache coherence (invariant 7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from .memory import PG_anon, PG_anon_exclusive, PG_shmem
from .pgtable import (
    PFN_SHIFT,
    PTE_PRESENT,
    PTE_SWAP,
    PTE_SWP_EXCLUSIVE,
    PTE_WRITE,
    ZERO_PFN,
)

if TYPE_CHECKING:
    from .memory import PagePool, SwapDevice
    from .mm import MmStruct
    from .sched import Pin


class DebugView(Protocol):
    """What the checks read of a kernel (a subset of ``oracles.KernelView``)."""

    pool: PagePool
    swap: SwapDevice
    pins: dict[int, Pin]

    def report(self, kind: str, site: str, message: str) -> None:
        """Record a violation."""

    def live_mms(self) -> list[MmStruct]:
        """The mms of live processes."""


def check_debug_vm(k: DebugView) -> None:
    """Run every check of this module once against kernel ``k`` (see module docstring).

    Call at a quiescent point only: mid-operation states (a fork that has cleared
    ``PageAnonExclusive`` but not yet write-protected the PTE under its PTL, say) are
    legitimately transient.
    """
    pool = k.pool
    rep = k.report
    pfns: list[np.ndarray] = []
    wr: list[np.ndarray] = []
    swx: list[np.ndarray] = []
    for mm in k.live_mms():
        for idx in sorted(mm.pmd):
            pmd = mm.pmd[idx]
            tb = pmd.table
            if tb.freed:
                continue  # reported by the recount oracle (pmd_none_or_clear_bad)
            e = tb.entries
            pres = (e & PTE_PRESENT) != 0
            if np.count_nonzero(pres):
                pe = e[pres]
                pfns.append(pe >> PFN_SHIFT)
                if pmd.write:
                    wr.append((pe & PTE_WRITE) != 0)
                else:
                    wr.append(np.zeros(len(pe), dtype=bool))
            sx = (e & (PTE_SWAP | PTE_SWP_EXCLUSIVE)) == (PTE_SWAP | PTE_SWP_EXCLUSIVE)
            if np.count_nonzero(sx):
                swx.append(e[sx] >> PFN_SHIFT)
    nr = pool.nr
    if pfns:
        pf = np.concatenate(pfns)
        w = np.concatenate(wr)
        keep = pf != ZERO_PFN
        pf, w = pf[keep], w[keep]
        fl = pool.flags[pf]
        anon = (fl & PG_anon) != 0
        # page_table_check: anon_map_count > 1 with a writable mapping; anon + file.
        a_pf = pf[anon]
        n_map = np.bincount(a_pf, minlength=nr)
        n_w = np.bincount(a_pf[w[anon]], minlength=nr)
        bad = ((n_w > 0) & (n_map > 1)).nonzero()[0]
        if len(bad):
            p = int(bad[0])
            rep("isolation", "page_table_check",
                f"anon page {p} mapped {int(n_map[p])} times, {int(n_w[p])} of them "
                f"writable (a writable anon page must be mapped once)")
        both = a_pf[(pool.flags[a_pf] & PG_shmem) != 0]
        if len(both):
            rep("isolation", "page_table_check",
                f"page {int(both[0])} is mapped both as anon and as a shmem page")
        # A writable PTE of a private anon page implies PageAnonExclusive.
        wa = pf[w & anon & ((fl & PG_anon_exclusive) == 0)]
        if len(wa):
            rep("isolation", "pte_write_anon_exclusive",
                f"anon page {int(wa[0])} is mapped writable but not PageAnonExclusive")
    # sanity_check_pinned_pages: a pinned anon page stays PageAnonExclusive until freed.
    for pid, pin in sorted(k.pins.items()):
        if not pin.active:
            continue
        f = int(pool.flags[pin.pfn])
        if f & PG_anon and not f & PG_anon_exclusive:
            rep("pin-coherence", "sanity_check_pinned_pages",
                f"pin {pid} (mm{pin.mm.id} page {pin.vpn:#x}): pinned anon page "
                f"{pin.pfn} is not PageAnonExclusive")
            break
    # An exclusive swap entry holds the only reference to its slot.
    if swx:
        sl = np.concatenate(swx)
        smap = k.swap.swap_map
        bad = sl[smap[sl] != 1]
        if len(bad):
            s = int(bad[0])
            rep("accounting", "pte_swp_exclusive",
                f"exclusive swap entry for slot {s} but swap count {int(smap[s])}")
    # PageAnonExclusive only on anon pages (VM_BUG_ON_PGFLAGS in PageAnonExclusive()).
    ex = (pool.flags & PG_anon_exclusive) != 0
    bad = (ex & ((pool.flags & PG_anon) == 0)).nonzero()[0]
    if len(bad):
        rep("accounting", "PageAnonExclusive_flags",
            f"page {int(bad[0])} is PageAnonExclusive but not anonymous")
