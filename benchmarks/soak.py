"""Random-schedule soak of the simulated kernel: throughput and violation counts.

Runs seeded episodes of :func:`cowenv.workload.run_episode` (a random small config, a
random interleaving of every operation, reclaim and ``fail_nth``, then teardown, a full
accounting check and a leak check) until at least ``--steps`` scheduler steps were
taken, and prints steps/s and what was found, by signature.

Usage: ``python benchmarks/soak.py [--json] [--steps N] [--variant V] [--seed S]
[--episodes E] [--episode-steps M] [--no-oracles] [--base B]``

``--base 6.2`` runs every episode on v4's base (and so in the mmap_lock fault mode, as
6.2 has no per-VMA locks); ``--base 6.5`` forces base 6.5 with both fault modes drawn.
Without ``--base`` each episode's base follows its fault mode (6.2 for mmap_lock, 6.5
for vma_lock).

With ``--episodes`` the run stops after that many episodes instead (``--seed S
--episodes 1`` reproduces one episode of the soak test). Exit status 1 if anything was
found on the run.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from cowenv.workload import run_episode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--steps", type=int, default=1_000_000, help="total scheduler steps")
    p.add_argument("--variant", default="classic", help="classic, fixed or as-posted")
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    p.add_argument("--episodes", type=int, default=0, help="stop after E episodes")
    p.add_argument("--episode-steps", type=int, default=2000, help="steps per episode")
    p.add_argument("--no-oracles", action="store_true", help="raw speed, nothing checked")
    p.add_argument("--base", default=None, help="kernel base for every episode (6.2, 6.4, 6.5)")
    a = p.parse_args(argv)
    overrides: dict[str, str] = {}
    if a.base:
        overrides["base"] = a.base
        if a.base == "6.2":
            overrides["fault_mode"] = "mmap_lock"

    t0 = time.perf_counter()
    steps = episodes = 0
    counts: collections.Counter[str] = collections.Counter()
    dirty_episodes: dict[str, list[int]] = collections.defaultdict(list)
    first: dict[str, str] = {}
    seed = a.seed
    while (episodes < a.episodes) if a.episodes else (steps < a.steps):
        r = run_episode(seed, a.episode_steps, a.variant, oracles=not a.no_oracles,
                        **overrides)
        steps += r.steps
        episodes += 1
        found = ([v.split(":", 1)[0] for v in r.violations]
                 + [f"defect: {d}" for d in r.defects] + [f"leak: {x}" for x in r.leaks])
        full = r.violations + r.defects + r.leaks
        for sig, msg in zip(found, full, strict=True):
            counts[sig] += 1
            first.setdefault(sig, f"seed {seed}: {msg}")
            if seed not in dirty_episodes[sig]:
                dirty_episodes[sig].append(seed)
        seed += 1
    wall = time.perf_counter() - t0
    out = {
        "variant": a.variant, "base": a.base or "by fault mode",
        "oracles": not a.no_oracles, "episodes": episodes,
        "episode_steps": a.episode_steps, "first_seed": a.seed, "steps": steps,
        "wall_s": round(wall, 2), "steps_per_s": round(steps / wall) if wall else None,
        "violations": sum(v for k, v in counts.items() if not k.startswith(("defect", "leak"))),
        "defects": sum(v for k, v in counts.items() if k.startswith("defect")),
        "leaks": sum(v for k, v in counts.items() if k.startswith("leak")),
        "by_signature": {k: {"count": c, "episodes": len(dirty_episodes[k]),
                             "first": first[k]} for k, c in counts.most_common()},
    }
    if a.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"{a.variant} (base {out['base']}): {steps} steps in {episodes} episodes, "
              f"{out['wall_s']} s, "
              f"{out['steps_per_s']} steps/s (oracles {'on' if out['oracles'] else 'off'})")
        print(f"violations {out['violations']}, defects {out['defects']}, "
              f"leaks {out['leaks']}")
        for k, d in out["by_signature"].items():
            print(f"  {d['count']:6d} × {k} in {d['episodes']} episode(s); {d['first']}")
    return 1 if counts else 0


if __name__ == "__main__":
    sys.exit(main())
