"""How far a bug-finding result is from "every flaw in 8 of 8 seeds" (README "Greybox, round 16").

Reads one or more ``bug_finding.json`` files (or their folders) and models, per flaw,
the runs still searching after ``--after`` steps as an exponential tail: the rate is the
finds after that point over the steps the runs spent beyond it (a censored maximum-
likelihood estimate; a run not found counts its steps to the budget), and the modelled
probability that a run misses is ``P(not found by --after) * exp(-rate * (budget -
after))``. A search whose late finds come at a constant rate (one rare combination of
choices per episode, whatever happened before) has such a tail; the table shows the
modelled beside the observed miss rate, so the fit can be judged.

From the per-run miss probabilities it gives the expected misses per ``--seeds`` seeds
of every flaw, the probability that all of them are found and that a block of 8 seeds
has every flaw in 8 of 8 (misses as independent rare events: ``exp(-expected)``), and
the factor by which every row's tail mean would have to shrink for the first
probability to reach ``--target``.

Usage::

    .venv/bin/python benchmarks/tails.py benchmarks/out/bug_finding_greybox15pc50_combined \\
        [more results ...] [--agents A,B] [--after 20000] [--seeds 56] [--target 0.5]

With several files (or agents) the runs are pooled per flaw: one setting's 56 seeds hold
one to three late finds' worth of information on a row's tail; several settings that
differ little pool into a firmer estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load_runs(paths: list[str], agents: set[str] | None) -> tuple[list[dict[str, Any]], int]:
    """The runs of the given results (files or folders), and their budget.

    Raises:
        ValueError: One line naming the file and what is wrong with it.
    """
    runs: list[dict[str, Any]] = []
    budgets = set()
    for p in paths:
        f = Path(p)
        if f.is_dir():
            f = f / "bug_finding.json"
        try:
            data = json.loads(f.read_text())
            got = data["runs"]
            budgets.add(int(data["budget"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: expected a bug_finding.json with 'runs' and 'budget' "
                             f"({type(e).__name__}: {e})") from None
        runs += [r for r in got if agents is None or r.get("agent") in agents]
    if len(budgets) != 1:
        raise ValueError(f"{', '.join(paths)}: expected one budget, got {sorted(budgets)}")
    return runs, budgets.pop()


def tail_rows(runs: list[dict[str, Any]], budget: int, after: int) -> list[dict[str, Any]]:
    """Per flaw: runs, runs beyond ``after``, late finds, misses, tail mean, P(miss)."""
    by: dict[str, list[int | None]] = defaultdict(list)
    for r in runs:
        by[r["flaw"]].append(int(r["steps"]) if r["found"] else None)
    rows = []
    for flaw, xs in by.items():
        n = len(xs)
        late = [x for x in xs if x is None or x > after]
        finds = sum(1 for x in late if x is not None)
        exposure = sum((budget if x is None else x) - after for x in late)
        misses = sum(1 for x in xs if x is None)
        rate = finds / exposure if exposure else math.inf
        p_late = len(late) / n
        p_miss = p_late * math.exp(-rate * (budget - after)) if late and finds else (
            p_late if late else 0.0)
        rows.append({"flaw": flaw, "runs": n, "late": len(late), "late_finds": finds,
                     "misses": misses, "tail_mean": (1 / rate) if finds else math.inf,
                     "p_miss": p_miss, "observed": misses / n, "p_late": p_late})
    rows.sort(key=lambda r: -r["p_miss"])
    return rows


def needed_tail_mean(rows: list[dict[str, Any]], budget: int, after: int, seeds: int,
                     target: float) -> float:
    """The factor every row's tail mean must be multiplied by for P(no miss) = target.

    All rows' tails are scaled by one factor ``s``: ``P(miss) = p_late * exp(-(budget -
    after) / (s * mean))``; bisection on ``s`` for ``exp(-seeds * sum P(miss)) = target``.
    """
    want = -math.log(target) / seeds

    def total(s: float) -> float:
        return sum(r["p_late"] * math.exp(-(budget - after) / (s * r["tail_mean"]))
                   for r in rows if r["late_finds"])

    lo, hi = 1e-3, 1.0
    if total(hi) <= want:
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= want else (lo, mid)
    return lo


def main(argv: list[str] | None = None) -> int:
    """Print the tail table of the given bug-finding results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="bug_finding.json files or their folders")
    ap.add_argument("--agents", default=None, help="only these agents' runs (comma list)")
    ap.add_argument("--after", type=int, default=20000,
                    help="steps after which the tail is modelled (default 20000)")
    ap.add_argument("--seeds", type=int, default=56,
                    help="seeds per flaw the expectations are for (default 56)")
    ap.add_argument("--target", type=float, default=0.5,
                    help="wanted probability that every run is found (default 0.5)")
    a = ap.parse_args(argv)
    if a.after < 0 or a.seeds < 1 or not 0 < a.target < 1:
        ap.error("--after: expected >= 0; --seeds: expected >= 1; --target: expected 0..1 "
                 "exclusive")
    agents = set(a.agents.split(",")) if a.agents else None
    try:
        runs, budget = load_runs(a.results, agents)
    except ValueError as e:
        print(f"tails.py: {e}", file=sys.stderr)
        return 2
    if not runs:
        print("tails.py: --agents: no runs of these agents in the results", file=sys.stderr)
        return 2
    if a.after >= budget:
        ap.error(f"--after: expected below the budget ({budget})")
    rows = tail_rows(runs, budget, a.after)
    print(f"| flaw | runs | beyond {a.after:,} | found beyond | missed | tail mean | "
          "P(miss) modelled | observed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["late"]:
            continue
        tm = f"{r['tail_mean']:,.0f}" if math.isfinite(r["tail_mean"]) else "—"
        print(f"| `{r['flaw']}` | {r['runs']} | {r['late']} | {r['late_finds']} | "
              f"{r['misses']} | {tm} | {100 * r['p_miss']:.2f} % | "
              f"{100 * r['observed']:.2f} % |")
    exp_miss = a.seeds * sum(r["p_miss"] for r in rows)
    obs = sum(r["misses"] for r in rows) / sum(r["runs"] for r in rows) * a.seeds * len(rows)
    block = math.exp(-exp_miss * 8 / a.seeds)
    print(f"\nExpected misses per {a.seeds} seeds of the {len(rows)} flaws: {exp_miss:.2f} "
          f"modelled, {obs:.2f} observed; P(every run found) = {math.exp(-exp_miss):.2f}, "
          f"P(a block of 8 seeds has every flaw in 8/8) = {block:.2f}, modelled.")
    s = needed_tail_mean(rows, budget, a.after, a.seeds, a.target)
    print(f"For P(every run found) = {a.target:.2f}: every tail mean x {s:.2f} "
          f"(the tails {1 / s:.1f} times as fast).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
