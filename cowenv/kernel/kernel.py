"""The simulated kernel: threads as generators, the scheduler API, and upstream mm code.

Every kernel function that can be preempted is a generator named after the function it
models; each ``yield`` hands back a stable preemption label ``function:point``. A thread
that cannot take a lock yields ``function:wait`` and is *blocked* until the lock is
free. The caller (a scenario, the env, an agent) is the scheduler: it starts operations
on idle threads and steps runnable threads one preemption point at a time.

This module is the ``classic`` variant (upstream >= 6.2 semantics, with per-VMA-lock
faults of 6.4 as an option). COW PTE v4 (:mod:`cowenv.kernel.cowpte`) subclasses it and
overrides the hook methods whose names start with ``cow_`` — in classic they do nothing.

Lock contracts are written above each function as in ``mm/memory.c``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from .config import KernelConfig
from .cost import CostMeter
from .locks import READ, WRITE, Lock, Lockdep, SpinLock
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    PagePool,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_shmem,
    PG_swapbacked,
    PG_table,
    ShmemObject,
    SwapDevice,
)
from .mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    MMF_COW_PTE,
    MMF_COW_PTE_READY,
    MMF_HAS_PINNED,
    VM_DONTCOPY,
    VM_MAYWRITE,
    VM_READ,
    VM_SHARED,
    VM_WIPEONFORK,
    VM_WRITE,
    AnonVma,
    MmStruct,
    Vma,
)
from .ops import EAGAIN, EFAULT, EINVAL, ENOMEM, OPS, parse_prot, validate_args
from .pgtable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_SWAP,
    PTE_SWP_EXCLUSIVE,
    PTE_USER,
    PTE_WRITE,
    PTE_YOUNG,
    ZERO_PFN,
    PmdEntry,
    PteTable,
    mk_pte,
    swp_entry_to_pte,
)
from .trace import Event, Violation

_tuple_new = tuple.__new__

Gen = Generator[str, None, Any]

# vm_fault_t results (include/linux/mm_types.h), as small ints.
VM_FAULT_OK = 0
VM_FAULT_OOM = 1
VM_FAULT_SIGSEGV = 2
VM_FAULT_RETRY = 3

FAULT_FLAG_WRITE = 1
FAULT_FLAG_UNSHARE = 2
FAULT_FLAG_VMA_LOCK = 4

KSWAPD_TID = 0


class KernelUsageError(Exception):
    """The scheduler asked for something illegal (e.g. stepping an idle thread)."""


class Thread:
    """A task: a user thread of a process, or kswapd.

    Attributes:
        tid: Thread id (0 = kswapd).
        pid: Owning process id (0 for kswapd).
        gen: The running operation's generator, or None when idle.
        op: Name of the running operation.
        args: Its arguments.
        label: Preemption label the thread is stopped at ("" = not started).
        waiting: ``(lock, mode)`` the thread is blocked on, if any.
        held: Locks held, in acquisition order.
        exited: The thread has exited.
        result: Return value of the last completed operation.
    """

    __slots__ = ("tid", "pid", "gen", "op", "args", "label", "waiting", "held", "exited",
                 "result", "op_index", "fault_site")

    def __init__(self, tid: int, pid: int) -> None:
        self.tid = tid
        self.pid = pid
        self.gen: Gen | None = None
        self.op = ""
        self.args: dict[str, Any] = {}
        self.label = ""
        self.waiting: tuple[Lock, str] | None = None
        self.held: list[tuple[Lock, str]] = []
        self.exited = False
        self.result: Any = None
        self.op_index = -1
        self.fault_site = ""

    @property
    def idle(self) -> bool:
        """No operation in progress."""
        return self.gen is None and not self.exited


class Process:
    """A process: an mm and its threads."""

    __slots__ = ("pid", "mm", "tids", "alive")

    def __init__(self, pid: int, mm: MmStruct) -> None:
        self.pid = pid
        self.mm = mm
        self.tids: list[int] = []
        self.alive = True


class Pin:
    """A FOLL_PIN reference held by a device (an io_uring fixed buffer, a pipe page)."""

    __slots__ = ("id", "pid", "mm", "vpn", "pfn", "write", "active")

    def __init__(self, pid: int, pin_id: int, mm: MmStruct, vpn: int, pfn: int,
                 write: bool) -> None:
        self.id = pin_id
        self.pid = pid
        self.mm = mm
        self.vpn = vpn
        self.pfn = pfn
        self.write = write
        self.active = True


def _done(value: Any = 0) -> Gen:
    """A generator that returns at once (a hook with nothing to do)."""
    return value
    yield  # pragma: no cover


class Kernel:
    """The classic (upstream) kernel.

    Args:
        config: The kernel configuration.
        oracle: Oracle instance (defaults to :class:`cowenv.kernel.oracles.Oracle`);
            pass ``oracles=False`` to run without any checking (benchmarks of raw speed).
        oracles: Whether to attach the default oracle.
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
        self.fail_nth = 0
        self.shmem: dict[int, ShmemObject] = {}
        # shmem object id -> VMAs referencing its file (``f_count`` held by vm_file).
        self.shmem_users: dict[int, int] = {}
        # GUP-fast walkers inside their IRQs-off section, and page tables whose freeing
        # waits for them (``tlb_remove_table`` / RCU table free).
        self.gup_fast_walkers = 0
        self.deferred_tables: list[PteTable] = []
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

    # =================================================================================
    # Scheduler API
    # =================================================================================
    def live_threads(self) -> list[Thread]:
        """All threads that have not exited, by tid."""
        return [t for _, t in sorted(self.threads.items()) if not t.exited]

    def is_runnable(self, t: Thread) -> bool:
        """Has an operation in progress and is not blocked on a lock."""
        if t.gen is None or t.exited:
            return False
        if t.waiting is None:
            return True
        lk, mode = t.waiting
        return lk.can_acquire(t.tid, mode)

    def thread_state(self, tid: int) -> str:
        """``idle``, ``runnable``, ``blocked`` or ``exited``."""
        t = self.threads.get(tid)
        if t is None or t.exited:
            return "exited"
        if t.gen is None:
            return "idle"
        return "runnable" if self.is_runnable(t) else "blocked"

    def idle_tids(self) -> list[int]:
        """Threads that can start an operation."""
        return [t.tid for t in self.live_threads() if t.gen is None]

    def runnable_tids(self) -> list[int]:
        """Threads that can be stepped."""
        return [t.tid for t in self.live_threads() if self.is_runnable(t)]

    def blocked_tids(self) -> list[int]:
        """Threads waiting for a lock."""
        return [t.tid for t in self.live_threads() if t.gen is not None and not self.is_runnable(t)]

    def can_start(self, tid: int, op: str) -> bool:
        """Whether ``op`` may be started on ``tid`` now."""
        t = self.threads.get(tid)
        if t is None or t.exited or t.gen is not None or op not in OPS:
            return False
        return OPS[op].kthread == (tid == KSWAPD_TID)

    def start(self, tid: int, op: str, args: dict[str, Any] | None = None) -> None:
        """Start operation ``op`` on idle thread ``tid`` (it runs only when stepped).

        Raises:
            KernelUsageError: the thread is not idle, the op is unknown, or the
                arguments are invalid.
        """
        if not self.can_start(tid, op):
            raise KernelUsageError(f"cannot start {op} on thread {tid} "
                                   f"(state {self.thread_state(tid)})")
        try:
            a = validate_args(op, dict(args or {}), self.config.page_size)
        except ValueError as e:
            raise KernelUsageError(str(e)) from None
        t = self.threads[tid]
        t.op, t.args, t.label = op, a, ""
        t.result = None
        t.op_index = self.op_count
        self.op_count += 1
        t.gen = getattr(self, f"sys_{op}")(t, **a)
        self._ev(tid, "start", op, a)

    def step(self, tid: int) -> str:
        """Run thread ``tid`` to its next preemption point (or to completion).

        Returns:
            The label it stopped at, or ``"<op>:done"`` when the operation returned.

        Raises:
            KernelUsageError: the thread is not runnable.
        """
        t = self.threads.get(tid)
        if t is None or not self.is_runnable(t):
            raise KernelUsageError(f"thread {tid} is not runnable ({self.thread_state(tid)})")
        self.step_no += 1
        self._cur = t
        assert t.gen is not None
        try:
            label = next(t.gen)
        except StopIteration as stop:
            self._finish(t, stop.value)
            label = f"{t.op}:done"
        except Exception as e:  # noqa: BLE001 — a simulator defect, never a kernel finding
            import traceback

            tb = traceback.extract_tb(e.__traceback__)[-1]
            msg = f"{type(e).__name__}: {e} at {tb.filename.rsplit('/', 1)[-1]}:{tb.lineno}"
            self.defects.append(msg)
            self._report("simulator", t.op, msg)
            for lk, mode in reversed(t.held):
                lk.release(t.tid, mode)
            t.held.clear()
            t.waiting = None
            self._finish(t, None)
            label = f"{t.op}:defect"
        else:
            t.label = label
            self._ev(tid, "point", label)
        self.coverage[label] = self.coverage.get(label, 0) + 1
        self._cur = None
        self._check_deadlock()
        return label

    def _finish(self, t: Thread, value: Any) -> None:
        t.gen = None
        t.result = value
        t.label = ""
        if t.held and not t.exited:
            names = ", ".join(lk.name for lk, _ in t.held)
            self._report("lock-discipline", t.op, f"returned to user space holding {names}",
                         tid=t.tid)
        self._ev(t.tid, "end", t.op, value)
        if self.oracle is not None:
            self.oracle.after_op(t, value)

    def run(self, tid: int, max_steps: int = 100_000) -> Any:
        """Step ``tid`` until its operation completes; return its result.

        Raises:
            KernelUsageError: the thread blocks (nobody else is stepped here).
        """
        for _ in range(max_steps):
            if self.threads[tid].gen is None:
                return self.threads[tid].result
            self.step(tid)
        raise KernelUsageError(f"thread {tid} did not finish in {max_steps} steps")

    def do(self, tid: int, op: str, **args: Any) -> Any:
        """Start ``op`` on ``tid`` and run it to completion (convenience)."""
        self.start(tid, op, args)
        return self.run(tid)

    def event(self, name: str, **args: Any) -> None:
        """Fire a memory-pressure event.

        ``fail_nth`` (``n``): the n-th next page or page-table allocation fails, with
        syzkaller's ``/proc/thread-self/fail-nth`` meaning (1 = the very next one).
        """
        if name == "fail_nth":
            n = args.get("n", 1)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise KernelUsageError("n: expected an integer >= 0")
            self.fail_nth = n
        else:
            raise KernelUsageError(f"unknown event {name!r} (known: fail_nth)")
        self._ev(-1, "event", name, args)

    # =================================================================================
    # Reporting and tracing
    # =================================================================================
    _cur: Thread | None = None

    def _ev(self, tid: int, kind: str, label: str, data: Any = None) -> None:
        if self.tracing:  # tuple.__new__ == Event(...) without the Python-level __new__
            self.events.append(_tuple_new(Event, (self.step_no, tid, kind, label, data)))

    def _report(self, kind: str, site: str, message: str, tid: int | None = None) -> None:
        """Record a violation (every occurrence; consumers deduplicate by signature)."""
        if tid is None:
            tid = self._cur.tid if self._cur is not None else -1
        v = Violation(kind, site, message, self.step_no, tid)
        self.violations.append(v)
        self.signatures.add(v.signature)
        self._ev(tid, "violation", v.signature, message)

    def report(self, kind: str, site: str, message: str) -> None:
        """Public entry for oracles."""
        self._report(kind, site, message)

    # =================================================================================
    # Processes, threads, ids
    # =================================================================================
    def _id(self, what: str) -> int:
        v = self.next_ids[what]
        self.next_ids[what] = v + 1
        return v

    def _new_mm(self) -> MmStruct:
        return MmStruct(self._id("mm"), self.P)

    def _new_process(self, mm: MmStruct) -> Process:
        p = Process(self._id("pid"), mm)
        mm.pid = p.pid
        self.procs[p.pid] = p
        return p

    def _free_tid(self) -> int | None:
        for tid in range(1, self.config.max_threads + 1):
            if tid not in self.threads or (self.threads[tid].exited
                                           and self.threads[tid].gen is None):
                return tid
        return None

    def _new_thread(self, p: Process) -> Thread | None:
        tid = self._free_tid()
        if tid is None:
            return None
        t = Thread(tid, p.pid)
        self.threads[tid] = t
        p.tids.append(tid)
        p.mm.users += 1
        return t

    def mm_of(self, t: Thread) -> MmStruct:
        """The mm a user thread runs in."""
        return self.procs[t.pid].mm

    def live_procs(self) -> list[Process]:
        """Live processes by pid (``procs`` is in pid order: pids are never reused)."""
        return [p for p in self.procs.values() if p.alive]

    def live_mms(self) -> list[MmStruct]:
        """The mms of live processes, by pid."""
        return [p.mm for p in self.live_procs()]

    def new_token(self) -> int:
        """A fresh, unique content token for a write."""
        v = self.next_token
        self.next_token += 1
        return v

    # =================================================================================
    # Locking helpers (lockdep-checked)
    # =================================================================================
    def lock(self, t: Thread, lk: Lock, mode: str, site: str) -> Gen | tuple[()]:
        """Acquire ``lk``; yields ``site:wait`` while blocked.

        Lock contract: none (this is the primitive).
        """
        for h, _ in t.held:
            if h is lk:
                self._report("lock-discipline", site, f"recursive acquisition of {lk.name}")
                break
        if self.config.lockdep:
            msg = self.lockdep.acquire([h.cls for h, _ in t.held], lk.cls)
            if msg:
                self._report("lock-discipline", site, msg)
        if not lk.can_acquire(t.tid, mode):
            return self._lock_wait(t, lk, mode, site)
        # Uncontended: take it now and hand ``yield from`` an empty iterable (no
        # generator to create and run); every caller does ``yield from self.lock(...)``
        # at once, so the effects happen at the same point as in a generator body.
        lk.acquire(t.tid, mode)
        t.held.append((lk, mode))
        self.cost.charge_lock(lk.cls)
        self._ev(t.tid, "lock", lk.name, mode)
        return ()

    def _lock_wait(self, t: Thread, lk: Lock, mode: str, site: str) -> Gen:
        """The contended half of :meth:`lock`: queue, yield ``site:wait``, then acquire."""
        lk.waiters.append((t.tid, mode))
        t.waiting = (lk, mode)
        self._ev(t.tid, "wait", lk.name, mode)
        while not lk.can_acquire(t.tid, mode):
            yield f"{site}:wait"
        lk.waiters.remove((t.tid, mode))
        t.waiting = None
        lk.acquire(t.tid, mode)
        t.held.append((lk, mode))
        self.cost.charge_lock(lk.cls)
        self._ev(t.tid, "lock", lk.name, mode)

    def unlock(self, t: Thread, lk: Lock, mode: str, site: str) -> None:
        """Release ``lk``; releasing a lock not held is a lock-discipline violation."""
        for i, (h, m) in enumerate(t.held):
            if h is lk and m == mode:
                del t.held[i]
                lk.release(t.tid, mode)
                self._ev(t.tid, "unlock", lk.name, mode)
                return
        self._report("lock-discipline", site, f"releasing {lk.name} ({mode}) not held")

    def holds(self, t: Thread, lk: Lock, mode: str | None = None) -> bool:
        """Whether ``t`` holds ``lk`` (in ``mode`` if given)."""
        return any(h is lk and (mode is None or m == mode) for h, m in t.held)

    def mmap_assert_locked(self, t: Thread, mm: MmStruct, site: str) -> None:
        """``mmap_assert_locked``: splat unless mmap_lock is held (any mode)."""
        if not self.holds(t, mm.mmap_lock):
            self._report("lock-discipline", site, "mmap_assert_locked: mmap_lock not held")

    def mmap_assert_write_locked(self, t: Thread, mm: MmStruct, site: str) -> None:
        """``mmap_assert_write_locked``: a lockdep splat unless held for write.

        Without lockdep only ``VM_BUG_ON_MM(!rwsem_is_locked(&mm->mmap_lock))`` remains.
        """
        if not self.config.lockdep:
            if not mm.mmap_lock.is_locked():
                self._report("lock-discipline", site, "VM_BUG_ON_MM: mmap_lock not locked")
            return
        if not self.holds(t, mm.mmap_lock, WRITE):
            held = "held for read" if self.holds(t, mm.mmap_lock) else "not held"
            self._report("lock-discipline", site, f"mmap_assert_write_locked: mmap_lock {held}")

    def mmap_write_unlock(self, t: Thread, mm: MmStruct, site: str) -> None:
        """``mmap_write_unlock`` + ``vma_end_write_all`` (bumps ``mm_lock_seq``)."""
        mm.mm_lock_seq += 1
        self.unlock(t, mm.mmap_lock, WRITE, site)

    def mmap_write_downgrade(self, t: Thread, mm: MmStruct) -> None:
        """``mmap_write_downgrade`` (also ends VMA write locks, as 6.4 does)."""
        mm.mm_lock_seq += 1
        for i, (h, m) in enumerate(t.held):
            if h is mm.mmap_lock and m == WRITE:
                t.held[i] = (h, READ)
                mm.mmap_lock.downgrade(t.tid)
                self._ev(t.tid, "downgrade", mm.mmap_lock.name)
                return
        self._report("lock-discipline", "mmap_write_downgrade", "mmap_lock not write-held")

    def vma_start_write(self, t: Thread, vma: Vma) -> Gen:
        """``vma_start_write``: wait out VMA readers, mark the VMA write-locked.

        The VMA stays write-locked until the mmap_lock write section ends
        (``vm_lock_seq = mm_lock_seq``).

        Lock contract: mmap_lock held for write.
        """
        yield from self.lock(t, vma.lock, WRITE, "vma_start_write")
        vma.lock_seq = vma.mm.mm_lock_seq
        self.unlock(t, vma.lock, WRITE, "vma_start_write")

    def pte_lockptr(self, mm: MmStruct, table: PteTable) -> Lock:
        """``pte_lockptr``: the table's split PTL, or ``mm->page_table_lock``."""
        return table.ptl if self.config.split_ptl else mm.page_table_lock

    def pte_offset_map_lock(self, t: Thread, mm: MmStruct, idx: int, site: str) -> Gen:
        """``pte_offset_map_lock`` (6.5 semantics): lock the PMD's table, re-check the PMD.

        Lock the table the PMD points at and re-check the PMD under the lock; returns
        ``(table, ptl)`` or None if the PMD is none (the caller retries or bails out, as
        ``pte_offset_map`` failing does).
        """
        while True:
            pmd = mm.pmd.get(idx)
            if pmd is None:
                return None
            table = pmd.table
            ptl = self.pte_lockptr(mm, table)
            yield from self.lock(t, ptl, WRITE, site)
            cur = mm.pmd.get(idx)
            if cur is not None and cur.table is table:
                return table, ptl
            self.unlock(t, ptl, WRITE, site)

    # =================================================================================
    # Page and table primitives
    # =================================================================================
    def alloc_pages(self, n: int, site: str, nofail: bool = False) -> np.ndarray | None:
        """``alloc_pages``: ``n`` frames, honouring ``fail_nth`` and pool exhaustion.

        ``nofail`` models ``__GFP_NOFAIL``: fault injection does not apply (as
        ``should_fail_alloc_page`` skips it) and the memory reserve may be used.
        """
        if nofail:
            return self.pool.take(n, reserve_ok=True)
        if self.fail_nth > 0:
            self.fail_nth -= 1
            if self.fail_nth == 0:
                self._ev(self._cur.tid if self._cur else -1, "event", "alloc_fail", site)
                return None
        return self.pool.take(n)

    def alloc_page(self, site: str, nofail: bool = False) -> int | None:
        """One frame or None."""
        p = self.alloc_pages(1, site, nofail)
        return None if p is None else int(p[0])

    def pte_alloc_one(self, mm: MmStruct, site: str, nofail: bool = False) -> PteTable | None:
        """``pte_alloc_one`` + ``pgtable_pte_page_ctor``: a zeroed table, refcount 1."""
        pfn = self.alloc_page(site, nofail)
        if pfn is None:
            return None
        self.pool.flags[pfn] |= PG_table
        self.cost.charge("table_alloc")
        ptl = SpinLock(f"ptl:{pfn}.{int(self.pool.gen[pfn])}", "ptl")
        table = PteTable(pfn, self.P, ptl, int(self.pool.gen[pfn]))
        self.tables[pfn] = table
        return table

    def pte_free(self, table: PteTable, site: str) -> None:
        """``pte_free``: return a table page to the allocator."""
        if table.freed:
            self._report("memory-safety", site, f"double free of page table {table.pfn}")
            return
        table.freed = True
        self.cost.charge("table_free")
        self.tables.pop(table.pfn, None)
        if self.gup_fast_walkers:
            # tlb_remove_table() (mm/mmu_gather.c): a page table is freed only after an
            # RCU grace period / IPI, which a GUP-fast walker (IRQs off) holds off.
            self.deferred_tables.append(table)
            return
        self.pool.refcount[table.pfn] = 0
        self.pool.give_back(np.array([table.pfn], dtype=np.int64))

    def pmd_populate(self, mm: MmStruct, idx: int, table: PteTable) -> None:
        """``pmd_populate`` + ``mm_inc_nr_ptes`` (``pmd_install``).

        Lock contract: caller holds ``mm->page_table_lock``.
        """
        mm.pmd[idx] = PmdEntry(table, True)
        mm.mm_inc_nr_ptes()
        self.cost.charge("pmd_update")

    def check_table_live(self, table: PteTable, site: str) -> bool:
        """Memory safety: a table about to be used must not have been freed."""
        if table.freed:
            self._report("memory-safety", site, f"use of freed page table {table.pfn}")
            return False
        return True

    def set_ptes(self, t: Thread | None, mm: MmStruct, table: PteTable, lo: int,
                 new: np.ndarray | int, site: str, hw: bool = False) -> None:
        """``set_pte_at`` for one or more consecutive entries starting at ``lo``.

        Checks, independently of any flaw: the table is alive (memory safety), the
        writer holds the table's PTL (lock discipline; ``hw`` = a hardware A/D-bit update,
        which needs no lock), and — DH's suggested sanity check — that a table with
        refcount > 1 is not modified except for the young bit.
        """
        if not self.check_table_live(table, site):
            return
        if not hw and t is not None and not self.holds(t, self.pte_lockptr(mm, table)):
            self._report("lock-discipline", site, f"PTE write to table {table.pfn} without its PTL")
        if isinstance(new, int | np.integer):
            new = np.array([new], dtype=np.int64)
        old = table.entries[lo:lo + len(new)]
        if table.refcount > 1:
            changed = (old ^ new) & ~np.int64(PTE_YOUNG)
            if changed.any():
                self._report("shared-table-write", site,
                             f"modified {int(np.count_nonzero(changed))} PTE(s) of table "
                             f"{table.pfn} shared by {table.refcount} PMDs")
        table.entries[lo:lo + len(new)] = new

    def get_pages(self, pfns: np.ndarray, n: int = 1) -> None:
        """``get_page`` / ``folio_ref_add`` on each pfn."""
        np.add.at(self.pool.refcount, pfns, n)

    def put_pages(self, pfns: np.ndarray, site: str) -> None:
        """``put_page`` on each pfn; frees pages whose refcount reaches 0."""
        if len(pfns) == 0:
            return
        pool = self.pool
        bad = pfns[(pool.flags[pfns] & 1) == 0]
        if len(bad):
            self._report("memory-safety", site, f"put_page on free page {int(bad[0])}")
            pfns = pfns[(pool.flags[pfns] & 1) != 0]
        np.subtract.at(pool.refcount, pfns, 1)
        rc = pool.refcount[pfns]
        if (rc < 0).any():
            self._report("memory-safety", site,
                         f"refcount underflow on page {int(pfns[rc < 0][0])}")
        dead = np.unique(pfns[rc <= 0])
        if len(dead):
            self.free_pages(dead, site)

    def put_page(self, pfn: int, site: str) -> None:
        """``put_page`` on one page (scalar fast path of :meth:`put_pages`)."""
        pool = self.pool
        if not int(pool.flags[pfn]) & 1:
            self._report("memory-safety", site, f"put_page on free page {pfn}")
            return
        rc = int(pool.refcount[pfn]) - 1
        pool.refcount[pfn] = rc
        if rc < 0:
            self._report("memory-safety", site, f"refcount underflow on page {pfn}")
        if rc <= 0:
            self.free_pages(np.array([pfn], dtype=np.int64), site)

    def free_pages(self, pfns: np.ndarray, site: str) -> None:
        """``free_unref_page``: drop from LRU, release swap-less state, return to pool."""
        pool = self.pool
        mapped = pfns[pool.mapcount[pfns] > 0]
        if len(mapped):
            p = int(mapped[0])
            self._report("memory-safety", site, f"page {p} freed while mapped "
                         f"{int(pool.mapcount[p])} time(s)")
        for p in pfns[pool.shmem[pfns] >= 0].tolist():
            obj = self.shmem.get(int(pool.shmem[p]))
            if obj is not None and obj.pages.get(int(pool.index[p])) == p:
                del obj.pages[int(pool.index[p])]
        pool.refcount[pfns] = 0
        pool.give_back(pfns)
        self.cost.charge("page_free", len(pfns))

    def page_remove_rmap(self, pfns: np.ndarray, site: str) -> None:
        """``page_remove_rmap`` on each pfn; a negative mapcount is ``print_bad_pte``."""
        if len(pfns) == 0:
            return
        np.subtract.at(self.pool.mapcount, pfns, 1)
        mc = self.pool.mapcount[pfns]
        if (mc < 0).any():
            p = int(pfns[mc < 0][0])
            self._report("accounting", site, f"Bad page map: mapcount of page {p} is "
                         f"{int(self.pool.mapcount[p])}")

    def page_add_new_anon_rmap(self, pfn: int, vma: Vma, vpn: int) -> None:
        """``page_add_new_anon_rmap``: mapcount 1, exclusive, linked to vma's anon_vma."""
        pool = self.pool
        pool.mapcount[pfn] = 1
        pool.flags[pfn] |= PG_anon | PG_anon_exclusive | PG_swapbacked
        assert vma.anon_vma is not None
        pool.anon_vma[pfn] = vma.anon_vma.id
        pool.index[pfn] = vpn
        pool.lru_add([pfn])

    def anon_vma_prepare(self, vma: Vma) -> None:
        """``anon_vma_prepare``: give the VMA its own anon_vma on first anon fault.

        Simplification: the anon_vma allocation itself cannot fail in the model.
        """
        if vma.anon_vma is None:
            av = AnonVma(self._id("anon_vma"))
            self.anon_vmas[av.id] = av
            av.vmas.append(vma)
            vma.anon_vma = av
            vma.chain.append(av)

    def is_anon(self, pfn: int) -> bool:
        """``PageAnon``."""
        return bool(int(self.pool.flags[pfn]) & PG_anon)

    def page_maybe_dma_pinned(self, pfns: np.ndarray) -> np.ndarray:
        """``page_maybe_dma_pinned`` for small folios: refcount >= GUP_PIN_COUNTING_BIAS."""
        return self.pool.refcount[pfns] >= GUP_PIN_COUNTING_BIAS

    # =================================================================================
    # COW PTE hooks (no-ops upstream; see cowpte.py)
    # =================================================================================
    def cow_fault_hook(self, t: Thread, vma: Vma, vpn: int, flags: int) -> Gen:
        """Before ``__pte_alloc`` in ``__handle_mm_fault``; returns a VM_FAULT code."""
        return (yield from _done(VM_FAULT_OK))

    def cow_swapin_hook(self, t: Thread, vma: Vma, vpn: int) -> Gen:
        """Before ``do_swap_page``; returns a VM_FAULT code."""
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

    def _user_access(self, t: Thread, addr: int, write: bool) -> Gen:
        """A user load/store at ``addr``: the MMU access, faulting until it succeeds.

        Returns the content token read (load), the token written (store), or -errno.
        The model has no TLB: the MMU walks the live page tables on every access.
        """
        mm = self.mm_of(t)
        vpn = addr // self.config.page_size
        t.fault_site = ""
        for _ in range(64):
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
            self.cost.begin_fault(t)
            ret = yield from self.do_user_addr_fault(t, mm, vpn,
                                                     FAULT_FLAG_WRITE if write else 0)
            self.cost.end_fault(t)
            if ret == VM_FAULT_SIGSEGV:
                return -EFAULT
            if ret == VM_FAULT_OOM:
                return -ENOMEM
        return -EAGAIN

    def sys_read(self, t: Thread, addr: int) -> Gen:
        """A user load. Returns the token read or -EFAULT/-ENOMEM."""
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
            # lock_vma_under_rcu: anonymous VMAs without anon_vma fall back (6.4), and so
            # does a VMA write-locked in the current mmap_lock write cycle.
            usable = vma is not None and (vma.anon_vma is not None or vma.shared)
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
        if orig & PTE_SWAP:
            ret = yield from self.cow_swapin_hook(t, vma, vpn)
            if ret != VM_FAULT_OK:
                return ret
            return (yield from self.do_swap_page(t, vma, vpn, orig, flags))
        if flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE):
            if not (orig & PTE_WRITE and pmd.write) or flags & FAULT_FLAG_UNSHARE:
                return (yield from self.do_wp_page(t, vma, vpn, orig, flags))
        # Spurious fault (e.g. PROT_NONE PTE after mprotect back): fix the entry.
        if not orig & PTE_USER and vma.flags & (VM_READ | VM_WRITE):
            got = yield from self.pte_offset_map_lock(t, mm, idx, "handle_pte_fault")
            if got is not None:
                table, ptl = got
                if int(table.entries[off]) == orig:
                    self.set_ptes(t, mm, table, off, orig | PTE_USER | PTE_YOUNG,
                                  "handle_pte_fault")
                self.unlock(t, ptl, WRITE, "handle_pte_fault")
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
        self.unlock(t, ptl, WRITE, "do_shared_fault")
        return VM_FAULT_OK

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
                self.set_ptes(t, mm, table, off, orig | PTE_WRITE | PTE_DIRTY | PTE_YOUNG,
                              "wp_page_shared")
            self.unlock(t, ptl, WRITE, "do_wp_page")
            return VM_FAULT_OK
        if pfn != ZERO_PFN and self.is_anon(pfn):
            fl = int(pool.flags[pfn])
            if not fl & PG_anon_exclusive:
                self.cost.mark_fork_fault(t)  # fork made the page non-exclusive
            reuse = bool(fl & PG_anon_exclusive) or int(pool.refcount[pfn]) == 1
            if reuse:
                if not fl & PG_anon_exclusive:
                    # page_move_anon_rmap: the page now belongs to this VMA's anon_vma.
                    if vma.anon_vma is not None:
                        pool.anon_vma[pfn] = vma.anon_vma.id
                    pool.flags[pfn] |= PG_anon_exclusive
                if not unshare:
                    self.cost.charge("pte_write")
                    self.set_ptes(t, mm, table, off,
                                  orig | PTE_WRITE | PTE_DIRTY | PTE_YOUNG, "wp_page_reuse")
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
        self.set_ptes(t, mm, table, off, entry, "wp_page_copy")
        # ptep_clear_flush + set_pte_at; the new page's rmap, the old one's removal.
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

    def do_swap_page(self, t: Thread, vma: Vma, vpn: int, orig: int, flags: int) -> Gen:
        """``do_swap_page``: read the slot into a new page and map it exclusively.

        In the 6.4 per-VMA-lock mode swap-in returns ``VM_FAULT_RETRY``. Without a swap
        cache the new page is always exclusive (see memory.py).

        Lock contract: mmap_lock read; takes the PTL.
        """
        if flags & FAULT_FLAG_VMA_LOCK:
            return VM_FAULT_RETRY
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        slot = orig >> PFN_SHIFT
        t.fault_site = "do_swap_page"
        if vma.anon_vma is None:
            self.anon_vma_prepare(vma)
        pfn = self.alloc_page("do_swap_page")
        if pfn is None:
            return VM_FAULT_OOM
        self.pool.content[pfn] = self.swap.data[slot]
        self.cost.charge("page_alloc")
        self.cost.charge("swap_io")
        yield "do_swap_page:read"
        got = yield from self.pte_offset_map_lock(t, mm, idx, "do_swap_page")
        if got is None or int(got[0].entries[off]) != orig:
            if got is not None:
                self.unlock(t, got[1], WRITE, "do_swap_page")
            self.put_page(pfn, "do_swap_page")
            return VM_FAULT_OK
        table, ptl = got
        mm.rss[MM_SWAPENTS] -= 1
        mm.rss[MM_ANONPAGES] += 1
        self.swap_free(slot, "do_swap_page")
        self.page_add_new_anon_rmap(pfn, vma, vpn)
        # folio_free_swap: with the slot released, memory holds the only copy of the
        # data, so the folio is marked dirty (mm/swapfile.c).
        self.pool.flags[pfn] |= PG_dirty
        write = bool(flags & FAULT_FLAG_WRITE) and bool(vma.flags & VM_WRITE)
        entry = mk_pte(pfn, write=write, dirty=write, young=True,
                       user=bool(vma.flags & (VM_READ | VM_WRITE)))
        self.cost.charge("page_account")
        self.cost.charge("pte_write")
        self.set_ptes(t, mm, table, off, entry, "do_swap_page")
        self.unlock(t, ptl, WRITE, "do_swap_page")
        return VM_FAULT_OK

    def swap_free(self, slot: int, site: str, n: int = 1) -> None:
        """``swap_free``/``free_swap_and_cache``: drop swap_map references."""
        self.swap.swap_map[slot] -= n
        if self.swap.swap_map[slot] < 0:
            self._report("accounting", site, f"swap_map underflow on slot {slot}")
            self.swap.swap_map[slot] = 0
        if self.swap.swap_map[slot] == 0:
            self.swap.free_slot(slot)

    # =================================================================================
    # mmap / munmap / mprotect / madvise
    # =================================================================================
    def _vpn_range(self, addr: int, length: int) -> tuple[int, int]:
        ps = self.config.page_size
        return addr // ps, (addr + length) // ps

    def split_vma(self, mm: MmStruct, vma: Vma, at: int) -> Vma:
        """``__split_vma``: split ``vma`` at page ``at``; returns the upper part.

        Lock contract: mmap_lock write. The new VMA joins every anon_vma of the old one
        (``anon_vma_clone``).
        """
        new = Vma(self._id("vma"), mm, at, vma.end, vma.flags, vma.shmem,
                  vma.pgoff + (at - vma.start))
        self.get_file(new.shmem)
        new.anon_vma = vma.anon_vma
        new.chain = list(vma.chain)
        for av in vma.chain:
            av.vmas.append(new)
        new.lock_seq = vma.lock_seq
        vma.end = at
        mm.insert_vma(new)
        return new

    def vma_split_range(self, t: Thread, mm: MmStruct, start: int, end: int) -> Gen:
        """Write-lock the VMAs overlapping ``[start, end)``, then split at its boundaries.

        Returns the VMAs inside. ``vma_start_write`` comes first because ``__split_vma``
        write-locks the VMA it shrinks and the new one (mm/mmap.c), so a
        fault holding the old VMA's read lock (per-VMA-lock mode) finishes before the
        boundary moves under it.

        Lock contract: mmap_lock write.
        """
        for v in mm.vmas_in(start, end):
            yield from self.vma_start_write(t, v)
        return self._split_range(t, mm, start, end)

    def _split_range(self, t: Thread, mm: MmStruct, start: int, end: int) -> list[Vma]:
        """Split VMAs at ``start``/``end``; return the VMAs inside ``[start, end)``."""
        for v in mm.vmas_in(start, end):
            if v.start < start < v.end:
                self.split_vma(mm, v, start)
        for v in mm.vmas_in(start, end):
            if v.start < end < v.end:
                self.split_vma(mm, v, end)
        return mm.vmas_in(start, end)

    def sys_mmap(self, t: Thread, addr: int, length: int, prot: str = "rw",
                 shared: bool = False, populate: bool = False) -> Gen:
        """``mmap(addr, length, prot, MAP_FIXED|MAP_ANONYMOUS|MAP_PRIVATE/SHARED)``.

        Existing mappings in the range are unmapped first (MAP_FIXED). ``populate``
        models MAP_POPULATE (``__mm_populate`` under mmap_lock read).

        Lock contract: mmap_lock write (read for the populate phase).
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        yield from self.lock(t, mm.mmap_lock, WRITE, "do_mmap")
        if mm.vmas_in(start, end):
            yield from self.do_vmi_munmap(t, mm, start, end, downgrade=False)
        bits = parse_prot(prot)
        flags = VM_MAYWRITE | (VM_READ if bits & 1 else 0) | (VM_WRITE if bits & 2 else 0)
        obj = None
        if shared:
            flags |= VM_SHARED
            obj = ShmemObject(self._id("shmem"), end - start)
            self.shmem[obj.id] = obj
        vma = Vma(self._id("vma"), mm, start, end, flags, obj, 0)
        self.get_file(obj)
        mm.insert_vma(vma)
        if self.oracle is not None:
            self.oracle.on_mmap(mm, start, end, bits, obj.id if obj else None)
        self.mmap_write_unlock(t, mm, "do_mmap")
        if populate:
            yield "do_mmap:populate"
            yield from self.lock(t, mm.mmap_lock, READ, "__mm_populate")
            # __mm_populate (mm/gup.c) works on the *range*: it looks the VMAs up again
            # under the read lock, since the one just created may have been split,
            # unmapped or replaced while no lock was held.
            ret = 0
            for v in mm.vmas_in(start, end):
                ret = yield from self.populate_range(t, mm, v, max(start, v.start),
                                                     min(end, v.end))
                if ret:
                    break
            self.unlock(t, mm.mmap_lock, READ, "__mm_populate")
            if ret:
                return ret
        return addr

    def populate_range(self, t: Thread, mm: MmStruct, vma: Vma, start: int, end: int) -> Gen:
        """``populate_vma_page_range`` for a private writable anon VMA, vectorised per table.

        Every ``pte_none`` entry gets a fresh exclusive page, exactly as a write fault through
        ``do_anonymous_page`` would leave it. Other VMAs fault page by page.

        Lock contract: mmap_lock read.
        """
        if vma.detached:
            return 0
        if vma.shared or not vma.flags & VM_WRITE:
            for vpn in range(start, end):
                ret = yield from self.handle_mm_fault(
                    t, vma, vpn, FAULT_FLAG_WRITE if vma.flags & VM_WRITE else 0)
                if ret == VM_FAULT_OOM:
                    return -ENOMEM
            return 0
        self.anon_vma_prepare(vma)
        pool = self.pool
        P = self.P
        for idx in range(start // P, (end - 1) // P + 1):
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            ret = yield from self.cow_break_for_walker(t, vma, idx, "populate_range")
            if ret:
                return -ENOMEM
            if idx not in mm.pmd:
                table = self.pte_alloc_one(mm, "__pte_alloc")
                if table is None:
                    return -ENOMEM
                yield from self.lock(t, mm.page_table_lock, WRITE, "pmd_install")
                self.pmd_populate(mm, idx, table)
                self.unlock(t, mm.page_table_lock, WRITE, "pmd_install")
            got = yield from self.pte_offset_map_lock(t, mm, idx, "populate_range")
            if got is None:
                continue
            table, ptl = got
            seg = table.entries[lo:hi]
            none = np.nonzero(seg == 0)[0]
            if len(none):
                pfns = self.alloc_pages(len(none), "populate_range")
                if pfns is None:
                    self.unlock(t, ptl, WRITE, "populate_range")
                    return -ENOMEM
                vpns = idx * P + lo + none
                pool.mapcount[pfns] = 1
                pool.flags[pfns] |= PG_anon | PG_anon_exclusive | PG_swapbacked
                pool.anon_vma[pfns] = vma.anon_vma.id
                pool.index[pfns] = vpns
                pool.lru_add(pfns)
                new = seg.copy()
                new[none] = ((pfns << PFN_SHIFT) | PTE_PRESENT | PTE_WRITE | PTE_DIRTY
                             | PTE_YOUNG | PTE_USER)
                self.set_ptes(t, mm, table, lo, new, "populate_range")
                mm.rss[MM_ANONPAGES] += len(none)
                for c in ("page_alloc", "page_zero", "page_account", "pte_write"):
                    self.cost.charge(c, len(none))
            self.unlock(t, ptl, WRITE, "populate_range")
            yield "populate_range:table_done"
        return 0

    def sys_munmap(self, t: Thread, addr: int, length: int) -> Gen:
        """``munmap``: detach VMAs under the write lock, then downgrade to read for the zap.

        Detach VMAs under the write lock, then downgrade to read for ``unmap_region``
        (zap + ``free_pgtables``), as ``do_vmi_align_munmap`` does.

        Lock contract: mmap_lock write, downgraded to read.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        yield from self.lock(t, mm.mmap_lock, WRITE, "do_vmi_munmap")
        ret = yield from self.do_vmi_munmap(t, mm, start, end, downgrade=True)
        self.unlock(t, mm.mmap_lock, READ, "do_vmi_munmap")
        return ret

    def do_vmi_munmap(self, t: Thread, mm: MmStruct, start: int, end: int,
                      downgrade: bool) -> Gen:
        """``do_vmi_munmap``.

        With ``downgrade`` the caller's write lock becomes a read lock before the zap (the
        caller then releases READ).
        """
        vmas = yield from self.vma_split_range(t, mm, start, end)
        for v in vmas:
            mm.vmas.remove(v)
            v.detached = True
        if self.oracle is not None:
            self.oracle.on_munmap_begin(mm, start, end)
        if downgrade:
            self.mmap_write_downgrade(t, mm)
            yield "do_vmi_munmap:downgraded"
        yield from self.unmap_region(t, mm, vmas)
        for v in vmas:
            self.fput(v.shmem)  # remove_vma
        if self.oracle is not None:
            self.oracle.on_munmap(mm, start, end)
        return 0

    def get_file(self, obj: ShmemObject | None) -> None:
        """``get_file``: a new VMA (mmap, split, ``dup_mmap``) references its shmem file."""
        if obj is not None:
            self.shmem_users[obj.id] = self.shmem_users.get(obj.id, 0) + 1

    def fput(self, obj: ShmemObject | None) -> None:
        """``fput`` from ``remove_vma``: drop a VMA's reference on its shmem file.

        The last reference releases the shmem inode: ``shmem_evict_inode`` →
        ``shmem_truncate_range`` drops the page cache's
        reference on every page (mm/shmem.c, mm/truncate.c); a page still pinned lives
        on until it is unpinned. Nothing maps the object any more at this point.
        """
        if obj is None:
            return
        n = self.shmem_users.get(obj.id, 0) - 1
        if n > 0:
            self.shmem_users[obj.id] = n
            return
        self.shmem_users.pop(obj.id, None)
        self.shmem.pop(obj.id, None)
        pages = np.array([obj.pages[i] for i in sorted(obj.pages)], dtype=np.int64)
        obj.pages.clear()
        self.put_pages(pages, "shmem_undo_range")

    def unmap_region(self, t: Thread, mm: MmStruct, vmas: list[Vma]) -> Gen:
        """``unmap_region``: ``unmap_vmas`` then ``free_pgtables``.

        Lock contract: mmap_lock held (read after a downgrade); the VMAs are detached.
        """
        for v in vmas:
            yield from self.zap_page_range(t, v, v.start, v.end)
        yield from self.free_pgtables(t, mm, vmas)

    def free_pgtables(self, t: Thread, mm: MmStruct, vmas: list[Vma]) -> Gen:
        """``free_pgtables``: unlink the VMAs from rmap, then free the PTE tables left unused.

        Unlink the VMAs from rmap (``unlink_anon_vmas`` under the anon_vma write lock), then
        free every PTE table whose whole PMD range no remaining VMA covers (the floor/ceiling
        rule).

        Lock contract: mmap_lock held; takes anon_vma write locks and the PTL.
        """
        for v in vmas:
            for av in list(v.chain):
                yield from self.lock(t, av.root.lock, WRITE, "unlink_anon_vmas")
                if v in av.vmas:
                    av.vmas.remove(v)
                self.unlock(t, av.root.lock, WRITE, "unlink_anon_vmas")
            v.chain = []
        P = self.P
        idxs = sorted({i for v in vmas for i in range(v.start // P, (v.end - 1) // P + 1)})
        for idx in idxs:
            if mm.vmas_in(idx * P, (idx + 1) * P):
                continue
            pmd = mm.pmd.get(idx)
            if pmd is None:
                continue
            yield from self.free_pte_range(t, mm, idx, pmd)

    def free_pte_range(self, t: Thread, mm: MmStruct, idx: int, pmd: PmdEntry) -> Gen:
        """``free_pte_range``: clear the PMD, uncharge and free the table.

        Lock contract: mmap_lock held; the table is unreachable through rmap (VMAs
        unlinked). Upstream frees through the mmu_gather (RCU) so GUP-fast is safe.
        """
        table = pmd.table
        ptl = self.pte_lockptr(mm, table)
        yield from self.lock(t, ptl, WRITE, "free_pte_range")
        still_used = self.cow_free_table(t, mm, idx, pmd)
        if mm.pmd.get(idx) is pmd:
            del mm.pmd[idx]
        mm.mm_dec_nr_ptes()
        self.cost.charge("pmd_update")
        self.unlock(t, ptl, WRITE, "free_pte_range")
        if not still_used:
            live = np.count_nonzero(table.entries)
            if live:
                self._report("accounting", "free_pte_range",
                             f"table {table.pfn} freed with {live} live entries")
            self.pte_free(table, "free_pte_range")

    def zap_page_range(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``zap_page_range_single``/``unmap_vmas`` → ``zap_pte_range`` per table.

        Lock contract: mmap_lock held (read suffices); takes each table's PTL.
        """
        mm = vma.mm
        P = self.P
        for idx in range(start // P, (end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            skip = yield from self.cow_zap_hook(t, vma, idx, lo, hi)
            if skip:
                continue
            got = yield from self.pte_offset_map_lock(t, mm, idx, "zap_pte_range")
            if got is None:
                continue
            table, ptl = got
            self.zap_pte_range(t, vma, table, idx, lo, hi)
            self.unlock(t, ptl, WRITE, "zap_pte_range")
            yield "zap_pte_range:table_done"
        self.cost.charge("tlb_flush_range")  # tlb_finish_mmu

    def zap_pte_range(self, t: Thread, vma: Vma, table: PteTable, idx: int, lo: int,
                      hi: int, clear: bool = True) -> None:
        """``zap_pte_range`` on entries ``[lo, hi)`` (vectorised).

        Present pages: ``page_remove_rmap``, rss--, page queued and freed after the
        flush; swap entries: ``free_swap_and_cache``, ``MM_SWAPENTS``--. With
        ``clear=False`` the entries are left in place (COW PTE v4's ``pte_is_shared``
        path) while the accounting is still done.

        Lock contract: the table's PTL held.
        """
        mm = vma.mm
        pool = self.pool
        e = table.entries[lo:hi]
        present = (e & PTE_PRESENT) != 0
        pfns = (e[present] >> PFN_SHIFT)
        pfns = pfns[pfns != ZERO_PFN]
        swaps = e[(e & PTE_SWAP) != 0] >> PFN_SHIFT
        if len(pfns):
            fl = pool.flags[pfns]
            anon = (fl & PG_anon) != 0
            shm = (fl & PG_shmem) != 0
            mm.rss[MM_ANONPAGES] -= int(anon.sum())
            mm.rss[MM_SHMEMPAGES] -= int(shm.sum())
            self.page_remove_rmap(pfns, "zap_pte_range")
        for s in swaps.tolist():
            self.swap_free(int(s), "zap_pte_range")
        mm.rss[MM_SWAPENTS] -= len(swaps)
        self.cost.charge("page_account", len(pfns) + len(swaps))
        if clear and e.any():
            self.cost.charge("pte_write", int(np.count_nonzero(e)))
            self.set_ptes(t, mm, table, lo, np.zeros(hi - lo, dtype=np.int64), "zap_pte_range")
        if len(pfns):
            self.put_pages(pfns, "zap_pte_range")

    def sys_mprotect(self, t: Thread, addr: int, length: int, prot: str) -> Gen:
        """``mprotect`` → ``mprotect_fixup`` → ``change_protection`` per VMA.

        Returns -ENOMEM if part of the range is unmapped (as the kernel does).

        Lock contract: mmap_lock write; takes each table's PTL.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        bits = parse_prot(prot)
        yield from self.lock(t, mm.mmap_lock, WRITE, "do_mprotect_pkey")
        covered = sum(min(v.end, end) - max(v.start, start) for v in mm.vmas_in(start, end))
        if covered != end - start:
            self.mmap_write_unlock(t, mm, "do_mprotect_pkey")
            return -ENOMEM
        vmas = yield from self.vma_split_range(t, mm, start, end)
        ret = yield from self.cow_mprotect_prepare(t, mm, start, end)
        if ret:
            self.mmap_write_unlock(t, mm, "do_mprotect_pkey")
            return ret
        if self.oracle is not None:
            self.oracle.on_mprotect_begin(mm, start, end, bits)
        for v in vmas:
            r = yield from self.change_protection(t, v, bits)
            if r < 0:
                ret = r
                break
            v.flags = (v.flags & ~(VM_READ | VM_WRITE)) | (VM_READ if bits & 1 else 0) | (
                VM_WRITE if bits & 2 else 0)
        if self.oracle is not None:
            if ret == 0:
                self.oracle.on_mprotect(t, mm, start, end, bits)
            else:
                self.oracle.on_mprotect_failed(mm, start, end, bits)
        self.mmap_write_unlock(t, mm, "do_mprotect_pkey")
        return ret

    def change_protection(self, t: Thread, vma: Vma, bits: int) -> Gen:
        """``change_protection`` → ``change_pte_range`` per table (vectorised).

        New permissions: USER iff PROT_READ or PROT_WRITE (x86 ``protection_map``:
        ``VM_WRITE`` alone is ``PAGE_COPY``, readable); WRITE only where PROT_WRITE and
        ``can_change_pte_writable`` (private: exclusive anon pages — the "mprotect()
        optimization" cow.c tests; shared: dirty PTEs); the zero page is never writable.
        Returns 0 or -errno.

        Lock contract: mmap_lock write; takes the PTL.
        """
        mm = vma.mm
        P = self.P
        pool = self.pool
        for idx in range(vma.start // P, (vma.end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            ret = yield from self.cow_break_for_walker(t, vma, idx, "change_pte_range")
            if ret:
                r = self.cow_change_prot_failed(t, vma, idx, ret)
                if r:
                    return r
                continue
            lo = max(vma.start, idx * P) - idx * P
            hi = min(vma.end, (idx + 1) * P) - idx * P
            got = yield from self.pte_offset_map_lock(t, mm, idx, "change_pte_range")
            if got is None:
                continue
            table, ptl = got
            e = table.entries[lo:hi]
            present = (e & PTE_PRESENT) != 0
            if present.any():
                new = e.copy()
                new[present] &= ~np.int64(PTE_WRITE | PTE_USER)
                if bits & 3:
                    new[present] |= PTE_USER
                if bits & 2:
                    pfn = e >> PFN_SHIFT
                    if vma.shared:
                        ok = present & ((e & PTE_DIRTY) != 0) & (pfn != ZERO_PFN)
                    else:
                        fl = pool.flags[np.where(present, pfn, 0)]
                        ok = present & (pfn != ZERO_PFN) & ((fl & PG_anon_exclusive) != 0)
                    new[ok] |= PTE_WRITE
                if (new != e).any():
                    self.cost.charge("pte_write", int(np.count_nonzero(new != e)))
                    self.set_ptes(t, mm, table, lo, new, "change_pte_range")
            self.unlock(t, ptl, WRITE, "change_pte_range")
            yield "change_pte_range:table_done"
        return 0

    def cow_change_prot_failed(self, t: Thread, vma: Vma, idx: int, err: int) -> int:
        """What mprotect does when ``break_cow_pte`` fails: overridden by cowpte."""
        return err

    def sys_madvise(self, t: Thread, addr: int, length: int, advice: str) -> Gen:
        """``madvise``: DONTNEED/FREE/PAGEOUT under mmap_lock read, the fork advice under write.

        DONTNEED/FREE/PAGEOUT run under mmap_lock read (``madvise_need_mmap_write`` is 0 for
        them); WIPEONFORK/KEEPONFORK/DONTFORK/DOFORK change vm_flags under write.

        Returns -ENOMEM if the range has holes, -EINVAL for advice not applicable.
        """
        mm = self.mm_of(t)
        start, end = self._vpn_range(addr, length)
        write = advice in ("WIPEONFORK", "KEEPONFORK", "DONTFORK", "DOFORK")
        mode = WRITE if write else READ
        yield from self.lock(t, mm.mmap_lock, mode, "do_madvise")
        vmas = mm.vmas_in(start, end)
        covered = sum(min(v.end, end) - max(v.start, start) for v in vmas)
        ret = 0
        if write:
            if covered == 0:
                ret = -ENOMEM
            elif advice == "WIPEONFORK" and any(v.shared for v in vmas):
                ret = -EINVAL  # madvise_vma_behavior: only private anonymous
            else:
                vmas = yield from self.vma_split_range(t, mm, start, end)
                for v in vmas:
                    if advice == "WIPEONFORK":
                        v.flags |= VM_WIPEONFORK
                    elif advice == "KEEPONFORK":
                        v.flags &= ~VM_WIPEONFORK
                    elif advice == "DONTFORK":
                        v.flags |= VM_DONTCOPY
                    else:
                        v.flags &= ~VM_DONTCOPY
                if self.oracle is not None:
                    self.oracle.on_madvise_flags(mm, start, end, advice)
                if covered != end - start:
                    ret = -ENOMEM
            self.mmap_write_unlock(t, mm, "do_madvise")
            return ret
        if self.oracle is not None:
            self.oracle.on_madvise_begin(mm, start, end, advice)
        for v in vmas:
            s, e = max(v.start, start), min(v.end, end)
            if advice == "DONTNEED":
                yield from self.zap_page_range(t, v, s, e)
            elif advice == "FREE":
                if v.shared:
                    ret = -EINVAL
                    continue
                yield from self.madvise_free_range(t, v, s, e)
            elif advice == "PAGEOUT":
                yield from self.madvise_pageout_range(t, v, s, e)
        if covered != end - start and ret == 0:
            ret = -ENOMEM
        if self.oracle is not None:
            self.oracle.on_madvise_end(mm, start, end, advice)
        self.unlock(t, mm.mmap_lock, READ, "do_madvise")
        return ret

    def madvise_free_range(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``madvise_free_pte_range`` (6.2), vectorised per table.

        Swap entries are dropped (``free_swap_and_cache``, so a later access reads
        zero). For present anon pages: a PG_dirty page shared with others
        (``folio_mapcount != 1``) is skipped; otherwise young/dirty are cleared in the
        PTE, PG_dirty is cleared and the folio is marked lazyfree (``!PG_swapbacked``).

        Lock contract: mmap_lock read; takes the PTL.
        """
        mm = vma.mm
        P = self.P
        pool = self.pool
        for idx in range(start // P, (end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            ret = yield from self.cow_madvise_break(t, vma, idx, "madvise_free_pte_range")
            if ret:
                continue  # v4: "goto next" on failure (the PMD is skipped)
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            got = yield from self.pte_offset_map_lock(t, mm, idx, "madvise_free_pte_range")
            if got is None:
                continue
            table, ptl = got
            e = table.entries[lo:hi]
            new = e.copy()
            swp = (e & PTE_SWAP) != 0
            if swp.any():
                for s in (e[swp] >> PFN_SHIFT).tolist():
                    self.swap_free(int(s), "madvise_free_pte_range")
                mm.rss[MM_SWAPENTS] -= int(swp.sum())
                new[swp] = 0
            pfn = np.where((e & PTE_PRESENT) != 0, e >> PFN_SHIFT, 0)
            fl = pool.flags[pfn]
            cand = (pfn != ZERO_PFN) & ((fl & PG_anon) != 0)
            skip = cand & ((fl & PG_dirty) != 0) & (pool.mapcount[pfn] != 1)
            sel = cand & ~skip
            if sel.any():
                new[sel] &= ~np.int64(PTE_DIRTY | PTE_YOUNG)
                ps = pfn[sel]
                pool.flags[ps] &= ~np.int64(PG_dirty | PG_swapbacked)
            if (new != e).any():
                self.cost.charge("pte_write", int(np.count_nonzero(new != e)))
                self.set_ptes(t, mm, table, lo, new, "madvise_free_pte_range")
            self.unlock(t, ptl, WRITE, "madvise_free_pte_range")
            yield "madvise_free_pte_range:table_done"
        return 0

    def cow_madvise_break(self, t: Thread, vma: Vma, idx: int, site: str) -> Gen:
        """MADV_FREE's ``break_cow_pte`` (cowpte may skip it: walker-skips-break)."""
        return (yield from self.cow_break_for_walker(t, vma, idx, site))

    def madvise_pageout_range(self, t: Thread, vma: Vma, start: int, end: int) -> Gen:
        """``madvise_cold_or_pageout_pte_range`` + ``reclaim_pages``: reclaim unshared pages.

        Isolate every present anon page mapped only here (``folio_mapcount == 1``) and
        reclaim it ignoring references.

        Lock contract: mmap_lock read; takes the PTL, then reclaim takes anon_vma locks.
        """
        mm = vma.mm
        P = self.P
        pool = self.pool
        isolated: list[int] = []
        for idx in range(start // P, (end - 1) // P + 1):
            if idx not in mm.pmd:
                continue
            ret = yield from self.cow_break_for_walker(t, vma, idx, "madvise_cold_or_pageout")
            if ret:
                # v4: madvise_cold_or_pageout_pte_range "return 0" on failure: this PMD
                # is skipped and walk_page_range goes on with the next one.
                continue
            lo = max(start, idx * P) - idx * P
            hi = min(end, (idx + 1) * P) - idx * P
            got = yield from self.pte_offset_map_lock(t, mm, idx, "madvise_cold_or_pageout")
            if got is None:
                continue
            table, ptl = got
            e = table.entries[lo:hi]
            pfn = np.where((e & PTE_PRESENT) != 0, e >> PFN_SHIFT, 0)
            fl = pool.flags[pfn]
            sel = (pfn != ZERO_PFN) & ((fl & PG_anon) != 0) & (pool.mapcount[pfn] == 1) & (
                pool.lru_seq[pfn] >= 0)
            for p in pfn[sel].tolist():
                self.folio_isolate_lru(p)
                isolated.append(p)
            self.unlock(t, ptl, WRITE, "madvise_cold_or_pageout")
        for p in isolated:
            yield from self.shrink_folio(t, p, ignore_references=True)
        return 0

    # =================================================================================
    # fork / clone / exit / prctl
    # =================================================================================
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

    def anon_vma_fork(self, t: Thread, vma: Vma, pvma: Vma) -> Gen:
        """``anon_vma_fork``: link the child VMA into every anon_vma of the parent's.

        Then give it its own anon_vma (same root) for pages it faults in later.

        Lock contract: mmap_lock write; takes the root anon_vma's rwsem for write
        (``anon_vma_clone`` → ``lock_anon_vma_root``, then ``anon_vma_lock_write``), so
        fork waits for rmap walkers (reclaim) of the parent's pages to finish.
        """
        root = pvma.anon_vma.root if pvma.anon_vma is not None else None
        if root is not None:
            yield from self.lock(t, root.lock, WRITE, "anon_vma_fork")
        for av in pvma.chain:
            av.vmas.append(vma)
            vma.chain.append(av)
        av = AnonVma(self._id("anon_vma"), root)
        self.anon_vmas[av.id] = av
        av.vmas.append(vma)
        vma.chain.append(av)
        vma.anon_vma = av
        if root is not None:
            self.unlock(t, root.lock, WRITE, "anon_vma_fork")

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
            if status == "copy":
                local = cow and not whole
                if local:
                    src_mm.write_protect_seq += 1
                ret = yield from self.copy_pte_range(t, dst, src, idx, resume, hi)
                if local:
                    src_mm.write_protect_seq += 1
                if ret:
                    break
        if whole:
            src_mm.write_protect_seq += 1
        return ret

    def cow_fork_seq_brackets_sharing(self, src_mm: MmStruct) -> bool:
        """Whether fork's ``write_protect_seq`` section also covers COW PTE sharing."""
        return True

    def copy_pte_range(self, t: Thread, dst_vma: Vma, src_vma: Vma, idx: int, lo: int,
                       hi: int) -> Gen:
        """``copy_pte_range`` for entries ``[lo, hi)`` of PMD ``idx`` (vectorised).

        Per entry, as ``copy_present_pte``/``copy_nonpresent_pte``: swap entries get
        ``swap_duplicate`` and lose ``pte_swp_exclusive``; anon pages get
        ``page_try_dup_anon_rmap`` (clears PageAnonExclusive) unless they may be
        DMA-pinned (``page_needs_cow_for_dma``), in which case the child gets an eager
        copy (``copy_present_page``); COW mappings are write-protected in both; the
        child's PTE is made old. Between checking for pins and committing there is a
        preemption point: the PTLs are held, but lockless GUP-fast on another CPU may
        run there (that is why ``write_protect_seq`` exists).

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
        got = yield from self.pte_offset_map_lock(t, src_mm, idx, "copy_pte_range")
        if got is None:
            self.unlock(t, dst_ptl, WRITE, "copy_pte_range")
            return 0
        src_t, src_ptl = got
        ret = yield from self.copy_pte_entries(t, dst_vma, src_vma, dst_t, src_t, lo, hi)
        self.unlock(t, src_ptl, WRITE, "copy_pte_range")
        self.unlock(t, dst_ptl, WRITE, "copy_pte_range")
        yield "copy_pte_range:table_done"
        return ret

    def copy_pte_entries(self, t: Thread, dst_vma: Vma, src_vma: Vma, dst_t: PteTable,
                         src_t: PteTable, lo: int, hi: int,
                         dst_mm: MmStruct | None = None) -> Gen:
        """The per-entry body of ``copy_pte_range`` over ``[lo, hi)``.

        That is ``copy_present_pte`` and ``copy_nonpresent_pte``. ``dst_t`` may be ``src_t``
        (COW PTE v4 calls it with ``dst_pte == src_pte``).

        Lock contract: the src (and dst) PTL held. Returns 0, -ENOMEM, or -EAGAIN
        (only when ``dst_t is src_t``: a page may be pinned, so the table cannot be
        shared — ``page_try_dup_anon_rmap`` failed). ``dst_mm`` overrides the mm rss
        is charged to (COW PTE passes ``dst_vma == src_vma`` and the child's mm).
        """
        src_mm = src_vma.mm
        dst_mm = dst_mm or dst_vma.mm
        pool = self.pool
        e = src_t.entries[lo:hi].copy()
        if not e.any():
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
        if pinned.any() and dst_t is src_t:
            # v4 processes entry by entry and stops at the first maybe-pinned page; the
            # vectorised model checks the whole range first and processes none of it,
            # so recovery starts at ``lo`` (the entries before the pinned one are then
            # copied by the copy_pte_range fallback, with the same accounting).
            return -EAGAIN
        yield "copy_present_pte:checked"
        # Re-read: entries may have changed only through lockless paths (hardware A/D).
        e = src_t.entries[lo:hi].copy()
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
        for i in np.nonzero(pinned)[0].tolist():
            new = self.alloc_page("copy_present_page")
            if new is None:
                err = -ENOMEM
                e, dst, present, pfn = e[:i], dst[:i], present[:i], pfn[:i]
                normal, anon, shm, pinned = normal[:i], anon[:i], shm[:i], pinned[:i]
                break
            pool.content[new] = pool.content[int(pfn[i])]
            for c in ("page_alloc", "page_copy", "page_account"):
                self.cost.charge(c)
            self.page_add_new_anon_rmap(new, dst_vma, int(pool.index[int(pfn[i])]))
            dst[i] = mk_pte(new, write=bool(dst_vma.flags & VM_WRITE), dirty=True,
                            young=True, user=bool(e[i] & PTE_USER))
            dst_mm.rss[MM_ANONPAGES] += 1
        share = normal & ~pinned
        sp = pfn[share]
        if len(sp):
            self.get_pages(sp)
            np.add.at(pool.mapcount, sp, 1)
            pool.flags[pfn[share & anon]] &= ~np.int64(PG_anon_exclusive)
        dst_mm.rss[MM_ANONPAGES] += int((share & anon).sum())
        dst_mm.rss[MM_SHMEMPAGES] += int((share & shm).sum())
        swp = (e & PTE_SWAP) != 0
        # copy_present_pte / copy_nonpresent_pte: every entry copied, every page and
        # swap entry accounted (get_page + page_try_dup_anon_rmap + rss, swap_duplicate).
        self.cost.charge("fork_pte_copy", int(np.count_nonzero(e)))
        self.cost.charge("fork_page_account", len(sp) + int(swp.sum()))
        if swp.any():
            for s in (e[swp] >> PFN_SHIFT).tolist():
                self.swap.swap_map[s] += 1
            dst_mm.rss[MM_SWAPENTS] += int(swp.sum())
        src_new = e.copy()
        src_new[swp] &= ~np.int64(PTE_SWP_EXCLUSIVE)
        if cow:
            src_new[share] &= ~np.int64(PTE_WRITE)
        mask = share | swp
        dst[mask] = src_new[mask]
        dst[share] &= ~np.int64(PTE_YOUNG)
        if dst_vma.shared:
            dst[share] &= ~np.int64(PTE_DIRTY)
        if dst_t is src_t:
            # COW PTE: one entry serves both; the parent's PTE is made old/clean too.
            if (dst != e).any():
                self.set_ptes(t, src_mm, src_t, lo, dst, "copy_present_pte")
        elif len(e):
            if (src_new != e).any():
                self.set_ptes(t, src_mm, src_t, lo, src_new, "copy_present_pte")
            self.set_ptes(t, dst_mm, dst_t, lo, dst, "copy_present_pte")
        return err

    def sys_exit(self, t: Thread) -> Gen:
        """``do_exit``: the last thread of a process runs ``exit_mmap`` (``mmput``).

        It then releases the process's pins (the device objects are closed after the mm).
        """
        p = self.procs[t.pid]
        mm = p.mm
        p.tids.remove(t.tid)
        mm.users -= 1
        if mm.users == 0:
            p.alive = False
            yield from self.exit_mmap(t, mm)
            for pin in [x for _, x in sorted(self.pins.items()) if x.pid == p.pid]:
                self._unpin(pin)
            if self.oracle is not None:
                self.oracle.on_exit(mm)
        t.exited = True
        return 0

    def exit_mmap(self, t: Thread, mm: MmStruct) -> Gen:
        """``exit_mmap``: zap under mmap_lock read, free and remove under write, ``check_mm``.

        Zap every VMA under mmap_lock read, then ``free_pgtables`` and remove the VMAs under
        the write lock; finally ``check_mm``.

        Lock contract: takes mmap_lock read, then write.
        """
        yield from self.lock(t, mm.mmap_lock, READ, "exit_mmap")
        vmas = list(mm.vmas)
        for v in vmas:
            yield from self.zap_page_range(t, v, v.start, v.end)
        self.unlock(t, mm.mmap_lock, READ, "exit_mmap")
        yield from self.lock(t, mm.mmap_lock, WRITE, "exit_mmap")
        for v in vmas:
            v.detached = True
        mm.vmas = []
        yield from self.free_pgtables(t, mm, vmas)
        # Tables the VMAs never covered (should not exist) are freed too.
        for idx in sorted(mm.pmd):
            yield from self.free_pte_range(t, mm, idx, mm.pmd[idx])
        for v in vmas:
            self.fput(v.shmem)  # remove_vma
        self.mmap_write_unlock(t, mm, "exit_mmap")
        mm.dead = True
        self.check_mm(mm)

    def check_mm(self, mm: MmStruct) -> None:
        """``check_mm``: "BUG: Bad rss-counter state" and "non-zero pgtables_bytes"."""
        from .mm import MM_COUNTER_NAMES

        for i, name in enumerate(MM_COUNTER_NAMES):
            if mm.rss[i] != 0:
                self._report("accounting", "check_mm",
                             f"Bad rss-counter state mm{mm.id} type:{name} val:{mm.rss[i]}")
        if mm.pgtables_bytes() != 0:
            self._report("accounting", "check_mm",
                         f"non-zero pgtables_bytes on freeing mm{mm.id}: {mm.pgtables_bytes()}")

    # =================================================================================
    # GUP: pins (mm/gup.c)
    # =================================================================================
    def sys_pin(self, t: Thread, addr: int, write: bool = False, fast: bool = False) -> Gen:
        """``pin_user_pages[_fast]`` of one page with FOLL_PIN|FOLL_LONGTERM.

        GUP-fast: no locks; reads ``write_protect_seq`` (odd → slow path), reads the PTE,
        requires it present/accessible (writable for FOLL_WRITE) and, for R/O pins, an
        exclusive anon page (``gup_must_unshare``); grabs the pin, then re-checks the PTE
        and the seqcount and backs off on any change. Slow GUP: under mmap_lock read,
        ``follow_page_pte`` under the PTL, faulting (``FAULT_FLAG_WRITE`` or
        ``FAULT_FLAG_UNSHARE``) until the page can be pinned.

        Returns the pin id, or -errno.
        """
        mm = self.mm_of(t)
        vpn = addr // self.config.page_size
        mm.flags |= MMF_HAS_PINNED  # mm_set_has_pinned_flag
        if fast:
            pin = yield from self.gup_fast(t, mm, vpn, write)
            if pin is not None:
                return pin
            yield "gup_fast:fallback"
        yield from self.lock(t, mm.mmap_lock, READ, "__get_user_pages")
        ret = -EFAULT
        for _ in range(16):
            vma = mm.find_vma(vpn)
            # mm/gup.c check_vma_flags(): FOLL_WRITE needs VM_WRITE, a read needs VM_READ.
            if vma is None or (write and not vma.flags & VM_WRITE) or (
                    not write and not vma.flags & VM_READ):
                ret = -EFAULT
                break
            r = yield from self.follow_page_pte(t, vma, vpn, write)
            if isinstance(r, int) and r > 0:
                ret = r
                break
            flags = FAULT_FLAG_WRITE if write else (FAULT_FLAG_UNSHARE if r == "unshare" else 0)
            self.cost.begin_fault(t)
            fr = yield from self.handle_mm_fault(t, vma, vpn, flags)
            self.cost.end_fault(t, entry_exit=False)
            if fr == VM_FAULT_OOM:
                ret = -ENOMEM
                break
            if fr == VM_FAULT_SIGSEGV:
                ret = -EFAULT
                break
        self.unlock(t, mm.mmap_lock, READ, "__get_user_pages")
        return ret

    def follow_page_pte(self, t: Thread, vma: Vma, vpn: int, write: bool) -> Gen:
        """``follow_page_pte`` + ``try_grab_page``: returns a pin id, or the fault needed.

        Returns ``"fault"`` / ``"unshare"`` when a fault is needed first.

        Lock contract: mmap_lock read; takes the PTL.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        got = yield from self.pte_offset_map_lock(t, mm, idx, "follow_page_pte")
        if got is None:
            return "fault"
        table, ptl = got
        pmd = mm.pmd[idx]
        pte = int(table.entries[off])
        need: str | None = None
        if not pte & PTE_PRESENT or not pte & PTE_USER:
            need = "fault"
        elif write and not (pte & PTE_WRITE and pmd.write):
            need = "fault"
        else:
            pfn = pte >> PFN_SHIFT
            if pfn == ZERO_PFN:
                # FOLL_LONGTERM R/O pin of the zero page: fault in a real page instead
                # (the model treats it as an unshare; see README).
                need = "unshare"
            elif not write and self.is_anon(pfn) and not (
                    int(self.pool.flags[pfn]) & PG_anon_exclusive):
                need = "unshare"  # gup_must_unshare
        if need is not None:
            self.unlock(t, ptl, WRITE, "follow_page_pte")
            return need
        pfn = pte >> PFN_SHIFT
        pin = self._grab_pin(t, mm, vpn, pfn, write)
        self.unlock(t, ptl, WRITE, "follow_page_pte")
        return pin

    def _grab_pin(self, t: Thread, mm: MmStruct, vpn: int, pfn: int, write: bool) -> int:
        """``try_grab_page(FOLL_PIN)``: refcount += GUP_PIN_COUNTING_BIAS."""
        self.pool.refcount[pfn] += GUP_PIN_COUNTING_BIAS
        self.pool.pincount[pfn] += 1
        pid = self._id("pin")
        pin = Pin(self.procs[t.pid].pid, pid, mm, vpn, pfn, write)
        self.pins[pid] = pin
        if self.oracle is not None:
            self.oracle.on_pin(pin)
        return pid

    def gup_fast(self, t: Thread, mm: MmStruct, vpn: int, write: bool) -> Gen:
        """``lockless_pages_from_mm``: :meth:`gup_pte_range` with IRQs disabled.

        While any walker is inside its ``local_irq_save`` section, page tables freed
        meanwhile stay allocated (``tlb_remove_table`` waits for the grace period / IPI).
        """
        self.gup_fast_walkers += 1
        try:
            return (yield from self.gup_pte_range(t, mm, vpn, write))
        finally:
            self.gup_fast_walkers -= 1
            if not self.gup_fast_walkers and self.deferred_tables:
                pfns = np.array(sorted(tb.pfn for tb in self.deferred_tables), dtype=np.int64)
                self.deferred_tables = []
                self.pool.refcount[pfns] = 0
                self.pool.give_back(pfns)

    def gup_pte_range(self, t: Thread, mm: MmStruct, vpn: int, write: bool) -> Gen:
        """``gup_pte_range`` for one page, IRQs off; returns a pin id or None = fall back."""
        seq = mm.write_protect_seq
        if seq & 1:
            return None
        pmd = mm.pmd.get(vpn // self.P)
        if pmd is None or (write and not pmd.write):
            return None
        table = pmd.table
        pmd_write = pmd.write
        off = vpn % self.P
        pte = int(table.entries[off])
        yield "gup_fast:pte_read"
        if table.freed:
            if not any(tb is table for tb in self.deferred_tables):
                self._report("memory-safety", "gup_pte_range",
                             f"GUP-fast walked freed page table {table.pfn}")
            return None  # unlinked but not yet freed: the PMD re-check fails
        if not pte & PTE_PRESENT or not pte & PTE_USER or (write and not pte & PTE_WRITE):
            return None
        pfn = pte >> PFN_SHIFT
        if pfn == ZERO_PFN or self.pool.is_free(pfn):
            return None
        if not write and self.is_anon(pfn) and not (int(self.pool.flags[pfn]) & PG_anon_exclusive):
            return None  # gup_must_unshare
        # try_grab_folio
        self.pool.refcount[pfn] += GUP_PIN_COUNTING_BIAS
        self.pool.pincount[pfn] += 1
        yield "gup_fast:grabbed"
        cur = mm.pmd.get(vpn // self.P)
        # gup_pte_range: the whole PMD value (table and write bit) and the PTE must be
        # unchanged.
        changed = (cur is None or cur.table is not table or cur.write != pmd_write
                   or int(table.entries[off]) != pte)
        if changed or mm.write_protect_seq != seq:
            # gup_put_folio: the page may have lost its last other reference meanwhile.
            self.pool.pincount[pfn] -= 1
            self.pool.refcount[pfn] -= GUP_PIN_COUNTING_BIAS - 1
            self.put_page(pfn, "gup_put_folio")
            return None
        self.pool.refcount[pfn] -= GUP_PIN_COUNTING_BIAS
        self.pool.pincount[pfn] -= 1
        return self._grab_pin(t, mm, vpn, pfn, write)

    def _unpin(self, pin: Pin) -> None:
        if not pin.active:
            return
        pin.active = False
        self.pool.pincount[pin.pfn] -= 1
        self.pool.refcount[pin.pfn] -= GUP_PIN_COUNTING_BIAS - 1
        self.put_page(pin.pfn, "unpin_user_page")
        if self.oracle is not None:
            self.oracle.on_unpin(pin)

    def _pin_of(self, t: Thread, pin: int) -> Pin | None:
        p = self.pins.get(pin)
        if p is None or not p.active or p.pid != t.pid:
            return None
        return p

    def sys_unpin(self, t: Thread, pin: int) -> Gen:
        """``unpin_user_page``. -EINVAL if the pin is not this process's."""
        p = self._pin_of(t, pin)
        if p is None:
            return (yield from _done(-EINVAL))
        self._unpin(p)
        return (yield from _done(0))

    def sys_dev_read(self, t: Thread, pin: int) -> Gen:
        """A device read (DMA) through a pin: the page's content token."""
        p = self._pin_of(t, pin)
        if p is None:
            return (yield from _done(-EINVAL))
        if self.pool.is_free(p.pfn):
            self._report("memory-safety", "dev_read", f"DMA from freed page {p.pfn}")
        val = int(self.pool.content[p.pfn])
        if self.oracle is not None:
            self.oracle.on_dev_read(p, val)
        return (yield from _done(val))

    def sys_dev_write(self, t: Thread, pin: int) -> Gen:
        """A device write (DMA) through a writable pin: a fresh token; -EPERM on R/O."""
        p = self._pin_of(t, pin)
        if p is None:
            return (yield from _done(-EINVAL))
        if not p.write:
            return (yield from _done(-1))
        if self.pool.is_free(p.pfn):
            self._report("memory-safety", "dev_write", f"DMA to freed page {p.pfn}")
        tok = self.new_token()
        self.pool.content[p.pfn] = tok
        self.pool.flags[p.pfn] |= PG_dirty
        if self.oracle is not None:
            self.oracle.on_dev_write(p, tok)
        return (yield from _done(tok))

    # =================================================================================
    # Reclaim (mm/vmscan.c, mm/rmap.c) — run by kswapd
    # =================================================================================
    def folio_isolate_lru(self, pfn: int) -> None:
        """``folio_isolate_lru``: off the LRU, +1 reference."""
        self.pool.lru_seq[pfn] = -1
        self.pool.refcount[pfn] += 1

    def folio_putback_lru(self, pfn: int) -> None:
        """``folio_putback_lru``: back on the LRU tail, drop the isolation reference."""
        if not self.pool.is_free(pfn):
            self.pool.lru_add([pfn])
        self.put_page(pfn, "folio_putback_lru")

    def sys_reclaim(self, t: Thread, nr: int = 1, pid: int = 0, addr: int = -1) -> Gen:
        """Reclaim as kswapd: ``shrink_inactive_list`` → ``shrink_folio_list`` over the anon LRU.

        Oldest first, until ``nr`` pages are reclaimed or the list was scanned once.

        ``pid``/``addr`` (a scenario convenience) move the anon page currently mapped
        there to the head of the LRU first, so that it is the next one scanned.

        Lock contract: no mmap_lock (rmap walkers take anon_vma and the PTL only).
        """
        pool = self.pool
        order = pool.lru_order()
        if pid and addr >= 0 and pid in self.procs:
            mm = self.procs[pid].mm
            w = mm.pmd.get(addr // self.config.page_size // self.P)
            if w is not None:
                pte = int(w.table.entries[(addr // self.config.page_size) % self.P])
                p = pte >> PFN_SHIFT
                if pte & PTE_PRESENT and p in order:
                    order.remove(p)
                    order.insert(0, p)
        reclaimed = 0
        for pfn in order:
            if reclaimed >= nr:
                break
            if not pool.on_lru(pfn) or not self.is_anon(pfn):
                continue
            self.folio_isolate_lru(pfn)
            yield "shrink_folio_list:isolated"
            ok = yield from self.shrink_folio(t, pfn, ignore_references=False)
            reclaimed += ok
        return reclaimed

    def shrink_folio(self, t: Thread, pfn: int, ignore_references: bool) -> Gen:
        """``shrink_folio_list`` for one isolated anon folio.

        Referenced → rotate; pinned → keep; lazyfree → discard via ``try_to_unmap``; else
        swap out.

        Returns 1 if the folio was freed. The isolation reference is dropped here.
        """
        pool = self.pool
        if not ignore_references:
            referenced = yield from self.folio_referenced(t, pfn)
            if referenced:
                self.folio_putback_lru(pfn)
                return 0
        if int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:
            self.folio_putback_lru(pfn)  # page_maybe_dma_pinned: cannot be unmapped
            return 0
        lazy = not int(pool.flags[pfn]) & PG_swapbacked
        slot = None
        if not lazy:
            slot = self.swap.get_swap_page()
            if slot is None:
                self.folio_putback_lru(pfn)
                return 0
            # SWAP_HAS_CACHE: the swap cache holds the slot while the folio is unmapped
            # and written out, so a swap-in + free of one swap PTE meanwhile cannot free
            # (and recycle) the slot under the other mappings (mm/swap_state.c).
            self.swap.swap_map[slot] += 1
        yield from self.try_to_unmap(t, pfn, slot)
        if slot is not None:
            self.swap_free(slot, "delete_from_swap_cache")
        if int(pool.mapcount[pfn]) > 0 or int(pool.refcount[pfn]) > 1:
            self.folio_putback_lru(pfn)
            return 0
        self.put_page(pfn, "shrink_folio_list")
        return 1

    def rmap_walk_anon(self, t: Thread, pfn: int, site: str) -> Gen:
        """``rmap_walk_anon`` under ``anon_vma_lock_read``: the candidate mappings of ``pfn``.

        Takes the anon_vma root's rwsem for read and returns ``(root, candidates)``, the
        candidates being ``(vma, vpn)`` for every VMA of the anon_vma that covers the
        page's index; the caller visits each with :meth:`_rmap_map_pte` and then releases
        ``root.lock``. Returns ``[]`` (no lock taken) for a page with no anon_vma.
        """
        av = self.anon_vmas.get(int(self.pool.anon_vma[pfn]))
        if av is None:
            return []
        # anon_vma_lock_read: the root's rwsem (returned for the caller to release).
        yield from self.lock(t, av.root.lock, READ, site)
        vpn = int(self.pool.index[pfn])
        cands = [(v, vpn) for v in list(av.vmas) if v.start <= vpn < v.end and not v.detached]
        return av.root, cands

    def _rmap_map_pte(self, t: Thread, vma: Vma, vpn: int, pfn: int, site: str) -> Gen:
        """``page_vma_mapped_walk``: find the table, then lock it and check the PTE maps ``pfn``.

        Find the table (no lock), preemption point, then lock it and check the PTE maps
        ``pfn``. Returns ``(table, ptl, off)`` or None.
        """
        mm = vma.mm
        idx, off = divmod(vpn, self.P)
        pmd = mm.pmd.get(idx)
        if pmd is None:
            return None
        table = pmd.table
        yield f"{site}:table_found"
        table = yield from self.cow_rmap_table(t, vma, idx, table, site)
        if table is None:
            return None
        ptl = self.pte_lockptr(mm, table)
        yield from self.lock(t, ptl, WRITE, site)
        if not self.rmap_table_still_valid(mm, idx, table, site):
            self.unlock(t, ptl, WRITE, site)
            return None
        if not self.check_table_live(table, site):
            self.unlock(t, ptl, WRITE, site)
            return None
        pte = int(table.entries[off])
        if not pte & PTE_PRESENT or pte >> PFN_SHIFT != pfn:
            self.unlock(t, ptl, WRITE, site)
            return None
        return table, ptl, off

    def rmap_table_still_valid(self, mm: MmStruct, idx: int, table: PteTable,
                               site: str = "") -> bool:
        """Re-validate under the PTL that the PMD still points at ``table``.

        As ``pte_offset_map_nolock`` + ``pmd_same`` do. Upstream this always holds for rmap
        because tables are freed only after ``unlink_anon_vmas``.
        """
        cur = mm.pmd.get(idx)
        return cur is not None and cur.table is table

    def folio_referenced(self, t: Thread, pfn: int) -> Gen:
        """``folio_referenced``: test-and-clear the young bit of every mapping.

        This is allowed in shared tables: COW PTE v4 does not break COW here.
        """
        r = yield from self.rmap_walk_anon(t, pfn, "folio_referenced")
        if not r:
            return 0
        av, cands = r
        referenced = 0
        for vma, vpn in cands:
            got = yield from self._rmap_map_pte(t, vma, vpn, pfn, "folio_referenced_one")
            if got is None:
                continue
            table, ptl, off = got
            pte = int(table.entries[off])
            if pte & PTE_YOUNG:
                referenced += 1
                self.set_ptes(t, vma.mm, table, off, pte & ~PTE_YOUNG, "folio_referenced_one")
            self.unlock(t, ptl, WRITE, "folio_referenced_one")
        self.unlock(t, av.lock, READ, "folio_referenced")
        return referenced

    def try_to_unmap(self, t: Thread, pfn: int, slot: int | None) -> Gen:
        """``try_to_unmap`` → ``try_to_unmap_one`` per mapping.

        Lazyfree (``slot is None``): discard a mapping only if the folio is clean and
        its refcount is just isolation + mappings; a dirty PTE or PG_dirty redirties it
        (PG_swapbacked set again) and the walk stops. Otherwise each PTE becomes a swap
        entry for ``slot`` (exclusive marker kept for exclusive pages).
        """
        pool = self.pool
        r = yield from self.rmap_walk_anon(t, pfn, "try_to_unmap")
        if not r:
            return
        av, cands = r
        for vma, vpn in cands:
            got = yield from self._rmap_map_pte(t, vma, vpn, pfn, "try_to_unmap_one")
            if got is None:
                continue
            table, ptl, off = got
            mm = vma.mm
            pte = int(table.entries[off])
            if pte & PTE_DIRTY:
                pool.flags[pfn] |= PG_dirty
            if slot is None:
                lazy = not int(pool.flags[pfn]) & PG_swapbacked
                if lazy and int(pool.refcount[pfn]) == 1 + int(pool.mapcount[pfn]) and not (
                        int(pool.flags[pfn]) & PG_dirty):
                    self.set_ptes(t, mm, table, off, 0, "try_to_unmap_one")
                    self.cost.charge("pte_write")
                    self.cost.charge("page_account")
                    mm.rss[MM_ANONPAGES] -= 1
                    self.page_remove_rmap(np.array([pfn]), "try_to_unmap_one")
                    self.put_page(pfn, "try_to_unmap_one")
                    self.unlock(t, ptl, WRITE, "try_to_unmap_one")
                    continue
                pool.flags[pfn] |= PG_swapbacked
                self.unlock(t, ptl, WRITE, "try_to_unmap_one")
                break
            excl = bool(int(pool.flags[pfn]) & PG_anon_exclusive)
            if excl and int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:
                # page_try_share_anon_rmap() fails on a maybe-pinned exclusive page (a
                # pin taken since shrink_folio checked): restore and stop (mm/rmap.c).
                self.unlock(t, ptl, WRITE, "try_to_unmap_one")
                break
            self.set_ptes(t, mm, table, off, swp_entry_to_pte(slot, excl), "try_to_unmap_one")
            self.cost.charge("pte_write")
            self.cost.charge("page_account")
            # With no swap cache in the model, the slot must hold the data from the first
            # swap PTE on (a later fault reads it at once): the page can no longer change
            # here -- this was its last writable mapping, or it is COW-shared (read-only
            # everywhere) -- so writing it now equals pageout() after the unmap.
            self.swap.data[slot] = pool.content[pfn]
            self.cost.charge("swap_io")
            self.swap.swap_map[slot] += 1
            mm.rss[MM_ANONPAGES] -= 1
            mm.rss[MM_SWAPENTS] += 1
            self.page_remove_rmap(np.array([pfn]), "try_to_unmap_one")
            self.put_page(pfn, "try_to_unmap_one")
            self.unlock(t, ptl, WRITE, "try_to_unmap_one")
        self.unlock(t, av.lock, READ, "try_to_unmap")

    # =================================================================================
    def _check_deadlock(self) -> None:
        """Deadlock: nobody runnable while somebody is blocked (loom's rule)."""
        waiting = False
        for t in self.threads.values():
            if t.gen is None or t.exited:
                continue
            if t.waiting is None or t.waiting[0].can_acquire(t.tid, t.waiting[1]):
                return  # somebody can run
            waiting = True
        if not waiting:
            return
        blocked = self.blocked_tids()
        if blocked and not self.runnable_tids():
            sig = "deadlock@" + (self.threads[blocked[0]].label.rsplit(":", 1)[0] or "lock")
            if sig not in self.signatures:
                desc = "; ".join(f"t{b} waits {self.threads[b].waiting[0].name}"
                                 for b in blocked if self.threads[b].waiting)
                self._report("deadlock", sig.split("@", 1)[1], f"no runnable thread: {desc}",
                             tid=blocked[0])

    def quiescent(self) -> bool:
        """No operation in progress on any thread."""
        return all(t.gen is None for t in self.threads.values())


def make_kernel(config: KernelConfig, **kw: Any) -> Kernel:
    """Instantiate the kernel class for ``config.variant``."""
    if config.variant == "cowpte":
        from .cowpte import CowPteKernel

        return CowPteKernel(config, **kw)
    return Kernel(config, **kw)

