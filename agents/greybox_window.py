"""Systematic window stage of the greybox agent (:class:`cowenv_agents.GreyboxAgent`, ``window_*``).

Hybrid fuzzing (Driller, Stephens et al., NDSS 2016: the fuzzer hands a state it reached
to a systematic engine, which hands back inputs the fuzzer could not guess) with CHESS
(Musuvathi & Qadeer, PLDI 2007; :mod:`cowenv.explore`) as the engine, in the way of
AFL's deterministic stages (a bounded, exhaustive pass over one input, instead of random
mutations). README "Greybox", "Systematic windows".

When an episode after the seed plans (as race episodes) runs an operation *A* of thread
``u`` that works inside a page table shared by two or more mms
(:func:`cowenv.greybox.paused_tables`), ``u``'s process has
another live thread, and the kernel was quiescent (no operation in flight) right before
*A* started, the state before *A* (the *cut*) is a start state for a systematic search
with probability ``window_prob``. The search explores, with at most ``window_bound``
preemptions and sleep sets (:func:`cowenv.explore.explore` from that state), every
schedule of a small *window* of operations:

* ``u``: *A* itself (its catalogue template, as the episode started it);
* one other live thread of ``u``'s process: ``window_uses`` accesses to the shared
  table (distinct ``read``/``pin`` templates of pages the table maps at the cut, the
  kind by the agent's kind weights, :data:`cowenv_agents.base.KIND_WEIGHTS`): the
  observers that show a stale view of the table (a paging-structure cache, a GUP-fast
  walk) without changing it (:data:`WINDOW_USES`);
* one thread of one other process whose mm maps the same table: a release of it, the
  process's ``exit`` or a ``munmap`` over that PMD (uniformly among them): the other
  holder dropping its reference. Use-after-free races need a free and a use; KRace
  (Xu et al., S&P 2020) and Razzer aim at exactly those pairs.

Every transition the search executes (re-executed prefixes included), and the replay
of the episode's actions up to the cut that rebuilt its state, counts in
``offline_steps``, which the bug-finding benchmark adds to its step count. A violation
signature the search shows, not seen before by this agent, is *played*: the next episode
is the episode's actions up to the cut followed by the search's schedule, as ordinary
catalogue actions (starts and runs), so the env reports it, records it in
``get_schedule()`` and the benchmark's attribution replays it on ``fixed`` as any other
episode.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cowenv.explore import OpItem, Run, explore, state_fingerprint
from cowenv.greybox import (
    fault_window_calls,
    fork_window_candidates,
    kthread_window_candidates,
    paused_tables,
    release_window_candidates,
    spec_variant,
)
from cowenv.harness import Harness
from cowenv.kernel import KSWAPD_TID
from cowenv.kernel.pgtable import PTE_PRESENT

from .base import KIND_WEIGHTS

if TYPE_CHECKING:
    from cowenv.env import CowEnv

#: The accesses a window's sibling thread makes to the shared table: the operations that
#: walk it without writing it (a load; a pin, whose GUP-fast walk is lockless), of pages
#: it maps. A store would break the COW sharing first, and a load of an empty entry
#: would fault and fill it: mutations of their own, not observations.
WINDOW_USES = ("read", "pin")
#: Actions at the end of an episode a played window leaves free: the harness teardown of
#: campaigns and the bug-finding benchmark (``CampaignConfig.teardown``, 32 by default).
TEARDOWN_RESERVE = 32


class WindowStage:
    """Systematic-window methods of :class:`cowenv_agents.GreyboxAgent` (a mixin)."""

    def _window_init(self, window_prob: float, window_bound: int, window_cap: int,
                     window_uses: int, window_decay: float, window_share: float,
                     window_release: float = 0.0, window_early: bool = False,
                     window_release_bound: int | None = None,
                     window_whole_release: bool = False,
                     window_kthread: float = 0.0,
                     window_kthread_share: float = 0.1, window_faults: float = 0.0,
                     window_faults_share: float = 0.05, window_fault_calls: int = 12,
                     window_fault_n: int = 2, window_kthread_multi: bool = False,
                     window_kthread_gup: bool = False, window_forks: float = 0.0,
                     window_forks_share: float = 0.03,
                     window_release_nosplit: bool = False) -> None:
        if not 0.0 <= window_prob <= 1.0 or window_bound < 0 or window_cap < 1 \
                or window_uses < 0 or window_decay < 0 or not 0.0 < window_share <= 1.0:
            raise ValueError("window_prob: expected 0..1; window_bound, window_uses, "
                             "window_decay: expected >= 0; window_cap: expected >= 1; "
                             "window_share: expected 0 < share <= 1")
        self.window_decay = float(window_decay)
        self.window_share = float(window_share)
        if not 0.0 <= window_release <= 1.0:
            raise ValueError("window_release: expected 0..1")
        self.window_release = float(window_release)
        self.window_early = bool(window_early)
        if window_release_bound is not None and window_release_bound < 0:
            raise ValueError("window_release_bound: expected >= 0")
        #: Preemption bound of a table-release window's search (None: ``window_bound``).
        self.window_release_bound = window_release_bound
        self.window_whole_release = bool(window_whole_release)
        if not 0.0 <= window_kthread <= 1.0:
            raise ValueError("window_kthread: expected 0..1")
        self.window_kthread = float(window_kthread)
        if not 0.0 < window_kthread_share <= 1.0:
            raise ValueError("window_kthread_share: expected 0 < share <= 1")
        #: Kernel-thread windows open only while their steps are at most this share of
        #: all steps; the other windows' ``window_share`` does not count them.
        self.window_kthread_share = float(window_kthread_share)
        self._kt_offline = 0  # offline steps of kernel-thread windows
        #: Kernel-thread windows aim at pages in PMDs of two or more VMAs, where any.
        self.window_kthread_multi = bool(window_kthread_multi)
        #: Kernel-thread windows may take a sibling's GUP-fast pin as the fork's other side.
        self.window_kthread_gup = bool(window_kthread_gup)
        if not 0.0 <= window_faults <= 1.0 or not 0.0 < window_faults_share <= 1.0 \
                or window_fault_calls < 1 or window_fault_n < 1:
            raise ValueError("window_faults: expected 0..1; window_faults_share: expected "
                             "0 < share <= 1; window_fault_calls, window_fault_n: "
                             "expected >= 1")
        self.window_faults = float(window_faults)
        self.window_faults_share = float(window_faults_share)
        self.window_fault_calls = int(window_fault_calls)
        self.window_fault_n = int(window_fault_n)
        self._ft_offline = 0  # offline steps of fault windows
        if not 0.0 <= window_forks <= 1.0 or not 0.0 < window_forks_share <= 1.0:
            raise ValueError("window_forks: expected 0..1; window_forks_share: expected "
                             "0 < share <= 1")
        self.window_forks = float(window_forks)
        self.window_forks_share = float(window_forks_share)
        self._fw_offline = 0  # offline steps of fork-layout windows
        #: Release windows prefer a ``munmap`` that splits no VMA at a COW-protected PMD.
        self.window_release_nosplit = bool(window_release_nosplit)
        #: (operation, variant) of A -> windows searched around it (:meth:`_window_observe`).
        self._win_tries: dict[tuple[str, str], int] = {}
        self._env_steps = 0  # env steps this agent took (the share's denominator)
        self.window_prob = float(window_prob)
        self.window_bound = int(window_bound)
        self.window_cap = int(window_cap)
        self.window_uses = int(window_uses)
        #: Steps executed outside the env (searches, state rebuilds): the benchmark adds
        #: them to the env's steps.
        self.offline_steps = 0
        self.window_stats = {"triggers": 0, "windows": 0, "transitions": 0, "found": 0,
                             "played": 0, "release": 0, "kthread": 0, "fault": 0,
                             "fork": 0}
        self._win_cut: dict[int, int] = {}  # tid -> index in _taken of its quiescent start
        self._win_next: list[int] | None = None  # the next episode's actions
        #: Signatures windows showed, in order (each played as the next episode).
        self.window_found: list[str] = []
        self._win_seen: set[tuple[Any, ...]] = set()  # windows searched already
        self._win_pages: tuple[Any, dict[int, set[int]]] | None = None
        self._win_sigs: set[str] = set()  # signatures this agent saw or played
        self._win_h: Harness | None = None
        self._win_plan_skips = 0  # played windows that came before a seed plan

    def _window_note_start(self, env: CowEnv, a: int) -> None:
        """Before action ``a`` is taken: a start at a quiescent point is a cut."""
        ci = self._ci
        sp = ci.catalogue[a]
        if sp.kind == "start" and sp.tid != KSWAPD_TID:
            if env.kernel.quiescent():
                self._win_cut[sp.tid] = len(self._taken)
            else:
                self._win_cut.pop(sp.tid, None)

    def _window_observe(self, env: CowEnv, sp: Any) -> None:
        """After a step: open a window if the step's thread is inside a shared table."""
        self._env_steps += 1
        if sp.kind != "run" or sp.tid not in self._win_cut:
            return
        if self.window_early and self._win_playing:
            return  # a played violation is replayed as found, not searched again
        k = env.kernel
        t = k.threads.get(sp.tid)
        if t is None or t.gen is None:
            self._win_cut.pop(sp.tid, None)  # A ended without touching a shared table
            return
        tables = paused_tables(k, sp.tid)
        if not tables:
            return
        holders = [p for p in k.live_procs() if any(e.table.pfn in tables
                                                    for e in p.mm.pmd.values())]
        if len(holders) < 2 or not any(
                u != sp.tid and not th.exited and th.pid == t.pid
                for u, th in k.threads.items() if u != KSWAPD_TID):
            return
        cut = self._win_cut.pop(sp.tid)  # one window at most per operation
        if self.episodes - self._win_plan_skips < len(self._plans or ()):
            return  # as race episodes: after the seed plans (those play as before)
        self.window_stats["triggers"] += 1
        # Stage scheduling: windows take at most window_share of all steps (AFL shares
        # its time between stages likewise), and an operation kind searched n times
        # before opens a window with probability prob * d / (d + n) (uncommon first,
        # as Snowboard orders its pairs).
        if self._over_share(self._own_offline(),
                            self.window_share):
            return
        a_sp = self._ci.catalogue[self._taken[cut]]
        cls = (a_sp.op, spec_variant(a_sp))
        n = self._win_tries.get(cls, 0)
        p = self.window_prob if not self.window_decay else \
            self.window_prob * self.window_decay / (self.window_decay + n)
        if self.rng.random() >= p:
            return
        mm = k.procs[t.pid].mm
        # A's tables that another mm maps too.
        shared = {e.table.pfn for p in holders if p.pid != t.pid for e in p.mm.pmd.values()}
        idxs = sorted(i for i, e in mm.pmd.items()
                      if e.table.pfn in tables and e.table.pfn in shared)
        if not idxs:
            return
        self._win_tries[cls] = n + 1
        self._window(env, cut, sp.tid, idxs[int(self.rng.integers(len(idxs)))])

    def _over_share(self, used: int, share: float) -> bool:
        """Whether ``used`` offline steps exceed ``share`` of all steps so far.

        AFL shares its time between stages likewise: each kind of window opens only
        while its own steps are within its share (``window_share`` for the windows cut
        before an operation and the release windows, ``window_kthread_share``,
        ``window_faults_share``).
        """
        return used > share * (self._env_steps + self.offline_steps)

    def _op_ended_quiescent(self, env: CowEnv, sp: Any) -> bool:
        """Whether step ``sp`` ended an operation at a quiescent point where a window may open.

        After the seed plans, with no window's violation to play next (nor, with
        ``window_early``, one being played).
        """
        if sp.kind != "run" or self._win_next is not None or (
                self.window_early and self._win_playing):
            return False
        k = env.kernel
        t = k.threads.get(sp.tid)
        if t is None or t.gen is not None or not k.quiescent():
            return False
        return self.episodes - self._win_plan_skips >= len(self._plans or ())

    def _release_observe(self, env: CowEnv, sp: Any, mask: np.ndarray) -> None:
        """Maybe open a *table-release window* the episode did not reach by itself.

        After a step that ended an operation at a quiescent point (after the seed
        plans), in a state that has one, with probability ``window_release``: a user
        thread ``u`` with an idle sibling, whose mm shares a page table with another
        live mm, the table holding a present entry at a page a load or pin template
        addresses, is given a legal ``munmap`` covering that whole table
        (``free_pgtables`` -> ``free_pmd_range`` drops ``u``'s reference to it), and
        the window around it is searched as :meth:`_window_observe`'s: the sibling's
        uses, the other mm's release. The lifetime of a refcounted, shared page table
        is what COW PTE adds to the kernel; the window is its free/use/free triangle
        (KRace's and Razzer's use-after-free pairs), which an episode reaches only by
        choosing a rare operation in a rare state (once in a missed 100k-step run of
        the benchmark, seed 9 of ``free-pmd-deferred-flush``, with no page to load).
        The candidates: :func:`cowenv.greybox.release_window_candidates`; with
        ``window_release_nosplit`` only the ``munmap`` starts that split no VMA at a
        COW-protected PMD, where any (the split's break flushes the sibling's cached
        walk: measured before it, on ``free-pmd-deferred-flush`` seed 55, missed by
        round 18, none of its 10 release windows showed the stale walk at bound 1; at
        bound 2 two did, each with the sibling's first load after the split).
        """
        if not self._op_ended_quiescent(env, sp):
            return
        rng = self.rng
        cands = release_window_candidates(env.kernel, self._ci, mask, self._use_pages(),
                                          self.window_release_nosplit)
        # The generator is drawn from only in such a state: elsewhere the episode's
        # choices are the agent's without this stage.
        if not cands or rng.random() >= self.window_release:
            return
        u, pmd, a = cands[int(rng.integers(len(cands)))]
        if self._over_share(self._own_offline(), self.window_share):
            return
        self.window_stats["release"] += 1
        self._window(env, len(self._taken), u, pmd, a)

    def _own_offline(self) -> int:
        """Offline steps of the windows ``window_share`` bounds.

        Kernel-thread, fault and fork-layout windows have shares of their own.
        """
        return self.offline_steps - self._kt_offline - self._ft_offline - self._fw_offline

    def _kthread_observe(self, env: CowEnv, sp: Any, mask: np.ndarray) -> None:
        """Maybe open a *kernel-thread window* (``window_kthread``).

        After a step that ended an operation at a quiescent point (after the seed
        plans), in a state that has one (:func:`cowenv.greybox.kthread_window_candidates`:
        an idle thread whose mm fork would share tables from, the kernel thread's
        reclaim or compaction aimed at a page that mm maps), with probability
        ``window_kthread``: the window of that reclaim or compaction and the thread's
        ``fork`` is searched (``window_bound`` preemptions, sleep sets) from the state
        now. The rmap walkers against the operation that rewrites what they walk: a
        migration paused with its entry in the table while fork shares it and blocks in
        ``anon_vma_fork`` on the anon_vma lock the walk holds, or a reclaim paused after
        its ``break_cow_pte`` while fork shares the table again; an episode reaches such
        a pair only as a race pair whose *A* is the kernel thread and whose *B* is a
        fork out of ~15 operation kinds (README "Greybox, round 14": none in 100k
        steps of ``rmap-stale-table`` seed 53). With ``window_kthread_multi`` the
        pages are those of PMDs spanning two or more VMAs, where any; with
        ``window_kthread_gup`` the other side may instead be an idle sibling's
        GUP-fast ``pin`` of such a page (the kind drawn first, then a candidate).
        """
        if not self._op_ended_quiescent(env, sp):
            return
        k = env.kernel
        cands = kthread_window_candidates(k, self._ci, mask, self.window_kthread_multi,
                                          self.window_kthread_gup)
        # The generator is drawn from only in such a state.
        if not cands or self.rng.random() >= self.window_kthread:
            return
        if self.window_kthread_gup:
            # The kind first (the kernel thread's walks, a sibling's GUP-fast), each
            # present one alike, then a candidate of it: the pins (40 templates per
            # thread) would otherwise outnumber the reclaim and compaction starts.
            ci = self._ci
            kinds = [c for c in ([x for x in cands if ci.catalogue[x[2]].tid == KSWAPD_TID],
                                 [x for x in cands if ci.catalogue[x[2]].tid != KSWAPD_TID])
                     if c]
            cands = kinds[int(self.rng.integers(len(kinds)))] if len(kinds) > 1 else kinds[0]
        u, f, a = cands[int(self.rng.integers(len(cands)))]
        if self._over_share(self._kt_offline, self.window_kthread_share):
            return
        # The window starts from the state now: the env's own kernel, snapshotted
        # (nothing to rebuild, unlike a window cut before an operation in flight).
        h = getattr(env, "harness", env)
        off0 = self.offline_steps
        self.window_stats["kthread"] += 1
        ci = self._ci
        b = ci.catalogue[a].tid  # the kernel thread, or the pinning sibling
        progs = {b: [self._op_item(h, ci.catalogue[a])],
                 u: [self._op_item(h, ci.catalogue[f])]}
        self._window_search(env, h, len(self._taken), progs, {b: [a], u: [f]},
                            self.window_bound)
        self._kt_offline += self.offline_steps - off0

    def _fault_observe(self, env: CowEnv, sp: Any, mask: np.ndarray) -> None:
        """Maybe open a *fault window* (``window_faults``).

        After a step that ended an operation at a quiescent point (after the seed
        plans), in a state with calls that meet a COW-shared table
        (:func:`cowenv.greybox.fault_window_calls`), with probability ``window_faults``:
        up to ``window_fault_calls`` of those calls (at random, distinct templates) are
        each run alone from the state now, with the thread's ``fail_nth`` n = 1, 2, ...
        (the catalogue's, at most ``window_fault_n`` of them): syzkaller's fault-
        injection loop over every call of one state, offline, in place of one call
        and one n per context online (:mod:`cowenv_agents.greybox_faultctx`). The first
        violation not seen before is played as the next episode (the ``fail_nth``
        event, the call, its runs). Measured before it: over 100k steps of
        ``mprotect-ignores-break-failure`` seed 29 (missed by round 15), one
        ``mprotect(PROT_NONE)`` of whole VMAs over a shared table with present pages
        against 60 other ``mprotect`` calls on shared tables (README "Greybox, round
        16").
        """
        if not self._op_ended_quiescent(env, sp):
            return
        k = env.kernel
        ci = self._ci
        calls = fault_window_calls(k, ci, mask)
        # The generator is drawn from only in such a state.
        if not calls or self.rng.random() >= self.window_faults:
            return
        if self._over_share(self._ft_offline, self.window_faults_share):
            return
        pick = [calls[int(i)] for i in
                self.rng.permutation(len(calls))[:self.window_fault_calls]]
        h = getattr(env, "harness", env)  # the state now, as a kernel-thread window's
        off0 = self.offline_steps
        self.window_stats["fault"] += 1
        tries = [(u, a, n) for u, a in pick
                 for n in sorted(ci.catalogue[e].n for e in ci.fail_of[u])[:self.window_fault_n]]
        for u, a, n in tries:
            it = replace(self._op_item(h, ci.catalogue[a]), thread_fail_nth=n)
            self._window_search(env, h, len(self._taken), {u: [it]}, {u: [a]}, 0)
            if self._win_next is not None or self.step_room == 0:
                break  # a finding to play, or the budget's end
        self._ft_offline += self.offline_steps - off0

    def _fork_observe(self, env: CowEnv, sp: Any, mask: np.ndarray) -> None:
        """Maybe open a *fork-layout window* (``window_forks``).

        After a step that ended an operation at a quiescent point (after the seed
        plans), in a state where an idle thread's mm is in a corner fork layout with
        data (:func:`cowenv.greybox.fork_window_candidates`: a ``VM_DONTCOPY`` or
        ``VM_WIPEONFORK`` VMA in a PMD with another populated VMA), with probability
        ``window_forks``: that thread's ``fork`` is run alone from the state now (bound
        0: one run; the quiescent point after it runs the shadow sweep over the child).
        The layouts are coverage features already (``layout_states``), and children
        start from them, but the fork must come from that state, before the layout's
        data or pins change (measured before it, a probe not kept:
        ``wipeonfork-shared`` seed 34, missed by ``greybox-wkfw-mv-gup``: a wipe-on-fork
        VMA holding data in 33 of 414 episodes, 19 forks of its own thread from a
        state with a non-zero-frame page in it, none of them sharing a written page).
        """
        if not self._op_ended_quiescent(env, sp):
            return
        cands = fork_window_candidates(env.kernel, self._ci, mask)
        # The generator is drawn from only in such a state.
        if not cands or self.rng.random() >= self.window_forks:
            return
        if self._over_share(self._fw_offline, self.window_forks_share):
            return
        u, f = cands[int(self.rng.integers(len(cands)))]
        h = getattr(env, "harness", env)  # the state now, as a kernel-thread window's
        off0 = self.offline_steps
        self.window_stats["fork"] += 1
        self._window_search(env, h, len(self._taken),
                            {u: [self._op_item(h, self._ci.catalogue[f])]}, {u: [f]}, 0)
        self._fw_offline += self.offline_steps - off0

    def _use_pages(self) -> dict[int, set[int]]:
        """PMD index -> pages some :data:`WINDOW_USES` template addresses (cached)."""
        ci = self._ci
        if self._win_pages is None or self._win_pages[0] is not ci:
            out: dict[int, set[int]] = {}
            for i, (pmd, addr) in ci.where.items():
                if ci.catalogue[i].op in WINDOW_USES:
                    out.setdefault(pmd, set()).add(addr >> 12)
            self._win_pages = (ci, out)
        return self._win_pages[1]

    def _window(self, env: CowEnv, cut: int, u: int, pmd: int, a: int | None = None) -> None:
        """Search the window of operation ``a`` of ``u`` on PMD index ``pmd``.

        From the state after ``_taken[:cut]``; ``a`` is ``_taken[cut]`` (the episode's
        own operation) unless given (a table-release window: its bound is
        ``window_release_bound``).
        """
        ci = self._ci
        release = a is not None
        if a is None:
            a = self._taken[cut]
        rng = self.rng
        k_env = env.kernel
        h = self._window_rebuild(env, cut)
        if h is None:
            return
        k = h.kernel
        if u not in k.threads:
            return
        tu = k.threads[u]
        a_sp = ci.catalogue[a]
        progs: dict[int, list[OpItem]] = {u: [self._op_item(h, a_sp)]}
        acts: dict[int, list[int]] = {u: [a]}
        # A sibling's uses of the table.
        sibs = [t for t in ci.user_tids if t != u and t in k.threads
                and not k.threads[t].exited and k.threads[t].pid == tu.pid]
        if sibs and self.window_uses:
            s = sibs[int(rng.integers(len(sibs)))]
            # Loads of pages the table maps at the cut: a load of an empty entry faults
            # and fills it (a mutation, not an observation of the table).
            e = k.procs[tu.pid].mm.pmd.get(pmd)
            P = k.config.ptrs_per_pte
            present = set() if e is None else {
                pmd * P + j for j in range(P) if int(e.table.entries[j]) & PTE_PRESENT}
            pool = {op: [i for i in ci.by_tid_op.get((s, op), ())
                         if i in ci.where and ci.where[i][1] >> 12 in present]
                    for op in WINDOW_USES}
            kinds = [op for op in WINDOW_USES if pool[op]]
            if kinds:
                for _ in range(self.window_uses):
                    kinds = [op for op in kinds if pool[op]]
                    if not kinds:
                        break
                    w = np.array([KIND_WEIGHTS.get(op, 1.0) for op in kinds])
                    op = kinds[int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(),
                                                   side="right"))]
                    # Distinct pages: a second load of the same page hits the TLB.
                    i = pool[op][int(rng.integers(len(pool[op])))]
                    page = ci.where[i][1] >> 12
                    for o in pool:
                        pool[o] = [j for j in pool[o] if ci.where[j][1] >> 12 != page]
                    progs.setdefault(s, []).append(self._op_item(h, ci.catalogue[i]))
                    acts.setdefault(s, []).append(i)
        # Another holder's release of the table.
        pfn = k_env.procs[k_env.threads[u].pid].mm.pmd[pmd].table.pfn
        others = [p for p in k.live_procs() if p.pid != tu.pid
                  and any(e.table.pfn == pfn for e in p.mm.pmd.values())]
        if others:
            p = others[int(rng.integers(len(others)))]
            ts = [t for t in ci.user_tids if t in k.threads and not k.threads[t].exited
                  and k.threads[t].pid == p.pid]
            oidx = {i for i, e in p.mm.pmd.items() if e.table.pfn == pfn}
            if ts:
                t = ts[int(rng.integers(len(ts)))]
                cands = list(ci.by_tid_op.get((t, "exit"), ()))
                mun = [i for i in ci.by_tid_op.get((t, "munmap"), ())
                       if oidx & set(ci.span[i])]
                if self.window_whole_release:
                    # A release drops the holder's reference: a munmap of the whole
                    # table (free_pgtables), not of part of it (a zap of some entries).
                    span = k.config.ptrs_per_pte * k.config.page_size
                    mun = [i for i in mun if any(
                        a["addr"] <= j * span and a["addr"] + a["length"] >= (j + 1) * span
                        for a in (dict(ci.catalogue[i].args),) for j in oidx)]
                kinds = [c for c in (cands, mun) if c]
                if kinds:
                    c = kinds[int(rng.integers(len(kinds)))]
                    i = c[int(rng.integers(len(c)))]
                    progs[t] = [self._op_item(h, ci.catalogue[i])]
                    acts[t] = [i]
        if len(progs) < 2:
            return
        bound = self.window_bound
        if release and self.window_release_bound is not None:
            bound = self.window_release_bound
        self._window_search(env, h, cut, progs, acts, bound)

    def _window_rebuild(self, env: CowEnv, cut: int) -> Harness | None:
        """The state after ``_taken[:cut]``, rebuilt in the agent's own harness.

        The replay counts in ``offline_steps`` (cut off at the budget's end, where
        nothing after it could count). None when the budget ends first or the rebuilt
        kernel is not quiescent.
        """
        base = getattr(env, "harness", env)
        h = self._win_h
        if h is None:
            h = self._win_h = Harness(**base.init_kwargs)
        room = self.step_room
        if room is not None and cut >= room:
            self.offline_steps += room  # (>= 0: run_episode stops at the budget)
            self.step_room = 0
            return None
        h.reset(base.episode_seed)
        for x in self._taken[:cut]:
            h.step(x)
        self.offline_steps += cut
        if room is not None:
            self.step_room = room - cut
        return h if h.kernel.quiescent() else None

    def _window_search(self, env: CowEnv, h: Harness, cut: int,
                       progs: dict[int, list[OpItem]], acts: dict[int, list[int]],
                       bound: int) -> None:
        """Search the window ``progs`` from ``h``'s state (after ``_taken[:cut]``).

        Each thread's operations (``acts``: their catalogue starts) are explored with at
        most ``bound`` preemptions and sleep sets; the first violation signature not
        seen before by this agent is played as the next episode.
        """
        ci = self._ci
        k = h.kernel
        room = self.step_room
        key = (state_fingerprint(k), tuple(sorted((t, tuple(v)) for t, v in acts.items())),
               tuple(sorted((t, tuple(it.thread_fail_nth for it in p))
                            for t, p in progs.items())))
        if key in self._win_seen:
            return
        self._win_seen.add(key)
        self.window_stats["windows"] += 1
        from cowenv.scenario import Expectation, Scenario

        sc = Scenario("window", "", k.config, [], Expectation(), {})
        cap = self.window_cap if room is None else min(self.window_cap, room)
        # window_early: the search stops at the end of its first run that shows a
        # violation this agent has not seen (what it would play), instead of spending
        # the rest of its cap on a state whose news is already in hand.
        stop = None if not self.window_early else (
            lambda s: s.split("@", 1)[0] != "simulator" and s not in self._win_sigs)
        res = explore(sc, bound, start=Run.start_snapshot(k, progs), progs=progs,
                      max_transitions=cap, stop_on=stop)
        self.window_stats["transitions"] += res.transitions
        if room is not None and res.transitions >= room:
            # The search stops at the end of the run that crossed the budget's end (it
            # checks its cap between runs); the steps past it are not counted, and its
            # findings are not played (nothing after the budget counts).
            self.offline_steps += room
            self.step_room = 0
            return
        self.offline_steps += res.transitions
        if room is not None:
            self.step_room = room - res.transitions
        limit = env.max_steps - TEARDOWN_RESERVE
        for f in res.findings:
            kind = f.signature.split("@", 1)[0]
            if kind == "simulator" or f.signature in self._win_sigs:
                continue
            play = self._window_actions(ci, acts, f.schedule["steps"])
            if play is None or cut + len(play) > limit:
                continue
            self.window_stats["found"] += 1
            self._win_sigs.add(f.signature)
            self.window_found.append(f.signature)
            self._win_next = self._taken[:cut] + play
            break

    @staticmethod
    def _op_item(h: Harness, sp: Any) -> OpItem:
        """Catalogue start ``sp`` as an explore operation (slots resolved as the harness does)."""
        return OpItem(sp.op, h.start_args(h.kernel, sp))

    @staticmethod
    def _window_actions(ci: Any, acts: dict[int, list[int]],
                        steps: list[dict[str, Any]]) -> list[int] | None:
        """A search's schedule as catalogue actions (its starts and runs), or None."""
        pos = dict.fromkeys(acts, 0)
        out: list[int] = []
        for s in steps:
            tid = s.get("tid")
            if tid is None or tid not in acts:
                return None  # (a kernel-wide fail_nth event: windows have none)
            if s.get("event") == "fail_nth":
                # A fault window's per-thread fail_nth: the thread's catalogue event.
                e = next((e for e in ci.fail_of.get(tid, ())
                          if ci.catalogue[e].n == int(s["n"])), None)
                if e is None:
                    return None
                out.append(e)
                continue
            if "start" in s:
                if pos[tid] >= len(acts[tid]):
                    return None
                out.append(acts[tid][pos[tid]])
                pos[tid] += 1
            else:
                out.extend([ci.run[tid]] * int(s.get("step", 1)))
        return out
