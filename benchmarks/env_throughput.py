"""Env steps per second with random legal actions, side by side with CartPole-v1.

    .venv/bin/python benchmarks/env_throughput.py [--seconds 2] [--rounds 3] [--json]

Measures, in one run and one process:

* ``CartPole-v1`` (``gymnasium.make``) with random actions (``action_space.sample()``);
* ``cowenv/CowPteSmall-v0`` (8 entries per table) and ``cowenv/CowPte-v0`` (the default:
  x86-64 geometry, as-posted), each made with ``gymnasium.make`` and driven by a uniform
  random choice among the legal actions (``action_masks()``), resetting at episode end;
* for each cowenv id, the *kernel share*: the same episodes' schedules replayed on the bare
  kernel (``cowenv.scenario.apply_step``, no env), as a fraction of the env's time. The
  rest is the env's own cost (observation, mask, reward, info).

Measurements are interleaved in rounds (CartPole, small, default, CartPole, …) and the
medians reported, so that a busy machine affects all three alike. Prints steps/s and the
ratio to CartPole (targets: >= 0.5x on the small preset, >= 0.25x on the default).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import gymnasium as gym
import numpy as np

import cowenv  # noqa: F401  (registers the ids)
from cowenv.kernel.kernel import make_kernel
from cowenv.scenario import apply_step, parse_scenario

TARGETS = {"cowenv/CowPteSmall-v0": 0.5, "cowenv/CowPte-v0": 0.25}


def bench_cartpole(seconds: float, seed: int) -> dict:
    env = gym.make("CartPole-v1")
    env.reset(seed=seed)
    env.action_space.seed(seed)
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(500):
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            n += 1
            if term or trunc:
                env.reset()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    return {"env": "CartPole-v1", "steps": n, "seconds": dt, "steps_per_s": n / dt}


def bench_cowenv(env_id: str, seconds: float, seed: int) -> dict:
    env = gym.make(env_id)
    u = env.unwrapped
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    n = episodes = violations = 0
    schedules = []
    t0 = time.perf_counter()
    t_sched = 0.0
    while True:
        for _ in range(200):
            legal = np.flatnonzero(u.action_masks())
            _, _, term, trunc, info = env.step(int(legal[rng.integers(len(legal))]))
            n += 1
            if info["violation"] is not None:
                violations += 1
            if term or trunc:
                ts = time.perf_counter()
                if len(schedules) < 64:
                    schedules.append(u.get_schedule())
                t_sched += time.perf_counter() - ts
                episodes += 1
                env.reset()
        dt = time.perf_counter() - t0 - t_sched
        if dt >= seconds:
            break
    # Kernel share: replay whole recorded episodes on the bare kernel.
    env_steps = sum(s["recorded"]["actions"] for s in schedules)
    scs = [parse_scenario(copy.deepcopy(s)) for s in schedules]
    t1 = time.perf_counter()
    for sc in scs:
        k = make_kernel(sc.config)
        names: dict = {}
        pending: dict = {}
        for i, st in enumerate(sc.steps):
            apply_step(k, st, names, pending, i)
    t_kernel = time.perf_counter() - t1
    env_rate = n / dt
    kernel_share = (t_kernel / env_steps) * env_rate if env_steps else float("nan")
    return {"env": env_id, "steps": n, "seconds": dt, "steps_per_s": env_rate,
            "episodes": episodes, "violations": violations,
            "actions": int(u.action_space.n), "obs_dim": int(u.observation_space.shape[0]),
            "kernel_share": kernel_share}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds (CartPole, small, default); medians reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    cps: list[dict] = []
    runs: dict[str, list[dict]] = {env_id: [] for env_id in TARGETS}
    for r in range(a.rounds):
        cps.append(bench_cartpole(a.seconds, a.seed + r))
        for env_id in TARGETS:
            runs[env_id].append(bench_cowenv(env_id, a.seconds, a.seed + r))
    cp_rate = float(np.median([c["steps_per_s"] for c in cps]))
    cp = {"env": "CartPole-v1", "steps_per_s": cp_rate,
          "rounds": [c["steps_per_s"] for c in cps]}
    rows = []
    for env_id, rs in runs.items():
        ratios = [x["steps_per_s"] / c["steps_per_s"] for x, c in zip(rs, cps, strict=True)]
        row = {"env": env_id,
               "steps_per_s": float(np.median([x["steps_per_s"] for x in rs])),
               "ratio_to_cartpole": float(np.median(ratios)),
               "kernel_share": float(np.median([x["kernel_share"] for x in rs])),
               "episodes": sum(x["episodes"] for x in rs),
               "violations": sum(x["violations"] for x in rs),
               "actions": rs[0]["actions"], "obs_dim": rs[0]["obs_dim"],
               "rounds": [x["steps_per_s"] for x in rs], "round_ratios": ratios,
               "target_ratio": TARGETS[env_id]}
        row["meets_target"] = row["ratio_to_cartpole"] >= row["target_ratio"]
        rows.append(row)
    out = {"cartpole": cp, "cowenv": rows, "python": sys.version.split()[0],
           "machine": platform.machine(), "seconds": a.seconds, "rounds": a.rounds,
           "seed": a.seed}
    if a.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    print(f"{'env':<24} {'steps/s':>10} {'x CartPole':>11} {'target':>7} "
          f"{'kernel share':>13} {'episodes':>9} {'violations':>10}")
    print(f"{'CartPole-v1':<24} {cp['steps_per_s']:>10.0f} {1.0:>11.3f}")
    for r in rows:
        print(f"{r['env']:<24} {r['steps_per_s']:>10.0f} {r['ratio_to_cartpole']:>11.3f} "
              f"{r['target_ratio']:>7.2f} {r['kernel_share']:>13.2f} {r['episodes']:>9} "
              f"{r['violations']:>10}")
    print(f"(medians of {a.rounds} interleaved rounds of {a.seconds:g} s each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
