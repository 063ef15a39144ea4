"""Env and harness steps per second with random legal actions, side by side with CartPole-v1.

    .venv/bin/python benchmarks/env_throughput.py [--seconds 2] [--rounds 3] [--json]

Measures, in one run and one process:

* ``CartPole-v1`` (``gymnasium.make``) with random actions (``action_space.sample()``);
* ``cowenv/CowPteSmall-v0`` (8 entries per table) and ``cowenv/CowPte-v0`` (the default:
  x86-64 geometry, as-posted), each made with ``gymnasium.make`` and driven by a uniform
  random choice among the legal actions (``legal_actions()``: the legal entries of
  ``action_masks()``, memoised with the mask), resetting at episode end;
* for each cowenv id, the *harness path*: the same random legal actions on
  :class:`cowenv.harness.Harness` with the same settings (oracles on, trace on, reward
  and schedule recording as in the env) but no observation: what a campaign with an
  agent that reads no observation (random, PCT, Q-learning) runs;
* for each cowenv id, the *kernel share*: the same episodes' schedules replayed on the bare
  kernel (``cowenv.scenario.apply_step``, no env), as a fraction of the env's time. The
  rest is the env's own cost (observation, mask, reward, info);
* for each cowenv id, a per-step budget: the microseconds one step may take at the target
  ratio, against what the parts of a step take — the random legal choice (``choice``),
  ``reset`` spread over the episode, the kernel replaying the episodes' actions (workload
  excluded) with its oracles and trace (``kernel``) and with neither (``kernel floor``,
  ``make_kernel(config, oracles=False, trace=False)``), and the env's own share (the rest);
* the TLB model's share of a step: the same schedules replayed on the bare kernel with
  ``KernelConfig.tlb`` on and off (schedules that do not replay without it are left out).

Measurements are interleaved in rounds (CartPole, small, default, CartPole, …) and the
medians reported, so that a busy machine affects all three alike. Prints steps/s and the
ratio to CartPole (env targets: >= 0.25x on the small preset; harness path: >= 0.4x on
the small preset).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from typing import Any

import gymnasium as gym
import numpy as np

import cowenv  # noqa: F401  (registers the ids)
from cowenv.harness import Harness
from cowenv.kernel import make_kernel
from cowenv.scenario import StepError, apply_step, parse_scenario

#: Target ratios to CartPole-v1: (env, harness path); None = no target.
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "cowenv/CowPteSmall-v0": (0.25, 0.4), "cowenv/CowPte-v0": (None, None)}


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


def _replay(scs: list, n_workload: int, tlb: bool | None = None,
            **kernel_kw: Any) -> tuple[float, float]:
    """Replay scenarios on the bare kernel; return (seconds for all steps, for actions).

    ``tlb`` overrides the config's TLB model (``KernelConfig.tlb``).
    """
    t_all = t_act = 0.0
    for sc in scs:
        cfg = sc.config if tlb is None else dataclasses.replace(sc.config, tlb=tlb)
        k = make_kernel(cfg, **kernel_kw)
        names: dict = {}
        pending: dict = {}
        t0 = time.perf_counter()
        for i, st in enumerate(sc.steps[:n_workload]):
            apply_step(k, st, names, pending, i)
        t1 = time.perf_counter()
        for i, st in enumerate(sc.steps[n_workload:], n_workload):
            apply_step(k, st, names, pending, i)
        t2 = time.perf_counter()
        t_all += t2 - t0
        t_act += t2 - t1
    return t_all, t_act


def bench_harness(env_id: str, seconds: float, seed: int) -> dict:
    """Random legal actions on the harness alone (no observation), resetting at episode end."""
    h = Harness(**gym.spec(env_id).kwargs)
    rng = np.random.default_rng(seed)
    h.reset(seed)
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(200):
            legal = h.legal  # == np.flatnonzero(h.mask), memoised with the mask
            st = h.step(int(legal[rng.integers(len(legal))]))
            n += 1
            if st.terminated or st.truncated:
                h.reset(seed)
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    return {"steps": n, "seconds": dt, "steps_per_s": n / dt}


def bench_cowenv(env_id: str, seconds: float, seed: int) -> dict:
    env = gym.make(env_id)
    u = env.unwrapped
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    n = episodes = violations = 0
    schedules = []
    masks = []
    t0 = time.perf_counter()
    t_sched = t_reset = 0.0
    while True:
        if len(masks) < 256:  # mid-episode legal actions, for timing the choice alone
            masks.append(u.legal_actions())
        for _ in range(200):
            legal = u.legal_actions()  # == np.flatnonzero(u.action_masks()), memoised
            _, _, term, trunc, info = env.step(int(legal[rng.integers(len(legal))]))
            n += 1
            if info["violation"] is not None:
                violations += 1
            if term or trunc:
                ts = time.perf_counter()
                if len(schedules) < 64:
                    schedules.append(u.get_schedule())
                tr = time.perf_counter()
                t_sched += tr - ts
                episodes += 1
                env.reset()
                t_reset += time.perf_counter() - tr
        dt = time.perf_counter() - t0 - t_sched
        if dt >= seconds:
            break
    env_rate = n / dt
    if not schedules:  # a very short run: time the episode in progress
        schedules.append(u.get_schedule())
    # Kernel share: replay whole recorded episodes (workload included, as reset runs it)
    # on the bare kernel; the budget split replays only the actions.
    env_steps = sum(s["recorded"]["actions"] for s in schedules)
    scs = [parse_scenario(copy.deepcopy(s)) for s in schedules]
    n_wl = len(u.workload)
    t_kernel, t_act = _replay(scs, n_wl)
    _, t_floor = _replay(scs, n_wl, oracles=False, trace=False)
    # TLB share: the schedules that replay to the same length with the TLB model off
    # (a schedule may take another path without it), timed with it on and off, in pairs.
    t_on = t_off = 0.0
    for sc in scs:
        try:
            on = _replay([sc], n_wl, tlb=True)[1]
            off = _replay([sc], n_wl, tlb=False)[1]
        except StepError:
            continue
        t_on += on
        t_off += off
    # Harness: the random legal choice alone, on masks the episodes produced.
    reps = max(1, 20_000 // max(1, len(masks)))
    th = time.perf_counter()
    for _ in range(reps):
        for legal in masks:
            int(legal[rng.integers(len(legal))])
    t_harness = (time.perf_counter() - th) / max(1, reps * len(masks))
    us = 1e6 / env_steps if env_steps else float("nan")
    parts = {"step": 1e6 / env_rate, "choice": t_harness * 1e6,
             "reset": t_reset / n * 1e6, "kernel": t_act * us, "kernel_floor": t_floor * us}
    parts["env"] = parts["step"] - parts["choice"] - parts["reset"] - parts["kernel"]
    # The TLB's share of an env step: (kernel with TLB - kernel without) per step.
    parts["tlb"] = (t_on - t_off) * us
    kernel_share = (t_kernel / env_steps) * env_rate if env_steps else float("nan")
    return {"env": env_id, "steps": n, "seconds": dt, "steps_per_s": env_rate,
            "episodes": episodes, "violations": violations,
            "actions": int(u.action_space.n), "obs_dim": int(u.observation_space.shape[0]),
            "kernel_share": kernel_share, "us_per_step": parts,
            "tlb_share": parts["tlb"] / parts["step"],
            "tlb_kernel_ratio": t_on / t_off if t_off else float("nan")}


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
            row = bench_cowenv(env_id, a.seconds, a.seed + r)
            row["harness"] = bench_harness(env_id, a.seconds, a.seed + r)
            runs[env_id].append(row)
    cp_rate = float(np.median([c["steps_per_s"] for c in cps]))
    cp = {"env": "CartPole-v1", "steps_per_s": cp_rate,
          "rounds": [c["steps_per_s"] for c in cps]}
    rows = []
    for env_id, rs in runs.items():
        ratios = [x["steps_per_s"] / c["steps_per_s"] for x, c in zip(rs, cps, strict=True)]
        h_ratios = [x["harness"]["steps_per_s"] / c["steps_per_s"]
                    for x, c in zip(rs, cps, strict=True)]
        env_target, h_target = TARGETS[env_id]
        row = {"env": env_id,
               "steps_per_s": float(np.median([x["steps_per_s"] for x in rs])),
               "ratio_to_cartpole": float(np.median(ratios)),
               "kernel_share": float(np.median([x["kernel_share"] for x in rs])),
               "tlb_share": float(np.median([x["tlb_share"] for x in rs])),
               "tlb_kernel_ratio": float(np.median([x["tlb_kernel_ratio"] for x in rs])),
               "episodes": sum(x["episodes"] for x in rs),
               "violations": sum(x["violations"] for x in rs),
               "actions": rs[0]["actions"], "obs_dim": rs[0]["obs_dim"],
               "rounds": [x["steps_per_s"] for x in rs], "round_ratios": ratios,
               "target_ratio": env_target,
               "harness_steps_per_s": float(np.median([x["harness"]["steps_per_s"]
                                                       for x in rs])),
               "harness_ratio_to_cartpole": float(np.median(h_ratios)),
               "harness_round_ratios": h_ratios,
               "harness_target_ratio": h_target}
        row["meets_target"] = (env_target is None or row["ratio_to_cartpole"] >= env_target) \
            and (h_target is None or row["harness_ratio_to_cartpole"] >= h_target)
        row["us_per_step"] = {key: float(np.median([x["us_per_step"][key] for x in rs]))
                              for key in rs[0]["us_per_step"]}
        row["us_per_step"]["budget"] = 1e6 / ((env_target or 0.25) * cp_rate)
        rows.append(row)
    out = {"cartpole": cp, "cowenv": rows, "python": sys.version.split()[0],
           "machine": platform.machine(), "seconds": a.seconds, "rounds": a.rounds,
           "seed": a.seed}
    if a.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    def tgt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    def met(x: float, t: float | None) -> str:
        return "-" if t is None else ("yes" if x >= t else "NO")

    def per_round(xs: list[float]) -> str:
        return " ".join(f"{x:.3f}" for x in xs)

    print(f"{'path':<34} {'steps/s':>10} {'x CartPole':>11} {'target':>7} {'met':>4} "
          f"{'kernel share':>13} {'episodes':>9} {'violations':>10}  x CartPole per round")
    print(f"{'CartPole-v1':<34} {cp['steps_per_s']:>10.0f} {1.0:>11.3f}")
    for r in rows:
        print(f"{r['env'] + ' (env)':<34} {r['steps_per_s']:>10.0f} "
              f"{r['ratio_to_cartpole']:>11.3f} {tgt(r['target_ratio']):>7} "
              f"{met(r['ratio_to_cartpole'], r['target_ratio']):>4} "
              f"{r['kernel_share']:>13.2f} {r['episodes']:>9} {r['violations']:>10}  "
              f"{per_round(r['round_ratios'])}")
        print(f"{r['env'] + ' (harness)':<34} {r['harness_steps_per_s']:>10.0f} "
              f"{r['harness_ratio_to_cartpole']:>11.3f} {tgt(r['harness_target_ratio']):>7} "
              f"{met(r['harness_ratio_to_cartpole'], r['harness_target_ratio']):>4} "
              f"{'':>13} {'':>9} {'':>10}  {per_round(r['harness_round_ratios'])}")
    print(f"(x CartPole: the path's steps/s over CartPole-v1's in the same round; medians of "
          f"{a.rounds} interleaved rounds of {a.seconds:g} s each)")
    print()
    print("env microseconds per step: the budget at the env target against the parts")
    print(f"{'env':<24} {'budget':>7} {'step':>7} {'choice':>8} {'reset':>7} "
          f"{'kernel':>7} {'env':>7} {'kernel floor':>13} {'tlb':>6} {'tlb share':>10} "
          f"{'kernel on/off':>14}")
    for r in rows:
        p = r["us_per_step"]
        print(f"{r['env']:<24} {p['budget']:>7.1f} {p['step']:>7.1f} {p['choice']:>8.1f} "
              f"{p['reset']:>7.1f} {p['kernel']:>7.1f} {p['env']:>7.1f} "
              f"{p['kernel_floor']:>13.1f} {p['tlb']:>6.1f} {r['tlb_share']:>10.3f} "
              f"{r['tlb_kernel_ratio']:>14.3f}")
    print("(kernel: the episodes' actions replayed on the bare kernel with oracles and trace;"
          " kernel floor: with neither; tlb: what the TLB model adds to a step, from the"
          " same schedules replayed with KernelConfig.tlb on and off; tlb share: that over"
          " the env step; kernel on/off: the kernel's time ratio)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
