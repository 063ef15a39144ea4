"""Tasks and the scheduler: threads as generators, start/step, quiescence, deadlock.

Models the parts of ``kernel/sched/`` and ``include/linux/sched.h`` the simulation needs,
in the shape of a cooperative scheduler whose policy is the caller (a scenario, the env,
an agent): every kernel function that can be preempted is a generator; each ``yield``
hands back a stable preemption label ``function:point``; a thread that cannot take a
lock yields ``function:wait`` and is *blocked* until the lock is free (see
:mod:`cowenv.kernel.locking`). ``step`` runs one thread to its next preemption point.
Deadlock follows loom's rule: nobody runnable while somebody is blocked.

Also here: the task structures (:class:`Thread`, :class:`Process`), violation
reporting and the event trace, and id allocation.

Fault injection (``lib/fault-inject.c``, 6.2): each thread has syzkaller's
``/proc/thread-self/fail-nth`` (:attr:`Thread.fail_nth_next`, written by the
``fail_nth`` event with a ``tid``): the n-th page allocation of that thread's next
operation fails, and the counter is reset when the operation returns (syzkaller writes
0 after the call). ``should_fail_ex`` decrements ``current->fail_nth`` at every
injection point and fails when it reaches 0; only page and page-table allocations are
injection points here. The separate, kernel-wide :attr:`Kernel.fail_nth`
(``pressure_fail_nth`` event; ``fail_nth`` without a ``tid`` is its old name) makes the
n-th next allocation anywhere fail, like memory pressure from outside (a memcg limit).

OOM (``mm/oom_kill.c``): :meth:`SchedMixin.out_of_memory` chooses a victim by
``oom_badness`` and kills it through the exit path (``oom_kill_process``: SIGKILL, the
threads ``do_exit`` on their way back to user space).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from .locks import Lock
from .mm import (
    MmStruct,
)
from .ops import OPS, validate_args_memo
from .trace import Event, Violation

_tuple_new = tuple.__new__

Gen = Generator[str, None, Any]

KSWAPD_TID = 0

#: Each operation's kernel method name (``sys_<op>``), built once rather than per start.
_SYS_NAMES: dict[str, str] = {op: f"sys_{op}" for op in OPS}

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
        out: Output parameters of the last operation that has them (``move_pages``'s
            ``{"status": [...]}``), else None; reset when an operation starts.
        walk: ``(table pfn, lo, hi)``: the entries ``[lo, hi)`` of a page table that
            a walk paused inside it has checked and will still process when it
            resumes (set by walkers with a preemption point inside a range:
            ``copy_pte_entries``), else None. Read by search agents (the entries a
            racing operation has to meet); no kernel path reads it.
    """

    __slots__ = ("tid", "pid", "gen", "op", "args", "label", "waiting", "held", "exited",
                 "result", "op_index", "fault_site", "fail_nth", "fail_nth_next", "tlb", "psc",
                 "gathers", "out", "nest", "walk")

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
        self.out: dict[str, Any] | None = None
        # Lockdep subclass of held locks taken nested (spin_lock_nested); absent = 0.
        # Looked up by lock, never iterated.
        self.nest: dict[Lock, int] = {}
        self.op_index = -1
        self.fault_site = ""
        # current->fail_nth while an operation runs, and the value written to
        # /proc/thread-self/fail-nth for the next operation.
        self.fail_nth = 0
        self.fail_nth_next = 0
        # This CPU's TLB (vpn -> (pfn, gen, writable, dirty)), paging-structure cache
        # (pmd index -> (table, table gen, pmd writable)) and open mmu_gathers (tlb.py).
        self.tlb: dict[int, tuple[int, int, bool, bool]] = {}
        self.psc: dict[int, tuple[Any, int, bool]] = {}
        self.gathers: list[Any] = []
        self.walk: tuple[int, int, int] | None = None

    @property
    def idle(self) -> bool:
        """No operation in progress."""
        return self.gen is None and not self.exited

class Process:
    """A process: an mm and its threads."""

    __slots__ = ("pid", "mm", "tids", "alive", "killed")

    def __init__(self, pid: int, mm: MmStruct) -> None:
        self.pid = pid
        self.mm = mm
        self.tids: list[int] = []
        self.alive = True
        # SIGKILL pending (an OOM victim: tsk_is_oom_victim); the threads exit.
        self.killed = False

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


class SchedMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    _cur: Thread | None = None

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
            a = validate_args_memo(op, args if args.__class__ is dict else dict(args or {}),
                                   self.config.page_size)
        except ValueError as e:
            raise KernelUsageError(str(e)) from None
        t = self.threads[tid]
        t.op, t.args, t.label = op, a, ""
        t.result = None
        t.out = None
        t.op_index = self.op_count
        self.op_count += 1
        name = _SYS_NAMES.get(op)
        if name is None:  # (an operation registered after import)
            name = _SYS_NAMES[op] = f"sys_{op}"
        t.gen = getattr(self, name)(t, **a)
        # /proc/thread-self/fail-nth arms fault injection for this operation.
        t.fail_nth, t.fail_nth_next = t.fail_nth_next, 0
        self._ev(tid, "start", op, a)
    def step(self, tid: int) -> str:
        """Run thread ``tid`` to its next preemption point (or to completion).

        Returns:
            The label it stopped at, or ``"<op>:done"`` when the operation returned.

        Raises:
            KernelUsageError: the thread is not runnable.
        """
        t = self.threads.get(tid)
        # == self.is_runnable(t), inlined (a method call per step)
        if t is None or t.gen is None or t.exited or (
                t.waiting is not None and not t.waiting[0].can_acquire(tid, t.waiting[1])):
            raise KernelUsageError(f"thread {tid} is not runnable ({self.thread_state(tid)})")
        self.step_no += 1
        self._cur = t
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
            t.nest.clear()
            t.waiting = None
            self._finish(t, None)
            label = f"{t.op}:defect"
        else:
            t.label = label
            if self.tracing:  # == self._ev(tid, "point", label), inlined
                self.events.append(_tuple_new(Event, (self.step_no, tid, "point", label, None)))
        cov = self.coverage
        cov[label] = cov.get(label, 0) + 1
        self._cur = None
        if t.gen is None or t.waiting is not None or t.exited:
            self._check_deadlock()
        # (else t itself can run: _check_deadlock would return at once)
        return label
    def _finish(self, t: Thread, value: Any) -> None:
        t.gen = None
        t.result = value
        t.label = ""
        t.fail_nth = 0
        if t.held and not t.exited:
            names = ", ".join(lk.name for lk, _ in t.held)
            self._report("lock-discipline", t.op, f"returned to user space holding {names}",
                         tid=t.tid)
        self._ev(t.tid, "end", t.op, value)
        if self.oracle is not None:
            self.oracle.after_op(t, value)
        if t.pid and not t.exited and self.procs[t.pid].killed:
            # A fatal signal is acted on before returning to user space: do_exit.
            self.start(t.tid, "exit")
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

        * ``fail_nth`` with ``tid`` and ``n``: write ``n`` to that thread's
          ``/proc/thread-self/fail-nth``: the n-th page or page-table allocation of its
          next operation fails (1 = the first); reset when that operation returns.
        * ``pressure_fail_nth`` with ``n`` (also ``fail_nth`` without ``tid``, its old
          name): the n-th next allocation anywhere in the kernel fails, whichever thread
          makes it (memory pressure from outside, e.g. a memcg limit; not a Linux
          interface).
        """
        n = args.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise KernelUsageError("n: expected an integer >= 0")
        if name == "fail_nth" and args.get("tid") is not None:
            tid = args["tid"]
            t = self.threads.get(tid) if isinstance(tid, int) else None
            if t is None or t.exited:
                raise KernelUsageError(f"tid: no live thread {tid!r}")
            t.fail_nth_next = n
        elif name in ("fail_nth", "pressure_fail_nth"):
            self.fail_nth = n
        else:
            raise KernelUsageError(f"unknown event {name!r} (known: fail_nth, "
                                   "pressure_fail_nth)")
        self._ev(-1, "event", name, args)
    def oom_badness(self, p: Process) -> int:
        """``oom_badness`` (mm/oom_kill.c, 6.2) with ``oom_score_adj`` 0.

        ::

            points = get_mm_rss(p->mm) + get_mm_counter(p->mm, MM_SWAPENTS) +
                mm_pgtables_bytes(p->mm) / PAGE_SIZE;
        """
        mm = p.mm
        return int(sum(mm.rss)) + mm.nr_ptes
    def out_of_memory(self, t: Thread) -> Process | None:
        """``out_of_memory`` → ``select_bad_process`` → ``oom_kill_process`` (6.2).

        ``select_bad_process`` walks the processes in creation order
        (``for_each_process``) and keeps the highest ``oom_badness``; an equal score
        replaces the one chosen (``if (points < oc->chosen_points) goto next;``), so the
        youngest of the largest wins. A victim still exiting aborts the selection
        (``oom_evaluate_task``: ``if (tsk_is_oom_victim(task)) ... goto abort``): no
        second kill until the first has released its memory (its ``exit_mmap`` is
        done). Differences: pid 1 is the
        workload's first process, not init (``oom_unkillable_task``), so it is killable;
        there is no ``oom_reaper``: the victim's memory is freed by its own exit.

        The victim gets SIGKILL: an idle thread starts ``exit`` at once; a thread in an
        operation exits when it returns (:meth:`_finish`). Returns the victim or None.
        """
        victim = None
        best = -1
        for p in self.procs.values():
            if p.killed and not p.mm.dead:
                # abort: a victim is still on its way out (tsk_is_oom_victim until its
                # exit_mmap sets MMF_OOM_SKIP), even once it no longer counts as alive
                return None
        for p in self.live_procs():
            pts = self.oom_badness(p)
            if pts >= best:
                victim, best = p, pts
        if victim is None:
            return None
        victim.killed = True
        self._ev(t.tid, "event", "oom_kill", {"pid": victim.pid, "points": best})
        for tid in list(victim.tids):
            vt = self.threads[tid]
            if vt.gen is None and not vt.exited:
                self.start(tid, "exit")
        return victim
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
        for t in self.threads.values():
            if t.gen is not None:
                return False
        return True
