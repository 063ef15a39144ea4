"""The agent interface, deterministic seed streams and the episode loop.

Every agent drives an episode through a public surface only: the action catalogue
(``env.catalogue``), the legal-action mask (``env.action_masks()``), the read-only
``env.kernel`` view and, for learning agents, the observation. Two hosts offer that
surface: :class:`cowenv.env.CowEnv` (Gymnasium, with observations) and
:class:`cowenv.harness.Harness` (the same episodes without observations; ``obs`` is
None). An agent whose :attr:`Agent.needs_observation` is False is driven on the
harness by campaigns, which skips the observation encoding. An agent is a small state
machine::

    agent.begin_episode(env, rng)        # after env.reset()
    a = agent.act(env, obs, mask)        # one catalogue index, legal under ``mask``
    agent.observe(env, a, obs, reward, terminated, truncated, info)
    agent.end_episode(env)

Randomness comes only from the ``numpy.random.Generator`` handed to
:meth:`Agent.begin_episode`; campaigns derive it from ``(seed, worker, episode)`` with
:func:`episode_seed_sequence`, so an episode is reproducible on its own and a campaign
can resume at any episode boundary. Agents that learn across episodes (Q-learning) keep
that state in :meth:`Agent.state_dict`, which is plain JSON-able data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from cowenv.harness import Harness
from cowenv.kernel import KSWAPD_TID
from cowenv.kernel.mm import MmStruct, vma_is_accessible
from cowenv.kernel.pgtable import PTE_SWAP, pte_protnone

if TYPE_CHECKING:
    from cowenv.env import CowEnv


def episode_seed_sequence(seed: int, worker: int, episode: int) -> np.random.SeedSequence:
    """Return the seed sequence of one episode of one worker of a campaign.

    Args:
        seed: Campaign seed.
        worker: Worker index (0-based).
        episode: Episode index within the worker (0-based).

    Returns:
        ``SeedSequence([seed, worker, episode])``: independent streams per worker and
        episode, derived without any global state.

    """
    return np.random.SeedSequence([int(seed), int(worker), int(episode)])


def episode_rng(seed: int, worker: int, episode: int) -> tuple[np.random.Generator, int]:
    """Agent generator and env reset seed for one episode (see :func:`episode_seed_sequence`).

    Returns:
        ``(rng, reset_seed)``: the agent's generator and a 31-bit seed for
        ``env.reset(seed=...)`` (recorded in the schedule).

    """
    ss = episode_seed_sequence(seed, worker, episode)
    reset_seed = int(ss.generate_state(1, dtype=np.uint32)[0] & 0x7FFF_FFFF)
    return np.random.Generator(np.random.PCG64(ss)), reset_seed


class Agent:
    """Base class: a scheduler that picks one legal catalogue action per step.

    Subclasses set :attr:`name` and implement :meth:`act`; the other hooks default to
    doing nothing.
    """

    name: ClassVar[str] = ""
    #: Whether :meth:`act` reads ``obs``; False lets campaigns drive the harness directly.
    needs_observation: ClassVar[bool] = False
    #: Steps left of the caller's budget when :meth:`observe` is called (set by
    #: :func:`run_episode` given ``max_actions``; None: no budget). An agent that
    #: executes steps outside the env (``offline_steps``) executes at most this many.
    step_room: int | None = None

    def __init__(self) -> None:
        self.rng: np.random.Generator = np.random.default_rng(0)

    def begin_episode(self, env: CowEnv, rng: np.random.Generator) -> None:
        """Start of an episode (``env`` has just been reset).

        Args:
            env: The environment (unwrapped).
            rng: The episode's only source of randomness.

        """
        self.rng = rng

    def act(self, env: CowEnv, obs: np.ndarray, mask: np.ndarray) -> int:
        """Choose a legal action.

        Args:
            env: The environment (unwrapped).
            obs: The current observation.
            mask: ``env.action_masks()`` (never all False).

        Returns:
            A catalogue index with ``mask[index]`` True.

        """
        raise NotImplementedError

    def observe(self, env: CowEnv, action: int, obs: np.ndarray, reward: float,
                terminated: bool, truncated: bool, info: dict[str, Any]) -> None:
        """Feedback after ``env.step(action)`` (learning agents update here)."""

    def done(self) -> bool:
        """Whether the agent is through with this episode before its last action.

        :func:`run_episode` then hands the rest of the episode to the harness's
        :class:`Teardown` (or, without one, ends the episode): a fuzzer's test case has
        its own length. Default: never (the agent plays until the teardown's reserve).
        """
        return False

    def end_episode(self, env: CowEnv) -> None:
        """End of an episode (after the last :meth:`observe`)."""

    def state_dict(self) -> dict[str, Any]:
        """State carried across episodes, as JSON-able data (empty for stateless agents)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (campaign resume)."""
        if state:
            raise ValueError(f"{self.name}: unexpected agent state {sorted(state)[:3]}")


def uniform_legal(rng: np.random.Generator, mask: np.ndarray) -> int:
    """Return a uniformly random legal action."""
    legal = np.flatnonzero(mask)
    return int(legal[rng.integers(len(legal))])


#: How uniform agents choose an action (``choice`` setting): ``template`` = uniform over
#: the legal catalogue entries; ``op`` = uniform over the legal *kinds* (run a thread, a
#: pressure event, or each operation name), then uniform within the kind; ``weighted`` =
#: the same two levels with :data:`KIND_WEIGHTS` (the soak's operation weights).
CHOICES: tuple[str, ...] = ("template", "op", "weighted")

#: Kind weights of the ``weighted`` choice: the user operations' weights are the soak's
#: workload generator's (:data:`cowenv.workload.DEFAULT_WEIGHTS`); ``run`` (run one
#: preemption point of a busy thread), ``reclaim`` (kswapd) and ``event`` (``fail_nth``)
#: are this module's. Copied, not imported: the agents must not import the soak.
KIND_WEIGHTS: dict[str, float] = {
    "run": 20.0, "read": 12.0, "write": 14.0, "mmap": 3.0, "munmap": 1.5, "mprotect": 2.5,
    "madvise": 4.0, "fork": 1.5, "clone": 0.8, "exit": 0.6, "prctl_cow_pte": 0.3,
    "pin": 3.0, "unpin": 1.5, "dev_read": 2.0, "dev_write": 2.0, "reclaim": 2.0,
    "event": 0.5,
}


class KindChooser:
    """Two-level random choice over a catalogue: the kind of action, then the entry.

    A catalogue entry's *kind* is ``run`` (any thread), ``event``, or the operation
    name of a start (``read``, ``fork``, ``reclaim``, ...). Uniform over the legal
    actions (``template``) makes the kinds with many templates (madvise and mprotect
    over every range) dominate: over the default catalogue they are most of the
    starts, fork under 1 %. Choosing the kind first gives every operation its turn.
    Unknown kinds (operations added later) get weight 1.

    Args:
        catalogue: The env's catalogue.
        choice: One of :data:`CHOICES`.
        weights: Kind weights (``weighted``; default :data:`KIND_WEIGHTS`).

    """

    def __init__(self, catalogue: Any, choice: str = "op",
                 weights: dict[str, float] | None = None) -> None:
        if choice not in CHOICES:
            raise ValueError(f"choice: expected one of {', '.join(CHOICES)}, got {choice!r}")
        self.choice = choice
        kinds: list[str] = []
        gid = np.zeros(len(catalogue), dtype=np.int64)
        for i, sp in enumerate(catalogue):
            k = sp.op if sp.kind == "start" else sp.kind
            if k not in kinds:
                kinds.append(k)
            gid[i] = kinds.index(k)
        self.kinds = kinds
        self.gid = gid
        w = dict(KIND_WEIGHTS if weights is None else weights)
        self.w = np.array([float(w.get(k, 1.0)) if choice == "weighted" else 1.0
                           for k in kinds])

    def choose(self, rng: np.random.Generator, mask: np.ndarray) -> int:
        """A legal action (``mask`` must have one)."""
        legal = np.flatnonzero(mask)
        if self.choice == "template" or len(legal) == 1:
            return int(legal[rng.integers(len(legal))])
        g = self.gid[legal]
        present = np.unique(g)
        w = self.w[present]
        tot = w.sum()
        if tot <= 0.0:
            return int(legal[rng.integers(len(legal))])
        k = present[int(np.searchsorted(np.cumsum(w), rng.random() * tot, side="right"))
                    if len(present) > 1 else 0]
        pool = legal[g == k]
        return int(pool[rng.integers(len(pool))])


def load_faults(mm: MmStruct, vpn: int, pte: int) -> bool:
    """Whether a user load of ``vpn`` through entry ``pte`` runs a kernel fault path.

    ``handle_pte_fault`` (mm/memory.c, 6.2): ``if (!pte_present(vmf->orig_pte)) return
    do_swap_page(vmf);`` (a swap or migration entry) and ``if (pte_protnone(vmf->orig_pte)
    && vma_is_accessible(vmf->vma)) return do_numa_page(vmf);`` (a NUMA-hinting entry;
    in a ``PROT_NONE`` VMA the load fails in ``access_error`` instead). An empty entry
    faults too, but maps a fresh page: nothing left behind to read back.
    """
    if pte & PTE_SWAP:
        return True
    if pte_protnone(pte):
        vma = mm.find_vma(vpn)
        return vma is not None and vma_is_accessible(vma)
    return False


class Teardown:
    """The harness's end of an episode: finish every operation, observe, then exit.

    Like a test program's end (and the leak checks that run then: ``check_mm``,
    ``free_pgtables``), the last ``reserve`` actions of an episode are not the agent's:
    the harness, through ordinary env actions (so the schedule records and replays them),
    one preemption point at a time,

    1. runs runnable threads (round-robin) until every operation is done -- a
       quiescent point, where the kernel's quiescent-point checks, the shadow sweep
       included, compare every mapped page and every pin with the shadow;
    2. **observes**, once per live process, through its lowest idle thread: a
       ``dev_read`` of each of its pins, then a ``read`` of each catalogue address
       whose entry a user load would fault on (:func:`load_faults`: a swap or migration
       entry, or a NUMA-hinting entry -- ``pte_protnone`` in an accessible VMA), each
       run to completion -- so corruption left behind is read back through the kernel's
       own paths (DMA, swap-in, ``do_numa_page``) before the threads exit. (An accessible
       present page needs no read: the sweep at the quiescent point has just compared
       the very value a read would return.) Observation only starts while the
       reserve keeps :attr:`EXIT_SHARE` actions per live user thread for the exits, so
       that exit-time checks still run;
    3. exits idle user threads (highest tid first: children before their parents).

    It stops when nothing is left to run, observe or exit, when only blocked threads
    remain, or when the reserve is used up.
    """

    #: Actions kept per live user thread for its exit (``exit_mmap`` over a few tables).
    EXIT_SHARE = 8

    def __init__(self) -> None:
        self._env = 0
        self._exit: dict[int, int] = {}
        self._dev_read: dict[tuple[int, int], int] = {}  # (tid, pin slot) -> action
        self._read: dict[int, list[tuple[int, int]]] = {}  # tid -> [(vpn, action)]
        self._observed: set[tuple[int, str, int]] = set()  # (pid, "pin"/"page", id/vpn)
        self._last_run = -1  # the thread step 1 ran last (round-robin)

    def _index(self, env: CowEnv) -> None:
        self._exit, self._dev_read, self._read = {}, {}, {}
        ps = env.kernel.config.page_size
        for i, sp in enumerate(env.catalogue):
            if sp.kind != "start":
                continue
            if sp.op == "exit":
                self._exit[sp.tid] = i
            elif sp.op == "dev_read" and sp.pin_slot >= 0:
                self._dev_read[(sp.tid, sp.pin_slot)] = i
            elif sp.op == "read":
                self._read.setdefault(sp.tid, []).append((dict(sp.args)["addr"] // ps, i))
        self._env = id(env)

    def _observe(self, env: CowEnv, mask: np.ndarray) -> int | None:
        """The next observation action (step 2 above), or None when all is observed."""
        k = env.kernel
        done_pids: list[int] = []
        for tid in sorted(k.threads):
            t = k.threads[tid]
            if t.exited or t.gen is not None or not t.pid or t.pid in done_pids:
                continue
            done_pids.append(t.pid)
            mm = k.procs[t.pid].mm
            pins = [pid_ for pid_, p in k.pins.items() if p.active and p.pid == t.pid]
            for slot, pin_id in enumerate(pins):
                a = self._dev_read.get((tid, slot))
                if a is not None and mask[a] and (t.pid, "pin", pin_id) not in self._observed:
                    self._observed.add((t.pid, "pin", pin_id))
                    return a
            P = k.P
            for vpn, a in self._read.get(tid, []):
                pmd = mm.pmd.get(vpn // P)
                if pmd is None or not load_faults(mm, vpn, int(pmd.table.entries[vpn % P])):
                    continue
                if mask[a] and (t.pid, "page", vpn) not in self._observed:
                    self._observed.add((t.pid, "page", vpn))
                    return a
        return None

    def action(self, env: CowEnv, remaining: int | None = None) -> int | None:
        """Return the next teardown action, or None when the teardown is over.

        ``remaining``: actions left in the episode (None: unlimited), which bounds the
        observation phase.
        """
        if self._env != id(env):
            self._index(env)
        mask = env.action_masks()
        k = env.kernel
        tids = sorted(k.threads)
        runnable = [tid for tid in tids
                    if 0 <= tid < len(mask) and env.catalogue[tid].kind == "run" and mask[tid]]
        live = sum(1 for tid in tids if tid != KSWAPD_TID and not k.threads[tid].exited)
        tight = remaining is not None and remaining <= self.EXIT_SHARE * live
        if tight:  # the exits' share is all that is left: start the idle threads' exits
            for tid in reversed(tids):
                t = k.threads[tid]
                e = self._exit.get(tid)
                if e is not None and not t.exited and t.gen is None and mask[e]:
                    return e
        if runnable:
            # Round-robin from the thread after the last one run: a thread that retries
            # (kcompactd's migrate_pages passes, a fault waiting on a migration entry)
            # must not use up the reserve while the thread it waits for never runs.
            tid = next((x for x in runnable if x > self._last_run), runnable[0])
            self._last_run = tid
            return tid
        if k.quiescent() and (remaining is None or remaining > self.EXIT_SHARE * live):
            a = self._observe(env, mask)
            if a is not None:
                return a
        for tid in reversed(tids):
            t = k.threads[tid]
            a = self._exit.get(tid)
            if a is not None and not t.exited and t.gen is None and mask[a]:
                return a
        return None


@dataclass
class EpisodeResult:
    """What :func:`run_episode` saw.

    Attributes:
        steps: Actions taken.
        ret: Sum of rewards.
        terminated: The episode ended by termination (not truncation or stop).
        stopped: ``on_step`` asked to stop early.
        signatures: ``signature -> action index`` (1-based, 0 = during reset) of the
            first report of each violation signature in this episode, simulator
            defects included.
        offline_steps: Steps the agent executed outside the env during the episode
            (its ``offline_steps`` counter: greybox's systematic windows search with a
            kernel copy of their own); a step budget counts them like env steps.

    """

    steps: int = 0
    offline_steps: int = 0
    ret: float = 0.0
    terminated: bool = False
    stopped: bool = False
    signatures: dict[str, int] = field(default_factory=dict)


#: ``on_violation(step, violation_dict)``; return True to stop the episode now.
ViolationHook = Callable[[int, dict[str, Any]], bool]


def run_episode(env: CowEnv, agent: Agent, rng: np.random.Generator, reset_seed: int,
                max_actions: int | None = None,
                on_violation: ViolationHook | None = None,
                teardown: int = 0) -> EpisodeResult:
    """Reset ``env`` and let ``agent`` play one episode.

    Args:
        env: The environment (unwrapped :class:`~cowenv.env.CowEnv`) or a
            :class:`~cowenv.harness.Harness` (no observations: ``obs`` is None; ``info``
            has only ``action_mask`` and ``violations``). Both give the same episode,
            rewards and violations for the same actions.
        agent: The agent.
        rng: The agent's generator for this episode.
        reset_seed: Seed for ``env.reset``.
        max_actions: Stop after this many actions even if the episode goes on (the
            campaign's remaining budget); the agent's ``offline_steps`` count against
            it, and :attr:`Agent.step_room` tells the agent how many are left.
        on_violation: Called once per violation signature, the first time it is
            reported in this episode, with the action index (0 = during reset) and the
            violation (``kind``, ``site``, ``signature``, ``step``, ``message``, ...);
            returning True stops the episode after this action.
        teardown: The last ``teardown`` actions of the episode (of ``env.max_steps``)
            are the harness's :class:`Teardown`, not the agent's (0 = none); it also
            takes over, with the rest of ``env.max_steps``, once :meth:`Agent.done`.

    Returns:
        The :class:`EpisodeResult`.

    """
    h = env if isinstance(env, Harness) else None
    if h is None:
        obs, info = env.reset(seed=reset_seed)
        first = info.get("violations", [])
    else:
        obs, info = None, {}
        first = [v.to_dict() for v in h.reset(reset_seed)]
    off0 = getattr(agent, "offline_steps", 0)
    agent.begin_episode(env, rng)
    res = EpisodeResult()
    stop = False
    for v in first:
        if v["signature"] not in res.signatures:
            res.signatures[v["signature"]] = 0
            if on_violation is not None and on_violation(0, v):
                stop = True
    limit = env.max_steps if max_actions is None else min(max_actions, env.max_steps)
    # Steps the agent executes outside the env count against ``max_actions`` (a budget)
    # like env steps; ``budget - spent()`` is the agent's ``step_room``.
    budget = max_actions

    def spent() -> int:
        return res.steps + getattr(agent, "offline_steps", 0) - off0
    agent_limit = env.max_steps - max(0, int(teardown))
    harness = Teardown() if teardown > 0 else None
    terminated = truncated = False
    while not stop and res.steps < limit and (budget is None or spent() < budget):
        if (res.steps < agent_limit or harness is None) and not agent.done():
            a = agent.act(env, obs, env.action_masks() if h is None else h.mask)
            mine = True
        elif harness is None:
            break
        else:
            td = harness.action(env, limit - res.steps)
            if td is None:
                break
            a, mine = td, False
        if h is None:
            obs, reward, terminated, truncated, info = env.step(a)
            violations = info["violations"]
        else:
            st = h.step(a)
            reward, terminated, truncated = st.reward, st.terminated, st.truncated
            violations = st.violation_dicts() if st.outcome.violations else []
            info = {"action_mask": h.mask, "violations": violations}
        res.steps += 1
        res.ret += float(reward)
        if mine:
            if budget is not None:
                agent.step_room = budget - spent()
            agent.observe(env, a, obs, float(reward), terminated, truncated, info)
        for v in violations:
            sig = v["signature"]
            if sig not in res.signatures:
                res.signatures[sig] = res.steps
                if on_violation is not None and on_violation(res.steps, v):
                    stop = True
        if terminated or truncated:
            break
    res.terminated = bool(terminated)
    res.stopped = stop
    agent.step_room = None
    agent.end_episode(env)
    res.offline_steps = getattr(agent, "offline_steps", 0) - off0
    return res
