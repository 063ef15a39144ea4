"""The classic (upstream) kernel, assembled from one part per kernel source file.

:class:`Kernel` is one object (the simulated machine: frame pool, swap, processes,
threads, locks, trace) whose methods come from modules laid out like the Linux tree:

| module | models |
|---|---|
| :mod:`~cowenv.kernel.sched` | tasks, the scheduler (threads as generators), reporting |
| :mod:`~cowenv.kernel.locking` | ``include/linux/mmap_lock.h``, ``pte_offset_map_lock`` |
| :mod:`~cowenv.kernel.page_alloc` | ``mm/page_alloc.c``, ``put_page``, ``pte_free`` |
| :mod:`~cowenv.kernel.fault` | ``mm/memory.c`` faults, x86 ``fault.c`` |
| :mod:`~cowenv.kernel.mmap` | ``mm/mmap.c``, ``zap_pte_range`` |
| :mod:`~cowenv.kernel.mprotect` | ``mm/mprotect.c`` |
| :mod:`~cowenv.kernel.madvise` | ``mm/madvise.c`` |
| :mod:`~cowenv.kernel.fork` | ``kernel/fork.c`` ``dup_mmap``, ``copy_page_range`` |
| :mod:`~cowenv.kernel.exit` | ``kernel/exit.c``, ``exit_mmap``, ``check_mm`` |
| :mod:`~cowenv.kernel.gup` | ``mm/gup.c`` |
| :mod:`~cowenv.kernel.rmap` | ``mm/rmap.c``, ``mm/page_vma_mapped.c`` |
| :mod:`~cowenv.kernel.vmscan` | ``mm/vmscan.c`` |
| :mod:`~cowenv.kernel.swapfile` | ``mm/swapfile.c`` |
| :mod:`~cowenv.kernel.swap_state` | ``mm/swap_state.c`` (the swap cache) |
| :mod:`~cowenv.kernel.tlb` | ``mm/mmu_gather.c``, x86 ``flush_tlb_mm_range``, the TLB |
| :mod:`~cowenv.kernel.mempolicy` | ``mm/mempolicy.c`` ``change_prot_numa``, ``task_numa_work`` |
| :mod:`~cowenv.kernel.task_mmu` | ``fs/proc/task_mmu.c`` ``clear_refs``, ``pagemap`` |
| :mod:`~cowenv.kernel.mremap` | ``mm/mremap.c`` |
| :mod:`~cowenv.kernel.migrate` | ``mm/migrate.c``, ``try_to_migrate``, compaction |

Each part is a mixin class without state of its own; ``self`` is always the kernel, so a
function calls any other as ``self.zap_pte_range(...)`` wherever it lives, as kernel C
calls across files. The state lives here, in :meth:`Kernel.__init__`.

This module is the ``classic`` variant (upstream 6.2 semantics, with the per-VMA-lock
faults of 6.4 as an option). COW PTE v4 (:mod:`cowenv.kernel.cowpte`) subclasses it and
overrides the hook methods below, whose names start with ``cow_``: in classic they do
nothing. Use :func:`cowenv.kernel.make_kernel` to get the class a config asks for.

Lock contracts are written above each function as in ``mm/memory.c``.
"""

from __future__ import annotations

from .config import KernelConfig
from .cost import CostMeter
from .exit import ExitMixin
from .fault import VM_FAULT_OK, FaultMixin
from .fork import ForkMixin
from .gup import GupMixin
from .locking import LockingMixin
from .locks import Lockdep
from .madvise import MadviseMixin
from .memory import (
    PagePool,
    ShmemObject,
    SwapDevice,
)
from .mempolicy import MempolicyMixin
from .migrate import MigrateMixin
from .mm import (
    AnonVma,
    MmStruct,
    Vma,
)
from .mmap import MmapMixin
from .mprotect import MprotectMixin
from .mremap import MremapMixin
from .page_alloc import PageAllocMixin
from .pgtable import (
    PmdEntry,
    PteTable,
)
from .rmap import RmapMixin
from .sched import KSWAPD_TID, Gen, Pin, Process, SchedMixin, Thread, _done
from .swap_state import SwapStateMixin
from .swapfile import SwapfileMixin
from .task_mmu import TaskMmuMixin
from .tlb import TlbMixin
from .trace import Event, Violation
from .vmscan import VmscanMixin

__all__ = ['Kernel']


class Kernel(
    SchedMixin,
    LockingMixin,
    PageAllocMixin,
    FaultMixin,
    MmapMixin,
    MprotectMixin,
    MadviseMixin,
    ForkMixin,
    ExitMixin,
    GupMixin,
    RmapMixin,
    VmscanMixin,
    SwapfileMixin,
    SwapStateMixin,
    TlbMixin,
    MempolicyMixin,
    TaskMmuMixin,
    MremapMixin,
    MigrateMixin,
):
    """The classic (upstream) kernel.

    Args:
        config: The kernel configuration.
        oracles: Whether to attach the default oracle
            (:class:`cowenv.kernel.oracles.Oracle`); ``False`` runs without any checking
            (benchmarks of raw speed).
        trace: Whether to record the event trace.
    """

    variant = "classic"

    def __init__(self, config: KernelConfig | None = None, *, oracles: bool = True,
                 trace: bool = True) -> None:
        from .oracles import Oracle  # local: oracles import kernel constants

        self.config = config or KernelConfig()
        if self.config.variant != self.variant:
            raise ValueError(f"{type(self).__name__} runs variant {self.variant!r}, "
                             f"config says {self.config.variant!r}; use make_kernel()")
        self.P = self.config.ptrs_per_pte
        self.pool = PagePool(self.config.nr_frames)
        self.swap = SwapDevice(self.config.nr_swap_slots)
        self.lockdep = Lockdep()
        self.step_no = 0
        self.violations: list[Violation] = []
        self.signatures: set[str] = set()
        self.events: list[Event] = []
        self.tracing = trace
        # Kernel-wide allocation-failure pressure (pressure_fail_nth); per-thread
        # /proc/thread-self/fail-nth lives on each Thread (sched.py).
        self.fail_nth = 0
        self.alloc_fail_injected = False
        self.shmem: dict[int, ShmemObject] = {}
        # shmem object id -> VMAs referencing its file (``f_count`` held by vm_file).
        self.shmem_users: dict[int, int] = {}
        # GUP-fast walkers inside their IRQs-off section, and page tables whose freeing
        # waits for them (``tlb_remove_table`` / RCU table free).
        self.gup_fast_walkers = 0
        self.deferred_tables: list[PteTable] = []
        # mm id -> operations between a PTE change and its TLB flush (tlb.py).
        self.tlb_pending: dict[int, int] = {}
        self.pins: dict[int, Pin] = {}
        self.anon_vmas: dict[int, AnonVma] = {}
        self.tables: dict[int, PteTable] = {}
        self.next_token = 1
        self.next_ids = {"mm": 1, "vma": 1, "anon_vma": 1, "shmem": 1, "pin": 1, "pid": 1}
        self.threads: dict[int, Thread] = {KSWAPD_TID: Thread(KSWAPD_TID, 0)}
        self.procs: dict[int, Process] = {}
        self.coverage: dict[str, int] = {}
        self.op_count = 0
        self.defects: list[str] = []
        #: Simulated time by cost category, with fork attribution (cost.py).
        self.cost = CostMeter(self)
        self.oracle = Oracle(self) if oracles else None
        # The initial process (pid 1, tid 1), like init.
        mm = self._new_mm()
        p = self._new_process(mm)
        self._new_thread(p)

    # COW PTE hook points: no-ops upstream, overridden by cowpte.CowPteKernel.
    def cow_fault_hook(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """Before ``__pte_alloc`` in ``__handle_mm_fault``; returns a VM_FAULT code."""
        return (yield from _done(VM_FAULT_OK))
    def cow_swapin_hook(self, t: Thread, vma: Vma, vpn: int) -> Gen:
        """Before ``do_swap_page``; returns a VM_FAULT code."""
        return (yield from _done(VM_FAULT_OK))
    def cow_numa_fault_hook(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """Before ``do_numa_page``; returns a VM_FAULT code."""
        return (yield from _done(VM_FAULT_OK))
    def cow_break_for_walker(self, t: Thread, vma: Vma, idx: int, site: str) -> Gen:
        """A walker that modifies entries calls ``break_cow_pte`` first; 0 or -ENOMEM."""
        return (yield from _done(0))
    def cow_zap_hook(self, t: Thread, vma: Vma, idx: int, lo: int, hi: int) -> Gen:
        """``zap_pte_range`` entry on a PMD; returns True to skip touching the entries."""
        return (yield from _done(False))
    def cow_copy_pmd(self, t: Thread, dst_vma: Vma, src_vma: Vma, idx: int, lo: int,
                     hi: int) -> Gen:
        """``copy_pmd_range`` per PMD; COW PTE may share the table.

        Returns ``(status, resume_vpn)``: status ``"done"`` (handled), ``"copy"`` (fall back
        to ``copy_pte_range`` from ``resume_vpn``) or an ``-errno``.
        """
        return (yield from _done(("copy", lo)))
    def cow_free_table(self, t: Thread, mm: MmStruct, idx: int, pmd: PmdEntry) -> bool:
        """``free_pte_range`` with COW PTE: returns True if the table is still in use."""
        return False
    def cow_rmap_table(self, t: Thread, vma: Vma, idx: int, table: PteTable,
                       site: str) -> Gen:
        """``page_vma_mapped_walk`` with ``PVMW_BREAK_COW_PTE`` (``try_to_unmap_one`` only).

        Returns the table to use (after breaking COW), or None to skip.
        """
        return (yield from _done(table))
    def cow_mprotect_prepare(self, t: Thread, mm: MmStruct, start: int, end: int) -> Gen:
        """Before ``mprotect`` changes anything; returns 0 or -errno."""
        return (yield from _done(0))
    def cow_change_prot_failed(self, t: Thread, vma: Vma, idx: int, err: int) -> int:
        """What mprotect does when ``break_cow_pte`` fails: overridden by cowpte."""
        return err
    def cow_madvise_break(self, t: Thread, vma: Vma, idx: int, site: str) -> Gen:
        """MADV_FREE's ``break_cow_pte`` (cowpte may skip it: walker-skips-break)."""
        return (yield from self.cow_break_for_walker(t, vma, idx, site))
    def cow_split_vma(self, t: Thread, vma: Vma, at: int) -> Gen:
        """``__split_vma``: COW PTE v4 breaks the table of ``at`` first; 0 or -ENOMEM."""
        return (yield from _done(0))
    def cow_fork_seq_brackets_sharing(self, src_mm: MmStruct) -> bool:
        """Whether fork's ``write_protect_seq`` section also covers COW PTE sharing."""
        return True
