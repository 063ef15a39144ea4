"""Which race pairs a greybox run tried: the diagnosis behind README "Greybox, round 8".

One bug-finding run (:func:`bug_finding.run_one`: the flaw alone on its base, its own
scenarios held out, the same steps and detection rule), with the greybox agent's race
pairs recorded as they are chosen (:meth:`cowenv_agents.greybox_race.RacePairs._race_b`):
for each pair, the label *A* was paused at and *B*'s operation and variant; for *B*
starts with an address, what the entry it addresses holds (``none``, ``present-w``,
``present-ro``, ``other``: a swap, migration or PROT_NONE entry; ``unmapped``: no table
there) and whether *B*'s thread is in *A*'s process.

Usage::

    .venv/bin/python benchmarks/race_pairs.py --flaw gup-fast-fork-race --seed 4 \\
        --agent greybox-r7 --label copy_present_pte:checked

prints the run's outcome, how many pairs ended with the kernel quiescent (where the
checks run) or with an operation still in flight, the pairs per *A* label (the most
common first) and, for
``--label``, every *B* group tried there with its count and the entries its starts
addressed, and whether it addresses a populated entry of the range *A*'s walk will
still process (``Thread.walk``, :func:`cowenv.greybox.meets_walk`, what ``race_walk``
aims at: ``in-walk``, ``off-walk``; ``-``: *A* is not paused inside a walk).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bug_finding as bf  # noqa: E402


def entry_state(k: Any, sp: Any) -> str:
    """What the entry start ``sp`` addresses holds now (its first page)."""
    from cowenv.catalogue import range_pages
    from cowenv.kernel.pgtable import PTE_PRESENT, PTE_WRITE

    pages = range_pages(dict(sp.args), k.config.page_size)
    th = k.threads.get(sp.tid)
    if not pages or th is None or th.pid not in k.procs:
        return "-"
    vpn = pages[0]
    e = k.procs[th.pid].mm.pmd.get(vpn // k.P)
    if e is None:
        return "unmapped"
    x = int(e.table.entries[vpn % k.P])
    if not x:
        return "none"
    if x & PTE_PRESENT:
        return "present-w" if x & PTE_WRITE and e.write else "present-ro"
    return "other"


def main(argv: list[str] | None = None) -> int:
    """Run one recorded bug-finding run and print its race pairs."""
    from cowenv_agents.greybox import GreyboxAgent

    from cowenv.greybox import meets_walk, spec_variant

    a = bf.one_run_args(__doc__.split("\n")[0], argv, lambda p: p.add_argument(
        "--label", default=None, help="A's pause label to detail"))
    by_label: Counter[str] = Counter()
    at_label: Counter[tuple[str, str, str, str, str]] = Counter()

    ended = Counter()  # race pairs that ended with the kernel quiescent, or not

    class Recording(GreyboxAgent):
        def _race(self, env: Any, mask: Any) -> int | None:
            before = self._race_phase
            act = super()._race(env, mask)
            if before in (4, 5) and not self._race_phase:
                # The pair is over: A resumed (and, with race_settle, the others ran).
                ended["quiescent" if env.kernel.quiescent() else "in flight"] += 1
            return act

        def _race_b(self, env: Any, mask: Any, u: int) -> int | None:
            k = env.kernel
            label, pid = k.threads[u].label, k.threads[u].pid
            b = super()._race_b(env, mask, u)
            if b is not None:
                by_label[label] += 1
                if label == a.label:
                    sp = self._ci.catalogue[b]
                    same = "same" if k.threads[sp.tid].pid == pid else "other"
                    walk = k.threads[u].walk
                    inw = "-" if walk is None else (
                        "in-walk" if meets_walk(k, self._ci, b, walk) else "off-walk")
                    at_label[(sp.op, spec_variant(sp), entry_state(k, sp), same, inw)] += 1
            return b

    r = bf.run_recorded(a, Recording)
    print(f"{bf.run_outcome(a, r)}, {sum(by_label.values())} race pairs")
    print(f"pairs that ended with the kernel quiescent (the checks run): "
          f"{ended['quiescent']}; with an operation still in flight: {ended['in flight']}")
    print("\npairs by A's pause label:")
    for lab, n in by_label.most_common():
        print(f"  {n:5d}  {lab}")
    if a.label:
        print(f"\nB at {a.label} (operation, variant, entry it addresses, B's process, "
              "whether it addresses a populated entry of the range A's walk will process):")
        for (op, var, st, same, inw), n in sorted(at_label.items(),
                                                  key=lambda x: (-x[1], x[0])):
            print(f"  {n:5d}  {op} {var or '-'}  {st}  {same}  {inw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
