"""Context-sensitive fault injection of the greybox agent (``fault_contexts`` option).

Each *call context* -- an operation with its variant and the state of the page it
addresses (:func:`cowenv.greybox.call_context`) -- has its allocations failed one after
another, ``fail_nth`` n = 1, 2, ... while the failure fires inside the call, on the
first ``fault_contexts`` calls made in that context outside the seed plays. syzkaller's ``failCall``
loop (README "Greybox"), paid for online: the n-th try is armed on the context's next
call instead of on a replay of the program, so it costs no episode; and the unit of
"tried" is the calling context, as in FIFUZZ (Jiang et al., "Fuzzing Error Handling
Code using Context-Sensitive Software Fault Injection", USENIX Security 2020), which
fails an allocation site again in each calling context it has not yet been failed in.
A mixin: the methods use the agent's ``_fc*`` state, set up in
:meth:`cowenv_agents.GreyboxAgent.__init__`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cowenv.greybox import call_context, range_class
from cowenv.kernel import KSWAPD_TID

if TYPE_CHECKING:
    from cowenv.env import CowEnv

#: A call context: (operation, variant, PMD state, PTE state) (:func:`call_context`),
#: with ``fault_ranges`` the range class (:func:`cowenv.greybox.range_class`) too.
Context = tuple[str, ...]
#: A call: its context and its start template (catalogue index).
Call = tuple[Context, int]


class FaultContexts:
    """Context-sensitive fault injection methods of :class:`cowenv_agents.GreyboxAgent`."""

    def _fc_arm(self, env: CowEnv, mask: np.ndarray, a: int) -> int | None:
        """The ``fail_nth`` event to take before start ``a``, or None.

        Armed when ``a`` is a user thread's start (with ``fault_kthreads``, the kernel
        thread's too, while no kernel-wide fault is pending) whose context has had fewer than
        ``fault_contexts`` tries (:attr:`_fc_tries`), no try of that thread is pending,
        and the thread has no fault armed already (the random part's ``fault_prob``).
        The try's n is :attr:`_fc_n` of the call (the context with the template: the
        same context's templates differ in what they allocate first, e.g. an
        ``mprotect`` of part of a VMA splits it, and breaks the table there, before it
        changes the entries; 1 at first; with ``fault_n_context``, the context's alone:
        the next call in that context tries n + 1 whatever its template). With
        ``fault_ranges`` the context holds the
        call's range class too (:func:`cowenv.greybox.range_class`); with
        ``fault_shared``, a ranged call on a COW-shared table of its mm whose context has
        had its tries is still armed with that probability (``fc_stats["shared"]``).
        """
        ci = self._ci
        assert ci is not None
        sp = ci.catalogue[a]
        if sp.kind != "start" or sp.tid in self._fc_pending:
            return None
        fails = self._fc_fails(sp.tid)
        t = env.kernel.threads.get(sp.tid)
        if not fails or t is None or t.fail_nth_next or (
                sp.tid == KSWAPD_TID and env.kernel.fail_nth):
            return None
        ctx, rc = self._fc_context(env.kernel, sp)
        if self.plan_fault_scope and self.episode_kind == "plan":
            # The seed plan is part of the calling context: each plan's continuation
            # has its own tries (and n) in every context.
            ctx = ("plan:" + self._from_plan, *ctx)
        tries = self._fc_tries.get(ctx, 0)
        extra = tries >= self.fault_contexts
        if extra and (not self.fault_shared or rc not in ("split", "split-pmd", "whole")
                      or self._shared_pmds(env.kernel, sp.tid).isdisjoint(ci.span[a])
                      or self.rng.random() >= self.fault_shared):
            return None
        # With fault_n_context the context's n (its range class tells the calls that
        # allocate alike apart), else the call's (the context with the template).
        key: Call = (ctx, -1) if self.fault_n_context else (ctx, a)
        n = self._fc_n.get(key, 1)
        ev = next((e for e in fails if ci.catalogue[e].n == n), None)
        if ev is None or not mask[ev]:
            return None
        if extra:
            self.fc_stats["shared"] += 1
        else:
            self._fc_tries[ctx] = tries + 1
        self._fc_pending[sp.tid] = (key, n, False, False)
        self.fc_stats["armed"] += 1
        return ev

    def _fc_context(self, k: Any, sp: Any) -> tuple[Context, str]:
        """A start's call context and range class.

        With ``fault_ranges`` the context holds the range class too; the class is
        computed only when ``fault_ranges`` or ``fault_shared`` use it (else ``""``).
        """
        ctx: Context = call_context(k, sp)
        rc = range_class(k, sp, self.fault_split_pmd) \
            if self.fault_ranges or self.fault_shared else ""
        if self.fault_ranges:
            ctx = (*ctx, rc)
        return ctx, rc

    def _fc_untried(self, k: Any, cands: list[int]) -> list[int]:
        """``aim_untried``: the templates of ``cands`` whose context had fewest tries.

        Tries so far: :attr:`_fc_tries`, capped at ``fault_contexts``.

        FIFUZZ's goal, every allocation failed in every calling context, turned into the
        choice of the call: where the aimed choice picks among the templates of one
        operation on a COW-shared table, the one in a context not yet tried comes first
        (measured: over 100k steps of ``mprotect-ignores-break-failure`` seed 29, the
        round-15 agent made one ``mprotect(PROT_NONE)`` of whole VMAs over a shared
        table with present pages, against 60 other ``mprotect`` calls on shared tables).
        """
        ci = self._ci
        assert ci is not None
        tries = [self._fc_tries.get(self._fc_context(k, ci.catalogue[i])[0], 0)
                 for i in cands]
        low = min(tries)
        return [i for i, n in zip(cands, tries, strict=True) if n == low]

    def _fc_fails(self, tid: int) -> list[int]:
        """The ``fail_nth`` events (catalogue indices) that arm a try of ``tid``'s call.

        A user thread's own (``/proc/thread-self/fail-nth``); with ``fault_kthreads``,
        for the kernel thread (kcompactd's compaction, kswapd's reclaim), which has no
        ``fail-nth`` file, the kernel-wide ``pressure_fail_nth`` events: the n-th
        allocation of any thread from then fails (``fail_page_alloc`` without a task
        filter), so a try fires inside the kernel thread's call only if no other
        thread allocates first (checked as for the others: an ``alloc_fail`` of the
        thread within the call).
        """
        ci = self._ci
        assert ci is not None
        if tid == KSWAPD_TID and self.fault_kthreads:
            return ci.fail_of.get(-1, [])
        return ci.fail_of.get(tid, [])

    def _fc_observe(self, env: CowEnv, sp: Any) -> None:
        """After a step: follow each armed try to the end of its call.

        The try fired if the kernel's trace has an ``alloc_fail`` of the thread between
        the call's start and its end; then the call's next try arms n + 1 (while the
        catalogue has that n), else n = 1 again (the call made fewer than n allocations:
        syzkaller's loop stops there; the next call in this context may take another
        path, e.g. split a VMA first or not, so its allocations are counted afresh).
        """
        pend = self._fc_pending
        if not pend:
            self._fc_ev = len(env.kernel.events)
            return
        k = env.kernel
        ev = k.events
        new = ev[self._fc_ev:]
        self._fc_ev = len(ev)
        if sp.kind == "start" and sp.tid in pend:
            ctx, n, _s, fired = pend[sp.tid]
            pend[sp.tid] = (ctx, n, True, fired)
        for tid in sorted(pend):
            ctx, n, started, fired = pend[tid]
            if not started:
                continue
            if not fired and any(e.tid == tid and e.kind == "event" and e.label == "alloc_fail"
                                 for e in new):
                fired = True
                pend[tid] = (ctx, n, started, fired)
            t = k.threads.get(tid)
            if t is not None and t.gen is not None and not t.exited:
                continue
            del pend[tid]
            n_next = 1
            if fired:
                self.fc_stats["fired"] += 1
                ci = self._ci
                assert ci is not None
                if any(ci.catalogue[e].n == n + 1 for e in self._fc_fails(tid)):
                    n_next = n + 1
            self._fc_n[ctx] = n_next
