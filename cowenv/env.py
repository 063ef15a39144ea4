"""The Gymnasium environment for adversarial fault scheduling.

An agent schedules threads, syscalls and memory pressure against the simulated kernel
and is rewarded for driving it into invariant violations.

The environment is a thin adapter (BRIEF §7), in the spirit of Gymnasium's ``FuncEnv``:
everything about an episode -- the action catalogue and masks, applying an action to
the kernel, the workload and reset, the objective's reward and termination, recording
the schedule -- lives in :class:`cowenv.harness.Harness`. The env adds the observation
(:mod:`cowenv.observation`), the ``info`` dict and rendering. Every kernel decision
lives in :mod:`cowenv.kernel`, which never imports gymnasium.

Two ids are registered (on ``import cowenv`` and through the ``gymnasium.envs`` entry
point, :func:`register_envs`): ``cowenv/CowPte-v0`` (x86-64 geometry, the as-posted
patch) and ``cowenv/CowPteSmall-v0`` (8 entries per table: fast RL episodes).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from . import ENV_ID, SMALL_ENV_ID, SMALL_KWARGS
from .catalogue import NOOP, ActionSpec
from .harness import Harness
from .kernel import Kernel
from .kernel.config import KernelConfig
from .objectives import Objective
from .observation import ObservationEncoder


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

    ``Discrete(n)``, a fixed catalogue (``self.catalogue``, each entry a
    :class:`cowenv.catalogue.ActionSpec`; ``describe_action(a)`` prints one). With
    ``N = max_threads`` and ``U`` user templates:

    | indices | action |
    |---|---|
    | ``0 … N`` | run thread ``t`` one preemption point (``t = 0`` is kswapd) |
    | ``N+1 … N+N·U`` | start user template ``j`` on thread ``t``: index ``N+1+(t-1)·U+j`` |
    | next ``K`` | start kswapd template ``j``: reclaim 1 or 8 pages, or 1 page starting |
    |  | with the page at a portion's first page in a chosen process slot |
    | next 3 | ``fail_nth`` with ``n = 1, 2, 3`` (the n-th next allocation fails) |
    | next ``N·W`` | (issue 13, appended) start walker template ``j`` on thread ``t``: |
    |  | ``numa_hint`` per region and portion, ``clear_refs`` 4 and 1, ``swapoff``, |
    |  | ``mremap`` shrink/grow/move, ``move_pages`` |
    | next ``3·N`` | (issue 13) thread ``t``'s ``/proc/thread-self/fail-nth`` = 1, 2, 3 |
    | last ``C`` | start kcompactd (kthread slot) template ``j``: compact 1 or 8 pages, or |
    |  | 1 page starting with the page at a portion's first page in a process slot |

    User templates, drawn from the workload's regions (a *portion* is the part of a
    region inside one PMD): ``read``/``write`` of the first, second and last page of
    each portion; ``pin`` of each portion's first page (R/O or R/W, slow or GUP-fast);
    ``unpin``/``dev_read``/``dev_write`` of pin slot 0 or 1 (the thread's process's
    oldest active pins); ``mprotect`` none / r / rw, ``madvise`` DONTNEED / FREE / PAGEOUT /
    WIPEONFORK / DONTFORK and ``munmap`` over regions, portions, half-portions (partial
    PMDs) and first pages; ``mmap`` of each region again (populated or not); ``fork``,
    ``clone``, ``exit``, ``prctl_cow_pte``. Walker templates (appended after the events,
    see :func:`cowenv.catalogue.build_walker_templates`): ``mremap`` shrink, grow,
    ``MREMAP_FIXED`` of a first page into a PMD's hole and of a whole aligned table to an
    empty PMD; ``move_pages`` of regions and of portions' first pages.

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
      lock class awaited one-hot, and whether for write; the thread's fail-nth
      (``/proc/thread-self/fail-nth`` written for its next operation, or armed for the
      running one) / 3, capped at 1 (added by issue 13 as the slot's last float);
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
      64 entries), ``nr_swap_slots`` (``nr_frames // 4``), ``base`` (the upstream
      release modelled: ``6.2``, v4's base, by default; ``6.4``/``6.5``), ``fault_mode``
      (``mmap_lock``/``vma_lock``; default: per-VMA-lock faults on a base that has them,
      6.4+, else ``mmap_lock``), ``split_ptl``, ``lockdep`` (``CONFIG_PROVE_LOCKING``);
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

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self._init_kwargs: dict[str, Any] = dict(copy.deepcopy(kwargs), render_mode=render_mode)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode: expected one of "
                             f"{', '.join(self.metadata['render_modes'])}, got {render_mode!r}")
        self.render_mode = render_mode
        #: The episode machinery (catalogue, masks, apply, reward, schedule).
        self.harness = h = Harness(**kwargs)
        #: The observation encoder.
        self.encoder = enc = ObservationEncoder(h)
        self.action_space = spaces.Discrete(len(h.catalogue))
        self.observation_space = spaces.Box(0.0, 1.0, (enc.size,), dtype=np.float32)
        self.obs_layout = enc.layout
        self.label_vocab = h.coverage.vocab
        self.n_label_slots = h.coverage.n_slots

    # ----------------------------------------------------------------- harness views
    def __getattr__(self, name: str) -> Any:
        """Read-only settings of the harness (``regions``, ``violation_reward``, ...)."""
        if name.startswith("_") or name in ("harness", "encoder"):
            raise AttributeError(name)
        return getattr(self.harness, name)

    @property
    def config(self) -> KernelConfig:
        """The kernel configuration."""
        return self.harness.config

    @property
    def kernel(self) -> Kernel:
        """The current episode's kernel (read it; drive it only through :meth:`step`)."""
        return self.harness.kernel

    @property
    def catalogue(self) -> tuple[ActionSpec, ...]:
        """The action catalogue."""
        return self.harness.catalogue

    @property
    def max_steps(self) -> int:
        """Actions per episode before truncation."""
        return self.harness.max_steps

    @property
    def pmd_indices(self) -> tuple[int, ...]:
        """The PMD slots observed (indices of the PMDs the workload's regions span)."""
        return self.harness.pmd_indices

    @property
    def objective(self) -> Objective:
        """The objective instance."""
        return self.harness.objective

    @property
    def workload(self) -> list[dict[str, Any]]:
        """The workload's scenario steps."""
        return self.harness.workload

    def describe_action(self, action: int) -> str:
        """Human-readable form of catalogue entry ``action``."""
        return self.harness.describe_action(action)

    def run_action(self, tid: int) -> int:
        """Catalogue index of "run thread ``tid``"."""
        return self.harness.run_action(tid)

    def start_action(self, tid: int, template: int) -> int:
        """Catalogue index of "start user template ``template`` on thread ``tid``"."""
        return self.harness.start_action(tid, template)

    def find_actions(self, op: str | None = None, tid: int | None = None,
                     **kw: Any) -> list[int]:
        """Catalogue indices matching ``op``, ``tid`` and arguments (see the harness)."""
        return self.harness.find_actions(op, tid, **kw)

    @property
    def user_templates(self) -> tuple[ActionSpec, ...]:
        """The user-thread templates (``tid`` unset), in catalogue order."""
        return self.harness.user_templates

    def action_masks(self) -> np.ndarray:
        """Legal actions now (bool array over the catalogue)."""
        return self.harness.mask.copy()

    def legal_actions(self) -> np.ndarray:
        """The legal catalogue indices now, ascending (``np.flatnonzero(action_masks())``).

        Read-only and shared (memoised with the mask): no copy and no numpy call per
        step, for agents that pick among the legal actions.
        """
        return self.harness.legal

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
        h = self.harness
        vs = h.reset(int(self.np_random_seed) if self.np_random_seed >= 0 else 0)
        self.encoder.reset()
        obs = self.encoder.encode(h.kernel, None, 0)
        info = dict(h.objective_info)
        info.update({"action_mask": h.mask.copy(),
                     "violations": [v.to_dict() for v in vs],
                     "coverage": h.coverage.n})
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Take catalogue action ``action`` (see the class docstring).

        An illegal or out-of-range action is a no-op with ``info["illegal_action"]``.

        Returns:
            ``(observation, reward, terminated, truncated, info)``.

        """
        h = self.harness
        st = h.step(action)
        if st.new_slot >= 0:
            self.encoder.cover(st.new_slot)
        oc = st.outcome
        obs = self.encoder.encode(h.kernel, oc.spec if not oc.illegal else NOOP, h.elapsed)
        info: dict[str, Any] = {
            "illegal_action": oc.illegal,
            "action": oc.record if oc.record is not None else self._describe_taken(),
            "label": oc.label,
            "violations": [],
            "violation": None,
            "events": st.events,
            "kernel_step": h.kernel.step_no,
            "coverage": h.coverage.n,
            "action_mask": h.mask.copy(),
        }
        if oc.violations:
            new = oc.new_signatures
            info["violations"] = st.violation_dicts()
            info["violation"] = next((v.to_dict() for v in oc.violations if v.signature in new),
                                     None)
        if st.defect:
            info["simulator_defect"] = st.defect
        if st.extra:
            info.update(st.extra)
        return obs, st.reward, st.terminated, st.truncated, info

    def _describe_taken(self) -> str:
        a = self.harness.actions[-1]
        cat = self.harness.catalogue
        return (cat[a] if 0 <= a < len(cat) else ActionSpec("invalid")).describe()

    def get_schedule(self, name: str | None = None, compact: bool = False) -> dict[str, Any]:
        """Return the episode so far as scenario data (see :meth:`Harness.get_schedule`)."""
        env_id = self.spec.id if self.spec is not None else ENV_ID
        return self.harness.get_schedule(name, compact, env_id)

    # ----------------------------------------------------------------- rendering
    def render(self) -> str | np.ndarray | None:
        """``ansi``: a text picture; ``rgb_array``: an RGB image (H, W, 3) uint8."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode")
            return None
        from . import render as _render

        k = self.kernel
        if self.render_mode == "ansi":
            return _render.render_ansi(k, self.pmd_indices, self.harness.last_label)
        return _render.render_rgb(k, self.pmd_indices)

    # ----------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """Pickle by replay: the kwargs, the seed and the actions taken.

        The kernel's threads are live generators, which cannot be pickled; unpickling
        rebuilds the episode by replaying the actions, which is exact by determinism.
        """
        h = self.harness
        rng = self._np_random.bit_generator.state if self._np_random is not None else None
        return {"kwargs": self._init_kwargs, "spec": self.spec,
                "episode": None if h._kernel is None else (h.episode_seed, list(h.actions)),
                "rng": rng, "rng_seed": self._np_random_seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__` data (replays the episode)."""
        self.__init__(**state["kwargs"])
        self.spec = state["spec"]
        if state["episode"] is not None:
            seed, actions = state["episode"]
            self.reset(seed=seed)
            for a in actions:
                self.step(a)
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


__all__ = ["ENV_ID", "SMALL_ENV_ID", "SMALL_KWARGS", "CowEnv", "register_envs"]
