"""Race pairs of the greybox agent (:class:`cowenv_agents.GreyboxAgent`, ``race_*`` options).

Razzer's and Snowboard's way of testing a race (Jeong et al., S&P 2019; Gong et al.,
SOSP 2021): run one call to a point inside a page table, run a second call of a related
thread that touches the same tables, resume the first (README "Greybox", "Race pairs").
A mixin: the methods read and write the agent's ``_race*`` state, set up in
:meth:`cowenv_agents.GreyboxAgent.__init__`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cowenv.greybox import (
    meets_entries,
    meets_walk,
    paused_tables,
    race_candidates,
    spec_variant,
)
from cowenv.kernel import KSWAPD_TID

#: Share of the pairs whose *A* is the kernel thread (``race_kthread_a``) that are
#: nested: its walk paused, *B* runs to its end or a block (a fork blocked in
#: anon_vma_fork on the anon_vma lock kswapd holds), or *B* is preempted too and the walk
#: completes under it (a migration completing while a fork is half done).
KTHREAD_A_NEST = 0.5

if TYPE_CHECKING:
    from cowenv.env import CowEnv


class RacePairs:
    """Race-pair methods of :class:`cowenv_agents.GreyboxAgent` (a mixin)."""

    def _race(self, env: CowEnv, mask: np.ndarray) -> int | None:
        """The next action of a race pair, or None (then the choice is random).

        Razzer (Jeong et al., S&P 2019) and Snowboard (Gong et al., SOSP 2021) test a
        pair of calls that touch the same object by running one to a point, running the
        other, and resuming the first; Snowboard tries uncommon pairs first. Here, at a
        random step where two related user threads (same process, or processes that
        share a table) exist, with probability ``race_prob`` (1 in a race episode,
        ``race_episodes``):

        0. if no two related threads are idle, a busy one is run until its operation
           ends (at most ``race_len`` points) first (Razzer runs a pair from a state
           where both threads are free);
        1. operation *A*: a start of an idle thread ``u`` with an idle related thread,
           the kind weighted by its mean number of points to its end so far
           (:meth:`_race_len_of`: a fork or a munmap over tables has a window at each
           point, a read that hits the TLB none), a template at random; run until it
           stops: 1 in 3 at each point where it is inside a page table, or when it
           blocks or has run ``race_len`` points (it ending first ends the pair);
        2. operation *B*: the page tables ``A`` is inside
           (:func:`cowenv.greybox.paused_tables`: those whose PTE lock it holds, else
           its range's) and the starts of the other idle related threads that touch
           them (:func:`cowenv.greybox.race_candidates`), grouped by (``A``'s label,
           operation, variant); the group with the lowest score (ties at random), a
           start of it at random; its thread is run until the operation ends or
           blocks, at most ``race_len`` points;
        3. ``A`` resumes, until it ends or blocks (at most ``race_len`` points), so that
           the pair's outcome is settled (a quiescent point's checks run) before the
           random part goes on;
        4. with ``race_settle``, the other busy threads run until the kernel is
           quiescent (:meth:`_race_settle`): the checks run only then.

        With ``race_nest`` (the probability that a pair is *nested*), ``B`` stops as
        ``A`` did, 1 in 3 at each point where it is inside a page table after its
        first; ``A`` then resumes to its end and the settling runs ``B`` on: two
        preemptions, the schedules of CHESS's bound 2 (a migration paused with its
        entry in the table, a fork paused between sharing that table and linking the
        child's VMA into the rmap, the migration completing: v4's
        ``fork-shares-migration-entry``).

        A group's score is the times it was tried, plus 8 for each time ``B``'s
        operation variant blocked at its first point on a lock class that ``A`` held
        in the mode ``A`` holds now (``mmap_lock`` for write, a PTE lock...): a pair
        that a lock serialises cannot race, and what blocks against one holder of a
        lock blocks against all (fork, munmap, mprotect hold ``mmap_lock`` for
        write), so the pairs that do interleave get the tries; with
        ``race_block_ops``, an untried variant of an operation whose tried variants
        all blocked counts as blocked (:meth:`_race_block_count`). With
        ``race_meet``, the start is drawn from the group's templates that address a
        populated entry of ``A``'s tables (:func:`cowenv.greybox.meets_entries`).
        With ``race_walk``, when ``A`` is paused inside a walk over a range of entries
        (:attr:`cowenv.kernel.sched.Thread.walk`: fork's ``copy_pte_entries`` between
        its pin check and its sharing), only the groups and starts that address a
        populated entry of that range (:func:`cowenv.greybox.meets_walk`), if any.
        With ``race_kthreads``, the kernel thread (reclaim, compaction) may be ``A``
        or ``B`` too; with ``race_kthread_b``, ``B`` only; with ``race_kthread_a``
        (a probability), it is ``A`` that often, and such a pair is nested 1 in 2.
        The scores and the operation lengths live as long as the agent.
        """
        ci = self._ci
        assert ci is not None
        k = env.kernel
        rng = self.rng
        phase, tid = self._race_phase, self._race_tid
        if not phase:
            return self._race_setup(env, mask)
        t = k.threads.get(tid)
        run = ci.run.get(tid)
        busy = t is not None and t.gen is not None
        runnable = busy and t.waiting is None and run is not None and bool(mask[run])
        self._race_phase, self._race_tid = 0, -1
        if phase == 5:  # settling: running the kernel to a quiescent point
            return self._race_settle(env, mask)
        if phase == 3:  # draining a busy thread so that two are idle
            if not busy:
                return self._race_setup(env, mask, coin=False)
        elif phase == 1:  # A
            if not busy:
                return None
            ran = self._race_left < self.race_len
            # A stops at a point where it is inside a page table (1 in 3, or when it
            # cannot go on); at a point with no footprint it goes on.
            stuck = not runnable or self._race_left <= 0
            if ran and (stuck or (rng.random() < 1 / 3 and paused_tables(k, tid))):
                return self._race_b(env, mask, tid)
        elif phase == 2 and t is not None and t.waiting is not None \
                and self._race_left == self.race_len - 1:
            # B blocked at its first point, on a lock class A holds: B's variant
            # blocks against that class held in that mode (a later block is not
            # counted: a GUP-fast pin that falls back to the slow path blocks then,
            # which says nothing about its fast path).
            cls = t.waiting[0].cls
            for h in self._race_held:
                if h.split("/")[0] == cls:
                    b = (h, *self._race_blockkey)
                    self._race_blocked[b] = self._race_blocked.get(b, 0) + 1
        elif (phase == 2 and self._race_nested and runnable
              and self._race_left < self.race_len and rng.random() < 1 / 3
              and paused_tables(k, tid)):
            # A nested pair: B is preempted inside a page table; A resumes first.
            self._race_nested = False
            self.race_nested_pairs += 1
            self._race_phase, self._race_tid, self._race_left = 4, self._race_a, self.race_len
            return self._race(env, mask)
        if runnable and self._race_left > 0:
            self._race_phase, self._race_tid = phase, tid
            self._race_left -= 1
            return run
        if phase == 2:
            # B ended (or blocked): resume A, to its end or until it blocks, so that
            # the pair's outcome is settled before the random part goes on.
            self._race_phase, self._race_tid, self._race_left = 4, self._race_a, self.race_len
            return self._race(env, mask)
        if phase in (4, 5) and self.race_settle:
            return self._race_settle(env, mask)
        return None

    def _race_settle(self, env: CowEnv, mask: np.ndarray) -> int | None:
        """Step 4 of :meth:`_race` (``race_settle``): run the kernel to a quiescent point.

        The oracles' checks run at quiescent points only (no operation in flight:
        :meth:`cowenv.kernel.Kernel.quiescent`). A third thread still inside its own
        operation when the pair ends (a reclaim, a pin paused by the random part)
        keeps the kernel from one, and the random part that goes on may change the
        state the pair left before any check has seen it (measured:
        ``gup-fast-fork-race`` seed 5, round 11: 148 of 195 pairs ended with an
        operation in flight, ``benchmarks/race_pairs.py``; two of them left a pin
        taken between fork's check and its sharing in the shared table, and no check
        ran on it). So each runnable busy thread in turn (the lowest thread id first;
        a waiter whose lock was released is runnable) runs until its operation ends
        or blocks, at most ``race_len`` points each, until the kernel is quiescent or
        no busy thread can run.
        """
        ci = self._ci
        assert ci is not None
        k = env.kernel
        tid = self._race_tid if self._race_phase == 5 else -1
        t = k.threads.get(tid)
        run = ci.run.get(tid)
        if (t is not None and k.is_runnable(t) and run is not None and bool(mask[run])
                and self._race_left > 0):
            self._race_left -= 1
            return run
        if k.quiescent():
            self._race_phase, self._race_tid = 0, -1
            return None
        # Runnable: idle threads are not, nor those blocked on a lock still held (a
        # waiter whose lock was released meanwhile is).
        busy = [u for u in sorted(ci.run) if u != tid and u in k.threads
                and k.is_runnable(k.threads[u]) and bool(mask[ci.run[u]])]
        if not busy:
            self._race_phase, self._race_tid = 0, -1
            return None
        u = busy[0]
        self._race_phase, self._race_tid, self._race_left = 5, u, self.race_len - 1
        return ci.run[u]

    def _race_setup(self, env: CowEnv, mask: np.ndarray, coin: bool = True) -> int | None:
        """Start :meth:`_race`'s operation ``A``, or first drain a busy thread.

        ``coin``: toss the ``race_prob`` coin (not after a drain: the pair was decided).
        """
        ci = self._ci
        assert ci is not None
        k = env.kernel
        rng = self.rng
        live = [u for u in ci.user_tids if k.threads.get(u) is not None
                and not k.threads[u].exited and k.threads[u].pid in k.procs]
        tabs = {p.pid: {e.table.pfn for e in p.mm.pmd.values()} for p in k.live_procs()}

        def related(a: int, b: int) -> bool:
            if KSWAPD_TID in (a, b):
                return True  # reclaim and compaction walk every mm's tables (rmap)
            pa, pb = k.threads[a].pid, k.threads[b].pid
            return pa == pb or bool(tabs.get(pa, set()) & tabs.get(pb, set()))

        kt = k.threads.get(KSWAPD_TID)
        if self.race_kthreads and kt is not None and KSWAPD_TID in ci.ops_of:
            live = [*live, KSWAPD_TID]
        pairs = [(a, b) for a in live for b in live if a != b and related(a, b)]
        # The coin is only tossed where a pair can be (two related live threads).
        p = 1.0 if self._race_now else self.race_prob
        if not pairs or (coin and rng.random() >= p):
            return None
        idle = {u for u in live if k.threads[u].gen is None}
        ready = sorted({a for a, b in pairs if a in idle and b in idle})
        if not ready:
            # Razzer runs the pair from a state where both threads are free: run a busy
            # thread that could be one of a pair until its operation ends (at most
            # race_len points) first.
            busy = sorted({b for _a, b in pairs if b not in idle
                           and k.threads[b].waiting is None and mask[ci.run[b]]})
            if not busy:
                return None
            u = busy[int(rng.integers(len(busy)))]
            self._race_phase, self._race_tid, self._race_left = 3, u, self.race_len - 1
            return ci.run[u]
        u = ready[int(rng.integers(len(ready)))]
        if (self.race_kthread_a and kt is not None and kt.gen is None and not kt.exited
                and KSWAPD_TID in ci.ops_of and idle - {KSWAPD_TID}
                and rng.random() < self.race_kthread_a):
            # race_kthread_a: the kernel thread's reclaim or compaction is A (every
            # user thread is related to it: its rmap walk reaches every mm).
            u = KSWAPD_TID
        own = self._starts_of.get(u)
        if own is None:
            own = np.array([i for op in ci.ops_of.get(u, ()) for i in ci.by_tid_op[(u, op)]],
                           dtype=np.int64)
            self._starts_of[u] = own
        legal = own[mask[own]]
        if not len(legal):
            return None
        # The operation kind weighted by its mean number of points seen so far (an
        # operation never seen yet counts race_len): a long operation (fork, exit, a
        # munmap over tables) offers a window at each of its points, a read that hits
        # the TLB none.
        ops = sorted({ci.catalogue[int(i)].op for i in legal})
        w = np.array([self._race_len_of(op) for op in ops])
        op = ops[int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right"))
                 if len(ops) > 1 else 0]
        c = [int(i) for i in legal if ci.catalogue[int(i)].op == op]
        a = c[int(rng.integers(len(c)))]
        self._race_phase, self._race_tid, self._race_left = 1, u, self.race_len
        return a

    def _race_block_count(self, h: str, op: str, var: str) -> int:
        """Times ``B`` (``op``, variant ``var``) blocked at its first point on ``h`` held by ``A``.

        ``h`` is a lock class and mode (``mmap_lock/write``).

        With ``race_block_ops``, a variant never tried against ``h`` counts 1 when three
        or more variants of ``op`` were tried against ``h`` and every one of them
        blocked: an ``mremap`` of a new length blocks on ``mmap_lock`` held for write
        as the other lengths did. Three, so that an operation whose variants take
        different locks does not pass one variant's block on to the others before
        they were tried (a slow ``pin`` blocks on ``mmap_lock``, the GUP-fast one
        does not).
        """
        n = self._race_blocked.get((h, op, var), 0)
        if n or not self.race_block_ops:
            return n
        tried = self._race_tried.get((h, op), set())
        if var in tried or len(tried) < 3:
            return 0
        return int(all(self._race_blocked.get((h, op, v), 0) for v in tried))

    def _race_len_of(self, op: str) -> float:
        """Mean points an operation ``op`` has run to its end (``race_len`` if never seen)."""
        tot, n = self._race_oplen.get(op, (0, 0))
        return max(tot / n, 0.5) if n else float(self.race_len)

    def _op_length(self, env: CowEnv, sp: Any) -> None:
        """Count the points of every user operation to its end (for :meth:`_race_len_of`)."""
        if sp.kind == "start":
            self._op_cur[sp.tid] = (sp.op, 0)
        elif sp.kind == "run" and sp.tid in self._op_cur:
            op, n = self._op_cur[sp.tid]
            t = env.kernel.threads.get(sp.tid)
            if t is None or t.gen is None:
                del self._op_cur[sp.tid]
                tot, c = self._race_oplen.get(op, (0, 0))
                self._race_oplen[op] = (tot + n + 1, c + 1)
            else:
                self._op_cur[sp.tid] = (op, n + 1)

    def _race_b(self, env: CowEnv, mask: np.ndarray, u: int) -> int | None:
        """Step 2 of :meth:`_race`: the start of ``B`` against paused thread ``u``."""
        ci = self._ci
        assert ci is not None
        k = env.kernel
        tables = paused_tables(k, u)
        cands = race_candidates(k, ci, u, tables, mask,
                                self.race_kthreads or self.race_kthread_b)
        if not cands:
            return None
        tu = k.threads[u]
        label = tu.label
        held = sorted({f"{lk.cls}/{mode}" for lk, mode in tu.held})
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i in cands:
            sp = ci.catalogue[i]
            groups.setdefault((label, sp.op, spec_variant(sp)), []).append(i)
        if self.race_walk and tu.walk is not None:
            # A is paused inside a walk over a range of entries it checked and will
            # now process (Thread.walk): the groups, and in them the starts, that
            # address a populated entry of that range, if any (meets_walk).
            near = {g: [i for i in c if meets_walk(k, ci, i, tu.walk)]
                    for g, c in groups.items()}
            near = {g: c for g, c in near.items() if c}
            if near:
                groups = near

        def score(g: tuple[str, str, str]) -> int:
            return self._race_tries.get(g, 0) + 8 * sum(
                self._race_block_count(h, g[1], g[2]) for h in held)

        keys = sorted(groups)
        lo = min(score(g) for g in keys)
        keys = [g for g in keys if score(g) == lo]
        g = keys[int(self.rng.integers(len(keys)))]
        self._race_tries[g] = self._race_tries.get(g, 0) + 1
        self._race_held, self._race_blockkey = held, (g[1], g[2])
        for h in held:
            self._race_tried.setdefault((h, g[1]), set()).add(g[2])
        self._race_a = u
        c = groups[g]
        if self.race_meet:
            # Within the group, the templates that meet A's tables at a populated
            # entry (meets_entries), if any.
            c = [i for i in c if meets_entries(k, ci, i, tables)] or c
        b = c[int(self.rng.integers(len(c)))]
        nest = (KTHREAD_A_NEST if u == KSWAPD_TID and self.race_kthread_a
                else self.race_nest)
        self._race_nested = (nest > 0 and self.race_settle and self.rng.random() < nest)
        self._race_phase, self._race_tid = 2, ci.catalogue[b].tid
        self._race_left = self.race_len
        return b
