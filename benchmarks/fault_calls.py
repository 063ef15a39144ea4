"""Which calls of one operation met a COW-shared table, and where their injected
allocation failures landed, in a greybox run (README "Greybox, round 11").

One bug-finding run (:func:`bug_finding.run_one`: the flaw alone on its base, its own
scenarios held out, the same steps and detection rule). Every call of ``--op`` whose
page is in a COW-shared table when it starts (:func:`cowenv.greybox.call_context`'s PMD
state ``shared``) is counted by its variant, its range class
(:func:`cowenv.greybox.range_class`, with ``split-pmd``), whether a ``fail_nth`` was
armed for its thread when it started, which allocation site failed inside it (if any),
and what it returned; with the kinds of episode it came from. An ``mprotect`` of part of
a VMA fails in ``__split_vma``'s break (-ENOMEM, a correct error path) before its walker
reaches ``change_pte_range``'s (v4's ignored failure: the call returns 0).

Usage::

    .venv/bin/python benchmarks/fault_calls.py --flaw mprotect-ignores-break-failure \\
        --seed 6 --agent greybox-r10

(round 10 misses this seed: every ``mprotect(PROT_NONE)`` whose break failed was a
``split`` and returned -12.)
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bug_finding as bf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run one bug-finding run and print its calls of ``--op`` on shared tables."""
    from cowenv_agents.greybox import GreyboxAgent

    from cowenv.greybox import call_context, range_class

    a = bf.one_run_args(__doc__.split("\n")[0], argv, extra=lambda p: p.add_argument(
        "--op", default="mprotect", help="the operation whose calls are counted"))
    #: (variant, range class, armed, failed, returned) -> episode kind -> calls.
    calls: dict[tuple[str, str, str, str, str], Counter[str]] = {}

    class Recording(GreyboxAgent):
        _open: dict[int, tuple[str, str, bool, int]]

        def begin_episode(self, env: Any, rng: Any) -> None:
            super().begin_episode(env, rng)
            self._open = {}

        def act(self, env: Any, obs: Any, mask: Any) -> int:
            act = super().act(env, obs, mask)
            assert self._ci is not None
            sp = self._ci.catalogue[act]
            k = env.kernel
            if sp.kind == "start" and sp.op == a.op and call_context(k, sp)[2] == "shared":
                t = k.threads[sp.tid]
                self._open[sp.tid] = (call_context(k, sp)[1], range_class(k, sp, True),
                                      t.fail_nth_next > 0 or t.fail_nth > 0 or k.fail_nth > 0,
                                      len(k.events))
            return act

        def observe(self, env: Any, action: int, *rest: Any) -> None:
            super().observe(env, action, *rest)
            k = env.kernel
            for tid in [t for t in self._open if k.threads[t].gen is None
                        or k.threads[t].exited]:
                variant, rc, armed, e0 = self._open.pop(tid)
                sites = [e.data for e in k.events[e0:]
                         if e.tid == tid and e.kind == "event" and e.label == "alloc_fail"]
                key = (variant, rc, "armed" if armed else "-",
                       f"failed@{sites[0]}" if sites else "-", str(k.threads[tid].result))
                calls.setdefault(key, Counter())[self.episode_kind] += 1

    r = bf.run_recorded(a, Recording)
    print(bf.run_outcome(a, r))
    print(f"\n{a.op} calls on a COW-shared table: variant, range class, fail_nth armed, "
          "the site of the allocation failure inside, returned: calls (by episode kind)")
    for key in sorted(calls, key=lambda c: (-sum(calls[c].values()), c)):
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(calls[key].items(),
                                                         key=lambda x: (-x[1], x[0])))
        print(f"  {' '.join(key)}: {sum(calls[key].values())} ({kinds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
