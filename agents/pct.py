"""PCT: probabilistic concurrency testing.

After Burckhardt, Kothari, Musuvathi and Nagarakatte, "A Randomized Scheduler with
Probabilistic Guarantees of Finding Bugs" (ASPLOS 2010).

Per episode, every thread gets a random priority, drawn when the thread is first seen,
from the band ``[d, d + 1)`` (so the threads' order is a uniformly random permutation,
also for threads created later by fork/clone). ``d - 1`` *change points* are drawn
uniformly without replacement from the steps ``1 .. k`` (``k`` = expected run length,
the env's ``max_steps`` unless given). At every step the enabled thread with the
highest priority is scheduled; at the ``i``-th change point the thread about to be
scheduled drops to priority ``d - i`` (below every initial priority) first. For a bug
of depth ``d`` among ``n`` threads and ``k`` steps, one episode finds it with probability
at least ``1 / (n * k**(d - 1))``.

Mapping onto the env's catalogue (kswapd, tid 0, is a thread like the others):

* a thread with an operation in progress is *enabled* when its run action is legal
  (blocked threads are not); scheduling it runs it one preemption point;
* an idle thread is *enabled* when it has a legal start action; scheduling it starts an
  operation. **Start policy**: by default (``start_policy="op"``) uniform over
  operation names first, then over that operation's legal templates;
  ``start_policy="template"`` is uniform over the thread's legal start templates (the
  bug-finding benchmark measured ``op`` better). ``op_bias``
  multiplies the weight of every template of an operation (0 excludes it; a thread
  whose legal templates all have weight 0 is not enabled);
* memory-pressure events (``fail_nth``) are not threads: at each step where one is
  legal it fires with probability ``event_prob`` (``n`` uniform among the legal ones),
  before the priority rule is applied;
* ``programs`` (tests, classic PCT setting): ``{tid: [(op, args), ...]}`` gives a
  thread a fixed sequence of operations; it is enabled while its next operation can
  start, and disabled once the sequence is done. Threads without a program then never
  start anything (they still run operations already in progress).

When no thread is enabled (everyone blocked or done), a legal event is fired if any,
else a uniformly random legal action is taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Agent, uniform_legal

if TYPE_CHECKING:
    from cowenv.env import CowEnv

START_POLICIES = ("template", "op")


class _Catalogue:
    """Per-env index of the catalogue by thread (built once per env instance)."""

    def __init__(self, env: CowEnv) -> None:
        runs: dict[int, int] = {}
        starts: dict[int, list[int]] = {}
        ops: dict[int, list[str]] = {}
        events: list[int] = []
        for i, sp in enumerate(env.catalogue):
            if sp.kind == "run":
                runs[sp.tid] = i
            elif sp.kind == "start":
                starts.setdefault(sp.tid, []).append(i)
                ops.setdefault(sp.tid, []).append(sp.op)
            elif sp.kind == "event":
                events.append(i)
        self.tids = sorted(set(runs) | set(starts))
        self.run = runs
        self.starts = {t: np.array(v, dtype=np.int64) for t, v in starts.items()}
        self.ops = {t: np.array(v) for t, v in ops.items()}
        self.events = np.array(events, dtype=np.int64)


class PCTAgent(Agent):
    """PCT with depth ``d`` (see the module docstring for the exact policy).

    Args:
        depth: Bug depth ``d`` (>= 1): ``d - 1`` change points per episode.
        run_length: Expected steps per episode ``k`` (default: the env's ``max_steps``).
        event_prob: Probability of firing a legal memory-pressure event at a step.
        start_policy: ``template`` or ``op`` (how an idle thread picks its operation).
        op_bias: Operation name -> weight multiplier for start templates.
        programs: Optional fixed per-thread operation sequences ``{tid: [(op, args)]}``.

    """

    name = "pct"

    def __init__(self, depth: int = 3, run_length: int | None = None, event_prob: float = 0.02,
                 start_policy: str = "op", op_bias: dict[str, float] | None = None,
                 programs: dict[int, list[tuple[str, dict[str, Any]]]] | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth: expected >= 1")
        if run_length is not None and run_length < 1:
            raise ValueError("run_length: expected >= 1")
        if not 0.0 <= event_prob <= 1.0:
            raise ValueError("event_prob: expected 0..1")
        if start_policy not in START_POLICIES:
            raise ValueError(f"start_policy: expected one of {', '.join(START_POLICIES)}")
        self.depth = int(depth)
        self.run_length = run_length
        self.event_prob = float(event_prob)
        self.start_policy = start_policy
        self.op_bias = dict(op_bias or {})
        self.programs = {int(t): list(p) for t, p in (programs or {}).items()}
        self._cat: _Catalogue | None = None
        self._cat_env: int = 0
        self._weights: dict[int, np.ndarray] = {}
        self._program_idx: dict[int, list[int]] = {}
        self.priority: dict[int, float] = {}
        self.change_points: list[int] = []
        self.step_no = 0
        self.program_pos: dict[int, int] = {}

    # ------------------------------------------------------------------ setup
    def _index(self, env: CowEnv) -> _Catalogue:
        if self._cat is None or self._cat_env != id(env):
            cat = _Catalogue(env)
            self._cat, self._cat_env = cat, id(env)
            self._weights = {t: np.array([float(self.op_bias.get(str(op), 1.0)) for op in ops])
                             for t, ops in cat.ops.items()}
            self._program_idx = {}
            for tid, prog in self.programs.items():
                idx = []
                for op, args in prog:
                    found = env.find_actions(op, tid=tid, **args)
                    exact = [i for i in found if dict(env.catalogue[i].args) == dict(args)]
                    if not exact:
                        raise ValueError(f"programs: no catalogue action {op}({args}) on t{tid}")
                    idx.append(exact[0])
                self._program_idx[tid] = idx
        return self._cat

    def begin_episode(self, env: CowEnv, rng: np.random.Generator) -> None:
        """Draw the change points; priorities are drawn as threads appear."""
        super().begin_episode(env, rng)
        self._index(env)
        k = self.run_length or env.max_steps
        n_cp = min(self.depth - 1, k)
        self.change_points = sorted(int(x) + 1 for x in rng.choice(k, size=n_cp, replace=False))
        self.priority = {}
        self.step_no = 0
        self.program_pos = {t: 0 for t in self.programs}

    @property
    def programs_done(self) -> bool:
        """Every thread with a program has started its last operation."""
        return all(self.program_pos.get(t, 0) >= len(p) for t, p in self.programs.items())

    # ------------------------------------------------------------------ policy
    def _start_choice(self, tid: int, mask: np.ndarray) -> int | None:
        """Pick the start action of an idle ``tid`` now (None if it has none)."""
        cat = self._cat
        assert cat is not None
        if self.programs:
            prog = self._program_idx.get(tid)
            pos = self.program_pos.get(tid, 0)
            if prog is None or pos >= len(prog) or not mask[prog[pos]]:
                return None
            return prog[pos]
        idx = cat.starts.get(tid)
        if idx is None:
            return None
        w = self._weights[tid] * mask[idx]
        total = w.sum()
        if total <= 0.0:
            return None
        if self.start_policy == "op":
            ops = cat.ops[tid]
            names = sorted({str(o) for o, x in zip(ops, w, strict=True) if x > 0.0})
            op = names[int(self.rng.integers(len(names)))]
            w = w * (ops == op)
            total = w.sum()
        j = int(self.rng.choice(len(idx), p=w / total))
        return int(idx[j])

    def _enabled(self, tid: int, mask: np.ndarray) -> bool:
        cat = self._cat
        assert cat is not None
        r = cat.run.get(tid)
        if r is not None and mask[r]:
            return True
        if self.programs:
            prog = self._program_idx.get(tid)
            pos = self.program_pos.get(tid, 0)
            return prog is not None and pos < len(prog) and bool(mask[prog[pos]])
        idx = cat.starts.get(tid)
        return idx is not None and bool((self._weights[tid] * mask[idx]).any())

    def act(self, env: CowEnv, obs: np.ndarray, mask: np.ndarray) -> int:  # noqa: D102
        cat = self._index(env)
        self.step_no += 1
        ev = cat.events[mask[cat.events]] if len(cat.events) else cat.events
        if len(ev) and self.event_prob > 0.0 and self.rng.random() < self.event_prob:
            return int(ev[self.rng.integers(len(ev))])
        enabled = [t for t in cat.tids if self._enabled(t, mask)]
        if not enabled:
            if len(ev):
                return int(ev[self.rng.integers(len(ev))])
            return uniform_legal(self.rng, mask)
        for t in enabled:
            if t not in self.priority:
                self.priority[t] = self.depth + float(self.rng.random())
        best = max(enabled, key=lambda t: self.priority[t])
        if self.step_no in self.change_points:
            i = self.change_points.index(self.step_no) + 1
            self.priority[best] = float(self.depth - i)
            best = max(enabled, key=lambda t: self.priority[t])
        r = cat.run.get(best)
        if r is not None and mask[r]:
            return int(r)
        a = self._start_choice(best, mask)
        assert a is not None  # enabled and not runnable: it has a start action
        if self.programs:
            self.program_pos[best] = self.program_pos.get(best, 0) + 1
        return a
