"""How often an agent reaches the state `numa-fault-writes-shared` needs (a diagnostic).

The flaw fires when a load takes a NUMA-hinting fault (``do_numa_page``) on an entry of a
COW-shared page table. This counts, per agent, over the bug-finding benchmark's env for
that flaw (:mod:`bug_finding`, the flaw's scenarios held out of greybox's seeds) and a
step budget, the episodes in which some step starts with a COW-shared table (referenced
by more than one mm) holding an accessible NUMA-hinting entry (``pte_protnone`` in a
VMA with read or write access), the steps spent in that state, and the episodes that
show the flaw's signature. README "Greybox, round 6 — the default now".

Usage::

    python benchmarks/numa_reach.py [--agents random,greybox] [--seed 0] [--budget 40000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bug_finding as bf  # noqa: E402

FLAW = "numa-fault-writes-shared"
SIGNATURE = "shared-table-write@do_numa_page"


def shared_numa_entries(k) -> int:
    """Accessible NUMA-hinting entries in tables that more than one mm maps."""
    from cowenv.kernel.mm import vma_is_accessible
    from cowenv.kernel.pgtable import pte_protnone

    n = 0
    for p in k.live_procs():
        P = k.config.ptrs_per_pte
        for idx, e in p.mm.pmd.items():
            if e.table.refcount < 2:
                continue
            for j, x in enumerate(e.table.entries):
                if x and pte_protnone(int(x)):
                    v = p.mm.find_vma(idx * P + j)
                    n += v is not None and vma_is_accessible(v)
    return n


def measure(agent: str, seed: int, budget: int) -> dict[str, int]:
    """Play ``agent`` on the flaw's benchmark env for ``budget`` steps; the counts."""
    import cowenv_agents as ca

    from cowenv.env import CowEnv
    from cowenv.kernel.config import FLAW_IDS

    env = CowEnv(**bf.env_kwargs(FLAW))
    name, akw = bf.AGENT_SPECS.get(agent, (agent, {}))
    if name == "greybox":
        akw = {**akw, "seed_exclude": [p.stem for p in bf.flaw_scenarios(FLAW)]}
    ag = ca.make_agent(name, **akw)
    act = ag.act
    seen = {"episode": False, "steps": 0}

    def counting_act(e, obs, mask):  # the state each of the agent's steps starts from
        if shared_numa_entries(e.kernel):
            seen["episode"] = True
            seen["steps"] += 1
        return act(e, obs, mask)

    ag.act = counting_act
    out = {"episodes": 0, "reached": 0, "steps_in_state": 0, "found": 0, "steps": 0}
    fi = FLAW_IDS.index(FLAW)
    while out["steps"] < budget:
        rng, rs = ca.episode_rng(seed, fi, out["episodes"])
        seen["episode"] = False
        res = ca.run_episode(env, ag, rng, rs, max_actions=budget - out["steps"],
                             teardown=bf.TEARDOWN)
        out["steps"] += res.steps + res.offline_steps
        out["episodes"] += 1
        out["reached"] += seen["episode"]
        out["found"] += SIGNATURE in res.signatures
    out["steps_in_state"] = seen["steps"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="random,greybox")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=40_000)
    a = p.parse_args(argv)
    for ag in [x for x in a.agents.split(",") if x]:
        if ag not in bf.AGENTS:
            p.error(f"--agents: unknown agent {ag!r}")
    print("| agent | episodes | reached the state | agent steps in it | showed the flaw |")
    print("|---|---|---|---|---|")
    for ag in a.agents.split(","):
        r = measure(ag, a.seed, a.budget)
        print(f"| `{ag}` | {r['episodes']} | {r['reached']} | {r['steps_in_state']} | "
              f"{r['found']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
