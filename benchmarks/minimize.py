"""Minimisation benchmark: pad each flaw scenario with random irrelevant steps, minimise.

For every scenario in ``scenarios/flaws/`` (or the paths given) whose expectation names a
violation: insert at least ``--pad`` random irrelevant steps (``cowenv.minimize.pad_schedule``:
each insertion verified to keep the schedule valid and violating), run ``minimize`` on the
padded schedule, check the result replays strictly with the same signature and is no longer
than the hand-written schedule plus ``--slack`` steps, and report lengths and seconds.

    .venv/bin/python benchmarks/minimize.py [--json] [--pad 200] [--slack 2] [paths...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cowenv.minimize import minimize, padded_scenario  # noqa: E402
from cowenv.replay import replay  # noqa: E402
from cowenv.scenario import collect, load_scenario, parse_scenario  # noqa: E402


def discover(paths: list[str]) -> list[Path]:
    """Scenario files with an expected violation (default: scenarios/flaws, else all)."""
    if not paths:
        flaws = ROOT / "scenarios" / "flaws"
        paths = [str(flaws)] if any(flaws.glob("*.yaml")) else [str(ROOT / "scenarios"),
                                                                  str(ROOT / "tests" / "data")]
    out = []
    for p in collect(paths):
        if load_scenario(p).expect.violations:
            out.append(p)
    return out


def bench_one(path: Path, pad: int, slack: int, seed: int) -> dict:
    sc = load_scenario(path)
    t0 = time.perf_counter()
    padded = padded_scenario(sc, pad, seed)
    t_pad = time.perf_counter() - t0
    res = minimize(padded)
    ok = replay(parse_scenario(res.data)).reproduced
    return {"scenario": sc.name, "signature": res.signature, "original": len(sc.steps),
            "padded": len(padded.steps), "minimised": res.minimal_len,
            "context_switches": res.context_switches, "runs": res.tests,
            "cache_hits": res.cache_hits, "seconds": round(res.seconds, 3),
            "pad_seconds": round(t_pad, 3), "replays": ok,
            "within_slack": res.minimal_len <= len(sc.steps) + slack}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--pad", type=int, default=200, help="random steps to insert (>= 200)")
    ap.add_argument("--slack", type=int, default=2, help="allowed steps above hand-written")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows = [bench_one(p, a.pad, a.slack, a.seed) for p in discover(a.paths)]
    ok = all(r["replays"] and r["within_slack"] and r["seconds"] < 10 for r in rows) and rows
    if a.json:
        print(json.dumps({"pad": a.pad, "slack": a.slack, "rows": rows, "ok": bool(ok)},
                         sort_keys=True))
    else:
        hdr = (f"{'scenario':34} {'orig':>4} {'padded':>6} {'min':>4} {'cs':>3} {'runs':>5} "
               f"{'sec':>6}  ok")
        print(hdr)
        for r in rows:
            good = r["replays"] and r["within_slack"] and r["seconds"] < 10
            print(f"{r['scenario'][:34]:34} {r['original']:>4} {r['padded']:>6} "
                  f"{r['minimised']:>4} {r['context_switches']:>3} {r['runs']:>5} "
                  f"{r['seconds']:>6.2f}  {'yes' if good else 'NO'}")
        if rows:
            print(f"{len(rows)} scenarios; max {max(r['seconds'] for r in rows):.2f} s, "
                  f"mean {sum(r['seconds'] for r in rows) / len(rows):.2f} s per minimisation")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
