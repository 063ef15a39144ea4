"""Which page-table-sharing states a greybox run reached (README "Greybox, round 9").

One bug-finding run (:func:`bug_finding.run_one`: the flaw alone on its base, its own
scenarios held out, the same steps and detection rule), with, for every kind of entry a
COW-shared table held at the end of an operation (:func:`cowenv.greybox._shared_contents`:
``numa``, ``migration``, ``swap``, ``pinned``, ``anon``, ``psc``...; the agent's ``C``
features), the first episode that reached it and how many episodes did, by the kind of
episode (``plan``, ``mutate``, ``race``, ``state``...). A kind reached in a handful of
episodes out of hundreds is a state the search found and did not come back to.

Usage::

    .venv/bin/python benchmarks/states.py --flaw numa-fault-writes-shared --seed 0 \\
        --agent greybox-r8

(``greybox-r8``: without the state picks, 8 of 462 episodes reach ``numa``.)
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bug_finding as bf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run one bug-finding run and print the sharing states its episodes reached."""
    from cowenv_agents.greybox import GreyboxAgent


    a = bf.one_run_args(__doc__.split("\n")[0], argv)
    if not dict(bf.AGENT_SPECS.get(a.agent, ("", {}))[1]).get("content_features", True):
        a.parser.error(f"--agent: {a.agent} has no page-table-sharing states "
                       "(content_features off)")
    first: dict[str, int] = {}
    eps: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}

    class Recording(GreyboxAgent):
        def end_episode(self, env: Any) -> None:
            ids = self.tracker.state_ids
            for c in sorted({ids[f] for f in self._feats if f in ids}):
                first.setdefault(c, self.episodes)
                eps[c] += 1
                by_kind.setdefault(c, Counter())[self.episode_kind] += 1
            super().end_episode(env)

    r = bf.run_recorded(a, Recording)
    print(bf.run_outcome(a, r))
    print("\nstate (kind of entry in a COW-shared table, or fork layout), first episode, "
          "episodes that reached it, by episode kind:")
    for c in sorted(eps, key=lambda c: (eps[c], c)):
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(by_kind[c].items(),
                                                         key=lambda x: (-x[1], x[0])))
        print(f"  {c:10s} {first[c]:5d} {eps[c]:5d}  ({kinds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
