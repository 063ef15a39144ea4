"""Fault-injection triage of the greybox agent (``fault_triage``, ``cut_fault`` options).

syzkaller's ``failCall`` triage: a call that reached new code is replayed with its
thread's ``fail_nth`` armed at n = 1, 2, ... while the injected failure fires inside
the call (README "Greybox"). A mixin: the methods use the agent's ``_triage*`` state,
set up in :meth:`cowenv_agents.GreyboxAgent.__init__`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cowenv.env import CowEnv

#: A fault-injection job: the schedule, the call's index in it, ``fail_nth``'s n, and
#: the code features the call reached first (:meth:`FaultTriage._triage_pop`).
_Job = tuple[tuple[int, ...], int, int, frozenset[int]]


class FaultTriage:
    """Fault-injection triage methods of :class:`cowenv_agents.GreyboxAgent` (a mixin)."""

    def _triage_child(self, job: _Job) -> list[int]:
        """The schedule of a fault-injection job: the call's thread's ``fail_nth`` n first.

        syzkaller's ``failCall`` (``syz-fuzzer/proc.go``, run by ``smashInput`` on each
        new corpus input, for the call that brought new signal): the program again with
        ``fail_nth = n`` on that call, for n = 1, 2, ... until the call no longer fails
        an allocation. Here the job's actions with the thread's ``fail_nth`` event of
        ``n`` right before the call's start; what the call does after it (the run
        actions of the entry, then random choice as after any child) is unchanged.
        """
        ci = self._ci
        assert ci is not None
        acts, i, n, _f = job
        tid = ci.catalogue[acts[i]].tid
        ev = next(e for e in ci.fail_of[tid] if ci.catalogue[e].n == n)
        self._job, self._job_state, self._job_fired = job, 0, False
        self.triage_stats["jobs"] += 1
        return [*acts[:i], ev, *acts[i:]]

    def _cut_fault_child(self, prefix: list[int], rng: np.random.Generator) -> list[int]:
        """The prefix with a fault armed on the call that reached its cut's new feature.

        Sampled fault triage: syzkaller fails, one n after another, the call of a new
        corpus input that brought new signal (``failCall``); the budget here (about 430
        episodes per 100k steps) does not pay for that on every call of every new entry,
        so an unmutated replay of a parent up to a cut point (a state where it reached
        something new, :meth:`cowenv.greybox.Corpus.choose_cut`) arms, right before the
        start of the call whose step reached it (the prefix's last action is that step:
        a run of thread ``u``, so ``u``'s last start, or the start itself), ``u``'s
        ``fail_nth`` with a random n. If the fault fires inside that call (the trace's
        ``alloc_fail``), the next episode plays the same with n + 1 (:meth:`_triage_finish`).
        """
        ci = self._ci
        assert ci is not None
        if not prefix:
            return prefix
        u = ci.catalogue[prefix[-1]].tid
        i = next((j for j in range(len(prefix) - 1, -1, -1)
                  if ci.catalogue[prefix[j]].kind == "start"
                  and ci.catalogue[prefix[j]].tid == u), -1)
        fails = ci.fail_of.get(u)
        if i < 0 or not fails:
            return prefix
        n = int(ci.catalogue[fails[int(rng.integers(len(fails)))]].n)
        return self._triage_child((tuple(prefix), i, n, frozenset()))

    def _triage_pop(self) -> _Job:
        """The next job: the same call with n + 1 if its fault fired, else a queued call.

        Queued calls are taken rarest first (FairFuzz's rare branches, applied to the
        triage queue): the call whose new code is now reached by the fewest episodes
        (the least over its code features of :attr:`_code_hits`), the newest of
        equals. The seed plays queue a few hundred calls at once, most of them in
        paths every episode takes soon after (a write fault's first allocation);
        first-in-first-out spends the budget on those before the call that reached a
        path few episodes reach (a break inside ``move_page_tables``) is failed.
        """
        if self._triage_next is not None:
            job, self._triage_next = self._triage_next, None
            return job
        q = self._triage_q
        hits = self._code_hits
        best, bc = 0, -1
        for j in range(len(q) - 1, -1, -1):
            c = min((hits.get(f, 0) for f in q[j][3]), default=0)
            if bc < 0 or c < bc:
                best, bc = j, c
        return q.pop(best)

    def _triage_observe(self, env: CowEnv, sp: Any) -> None:
        """After a step: attribute new code features to calls, follow a job's fault.

        A step's new *code* features (:attr:`cowenv.greybox.FeatureTracker.code`) belong
        to the call it ran (a start, or the current operation of the thread run); the
        kernel's trace says whether the job's armed fault fired inside its call (an
        ``alloc_fail`` event of the thread between the call's start and its end).
        """
        n = len(self._taken) - 1
        if sp.kind == "start":
            self._call_of[sp.tid] = n
        call = self._call_of.get(sp.tid) if sp.kind in ("start", "run") else None
        code = self.tracker.code
        if code:
            new = [f for f in code if f not in self._code_seen] if call is not None else []
            if new:
                self._novel_calls.setdefault(call, set()).update(new)
                self._last_code = n
            self._ep_code.update(code)
        if self._job is None or self._job_state >= 3:
            return
        ci = self._ci
        assert ci is not None
        acts, i = self._job[0], self._job[1]
        tid = ci.catalogue[acts[i]].tid
        ev = env.kernel.events
        for e in ev[self._ev_pos:]:
            if e.tid == -1 and e.kind == "event" and e.label == "fail_nth" \
                    and isinstance(e.data, dict) and e.data.get("tid") == tid:
                self._job_state = max(self._job_state, 1)
            elif e.tid != tid or self._job_state == 0:
                continue
            elif e.kind == "start" and self._job_state == 1:
                self._job_state = 2
            elif e.kind == "event" and e.label == "alloc_fail" and self._job_state == 2:
                self._job_fired = True
            elif e.kind == "end" and self._job_state == 2:
                self._job_state = 3
        self._ev_pos = len(ev)

    def _triage_enqueue(self) -> None:
        """Queue fault injection (n = 1) for each call of the episode that reached new code.

        The job's schedule is the episode's actions up to the last step that reached new
        code (syzkaller triages the program as it ran; the corpus entry is trimmed to
        its last new corpus feature, which may come before). Only user threads' calls
        that have a ``fail_nth`` event (``/proc/thread-self/fail-nth``) are queued.
        """
        ci = self._ci
        assert ci is not None
        acts = tuple(self._taken[:self._last_code + 1])
        for i in sorted(self._novel_calls):
            if i < len(acts) and ci.catalogue[acts[i]].kind == "start" \
                    and ci.fail_of.get(ci.catalogue[acts[i]].tid):
                self._triage_q.append((acts, i, 1, frozenset(self._novel_calls[i])))

    def _triage_finish(self) -> None:
        """End of a job's episode: if its fault fired, the same call with n + 1 next.

        syzkaller's loop stops at the first n whose fault did not fire (the call made
        fewer than n allocations); here also at the largest ``fail_nth`` the catalogue
        has.
        """
        self._code_seen |= self._ep_code
        hits = self._code_hits
        for f in self._ep_code:
            hits[f] = hits.get(f, 0) + 1
        job, self._job = self._job, None
        if job is None or not self._job_fired:
            return
        self.triage_stats["fired"] += 1
        ci = self._ci
        assert ci is not None
        acts, i, n, feats = job
        if any(ci.catalogue[e].n == n + 1 for e in ci.fail_of[ci.catalogue[acts[i]].tid]):
            self._triage_next = (acts, i, n + 1, feats)
