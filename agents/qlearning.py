"""Coyote-style tabular Q-learning for controlled concurrency testing.

After Mukherjee, Deligiannis, Biswas and Lal, "Learning-based Controlled Concurrency
Testing" (OOPSLA 2020), the ``QL`` strategy of Coyote: the program state is abstracted
and hashed, the agent keeps a Q-table over (state hash, scheduling choice), and the
reward is *novelty*: taking an action that leads to a state already visited ``N`` times
earns ``-N``. With Q initialised to 0, rarely tried choices in frequently seen states
look best, so the search keeps pushing towards unexplored interleavings; an
epsilon-greedy rule over the legal actions keeps some uniform exploration.

**Abstract state** (:func:`abstract_state`), read from ``env.kernel`` (read-only):

* per thread (tid order): state (idle / runnable / blocked / exited), the operation in
  progress and its preemption label, the lock classes it holds (with mode) and the one
  it waits for;
* per live process (pid order): ``MMF_COW_PTE_READY`` / ``MMF_COW_PTE`` /
  ``MMF_HAS_PINNED``, its number of threads, and for each PMD slot the workload spans:
  absent / private / shared (read-only PMD), the table's refcount, and which earlier
  process slot points at the same table (the sharing pattern);
* pending ``fail_nth`` and the number of active pins.

It is hashed with BLAKE2b over the ``repr`` of that tuple of ints and strings (stable
across processes and runs; Python's ``hash()`` is salted per process and is not used).

Update (after every step, online): ``N[s'] += 1``, ``r = -N[s']``,
``Q[s, a] += alpha * (r + gamma * max_{a' legal in s'} Q[s', a'] - Q[s, a])`` (0 at
episode end). Defaults ``alpha = 0.3``, ``gamma = 0.7`` are Coyote's. The Q-table and
visit counts persist across episodes and are saved with :meth:`state_dict`.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Agent

if TYPE_CHECKING:
    from cowenv.env import CowEnv
    from cowenv.kernel import Kernel

# mm->flags bits, read through the kernel's mm module at first use (kept lazy so that
# importing the agents does not import the kernel).
_FLAGS: tuple[int, int, int] | None = None


def _mm_flags() -> tuple[int, int, int]:
    global _FLAGS
    if _FLAGS is None:
        from cowenv.kernel.mm import MMF_COW_PTE, MMF_COW_PTE_READY, MMF_HAS_PINNED

        _FLAGS = (MMF_COW_PTE_READY, MMF_COW_PTE, MMF_HAS_PINNED)
    return _FLAGS


def abstract_state(env: CowEnv, coarse: bool = False) -> tuple[Any, ...]:
    """Return the abstract program state of ``env``'s kernel (see the module docstring).

    Args:
        env: The env (or harness).
        coarse: Leave out the preemption label of running threads and the lock they
            wait for: a thread is idle, exited, or busy with an operation holding a set
            of lock classes; the processes' table-sharing state is kept whole. Coyote's
            abstractions are this kind of projection; it makes states recur across
            episodes, so the visit counts (the reward) mean something.

    Returns:
        A tuple of ints and strings (canonical: no object identities, no floats).

    """
    k: Kernel = env.kernel
    threads = []
    for tid in sorted(k.threads):
        t = k.threads[tid]
        if t.exited:
            threads.append((tid, "x"))
            continue
        if t.gen is None:
            threads.append((tid, "i", t.pid))
            continue
        held = tuple(sorted((lk.cls, mode) for lk, mode in t.held))
        if coarse:
            threads.append((tid, t.pid, t.op, held))
            continue
        w = t.waiting
        wait = (w[0].cls, w[1]) if w is not None else ()
        threads.append((tid, "b" if w is not None and not w[0].can_acquire(tid, w[1]) else "r",
                        t.pid, t.op, t.label, held, wait))
    ready, cow, pinned = _mm_flags()
    procs = k.live_procs()
    where: dict[int, int] = {}
    mms = []
    for i, p in enumerate(procs):
        mm = p.mm
        f = mm.flags
        pmds = []
        for idx in env.pmd_indices:
            e = mm.pmd.get(idx)
            if e is None:
                pmds.append(0)
                continue
            tb = e.table
            first = where.setdefault(id(tb), i)
            pmds.append((1 if e.write else 2, min(tb.refcount, 3), first if first != i else -1))
        mms.append((bool(f & ready), bool(f & cow), bool(f & pinned), len(p.tids), tuple(pmds)))
    pins = sum(1 for pin in k.pins.values() if pin.active)
    return (tuple(threads), tuple(mms), int(k.fail_nth), min(pins, 4))


def state_hash(state: tuple[Any, ...]) -> int:
    """Stable 64-bit hash of an abstract state (BLAKE2b of its ``repr``)."""
    d = hashlib.blake2b(repr(state).encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") >> 1  # 63 bits: fits a signed int64 / JSON int


#: ``state`` settings: ``fine`` (labels and waits, as described above) or ``coarse``.
STATE_ABSTRACTIONS = ("fine", "coarse")
#: ``actions`` settings: Q over catalogue entries, or over action *kinds* (run thread
#: ``t``; start operation ``op`` on thread ``t``; a pressure event), the template then
#: uniform among the kind's legal entries.
ACTION_ABSTRACTIONS = ("catalogue", "kind")


class QLearningAgent(Agent):
    """Tabular Q-learning with a negative-visit-count reward and epsilon-greedy choice.

    Args:
        epsilon: Probability of a uniformly random legal action.
        alpha: Learning rate.
        gamma: Discount.
        state: :data:`STATE_ABSTRACTIONS` (``coarse``: see :func:`abstract_state`).
        actions: :data:`ACTION_ABSTRACTIONS`.

    Attributes:
        q: ``state hash -> {action: Q}``; missing entries are 0.
        visits: ``state hash -> visit count``.

    """

    name = "ql"

    def __init__(self, epsilon: float = 0.05, alpha: float = 0.3, gamma: float = 0.7,
                 state: str = "coarse", actions: str = "kind") -> None:
        super().__init__()
        for nm, v in (("epsilon", epsilon), ("alpha", alpha), ("gamma", gamma)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{nm}: expected 0..1")
        if state not in STATE_ABSTRACTIONS:
            raise ValueError(f"state: expected one of {', '.join(STATE_ABSTRACTIONS)}")
        if actions not in ACTION_ABSTRACTIONS:
            raise ValueError(f"actions: expected one of {', '.join(ACTION_ABSTRACTIONS)}")
        self.epsilon, self.alpha, self.gamma = float(epsilon), float(alpha), float(gamma)
        self.coarse = state == "coarse"
        self.kind_actions = actions == "kind"
        self._keys: np.ndarray | None = None
        self._keys_env = 0
        self.q: dict[int, dict[int, float]] = {}
        self.visits: dict[int, int] = {}
        self._s = 0

    def _key_of(self, env: CowEnv) -> np.ndarray:
        """Per catalogue entry, the Q-table's action key (the entry, or its kind)."""
        if self._keys is None or self._keys_env != id(env):
            n = len(env.catalogue)
            if not self.kind_actions:
                keys = np.arange(n, dtype=np.int64)
            else:
                names: list[tuple[Any, ...]] = []
                keys = np.zeros(n, dtype=np.int64)
                for i, sp in enumerate(env.catalogue):
                    k = (sp.kind, sp.tid, sp.op)
                    if k not in names:
                        names.append(k)
                    keys[i] = names.index(k)
            self._keys, self._keys_env = keys, id(env)
        return self._keys

    def _state(self, env: CowEnv) -> int:
        return state_hash(abstract_state(env, self.coarse))

    def begin_episode(self, env: CowEnv, rng: np.random.Generator) -> None:  # noqa: D102
        super().begin_episode(env, rng)
        self._s = self._state(env)
        self.visits[self._s] = self.visits.get(self._s, 0) + 1

    def act(self, env: CowEnv, obs: np.ndarray, mask: np.ndarray) -> int:  # noqa: D102
        legal = np.flatnonzero(mask)
        keys = self._key_of(env)
        lk = keys[legal]
        choices = np.unique(lk) if self.kind_actions else lk
        qs = self.q.get(self._s)
        if self.rng.random() < self.epsilon or not qs:
            c = int(choices[self.rng.integers(len(choices))])
        else:
            vals = np.fromiter((qs.get(int(a), 0.0) for a in choices), dtype=np.float64,
                               count=len(choices))
            best = choices[vals == vals.max()]
            c = int(best[self.rng.integers(len(best))])
        if not self.kind_actions:
            return c
        pool = legal[lk == c]
        return int(pool[self.rng.integers(len(pool))])

    def observe(self, env: CowEnv, action: int, obs: np.ndarray, reward: float,
                terminated: bool, truncated: bool, info: dict[str, Any]) -> None:
        """Q-update with the novelty reward ``-N[s']`` (the env's reward is not used)."""
        s2 = self._state(env)
        n = self.visits.get(s2, 0) + 1
        self.visits[s2] = n
        keys = self._key_of(env)
        future = 0.0
        if not terminated:
            q2 = self.q.get(s2)
            if q2:
                legal = np.unique(keys[np.flatnonzero(info["action_mask"])])
                # Unseen actions are worth 0, the maximum possible (all rewards < 0).
                future = 0.0 if len(q2) < len(legal) else max(q2.get(int(a), 0.0)
                                                              for a in legal)
        row = self.q.setdefault(self._s, {})
        key = int(keys[int(action)])
        old = row.get(key, 0.0)
        row[key] = old + self.alpha * (-float(n) + self.gamma * future - old)
        self._s = s2

    def state_dict(self) -> dict[str, Any]:
        """Q-table and visit counts as JSON-able lists (keys sorted: stable files)."""
        return {"q": [[s, sorted(row.items())] for s, row in sorted(self.q.items())],
                "visits": sorted(self.visits.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.q = {int(s): {int(a): float(v) for a, v in row} for s, row in state.get("q", [])}
        self.visits = {int(s): int(n) for s, n in state.get("visits", [])}
