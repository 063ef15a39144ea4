"""Replay fidelity benchmark: >= 5,000 random schedules replayed in another process.

Records ``--n`` random legal schedules (``cowenv.replay.random_schedule``) over the
``classic``, ``as-posted`` and ``fixed`` presets with varied configurations (geometry,
fault mode, split PTL, pool sizes), then replays them all in one separate interpreter
started with a different ``PYTHONHASHSEED`` and checks that every one reproduces: same
labels at every step, same violation at the same step, same step count and the same
SHA-256 trace hash.

    .venv/bin/python benchmarks/replay_fidelity.py [--json] [--n 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cowenv.kernel import make_kernel  # noqa: E402
from cowenv.kernel.config import KernelConfig  # noqa: E402
from cowenv.replay import (  # noqa: E402
    hash_probe,
    random_schedule,
    replay_in_subprocess,
    source_digest,
)
from cowenv.workload import random_config  # noqa: E402

DIGEST = source_digest()  # of the sources this process imported


def presets() -> list[str]:
    try:
        make_kernel(KernelConfig.from_preset("as-posted", ptrs_per_pte=8, nr_frames=64))
    except Exception:  # noqa: BLE001 - cowpte missing: classic only
        return ["classic"]
    return ["classic", "as-posted", "fixed"]


def config(preset: str, i: int) -> KernelConfig:
    return random_config(np.random.default_rng(50_000 + i), preset)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    pre = presets()
    t0 = time.perf_counter()
    scheds = []
    for i in range(a.n):
        p = pre[i % len(pre)]
        length = int(np.random.default_rng(i).integers(40, 400))
        scheds.append(random_schedule(config(p, i), seed=i, length=length, name=f"{p}-{i}"))
    t_gen = time.perf_counter() - t0
    seed = 97 if os.environ.get("PYTHONHASHSEED") != "97" else 98
    t1 = time.perf_counter()
    probe, results, digest = replay_in_subprocess(data=scheds, hash_seed=seed, timeout=3600)
    t_rep = time.perf_counter() - t1
    by_preset: Counter[str] = Counter()
    violating: Counter[str] = Counter()
    sigs: Counter[str] = Counter()
    bad = []
    for d, r in zip(scheds, results, strict=True):
        p = d["name"].rsplit("-", 1)[0]
        by_preset[p] += 1
        v = d["expect"]["violation"]
        if v:
            violating[p] += 1
            sigs[f"{v['kind']}@{v['site']}"] += 1
        if not (r.get("reproduced") and r.get("trace_hash") == d["outcome"]["trace_hash"]):
            bad.append({"name": d["name"], "divergence": r.get("divergence") or r.get("error")})
    rep = {
        "schedules": len(scheds), "reproduced": len(scheds) - len(bad), "diverged": len(bad),
        "violating": sum(violating.values()), "clean": len(scheds) - sum(violating.values()),
        "by_preset": dict(by_preset), "violating_by_preset": dict(violating),
        "signatures": dict(sigs.most_common()),
        "scheduler_steps": sum(d["outcome"]["steps"] for d in scheds),
        "schedule_steps": sum(len(d["steps"]) for d in scheds),
        "hash_seed_differs": probe != hash_probe(), "record_seconds": round(t_gen, 2),
        "replay_seconds": round(t_rep, 2),
        "replay_ms_per_schedule": round(1000 * t_rep / max(1, len(scheds)), 3),
        "failures": bad[:10], "sources_unchanged": digest == DIGEST,
    }
    if a.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        per = ", ".join(f"{k} {v}" for k, v in by_preset.items())
        print(f"schedules: {rep['schedules']} ({per}); "
              f"violating {rep['violating']}, clean {rep['clean']}")
        print(f"schedule steps: {rep['schedule_steps']}, scheduler steps: {rep['scheduler_steps']}")
        print(f"replayed in a separate process (PYTHONHASHSEED={seed}, hash seed differs: "
              f"{rep['hash_seed_differs']}): {rep['reproduced']} reproduced, "
              f"{rep['diverged']} diverged")
        print(f"record {t_gen:.1f} s, replay {t_rep:.1f} s "
              f"({rep['replay_ms_per_schedule']:.2f} ms per schedule, incl. interpreter start)")
        for sig, n in sigs.most_common(8):
            print(f"  {n:5d}  {sig}")
        for b in bad[:10]:
            print(f"  DIVERGED {b['name']}: {b['divergence']}")
        if digest != DIGEST:
            print("WARNING: cowenv sources changed between recording and replay; "
                  "divergences are expected, rerun on a quiet tree")
    return 0 if not bad and rep["hash_seed_differs"] else 1


if __name__ == "__main__":
    sys.exit(main())
