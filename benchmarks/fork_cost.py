"""Fork cost: where COW PTE loses. Classic vs COW PTE v4 (fixed preset, prctl enabled).

Part 1, the sweep: for each mapped size (2 MiB … 1 GiB, x86_64 geometry, populated
private anonymous memory) and post-fork write pattern (none; one byte per 2 MiB region;
random pages, seeded; all pages), fork once (the child stays alive) and let the parent
write. Reported: the fork-attributable simulated cost of each kernel (immediate, inside
fork, + deferred: the COW faults and table breaks it causes), their ratio, and the
closed form of the cost model for the patterns that have one. Costs come from the
kernel's :class:`cowenv.kernel.cost.CostMeter`; nothing reads a clock.

Part 2, the worst case: the analytic worst-case ratio derived from the model's constants
(the brief's pattern: fork, then write one byte in every 2 MiB region, each write paying a
table copy on top of the page copy), and the best ratio that agents find through the
Gymnasium env's ``fork_cost`` objective within a budget, as a fraction of it:

* a random-search agent (stratified random schedules — uniform over operation *kinds*,
  then over templates — followed by mutation of the best schedule found: replay a random
  prefix, continue at random);
* MaskablePPO (sb3-contrib) trained on ``objective_kwargs={"mode": "ratio"}``; the best
  episode seen in training or evaluation counts.

Usage: ``python benchmarks/fork_cost.py [--json] [--markdown] [--quick] [--budget N]
[--ppo-steps N] [--no-ppo] [--out DIR]``

Writes ``<out>/fork_cost.png`` (default ``benchmarks/out``; with ``--quick`` and no
``--out``, a new temporary folder: quick runs never overwrite committed results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cowenv.kernel import cost as C
from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig

SIZES_MIB = (2, 8, 32, 128, 512, 1024)
QUICK_SIZES_MIB = (2, 8, 32)
PATTERNS = ("none", "one-per-2MiB", "random", "all")
#: Fraction of the pages the ``random`` pattern writes (distinct pages, seeded order).
RANDOM_FRACTION = 1 / 8
BASE = 1 << 32
PTRS = 512
PAGE = 4096

# The env the agents search: one populated region of AGENT_TABLES whole tables, COW PTE
# enabled, nothing forked yet (x86_64 geometry).
AGENT_TABLES = 4
AGENT_MAX_STEPS = 48


# ====================================================================== the sweep
def measure(preset: str, mib: int, pattern: str, seed: int = 0) -> dict[str, Any]:
    """Fork a populated ``mib`` MiB mapping, then write ``pattern`` in the parent.

    Returns:
        Immediate / deferred / fork-attributable ns and the number of pages written.

    """
    pages = mib * (1 << 20) // PAGE
    cfg = KernelConfig.from_preset(preset, ptrs_per_pte=PTRS, nr_frames=2 * pages + 4096,
                                   nr_swap_slots=0)
    k = make_kernel(cfg, oracles=False, trace=False)
    assert k.do(1, "mmap", addr=BASE, length=pages * PAGE, populate=True) == BASE
    assert k.do(1, "prctl_cow_pte") == 0
    assert k.do(1, "fork") > 0
    if pattern == "none":
        targets: list[int] = []
    elif pattern == "one-per-2MiB":
        targets = list(range(0, pages, PTRS))
    elif pattern == "random":
        rng = np.random.default_rng(seed)
        n = max(1, int(pages * RANDOM_FRACTION))
        targets = rng.choice(pages, size=n, replace=False).tolist()
    elif pattern == "all":
        targets = list(range(pages))
    else:
        raise ValueError(pattern)
    for p in targets:
        k.do(1, "write", addr=BASE + p * PAGE)
    m = k.cost
    return {"immediate_ns": m.immediate_ns, "deferred_ns": m.deferred_ns,
            "fork_ns": m.fork_attributable_ns, "writes": len(targets),
            "breaks": m.deferred.get("cow_break_fixed", 0)}


def closed_form(variant: str, mib: int, pattern: str) -> float | None:
    """The cost model's closed form for a pattern, or None (random)."""
    n_tables = mib * (1 << 20) // PAGE // PTRS
    writes = {"none": 0, "one-per-2MiB": 1, "all": PTRS}.get(pattern)
    if writes is None:
        return None
    return C.analytic_fork_cost(variant, n_tables, PTRS, writes)


def sweep(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Run every (size, pattern) on both kernels."""
    rows = []
    for mib in sizes:
        for pattern in PATTERNS:
            c = measure("classic", mib, pattern)
            w = measure("fixed", mib, pattern)
            cf_c, cf_w = closed_form("classic", mib, pattern), closed_form("cowpte", mib, pattern)
            rows.append({
                "mib": mib, "pattern": pattern, "writes": c["writes"],
                "classic_ms": c["fork_ns"] / 1e6, "cowpte_ms": w["fork_ns"] / 1e6,
                "classic_immediate_ms": c["immediate_ns"] / 1e6,
                "cowpte_immediate_ms": w["immediate_ns"] / 1e6,
                "classic_deferred_ms": c["deferred_ns"] / 1e6,
                "cowpte_deferred_ms": w["deferred_ns"] / 1e6,
                "table_breaks": w["breaks"],
                "ratio": w["fork_ns"] / c["fork_ns"],
                "closed_form_ratio": None if cf_c is None else cf_w / cf_c,
            })
    return rows


# ====================================================================== agents
def agent_workload() -> list[dict[str, Any]]:
    """The env workload the agents start from."""
    t = PTRS * PAGE
    return [{"tid": 1, "do": "mmap", "args": {"addr": 16 * t, "length": AGENT_TABLES * t,
                                              "populate": True}},
            {"tid": 1, "do": "prctl_cow_pte"}]


def make_env(mode: str = "difference", max_steps: int = AGENT_MAX_STEPS):
    """The fork_cost env the agents search (fixed preset, x86_64 geometry, with the
    sequential twin so that each episode's operations can be judged on their own)."""
    from cowenv.env import CowEnv

    return CowEnv(preset="fixed", geometry="x86_64", workload=agent_workload(),
                  objective="fork_cost", objective_kwargs={"mode": mode, "twin": True},
                  max_threads=2, max_processes=3, max_steps=max_steps)


def score(fc: dict[str, Any]) -> float:
    """An episode's ratio, conservatively: min(as scheduled, operations alone).

    ``ratio`` compares the env's kernel (the agent's interleaving) with the classic
    shadow that ran each operation at its start; an interleaving can make the env's
    kernel pay for an ordering the shadow never saw. ``sequential_ratio`` compares the
    variant and classic on the same start-ordered operations. The minimum can be
    inflated by neither.
    """
    return min(float(fc["ratio"]), float(fc["sequential_ratio"]))


def stratified_action(env, rng: np.random.Generator, p_run: float = 0.5) -> int:
    """A random legal action: run a busy thread with probability ``p_run``, else start an
    operation whose kind is drawn uniformly, then its template. Never fires fail_nth
    (an allocation failure only cuts work short)."""
    legal = np.nonzero(env.action_masks())[0]
    cat = env.catalogue
    runs = [int(a) for a in legal if cat[a].kind == "run"]
    starts: dict[str, list[int]] = {}
    for a in legal:
        s = cat[a]
        if s.kind == "start":
            starts.setdefault(s.op, []).append(int(a))
    if runs and (not starts or rng.random() < p_run):
        return runs[int(rng.integers(len(runs)))]
    if starts:
        ops = sorted(starts)
        acts = starts[ops[int(rng.integers(len(ops)))]]
        return acts[int(rng.integers(len(acts)))]
    return int(legal[int(rng.integers(len(legal)))])


def play(env, rng: np.random.Generator, prefix: list[int], seed: int
         ) -> tuple[float, list[int], dict[str, Any]]:
    """Replay ``prefix`` then act at random until the episode ends.

    Returns:
        ``(ratio, actions, fork_cost)``: the variant/classic fork-attributable ratio at
        the end, the actions taken and the objective's final summary.

    """
    _, info = env.reset(seed=seed)
    actions: list[int] = []
    done = False
    for a in prefix:
        _, _, te, tr, info = env.step(a)
        actions.append(a)
        done = te or tr
        if done:
            break
    while not done:
        a = stratified_action(env, rng)
        _, _, te, tr, info = env.step(a)
        actions.append(a)
        done = te or tr
    return score(info["fork_cost"]), actions, info["fork_cost"]


def random_search(budget: int, seed: int = 0) -> dict[str, Any]:
    """Random search: half the budget on fresh random schedules, half mutating the best.

    Returns:
        The best :func:`score`, its episode index and its action sequence (as
        descriptions), and the best raw env ratio seen (which an interleaving can
        inflate; reported for comparison only).

    """
    env = make_env()
    rng = np.random.default_rng(seed)
    best, best_actions, best_at, best_fc = -math.inf, [], -1, {}
    best_raw = -math.inf
    curve = []
    for ep in range(budget):
        prefix: list[int] = []
        if ep >= budget // 2 and best_actions:
            cut = int(rng.integers(len(best_actions) + 1))
            prefix = best_actions[:cut]
        ratio, actions, fc = play(env, rng, prefix, seed=0)
        best_raw = max(best_raw, float(fc["ratio"]))
        if ratio > best:
            best, best_actions, best_at, best_fc = ratio, actions, ep, fc
        curve.append(best)
    env.reset(seed=0)
    described = []
    for a in best_actions:
        s = env.catalogue[a]
        if s.kind == "start":
            described.append(env.describe_action(a))
        env.step(a)
    return {"agent": "random-search", "episodes": budget, "best_ratio": best,
            "best_raw_env_ratio": best_raw,
            "found_at_episode": best_at, "best_fork_cost": best_fc, "best_ops": described,
            "best_actions": best_actions,
            "curve": curve}


def ppo_search(total_steps: int, seed: int = 0) -> dict[str, Any]:
    """MaskablePPO on the ratio-mode objective; best episode :func:`score` seen (training
    and ten evaluation episodes)."""
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)  # a small MLP: threads only add overhead

    class Best(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.best = -math.inf
            self.episodes = 0

        def _on_step(self) -> bool:
            for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
                if done and "fork_cost" in info:
                    self.episodes += 1
                    self.best = max(self.best, score(info["fork_cost"]))
            return True

    env = make_env(mode="ratio")
    model = MaskablePPO("MlpPolicy", env, n_steps=512, batch_size=128, learning_rate=3e-4,
                        gamma=0.99, ent_coef=0.01, seed=seed, verbose=0, device="cpu")
    cb = Best()
    model.learn(total_timesteps=total_steps, callback=cb)
    eval_best = -math.inf
    for i in range(10):
        obs, info = env.reset(seed=i)
        done = False
        while not done:
            a, _ = model.predict(obs, action_masks=env.action_masks(), deterministic=i == 0)
            obs, _, te, tr, info = env.step(int(a))
            done = te or tr
        eval_best = max(eval_best, score(info["fork_cost"]))
    return {"agent": "maskable-ppo", "timesteps": total_steps,
            "training_episodes": cb.episodes, "best_ratio_training": cb.best,
            "best_ratio_eval": eval_best, "best_ratio": max(cb.best, eval_best)}


# ====================================================================== output
def plot(rows: list[dict[str, Any]], worst: float, walker: float, path: Path,
         agents: list[dict[str, Any]] | None = None) -> None:
    """Cost and ratio against mapped size, one line per pattern; agents' best as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"none": "tab:gray", "one-per-2MiB": "tab:red", "random": "tab:blue",
              "all": "tab:green"}
    for p in PATTERNS:
        rs = [r for r in rows if r["pattern"] == p]
        x = [r["mib"] for r in rs]
        ax1.plot(x, [r["classic_ms"] for r in rs], "--", color=colors[p], marker="o",
                 ms=3, label=f"classic, {p}")
        ax1.plot(x, [r["cowpte_ms"] for r in rs], "-", color=colors[p], marker="s", ms=3,
                 label=f"COW PTE, {p}")
        ax2.plot(x, [r["ratio"] for r in rs], "-", color=colors[p], marker="s", ms=4, label=p)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mapped and populated (MiB)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("fork-attributable cost (simulated ms)")
    ax1.set_title("fork + the COW work it causes")
    ax1.legend(fontsize=7, ncol=2)
    for ag, mk in zip(agents or [], ("*", "P"), strict=False):
        if ag.get("best_ratio") is not None:
            ax2.scatter([AGENT_TABLES * 2], [ag["best_ratio"]], marker=mk, s=90, zorder=5,
                        color="black", label=f"{ag['agent']} best ({AGENT_TABLES * 2} MiB)")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.axhline(worst, color="tab:red", ls=":", lw=1,
                label=f"analytic worst (write/2MiB) {worst:.2f}")
    ax2.axhline(walker, color="tab:purple", ls=":", lw=1,
                label=f"analytic walker break {walker:.2f}")
    ax2.set_ylabel("COW PTE / classic")
    ax2.set_title("COW PTE v4 relative to plain fork")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep as a markdown table."""
    out = ["| size | pattern | writes | classic ms | COW PTE ms | table breaks | "
           "COW PTE / classic | closed form |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cf = "–" if r["closed_form_ratio"] is None else f"{r['closed_form_ratio']:.3f}"
        out.append(f"| {r['mib']} MiB | {r['pattern']} | {r['writes']} | "
                   f"{r['classic_ms']:.4f} | {r['cowpte_ms']:.4f} | {r['table_breaks']} | "
                   f"{r['ratio']:.3f} | {cf} |")
    return "\n".join(out)


def compact_markdown(rows: list[dict[str, Any]]) -> str:
    """One row per size: fork alone in ms, then COW PTE / classic for every pattern."""
    out = ["| mapped | classic fork | COW PTE fork | COW PTE / classic: no write | "
           "one write per 2 MiB | random 1/8 of pages | every page |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for mib in sorted({r["mib"] for r in rows}):
        by = {r["pattern"]: r for r in rows if r["mib"] == mib}
        size = f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"
        out.append(f"| {size} | {by['none']['classic_ms']:.3f} ms | "
                   f"{by['none']['cowpte_ms']:.3f} ms | "
                   + " | ".join(f"{by[p]['ratio']:.3f}" for p in PATTERNS) + " |")
    return "\n".join(out)


def rich_table(rows: list[dict[str, Any]]) -> None:
    """Print the sweep with rich."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fork-attributable cost, classic vs COW PTE v4 (fixed, prctl)")
    for h in ("size", "pattern", "writes", "classic ms", "COW PTE ms", "breaks", "ratio",
              "closed form"):
        t.add_column(h, justify="left" if h == "pattern" else "right")
    for r in rows:
        cf = "–" if r["closed_form_ratio"] is None else f"{r['closed_form_ratio']:.3f}"
        t.add_row(f"{r['mib']} MiB", r["pattern"], str(r["writes"]), f"{r['classic_ms']:.4f}",
                  f"{r['cowpte_ms']:.4f}", str(r["table_breaks"]), f"{r['ratio']:.3f}", cf)
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--quick", action="store_true", help="sizes up to 32 MiB, small budgets")
    ap.add_argument("--budget", type=int, default=None,
                    help="random-search episodes (default 1000; 60 with --quick)")
    ap.add_argument("--ppo-steps", type=int, default=None,
                    help="MaskablePPO timesteps (default 20000; 2048 with --quick)")
    ap.add_argument("--no-ppo", action="store_true")
    ap.add_argument("--out", default=None,
                    help="folder for fork_cost.png (default benchmarks/out; with --quick a new "
                         "temporary folder, so a quick run never overwrites committed results)")
    a = ap.parse_args()
    if a.out is None:
        a.out = (tempfile.mkdtemp(prefix="cowenv-fork-cost-") if a.quick
                 else str(Path(__file__).resolve().parent / "out"))
    budget = a.budget if a.budget is not None else (60 if a.quick else 1000)
    ppo_steps = a.ppo_steps if a.ppo_steps is not None else (2048 if a.quick else 20000)
    t0 = time.perf_counter()
    rows = sweep(QUICK_SIZES_MIB if a.quick else SIZES_MIB)
    t_sweep = time.perf_counter() - t0

    analytic = {
        "worst_write_per_2MiB_limit": C.analytic_worst_ratio(),
        "walker_break_limit": C.analytic_walker_ratio(),
        "walker_break_empty_tables_limit": C.analytic_walker_ratio(present=0),
        "agent_env": {
            "tables": AGENT_TABLES,
            "worst_write_per_2MiB": C.analytic_worst_ratio(AGENT_TABLES, PTRS, 1),
            "walker_break": C.analytic_walker_ratio(AGENT_TABLES, PTRS, 1),
        },
    }
    target = analytic["agent_env"]["worst_write_per_2MiB"]
    agents = []
    t1 = time.perf_counter()
    rs = random_search(budget)
    rs["seconds"] = time.perf_counter() - t1
    agents.append(rs)
    if not a.no_ppo:
        t2 = time.perf_counter()
        try:
            pp = ppo_search(ppo_steps)
        except ImportError as e:  # sb3-contrib missing
            pp = {"agent": "maskable-ppo", "skipped": str(e), "best_ratio": None}
        pp["seconds"] = time.perf_counter() - t2
        agents.append(pp)
    for ag in agents:
        if ag.get("best_ratio") is not None:
            ag["fraction_of_analytic_worst"] = ag["best_ratio"] / target
            ag["fraction_of_walker_bound"] = (ag["best_ratio"]
                                              / analytic["agent_env"]["walker_break"])
    png = Path(a.out) / "fork_cost.png"
    plot(rows, analytic["worst_write_per_2MiB_limit"], analytic["walker_break_limit"], png,
         agents)
    result = {"sweep": rows, "analytic": analytic, "agents": agents,
              "constants_ns": dict(sorted(C.COSTS.items())), "plot": str(png),
              "seconds": {"sweep": t_sweep, "total": time.perf_counter() - t0}}
    if a.json:
        for ag in result["agents"]:
            ag.pop("curve", None)
        json.dump(result, sys.stdout, indent=1)
        print()
        return
    if a.markdown:
        print(compact_markdown(rows))
        print()
        print(markdown(rows))
    else:
        rich_table(rows)
    print()
    print(f"analytic worst case (fork, then one write per 2 MiB), large mapping: "
          f"{analytic['worst_write_per_2MiB_limit']:.3f}x; walker break (mprotect/MADV_FREE "
          f"after fork, no page copy): {analytic['walker_break_limit']:.3f}x; on emptied "
          f"tables: {analytic['walker_break_empty_tables_limit']:.3f}x")
    ae = analytic["agent_env"]
    print(f"agent env ({AGENT_TABLES} populated tables, x86_64): analytic worst "
          f"{ae['worst_write_per_2MiB']:.3f}x, walker break {ae['walker_break']:.3f}x")
    for ag in agents:
        if ag.get("best_ratio") is None:
            print(f"  {ag['agent']}: skipped ({ag.get('skipped')})")
            continue
        extra = (f"{ag['episodes']} episodes, best at episode {ag['found_at_episode']}"
                 if ag["agent"] == "random-search" else
                 f"{ag['timesteps']} timesteps, {ag['training_episodes']} training episodes")
        print(f"  {ag['agent']}: best ratio {ag['best_ratio']:.3f}x = "
              f"{ag['fraction_of_analytic_worst']:.3f} of the analytic worst case "
              f"({ag['fraction_of_walker_bound']:.3f} of the walker bound); {extra}; "
              f"{ag['seconds']:.0f} s")
        if ag.get("best_ops"):
            print("    ops: " + "; ".join(ag["best_ops"]))
    print(f"plot: {png}; total {result['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
