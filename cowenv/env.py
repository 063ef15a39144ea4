"""The Gymnasium environment for adversarial fault scheduling.

An agent schedules threads, syscalls and memory pressure against the simulated kernel
and is rewarded for driving it into invariant violations.

The environment is a thin adapter (BRIEF §7): it decodes catalogue actions into the
kernel's scheduler API (:meth:`Kernel.start`, :meth:`Kernel.step`, :meth:`Kernel.event`),
encodes the kernel's public state as a fixed-size observation and legal-action mask, and
turns the oracles' findings into rewards. Every kernel decision lives in
:mod:`cowenv.kernel`, which never imports gymnasium.

Two ids are registered (on ``import cowenv`` and through the ``gymnasium.envs`` entry
point, :func:`register_envs`): ``cowenv/CowPte-v0`` (x86-64 geometry, the as-posted
patch) and ``cowenv/CowPteSmall-v0`` (8 entries per table: fast RL episodes).
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from . import ENV_ID, SMALL_ENV_ID, SMALL_KWARGS
from .kernel import KSWAPD_TID, Kernel, KernelUsageError, make_kernel
from .kernel.config import GEOMETRIES, PRESETS, KernelConfig
from .kernel.locks import LOCK_ORDER, WRITE
from .kernel.mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    MMF_COW_PTE,
    MMF_COW_PTE_READY,
    MMF_HAS_PINNED,
)
from .kernel.ops import OPS
from .kernel.trace import Violation, trace_hash
from .scenario import FORMAT_VERSION, ScenarioError, StepError, apply_step, parse_scenario

_OP_NAMES: tuple[str, ...] = tuple(OPS)
_THREAD_STATES = ("exited", "idle", "runnable", "blocked")
_PIN_OPS = ("unpin", "dev_read", "dev_write")
_PIN_VARIANTS = ((False, False), (True, False), (False, True), (True, True))
_RECLAIM_NR = (1, 8)
_FAIL_NTH = (1, 2, 3)
#: Hash buckets for preemption labels not found by the source scan.
LABEL_OVERFLOW_BUCKETS = 16
#: Calls whose last (string constant) argument is a lock site ``s`` that yields ``s:wait``.
_WAIT_SITE_CALLS = ("lock", "pte_offset_map_lock", "rmap_walk_anon", "_rmap_map_pte")


# ------------------------------------------------------------------------ labels
@functools.lru_cache(maxsize=1)
def label_vocabulary() -> tuple[str, ...]:
    """Every preemption label the kernel source can yield, sorted.

    Found by parsing ``cowenv/kernel/*.py``: string constants yielded by a generator
    (``yield "copy_pte_range:table_done"``), ``<site>:wait`` for each constant lock site
    passed to the lock helpers, and ``<op>:done`` for every operation. Labels built at
    run time from a variable site are not found here; they fall into
    :data:`LABEL_OVERFLOW_BUCKETS` CRC-32 buckets.

    Returns:
        The sorted vocabulary (deterministic for a given kernel source).

    """
    found: dict[str, None] = {}
    root = Path(__file__).resolve().parent / "kernel"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Yield) and isinstance(node.value, ast.Constant):
                v = node.value.value
                if isinstance(v, str) and ":" in v:
                    found[v] = None
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in _WAIT_SITE_CALLS and node.args):
                last = node.args[-1]
                if isinstance(last, ast.Constant) and isinstance(last.value, str):
                    found[f"{last.value}:wait"] = None
    for op in OPS:
        found[f"{op}:done"] = None
    return tuple(sorted(found))


# ------------------------------------------------------------------------ workload
def table_bytes(ptrs_per_pte: int, page_size: int = 4096) -> int:
    """Bytes one PTE table maps (one PMD entry)."""
    return ptrs_per_pte * page_size


def default_workload(ptrs_per_pte: int, page_size: int = 4096) -> list[dict[str, Any]]:
    """Return the default starting workload: scenario steps run to completion at reset.

    The parent (tid 1) maps three private anonymous regions laid out so that the
    interesting page-table shapes exist from the start (``T`` = bytes per PTE table):

    * ``A`` = ``[16T, 18T)``: two whole tables, populated (MAP_POPULATE);
    * ``B`` = ``[20.5T, 21.5T)``: one table's worth straddling two PMDs, populated;
    * ``C`` = ``[21.5T, 22T)``: the rest of ``B``'s second PMD (two VMAs in one
      table), one page written.

    then enables COW PTE (``prctl(PR_SET_COW_PTE)``) and clones a second thread (tid 2)
    so that faults, walkers and fork can interleave within one mm. Nothing is forked:
    that (and everything after it) is the agent's choice.

    Args:
        ptrs_per_pte: Entries per PTE table.
        page_size: Bytes per page.

    Returns:
        A list of scenario steps (``{tid, do, args}``).

    """
    T = table_bytes(ptrs_per_pte, page_size)
    half = max(page_size, (ptrs_per_pte // 2) * page_size)
    a, b = 16 * T, 20 * T + half
    c = b + T
    return [
        {"tid": 1, "do": "mmap", "args": {"addr": a, "length": 2 * T, "populate": True}},
        {"tid": 1, "do": "mmap", "args": {"addr": b, "length": T, "populate": True}},
        {"tid": 1, "do": "mmap", "args": {"addr": c, "length": 22 * T - c}},
        {"tid": 1, "do": "write", "args": {"addr": c}},
        {"tid": 1, "do": "prctl_cow_pte"},
        {"tid": 1, "do": "clone"},
    ]


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            return None
    return None


def workload_regions(steps: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Return the ``(addr, length)`` of every ``mmap`` in a workload, in order, once."""
    out: list[tuple[int, int]] = []
    for s in steps:
        if (s.get("do") or s.get("start")) != "mmap":
            continue
        args = s.get("args") or {}
        addr, length = _as_int(args.get("addr")), _as_int(args.get("length"))
        if addr is None or length is None or (addr, length) in out:
            continue
        out.append((addr, length))
    return out


# ------------------------------------------------------------------------ actions
@dataclass(frozen=True)
class ActionSpec:
    """One entry of the action catalogue.

    Attributes:
        kind: ``run`` (step thread ``tid``), ``start`` (start ``op`` on idle ``tid``)
            or ``event`` (``fail_nth`` with ``n``).
        tid: Thread id (0 = kswapd); -1 for events.
        op: Operation name for ``start``.
        args: Fixed arguments, as sorted ``(name, value)`` pairs.
        pin_slot: For unpin/dev_read/dev_write: index of the pin among the thread's
            process's active pins (oldest first); the pin id is bound when the action
            is taken. -1 otherwise.
        proc_slot: For targeted reclaim: the live process (by pid order) whose page
            at ``addr`` is reclaimed first; its pid is bound when the action is taken.
        n: ``fail_nth`` argument.

    """

    kind: str
    tid: int = -1
    op: str = ""
    args: tuple[tuple[str, Any], ...] = ()
    pin_slot: int = -1
    proc_slot: int = -1
    n: int = 0

    def describe(self) -> str:
        """Short human-readable form, e.g. ``t1 start madvise(addr=0x..., ...)``."""
        if self.kind == "run":
            return f"t{self.tid} run"
        if self.kind == "event":
            return f"fail_nth n={self.n}"
        parts = [f"{k}={v:#x}" if k in ("addr", "length") and isinstance(v, int) and v >= 0
                 else f"{k}={v}" for k, v in self.args]
        if self.pin_slot >= 0:
            parts.append(f"pin=<slot {self.pin_slot}>")
        if self.proc_slot >= 0:
            parts.append(f"pid=<slot {self.proc_slot}>")
        who = f"t{self.tid} " if self.tid >= 0 else ""
        return f"{who}start {self.op}({', '.join(parts)})"


#: Stands for an illegal action (nothing changed but the episode clock).
_NOOP = ActionSpec("noop")


def _thread_label(k: Kernel, tid: int) -> str:
    """Where thread ``tid`` stands: its preemption label, or ``<op>:done`` when idle."""
    t = k.threads[tid]
    return t.label if t.gen is not None else f"{t.op}:done"


def _readable_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as a schedule writes them: addresses in hex (the loader parses them)."""
    types = {a.name: a.type for a in OPS[op].args}
    return {a: (hex(v) if types.get(a) == "addr" and isinstance(v, int) and v >= 0 else v)
            for a, v in args.items()}


def _tmpl(op: str, pin_slot: int = -1, proc_slot: int = -1, **args: Any) -> ActionSpec:
    return ActionSpec("start", -1, op, tuple(sorted(args.items())), pin_slot, proc_slot)


def build_templates(regions: list[tuple[int, int]], ptrs_per_pte: int, page_size: int,
                    pin_slots: int) -> list[ActionSpec]:
    """User-thread operation templates drawn from the workload's regions.

    Per region the pages are grouped into *portions* (the part of the region inside
    one PMD). Addresses: the first, second and last page of every portion. Ranges:
    every region, every portion, the first half of every portion (a partial PMD) and
    its first page.

    Returns:
        Templates (``tid`` unset), in catalogue order.

    """
    P, ps = ptrs_per_pte, page_size
    portions: list[tuple[int, int]] = []
    for addr, length in regions:
        s, e = addr // ps, (addr + length) // ps
        for idx in range(s // P, (e - 1) // P + 1):
            p = (max(s, idx * P), min(e, (idx + 1) * P))
            if p not in portions:
                portions.append(p)
    pts: list[int] = []
    for lo, hi in portions:
        for v in (lo, lo + 1, hi - 1):
            if lo <= v < hi and v not in pts:
                pts.append(v)
    firsts = [lo for lo, _ in portions]
    big: list[tuple[int, int]] = []
    for addr, length in regions:
        r = (addr // ps, length // ps)
        if r not in big:
            big.append(r)
    for lo, hi in portions:
        if (lo, hi - lo) not in big:
            big.append((lo, hi - lo))
    halves = [(lo, (hi - lo) // 2) for lo, hi in portions if hi - lo >= 2]
    halves = [r for i, r in enumerate(halves) if r not in big and r not in halves[:i]]
    singles = [(lo, 1) for lo, hi in portions if (lo, 1) not in big and (lo, 1) not in halves]
    out: list[ActionSpec] = []
    for v in pts:
        out.append(_tmpl("read", addr=v * ps))
        out.append(_tmpl("write", addr=v * ps))
    for v in firsts:
        for w, f in _PIN_VARIANTS:
            out.append(_tmpl("pin", addr=v * ps, write=w, fast=f))
    for j in range(pin_slots):
        for op in _PIN_OPS:
            out.append(_tmpl(op, pin_slot=j))
    for r in big + halves:
        for prot in ("none", "r", "rw"):
            out.append(_tmpl("mprotect", addr=r[0] * ps, length=r[1] * ps, prot=prot))
    for r in big + halves + singles:
        for adv in ("DONTNEED", "FREE"):
            out.append(_tmpl("madvise", addr=r[0] * ps, length=r[1] * ps, advice=adv))
    for r in big:
        out.append(_tmpl("madvise", addr=r[0] * ps, length=r[1] * ps, advice="PAGEOUT"))
    for r in big + halves:
        for adv in ("WIPEONFORK", "DONTFORK"):
            out.append(_tmpl("madvise", addr=r[0] * ps, length=r[1] * ps, advice=adv))
    for r in big + halves:
        out.append(_tmpl("munmap", addr=r[0] * ps, length=r[1] * ps))
    for addr, length in regions:
        out.append(_tmpl("mmap", addr=addr, length=length, populate=True))
        out.append(_tmpl("mmap", addr=addr, length=length))
    for op in ("fork", "clone", "exit", "prctl_cow_pte"):
        out.append(_tmpl(op))
    return out


def build_kswapd_templates(regions: list[tuple[int, int]], ptrs_per_pte: int,
                           page_size: int, max_processes: int) -> list[ActionSpec]:
    """Build the kswapd templates.

    ``reclaim`` of 1 or 8 pages, and a 1-page reclaim that starts with the page mapped
    at the first page of each portion in each process slot.
    """
    P, ps = ptrs_per_pte, page_size
    out = [ActionSpec("start", KSWAPD_TID, "reclaim", (("nr", n),)) for n in _RECLAIM_NR]
    firsts: list[int] = []
    for addr, length in regions:
        s, e = addr // ps, (addr + length) // ps
        for idx in range(s // P, (e - 1) // P + 1):
            v = max(s, idx * P)
            if v not in firsts:
                firsts.append(v)
    for slot in range(max_processes):
        for v in firsts:
            out.append(ActionSpec("start", KSWAPD_TID, "reclaim",
                                  (("addr", v * ps), ("nr", 1)), proc_slot=slot))
    return out


# ------------------------------------------------------------------------ objectives
@dataclass
class StepOutcome:
    """What one env step did, handed to the objective.

    Attributes:
        spec: The catalogue entry taken.
        record: The scenario step recorded for it (None for an illegal action).
        label: Preemption label reached (``run`` actions), else "".
        violations: Violations reported during this step (all, in order).
        new_signatures: Signatures first seen in this episode during this step
            (``simulator`` defects excluded).
        new_labels: Number of preemption labels reached for the first time this
            episode during this step.
        illegal: The action was illegal (a no-op).

    """

    spec: ActionSpec
    record: dict[str, Any] | None
    label: str
    violations: list[Violation]
    new_signatures: list[str]
    new_labels: int
    illegal: bool


class Objective:
    """What the agent is rewarded for. Subclass and :func:`register_objective` it.

    The env calls :meth:`reset` after the workload has run and :meth:`step` after every
    action (never for an illegal one: those always earn 0). An objective reads the
    kernel through its public API; it must be deterministic.

    Args:
        env: The environment (read its settings; do not step it).
        **kwargs: Objective-specific settings (the env's ``objective_kwargs``).

    """

    name: ClassVar[str] = ""

    def __init__(self, env: CowEnv, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"objective_kwargs: {self.name} takes no {sorted(kwargs)[0]!r}")
        self.env = env

    def reset(self, kernel: Kernel) -> dict[str, Any]:
        """Start of an episode; returns extra reset ``info`` entries."""
        return {}

    def step(self, kernel: Kernel, outcome: StepOutcome) -> tuple[float, bool, dict[str, Any]]:
        """Score one legal action.

        Returns:
            ``(reward, terminated, extra info)``.

        """
        raise NotImplementedError


class ViolationObjective(Objective):
    """The ``violation`` objective.

    ``violation_reward`` for a step that reports a violation signature new in this
    episode (once per step, however many oracles fire; the episode ends if
    ``terminate_on_violation``), plus ``novelty_coef`` per preemption label reached for
    the first time this episode.
    """

    name = "violation"

    def step(self, kernel: Kernel, outcome: StepOutcome) -> tuple[float, bool, dict[str, Any]]:  # noqa: D102
        env = self.env
        r = env.violation_reward if outcome.new_signatures else 0.0
        r += env.novelty_coef * outcome.new_labels
        done = bool(outcome.new_signatures) and env.terminate_on_violation
        return float(r), done, {}


#: Objective name -> class. ``fork_cost`` is added by the cost model's module.
OBJECTIVES: dict[str, type[Objective]] = {"violation": ViolationObjective}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` available as ``objective=cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError("objective classes need a non-empty name")
    OBJECTIVES[cls.name] = cls
    return cls


# ------------------------------------------------------------------------ the env
class CowEnv(gym.Env):
    """Adversarial fault scheduling against a simulated Linux mm with COW PTE tables.

    ## Description

    The simulated kernel (:mod:`cowenv.kernel`) runs user threads and kswapd as
    generators that stop at preemption points (``handle_cow_pte_fault:pmd_cleared``,
    ``copy_pte_range:table_done``, ``<site>:wait`` while blocked on a lock, …). The agent
    is the scheduler: at every step it runs one thread to its next preemption point,
    starts a system call on an idle thread, or fires a memory-pressure event. Oracles
    (isolation, pin coherence, accounting, memory safety, shared-table writes, lock
    discipline, syscall contracts) report violations; the ``violation`` objective pays
    for each signature (``kind@site``) new in the episode. By default the kernel is the
    COW PTE v4 patch as posted (all flaws on), x86-64 geometry.

    ## Action Space

    ``Discrete(n)``, a fixed catalogue (``self.catalogue``, each entry an
    :class:`ActionSpec`; ``describe_action(a)`` prints one). With ``N = max_threads``
    and ``U`` user templates:

    | indices | action |
    |---|---|
    | ``0 … N`` | run thread ``t`` one preemption point (``t = 0`` is kswapd) |
    | ``N+1 … N+N·U`` | start user template ``j`` on thread ``t``: index ``N+1+(t-1)·U+j`` |
    | next ``K`` | start kswapd template ``j``: reclaim 1 or 8 pages, or 1 page starting |
    |  | with the page at a portion's first page in a chosen process slot |
    | last 3 | ``fail_nth`` with ``n = 1, 2, 3`` (the n-th next allocation fails) |

    User templates, drawn from the workload's regions (a *portion* is the part of a
    region inside one PMD): ``read``/``write`` of the first, second and last page of
    each portion; ``pin`` of each portion's first page (R/O or R/W, slow or GUP-fast);
    ``unpin``/``dev_read``/``dev_write`` of pin slot 0 or 1 (the thread's process's
    oldest active pins); ``mprotect`` none / r / rw, ``madvise`` DONTNEED / FREE / PAGEOUT /
    WIPEONFORK / DONTFORK and ``munmap`` over regions, portions, half-portions (partial
    PMDs) and first pages; ``mmap`` of each region again (populated or not); ``fork``,
    ``clone``, ``exit``, ``prctl_cow_pte``.

    :meth:`action_masks` (sb3-contrib ``MaskablePPO`` convention; also
    ``info["action_mask"]``) marks legal actions: run a runnable thread, start on an idle
    thread (pin templates only while the pin slot is filled, targeted reclaim only for a
    live process slot), events always. An illegal action is a no-op: reward 0,
    ``info["illegal_action"] = True``; it still counts towards ``max_steps``.

    ## Observation Space

    ``Box(0, 1, (d,), float32)``, concatenating (offsets in ``self.obs_layout``):

    * per thread ``t = 0 … N`` (0 = kswapd): state one-hot (exited/absent, idle,
      runnable, blocked); preemption label id (``(slot + 1) / L``, 0 = none); running
      operation one-hot; process slot one-hot; locks held per lock class (``mmap_lock``,
      ``vma_lock``, ``anon_vma``, ``page_table_lock``, ``ptl``: 1 write, 0.5 read);
      lock class awaited one-hot, and whether for write;
    * per process slot (live processes in pid order, ``max_processes``): alive; rss
      (anon, swap entries, shmem) over the workload's pages; ``nr_ptes`` over the PMD
      slots; ``MMF_HAS_PINNED``, ``MMF_COW_PTE_READY``, ``MMF_COW_PTE``; threads; mmap_lock
      readers, writer, waiters; ``page_table_lock`` held; active pins; ``write_protect_seq``
      odd (fork in progress);
    * per process slot × PMD slot (the PMDs the workload's regions span): PMD present,
      PMD writable, table refcount / ``max_processes``, table's PTL held, table freed,
      and for each process slot whether it points at the very same table (sharing);
    * pressure: pending ``fail_nth`` / 3, free frames, free swap slots, active pins,
      kernel quiescent, episode progress;
    * coverage bitmap of the ``L`` label slots reached this episode (the sorted
      :func:`label_vocabulary` plus 16 CRC-32 overflow buckets).

    ## Rewards

    ``objective="violation"``: ``violation_reward`` (default 10) for a step that reports a
    violation signature new in this episode (once per step, however many oracles fire;
    ``simulator`` defects excluded), plus
    ``novelty_coef`` (default 0, off) per label reached for the first time this
    episode. Illegal actions earn 0. ``info["violations"]`` lists the step's violations
    (kind, site, signature, step, message, tid, new); ``info["events"]`` the step's
    kernel trace events (:class:`cowenv.kernel.trace.Event` named tuples
    ``(step, tid, kind, label, data)``, shared with the kernel's trace: do not mutate).
    Other objectives plug in through :func:`register_objective` (``fork_cost`` lives
    with the cost model).

    ## Starting State

    A fresh kernel runs the workload (default :func:`default_workload`: three regions
    spanning four PMDs, populated, COW PTE enabled, a second thread) to completion.
    The kernel is deterministic; ``reset(seed=...)`` seeds ``self.np_random`` and the seed
    is recorded in :meth:`get_schedule`.

    ## Episode End

    Terminated: a new violation signature with ``terminate_on_violation`` (default),
    or no user thread left and nothing running. Truncated: ``max_steps`` actions
    (default 256), or a simulator defect (``info["simulator_defect"]``).

    ## Arguments

    ``gymnasium.make("cowenv/CowPte-v0", **kwargs)``; every argument is optional:

    * ``preset`` — ``as-posted`` (default), ``fixed`` or ``classic``; or ``variant``
      (``classic``/``cowpte``) plus ``flaws`` (list of flaw ids);
    * ``geometry`` — ``x86_64`` (512 entries per table, default), ``small`` (8),
      ``tiny`` (4) or an int; ``nr_frames`` (default 4096, 256 for geometries under
      64 entries), ``nr_swap_slots`` (``nr_frames // 4``), ``fault_mode``
      (``mmap_lock``/``vma_lock``), ``split_ptl``, ``lockdep`` (``CONFIG_PROVE_LOCKING``);
    * ``workload`` — scenario steps run at reset (default :func:`default_workload`),
      ``regions`` — ``[(addr, length)]`` the templates draw from (default: the
      workload's mmaps);
    * ``max_threads`` (4), ``max_processes`` (3), ``max_steps`` (256),
      ``pin_slots`` (2), ``pmd_slots`` (8, cap on observed PMDs);
    * ``objective`` (``violation``), ``objective_kwargs``, ``violation_reward`` (10.0),
      ``terminate_on_violation`` (True), ``novelty_coef`` (0.0), ``ignore_signatures``
      (signatures that count as already found: no reward, no termination — a campaign
      passes what it has found so far);
    * ``render_mode`` — ``ansi`` or ``rgb_array``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi", "rgb_array"],
                                          "render_fps": 4}

    def __init__(self, preset: str | None = None, variant: str | None = None,
                 flaws: list[str] | tuple[str, ...] | None = None,
                 geometry: str | int = "x86_64", nr_frames: int | None = None,
                 nr_swap_slots: int | None = None, fault_mode: str = "mmap_lock",
                 split_ptl: bool = True, lockdep: bool = True,
                 workload: list[dict[str, Any]] | None = None,
                 regions: list[tuple[int, int]] | None = None, max_threads: int = 4,
                 max_processes: int = 3, max_steps: int = 256, pin_slots: int = 2,
                 pmd_slots: int = 8, objective: str = "violation",
                 objective_kwargs: dict[str, Any] | None = None,
                 violation_reward: float = 10.0, terminate_on_violation: bool = True,
                 novelty_coef: float = 0.0, ignore_signatures: list[str] | None = None,
                 render_mode: str | None = None) -> None:
        self._init_kwargs: dict[str, Any] = {
            k: copy.deepcopy(v) for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.config = self._make_config(preset, variant, flaws, geometry, nr_frames,
                                        nr_swap_slots, fault_mode, split_ptl, lockdep,
                                        max_threads, max_processes)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode: expected one of "
                             f"{', '.join(self.metadata['render_modes'])}, got {render_mode!r}")
        self.render_mode = render_mode
        if max_steps < 1:
            raise ValueError("max_steps: expected >= 1")
        if not 0 <= pin_slots <= 8:
            raise ValueError("pin_slots: expected 0..8")
        if pmd_slots < 1:
            raise ValueError("pmd_slots: expected >= 1")
        self.max_steps = int(max_steps)
        self.violation_reward = float(violation_reward)
        self.terminate_on_violation = bool(terminate_on_violation)
        self.novelty_coef = float(novelty_coef)
        self.ignore_signatures: tuple[str, ...] = tuple(ignore_signatures or ())
        for sig in self.ignore_signatures:
            if not isinstance(sig, str) or "@" not in sig:
                raise ValueError(f"ignore_signatures: expected 'kind@site' strings, got {sig!r}")
        P, ps = self.config.ptrs_per_pte, self.config.page_size
        wl = default_workload(P, ps) if workload is None else copy.deepcopy(list(workload))
        try:
            sc = parse_scenario({"config": self.config.to_dict(), "steps": wl}, "<workload>")
        except ScenarioError as e:
            raise ValueError(f"workload: {e}") from None
        self.workload: list[dict[str, Any]] = wl
        self._workload_steps = sc.steps
        regs = workload_regions(wl) if regions is None else [(int(a), int(n)) for a, n in regions]
        if not regs:
            raise ValueError("regions: the workload maps nothing; pass regions=[(addr, length)]")
        for a, n in regs:
            if a % ps or n % ps or n <= 0 or a < 0:
                raise ValueError(f"regions: ({a:#x}, {n:#x}) is not page-aligned")
        self.regions = regs
        self.region_pages = max(1, sum(n // ps for _, n in regs))
        idxs: list[int] = []
        for a, n in regs:
            for idx in range((a // ps) // P, ((a + n) // ps - 1) // P + 1):
                if idx not in idxs:
                    idxs.append(idx)
        self.pmd_indices: tuple[int, ...] = tuple(sorted(idxs)[:pmd_slots])

        # Catalogue.
        NT = self.config.max_threads
        self._user_templates = build_templates(regs, P, ps, pin_slots)
        self._ks_templates = build_kswapd_templates(regs, P, ps, self.config.max_processes)
        cat: list[ActionSpec] = [ActionSpec("run", t) for t in range(NT + 1)]
        self._user_lo = len(cat)
        self._n_user = len(self._user_templates)
        for tid in range(1, NT + 1):
            for tp in self._user_templates:
                cat.append(ActionSpec("start", tid, tp.op, tp.args, tp.pin_slot, tp.proc_slot))
        self._ks_lo = len(cat)
        cat.extend(self._ks_templates)
        self._ev_lo = len(cat)
        cat.extend(ActionSpec("event", n=n) for n in _FAIL_NTH)
        self.catalogue: tuple[ActionSpec, ...] = tuple(cat)
        # Mask of a user block by number of active pins of the thread's process, and of
        # the kswapd block by number of live processes.
        self._user_masks = [np.array([tp.pin_slot < h for tp in self._user_templates])
                            for h in range(pin_slots + 1)]
        self._ks_masks = [np.array([tp.proc_slot < n for tp in self._ks_templates])
                          for n in range(self.config.max_processes + 1)]
        self._user_any = [bool(x.any()) for x in self._user_masks]
        self._ks_any = [bool(x.any()) for x in self._ks_masks]
        self._ncat = len(cat)
        self.action_space = spaces.Discrete(len(cat))

        # Labels.
        self.label_vocab = label_vocabulary()
        self.n_label_slots = len(self.label_vocab) + LABEL_OVERFLOW_BUCKETS
        self._label_slot: dict[str, int] = {lb: i for i, lb in enumerate(self.label_vocab)}
        self._op_index = {op: i for i, op in enumerate(_OP_NAMES)}
        self._lock_class = {c: i for i, c in enumerate(LOCK_ORDER)}

        # Observation layout.
        NP, NS, NL = self.config.max_processes, len(self.pmd_indices), len(LOCK_ORDER)
        self._ft = 4 + 1 + len(_OP_NAMES) + NP + NL + NL + 1
        self._fp = 15
        self._fm = 5 + NP
        layout: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in (("threads", (NT + 1) * self._ft), ("processes", NP * self._fp),
                           ("pmds", NP * NS * self._fm), ("pressure", 6),
                           ("coverage", self.n_label_slots)):
            layout[name] = (off, off + size)
            off += size
        self.obs_layout = layout
        self.observation_space = spaces.Box(0.0, 1.0, (off,), dtype=np.float32)
        self._obs = np.zeros(off, dtype=np.float32)
        # Scalar stores and loads go through a memoryview of the same buffer: same float32
        # rounding as numpy's, about twice as fast on single elements.
        self._ov = memoryview(self._obs)
        self._cov0 = layout["coverage"][0]
        self._p0 = layout["processes"][0]
        self._m0 = layout["pmds"][0]
        self._x0 = layout["pressure"][0]
        # Blank state of everything but the coverage: every thread slot "absent".
        self._blank = np.zeros(self._cov0, dtype=np.float32)
        self._blank[0:(NT + 1) * self._ft:self._ft] = 1.0
        self._t_proc = 5 + len(_OP_NAMES)
        self._t_held = self._t_proc + NP
        self._inv_L = 1.0 / self.n_label_slots
        self._swap_nr = max(1, self.config.nr_swap_slots)
        self._pins_active = 0

        if objective == "fork_cost" and objective not in OBJECTIVES:
            from . import objectives  # noqa: F401  (registers fork_cost with the cost model)
        if objective not in OBJECTIVES:
            hint = " (added by the fork-cost model once it lands)" if objective == "fork_cost" \
                else ""
            raise ValueError(f"objective: expected one of {', '.join(sorted(OBJECTIVES))}, "
                             f"got {objective!r}{hint}")
        self.objective_name = objective
        self.objective = OBJECTIVES[objective](self, **dict(objective_kwargs or {}))

        # Episode state (set by reset).
        self._kernel: Kernel | None = None
        self._actions: list[int] = []
        self._recorded: list[dict[str, Any]] = []
        self._labels: list[str | None] = []
        self._wl_labels: list[str | None] = []
        self._illegal_n = 0
        self._return = 0.0
        self._names: dict[str, Any] = {}
        self._pending: dict[int, dict] = {}
        self._elapsed = 0
        self._episode_seed = 0
        self._seen: dict[str, None] = {}
        self._nv = 0
        self._ne = 0
        self._cov_n = 0
        self._mask = np.zeros(len(cat), dtype=bool)
        self._done = False
        self._last_label = ""

    # ----------------------------------------------------------------- construction
    @staticmethod
    def _make_config(preset: str | None, variant: str | None, flaws: Any, geometry: Any,
                     nr_frames: int | None, nr_swap_slots: int | None, fault_mode: str,
                     split_ptl: bool, lockdep: bool, max_threads: int,
                     max_processes: int) -> KernelConfig:
        if preset is not None and variant is not None:
            raise ValueError("preset/variant: give one or the other")
        if preset is None and variant is None:
            preset = "as-posted"
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
            variant, pflaws = PRESETS[preset]
            if flaws is None:
                flaws = pflaws
        if isinstance(geometry, str):
            if geometry not in GEOMETRIES:
                raise ValueError(f"geometry: expected one of {', '.join(GEOMETRIES)} or an int")
            P = GEOMETRIES[geometry]
        elif isinstance(geometry, int) and not isinstance(geometry, bool):
            P = geometry
        else:
            raise ValueError("geometry: expected a preset name or an int (entries per table)")
        if nr_frames is None:
            nr_frames = 4096 if P >= 64 else 256
        if nr_swap_slots is None:
            nr_swap_slots = nr_frames // 4
        return KernelConfig(variant=variant, flaws=tuple(flaws or ()), ptrs_per_pte=P,
                            nr_frames=nr_frames, nr_swap_slots=nr_swap_slots,
                            fault_mode=fault_mode, split_ptl=split_ptl, lockdep=lockdep,
                            max_threads=max_threads, max_processes=max_processes)

    # ----------------------------------------------------------------- public helpers
    @property
    def kernel(self) -> Kernel:
        """The current episode's kernel (read it; drive it only through :meth:`step`)."""
        if self._kernel is None:
            raise RuntimeError("call reset() first")
        return self._kernel

    def describe_action(self, action: int) -> str:
        """Human-readable form of catalogue entry ``action``."""
        return self.catalogue[int(action)].describe()

    def run_action(self, tid: int) -> int:
        """Catalogue index of "run thread ``tid``"."""
        return int(tid)

    def start_action(self, tid: int, template: int) -> int:
        """Catalogue index of "start user template ``template`` on thread ``tid``"."""
        return self._user_lo + (int(tid) - 1) * self._n_user + int(template)

    def find_actions(self, op: str | None = None, tid: int | None = None,
                     pin_slot: int | None = None, proc_slot: int | None = None,
                     **args: Any) -> list[int]:
        """Return the catalogue indices of actions matching ``op``, ``tid`` and ``args``.

        Example: ``env.find_actions("write", tid=1, addr=0x2000000)``. Arguments not
        given match anything; ``op="run"`` finds run actions; ``pin_slot`` and
        ``proc_slot`` select the late-bound pin / process of a template.
        """
        out = []
        for i, sp in enumerate(self.catalogue):
            if op == "run":
                if sp.kind == "run" and (tid is None or sp.tid == tid):
                    out.append(i)
                continue
            if sp.kind != "start" or (op is not None and sp.op != op):
                continue
            if (tid is not None and sp.tid != tid) or (
                    pin_slot is not None and sp.pin_slot != pin_slot) or (
                    proc_slot is not None and sp.proc_slot != proc_slot):
                continue
            a = dict(sp.args)
            if all(a.get(key) == v for key, v in args.items()):
                out.append(i)
        return out

    @property
    def user_templates(self) -> tuple[ActionSpec, ...]:
        """The user-thread templates (``tid`` unset), in catalogue order."""
        return tuple(self._user_templates)

    def action_masks(self) -> np.ndarray:
        """Legal actions now (bool array over the catalogue)."""
        return self._mask.copy()

    # ----------------------------------------------------------------- gymnasium API
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode: a fresh kernel runs the workload.

        Args:
            seed: Seeds ``self.np_random`` (recorded in the schedule).
            options: Unused.

        Returns:
            ``(observation, info)``; info has ``action_mask``, ``violations`` (any the
            workload itself triggered) and ``coverage``.

        Raises:
            RuntimeError: the workload cannot run on this configuration.

        """
        super().reset(seed=seed)
        self._episode_seed = int(self.np_random_seed) if self.np_random_seed >= 0 else 0
        k = make_kernel(self.config)
        self._kernel = k
        self._names, self._pending = {}, {}
        self._wl_labels = []
        for i, s in enumerate(self._workload_steps):
            before = k.step_no
            try:
                apply_step(k, copy.deepcopy(s), self._names, self._pending, i)
            except (StepError, KernelUsageError) as e:
                raise RuntimeError(f"workload step {i}: {e}") from None
            tid = s.get("tid")
            self._wl_labels.append(_thread_label(k, tid) if tid is not None
                                   and k.step_no != before else None)
        self._actions, self._recorded, self._labels = [], [], []
        self._illegal_n, self._return = 0, 0.0
        self._elapsed = 0
        self._done = False
        self._last_label = ""
        self._seen = dict.fromkeys(self.ignore_signatures)
        for v in k.violations:
            if v.kind != "simulator":
                self._seen[v.signature] = None
        self._nv, self._ne = len(k.violations), len(k.events)
        self._obs[:] = 0.0
        self._cov_n = 0
        self._pins_active = 0
        cov0, _ = self.obs_layout["coverage"]
        ov = self._ov
        for lb in k.coverage:
            s = self._slot(lb)
            if ov[cov0 + s] == 0.0:
                ov[cov0 + s] = 1.0
                self._cov_n += 1
        info = self.objective.reset(k)
        self._compute_mask()
        obs = self._encode()
        info.update({"action_mask": self._mask.copy(),
                     "violations": [v.to_dict() for v in k.violations],
                     "coverage": self._cov_n})
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Take catalogue action ``action`` (see the class docstring).

        An illegal or out-of-range action is a no-op with ``info["illegal_action"]``.

        Returns:
            ``(observation, reward, terminated, truncated, info)``.

        """
        if self._kernel is None:
            raise RuntimeError("call reset() first")
        return self._step(action)

    def _step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        k = self._kernel
        assert k is not None
        try:
            a = int(action)
        except (TypeError, ValueError):
            a = -1
        self._actions.append(a)
        self._elapsed += 1
        in_range = 0 <= a < self._ncat
        legal = in_range and bool(self._mask[a])
        spec = self.catalogue[a] if in_range else ActionSpec("invalid")
        record: dict[str, Any] | None = None
        label = ""
        if legal:
            try:
                record, label = self._apply(k, spec)
            except (KernelUsageError, StepError):
                record = None  # the mask said legal; treat a refusal as illegal
        illegal = record is None
        cov0 = self._cov0
        ov = self._ov
        new_labels = 0
        if label:
            s = self._label_slot.get(label)
            if s is None:
                s = self._slot(label)
            if ov[cov0 + s] == 0.0:
                ov[cov0 + s] = 1.0
                self._cov_n += 1
                new_labels = 1
        vs = k.violations
        new_v = vs[self._nv:] if len(vs) > self._nv else []
        self._nv = len(vs)
        new_sigs: list[str] = []
        defect = ""
        for v in new_v:
            if v.kind == "simulator":
                defect = defect or v.message
                continue
            if v.signature not in self._seen:
                self._seen[v.signature] = None
                new_sigs.append(v.signature)
        events = k.events
        step_events = events[self._ne:]  # Event named tuples (immutable, no copy)
        self._ne = len(events)
        reward, terminated, extra = 0.0, False, None
        if illegal:
            self._illegal_n += 1
        else:
            outcome = StepOutcome(spec, record, label, new_v, new_sigs, new_labels, False)
            reward, terminated, extra = self.objective.step(k, outcome)
            self._return += reward
            if not terminated and spec.kind == "run" and k.threads[spec.tid].exited and all(
                    t.exited for tid, t in k.threads.items() if tid != KSWAPD_TID) \
                    and k.threads[KSWAPD_TID].gen is None:
                terminated = True  # every user thread has exited: nothing left to schedule
        truncated = bool(defect) or self._elapsed >= self.max_steps
        self._done = self._done or terminated or truncated
        self._compute_mask()
        obs = self._encode(_NOOP if illegal else spec)
        info: dict[str, Any] = {
            "illegal_action": illegal,
            "action": record if record is not None else spec.describe(),
            "label": label,
            "violations": [],
            "violation": None,
            "events": step_events,
            "kernel_step": k.step_no,
            "coverage": self._cov_n,
            "action_mask": self._mask.copy(),
        }
        if new_v:
            info["violations"] = [dict(v.to_dict(), new=v.signature in new_sigs) for v in new_v]
            info["violation"] = next((v.to_dict() for v in new_v if v.signature in new_sigs),
                                     None)
        if defect:
            info["simulator_defect"] = defect
        if extra:
            info.update(extra)
        return obs, reward, terminated, truncated, info

    def _apply(self, k: Kernel, spec: ActionSpec) -> tuple[dict[str, Any], str]:
        """Carry out a legal catalogue action; returns (recorded step, label reached)."""
        if spec.kind == "run":
            tid = spec.tid
            rec: dict[str, Any] = {"tid": tid, "step": 1}
            if tid in self._pending:  # completes a workload op bound with as/expect
                apply_step(k, dict(rec), self._names, self._pending, -1)
                label = _thread_label(k, tid)
            else:
                label = k.step(tid)
            self._recorded.append(rec)
            self._labels.append(_thread_label(k, tid))
            self._last_label = label
            return rec, label
        if spec.kind == "event":
            k.event("fail_nth", n=spec.n)
            rec = {"event": "fail_nth", "n": spec.n}
        else:
            args = dict(spec.args)
            if spec.pin_slot >= 0:
                args["pin"] = self._pins_of(k, k.threads[spec.tid].pid)[spec.pin_slot]
            if spec.proc_slot >= 0:
                args["pid"] = k.live_procs()[spec.proc_slot].pid
            k.start(spec.tid, spec.op, args)
            rec = {"tid": spec.tid, "start": spec.op}
            if args:
                rec["args"] = args
        self._recorded.append(rec)
        self._labels.append(None)
        return rec, ""

    @staticmethod
    def _pins_of(k: Kernel, pid: int) -> list[int]:
        return [pid_ for pid_, p in k.pins.items() if p.active and p.pid == pid]

    def _slot(self, label: str) -> int:
        s = self._label_slot.get(label)
        if s is None:
            s = len(self.label_vocab) + zlib.crc32(label.encode()) % LABEL_OVERFLOW_BUCKETS
            self._label_slot[label] = s
        return s

    # ----------------------------------------------------------------- masks
    def _compute_mask(self) -> None:
        k = self._kernel
        assert k is not None
        m = np.zeros(self._ncat, dtype=bool)
        self._mask = m
        if self._done:
            m[self._ev_lo:] = True  # never an empty mask; events are harmless no-ops here
            return
        nu = self._n_user
        pins: dict[int, int] | None = None
        some = False  # whether any entry of m is set (m.any(), tracked in Python)
        for tid, t in k.threads.items():
            if t.exited:
                continue
            if t.gen is not None:
                w = t.waiting
                if w is None or w[0].can_acquire(tid, w[1]):
                    m[tid] = True
                    some = True
                continue
            if tid == KSWAPD_TID:
                n = 0
                for p in k.procs.values():
                    if p.alive:
                        n += 1
                ks = self._ks_masks
                i = n if n < len(ks) else len(ks) - 1
                m[self._ks_lo:self._ev_lo] = ks[i]
                if not some and self._ks_any[i]:
                    some = True
                continue
            if pins is None:
                pins = {}
                for p in k.pins.values():
                    if p.active:
                        pins[p.pid] = pins.get(p.pid, 0) + 1
            lo = self._user_lo + (tid - 1) * nu
            um = self._user_masks
            i = pins.get(t.pid, 0)
            if i >= len(um):
                i = len(um) - 1
            m[lo:lo + nu] = um[i]
            if not some and self._user_any[i]:
                some = True
        # Pressure events are legal while none is pending, and whenever nothing else is.
        if k.fail_nth == 0 or not some:
            m[self._ev_lo:] = True

    # ----------------------------------------------------------------- observations
    def _encode(self, spec: ActionSpec | None = None) -> np.ndarray:
        """Refresh the observation buffer and return a copy.

        ``spec`` is the action just taken: ``start`` only changes that thread, an event
        only the pressure state, so only those parts are re-encoded (a test checks that
        this always equals the full encoding). None = encode everything.
        """
        k = self._kernel
        assert k is not None
        o = self._obs
        ov = self._ov
        if spec is None or spec.kind == "run":
            o[:self._cov0] = self._blank
            procs = k.live_procs()[:self.config.max_processes]
            pslot = {p.pid: i for i, p in enumerate(procs)}
            self._enc_threads(k, ov, k.threads.items(), pslot)
            self._enc_mms(k, ov, procs)
        elif spec.kind == "start":
            t = k.threads[spec.tid]
            procs = k.live_procs()[:self.config.max_processes]
            b = spec.tid * self._ft
            o[b:b + self._ft] = self._blank[b:b + self._ft]
            self._enc_thread(k, ov, spec.tid, t, {p.pid: i for i, p in enumerate(procs)})
        self._enc_pressure(k, ov)
        return o.copy()

    def _enc_thread(self, k: Kernel, o: Any, tid: int, t: Any,
                    pslot: dict[int, int]) -> None:
        self._enc_threads(k, o, ((tid, t),), pslot)

    def _enc_threads(self, k: Kernel, o: Any, items: Any, pslot: dict[int, int]) -> None:
        """Encode the ``(tid, thread)`` pairs of ``items`` (sparse stores)."""
        max_threads = self.config.max_threads
        ft = self._ft
        op_index = self._op_index
        label_slot = self._label_slot
        inv_L = self._inv_L
        t_proc = self._t_proc
        for tid, t in items:
            if t.exited or tid > max_threads:
                continue
            base = tid * ft
            o[base] = 0.0
            w = t.waiting
            if t.gen is None:
                o[base + 1] = 1.0
            else:
                o[base + (2 if w is None or w[0].can_acquire(tid, w[1]) else 3)] = 1.0
                o[base + 5 + op_index[t.op]] = 1.0
            label = t.label
            if label:
                s = label_slot.get(label)
                if s is None:
                    s = self._slot(label)
                o[base + 4] = (s + 1) * inv_L
            ps = pslot.get(t.pid)
            if ps is not None:
                o[base + t_proc + ps] = 1.0
            if t.held or w is not None:
                hb = base + self._t_held
                lock_class = self._lock_class
                for lk, mode in t.held:
                    c = lock_class.get(lk.cls)
                    if c is not None:
                        if mode == WRITE:
                            o[hb + c] = 1.0
                        elif o[hb + c] == 0.0:
                            o[hb + c] = 0.5
                if w is not None:
                    lk, mode = w
                    c = lock_class.get(lk.cls)
                    nl = len(LOCK_ORDER)
                    if c is not None:
                        o[hb + nl + c] = 1.0
                    if mode == WRITE:
                        o[hb + 2 * nl] = 1.0

    def _enc_mms(self, k: Kernel, o: Any, procs: list[Any]) -> None:
        """Encode per-process summaries and per-PMD-slot sharing state (sparse stores)."""
        NT, NP = self.config.max_threads, self.config.max_processes
        pincount: dict[int, int] = {}
        for pin in k.pins.values():
            if pin.active:
                pincount[pin.pid] = pincount.get(pin.pid, 0) + 1
        self._pins_active = sum(pincount.values())
        inv_rp = 1.0 / self.region_pages
        NS = len(self.pmd_indices)
        inv_nt = 1.0 / NT
        b = self._p0
        fp = self._fp
        for p in procs:
            mm = p.mm
            rss = mm.rss
            o[b] = 1.0
            if rss[MM_ANONPAGES]:
                x = rss[MM_ANONPAGES] * inv_rp
                o[b + 1] = 0.0 if x < 0.0 else (x if x < 1.0 else 1.0)
            if rss[MM_SWAPENTS]:
                x = rss[MM_SWAPENTS] * inv_rp
                o[b + 2] = 0.0 if x < 0.0 else (x if x < 1.0 else 1.0)
            if rss[MM_SHMEMPAGES]:
                x = rss[MM_SHMEMPAGES] * inv_rp
                o[b + 3] = 0.0 if x < 0.0 else (x if x < 1.0 else 1.0)
            if mm.nr_ptes > 0:
                o[b + 4] = 1.0 if mm.nr_ptes >= NS else mm.nr_ptes / NS
            f = mm.flags
            if f:
                if f & MMF_HAS_PINNED:
                    o[b + 5] = 1.0
                if f & MMF_COW_PTE_READY:
                    o[b + 6] = 1.0
                if f & MMF_COW_PTE:
                    o[b + 7] = 1.0
            o[b + 8] = len(p.tids) * inv_nt
            ml = mm.mmap_lock
            if ml.readers:
                o[b + 9] = len(ml.readers) * inv_nt
            if ml.writer is not None:
                o[b + 10] = 1.0
            if ml.waiters:
                o[b + 11] = len(ml.waiters) * inv_nt
            if mm.page_table_lock.owner is not None:
                o[b + 12] = 1.0
            n = pincount.get(p.pid, 0)
            if n:
                o[b + 13] = 1.0 if n >= 2 else 0.5
            if mm.write_protect_seq & 1:
                o[b + 14] = 1.0
            b += fp
        m0 = self._m0
        fm = self._fm
        n = len(procs)
        inv_np = 1.0 / NP
        split = self.config.split_ptl
        pmd_idx = self.pmd_indices
        rows = [[d.get(idx) for idx in pmd_idx] for d in [p.mm.pmd for p in procs]]
        b = m0
        for i, row in enumerate(rows):
            ptl_i = None if split else procs[i].mm.page_table_lock
            for j, pmd in enumerate(row):
                if pmd is None:
                    b += fm
                    continue
                tb = pmd.table
                o[b] = 1.0
                if pmd.write:
                    o[b + 1] = 1.0
                rc = tb.refcount
                if rc > 0:
                    o[b + 2] = 1.0 if rc >= NP else rc * inv_np
                if (tb.ptl if split else ptl_i).owner is not None:
                    o[b + 3] = 1.0
                if tb.freed:
                    o[b + 4] = 1.0
                if n > 1:
                    for q, other_row in enumerate(rows):
                        if q != i:
                            other = other_row[j]
                            if other is not None and other.table is tb:
                                o[b + 5 + q] = 1.0
                b += fm

    def _enc_pressure(self, k: Kernel, o: Any) -> None:
        x0 = self._x0
        fn = k.fail_nth
        o[x0] = 1.0 if fn >= 3 else fn / 3
        o[x0 + 1] = k.pool.nr_free / k.pool.nr
        o[x0 + 2] = len(k.swap.free) / self._swap_nr
        x = self._pins_active / 4
        o[x0 + 3] = x if x < 1.0 else 1.0
        idle = 1.0
        for t in k.threads.values():
            if t.gen is not None:
                idle = 0.0
                break
        o[x0 + 4] = idle
        x = self._elapsed / self.max_steps
        o[x0 + 5] = x if x < 1.0 else 1.0

    # ----------------------------------------------------------------- schedules
    def get_schedule(self, name: str | None = None, compact: bool = False) -> dict[str, Any]:
        """Return the episode so far as scenario data (the format of ``scenarios/``).

        ``steps`` are the workload followed by one readable step per legal action
        (``{tid, start: op, args}`` with addresses in hex, ``{tid, step: 1}``,
        ``{event: fail_nth, n}``; kswapd is tid 0); ``expect`` is the outcome: the first
        violation's kind, site and step, or ``{violation: null}``.
        ``run_scenario(parse_scenario(data))`` reproduces the episode exactly, and
        ``outcome`` pins it down for ``cowenv replay`` (trace hash, kernel steps, trace
        events, the label each step stopped at).

        Args:
            name: Scenario name (default ``episode-seed<seed>``).
            compact: Merge consecutive ``{tid, step: 1}`` of one thread into
                ``{tid, step: n}`` (equivalent, shorter).

        Returns:
            Plain data: ``version``, ``name``, ``config`` (the full kernel config),
            ``seed``, ``steps``, ``expect``, ``outcome`` and ``recorded`` (provenance:
            env id, its keyword arguments as JSON, objective, actions, return).

        """
        k = self.kernel
        steps: list[dict[str, Any]] = []
        for s in self.workload:
            s = copy.deepcopy(s)
            op = s.get("do") or s.get("start")
            if op in OPS and isinstance(s.get("args"), dict):
                s["args"] = _readable_args(op, s["args"])
            steps.append(s)
        labels: list[str | None] = list(self._wl_labels)
        nwl = len(steps)
        for s, lab in zip(self._recorded, self._labels, strict=True):
            if (compact and "step" in s and len(steps) > nwl and "step" in steps[-1]
                    and steps[-1]["tid"] == s["tid"]):
                steps[-1]["step"] += 1
                labels[-1] = lab
                continue
            s = dict(s)
            if "args" in s:
                s["args"] = _readable_args(s["start"], s["args"])
            steps.append(s)
            labels.append(lab)
        first = k.violations[0] if k.violations else None
        expect: dict[str, Any] = {"violation": None if first is None else
                                  {"kind": first.kind, "site": first.site, "step": first.step}}
        env_id = self.spec.id if self.spec is not None else ENV_ID
        kwargs = {kk: vv for kk, vv in self._init_kwargs.items() if kk != "render_mode"}
        return {
            "version": FORMAT_VERSION,
            "name": name or f"episode-seed{self._episode_seed}",
            "config": k.config.to_dict(),
            "seed": self._episode_seed,
            "steps": steps,
            "expect": expect,
            "outcome": {"trace_hash": trace_hash(k.events), "events": len(k.events),
                        "steps": k.step_no, "labels": labels},
            "recorded": {"env": env_id,
                         "env_kwargs": json.dumps(kwargs, sort_keys=True, default=list),
                         "objective": self.objective_name, "actions": self._elapsed,
                         "illegal_actions": self._illegal_n, "return": self._return},
        }

    # ----------------------------------------------------------------- rendering
    def render(self) -> str | np.ndarray | None:
        """``ansi``: a text picture; ``rgb_array``: an RGB image (H, W, 3) uint8."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode")
            return None
        from . import render as _render

        if self._kernel is None:
            raise RuntimeError("call reset() first")
        if self.render_mode == "ansi":
            return _render.render_ansi(self._kernel, self.pmd_indices, self._last_label)
        return _render.render_rgb(self._kernel, self.pmd_indices)

    # ----------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """Pickle by replay: the kwargs, the seed and the actions taken.

        The kernel's threads are live generators, which cannot be pickled; unpickling
        rebuilds the episode by replaying the actions, which is exact by determinism.
        """
        rng = self._np_random.bit_generator.state if self._np_random is not None else None
        return {"kwargs": self._init_kwargs, "spec": self.spec,
                "episode": None if self._kernel is None else
                (self._episode_seed, list(self._actions)),
                "rng": rng, "rng_seed": self._np_random_seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__` data (replays the episode)."""
        self.__init__(**state["kwargs"])
        self.spec = state["spec"]
        if state["episode"] is not None:
            seed, actions = state["episode"]
            self.reset(seed=seed)
            for a in actions:
                self._step(a)
        if state["rng"] is not None:
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = state["rng"]
            self._np_random = rng
            self._np_random_seed = state["rng_seed"]


# ------------------------------------------------------------------------ registration
def register_envs() -> None:
    """Register ``cowenv/CowPte-v0`` and ``cowenv/CowPteSmall-v0`` (idempotent).

    This is the ``gymnasium.envs`` entry point and is also run on ``import cowenv``.
    """
    from . import _register

    _register()


__all__ = ["ENV_ID", "SMALL_ENV_ID", "SMALL_KWARGS", "ActionSpec", "CowEnv", "Objective",
           "OBJECTIVES", "StepOutcome", "ViolationObjective", "build_templates", "default_workload",
           "label_vocabulary", "register_envs", "register_objective", "workload_regions"]
