"""Cost per env step of evaluating a trained PPO agent: numpy actor vs torch modules.

    .venv/bin/python benchmarks/ppo_eval_cost.py [--model PATH] [--flaw F] [--episodes N]
        [--repeats R] [--json]

Plays the same episodes (``cowenv_agents.episode_rng(1, flaw index, e)``, the
bug-finding benchmark's env of ``--flaw``, teardown 32) with ``random``, ``ppo`` with
``backend="torch"`` and ``ppo`` with ``backend="numpy"``, in one process, side by side,
``--repeats`` times, and reports CPU seconds (``time.process_time``) per env step: the
best of the repeats, so that other load on the machine inflates it least. It also checks
that both PPO backends play the same schedules (sampling mode; the logits agree to float32
rounding, so a different action would need a draw within that distance of a boundary).

Without ``--model`` a model is trained for 2,048 steps on the flaws of the other
held-out groups (``bug_finding.train_fold``, group of ``--flaw``) into a temporary
folder: the cost per step does not depend on how well the policy is trained, only on its
architecture (the default 256x256 MLP) and on the episodes the actions make.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bug_finding as bf  # noqa: E402


def measure(model: str, flaw: str, episodes: int, repeats: int) -> dict[str, Any]:
    """CPU seconds per env step for each agent (best of ``repeats``), schedules compared."""
    import cowenv_agents as ca

    from cowenv.env import CowEnv
    from cowenv.kernel.config import FLAW_IDS

    fi = FLAW_IDS.index(flaw)
    env = CowEnv(**bf.env_kwargs(flaw))
    agents = {"random": ("random", {}), "ppo-torch": ("ppo", {"backend": "torch"}),
              "ppo-numpy": ("ppo", {"backend": "numpy"})}
    best: dict[str, float] = {}
    steps: dict[str, int] = {}
    schedules: dict[str, list[tuple[int, ...]]] = {}
    for _ in range(repeats):
        for label, (name, kw) in agents.items():
            ag = ca.make_agent(name, model=model if name == "ppo" else None, **kw)
            sched: list[tuple[int, ...]] = []
            n = 0
            t0 = time.process_time()
            for e in range(episodes):
                rng, rs = ca.episode_rng(1, fi, e)
                n += ca.run_episode(env, ag, rng, rs, teardown=bf.TEARDOWN).steps
                sched.append(tuple(env.harness.actions))
            dt = time.process_time() - t0
            best[label] = min(best.get(label, float("inf")), dt / n)
            steps[label] = n
            schedules[label] = sched
    return {"flaw": flaw, "episodes": episodes, "repeats": repeats, "steps": steps,
            "ms_per_step": {k: round(v * 1e3, 4) for k, v in best.items()},
            "torch_over_numpy": round(best["ppo-torch"] / best["ppo-numpy"], 2),
            "same_schedules": schedules["ppo-torch"] == schedules["ppo-numpy"]}


def main(argv: list[str] | None = None) -> int:
    from cowenv.kernel.config import FLAW_IDS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a trained MaskablePPO zip (trusted input)")
    p.add_argument("--flaw", default="gup-fast-fork-race",
                   help="the env (default gup-fast-fork-race: no agent finds it quickly)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per agent (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="repeats, best kept (default 3)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    if a.flaw not in FLAW_IDS:
        p.error(f"--flaw: unknown flaw {a.flaw!r}")
    if a.episodes < 1 or a.repeats < 1:
        p.error("--episodes/--repeats: expected >= 1")
    model = a.model
    if model is not None and not Path(model).is_file():
        p.error(f"--model: no such file: {model}")
    with tempfile.TemporaryDirectory(prefix="cowenv-ppo-cost-") as tmp:
        if model is None:
            k = FLAW_IDS.index(a.flaw) % bf.FOLDS
            train = [f for i, f in enumerate(FLAW_IDS) if i % bf.FOLDS != k]
            model = bf.train_fold(k, train, 2048, 0, tmp)["model"]
        r = measure(model, a.flaw, a.episodes, a.repeats)
    if a.json:
        print(json.dumps(r, sort_keys=True))
    else:
        for k, v in r["ms_per_step"].items():
            print(f"{k:10s} {v:.3f} ms CPU per env step ({r['steps'][k]} steps)")
        print(f"torch / numpy: {r['torch_over_numpy']}x; same schedules: {r['same_schedules']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
