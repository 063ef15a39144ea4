"""Record the refactor-proof corpus: schedules and env episodes with their hashes.

The corpus pins the behaviour of the simulation core and of the Gymnasium adapter so
that a refactor can prove it is one: ``tests/test_corpus.py`` replays every entry and
compares hashes. Regenerate it only when behaviour is *meant* to change (and say so in
the commit)::

    .venv/bin/python tests/corpus/make_corpus.py            # writes corpus.json.gz

Kernel entries: random legal schedules (``cowenv.workload.run_random_schedule`` plus
``teardown``) over every preset (classic, as-posted, fixed), the geometries
(4, 8 and 512 entries per table), both fault modes, split PTLs on and off; every
operation of ``cowenv.kernel.ops.OPS`` is started somewhere. Each entry keeps the config,
the steps, the trace hash, the final step number and the violation signatures.

Env entries: seeded episodes of ``cowenv/CowPteSmall-v0`` and ``cowenv/CowPte-v0`` on every
preset with random legal actions; each keeps the actions and one SHA-256 over every
observation, reward, termination flag and the kernel's trace hash.

Scenario entries: every file under ``scenarios/`` with its trace hash.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus.json.gz"

PRESETS = ("classic", "as-posted", "fixed")
GEOMETRIES = (4, 8, 512)
FAULT_MODES = ("mmap_lock", "vma_lock")


def kernel_entry(seed: int, preset: str, ptrs: int, fault_mode: str, split_ptl: bool,
                 nr_steps: int) -> dict[str, Any]:
    """Run one recorded random schedule and return its corpus entry."""
    from cowenv.kernel import make_kernel
    from cowenv.kernel.config import KernelConfig
    from cowenv.workload import Layout, run_random_schedule, teardown

    rng = np.random.default_rng(seed)
    nr_frames = int(rng.choice([64, 128, 256])) if ptrs < 64 else 2048
    cfg = KernelConfig.from_preset(
        preset, ptrs_per_pte=ptrs, fault_mode=fault_mode, split_ptl=split_ptl,
        nr_frames=nr_frames, nr_swap_slots=int(rng.choice([8, 32, 128])),
        max_threads=6, max_processes=4)
    layout = Layout(nr_pages=48 if ptrs < 64 else 2 * ptrs + 32,
                    max_len_pages=24 if ptrs < 64 else ptrs + 16)
    k = make_kernel(cfg, trace=True)
    steps = run_random_schedule(k, rng, nr_steps, layout)
    steps += teardown(k, rng)
    return {"kind": "kernel", "seed": seed, "config": cfg.to_dict(), "steps": steps,
            **kernel_outcome(k)}


def kernel_outcome(k: Any) -> dict[str, Any]:
    """The hashed outcome of a kernel run (shared with the replaying test)."""
    from cowenv.kernel.trace import trace_hash

    return {"trace_hash": trace_hash(k.events), "step_no": int(k.step_no),
            "signatures": [v.signature for v in k.violations],
            "defects": len(k.defects)}


def env_digest(env: Any, seed: int, actions: list[int]) -> tuple[str, str]:
    """Reset ``env`` with ``seed``, apply ``actions``; return (episode digest, trace hash)."""
    from cowenv.kernel.trace import trace_hash

    h = hashlib.sha256()
    obs, _ = env.reset(seed=seed)
    h.update(np.ascontiguousarray(obs).tobytes())
    for a in actions:
        obs, r, term, trunc, _ = env.step(int(a))
        h.update(np.ascontiguousarray(obs).tobytes())
        h.update(repr((float(r), bool(term), bool(trunc))).encode())
        if term or trunc:
            obs, _ = env.reset(seed=seed + 1)
            h.update(np.ascontiguousarray(obs).tobytes())
    h.update(env.unwrapped.action_masks().tobytes())
    return h.hexdigest(), trace_hash(env.unwrapped.kernel.events)


def env_entry(env_id: str, preset: str, seed: int, n: int) -> dict[str, Any]:
    """Record one env episode of ``n`` random legal actions."""
    import gymnasium as gym

    import cowenv  # noqa: F401  (registers the env ids)

    env = gym.make(env_id, preset=preset, terminate_on_violation=False)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    actions: list[int] = []
    for _ in range(n):
        legal = np.flatnonzero(env.unwrapped.action_masks())
        a = int(legal[int(rng.integers(len(legal)))]) if rng.random() < 0.97 \
            else int(rng.integers(env.action_space.n))  # some illegal ones too
        actions.append(a)
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset(seed=seed + 1)
    digest, th = env_digest(env, seed, actions)
    env.close()
    return {"kind": "env", "env_id": env_id, "preset": preset, "seed": seed,
            "actions": actions, "digest": digest, "trace_hash": th}


def scenario_entries() -> list[dict[str, Any]]:
    """Trace hash of every scenario file under ``scenarios/``."""
    from cowenv.kernel.trace import trace_hash
    from cowenv.replay import execute
    from cowenv.scenario import load_scenario

    out = []
    for p in sorted((ROOT / "scenarios").rglob("*.yaml")):
        sc = load_scenario(p)
        ex = execute(sc.config, sc.steps, trace=True)
        out.append({"kind": "scenario", "path": str(p.relative_to(ROOT)),
                    "trace_hash": trace_hash(ex.kernel.events),
                    "step_no": int(ex.kernel.step_no)})
    return out


def build() -> list[dict[str, Any]]:
    """Build every corpus entry (deterministic)."""
    entries: list[dict[str, Any]] = []
    seed = 1000
    for preset in PRESETS:
        for ptrs in GEOMETRIES:
            for fm in FAULT_MODES:
                reps = 36 if ptrs < 64 else 16
                for r in range(reps):
                    entries.append(kernel_entry(seed, preset, ptrs, fm, r % 4 != 3,
                                                120 if ptrs < 64 else 80))
                    seed += 1
    for env_id, n in (("cowenv/CowPteSmall-v0", 600), ("cowenv/CowPte-v0", 300)):
        for preset in PRESETS:
            for s in range(6):
                entries.append(env_entry(env_id, preset, 7000 + s, n))
    entries += scenario_entries()
    return entries


def main() -> int:
    """Write ``corpus.json.gz``."""
    entries = build()
    data = json.dumps({"version": 1, "entries": entries}, sort_keys=True,
                      separators=(",", ":")).encode()
    tmp = CORPUS.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write(data)
    tmp.replace(CORPUS)
    kinds: dict[str, int] = {}
    for e in entries:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    print(f"{CORPUS.relative_to(ROOT)}: {kinds}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
