"""Campaign throughput, local processes vs Ray on one machine, 1 and 2 workers.

Runs the same campaign (``random`` agent, ``--no-minimise``, the test suite's small
geometry with three flaws) with the multiprocessing backend and with the Ray backend (the
local Ray instance ``cowenv fuzz --backend ray`` starts, a fresh one per run, its start
timed apart), with 1 and 2 workers, in interleaved rounds. Reports the best steps/s of
each (wall time of ``run_campaign``, worker start-up included), the start-up (until every
worker has reported once) and the rate after it, the parallel efficiency (rate with 2
workers / (2 x rate with 1)), Ray's throughput relative to multiprocessing (goal: >= 0.9
with 2 workers), and what one finding costs on its way from a worker to the driver: a Ray
actor call returning a finding's schedule vs a multiprocessing queue carrying it (median
round trip).

Usage: ``python benchmarks/scale.py [--json] [--steps-per-worker N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cowenv.campaign import CampaignConfig, run_campaign

FLAWS = ["fault-asserts-write-lock", "walker-skips-break", "read-fault-fills-shared"]
ENV = {"geometry": "small", "terminate_on_violation": False, "variant": "cowpte",
       "flaws": FLAWS}
GOAL = 0.9


class _Timed:
    """A backend whose message queue notes when each worker first reports progress."""

    def __init__(self, be: Any) -> None:
        self.be, self.first = be, {}

    def __getattr__(self, k: str) -> Any:
        return getattr(self.be, k)

    def queue(self) -> Any:
        q, first = self.be.queue(), self.first
        get = q.get

        def timed_get(*a: Any, **k: Any) -> Any:
            m = get(*a, **k)
            if m[0] in ("progress", "done") and m[1] not in first:
                first[m[1]] = (time.perf_counter(), m[2])
            return m

        q.get = timed_get
        return q


def campaign(backend: Any, workers: int, steps_per_worker: int, seed: int) -> dict:
    cfg = CampaignConfig(agent="random", seed=seed, workers=workers,
                         budget=steps_per_worker * workers, env_kwargs=dict(ENV),
                         minimise=False)
    be = _Timed(backend)
    with tempfile.TemporaryDirectory(prefix="cowenv-scale-") as d:
        t0 = time.perf_counter()
        res = run_campaign(cfg, d, show=False, backend=be)
        t1 = time.perf_counter()
    wall = t1 - t0
    assert not res.errors and res.steps == cfg.budget, res.errors
    # Start-up: until every worker has reported once; steady: the steps after that.
    up = max(t for t, _ in be.first.values()) - t0
    early = sum(s for _, s in be.first.values())
    return {"steps": res.steps, "seconds": wall, "steps_per_s": res.steps / wall,
            "startup_s": up, "steady_steps_per_s": (res.steps - early) / max(1e-9, wall - up),
            "findings": len(res.findings),
            "found": sorted((r["signature"], sorted(r["reports"].items()))
                            for r in res.findings)}


def _echo(q_in: Any, q_out: Any) -> None:
    while True:
        x = q_in.get()
        if x is None:
            return
        q_out.put(x)


class Echo:
    def echo(self, x: Any) -> Any:
        return x


def per_finding_overhead(ray: Any, payload: dict, n: int = 200) -> dict:
    """Median round trip of a finding-sized message: Ray actor call vs mp queues."""
    size = len(json.dumps(payload))
    actor = ray.remote(num_cpus=0)(Echo).remote()
    ray.get(actor.echo.remote(payload))
    rt = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(actor.echo.remote(payload))
        rt.append(time.perf_counter() - t0)
    ray.kill(actor)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_echo, args=(q_in, q_out), daemon=True)
    p.start()
    q_in.put(payload)
    q_out.get()
    mq = []
    for _ in range(n):
        t0 = time.perf_counter()
        q_in.put(payload)
        q_out.get()
        mq.append(time.perf_counter() - t0)
    q_in.put(None)
    p.join(5)
    return {"payload_bytes_json": size, "ray_actor_call_ms": statistics.median(rt) * 1e3,
            "mp_queue_ms": statistics.median(mq) * 1e3,
            "ray_extra_ms_per_finding": (statistics.median(rt) - statistics.median(mq)) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps-per-worker", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try:
        import ray
    except ImportError:
        sys.exit("benchmarks/scale.py needs Ray: pip install 'cowenv[ray]'")
    from cowenv.campaign import LocalBackend
    from cowenv.ray_backend import RayBackend

    cpus = os.cpu_count() or 1
    runs: dict[str, list[dict]] = {}
    inits: list[float] = []

    def ray_backend() -> Any:
        # What `cowenv fuzz --backend ray` does: a fresh local instance per campaign (its
        # start is timed apart: a cluster is up before a campaign joins it).
        t0 = time.perf_counter()
        rb = RayBackend(num_cpus=max(2, cpus), include_dashboard=False, log_to_driver=False)
        rb.__enter__()
        inits.append(time.perf_counter() - t0)
        return rb

    # Ray prints node trouble on stdout: keep stdout for the result.
    with contextlib.redirect_stdout(sys.stderr):
        for _ in range(a.rounds):
            for workers in (1, 2):
                for name in ("local", "ray"):
                    be = LocalBackend() if name == "local" else ray_backend()
                    try:
                        r = campaign(be, workers, a.steps_per_worker, a.seed)
                    finally:
                        if name == "ray":
                            be.__exit__(None, None, None)
                    runs.setdefault(f"{name}-{workers}", []).append(r)
                    print(f"  {name:5} {workers} worker(s): {r['steps_per_s']:8,.0f} "
                          f"steps/s ({r['seconds']:.1f}s, start-up {r['startup_s']:.1f}s, "
                          f"then {r['steady_steps_per_s']:,.0f} steps/s; "
                          f"{r['findings']} findings)", file=sys.stderr)
        rb = ray_backend()
        try:
            overhead = per_finding_overhead(ray, _payload(a.seed))
        finally:
            rb.__exit__(None, None, None)
    best = {k: max(v, key=lambda r: r["steps_per_s"]) for k, v in runs.items()}
    for k, v in runs.items():  # same findings (every worker's first report), any backend
        for r in v:
            assert r["found"] == runs[f"local-{k[-1]}"][0]["found"], k
    rate = {k: v["steps_per_s"] for k, v in best.items()}
    # Rate after start-up, median over the rounds (start-up reported on its own).
    steady = {k: statistics.median(r["steady_steps_per_s"] for r in v) for k, v in runs.items()}
    out = {
        "cpus": cpus, "steps_per_worker": a.steps_per_worker, "rounds": a.rounds,
        "steps_per_s": rate,
        "all_runs_steps_per_s": {k: [round(r["steps_per_s"]) for r in v]
                                 for k, v in runs.items()},
        "startup_s": {k: round(statistics.median(r["startup_s"] for r in v), 2)
                      for k, v in runs.items()},
        "steady_steps_per_s_median": {k: round(v) for k, v in steady.items()},
        "load_average_1min": os.getloadavg()[0],
        "ray_local_instance_start_s_median": round(statistics.median(inits), 2),
        "parallel_efficiency": {b: rate[f"{b}-2"] / (2 * rate[f"{b}-1"])
                                for b in ("local", "ray")},
        "ray_vs_local": {str(w): rate[f"ray-{w}"] / rate[f"local-{w}"] for w in (1, 2)},
        "ray_vs_local_steady": {str(w): steady[f"ray-{w}"] / steady[f"local-{w}"]
                                for w in (1, 2)},
        "goal_ray_2_workers_vs_local": GOAL,
        "goal_met": rate["ray-2"] / rate["local-2"] >= GOAL,
        "findings_per_run": best["local-2"]["findings"],
        "per_finding": overhead,
    }
    if a.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return
    print(f"{'backend':8} {'1 worker':>12} {'2 workers':>12} {'efficiency':>11}")
    for b in ("local", "ray"):
        print(f"{b:8} {rate[f'{b}-1']:10,.0f}/s {rate[f'{b}-2']:10,.0f}/s "
              f"{out['parallel_efficiency'][b]:10.2f}")
    print("start-up (s, median): "
          + ", ".join(f"{k} {v}" for k, v in out["startup_s"].items()))
    print("after start-up (steps/s, median): "
          + ", ".join(f"{k} {v:,}" for k, v in out["steady_steps_per_s_median"].items())
          + f"; ray / local: 1 worker {out['ray_vs_local_steady']['1']:.2f}, "
          f"2 workers {out['ray_vs_local_steady']['2']:.2f}")
    print(f"ray / local: 1 worker {out['ray_vs_local']['1']:.2f}, 2 workers "
          f"{out['ray_vs_local']['2']:.2f} (goal >= {GOAL}: "
          f"{'met' if out['goal_met'] else 'NOT met'})")
    o = overhead
    print(f"per finding ({o['payload_bytes_json']:,} B schedule): Ray actor call "
          f"{o['ray_actor_call_ms']:.2f} ms, mp queue {o['mp_queue_ms']:.2f} ms "
          f"(Ray extra {o['ray_extra_ms_per_finding']:.2f} ms)")


def _payload(seed: int) -> dict:
    import yaml

    cfg = CampaignConfig(agent="random", seed=seed, workers=1, budget=5000,
                         env_kwargs=dict(ENV), minimise=False)
    with tempfile.TemporaryDirectory(prefix="cowenv-scale-") as d:
        res = run_campaign(cfg, d, show=False)
        return yaml.safe_load(Path(res.findings[0]["file"]).read_text())


if __name__ == "__main__":
    main()
