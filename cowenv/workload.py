"""Seeded random schedules over the whole kernel API (soak tests, fuzzing baselines).

Everything here is a plain function of a kernel's *observable* state (which threads are
idle / runnable, which pins a process holds, which processes live) and a seeded
``numpy.random.Generator``. Each function returns **scenario step dicts** in the format
of :mod:`cowenv.scenario` (``start`` / ``step`` / ``event``), so that a random schedule is
plain data: it can be applied with :func:`cowenv.scenario.apply_step`, saved with
:func:`cowenv.scenario.save_scenario` and replayed as it is.

The generated schedules cover every operation of :data:`cowenv.kernel.ops.OPS` (mmap with
every prot / shared / populate combination, munmap, mprotect, every madvise advice,
read / write, fork / clone / exit, prctl, pins R/O and R/W on the slow and the fast path,
unpin, device I/O through pins, mremap, move_pages), reclaim and compaction on the
kthread slot (tid 0), ``fail_nth`` allocation
failures, and arbitrary interleavings: an operation is *started* on an idle thread and
every thread with an operation in progress is then stepped one preemption point at a
time in random order.

Typical use (a random-scheduler baseline)::

    rng = np.random.default_rng(seed)
    k = make_kernel(random_config(rng))
    steps = run_random_schedule(k, rng, nr_steps=2000)
    steps += teardown(k, rng)          # finish everything, exit every process
    assert not k.violations and not k.defects

Determinism: only the given generator is consulted; candidate lists are built in tid /
pin-id order, never by iterating sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .kernel import KSWAPD_TID, Kernel, make_kernel
from .kernel.config import KernelConfig
from .kernel.ops import ADVICES

#: Relative weights of the operations a user thread starts (0 disables one).
DEFAULT_WEIGHTS: dict[str, float] = {
    "read": 12.0, "write": 14.0, "mmap": 3.0, "munmap": 1.5, "mprotect": 2.5,
    "madvise": 4.0, "fork": 1.5, "clone": 0.8, "exit": 0.6, "prctl_cow_pte": 0.3,
    "pin": 3.0, "unpin": 1.5, "dev_read": 2.0, "dev_write": 2.0,
    # Issue 13's walkers.
    "numa_hint": 1.2, "swapoff": 0.3, "clear_refs": 0.8, "pagemap": 0.6,
    "mremap": 1.5, "move_pages": 1.5,
}

#: prot strings drawn for mmap/mprotect, with weights. ``w`` alone is rare but legal.
PROTS: tuple[tuple[str, float], ...] = (("rw", 6.0), ("r", 2.5), ("none", 1.0), ("w", 0.3))


@dataclass(frozen=True)
class Layout:
    """The window of user addresses schedules touch.

    A small window (a few PTE tables) makes operations collide on pages, tables and
    VMAs, which is where the interesting interleavings are.

    Attributes:
        base: First byte address of the window (page aligned).
        nr_pages: Pages in the window.
        page_size: Bytes per page.
        max_len_pages: Upper bound on the length of a range operation, in pages.

    """

    base: int = 0x100000
    nr_pages: int = 48
    page_size: int = 4096
    max_len_pages: int = 24

    def addr(self, rng: np.random.Generator) -> int:
        """Return a random page address inside the window."""
        return self.base + int(rng.integers(self.nr_pages)) * self.page_size

    def span(self, rng: np.random.Generator) -> tuple[int, int]:
        """Return a random ``(addr, length)`` inside the window (at least one page)."""
        first = int(rng.integers(self.nr_pages))
        n = 1 + int(rng.integers(min(self.max_len_pages, self.nr_pages - first)))
        return self.base + first * self.page_size, n * self.page_size


@dataclass
class Knobs:
    """Probabilities steering the scheduler part of a random schedule.

    Attributes:
        weights: Operation weights for user threads (see :data:`DEFAULT_WEIGHTS`).
        p_step: Probability of stepping an in-progress operation (when one exists)
            rather than starting a new one.
        p_reclaim: Probability that a start goes to kswapd (when it is idle).
        p_fail_nth: Probability of a ``fail_nth`` event instead of anything else.
        max_fail_nth: ``n`` is drawn from ``1..max_fail_nth``.
        p_bad_pin: Probability that unpin / dev I/O names a pin the thread does not own
            (exercises the -EINVAL paths).
        p_compact: Probability that a kthread start is kcompactd's ``compact`` rather
            than kswapd's ``reclaim``.

    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    p_step: float = 0.65
    p_reclaim: float = 0.08
    p_fail_nth: float = 0.01
    max_fail_nth: int = 6
    p_bad_pin: float = 0.05
    p_compact: float = 0.3


def random_config(rng: np.random.Generator, preset: str = "classic",
                  **overrides: Any) -> KernelConfig:
    """Draw a small random kernel configuration for one soak / fuzzing episode.

    Draws the geometry (``small`` 8 or ``tiny`` 4 entries per table), the fault mode
    (mmap_lock or per-VMA lock), split PTLs on or off, and a small frame pool and swap
    device so that memory pressure and pool exhaustion happen.

    Args:
        rng: The episode's generator.
        preset: ``classic``, ``as-posted`` or ``fixed``.
        **overrides: Any :class:`KernelConfig` field, applied last.

    """
    kw: dict[str, Any] = {
        "ptrs_per_pte": int(rng.choice([8, 4])),
        "fault_mode": str(rng.choice(["mmap_lock", "vma_lock"])),
        "split_ptl": bool(rng.random() < 0.75),
        "nr_frames": int(rng.choice([64, 128, 256])),
        "nr_swap_slots": int(rng.choice([8, 32, 128])),
        "max_threads": 6,
        "max_processes": 4,
    }
    kw.update(overrides)
    return KernelConfig.from_preset(preset, **kw)


def _choice(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _weighted(rng: np.random.Generator, pairs: list[tuple[Any, float]]) -> Any:
    w = np.array([p for _, p in pairs], dtype=float)
    return pairs[int(rng.choice(len(pairs), p=w / w.sum()))][0]


def own_pins(k: Kernel, tid: int) -> list[int]:
    """Active pin ids held by the process of thread ``tid``, in id order."""
    pid = k.threads[tid].pid
    return [i for i, p in sorted(k.pins.items()) if p.active and p.pid == pid]


def random_args(rng: np.random.Generator, k: Kernel, tid: int, op: str,
                layout: Layout = Layout(), knobs: Knobs | None = None) -> dict[str, Any]:
    """Random arguments for ``op`` started on thread ``tid`` of kernel ``k``.

    Pin arguments name one of the process's own active pins (or, with probability
    ``knobs.p_bad_pin``, any id); reclaim may target a live process's address.
    """
    knobs = knobs or Knobs()
    if op in ("read", "write"):
        return {"addr": layout.addr(rng)}
    if op == "mmap":
        a, n = layout.span(rng)
        return {"addr": a, "length": n, "prot": _weighted(rng, list(PROTS)),
                "shared": bool(rng.random() < 0.2), "populate": bool(rng.random() < 0.25)}
    if op == "munmap":
        a, n = layout.span(rng)
        return {"addr": a, "length": n}
    if op == "mprotect":
        a, n = layout.span(rng)
        return {"addr": a, "length": n, "prot": _weighted(rng, list(PROTS))}
    if op == "madvise":
        a, n = layout.span(rng)
        w = [("DONTNEED", 3.0), ("FREE", 3.0), ("PAGEOUT", 3.0), ("WIPEONFORK", 1.0),
             ("KEEPONFORK", 0.7), ("DONTFORK", 1.0), ("DOFORK", 0.7)]
        assert {x for x, _ in w} == set(ADVICES)
        return {"addr": a, "length": n, "advice": _weighted(rng, w)}
    if op == "pin":
        return {"addr": layout.addr(rng), "write": bool(rng.random() < 0.5),
                "fast": bool(rng.random() < 0.5)}
    if op in ("unpin", "dev_read", "dev_write"):
        pins = own_pins(k, tid)
        if not pins or rng.random() < knobs.p_bad_pin:
            return {"pin": 1 + int(rng.integers(max(k.next_ids["pin"], 2)))}
        return {"pin": _choice(rng, pins)}
    if op == "numa_hint":
        a, n = layout.span(rng)
        return {"addr": a, "length": n}
    if op in ("clear_refs", "pagemap"):
        pids = [p.pid for p in k.live_procs()]
        pid = _choice(rng, pids) if pids and rng.random() < 0.3 else 0
        if op == "pagemap":
            return {"addr": layout.addr(rng), "pid": pid}
        return {"type": _weighted(rng, [(4, 4.0), (1, 1.0), (2, 0.5), (3, 0.5)]), "pid": pid}
    if op == "mremap":
        a, n = layout.span(rng)
        n = min(n, 8 * layout.page_size)
        new = (1 + int(rng.integers(8))) * layout.page_size
        args: dict[str, Any] = {"addr": a, "old_length": n, "new_length": new,
                                "maymove": bool(rng.random() < 0.85)}
        if args["maymove"] and rng.random() < 0.6:
            args["new_addr"] = layout.addr(rng)
        return args
    if op == "move_pages":
        a, n = layout.span(rng)
        return {"addr": a, "length": min(n, 8 * layout.page_size),
                "all": bool(rng.random() < 0.5)}
    if op in ("reclaim", "compact"):
        nr = 1 + int(rng.integers(8))
        pids = [p.pid for p in k.live_procs()]
        if pids and rng.random() < 0.4:
            return {"nr": nr, "pid": _choice(rng, pids), "addr": layout.addr(rng)}
        return {"nr": nr}
    return {}


def _exit_allowed(k: Kernel, tid: int) -> bool:
    """Keep at least one user thread alive (and not exiting) outside of teardown."""
    others = [t for t in k.live_threads()
              if t.tid not in (KSWAPD_TID, tid) and not (t.gen is not None and t.op == "exit")]
    return bool(others)


def random_user_op(rng: np.random.Generator, k: Kernel, tid: int, layout: Layout = Layout(),
                   knobs: Knobs | None = None) -> tuple[str, dict[str, Any]]:
    """Pick an operation and its arguments for idle user thread ``tid``."""
    knobs = knobs or Knobs()
    pairs = [(op, w) for op, w in knobs.weights.items() if w > 0]
    if not _exit_allowed(k, tid):
        pairs = [(op, w) for op, w in pairs if op != "exit"]
    op = _weighted(rng, pairs)
    return op, random_args(rng, k, tid, op, layout, knobs)


def next_step(rng: np.random.Generator, k: Kernel, layout: Layout = Layout(),
              knobs: Knobs | None = None) -> dict[str, Any] | None:
    """One random scheduler decision that is legal in ``k``'s current state.

    Returns a scenario step dict (not yet applied): ``{"tid", "step": 1}`` to run an
    in-progress operation to its next preemption point, ``{"tid", "start", "args"}``
    to start an operation on an idle thread (kswapd starts ``reclaim``), or
    ``{"event": "fail_nth", "tid", "n"}`` / ``{"event": "pressure_fail_nth", "n"}``.
    Returns None when nothing can happen (no idle and
    no runnable thread: every thread exited, or a deadlock).
    """
    knobs = knobs or Knobs()
    runnable = k.runnable_tids()
    idle = k.idle_tids()
    if rng.random() < knobs.p_fail_nth:
        n = 1 + int(rng.integers(knobs.max_fail_nth))
        # Half the time syzkaller's per-thread /proc/thread-self/fail-nth (the thread's
        # next operation), half the time kernel-wide pressure.
        if idle and rng.random() < 0.5:
            return {"event": "fail_nth", "tid": _choice(rng, idle), "n": n}
        return {"event": "pressure_fail_nth", "n": n}
    if runnable and (not idle or rng.random() < knobs.p_step):
        return {"tid": _choice(rng, runnable), "step": 1}
    if not idle:
        return None
    users = [t for t in idle if t != KSWAPD_TID]
    if KSWAPD_TID in idle and (not users or rng.random() < knobs.p_reclaim):
        kop = ("compact" if knobs.p_compact > 0 and rng.random() < knobs.p_compact
               else "reclaim")
        return {"tid": KSWAPD_TID, "start": kop,
                "args": random_args(rng, k, KSWAPD_TID, kop, layout, knobs)}
    if not users:
        return None
    tid = _choice(rng, users)
    op, args = random_user_op(rng, k, tid, layout, knobs)
    return {"tid": tid, "start": op, "args": args}


def apply(k: Kernel, step: dict[str, Any]) -> None:
    """Apply a step produced here (a thin wrapper over :func:`cowenv.scenario.apply_step`)."""
    from .scenario import apply_step

    apply_step(k, step, {}, {}, 0)


def run_random_schedule(k: Kernel, rng: np.random.Generator, nr_steps: int,
                        layout: Layout = Layout(), knobs: Knobs | None = None,
                        record: bool = True) -> list[dict[str, Any]]:
    """Apply random steps until ``k`` has taken ``nr_steps`` scheduler steps.

    Stops early if nothing can happen. Returns the applied steps (empty when
    ``record`` is False), a schedule that replays to the same trace.
    """
    knobs = knobs or Knobs()
    out: list[dict[str, Any]] = []
    target = k.step_no + nr_steps
    idle_starts = 0
    while k.step_no < target:
        s = next_step(rng, k, layout, knobs)
        if s is None:
            break
        apply(k, s)
        # Guard against a livelock of starts that never step (cannot happen with
        # p_step > 0, but keeps the loop bounded whatever the knobs).
        idle_starts = 0 if "step" in s else idle_starts + 1
        if idle_starts > 10_000:
            break
        if record:
            out.append(s)
    return out


def teardown(k: Kernel, rng: np.random.Generator, max_steps: int = 200_000
             ) -> list[dict[str, Any]]:
    """Finish every operation in progress, then exit every process thread by thread.

    In-progress operations are stepped in a random interleaving. Returns the steps
    applied. Stops stepping when no thread is runnable (a deadlock is then already reported by
    the kernel).
    """
    out: list[dict[str, Any]] = []
    for _ in range(max_steps):
        runnable = k.runnable_tids()
        if not runnable:
            break
        s = {"tid": _choice(rng, runnable), "step": 1}
        apply(k, s)
        out.append(s)
    if not k.quiescent():
        return out
    for t in k.live_threads():
        if t.tid == KSWAPD_TID:
            continue
        s = {"tid": t.tid, "start": "exit", "args": {}}
        apply(k, s)
        out.append(s)
        for _ in range(max_steps):
            if k.threads[t.tid].gen is None or not k.is_runnable(k.threads[t.tid]):
                break  # done, or blocked for good (a deadlock the kernel reported)
            s = {"tid": t.tid, "step": 1}
            apply(k, s)
            out.append(s)
    return out


def leak_report(k: Kernel) -> list[str]:
    """After every process exited: what is still allocated (should be nothing).

    Checks the frame pool (only the zero page stays allocated, once the swap-cache-only
    folios reclaim would free are dropped), page tables, swap slots and pins. These are
    the end states ``check_mm`` and the page allocator's accounting guarantee in the
    kernel.
    """
    out = []
    if k.live_procs():
        out.append(f"{len(k.live_procs())} process(es) still alive")
    # Folios only the swap cache holds are reclaimable, not leaked: reclaim them first.
    k.drain_swap_cache()
    if k.pool.nr_free != k.pool.nr - 1:
        used = np.nonzero(k.pool.flags[1:] & 1)[0] + 1
        out.append(f"{k.pool.nr - 1 - k.pool.nr_free} frame(s) still allocated "
                   f"(first pfns {used[:5].tolist()})")
    if k.tables:
        out.append(f"{len(k.tables)} page table(s) still allocated")
    if len(k.swap.free) != k.swap.nr:
        out.append(f"{k.swap.nr - len(k.swap.free)} swap slot(s) not freed")
    act = [i for i, p in sorted(k.pins.items()) if p.active]
    if act:
        out.append(f"pins still active: {act[:5]}")
    return out


@dataclass
class EpisodeResult:
    """Outcome of one soak episode.

    Attributes:
        seed: The episode's seed.
        config: Its kernel configuration.
        steps: Scheduler steps taken (``k.step_no``), teardown included.
        violations: Signatures and messages of every violation, in order.
        defects: Simulator defects (Python exceptions inside the simulation).
        leaks: :func:`leak_report` after teardown.
        schedule: The applied steps (when recorded).

    """

    seed: int
    config: KernelConfig
    steps: int
    violations: list[str]
    defects: list[str]
    leaks: list[str]
    schedule: list[dict[str, Any]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No violation, no defect, nothing leaked."""
        return not self.violations and not self.defects and not self.leaks

    def scenario(self, name: str | None = None) -> dict[str, Any]:
        """Return the episode as scenario data (for :func:`cowenv.scenario.save_scenario`).

        Requires the episode to have been run with ``record=True``.
        """
        return {"version": 1, "name": name or f"soak-{self.seed}",
                "description": f"random schedule, seed {self.seed}",
                "config": self.config.to_dict(), "seed": self.seed,
                "steps": [dict(s) for s in self.schedule], "expect": {"violation": None}}


def run_episode(seed: int, nr_steps: int, preset: str = "classic", *,
                layout: Layout | None = None, knobs: Knobs | None = None,
                oracles: bool = True, record: bool = False,
                **config_overrides: Any) -> EpisodeResult:
    """Run one soak episode.

    A random config, a random schedule of ``nr_steps`` scheduler steps, teardown, a full
    accounting check and a leak check.

    Args:
        seed: Seeds the one ``numpy`` generator the episode uses.
        nr_steps: Scheduler steps before teardown.
        preset: ``classic``, ``as-posted`` or ``fixed``.
        layout: Address window (default :class:`Layout`).
        knobs: Scheduling knobs (default :class:`Knobs`).
        oracles: Attach the oracles (False only for raw-speed measurements).
        record: Keep the schedule (for saving a failing episode as a scenario).
        **config_overrides: :class:`KernelConfig` fields.

    """
    rng = np.random.default_rng(seed)
    cfg = random_config(rng, preset, **config_overrides)
    k = make_kernel(cfg, oracles=oracles, trace=False)
    layout = layout or Layout()
    steps = run_random_schedule(k, rng, nr_steps, layout, knobs, record=record)
    steps += teardown(k, rng)
    if k.oracle is not None and k.quiescent():
        k.oracle.check_accounting()
    vs = [f"{v.signature}: {v.message} (step {v.step})" for v in k.violations]
    return EpisodeResult(seed, cfg, k.step_no, vs, list(k.defects),
                         leak_report(k) if k.quiescent() else ["not quiescent"],
                         steps if record else [])


__all__ = ["DEFAULT_WEIGHTS", "PROTS", "Layout", "Knobs", "random_config", "random_args",
           "random_user_op", "next_step", "apply", "run_random_schedule", "teardown",
           "leak_report", "EpisodeResult", "run_episode", "own_pins"]
