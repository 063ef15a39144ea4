"""CPU time per step of CartPole-v1, the harness path and the env, in one process.

    .venv/bin/python benchmarks/throughput_cpu.py [--env-id cowenv/CowPteSmall-v0]
        [--steps 10000] [--rounds 3]

The same loops as ``benchmarks/env_throughput.py`` (random legal actions through
``legal_actions()``, resetting at episode end; CartPole with ``action_space.sample()``),
timed with ``time.process_time`` instead of the wall clock, so that a shared machine's
load (other processes taking the CPU) does not count against a path. Rounds are
interleaved (CartPole, harness, env, CartPole, ...); prints one JSON line with the
medians: microseconds of CPU per step and the ratios to CartPole (CartPole's time per
step over the path's, per round, then the median).

To compare two trees side by side, run this file alternately with each tree on
``PYTHONPATH``, e.g. ``for t in OLD NEW OLD NEW; do PYTHONPATH=$t python
benchmarks/throughput_cpu.py; done``. A tree without ``legal_actions()`` gets
``np.flatnonzero`` of the mask instead (as the benchmarks did before it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

import cowenv  # noqa: F401  (registers the ids)
from cowenv.harness import Harness


def _legal_fn(obj: Any, mask: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """``obj.legal_actions``, or ``np.flatnonzero`` of ``mask()`` on an older tree."""
    f = getattr(obj, "legal_actions", None)
    return f if f is not None else lambda: np.flatnonzero(mask())


def run_harness(h: Harness, n: int, seed: int) -> float:
    """CPU microseconds per harness step over ``n`` random legal actions."""
    rng = np.random.default_rng(seed)
    h.reset(seed)
    legal_actions = _legal_fn(h, lambda: h.mask)
    t = time.process_time()
    for _ in range(n):
        legal = legal_actions()
        st = h.step(int(legal[rng.integers(len(legal))]))
        if st.terminated or st.truncated:
            h.reset(seed)
    return (time.process_time() - t) / n * 1e6


def run_env(env: gym.Env, n: int, seed: int) -> float:
    """CPU microseconds per env step over ``n`` random legal actions."""
    u = env.unwrapped
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    legal_actions = _legal_fn(u, u.action_masks)
    t = time.process_time()
    for _ in range(n):
        legal = legal_actions()
        _, _, term, trunc, _ = env.step(int(legal[rng.integers(len(legal))]))
        if term or trunc:
            env.reset()
    return (time.process_time() - t) / n * 1e6


def run_cartpole(env: gym.Env, n: int, seed: int) -> float:
    """CPU microseconds per CartPole-v1 step (random actions)."""
    env.reset(seed=seed)
    env.action_space.seed(seed)
    t = time.process_time()
    for _ in range(n):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    return (time.process_time() - t) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env-id", default="cowenv/CowPteSmall-v0")
    ap.add_argument("--steps", type=int, default=10000, help="cowenv steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    h = Harness(**gym.spec(a.env_id).kwargs)
    env = gym.make(a.env_id)
    cp = gym.make("CartPole-v1")
    rs: dict[str, list[float]] = {"cartpole": [], "harness": [], "env": []}
    for r in range(a.rounds):
        rs["cartpole"].append(run_cartpole(cp, 3 * a.steps, a.seed + r))
        rs["harness"].append(run_harness(h, a.steps, a.seed + r))
        rs["env"].append(run_env(env, a.steps, a.seed + r))
    out = {"env_id": a.env_id, "steps": a.steps, "rounds": a.rounds}
    for key, v in rs.items():
        out[f"{key}_us"] = round(float(np.median(v)), 2)
    for key in ("harness", "env"):
        out[f"{key}_x_cartpole"] = round(float(np.median(
            [c / x for c, x in zip(rs["cartpole"], rs[key], strict=True)])), 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
