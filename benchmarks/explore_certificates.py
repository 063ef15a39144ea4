"""Systematic exploration of every flaw scenario and conformance case (``cowenv explore``).

    .venv/bin/python benchmarks/explore_certificates.py [--bound 2] [--jobs 2]
        [--max-seconds 900] [--only NAME,...] [--runs flaw,fixed] [--merge] [--json]

Runs :func:`cowenv.explore.explore` at preemption bound ``K`` on:

* each flaw scenario with its own configuration (the flaw alone): does the search find
  the flaw's signatures (those the scenario reports with the flaw on and not on
  ``fixed``), and with how few preemptions. The flaw scenarios are
  ``scenarios/flaws/*.yaml`` and every other scenario (outside ``conformance/``) whose
  configuration is one flaw alone and whose own schedule shows it (e.g.
  ``tlb/table-free-no-deferral-stale-psc.yaml``: the same flaw through another walker);
  a flaw counts as found with the fewest preemptions over its scenarios;
* each flaw scenario and each conformance case (``scenarios/conformance/**/*.yaml``)
  on ``fixed``: the certificate (0 violations, interleavings, states, seconds) or the
  violations.

Writes ``benchmarks/out/explore.{json,md}`` after every exploration (so a run stopped
early keeps its rows); ``--merge`` keeps the rows of the existing ``explore.json`` (same
bound) that this run does not redo. Deterministic except the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def flaw_targets(path: str) -> list[str]:
    """The flaw's signatures: those the scenario expects, shown by its own schedule with
    the flaw and not on fixed (no selftests).

    The scenario's ``expect`` names what its flaw shows; other signatures the same run
    happens to show are left out (e.g. ``table-free-no-deferral`` runs v4's slow path,
    whose PTL nesting is ``ptl-recursive-nesting``'s lockdep report). A scenario without
    an expected violation falls back to every such signature.
    """
    from cowenv.scenario import load_scenario, run_scenario

    sc = load_scenario(path)
    on = {v.signature for v in run_scenario(sc).violations if v.kind != "selftest"}
    off = {v.signature for v in run_scenario(sc, "fixed").violations}
    want = {f"{v['kind']}@{v['site']}" for v in sc.expect.violations}
    return sorted((on - off) & want if want else on - off)


def flaw_of(path: str | Path) -> str | None:
    """The flaw a scenario's configuration names, if it names exactly one."""
    from cowenv.scenario import load_scenario

    fl = list(load_scenario(str(path)).config.flaws)
    return str(fl[0]) if len(fl) == 1 else None


def flaw_scenarios() -> list[Path]:
    """``scenarios/flaws/*.yaml``, then the other one-flaw scenarios that show their flaw."""
    flaws = sorted((ROOT / "scenarios" / "flaws").glob("*.yaml"))
    extra = [p for p in sorted((ROOT / "scenarios").rglob("*.yaml"))
             if p.parent.name != "flaws" and "conformance" not in p.parts
             and flaw_of(p) is not None and flaw_targets(str(p))]
    return flaws + extra


def run(path: str, variant: str | None, bound: int, max_seconds: float) -> dict[str, Any]:
    """One exploration, as a table row.

    On ``fixed``: the whole search at ``bound`` (a certificate when nothing is found).
    With the flaw: the shortest-trigger search (:func:`cowenv.explore.shortest_trigger`:
    bounds 0, 1, ... each stopped at the first run that shows one of the flaw's
    signatures); the row counts the work of every bound tried.
    """
    from cowenv.explore import explore, shortest_trigger
    from cowenv.scenario import load_scenario

    sc = load_scenario(path)
    t0 = time.perf_counter()
    tg: list[str] = []
    if variant is None:
        tg = flaw_targets(path)
        hit_r, rs = shortest_trigger(sc, set(tg), bound, max_seconds=max_seconds)
        r = hit_r or rs[-1]
    else:
        r = explore(sc, bound, variant, max_seconds=max_seconds)
        rs = [r]
    row = {"scenario": sc.name, "kind": Path(path).parent.name, "variant": variant or "flaw",
           "flaw": flaw_of(path),
           "bound": r.bound, "interleavings": sum(x.interleavings for x in rs),
           "states": sum(x.states for x in rs),
           "transitions": sum(x.transitions for x in rs),
           "pruned_sleep": sum(x.pruned_sleep for x in rs),
           "pruned_cache": sum(x.pruned_cache for x in rs),
           "seconds": round(time.perf_counter() - t0, 1),
           "complete": r.complete or r.stopped,
           "findings": [{"signature": f.signature, "preemptions": f.preemptions,
                         "steps": f.steps} for f in r.findings]}
    if variant is None:
        hit = [f for f in row["findings"] if f["signature"] in tg]
        row["targets"] = tg
        row["found"] = bool(hit)
        row["min_preemptions"] = min((f["preemptions"] for f in hit), default=None)
    return row


def markdown(rows: list[dict[str, Any]], bound: int) -> str:
    """The two README tables."""
    out = [f"Flaw scenarios, each with its flaw alone: shortest trigger (bounds 0, 1, ... "
           f"{bound}, each stopped at the first run showing the flaw's signature; the work "
           f"of every bound tried):", "",
           "| scenario | found | fewest preemptions | interleavings | states | seconds |",
           "|---|---|---|---|---|---|"]
    best: dict[str, tuple[int | None, str]] = {}
    for r in rows:
        if r["variant"] != "flaw":
            continue
        name = r["scenario"] if r["kind"] == "flaws" else f"{r['kind']}/{r['scenario']}"
        out.append(f"| `{name}` | {'yes' if r['found'] else 'NO'} | "
                   f"{r['min_preemptions'] if r['found'] else '-'} | {r['interleavings']:,} | "
                   f"{r['states']:,} | {r['seconds']} |")
        fl = r.get("flaw") or r["scenario"]
        mp = r["min_preemptions"] if r["found"] else None
        old = best.get(fl)
        if old is None or (mp is not None and (old[0] is None or mp < old[0])):
            best[fl] = (mp, name)
    if best:
        hit = [v[0] for v in best.values() if v[0] is not None]
        out += ["", f"Flaws found: {len(hit)} of {len(best)}, the most preemptions any "
                    f"needed: {max(hit) if hit else '-'}"
                    + "".join(f"; `{fl}` through `{v[1]}`" for fl, v in sorted(best.items())
                              if v[1] != fl)]
    out += ["", f"Certificates on `fixed`, bound {bound} (violations: 0 = certified):", "",
            "| scenario | violations | interleavings | revisits not searched again | states "
            "| seconds |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] != "fixed":
            continue
        v = ", ".join(f["signature"] for f in r["findings"]) or "0"
        inc = "" if r["complete"] else " (time limit: incomplete)"
        out.append(f"| `{r['scenario']}` ({r['kind']}) | {v}{inc} | {r['interleavings']:,} | "
                   f"{r.get('pruned_cache', 0):,} | {r['states']:,} | {r['seconds']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bound", type=int, default=2)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--max-seconds", type=float, default=900.0,
                   help="per exploration; a run stopped by it is marked incomplete")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--runs", default="flaw,fixed",
                   help="which explorations: flaw (each flaw scenario with its flaw), "
                        "fixed (flaw scenarios and conformance cases on fixed)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the existing explore.json (same bound) not redone")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    flaws = flaw_scenarios()
    conf = sorted((ROOT / "scenarios" / "conformance").rglob("*.yaml"))
    only = {x for x in a.only.split(",") if x}
    kinds = {x for x in a.runs.split(",") if x}
    jobs: list[tuple[str, str | None]] = []
    for f in flaws:
        jobs += [(str(f), v) for v, k in ((None, "flaw"), ("fixed", "fixed")) if k in kinds]
    if "fixed" in kinds:
        jobs += [(str(c), "fixed") for c in conf]
    if only:
        jobs = [j for j in jobs if Path(j[0]).stem in only]
    # Certificates first (the long ones), then the shortest-trigger searches.
    jobs.sort(key=lambda j: j[1] is None)
    t0 = time.perf_counter()
    out = Path(a.out)
    rows: list[dict[str, Any]] = []
    if a.merge and (out / "explore.json").exists():
        old = json.loads((out / "explore.json").read_text())
        redo = {(Path(pth).stem, v or "flaw") for pth, v in jobs}
        if old.get("bound") == a.bound:
            rows = [r for r in old["rows"] if (r["scenario"], r["variant"]) not in redo]
    order = {(pth.stem, v): i for i, (pth, v) in enumerate(
        [(f, v) for f in flaws for v in ("flaw", "fixed")] + [(c, "fixed") for c in conf])}

    def write(complete: bool) -> str:
        rows.sort(key=lambda r: order.get((r["scenario"], r["variant"]), len(order)))
        md = markdown(rows, a.bound)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (
                ("explore.json", json.dumps(
                    {"bound": a.bound, "rows": rows, "complete": complete,
                     "wall_seconds": round(time.perf_counter() - t0, 1),
                     "cpus": os.cpu_count(), "jobs": a.jobs}, indent=1, sort_keys=True) + "\n"),
                ("explore.md", md)):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)
        return md

    with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(run, pth, v, a.bound, a.max_seconds): (pth, v) for pth, v in jobs}
        for fu in as_completed(futs):
            r = fu.result()
            rows.append(r)
            print(f"{r['scenario']:55s} {r['variant']:6s} {r['interleavings']:>8,} runs "
                  f"{r['seconds']:>7}s {[f['signature'] for f in r['findings']]}",
                  file=sys.stderr)
            write(False)
    md = write(True)
    print(json.dumps(rows) if a.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
