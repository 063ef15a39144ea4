"""Systematic exploration: every schedule of a scenario's operations up to K preemptions.

``cowenv explore SCENARIO [--preemptions K] [--variant V] [--json]``

The scenario fixes the *threads and their operations* (each thread's ``do``/``start``
steps, in order; a ``fail_nth`` event belongs to the operation that follows it); its
interleaving steps (``until``, ``step``, ``finish``) and value expectations are dropped:
the explorer owns the interleaving and the kernel's oracles judge every run.

Search (stateless model checking, as CHESS and loom do: the kernel's threads are
generators and cannot be copied, so every branch re-executes its prefix from a fresh
kernel):

* **Transitions**: "thread ``t`` runs to its next preemption point", where an idle
  thread first starts its next operation (a thread is *enabled* when it is runnable, or
  idle with an operation left whose named arguments are bound and that may start).
* **Preemption bounding** (CHESS, Musuvathi & Qadeer, PLDI 2007): a *preemption* is a
  switch away from a thread that is in the middle of an operation and could go on.
  Switches at operation boundaries, or away from a blocked or finished thread, are
  free, so bound 0 already covers every order of whole operations. Runs with more than
  ``K`` preemptions are not explored.
* **Partial-order reduction by sleep sets** (Godefroid, 1996) over step *footprints*:
  the locks a step took, waited for or released (trace events), the objects it changed
  (a diff of the kernel state around the step, :func:`_snapshot`: PTE tables, PMD
  entries, ``struct page`` fields, VMAs, anon_vmas, processes, pins, swap slots and
  cache, shmem objects, mm counters, every CPU's TLB and paging-structure cache,
  pending flushes, deferred table frees) and the objects it may have read,
  over-approximated by its operation's range (:func:`_reads`): its process, the VMA
  list, PMD entries, tables and mapped pages of the range in its mm (the whole mm for
  operations without a range and for ``mremap``; the target's mm for
  ``clear_refs``/``pagemap`` of another pid), the pin it names, its own TLB and the
  frames and tables it caches. kthread steps (reclaim, compaction), rmap or all-mm
  walkers (``move_pages``, ``MADV_PAGEOUT``, ``swapoff``) and a pending kernel-wide
  ``fail_nth`` (allocation order matters then) conflict with everything; the LRU order
  is a conflict when a ``reclaim`` (its only reader) is in the scenario. Two steps
  are independent when neither writes what the other reads or writes and they share no
  lock. Frame and content-token *numbering* is not a conflict (two allocations in the
  other order give a renamed, equivalent state). Sleep sets combined with a preemption
  bound can skip a run whose only representative needs one more preemption (the
  known incompleteness of bounded POR); the certificate is "no violation within the
  bound, modulo that reduction".
* **Sleeping waits**: at a :data:`SLEEP_LABELS` point (a folio-lock wait) the kernel
  sleeps; the thread is treated as blocked (leaving it is no preemption) until another
  step writes something, instead of spinning.
* **Snapshots** (``snapshots``): at a *quiescent* point (no thread inside an operation,
  so no generator alive) the whole execution state is plain data; it is pickled
  (:meth:`Run.snapshot`), and a branch resumes from the deepest snapshot of its prefix
  instead of re-executing it from a fresh kernel. Same runs, same states, fewer steps.
* **State caching** (``cache``, as in Godefroid's sleep sets with state caching): every
  state is identified exactly (:meth:`Run.state_key`: a digest of the pickled kernel
  with its oracle's shadow, id and token counters, each suspended thread's generator
  chain, and the programs' positions and bound names; trace, coverage and cost left
  out). When a completely explored visit of the same state had at least the remaining
  preemption budget (counting what the first switch costs each), a subset of the
  current sleep set and of the sleeping threads, the revisit's subtree is a subset of
  the one already searched: it is not searched again. Its violations were recorded
  with at most as many preemptions. ``tests/test_explore.py`` checks that the
  signatures and the set of final states are those of the search without caching.

Every violation signature is reported once, with a run that shows it with the fewest
preemptions among the runs explored, as a replayable scenario (``cowenv replay``). With
none, the result is a certificate: bound, interleavings (complete runs; revisits pruned
by the cache are counted apart), distinct states (fingerprints of memory, tables, VMAs
and thread positions), transitions and seconds.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import pickle
import time
import types
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .catalogue import range_pmds
from .kernel import KSWAPD_TID, Kernel, KernelUsageError, make_kernel
from .kernel.config import KernelConfig
from .kernel.pgtable import PFN_SHIFT
from .replay import readable_args
from .scenario import FORMAT_VERSION, Scenario, load_scenario, override_config

GLOBAL = ("global",)
MAX_DEPTH = 5000
_PAGE_FIELDS = ("refcount", "mapcount", "pincount", "flags", "content", "anon_vma", "index",
                "shmem")
#: ``struct page`` state a step may write besides :data:`_PAGE_FIELDS` (footprints only):
#: the allocation generation (TLB use-after-free checks), the LRU position, ``folio->swap``.
_PAGE_STATE = (*_PAGE_FIELDS, "gen", "lru_seq", "swap")
#: Operations whose reads reach beyond the thread's own mm and range: rmap walks over
#: every mm mapping a page (``move_pages`` → ``try_to_migrate``; ``MADV_PAGEOUT`` →
#: ``reclaim_pages`` → ``try_to_unmap``) and ``swapoff`` (``try_to_unuse`` walks every mm).
_GLOBAL_OPS = frozenset({"move_pages", "swapoff"})
#: Preemption points at which the modelled kernel *sleeps* until another CPU changes
#: something (the model re-checks the condition and yields again while it holds):
#: ``migration_entry_wait`` → ``migration_entry_wait_on_locked`` (v6.2 mm/filemap.c: a
#: ``TASK_UNINTERRUPTIBLE`` wait on the folio's ``PG_locked`` bit, ``io_schedule()``) and
#: ``__unmap_and_move``'s ``folio_lock(src)`` (v6.2 mm/migrate.c → ``__folio_lock`` →
#: ``folio_wait_bit_common(..., PG_locked, TASK_UNINTERRUPTIBLE, EXCLUSIVE)``). A thread
#: there is blocked, as a lock waiter is: switching away from it is no preemption, and
#: it is not scheduled again until another step wrote something (before that, its step
#: would re-yield the same label on the same state: a no-op). Without this a spinning
#: waiter that may not be preempted (bound spent) ran to :data:`MAX_DEPTH`.
SLEEP_LABELS = frozenset({"migration_entry_wait:folio_wait", "__unmap_and_move:folio_lock"})
#: Kernel attributes left out of :meth:`Run.state_key`: the trace, coverage, step and
#: violation records (what was reported is already in the explorer's findings) and the
#: cost meter (pure accounting: nothing the kernel decides reads it).
_KEY_EXCLUDED = ("events", "coverage", "step_no", "violations", "signatures", "defects",
                 "cost")


# ----------------------------------------------------------------------------- programs
@dataclass
class OpItem:
    """One operation of a thread's program."""

    op: str
    args: dict[str, Any]
    bind: str | None = None
    #: Kernel-wide ``fail_nth`` events (their ``n``) fired just before the operation starts.
    events: list[int] = field(default_factory=list)
    #: A per-thread ``fail_nth`` (``{event: fail_nth, tid: T, n: N}``) for this operation.
    thread_fail_nth: int | None = None


def programs_of(sc: Scenario) -> dict[int, list[OpItem]]:
    """Per-thread operation lists of a scenario (see the module docstring)."""
    progs: dict[int, list[OpItem]] = {}
    events: list[int] = []
    per_thread: dict[int, int] = {}
    for s in sc.steps:
        if "event" in s:
            if s.get("tid") is not None:
                # /proc/thread-self/fail-nth: belongs to that thread's next operation.
                per_thread[int(s["tid"])] = int(s["n"])
            else:
                events.append(int(s["n"]))
            continue
        op = s.get("do") or s.get("start")
        if not op:
            continue
        tid = int(s["tid"])
        progs.setdefault(tid, []).append(
            OpItem(str(op), dict(s.get("args") or {}), s.get("as"), events,
                   per_thread.pop(tid, None)))
        events = []
    return progs


def _names_in(args: dict[str, Any], bound: set[str]) -> list[str]:
    return [v for v in args.values() if isinstance(v, str) and v in bound]


# ----------------------------------------------------------------------------- execution
class _KeyPickler(pickle.Pickler):
    """A pickler whose output depends on values, not on history (for :meth:`Run.state_key`).

    Two things in a plain pickle depend on how a state was reached rather than on the
    state: a set's iteration order (its insertion history; a restored set's, the order
    it was pickled in) and whether two equal strings are one object (pickle writes the
    second occurrence of an object as a back-reference; a restored kernel's strings are
    not the code's constants). So a set of ints/strings is written sorted (every set of
    the kernel state is used for membership only: lockdep's order graph, the oracle's
    token sets) and every string by value (a fresh ``bytes`` each time, never a
    back-reference); a real ``bytes`` pickles as usual, so the two stay apart.

    A thread inside an operation is a suspended generator (with the ``yield from``
    chain below it): it is written as its code, its instruction offset (``f_lasti``),
    its named locals and everything its frame holds (``gc.get_referents``: the locals
    and the value stack, e.g. a loop's iterator and the generator it delegates to, each
    written the same way). Kernel objects a frame refers to are back-references into the
    kernel pickled before, so which table or VMA a local names is part of the key.
    Anything else pickles as usual (identity sharing of mutable objects is kept: it is
    state); an object that cannot be pickled makes the state key-less (never cached).
    """

    def persistent_id(self, obj: Any) -> Any:
        """The by-value stand-in for a string, a set, a generator or code; else None."""
        cls = obj.__class__
        if cls is str:
            return obj.encode("utf-8", "surrogatepass")
        if cls is set or cls is frozenset:
            try:
                return (cls is set, tuple(sorted(obj)))
            except TypeError:
                return None
        if cls is types.GeneratorType:
            return self._generator(obj)
        if cls is types.CodeType:
            return ("code", obj.co_filename, obj.co_qualname, obj.co_firstlineno)
        if cls is types.FunctionType:
            cells = tuple(c.cell_contents for c in obj.__closure__ or ())
            return ("function", obj.__module__, obj.__qualname__, cells)
        if cls is types.CellType:
            return ("cell", obj.cell_contents)
        return None

    @staticmethod
    def _generator(g: types.GeneratorType) -> tuple:
        fr = g.gi_frame
        code = g.gi_code
        if fr is None:  # finished
            return ("generator-done", code.co_filename, code.co_qualname)
        loc = fr.f_locals  # (materialised as a dict on the frame: left out below)
        held = tuple(o for o in gc.get_referents(g)
                     if o is not loc and o.__class__ is not types.FrameType
                     and o is not code)
        return ("generator", code.co_filename, code.co_qualname, code.co_firstlineno,
                fr.f_lasti, tuple(loc.items()), held)


class Run:
    """One execution: a fresh kernel driven transition by transition."""

    def __init__(self, config: KernelConfig, progs: dict[int, list[OpItem]]) -> None:
        self.k: Kernel = make_kernel(config)
        self.progs = progs
        self.pc = dict.fromkeys(progs, 0)
        self.names: dict[str, Any] = {}
        self.bind: dict[int, str | None] = {}
        self.steps: list[dict[str, Any]] = []
        self.nv = 0
        self.bindable = {it.bind for p in progs.values() for it in p if it.bind}

    def snapshot(self) -> bytes:
        """The whole execution state at a quiescent point (no generator alive), pickled.

        Only taken when no thread is inside an operation: the kernel's threads are
        generators, which cannot be copied, but between operations the kernel is plain
        data (with its oracle's shadow state). The trace is left out (footprints read
        only the events of the step being taken).
        """
        return self._dump(self.k, self.pc, self.names, self.bind, self.steps, self.nv)

    @staticmethod
    def _dump(k: Kernel, *state: Any) -> bytes:
        """Pickle kernel ``k`` and the run's ``state`` (as :meth:`restore` unpacks), no trace."""
        ev = k.events
        k.events = []
        try:
            return pickle.dumps((k, *state), protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            k.events = ev

    @staticmethod
    def start_snapshot(k: Kernel, progs: dict[int, list[OpItem]]) -> bytes:
        """A :meth:`snapshot` of kernel ``k`` at a quiescent point, before ``progs`` start.

        The start state of a search that begins from a given kernel instead of a fresh
        one (:func:`explore`'s ``start``: e.g. a fuzzer's quiescent cut of an episode).
        ``k`` is not changed (its trace is left out of the copy, as in :meth:`snapshot`).

        Raises:
            ValueError: a thread of ``k`` is inside an operation.

        """
        if not k.quiescent():
            raise ValueError("start_snapshot: the kernel is not at a quiescent point")
        return Run._dump(k, dict.fromkeys(progs, 0), {}, {}, [], len(k.violations))

    @classmethod
    def restore(cls, progs: dict[int, list[OpItem]], snap: bytes) -> Run:
        """A run continuing from :meth:`snapshot` ``snap`` (a fresh copy each time)."""
        r = cls.__new__(cls)
        r.k, pc, names, bind, steps, r.nv = pickle.loads(snap)
        r.progs = progs
        r.pc, r.names, r.bind, r.steps = dict(pc), dict(names), dict(bind), list(steps)
        r.bindable = {it.bind for p in progs.values() for it in p if it.bind}
        return r

    def state_key(self) -> bytes | None:
        """Exact identity of the execution state (for state caching), or None.

        A digest of the pickled kernel (every structure, the oracle's shadow, id and
        token counters: anything a later step may read; each thread inside an operation
        with its generator chain, see :class:`_KeyPickler`) and the programs' positions
        and bound names, without :data:`_KEY_EXCLUDED` and without what an idle thread
        keeps of its last operation (result, op index). Equal keys mean equal object
        graphs, so every continuation behaves the same; states equal only up to a
        renaming (frames, tokens) get different keys, which costs hits, not soundness.
        None when some object in the state cannot be pickled.
        """
        k = self.k
        saved = {a: k.__dict__[a] for a in _KEY_EXCLUDED}
        idle = [(t, t.op_index, t.result) for t in k.threads.values() if t.gen is None]
        try:
            for a in _KEY_EXCLUDED:
                k.__dict__[a] = None
            for t, _i, _r in idle:
                t.op_index, t.result = -1, None
            buf = io.BytesIO()
            try:
                _KeyPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(
                    (k, sorted(self.pc.items()), sorted(self.names.items())))
            except (pickle.PicklingError, TypeError, AttributeError, ValueError):
                return None
            data = buf.getvalue()
        finally:
            k.__dict__.update(saved)
            for t, i, res in idle:
                t.op_index, t.result = i, res
        return hashlib.blake2b(data, digest_size=20).digest()

    def enabled(self) -> list[int]:
        """Enabled threads, by tid."""
        k = self.k
        out = []
        for tid in sorted(self.progs):
            t = k.threads.get(tid)
            if t is None or t.exited:
                continue
            if t.gen is not None:
                if k.is_runnable(t):
                    out.append(tid)
                continue
            i = self.pc[tid]
            if i >= len(self.progs[tid]):
                continue
            it = self.progs[tid][i]
            if all(n in self.names for n in _names_in(it.args, self.bindable)) \
                    and k.can_start(tid, it.op):
                out.append(tid)
        return out

    def mid_op(self, tid: int) -> bool:
        """Thread ``tid`` is inside an operation and could run on (switching is a preemption).

        Not at a :data:`SLEEP_LABELS` point: the kernel sleeps there.
        """
        t = self.k.threads.get(tid)
        return (t is not None and t.gen is not None and self.k.is_runnable(t)
                and t.label not in SLEEP_LABELS)

    def sleeping(self, tid: int) -> bool:
        """Thread ``tid`` waits at a :data:`SLEEP_LABELS` point."""
        t = self.k.threads.get(tid)
        return t is not None and t.gen is not None and t.label in SLEEP_LABELS

    def execute(self, tid: int) -> tuple[str, ...] | None:
        """Run transition ``tid``; returns nothing (footprints: see :meth:`footprint`)."""
        k = self.k
        t = k.threads[tid]
        if t.gen is None:
            it = self.progs[tid][self.pc[tid]]
            self.pc[tid] += 1
            for n in it.events:
                k.event("fail_nth", n=n)
                self.steps.append({"event": "fail_nth", "n": n})
            if it.thread_fail_nth is not None:
                k.event("fail_nth", tid=tid, n=it.thread_fail_nth)
                self.steps.append({"event": "fail_nth", "tid": tid, "n": it.thread_fail_nth})
            args = {a: (self.names[v] if isinstance(v, str) and v in self.bindable else v)
                    for a, v in it.args.items()}
            try:
                k.start(tid, it.op, args)
            except KernelUsageError:
                return None
            self.bind[tid] = it.bind
            s: dict[str, Any] = {"tid": tid, "start": it.op}
            if args:
                s["args"] = readable_args(it.op, k.threads[tid].args)
            self.steps.append(s)
        k.step(tid)
        if self.steps and self.steps[-1].get("tid") == tid and "step" in self.steps[-1]:
            self.steps[-1]["step"] += 1
        else:
            self.steps.append({"tid": tid, "step": 1})
        if t.gen is None and self.bind.get(tid):
            self.names[str(self.bind[tid])] = t.result
        return None


# ----------------------------------------------------------------------------- footprints
def _tlb_state(t: Any) -> tuple:
    """A thread's (CPU's) TLB, paging-structure cache and open gathers, comparable."""
    return (tuple(sorted(t.tlb.items())),
            tuple(sorted((i, tb.pfn, g, w) for i, (tb, g, w) in t.psc.items())),
            tuple((g.start, g.end, len(g.pages), len(g.tables)) for g in t.gathers))


def _snapshot(k: Kernel) -> dict[str, Any]:
    """The kernel state a step can change, keyed by object (see :func:`_diff`).

    Covers what every operation of the catalogue writes: frames (``struct page``, LRU
    position), PTE tables, PMD entries, VMAs (with their anon_vma, per-VMA-lock sequence
    and detached state), mm counters and sequence numbers, anon_vma lists, processes
    (alive, OOM-killed, threads), pins, swap slots and the swap cache, shmem objects,
    every CPU's TLB and paging-structure cache, pending TLB flushes, tables whose free
    waits for GUP-fast (``tlb_remove_table``), the GUP-fast walker count.
    """
    pool = k.pool
    sw = k.swap
    tables = {pfn: (t.entries.tobytes(), t.refcount, t.freed) for pfn, t in k.tables.items()}
    pmds: dict[tuple[int, int], tuple[int, bool]] = {}
    vmas: dict[int, tuple] = {}
    acct: dict[int, tuple] = {}
    procs: dict[int, tuple] = {}
    for p in k.procs.values():
        mm = p.mm
        for idx, e in mm.pmd.items():
            pmds[(mm.id, idx)] = (e.table.pfn, e.write)
        vmas[mm.id] = tuple((v.id, v.start, v.end, v.flags, v.pgoff,
                             v.shmem.id if v.shmem is not None else -1, v.detached,
                             v.lock_seq, v.anon_vma.id if v.anon_vma is not None else -1,
                             tuple(a.id for a in v.chain)) for v in mm.vmas)
        acct[mm.id] = (tuple(mm.rss), mm.nr_ptes, mm.write_protect_seq, mm.flags, mm.dead,
                       mm.mm_lock_seq, mm.users)
        procs[p.pid] = (p.alive, p.killed, tuple(p.tids))
    pins = {i: (p.active, p.pfn, p.vpn) for i, p in k.pins.items()}
    return {"pages": np.stack([getattr(pool, f) for f in _PAGE_STATE]),
            "tables": tables, "pmds": pmds, "vmas": vmas, "acct": acct, "pins": pins,
            "procs": procs,
            "anon_vmas": {i: (a.root.id, tuple(v.id for v in a.vmas))
                          for i, a in k.anon_vmas.items()},
            "shmem": {i: tuple(sorted(o.pages.items())) for i, o in k.shmem.items()},
            "tlb": {tid: _tlb_state(t) for tid, t in k.threads.items()},
            "tlbp": dict(k.tlb_pending),
            "swapcache": dict(sw.cache),
            "swap": np.stack([sw.swap_map, sw.data, sw.has_cache.astype(np.int64)]),
            "swapdev": sw.writeok, "deferred": tuple(t.pfn for t in k.deferred_tables),
            "lru": pool.lru_clock, "nr_free": pool.nr_free,
            "fail_nth": k.fail_nth, "gfw": k.gup_fast_walkers}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> set[tuple]:
    """The objects whose state differs between two snapshots (a step's writes)."""
    w: set[tuple] = set()
    ch = np.nonzero((a["pages"] != b["pages"]).any(axis=0))[0]
    w.update(("page", int(x)) for x in ch)
    for key, tag in (("tables", "table"), ("pmds", "pmd"), ("vmas", "vmas"), ("acct", "acct"),
                     ("pins", "pin"), ("procs", "proc"), ("anon_vmas", "anon_vma"),
                     ("shmem", "shmem"), ("tlb", "tlb"), ("tlbp", "tlbp"),
                     ("swapcache", "swap")):
        da, db = a[key], b[key]
        for x in set(da) | set(db):
            if da.get(x) != db.get(x):
                w.add((tag, x))
    sw = np.nonzero((a["swap"] != b["swap"]).any(axis=0))[0]
    w.update(("swap", int(x)) for x in sw)
    for key in ("swapdev", "deferred", "lru"):
        if a[key] != b[key]:
            w.add((key,))
    if a["gfw"] != b["gfw"]:
        w.add(("gup_fast_walkers",))
    if a["fail_nth"] or b["fail_nth"]:
        if a["nr_free"] != b["nr_free"] or a["fail_nth"] != b["fail_nth"]:
            w.add(("alloc",))
    return w


def _reads(k: Kernel, tid: int) -> set[tuple] | None:
    """Over-approximate read set of thread ``tid``'s current operation (None = global).

    The thread's process and mm (VMAs, counters, pending flushes), the PMD entries,
    tables and mapped pages or swap slots of the operation's range (the whole mm when it
    has no range, and for ``mremap``, whose destination may be anywhere), the shmem
    objects its mm maps, the pin it names, and its own CPU's TLB and paging-structure
    cache with the frames and tables they point to (a TLB hit reads those, not the
    page tables). ``clear_refs``/``pagemap`` with a ``pid`` read that process's mm.
    Operations that walk other mms through rmap or every mm (:data:`_GLOBAL_OPS`,
    ``MADV_PAGEOUT``) and kthread steps are global.
    """
    t = k.threads.get(tid)
    if t is None or tid == KSWAPD_TID or t.pid not in k.procs:
        return None
    args = t.args
    op = t.op if t.gen is not None else ""
    if op in _GLOBAL_OPS or (op == "madvise" and str(args.get("advice", "")).upper()
                             .removeprefix("MADV_") == "PAGEOUT"):
        return None
    own = k.procs[t.pid].mm
    r: set[tuple] = {("vmas", own.id), ("acct", own.id), ("tlbp", own.id), ("proc", t.pid),
                     ("tlb", tid)}
    mm = own
    target = args.get("pid")
    if op in ("clear_refs", "pagemap") and isinstance(target, int) and target:
        if target not in k.procs:
            return r
        mm = k.procs[target].mm
        r |= {("vmas", mm.id), ("acct", mm.id), ("tlbp", mm.id), ("proc", target)}
    P, ps = k.P, k.config.page_size
    idxs: Any
    if "addr" in args and op not in ("mremap", "clear_refs"):
        idxs = range_pmds(args, P, ps)
    else:
        idxs = list(mm.pmd)
    for v in mm.vmas:
        if v.shmem is not None:
            r.add(("shmem", v.shmem.id))
    for e in t.tlb.values():
        r.add(("page", e[0]))
    for tb, _g, _w in t.psc.values():
        r.add(("table", tb.pfn))
        r.add(("page", tb.pfn))
    for idx in idxs:
        e = mm.pmd.get(idx)
        r.add(("pmd", (mm.id, idx)))
        if e is None:
            continue
        tb = e.table
        r.add(("table", tb.pfn))
        for pte in tb.entries[tb.entries != 0]:
            if int(pte) & 1:
                r.add(("page", int(pte) >> PFN_SHIFT))
            else:
                r.add(("swap", int(pte) >> PFN_SHIFT))
    pin = args.get("pin")
    if isinstance(pin, int) and pin in k.pins:
        r.add(("pin", pin))
        r.add(("page", k.pins[pin].pfn))
    return r


@dataclass
class Footprint:
    """What a step touched: locks, writes, reads (reads include writes), or everything."""

    locks: frozenset[str]
    writes: frozenset[tuple]
    reads: frozenset[tuple]
    everything: bool = False

    def conflicts(self, o: Footprint) -> bool:
        """Whether two steps may not commute."""
        if self.everything or o.everything:
            return True
        if self.locks & o.locks:
            return True
        return bool(self.writes & o.reads or o.writes & self.reads)


def state_fingerprint(k: Kernel) -> int:
    """CRC-32 of memory, tables, PMDs, VMAs, pins, TLBs and every thread's position."""
    h = 0
    pool = k.pool
    for f in _PAGE_FIELDS:
        h = zlib.crc32(getattr(pool, f).tobytes(), h)
    for pfn in sorted(k.tables):
        t = k.tables[pfn]
        h = zlib.crc32(t.entries.tobytes(), zlib.crc32(f"{pfn}/{t.refcount}".encode(), h))
    parts = []
    for p in k.procs.values():
        parts.append((p.pid, p.alive, sorted((i, e.table.pfn, e.write)
                                             for i, e in p.mm.pmd.items()),
                      [(v.start, v.end, v.flags) for v in p.mm.vmas]))
    parts.append(sorted((tid, t.op if t.gen is not None else "", t.label, t.exited)
                        for tid, t in k.threads.items()))
    parts.append(sorted((i, p.active, p.pfn) for i, p in k.pins.items()))
    parts.append(sorted((tid, _tlb_state(t)) for tid, t in k.threads.items()))
    parts.append(sorted(k.tlb_pending.items()))
    return zlib.crc32(repr(parts).encode(), h)


# ----------------------------------------------------------------------------- search
@dataclass
class Finding:
    """A violation signature and the first run that shows it."""

    signature: str
    message: str
    preemptions: int
    steps: int
    schedule: dict[str, Any]


@dataclass
class ExploreResult:
    """Outcome of :func:`explore` (a certificate when ``findings`` is empty)."""

    scenario: str
    variant: str
    bound: int
    interleavings: int = 0
    states: int = 0
    transitions: int = 0
    pruned_sleep: int = 0
    pruned_bound: int = 0
    #: Quiescent states met again with no more budget and no fewer sleeping threads
    #: than a completely explored earlier visit: their subtree is not searched again.
    pruned_cache: int = 0
    #: Branches resumed from a quiescent-point snapshot instead of re-executed.
    restores: int = 0
    #: Transitions of the longest run (a run stops at :data:`MAX_DEPTH`).
    deepest: int = 0
    seconds: float = 0.0
    complete: bool = True
    #: Stopped at the end of the first run that showed a ``stop_on`` signature.
    stopped: bool = False
    findings: list[Finding] = field(default_factory=list)
    #: Keys (:meth:`Run.state_key`) of the final states reached (``collect_finals``
    #: only; a cached subtree contributes the final states its first visit reached).
    final_states: set[bytes] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d.pop("final_states")
        return d


@dataclass
class _Node:
    choices: list[int]
    sleep: dict[int, Footprint]
    pre: int  # preemptions before this node
    last: int  # thread of the previous transition (-1 = none)
    last_mid: bool  # that thread could have gone on (a switch now is a preemption)
    chosen: int = -1
    done: dict[int, Footprint] = field(default_factory=dict)
    #: Threads asleep at a :data:`SLEEP_LABELS` point with nothing written since.
    parked: frozenset[int] = frozenset()
    #: Quiescent node: its :meth:`Run.state_key` (for the cache) and snapshot.
    key: bytes | None = None
    snap: bytes | None = None
    #: Its subtree was skipped: an earlier visit of the same state covered it.
    cached: bool = False
    finals: set[bytes] | None = None


def _cost(node: _Node, tid: int) -> int:
    return 1 if node.last_mid and node.last != tid and node.last >= 0 else 0


def explore(sc: Scenario, bound: int = 2, variant: str | None = None,
            max_interleavings: int = 1_000_000, max_seconds: float | None = None,
            por: bool = True,
            stop_on: set[str] | frozenset[str] | Callable[[str], bool] | None = None,
            cache: bool = True, snapshots: bool = True,
            collect_finals: bool = False, start: bytes | None = None,
            progs: dict[int, list[OpItem]] | None = None,
            max_transitions: int | None = None) -> ExploreResult:
    """Explore every schedule of ``sc``'s operations with at most ``bound`` preemptions.

    Args:
        sc: The scenario (its threads' operations are used, see the module docstring).
        bound: Preemption bound K.
        variant: Preset or variant to run on instead of the scenario's configuration.
        max_interleavings: Stop (``complete=False``) after this many complete runs.
        max_seconds: Stop (``complete=False``) after this long.
        por: Use sleep sets (False: plain preemption-bounded enumeration).
        stop_on: Stop (``complete=False``, ``stopped=True``) at the end of the first run
            that shows one of these signatures (a shortest-trigger search: see
            :func:`shortest_trigger`), or, given a predicate, a signature it holds for
            (a fuzzer's window stops at its first new violation).
        cache: State caching at quiescent points (see the module docstring).
        snapshots: Resume a branch from the deepest quiescent snapshot of its prefix
            instead of re-executing the prefix from a fresh kernel.
        collect_finals: Record the final states' keys (``final_states``; for tests).
        start: Start from this state (:meth:`Run.start_snapshot` of a quiescent kernel,
            e.g. a fuzzer's cut of an episode) instead of a fresh kernel of ``sc``'s
            configuration; the scenario's steps then only name the operations (and
            ``progs`` may replace them). None (default): a fresh kernel, as always.
        progs: The threads' programs (default :func:`programs_of` ``sc``).
        max_transitions: Stop (``complete=False``) once this many transitions were
            executed (a fuzzer's step budget; re-executed prefixes count).

    Returns:
        The :class:`ExploreResult`.

    """
    cfg = override_config(sc.config, variant, None) if variant else sc.config
    if progs is None:
        progs = programs_of(sc)
    # LRU order is read only by reclaim (``shrink_inactive_list`` scans oldest first; a
    # kthread step, global anyway); compaction scans in pfn order. Without a reclaim the
    # order in which steps add pages to the LRU is never observed, so it is no conflict;
    # with one, every LRU addition writes the list.
    lru_read = any(it.op == "reclaim" for prog in progs.values() for it in prog)
    res = ExploreResult(sc.name, variant or "scenario", bound)
    if collect_finals:
        res.final_states = set()
    t0 = time.perf_counter()
    found: dict[str, Finding] = {}
    states: set[int] = set()
    # state key -> [(budget, sleep set, sleeping threads, last thread, it was mid-op,
    # final states)] of completely explored visits
    seen: dict[bytes, list[tuple]] = {}
    use_keys = cache or collect_finals
    stack: list[_Node] = []

    def new_run(path: list[int]) -> Run:
        # Resume from the deepest quiescent snapshot on the path (stack[i] is the state
        # after path[:i]), else re-execute from a fresh kernel. Deterministic either way:
        # the same states as when the prefix was first explored, whose violations are
        # recorded already. The quiescent-point checks (recount, debug checks, shadow
        # sweep: pure checks, only reporting) are off meanwhile; they cost more than the
        # prefix's steps.
        i0 = 0
        r = None
        if snapshots:
            for i in range(len(path), 0, -1):
                if stack[i].snap is not None:
                    r = Run.restore(progs, stack[i].snap)
                    i0 = i
                    res.restores += 1
                    break
        if r is None:
            r = Run(cfg, progs) if start is None else Run.restore(progs, start)
        orc = r.k.oracle
        if orc is not None:
            orc.accounting_enabled = False
        for tid in path[i0:]:
            r.execute(tid)
            res.transitions += 1
        if orc is not None:
            orc.accounting_enabled = True
        r.nv = len(r.k.violations)
        return r

    def node_at(r: Run, parent: _Node | None, tid: int, fp: Footprint | None) -> _Node:
        if parent is None:
            sleep: dict[int, Footprint] = {}
            pre, last, mid = 0, -1, False
            parked: frozenset[int] = frozenset()
        else:
            pre = parent.pre + _cost(parent, tid)
            last, mid = tid, r.mid_op(tid)
            sleep = {}
            if por and fp is not None:
                for u, ufp in list(parent.sleep.items()) + list(parent.done.items()):
                    if u != tid and not ufp.conflicts(fp):
                        sleep[u] = ufp
            # A write wakes every sleeper (it may be what they wait for); the stepping
            # thread sleeps if it stopped at a sleep point.
            parked = frozenset() if fp is not None and fp.writes else parent.parked
            parked = parked - {tid}
            if r.sleeping(tid):
                parked = parked | {tid}
        en = r.enabled()
        awake = [u for u in en if u not in parked]
        if awake or not en:
            en = awake  # (only sleepers left: let them spin, as before)
        node = _Node([], sleep, pre, last, mid, parked=parked)
        quiet = snapshots and r.k.quiescent()
        if use_keys:
            node.key = r.state_key()
        if node.key is not None:
            if collect_finals:
                node.finals = set()
            if cache:
                for entry in seen.get(node.key, ()):
                    if _covers(entry, node):
                        node.cached = True
                        res.pruned_cache += 1
                        fin = entry[-1]
                        if node.finals is not None and fin is not None:
                            node.finals |= fin
                        return node
        if quiet and snapshots:
            node.snap = r.snapshot()
        # CHESS order: the current thread first (no preemption), then the others.
        order = ([last] if last in en else []) + [u for u in en if u != last]
        for u in order:
            if u in sleep:
                res.pruned_sleep += 1
                continue
            if node.pre + _cost(node, u) > bound:
                res.pruned_bound += 1
                continue
            node.choices.append(u)
        return node

    def step(r: Run, node: _Node, tid: int) -> Footprint:
        k = r.k
        before = _snapshot(k)
        rd0 = _reads(k, tid)
        ne = len(k.events)
        r.execute(tid)
        res.transitions += 1
        after = _snapshot(k)
        rd1 = _reads(k, tid)
        locks = frozenset(e.label for e in k.events[ne:] if e.kind in ("lock", "unlock", "wait"))
        w = _diff(before, after)
        if not lru_read:
            w.discard(("lru",))
        if rd0 is None or rd1 is None or before["fail_nth"]:
            fp = Footprint(locks, frozenset(w), frozenset(w), everything=True)
        else:
            fp = Footprint(locks, frozenset(w), frozenset(w | rd0 | rd1))
        vs = k.violations
        pre = node.pre + _cost(node, tid)
        for v in vs[r.nv:]:
            f = found.get(v.signature)
            if f is None or pre < f.preemptions:  # keep the run with the fewest preemptions
                found[v.signature] = Finding(v.signature, v.message, pre, len(r.steps),
                                             _schedule(sc, cfg, r, v, pre))
        r.nv = len(vs)
        states.add(state_fingerprint(k))
        return fp

    def _covers(entry: tuple, node: _Node) -> bool:
        # Every schedule the revisit ``node`` would explore, the visit ``entry`` did: a
        # subset of its sleep set and of its sleeping threads, and at least its budget
        # for every first choice. The first switch costs the revisit c2(u) and cost
        # the visit c1(u); c1(u) - c2(u) <= 0 for every u unless the visit's last thread
        # was mid-operation and the revisit's is not the same thread mid-operation.
        b1, z1, p1, last1, mid1, _fin = entry
        need = bound - node.pre
        if mid1 and not (node.last_mid and node.last == last1):
            need += 1
        return b1 >= need and z1 <= frozenset(node.sleep) and p1 <= node.parked

    def close(node: _Node) -> None:
        # ``node``'s subtree is completely explored: remember it, pass its finals up.
        if node.key is not None and cache and not node.cached:
            seen.setdefault(node.key, []).append(
                (bound - node.pre, frozenset(node.sleep), node.parked, node.last,
                 node.last_mid and node.last >= 0, node.finals))
        if node.finals is not None:
            for up in reversed(stack):
                if up.finals is not None:
                    up.finals |= node.finals
                    break
            else:
                if res.final_states is not None:
                    res.final_states |= node.finals

    r = new_run([])
    states.add(state_fingerprint(r.k))
    stack.append(node_at(r, None, -1, None))
    path: list[int] = []
    while stack:
        # Extend the current run to a leaf.
        while True:
            node = stack[-1]
            if not node.choices or len(path) >= MAX_DEPTH:
                break
            tid = node.choices[0]
            node.chosen = tid
            fp = step(r, node, tid)
            node.done[tid] = fp
            path.append(tid)
            stack.append(node_at(r, node, tid, fp))
        # A leaf: one complete interleaving (or a state whose subtree is cached).
        leaf = stack[-1]
        res.deepest = max(res.deepest, len(path))
        k = r.k
        if not leaf.cached:
            if k.oracle is not None and k.quiescent():
                k.oracle.check_accounting()
                for v in k.violations[r.nv:]:
                    if v.signature not in found:
                        found[v.signature] = Finding(v.signature, v.message, leaf.pre,
                                                     len(r.steps),
                                                     _schedule(sc, cfg, r, v, leaf.pre))
            res.interleavings += 1
            if collect_finals:
                # (a state that cannot be keyed: its fingerprint stands in)
                fin = leaf.key if leaf.key is not None else (
                    b"live" + state_fingerprint(k).to_bytes(4, "little"))
                if leaf.finals is None:
                    leaf.finals = set()
                leaf.finals.add(fin)
        if stop_on and (any(map(stop_on, found)) if callable(stop_on)
                        else not stop_on.isdisjoint(found)):
            res.complete = False
            res.stopped = True
            break
        if res.interleavings >= max_interleavings or (
                max_seconds is not None and time.perf_counter() - t0 > max_seconds) or (
                max_transitions is not None and res.transitions >= max_transitions):
            res.complete = False
            break
        # Backtrack to the deepest node with an unexplored choice.
        close(stack.pop())
        nxt = None
        while stack:
            node = stack[-1]
            path.pop()
            rest = [u for u in node.choices if u not in node.done]
            if rest:
                nxt = rest[0]
                break
            close(stack.pop())
        if nxt is None:
            break
        r = new_run(path)
        node = stack[-1]
        node.chosen = nxt
        fp = step(r, node, nxt)
        node.done[nxt] = fp
        path.append(nxt)
        stack.append(node_at(r, node, nxt, fp))
    res.states = len(states)
    res.seconds = round(time.perf_counter() - t0, 3)
    res.findings = sorted(found.values(), key=lambda f: (f.preemptions, f.steps))
    return res


def shortest_trigger(sc: Scenario, targets: set[str] | frozenset[str], bound: int = 2,
                     variant: str | None = None, max_seconds: float | None = None
                     ) -> tuple[ExploreResult | None, list[ExploreResult]]:
    """Explore at bounds 0, 1, ... ``bound`` until a run shows one of ``targets``.

    Each bound's search stops at the end of the first run that shows a target, so the
    bound of that run is the fewest preemptions that trigger it (modulo the sleep-set
    reduction, as for certificates). Returns the result that found one (None if no bound
    did) and every bound's result, in order.
    """
    t0 = time.perf_counter()
    out: list[ExploreResult] = []
    for b in range(bound + 1):
        left = None if max_seconds is None else max(0.0, max_seconds - (time.perf_counter() - t0))
        r = explore(sc, b, variant, max_seconds=left, stop_on=targets)
        out.append(r)
        if any(f.signature in targets for f in r.findings):
            return r, out
        if not r.complete:
            break
    return None, out


def _schedule(sc: Scenario, cfg: KernelConfig, r: Run, v: Any, pre: int) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "name": f"{sc.name}-explore-{v.kind}",
            "description": f"Found by `cowenv explore` ({pre} preemption(s)): {v.message}",
            "config": cfg.to_dict(), "steps": [dict(s) for s in r.steps],
            "expect": {"violation": {"kind": v.kind, "site": v.site}}}


# ----------------------------------------------------------------------------- CLI
def _setup(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("scenario", help="scenario file: its threads' operations are explored")
    sp.add_argument("--preemptions", type=int, default=2, help="preemption bound K (default 2)")
    sp.add_argument("--variant", help="run as this preset/variant (as-posted, fixed, classic)")
    sp.add_argument("--no-por", action="store_true", help="no sleep-set reduction")
    sp.add_argument("--no-cache", action="store_true",
                    help="no state caching or snapshots (re-execute every prefix)")
    sp.add_argument("--max-interleavings", type=int, default=1_000_000)
    sp.add_argument("--out", help="write each violation's schedule here (one YAML each)")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _run(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .cli import EXIT_FAIL, EXIT_OK, BadInput
    from .kernel.config import PRESETS, VARIANTS
    from .scenario import ScenarioError, save_scenario

    if a.preemptions < 0:
        raise BadInput("--preemptions: expected >= 0")
    if a.variant is not None and a.variant not in PRESETS and a.variant not in VARIANTS:
        names = ", ".join(sorted(set(PRESETS) | set(VARIANTS)))
        raise BadInput(f"--variant: expected one of {names}")
    try:
        sc = load_scenario(a.scenario)
    except (OSError, ScenarioError) as e:
        raise BadInput(str(e)) from None
    res = explore(sc, a.preemptions, a.variant, max_interleavings=a.max_interleavings,
                  por=not a.no_por, cache=not a.no_cache, snapshots=not a.no_cache)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in res.findings:
            save_scenario(f.schedule, out / f"{sc.name}-{f.signature.replace('@', '-')}.yaml")
    if a.json:
        print(json.dumps(res.to_dict(), sort_keys=True))
    else:
        head = (f"{res.scenario} on {res.variant}: bound {res.bound}, {res.interleavings:,} "
                f"interleavings, {res.states:,} states, {res.transitions:,} transitions, "
                f"{res.seconds:.1f}s" + ("" if res.complete else " (INCOMPLETE: limit hit)"))
        print(head)
        if not res.findings:
            print(f"certificate: no violation in any schedule with <= {res.bound} "
                  f"preemption(s) (sleep-set reduced: {res.pruned_sleep:,} branches; "
                  f"{res.pruned_cache:,} revisited states not searched again)")
        for f in res.findings:
            print(f"  {f.signature}: {f.preemptions} preemption(s), {f.steps} steps: "
                  f"{f.message}")
    return EXIT_FAIL if res.findings else EXIT_OK


CLI_COMMANDS = {"explore": (_setup, _run, "explore every schedule of a scenario's "
                                          "operations up to K preemptions")}

__all__ = ["ExploreResult", "Finding", "Footprint", "explore", "programs_of",
           "shortest_trigger", "state_fingerprint"]
