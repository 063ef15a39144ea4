"""The action harness: one episode of scheduling decisions against a kernel.

The harness is the one place where a numbered action becomes a kernel call. It owns

* the **configuration** (a preset or variant + flaws, geometry, caps) and its checks;
* the **workload** run at reset and the **action catalogue** (:mod:`cowenv.catalogue`)
  with its **legal-action mask**;
* **applying** an action (``Kernel.start`` / ``Kernel.step`` / ``Kernel.event``);
* the **episode rules**: the objective's reward and termination
  (:mod:`cowenv.objectives`), truncation at ``max_steps`` or on a simulator defect, the
  end when every user thread has exited;
* **recording** the schedule (:meth:`Harness.get_schedule`, the scenario format) and
  preemption-label **coverage**.

It does not build observations. :class:`cowenv.env.CowEnv` is a thin Gymnasium adapter
over it (observation, ``info`` dict, rendering), in the spirit of Gymnasium's
``FuncEnv``; campaigns whose agents read no observation (random, PCT, Q-learning) drive
the harness directly, as do replay and the search tools. The harness exposes the same
read-only surface agents use on the env: ``catalogue``, ``action_masks()``, ``kernel``,
``find_actions``, ``max_steps``, ``pmd_indices``.

Determinism: a harness has no randomness of its own. The reset seed is only recorded;
the same configuration and actions give the same trace, rewards and schedule.
"""

from __future__ import annotations

import copy
import copyreg
import io
import json
import pickle
import sys
import zlib
from typing import Any, ClassVar, NamedTuple

import numpy as np

from . import ENV_ID
from .catalogue import (
    FAIL_NTH,
    LABEL_OVERFLOW_BUCKETS,
    NOOP,
    ActionSpec,
    build_compact_templates,
    build_kswapd_templates,
    build_templates,
    build_walker_templates,
    default_workload,
    label_vocabulary,
    slot_pid,
    workload_regions,
)
from .kernel import KSWAPD_TID, Kernel, KernelUsageError, make_kernel
from .kernel.config import BASES, GEOMETRIES, PRESETS, KernelConfig
from .kernel.ops import OPS
from .kernel.trace import Event, Violation, trace_hash
from .objectives import StepOutcome, make_objective
from .replay import readable_args, thread_label
from .scenario import FORMAT_VERSION, ScenarioError, StepError, apply_step, parse_scenario

_tuple_new = tuple.__new__


def make_config(preset: str | None, variant: str | None, flaws: Any, geometry: Any,
                nr_frames: int | None, nr_swap_slots: int | None, fault_mode: str | None,
                split_ptl: bool, lockdep: bool, max_threads: int,
                max_processes: int, base: str = "") -> KernelConfig:
    """Build the kernel configuration from the env's keyword arguments.

    ``fault_mode`` None follows the base, as a kernel built with the distribution
    default ``CONFIG_PER_VMA_LOCK=y`` (x86-64, Linux 6.4+) does: ``vma_lock`` (the
    per-VMA-lock fault path, ``lock_vma_under_rcu`` first, ``mmap_lock`` as the fallback)
    on a base that has per-VMA locks, ``mmap_lock`` otherwise (v4's base 6.2).

    Raises:
        ValueError: One line naming the argument and what was expected.

    """
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
    if base and base not in BASES:
        raise ValueError(f"base: expected one of {', '.join(BASES)}, got {base!r}")
    if fault_mode is None:
        fault_mode = ("vma_lock" if base and KernelConfig(base=base).base_at_least("6.4")
                      else "mmap_lock")
    if nr_frames is None:
        nr_frames = 4096 if P >= 64 else 256
    if nr_swap_slots is None:
        nr_swap_slots = nr_frames // 4
    return KernelConfig(variant=variant, flaws=tuple(flaws or ()), ptrs_per_pte=P,
                        nr_frames=nr_frames, nr_swap_slots=nr_swap_slots,
                        fault_mode=fault_mode, split_ptl=split_ptl, lockdep=lockdep,
                        max_threads=max_threads, max_processes=max_processes, base=base)


class Coverage:
    """Preemption labels reached in an episode, as slots of a fixed-size bitmap.

    A slot per label of :func:`cowenv.catalogue.label_vocabulary`, plus
    :data:`~cowenv.catalogue.LABEL_OVERFLOW_BUCKETS` CRC-32 buckets for labels built
    at run time. The observation's coverage segment is this bitmap.
    """

    def __init__(self) -> None:
        self.vocab = label_vocabulary()
        self.n_slots = len(self.vocab) + LABEL_OVERFLOW_BUCKETS
        self.slot_of: dict[str, int] = {lb: i for i, lb in enumerate(self.vocab)}
        self.seen = bytearray(self.n_slots)
        self.n = 0

    def slot(self, label: str) -> int:
        """The slot of ``label`` (a vocabulary slot, or its overflow bucket)."""
        s = self.slot_of.get(label)
        if s is None:
            s = len(self.vocab) + zlib.crc32(label.encode()) % LABEL_OVERFLOW_BUCKETS
            self.slot_of[label] = s
        return s

    def clear(self) -> None:
        """Forget every label (a new episode)."""
        self.seen[:] = bytes(self.n_slots)
        self.n = 0

    def add(self, label: str) -> int:
        """Mark ``label`` reached; return its slot if it is new this episode, else -1."""
        s = self.slot(label)
        if self.seen[s]:
            return -1
        self.seen[s] = 1
        self.n += 1
        return s


#: ``Py_TPFLAGS_HEAPTYPE``: the type was created by a ``class`` statement.
_TPFLAGS_HEAPTYPE = 1 << 9


def _set_attrs(obj: Any, state: dict[str, Any]) -> None:
    """Restore an unpickled instance's attributes one by one, in their original order.

    The default restore (``inst.__dict__`` filled as a dict) leaves CPython 3.11+ a
    materialised instance dict, and every later attribute read on that object misses the
    inline-values fast path: a kernel unpickled that way steps about as much slower as
    the snapshot saved (measured in session 2, issue 4). ``setattr`` in the original
    order rebuilds the same inline layout as ``__init__`` did.
    """
    set_attr = object.__setattr__  # as the default restore: no __setattr__ override
    for name, value in state.items():
        set_attr(obj, name, value)


class _SnapshotPickler(pickle.Pickler):
    """Pickles instances with a ``__dict__`` so that they unpickle through :func:`_set_attrs`.

    ``__slots__`` classes, containers and other named tuples keep the default reduction
    (their attribute access does not depend on the instance dict). Trace events and
    one-dimensional numpy arrays get cheaper reductions to the same values (see
    :meth:`reducer_override`); the objects of ``shared`` are not copied at all (see
    :func:`snapshot_dumps`).

    Args:
        file: Where to write.
        shared: Objects every load gets as they are, by identity.

    """

    def __init__(self, file: io.BytesIO, shared: tuple[Any, ...] = ()) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        #: persistent id -> what the load hands back: every string's interned self, and
        #: each shared object by its index in ``shared``.
        self.table: dict[Any, Any] = {}
        # Identity lookup while this one dump runs (the objects stay alive meanwhile);
        # never used for ordering.
        self._shared = {id(o): i for i, o in enumerate(shared)}
        for i, o in enumerate(shared):
            self.table[i] = o

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is Event:
            # tuple.__new__ in C, as the kernel builds events, instead of the named
            # tuple's Python-level __new__ (the same tuple).
            return (_tuple_new, (Event, tuple(obj)))
        if cls is np.ndarray and obj.ndim == 1 and obj.flags.c_contiguous \
                and not obj.dtype.hasobject:
            # An array over a private bytearray: what numpy's own reduction rebuilds (a
            # writable array of the same dtype and contents) without its Python-level
            # _frombuffer/reshape, and without the two garbage-collected objects
            # (memoryview, managed buffer) that np.frombuffer puts between the array and
            # its bytes.
            return (np.ndarray, (obj.shape, obj.dtype, bytearray(obj.tobytes())))
        if not cls.__flags__ & _TPFLAGS_HEAPTYPE or isinstance(obj, type) \
                or cls.__new__ is not object.__new__ \
                or cls.__reduce_ex__ is not object.__reduce_ex__ \
                or cls.__reduce__ is not object.__reduce__ \
                or getattr(cls, "__setstate__", None) is not None:
            # Built-in types (functions too), classes, subclasses of built-in containers
            # (their contents are not in __dict__), custom reduce or restore.
            return NotImplemented
        state = getattr(obj, "__dict__", None)
        if state is None or hasattr(cls, "__slots__") or hasattr(cls, "__getstate__") \
                and cls.__getstate__ is not object.__getstate__:
            return NotImplemented
        return (copyreg.__newobj__, (cls,), dict(state), None, None, _set_attrs)

    def persistent_id(self, obj: Any) -> Any:
        # Every string goes out as a persistent id, so that the load interns it
        # (:func:`snapshot_loads`): a plain unpickled string is a new object, and
        # dict lookups and comparisons with the interned constants of the code (lock
        # classes, ops, cost categories) then compare contents instead of identities.
        if type(obj) is str:
            if obj not in self.table:
                self.table[obj] = sys.intern(obj)
            return obj
        if self._shared:
            return self._shared.get(id(obj))
        return None


class Snapshot(NamedTuple):
    """What :func:`snapshot_dumps` returns: the pickle and its persistent-id table."""

    data: bytes
    table: dict[Any, Any]


def snapshot_loads(snap: Snapshot) -> Any:
    """Unpickle :func:`snapshot_dumps` data: interned strings, the shared objects as they are."""
    u = pickle.Unpickler(io.BytesIO(snap.data))
    u.persistent_load = snap.table.__getitem__  # a built-in: no Python frame per string
    return u.load()


def snapshot_dumps(obj: Any, shared: tuple[Any, ...] = ()) -> Snapshot:
    """Pickle ``obj`` (a post-workload kernel and friends) for :meth:`Harness.reset`.

    ``shared`` are immutable objects of ``obj`` that every load may share instead of
    copying: :meth:`Harness._run_workload` passes the kernel's configuration (a frozen
    dataclass) and the workload's trace events (tuples whose data the kernel and the
    trace readers never modify), about a quarter of the pickle.
    """
    buf = io.BytesIO()
    p = _SnapshotPickler(buf, shared)
    p.dump(obj)
    return Snapshot(buf.getvalue(), p.table)


class HarnessStep:
    """What one :meth:`Harness.step` did.

    Attributes:
        outcome: The :class:`~cowenv.objectives.StepOutcome` handed to the objective
            (``spec`` is :data:`~cowenv.catalogue.NOOP` for an illegal action).
        reward: The objective's reward (0 for an illegal action).
        terminated: The episode ended: the objective said so, or no user thread is left.
        truncated: ``max_steps`` actions were taken, or the simulator hit a defect.
        defect: The simulator defect's message, or "".
        extra: Extra ``info`` entries from the objective (or None).
        events: The kernel trace events of this step (shared: do not mutate).
        new_slot: Coverage slot reached for the first time this episode, or -1.

    """

    __slots__ = ("outcome", "reward", "terminated", "truncated", "defect", "extra", "events",
                 "new_slot")

    def __init__(self, outcome: StepOutcome, reward: float, terminated: bool, truncated: bool,
                 defect: str, extra: dict[str, Any] | None, events: list[Event],
                 new_slot: int) -> None:
        self.outcome = outcome
        self.reward = reward
        self.terminated = terminated
        self.truncated = truncated
        self.defect = defect
        self.extra = extra
        self.events = events
        self.new_slot = new_slot

    @property
    def illegal(self) -> bool:
        """The action was illegal (a no-op)."""
        return self.outcome.illegal

    def violation_dicts(self) -> list[dict[str, Any]]:
        """The step's violations as dicts, each with ``new`` (first in this episode)."""
        new = self.outcome.new_signatures
        return [dict(v.to_dict(), new=v.signature in new) for v in self.outcome.violations]


class Harness:
    """Catalogue, masks, workload, apply and record: one episode at a time.

    Takes the keyword arguments of :class:`cowenv.env.CowEnv` except ``render_mode``
    (see its docstring for each). Call :meth:`reset`, then :meth:`step` with catalogue
    indices.

    Raises:
        ValueError: A bad argument (one line naming it and what was expected).

    """

    #: Reset from a pickled post-workload kernel (see :meth:`_run_workload`); False
    #: re-runs the workload at every reset (``tests/test_harness_perf.py`` compares the
    #: two, step for step).
    reset_snapshot: ClassVar[bool] = True

    def __init__(self, preset: str | None = None, variant: str | None = None,
                 flaws: list[str] | tuple[str, ...] | None = None,
                 geometry: str | int = "x86_64", nr_frames: int | None = None,
                 nr_swap_slots: int | None = None, fault_mode: str | None = None,
                 split_ptl: bool = True, lockdep: bool = True,
                 workload: list[dict[str, Any]] | None = None,
                 regions: list[tuple[int, int]] | None = None, max_threads: int = 4,
                 max_processes: int = 3, max_steps: int = 256, pin_slots: int = 2,
                 pmd_slots: int = 8, objective: str = "violation",
                 objective_kwargs: dict[str, Any] | None = None,
                 violation_reward: float = 10.0, terminate_on_violation: bool = True,
                 novelty_coef: float = 0.0,
                 ignore_signatures: list[str] | None = None, base: str = "") -> None:
        self.init_kwargs: dict[str, Any] = {
            k: copy.deepcopy(v) for k, v in locals().items() if k not in ("self", "__class__")}
        self.config = make_config(preset, variant, flaws, geometry, nr_frames, nr_swap_slots,
                                  fault_mode, split_ptl, lockdep, max_threads, max_processes,
                                  base)
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
        self.pin_slots = int(pin_slots)

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
        cat.extend(ActionSpec("event", n=n) for n in FAIL_NTH)
        self._ev_hi = len(cat)
        # Appended by issue 13 (older indices unchanged): the walkers' per-thread start
        # templates (numa_hint, clear_refs, swapoff, mremap, move_pages), then each user
        # thread's /proc/thread-self/fail-nth events, then kcompactd's templates.
        self._walker_templates = build_walker_templates(regs, P, ps)
        self._compact_templates = build_compact_templates(regs, P, ps,
                                                          self.config.max_processes)
        self._walk_lo = len(cat)
        self._n_walk = len(self._walker_templates)
        for tid in range(1, NT + 1):
            for tp in self._walker_templates:
                cat.append(ActionSpec("start", tid, tp.op, tp.args, tp.pin_slot, tp.proc_slot))
        self._tfail_lo = len(cat)
        for tid in range(1, NT + 1):
            cat.extend(ActionSpec("event", tid, "fail_nth", n=n) for n in FAIL_NTH)
        self._kc_lo = len(cat)
        cat.extend(self._compact_templates)
        self._kc_masks = [np.array([tp.proc_slot < n for tp in self._compact_templates])
                          for n in range(self.config.max_processes + 1)]
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
        self.coverage = Coverage()

        self.objective_name = objective
        self.objective = make_objective(objective, self, objective_kwargs)

        # Episode state (set by reset).
        self._snapshot: Snapshot | None = None
        self._snapshot_tried = False
        #: The coverage bitmap and count of the snapshot kernel's labels.
        self._snapshot_cov: tuple[bytes, int] | None = None
        self._kernel: Kernel | None = None
        self.actions: list[int] = []
        self.recorded: list[dict[str, Any]] = []
        self.labels: list[str | None] = []
        self.workload_labels: list[str | None] = []
        self.illegal_actions = 0
        self.episode_return = 0.0
        self._names: dict[str, Any] = {}
        self._pending: dict[int, dict] = {}
        self.elapsed = 0
        self.episode_seed = 0
        self._seen: dict[str, None] = {}
        self._nv = 0
        self._ne = 0
        self.mask = np.zeros(len(cat), dtype=bool)
        #: The legal catalogue indices, ascending (``np.flatnonzero(mask)``; read-only,
        #: memoised with the mask).
        self.legal = np.zeros(0, dtype=np.intp)
        self._mask_bytes = bytes(len(cat))  # mask as bytes: b[a] is a cheap legality test
        self._mask_memo: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, bytes]] = {}
        self.done = False
        self.last_label = ""
        #: Extra ``info`` entries the objective returned at the last reset.
        self.objective_info: dict[str, Any] = {}

    # ----------------------------------------------------------------- catalogue
    @property
    def kernel(self) -> Kernel:
        """The current episode's kernel (read it; drive it only through :meth:`step`)."""
        if self._kernel is None:
            raise RuntimeError("call reset() first")
        return self._kernel

    @property
    def user_templates(self) -> tuple[ActionSpec, ...]:
        """The user-thread templates (``tid`` unset), in catalogue order."""
        return tuple(self._user_templates)

    @property
    def walker_templates(self) -> tuple[ActionSpec, ...]:
        """The mremap/move_pages templates (``tid`` unset), appended after the events."""
        return tuple(self._walker_templates)

    def walker_action(self, tid: int, template: int) -> int:
        """Catalogue index of "start walker template ``template`` on thread ``tid``"."""
        return self._walk_lo + (int(tid) - 1) * self._n_walk + int(template)

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

        Example: ``h.find_actions("write", tid=1, addr=0x2000000)``. Arguments not
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

    def action_masks(self) -> np.ndarray:
        """Legal actions now (bool array over the catalogue; a copy)."""
        return self.mask.copy()

    def legal_actions(self) -> np.ndarray:
        """The legal catalogue indices now, ascending: ``np.flatnonzero(action_masks())``.

        A read-only array memoised with the mask (no numpy call per step), for agents
        that choose among the legal actions: ``legal[rng.integers(len(legal))]``.
        """
        return self.legal

    # ----------------------------------------------------------------- episode
    def reset(self, seed: int = 0) -> list[Violation]:
        """Start an episode: a fresh kernel runs the workload to completion.

        Args:
            seed: The episode's seed (recorded in the schedule; the harness itself is
                deterministic).

        Returns:
            The violations the workload itself reported.

        Raises:
            RuntimeError: The workload cannot run on this configuration.

        """
        self.episode_seed = int(seed)
        use_snapshot = self.reset_snapshot and self._snapshot is not None
        if not use_snapshot:
            self._run_workload()
            use_snapshot = self.reset_snapshot and self._snapshot is not None
        if use_snapshot:
            k, self._names, self.workload_labels = snapshot_loads(self._snapshot)
            self._pending = {}
        else:
            k = self.kernel
        self._kernel = k
        self.actions, self.recorded, self.labels = [], [], []
        self.illegal_actions, self.episode_return = 0, 0.0
        self.elapsed = 0
        self.done = False
        self.last_label = ""
        self._seen = dict.fromkeys(self.ignore_signatures)
        for v in k.violations:
            if v.kind != "simulator":
                self._seen[v.signature] = None
        self._nv, self._ne = len(k.violations), len(k.events)
        cov = self.coverage
        if use_snapshot and self._snapshot_cov is not None:
            # Every snapshot kernel has reached the same labels: the same bitmap.
            cov.seen[:] = self._snapshot_cov[0]
            cov.n = self._snapshot_cov[1]
        else:
            cov.clear()
            for lb in k.coverage:
                cov.add(lb)
            if use_snapshot:
                self._snapshot_cov = (bytes(cov.seen), cov.n)
        self.objective_info = self.objective.reset(k)
        self._compute_mask()
        return list(k.violations)

    def _run_workload(self) -> None:
        """Run the workload on a fresh kernel (``self._kernel``): the slow half of reset.

        The workload is deterministic and does not depend on the episode seed, so its end
        state is the same at every reset. The first time, when that state is quiescent
        (no operation in progress, nothing bound for later), it is pickled
        (:func:`snapshot_dumps`) and every reset, this one included, unpickles it
        (:func:`snapshot_loads`): about 4x faster than re-running the workload on the small
        preset. The unpickled kernel
        equals a fresh one: ``tests/test_harness_perf.py`` checks episodes step for step
        and the trace corpus replays env episodes through it. Anything that cannot be
        pickled (a live generator, say) leaves ``_snapshot`` None: every reset then runs
        the workload.
        """
        k = make_kernel(self.config)
        self._kernel = k
        self._names, self._pending = {}, {}
        self.workload_labels = []
        for i, s in enumerate(self._workload_steps):
            before = k.step_no
            try:
                apply_step(k, copy.deepcopy(s), self._names, self._pending, i)
            except (StepError, KernelUsageError) as e:
                raise RuntimeError(f"workload step {i}: {e}") from None
            tid = s.get("tid")
            self.workload_labels.append(thread_label(k, tid) if tid is not None
                                        and k.step_no != before else None)
        if self.reset_snapshot and not self._snapshot_tried and not self._pending and all(
                t.gen is None for t in k.threads.values()):
            self._snapshot_tried = True
            try:
                self._snapshot = snapshot_dumps((k, self._names, self.workload_labels),
                                                (k.config, *k.events))
            except (pickle.PicklingError, TypeError, AttributeError):
                self._snapshot = None

    def step(self, action: Any) -> HarnessStep:
        """Take catalogue action ``action``; an illegal or invalid one is a no-op.

        Raises:
            RuntimeError: :meth:`reset` was never called.

        """
        k = self._kernel
        if k is None:
            raise RuntimeError("call reset() first")
        if action.__class__ is int:
            a = action
        else:
            try:
                a = int(action)
            except (TypeError, ValueError, OverflowError):
                a = -1
        self.actions.append(a)
        self.elapsed += 1
        if 0 <= a < self._ncat:
            spec = self.catalogue[a]
            legal = self._mask_bytes[a] != 0  # == bool(self.mask[a]), without numpy
        else:
            spec = ActionSpec("invalid")
            legal = False
        record: dict[str, Any] | None = None
        label = ""
        if legal:
            tid = spec.tid
            if spec.kind == "run" and tid not in self._pending:
                # == self._apply(k, spec) for a plain run action, inlined (most steps)
                try:
                    label = k.step(tid)
                except KernelUsageError:
                    pass  # the mask said legal; treat a refusal as illegal
                else:
                    record = {"tid": tid, "step": 1}
                    self.recorded.append(record)
                    t = k.threads[tid]
                    self.labels.append(t.label if t.gen is not None else f"{t.op}:done")
                    self.last_label = label
            else:
                try:
                    record, label = self._apply(k, spec)
                except (KernelUsageError, StepError):
                    record = None  # the mask said legal; treat a refusal as illegal
        illegal = record is None
        new_slot = -1
        if label:
            cov = self.coverage
            s = cov.slot_of.get(label)
            if s is None or not cov.seen[s]:  # (a label seen before: no call)
                new_slot = cov.add(label)
        vs = k.violations
        nv = len(vs)
        new_sigs: list[str] = []
        defect = ""
        if nv > self._nv:
            new_v = vs[self._nv:]
            self._nv = nv
            for v in new_v:
                if v.kind == "simulator":
                    defect = defect or v.message
                    continue
                if v.signature not in self._seen:
                    self._seen[v.signature] = None
                    new_sigs.append(v.signature)
        else:
            new_v = []
        events = k.events
        step_events = events[self._ne:]  # Event named tuples (immutable, no copy)
        self._ne = len(events)
        reward, terminated, extra = 0.0, False, None
        outcome = StepOutcome(NOOP if illegal else spec, record, label, new_v, new_sigs,
                              0 if new_slot < 0 else 1, illegal)
        if illegal:
            self.illegal_actions += 1
        else:
            reward, terminated, extra = self.objective.step(k, outcome)
            self.episode_return += reward
            if not terminated and spec.kind == "run" and k.threads[spec.tid].exited and all(
                    t.exited for tid, t in k.threads.items() if tid != KSWAPD_TID) \
                    and k.threads[KSWAPD_TID].gen is None:
                terminated = True  # every user thread has exited: nothing left to schedule
        truncated = bool(defect) or self.elapsed >= self.max_steps
        self.done = self.done or terminated or truncated
        self._compute_mask()
        return HarnessStep(outcome, reward, terminated, truncated, defect, extra, step_events,
                           new_slot)

    def _apply(self, k: Kernel, spec: ActionSpec) -> tuple[dict[str, Any], str]:
        """Carry out a legal catalogue action; returns (recorded step, label reached)."""
        if spec.kind == "run":
            tid = spec.tid
            rec: dict[str, Any] = {"tid": tid, "step": 1}
            if tid in self._pending:  # completes a workload op bound with as/expect
                apply_step(k, dict(rec), self._names, self._pending, -1)
                label = thread_label(k, tid)
            else:
                label = k.step(tid)
            self.recorded.append(rec)
            t = k.threads[tid]
            self.labels.append(t.label if t.gen is not None else f"{t.op}:done")  # thread_label
            self.last_label = label
            return rec, label
        if spec.kind == "event":
            if spec.tid > 0:
                k.event("fail_nth", tid=spec.tid, n=spec.n)
                rec = {"event": "fail_nth", "tid": spec.tid, "n": spec.n}
            else:
                k.event("fail_nth", n=spec.n)
                rec = {"event": "fail_nth", "n": spec.n}
        else:
            args = self.start_args(k, spec)
            k.start(spec.tid, spec.op, args)
            rec = {"tid": spec.tid, "start": spec.op}
            if args:
                rec["args"] = args
        self.recorded.append(rec)
        self.labels.append(None)
        return rec, ""

    @classmethod
    def start_args(cls, k: Kernel, spec: ActionSpec) -> dict[str, Any]:
        """The kernel arguments of catalogue start ``spec`` in ``k``'s current state.

        A pin slot names the process's pin of that rank (:meth:`pins_of`), a process slot
        the live process of that rank; a slot with nothing in it (the action is not legal
        now) gives -1, which the operation rejects.
        """
        args = dict(spec.args)
        if spec.pin_slot >= 0:
            pins = cls.pins_of(k, k.threads[spec.tid].pid)
            args["pin"] = pins[spec.pin_slot] if spec.pin_slot < len(pins) else -1
        if spec.proc_slot >= 0:
            args["pid"] = slot_pid(k, spec)
        return args

    @staticmethod
    def pins_of(k: Kernel, pid: int) -> list[int]:
        """Active pin ids of process ``pid``, oldest first (the pin slots)."""
        return [pid_ for pid_, p in k.pins.items() if p.active and p.pid == pid]

    # ----------------------------------------------------------------- masks
    def _compute_mask(self) -> None:
        """Set :attr:`mask` and :attr:`legal` for the current state (read-only arrays, shared).

        The mask depends only on the :meth:`_mask_key` of the state, which is cheaper to
        compute than the mask (no numpy calls); masks are memoised by key, up to
        ``_MASK_MEMO`` of them, with their legal indices and their bytes. A test checks
        the memoised mask against a fresh one.
        """
        key = self._mask_key()
        memo = self._mask_memo.get(key)
        if memo is None:
            m = self._build_mask()
            m.flags.writeable = False  # shared: a caller writing to it would corrupt others
            legal = np.flatnonzero(m)
            legal.flags.writeable = False
            memo = (m, legal, m.tobytes())
            if len(self._mask_memo) < self._MASK_MEMO:
                self._mask_memo[key] = memo
        self.mask, self.legal, self._mask_bytes = memo

    #: Most masks memoised per harness (each a few hundred bytes).
    _MASK_MEMO: ClassVar[int] = 4096

    def _mask_key(self) -> tuple[int, ...]:
        """What :meth:`_build_mask` reads, as a tuple of ints.

        Per live thread in ``k.threads`` order: its tid, then -1 if it is runnable, -2 if
        it is blocked, else (idle) the row of the templates mask: live processes for
        kswapd, its process's active pins for a user thread followed by whether its
        per-thread ``fail_nth`` is armed; then whether ``fail_nth`` is 0. ``(-3,)`` once
        the episode is done.
        """
        if self.done:
            return (-3,)
        k = self._kernel
        assert k is not None
        key: list[int] = []
        pins: dict[int, int] | None = None
        for tid, t in k.threads.items():
            if t.exited:
                continue
            key.append(tid)
            if t.gen is not None:
                w = t.waiting
                key.append(-1 if w is None or w[0].can_acquire(tid, w[1]) else -2)
            elif tid == KSWAPD_TID:
                n = 0
                for p in k.procs.values():
                    if p.alive:
                        n += 1
                key.append(n)
            else:
                if pins is None:
                    pins = {}
                    for p in k.pins.values():
                        if p.active:
                            pins[p.pid] = pins.get(p.pid, 0) + 1
                key.append(pins.get(t.pid, 0))
                key.append(1 if t.fail_nth_next else 0)  # its per-thread fail-nth events
        key.append(k.fail_nth == 0)
        return tuple(key)

    def _build_mask(self) -> np.ndarray:
        """The legal-action mask of the current state, computed from scratch."""
        k = self._kernel
        assert k is not None
        m = np.zeros(self._ncat, dtype=bool)
        if self.done:
            m[self._ev_lo:self._ev_hi] = True  # never empty; events are harmless no-ops here
            return m
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
                m[self._kc_lo:] = self._kc_masks[i]
                if not some and self._ks_any[i]:
                    some = True
                continue
            if pins is None:
                pins = {}
                for p in k.pins.values():
                    if p.active:
                        pins[p.pid] = pins.get(p.pid, 0) + 1
            nw = self._n_walk
            if tid <= self.config.max_threads:
                wlo = self._walk_lo + (tid - 1) * nw
                m[wlo:wlo + nw] = True
                if not t.fail_nth_next:
                    flo = self._tfail_lo + (tid - 1) * len(FAIL_NTH)
                    m[flo:flo + len(FAIL_NTH)] = True
                some = some or nw > 0
            lo = self._user_lo + (tid - 1) * nu
            um = self._user_masks
            i = pins.get(t.pid, 0)
            if i >= len(um):
                i = len(um) - 1
            m[lo:lo + nu] = um[i]
            if self._n_walk:
                wl = self._walk_lo + (tid - 1) * self._n_walk
                m[wl:wl + self._n_walk] = True
                some = True
            if not some and self._user_any[i]:
                some = True
        # Pressure events are legal while none is pending, and whenever nothing else is.
        if k.fail_nth == 0 or not some:
            m[self._ev_lo:self._ev_hi] = True
        return m

    # ----------------------------------------------------------------- schedules
    def get_schedule(self, name: str | None = None, compact: bool = False,
                     env_id: str = ENV_ID) -> dict[str, Any]:
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
            env_id: The env id written as provenance.

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
                s["args"] = readable_args(op, s["args"])
            steps.append(s)
        labels: list[str | None] = list(self.workload_labels)
        nwl = len(steps)
        for s, lab in zip(self.recorded, self.labels, strict=True):
            if (compact and "step" in s and len(steps) > nwl and "step" in steps[-1]
                    and steps[-1]["tid"] == s["tid"]):
                steps[-1]["step"] += 1
                labels[-1] = lab
                continue
            s = dict(s)
            if "args" in s:
                s["args"] = readable_args(s["start"], s["args"])
            steps.append(s)
            labels.append(lab)
        first = k.violations[0] if k.violations else None
        expect: dict[str, Any] = {"violation": None if first is None else
                                  {"kind": first.kind, "site": first.site, "step": first.step}}
        return {
            "version": FORMAT_VERSION,
            "name": name or f"episode-seed{self.episode_seed}",
            "config": k.config.to_dict(),
            "seed": self.episode_seed,
            "steps": steps,
            "expect": expect,
            "outcome": {"trace_hash": trace_hash(k.events), "events": len(k.events),
                        "steps": k.step_no, "labels": labels},
            "recorded": {"env": env_id,
                         "env_kwargs": json.dumps(self.init_kwargs, sort_keys=True,
                                                  default=list),
                         "objective": self.objective_name, "actions": self.elapsed,
                         "illegal_actions": self.illegal_actions,
                         "return": self.episode_return},
        }


__all__ = ["Coverage", "Harness", "HarnessStep", "Snapshot", "make_config"]
