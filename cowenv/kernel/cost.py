"""The fork cost model: a calibrated price in nanoseconds for each costly kernel action.

:class:`CostMeter` is what the kernel charges as it runs (``kernel.cost``).

Nothing here reads a clock. The kernel charges *counts* at the sites that do the work
(``self.cost.charge("fork_pte_copy", n)``); a count times its constant is simulated
time, so a run's cost is a pure function of its schedule.

Published figures (BRIEF §3, reference notes §1.8) the model is calibrated to:

* **Pasha Tatashin, v4 review** (mmap 32 GiB, touch every page, 16 forks): fork costs
  0.004416 / 0.004382 / 0.004442 s per GiB on the base kernel and 0.004524 / 0.004764 /
  0.004547 s per GiB with COW PTE (Intel); 0.003923–0.003955 vs 0.003854–0.004221 (AMD).
  "≈ 0.0044 s per GiB on both kernels": COW PTE v4 "does not provide any performance
  improvements for fork()".
* **v4 cover letter**: a fault writing all of 512 MB after fork averages
  0.000770 ms per page without COW PTE and 0.000795 ms per page with it; fork latency is
  "around 10 ms" for 512 MB in both cases.

Calibration equations (``P`` = 512 entries per table, 1 GiB = 262,144 pages = 512 tables;
``S`` = a spinlock round trip, ``R`` = an rwsem round trip):

1. **Fork, classic** (``copy_pte_range`` per table: ``pte_alloc_one``, ``pmd_populate``
   under ``page_table_lock``, dst PTL, src PTL; per entry: the PTE copy and the per-page
   accounting)::

       262,144 × (FORK_PTE_COPY_NS + FORK_PAGE_ACCOUNT_NS)
           + 512 × (PTE_TABLE_ALLOC_NS + PMD_UPDATE_NS + 3 S)  =  4.4 ms

   which, with the estimated per-table and per-PTE-write figures below, *defines*
   ``FORK_PAGE_ACCOUNT_NS``. Per-fork fixed work (two mmap_lock round trips; per VMA the
   VMA write lock, the anon_vma root lock and ``FORK_VMA_NS``; ``flush_tlb_mm``) is
   ~1 µs: 0.03 % of a GiB.
   COW PTE's fork does the same per-entry work (``copy_present_pte`` with
   ``dst_pte == src_pte``) but shares instead of allocating a table
   (``2 S + TABLE_REF_NS + 2 PMD_UPDATE_NS`` per table), so it comes out ≈ 3 % cheaper:
   within the spread of Pasha's runs (−2 % … +8 %), and "around the same" as the cover
   letter's "around 10 ms for 512 MB in both cases". (The model reproduces that equality,
   not the cover letter's absolute 10 ms, which is 4.4× Pasha's per-GiB rate: another
   machine, and latency measured around the whole fork.)

2. **Write fault on a page shared by fork, classic** (``do_wp_page`` → ``wp_page_copy``)::

       FAULT_ENTRY_EXIT_NS + R (mmap_lock) + 2 S (PTL in do_wp_page and wp_page_copy)
           + PAGE_ALLOC_NS + PAGE_COPY_NS + PTE_WRITE_NS
           + 2 PAGE_ACCOUNT_NS (new rmap; old rmap removed and put)
           + TLB_FLUSH_PAGE_NS                                         =  770 ns

   which defines ``PAGE_COPY_NS`` (copy_user_highpage of 4 KiB).

3. **COW PTE** adds one table break per 512 pages written::

       (0.795 − 0.770) µs × 512 = 12.8 µs = COW_PTE_BREAK_NS
           = 3 S + PTE_TABLE_ALLOC_NS + COW_PTE_BREAK_FIXED_NS + 512 × COW_PTE_BREAK_SCAN_NS
             + 512 × COW_PTE_BREAK_COPY_NS + TLB_FLUSH_RANGE_NS

   which defines ``COW_PTE_BREAK_COPY_NS`` (per non-none entry copied into the new table).
   The whole measured difference is attributed to the break; per-fault overhead of the
   hook itself (``handle_cow_pte_fault`` returning at once on a writable PMD) is not
   separated.

Every other constant is an engineering estimate (stated as such, with its reasoning);
the references give no figure for it. The estimates matter only through the three
equations above (they decide how the calibrated totals split) and for costs that are
never fork-attributable (populate, zap, swap).

Attribution (see :class:`CostMeter`): *immediate* = charged while a thread runs
``fork``; *deferred* = caused later by a fork: COW PTE table breaks (including their
table allocations and TLB flushes, and the fast path that just makes a PMD writable
again) and write/unshare faults that hit an anonymous page that fork made
non-exclusive (the whole fault: entry/exit, locks, allocation, copy, flush — or the
reuse when the other side has gone). ``fork_attributable = immediate + deferred``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# =====================================================================================
# Published figures (the calibration inputs)
# =====================================================================================
#: Pasha Tatashin, v4 review (id 43441014687): seconds per GiB per fork, base kernel,
#: Intel runs 0.004416 / 0.004382 / 0.004442 (mean 0.004413): "≈ 0.0044 s per GiB".
PASHA_FORK_S_PER_GIB: float = 0.0044
#: The same test on the COW PTE kernel (Intel): 0.004524 / 0.004764 / 0.004547.
PASHA_FORK_S_PER_GIB_COWPTE_RUNS: tuple[float, ...] = (0.004524, 0.004764, 0.004547)
#: v4 cover letter (id 24748639128): fault latency writing all of 512 MB, ms per page.
V4_WRITE_FAULT_MS_PLAIN: float = 0.000770
V4_WRITE_FAULT_MS_COWPTE: float = 0.000795
#: v4 cover letter: fork latency "around 10 ms" for 512 MB, both kernels (not used as an
#: absolute: see the module docstring).
V4_FORK_MS_512MB: float = 10.0

#: x86-64 geometry of the calibration: entries per PTE table, pages and tables per GiB.
X86_PTRS_PER_PTE: int = 512
GIB_PAGES: int = (1 << 30) // 4096
GIB_TABLES: int = GIB_PAGES // X86_PTRS_PER_PTE

# =====================================================================================
# Estimates (no published figure; reasoning in each comment)
# =====================================================================================
#: Uncontended ``spin_lock`` + ``spin_unlock`` (PTL, ``page_table_lock``): one locked RMW
#: and a release store on a cache-hot line. Estimate.
SPIN_LOCK_ROUNDTRIP_NS: float = 10.0
#: Uncontended rwsem ``down_read``/``up_read`` or ``down_write``/``up_write`` (mmap_lock,
#: per-VMA lock, anon_vma): two locked RMWs on the count. Estimate.
RWSEM_ROUNDTRIP_NS: float = 20.0
#: ``mmap_lock`` round trip (an rwsem).
MMAP_LOCK_ROUNDTRIP_NS: float = RWSEM_ROUNDTRIP_NS
#: Split PTE lock round trip (a spinlock).
PTL_ROUNDTRIP_NS: float = SPIN_LOCK_ROUNDTRIP_NS
#: One PTE read-modify-write (``set_pte_at``, ``ptep_set_wrprotect``, ``pte_clear``) on a
#: cache-hot table line. Estimate.
PTE_WRITE_NS: float = 4.0
#: One PMD update (``pmd_populate``, ``set_pmd_at``, ``pmdp_set_wrprotect``, ``pmd_clear``)
#: with its ``mm_inc/dec_nr_ptes``. Estimate.
PMD_UPDATE_NS: float = 5.0
#: One atomic on a table page's refcount (``pmd_get_pte`` / ``pmd_put_pte``). Estimate.
TABLE_REF_NS: float = 10.0
#: An order-0 data-page allocation from the per-CPU lists, with the memcg charge.
#: Estimate.
PAGE_ALLOC_NS: float = 150.0
#: Freeing a data page (``free_unref_page`` + memcg uncharge). Estimate.
PAGE_FREE_NS: float = 80.0
#: ``pte_alloc_one``: a page allocation, ``clear_page`` of the 4 KiB table and
#: ``pgtable_pte_page_ctor`` (ptlock init). Estimate (= an allocation + ~100 ns clear).
PTE_TABLE_ALLOC_NS: float = 250.0
#: ``pte_free`` through the mmu_gather (``tlb_remove_table``) + dtor. Estimate.
PTE_TABLE_FREE_NS: float = 100.0
#: Page-fault exception entry and exit (``asm_exc_page_fault``, ``do_user_addr_fault``'s
#: VMA lookup, ``handle_mm_fault``'s walk, the return to user space with the usual
#: mitigations). Estimate.
FAULT_ENTRY_EXIT_NS: float = 250.0
#: ``flush_tlb_page`` (``ptep_clear_flush`` in ``wp_page_copy``): one local ``invlpg`` in
#: a single-threaded process. Estimate.
TLB_FLUSH_PAGE_NS: float = 100.0
#: ``flush_tlb_range`` of a 2 MiB table / ``flush_tlb_mm``: above x86's
#: ``tlb_single_page_flush_ceiling`` (33 pages) this is a full flush, whose price is
#: mostly the TLB refill afterwards. Estimate.
TLB_FLUSH_RANGE_NS: float = 500.0
#: Per VMA copied by ``dup_mmap``: ``vm_area_dup``, ``anon_vma_fork``, the maple-tree
#: store. Estimate.
FORK_VMA_NS: float = 500.0
#: Per PTE copied by fork (``copy_present_pte``/``copy_nonpresent_pte``): the source
#: PTE write-protected and the child's PTE written (two PTE writes; with COW PTE the
#: shared entry is written back, the same two stores).
FORK_PTE_COPY_NS: float = 2 * PTE_WRITE_NS
#: ``handle_cow_pte_fault`` per table slot visited while copying (``pte_none`` test over
#: all 512 slots). Estimate.
COW_PTE_BREAK_SCAN_NS: float = 1.0
#: ``handle_cow_pte_fault``'s fixed work besides allocation, locks and the flush: the
#: ``write_protect_seq`` write section, mmu-notifier range start/end, PMD clear/set,
#: ``mm_dec/inc_nr_ptes``, ``pmd_put_pte``. Estimate.
COW_PTE_BREAK_FIXED_NS: float = 100.0
#: A swap I/O of one page (swap-out write or swap-in read), zram order of magnitude.
#: Estimate; never fork-attributable.
SWAP_IO_NS: float = 10_000.0

# =====================================================================================
# Calibrated constants (solved from the published figures; equations in the docstring)
# =====================================================================================
#: Classic fork's per-table work: allocation, ``pmd_populate``, ``page_table_lock``,
#: dst PTL and src PTL.
FORK_TABLE_NS: float = PTE_TABLE_ALLOC_NS + PMD_UPDATE_NS + 3 * PTL_ROUNDTRIP_NS
#: Per-page accounting at fork: ``get_page`` + ``page_try_dup_anon_rmap`` + rss
#: (equation 1, Pasha's 0.0044 s/GiB).
FORK_PAGE_ACCOUNT_NS: float = ((PASHA_FORK_S_PER_GIB * 1e9 - GIB_TABLES * FORK_TABLE_NS)
                               / GIB_PAGES - FORK_PTE_COPY_NS)
#: Per-page accounting anywhere else (a new anon rmap; ``page_remove_rmap`` + ``put_page``
#: + rss at zap or COW): the same three struct-page updates as at fork.
PAGE_ACCOUNT_NS: float = FORK_PAGE_ACCOUNT_NS
#: ``copy_user_highpage`` of 4 KiB in a write fault (equation 2, the v4 cover letter's
#: 0.770 µs per page without COW PTE).
PAGE_COPY_NS: float = (V4_WRITE_FAULT_MS_PLAIN * 1e6
                       - (FAULT_ENTRY_EXIT_NS + MMAP_LOCK_ROUNDTRIP_NS + 2 * PTL_ROUNDTRIP_NS
                          + PAGE_ALLOC_NS + PTE_WRITE_NS + 2 * PAGE_ACCOUNT_NS
                          + TLB_FLUSH_PAGE_NS))
#: ``clear_page`` of 4 KiB (a fresh anonymous page): one stream where a copy has two.
PAGE_ZERO_NS: float = PAGE_COPY_NS / 2
#: A whole COW PTE table break (slow path, full x86-64 table): (0.795 − 0.770) µs × 512.
COW_PTE_BREAK_NS: float = ((V4_WRITE_FAULT_MS_COWPTE - V4_WRITE_FAULT_MS_PLAIN) * 1e6
                           * X86_PTRS_PER_PTE)
#: Per non-none entry copied into the new table by a break (equation 3).
COW_PTE_BREAK_COPY_NS: float = ((COW_PTE_BREAK_NS
                                 - (3 * PTL_ROUNDTRIP_NS + PTE_TABLE_ALLOC_NS
                                    + COW_PTE_BREAK_FIXED_NS
                                    + X86_PTRS_PER_PTE * COW_PTE_BREAK_SCAN_NS
                                    + TLB_FLUSH_RANGE_NS))
                                / X86_PTRS_PER_PTE)

#: Cost category -> nanoseconds per unit. The kernel charges these names.
COSTS: dict[str, float] = {
    # locks (charged per acquisition by lock class)
    "mmap_lock": MMAP_LOCK_ROUNDTRIP_NS,
    "vma_lock": RWSEM_ROUNDTRIP_NS,
    "anon_vma_lock": RWSEM_ROUNDTRIP_NS,
    "page_table_lock": SPIN_LOCK_ROUNDTRIP_NS,
    "ptl": PTL_ROUNDTRIP_NS,
    # fork
    "fork_vma": FORK_VMA_NS,
    "fork_pte_copy": FORK_PTE_COPY_NS,
    "fork_page_account": FORK_PAGE_ACCOUNT_NS,
    # page tables
    "table_alloc": PTE_TABLE_ALLOC_NS,
    "table_free": PTE_TABLE_FREE_NS,
    "table_ref": TABLE_REF_NS,
    "pmd_update": PMD_UPDATE_NS,
    "pte_write": PTE_WRITE_NS,
    # pages
    "page_account": PAGE_ACCOUNT_NS,
    "page_alloc": PAGE_ALLOC_NS,
    "page_zero": PAGE_ZERO_NS,
    "page_copy": PAGE_COPY_NS,
    "page_free": PAGE_FREE_NS,
    "swap_io": SWAP_IO_NS,
    # faults and TLB
    "fault_entry_exit": FAULT_ENTRY_EXIT_NS,
    "tlb_flush_page": TLB_FLUSH_PAGE_NS,
    "tlb_flush_range": TLB_FLUSH_RANGE_NS,
    # COW PTE table break
    "cow_break_fixed": COW_PTE_BREAK_FIXED_NS,
    "cow_break_scan": COW_PTE_BREAK_SCAN_NS,
    "cow_break_copy": COW_PTE_BREAK_COPY_NS,
}

#: Lock class (``Lock.cls``) -> cost category.
LOCK_CATEGORIES: dict[str, str] = {
    "mmap_lock": "mmap_lock",
    "vma_lock": "vma_lock",
    "anon_vma": "anon_vma_lock",
    "page_table_lock": "page_table_lock",
    "ptl": "ptl",
}

IMMEDIATE = "immediate"
DEFERRED = "deferred"


def ns_of(counts: Mapping[str, int], costs: Mapping[str, float] = COSTS) -> float:
    """Return the simulated nanoseconds of a ``category -> count`` map.

    Summed in sorted category order, so the float result is deterministic.

    Args:
        counts: Units charged per category.
        costs: Nanoseconds per unit per category.

    Returns:
        The total in nanoseconds.

    """
    return float(sum(costs[c] * n for c, n in sorted(counts.items())))


class CostMeter:
    """Accumulates a kernel's simulated cost by category, with fork attribution.

    The kernel owns one (``kernel.cost``) and charges counts at its sites. Every charge
    goes to :attr:`counts` and to exactly one of :attr:`immediate`, :attr:`deferred` or
    :attr:`unattributed` (a charge inside a fault waits in a per-thread buffer until the
    fault ends), so for every category, once no fault is in progress::

        counts == immediate + deferred + unattributed

    How a charge is attributed, first rule that applies, for the thread running now
    (``kernel._cur``; the scheduler runs one thread at a time, and each thread's
    generators are sequential, so per-thread state is exact under any interleaving):

    1. inside an explicit :meth:`enter` context (a COW PTE table break: ``deferred``);
    2. the thread is running ``fork``: ``immediate``;
    3. inside a fault (:meth:`begin_fault` … :meth:`end_fault`): buffered; at the end
       the whole fault is ``deferred`` if it was marked with :meth:`mark_fork_fault`
       (a write/unshare fault on an anonymous page that fork made non-exclusive),
       otherwise ``unattributed``;
    4. otherwise ``unattributed``.

    Args:
        kernel: The kernel whose ``_cur`` thread is the one charging (None: every
            charge is unattributed).
        costs: Nanoseconds per unit per category (default :data:`COSTS`).

    """

    def __init__(self, kernel: Any | None = None,
                 costs: Mapping[str, float] = COSTS) -> None:
        self._k = kernel
        self.costs: dict[str, float] = dict(costs)
        self.counts: dict[str, int] = {}
        self.immediate: dict[str, int] = {}
        self.deferred: dict[str, int] = {}
        self.unattributed: dict[str, int] = {}
        self._ctx: dict[int, list[str]] = {}
        self._fault: dict[int, dict[str, int]] = {}
        self._fault_marked: dict[int, bool] = {}

    # ------------------------------------------------------------------ charging
    def charge(self, category: str, n: int = 1) -> None:
        """Charge ``n`` units of ``category``.

        Raises:
            KeyError: ``category`` is not a known cost category.

        """
        if n.__class__ is not int:
            n = int(n)
        if n <= 0:
            return
        if category not in self.costs:
            raise KeyError(f"unknown cost category {category!r}")
        counts = self.counts
        counts[category] = counts.get(category, 0) + n
        k = self._k
        t = k._cur if k is not None else None
        if t is None:
            bucket = self.unattributed
        else:
            ctx = self._ctx.get(t.tid)
            if ctx:
                bucket = self.immediate if ctx[-1] == IMMEDIATE else self.deferred
            elif t.op == "fork":
                bucket = self.immediate
            else:
                bucket = self._fault.get(t.tid, self.unattributed)
        bucket[category] = bucket.get(category, 0) + n

    def charge_lock(self, lock_class: str) -> None:
        """Charge one round trip of a lock of lockdep class ``lock_class``."""
        self.charge(LOCK_CATEGORIES[lock_class])

    def enter(self, t: Any, attribution: str) -> None:
        """Attribute ``t``'s charges to ``attribution`` until the matching :meth:`leave`."""
        if attribution not in (IMMEDIATE, DEFERRED):
            raise ValueError(f"attribution: expected immediate or deferred, got {attribution!r}")
        self._ctx.setdefault(t.tid, []).append(attribution)

    def leave(self, t: Any) -> None:
        """End the innermost :meth:`enter` context of ``t``."""
        ctx = self._ctx.get(t.tid)
        if ctx:
            ctx.pop()

    def begin_fault(self, t: Any) -> None:
        """Start a page fault of ``t``: its charges wait until :meth:`end_fault`."""
        self._fault[t.tid] = {}
        self._fault_marked[t.tid] = False

    def mark_fork_fault(self, t: Any) -> None:
        """Mark the current fault of ``t`` as caused by fork (the page was shared)."""
        if t.tid in self._fault:
            self._fault_marked[t.tid] = True

    def end_fault(self, t: Any, entry_exit: bool = True) -> None:
        """End the fault of ``t`` and attribute all of its charges.

        Args:
            t: The faulting thread.
            entry_exit: Charge the exception entry/exit (a user fault; GUP's faults
                have none).

        """
        if entry_exit:
            self.charge("fault_entry_exit")
        buf = self._fault.pop(t.tid, None)
        marked = self._fault_marked.pop(t.tid, False)
        if not buf:
            return
        dest = self.deferred if marked else self.unattributed
        for c, n in buf.items():
            dest[c] = dest.get(c, 0) + n

    # ------------------------------------------------------------------ reading
    def ns(self, which: str = "total") -> float:
        """Return simulated nanoseconds of one attribution.

        Args:
            which: ``total``, ``immediate``, ``deferred``, ``unattributed`` or ``fork``
                (= immediate + deferred).

        Returns:
            Nanoseconds.

        Raises:
            ValueError: ``which`` is none of these.

        """
        if which == "fork":
            return self.ns(IMMEDIATE) + self.ns(DEFERRED)
        src = {"total": self.counts, IMMEDIATE: self.immediate, DEFERRED: self.deferred,
               "unattributed": self.unattributed}.get(which)
        if src is None:
            raise ValueError(f"which: expected total, immediate, deferred, unattributed or "
                             f"fork, got {which!r}")
        return ns_of(src, self.costs)

    @property
    def total_ns(self) -> float:
        """Everything charged so far."""
        return self.ns("total")

    def total(self) -> float:
        """Return everything charged so far, in nanoseconds (same as :attr:`total_ns`)."""
        return self.ns("total")

    @property
    def immediate_ns(self) -> float:
        """Fork-attributable cost spent inside fork."""
        return self.ns(IMMEDIATE)

    @property
    def deferred_ns(self) -> float:
        """Fork-attributable cost caused later by a fork."""
        return self.ns(DEFERRED)

    @property
    def fork_attributable_ns(self) -> float:
        """``immediate_ns + deferred_ns``."""
        return self.immediate_ns + self.deferred_ns

    def pending(self) -> bool:
        """Whether some fault's charges are still waiting for attribution."""
        return any(bool(b) for b in self._fault.values())

    def buffered(self) -> dict[str, int]:
        """Return the charges of faults in progress, still waiting for attribution."""
        out: dict[str, int] = {}
        for _, buf in sorted(self._fault.items()):
            for c, n in buf.items():
                out[c] = out.get(c, 0) + n
        return out

    def snapshot(self) -> dict[str, Any]:
        """Plain-data summary: ns totals and the counts per category and attribution."""
        return {
            "total_ns": self.total_ns,
            "immediate_ns": self.immediate_ns,
            "deferred_ns": self.deferred_ns,
            "fork_attributable_ns": self.fork_attributable_ns,
            "counts": dict(sorted(self.counts.items())),
            "immediate": dict(sorted(self.immediate.items())),
            "deferred": dict(sorted(self.deferred.items())),
        }


# =====================================================================================
# Closed forms (the analytic side of the benchmark)
# =====================================================================================
def fork_fixed_ns(n_vmas: int = 1) -> float:
    """Return the per-fork work that does not depend on the page tables.

    The same in both variants: the parent's and child's mmap_lock; per VMA
    ``vma_start_write``, the root anon_vma lock of ``anon_vma_fork`` and
    ``FORK_VMA_NS``; ``flush_tlb_mm`` of the parent.
    """
    return (2 * MMAP_LOCK_ROUNDTRIP_NS
            + n_vmas * (2 * RWSEM_ROUNDTRIP_NS + FORK_VMA_NS) + TLB_FLUSH_RANGE_NS)


def fork_table_ns(variant: str, present: int, ptrs_per_pte: int = X86_PTRS_PER_PTE) -> float:
    """Fork's cost for one PTE table holding ``present`` normal anonymous pages.

    Args:
        variant: ``classic`` (``copy_pte_range``) or ``cowpte`` (``copy_cow_pte_range``).
        present: Entries mapping a normal page.
        ptrs_per_pte: Entries per table (unused by fork itself; kept for symmetry).

    Returns:
        Nanoseconds.

    """
    del ptrs_per_pte
    per_entry = present * (FORK_PTE_COPY_NS + FORK_PAGE_ACCOUNT_NS)
    if variant == "classic":
        return per_entry + FORK_TABLE_NS
    # src PTL, child's page_table_lock, pmd_get_pte, set_pmd_at + pmdp_set_wrprotect.
    return per_entry + 2 * SPIN_LOCK_ROUNDTRIP_NS + TABLE_REF_NS + 2 * PMD_UPDATE_NS


def cow_break_ns(present: int, ptrs_per_pte: int = X86_PTRS_PER_PTE) -> float:
    """Return the cost of a slow-path COW PTE break of a table with ``present`` entries."""
    return (3 * PTL_ROUNDTRIP_NS + PTE_TABLE_ALLOC_NS + COW_PTE_BREAK_FIXED_NS
            + ptrs_per_pte * COW_PTE_BREAK_SCAN_NS + present * COW_PTE_BREAK_COPY_NS
            + TLB_FLUSH_RANGE_NS)


def cow_write_fault_ns() -> float:
    """Return the cost of a write fault copying a page fork shared (equation 2): 770 ns."""
    return (FAULT_ENTRY_EXIT_NS + MMAP_LOCK_ROUNDTRIP_NS + 2 * PTL_ROUNDTRIP_NS
            + PAGE_ALLOC_NS + PAGE_COPY_NS + PTE_WRITE_NS + 2 * PAGE_ACCOUNT_NS
            + TLB_FLUSH_PAGE_NS)


def analytic_fork_cost(variant: str, n_tables: int, ptrs_per_pte: int = X86_PTRS_PER_PTE,
                       writes_per_table: int = 0, n_vmas: int = 1,
                       present: int | None = None) -> float:
    """Predict the fork-attributable cost of a fork and the writes after it.

    The pattern: fork a mapping of ``n_tables`` tables, each holding ``present``
    (default: all) private anonymous pages, then the parent writes ``writes_per_table``
    distinct pages of every table.

    Args:
        variant: ``classic`` or ``cowpte`` (with ``prctl(PR_SET_COW_PTE)`` before fork).
        n_tables: Populated PTE tables.
        ptrs_per_pte: Entries per table.
        writes_per_table: Distinct pages written per table after fork (≤ ``present``).
        n_vmas: VMAs copied.
        present: Pages per table (default ``ptrs_per_pte``).

    Returns:
        Nanoseconds: fork (immediate) + the faults and breaks it causes (deferred).

    """
    present = ptrs_per_pte if present is None else present
    per_table = fork_table_ns(variant, present, ptrs_per_pte)
    per_table += writes_per_table * cow_write_fault_ns()
    if variant == "cowpte" and writes_per_table:
        per_table += cow_break_ns(present, ptrs_per_pte)
    return fork_fixed_ns(n_vmas) + n_tables * per_table


def analytic_worst_ratio(n_tables: int | None = None,
                         ptrs_per_pte: int = X86_PTRS_PER_PTE, n_vmas: int = 1) -> float:
    """Return cowpte / classic fork-attributable cost for the brief's worst pattern.

    Fork a populated mapping, then write one byte in every table (2 MiB region).

    Args:
        n_tables: Tables in the mapping; None = the limit for a large mapping (per-fork
            fixed costs vanish).
        ptrs_per_pte: Entries per table.
        n_vmas: VMAs copied (only with ``n_tables``).

    Returns:
        The ratio.

    """
    if n_tables is None:
        c = fork_table_ns("classic", ptrs_per_pte) + cow_write_fault_ns()
        w = (fork_table_ns("cowpte", ptrs_per_pte) + cow_write_fault_ns()
             + cow_break_ns(ptrs_per_pte, ptrs_per_pte))
        return w / c
    return (analytic_fork_cost("cowpte", n_tables, ptrs_per_pte, 1, n_vmas)
            / analytic_fork_cost("classic", n_tables, ptrs_per_pte, 1, n_vmas))


def analytic_walker_ratio(n_tables: int | None = None, ptrs_per_pte: int = X86_PTRS_PER_PTE,
                          n_vmas: int = 1, present: int | None = None) -> float:
    """Return cowpte / classic when a walker breaks every shared table after fork.

    A walker that modifies entries (mprotect, MADV_FREE, a partial MADV_DONTNEED, …)
    breaks each table with no page copy.

    Classic pays nothing after fork here, so this exceeds :func:`analytic_worst_ratio`;
    with ``present=0`` (tables kept but emptied, e.g. by MADV_DONTNEED, before fork) it
    is the model's supremum per table.

    Args:
        n_tables: Tables; None = the large-mapping limit.
        ptrs_per_pte: Entries per table.
        n_vmas: VMAs copied (only with ``n_tables``).
        present: Pages per table (default all).

    Returns:
        The ratio.

    """
    present = ptrs_per_pte if present is None else present
    c = fork_table_ns("classic", present, ptrs_per_pte)
    w = fork_table_ns("cowpte", present, ptrs_per_pte) + cow_break_ns(present, ptrs_per_pte)
    if n_tables is None:
        return w / c
    f = fork_fixed_ns(n_vmas)
    return (f + n_tables * w) / (f + n_tables * c)


__all__ = [name for name in dir() if name.isupper()] + [
    "CostMeter", "ns_of", "fork_fixed_ns", "fork_table_ns", "cow_break_ns",
    "cow_write_fault_ns", "analytic_fork_cost", "analytic_worst_ratio",
    "analytic_walker_ratio"]
