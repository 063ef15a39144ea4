"""Mutation benchmark: bugs planted at run time outside the flaw catalogue.

    .venv/bin/python benchmarks/mutation.py [--budget 20000] [--seeds 2]
        [--agents random,pct,greybox] [--mutants NAME,...] [--jobs 2] [--json]

Each :data:`MUTANTS` entry is a small textual change to one method of the kernel
(upstream paths and the *fixed* COW PTE paths), applied **only at run time** in the
benchmark's worker process: the method's source is read with :mod:`inspect`, the snippet
replaced (it must occur exactly once), the result compiled in the method's module and
set on its class for the duration of a ``with planted(m):`` block. The shipped kernel is
never edited. The configuration is the ``fixed`` preset (no catalogue flaw), small
geometry, the campaign's episode rules.

Detection, per (mutant, agent, seed): the first violation (any kind but ``simulator``)
whose schedule, replayed *without* the mutant, does not show it: steps to it within the
budget. Suite: the mutant is *caught by the scenarios* if any scenario of ``scenarios/``
that passes on ``fixed`` fails with the mutant; *caught by explore* if
``cowenv explore --preemptions 0`` on any flaw scenario's operations reports a violation
on ``fixed`` with the mutant. Writes ``benchmarks/out/mutation.{json,md}``.

A mutant with :attr:`Mutant.equivalent` set cannot be detected by any oracle (it changes
no behaviour the oracles judge); the totals are given over all mutants and with the
equivalent ones excluded, as mutation-testing practice scores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
ENV: dict[str, Any] = {"geometry": "small", "preset": "fixed", "terminate_on_violation": False}
TEARDOWN = 32


@dataclass(frozen=True)
class Mutant:
    """A planted bug: replace ``old`` by ``new`` in ``module.cls.method``."""

    name: str
    path: str  # the mm path it lives on
    module: str
    cls: str
    method: str
    old: str
    new: str
    what: str
    #: Why the mutant is *equivalent* (no oracle-visible behaviour can differ), or "".
    #: Mutation-testing practice leaves equivalent mutants out of the score; the table
    #: gives the score both ways.
    equivalent: str = ""


MUTANTS: tuple[Mutant, ...] = (
    Mutant("wp-reuse-shared", "fault", "cowenv.kernel.fault", "FaultMixin", "do_wp_page",
           "int(pool.refcount[pfn]) == 1", "int(pool.refcount[pfn]) <= 2",
           "do_wp_page reuses a page that one other mapping still holds"),
    Mutant("swapin-leaks-slot", "swap", "cowenv.kernel.fault", "FaultMixin", "do_swap_page",
           'self.swap_free(slot, "do_swap_page")', "pass",
           "do_swap_page forgets swap_free: the slot's count leaks"),
    Mutant("fork-keeps-write", "fork", "cowenv.kernel.fork", "ForkMixin", "copy_pte_entries",
           "src_new[share] &= ~np.int64(PTE_WRITE)", "pass",
           "copy_pte_range leaves the parent's PTE writable on a COW-shared page"),
    Mutant("fork-keeps-exclusive", "fork", "cowenv.kernel.fork", "ForkMixin",
           "copy_pte_entries",
           "pool.flags[pfn[share & anon]] &= ~np.int64(PG_anon_exclusive)", "pass",
           "fork shares an anon page but leaves PageAnonExclusive set"),
    Mutant("zap-rss-half", "zap", "cowenv.kernel.mmap", "MmapMixin", "zap_pte_range",
           "mm.rss[MM_ANONPAGES] -= int(np.count_nonzero(anon))",
           "mm.rss[MM_ANONPAGES] -= int(np.count_nonzero(anon)) // 2",
           "zap_pte_range under-decrements MM_ANONPAGES"),
    Mutant("zap-leaks-swap", "zap", "cowenv.kernel.mmap", "MmapMixin", "zap_pte_range",
           'self.free_swap_and_cache(int(s), "zap_pte_range")', "pass",
           "zap_pte_range drops swap entries without free_swap_and_cache"),
    Mutant("mprotect-writes-shared", "mprotect", "cowenv.kernel.mprotect", "MprotectMixin",
           "change_protection", "new[ok] |= PTE_WRITE", "new[present] |= PTE_WRITE",
           "mprotect(rw) makes non-exclusive (COW-shared) anon PTEs writable"),
    Mutant("pin-not-biased", "gup", "cowenv.kernel.gup", "GupMixin", "_grab_pin",
           "self.pool.refcount[pfn] += GUP_PIN_COUNTING_BIAS", "self.pool.refcount[pfn] += 1",
           "a FOLL_PIN takes a plain reference (page_maybe_dma_pinned never true)"),
    Mutant("reclaim-ignores-pin", "reclaim", "cowenv.kernel.vmscan", "VmscanMixin",
           "shrink_folio_locked",
           "if int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:\n"
           "        self.folio_putback_lru(pfn)  # page_maybe_dma_pinned",
           "if False:\n        self.folio_putback_lru(pfn)  # page_maybe_dma_pinned",
           "shrink_folio_list does not skip maybe-pinned pages",
           equivalent="a pinned anon page is exclusive (GUP unshares, fork copies it), so "
                      "try_to_unmap_one's page_try_share_anon_rmap still refuses to unmap "
                      "it: it stays mapped and coherent; the mutant only spends a swap "
                      "slot and a write on it (6.2 reuses a PageAnonExclusive page whatever "
                      "its refcount, so the swap-cache reference does not make COW copy it "
                      "away from the pin as it did before 5.19)"),
    Mutant("unmap-ignores-pin", "rmap", "cowenv.kernel.rmap", "RmapMixin", "try_to_unmap",
           "if excl and int(pool.refcount[pfn]) >= GUP_PIN_COUNTING_BIAS:", "if False:",
           "try_to_unmap_one unmaps an exclusive page pinned since shrink_folio checked"),
    Mutant("break-reuses-shared-table", "cowpte", "cowenv.kernel.cowpte", "CowPteKernel",
           "_break_table", "if self.cow_pte_count(table) == 1:",
           "if self.cow_pte_count(table) <= 2:",
           "fixed COW PTE break reuses a table another process still shares"),
    Mutant("break-leaks-table", "cowpte", "cowenv.kernel.cowpte", "CowPteKernel",
           "_break_slow_fixed", "old.refcount -= 1\n", "pass\n",
           "fixed COW PTE break copies but does not drop its reference to the old table"),
    Mutant("tlb-no-flush-before-free", "tlb", "cowenv.kernel.tlb", "TlbMixin",
           "tlb_flush_mmu", "if tlb.end > tlb.start:", "if False:",
           "tlb_flush_mmu frees the gathered pages and tables without flushing the TLB"),
    Mutant("fork-no-tlb-flush", "tlb", "cowenv.kernel.fork", "ForkMixin", "sys_fork",
           "self.flush_tlb_mm(oldmm)\n", "pass\n",
           "dup_mmap forgets flush_tlb_mm(oldmm) after write-protecting the parent"),
    Mutant("swapoff-skips-mm", "swapoff", "cowenv.kernel.swapfile", "SwapfileMixin",
           "unuse_mm_list", "return self.live_mms()", "return self.live_mms()[:-1]",
           "try_to_unuse skips one mm (the youngest) on every pass (issue 13)"),
    # Issue 13's walkers ("Must show": planted bugs for the new paths).
    Mutant("mremap-drops-rss", "mremap", "cowenv.kernel.mremap", "MremapMixin", "move_ptes",
           "# no rss change: same mm",
           "\n        mm.rss[1] -= int(np.count_nonzero(src[live] & 1))",
           "mremap not moving rss: move_ptes uncharges the moved pages like a zap"),
    Mutant("migration-entry-left", "migrate", "cowenv.kernel.migrate", "MigrateMixin",
           "remove_migration_ptes", "for vma, vpn in cands:", "for vma, vpn in cands[:-1]:",
           "remove_migration_ptes skips the last mapping: a migration entry left behind"),
)


@contextlib.contextmanager
def planted(m: Mutant) -> Iterator[None]:
    """Apply mutant ``m`` for the duration of the block (this process only)."""
    mod = importlib.import_module(m.module)
    cls = getattr(mod, m.cls)
    orig = cls.__dict__[m.method]
    src = textwrap.dedent(inspect.getsource(orig))
    if src.count(m.old) != 1:
        raise RuntimeError(f"{m.name}: snippet found {src.count(m.old)} times in "
                           f"{m.cls}.{m.method}")
    ns: dict[str, Any] = {}
    exec(compile(src.replace(m.old, m.new), f"<mutant {m.name}>", "exec"),  # noqa: S102
         vars(mod), ns)
    setattr(cls, m.method, ns[m.method])
    try:
        yield
    finally:
        setattr(cls, m.method, orig)


def _attributable(config: Any, steps: list[dict[str, Any]], sig: str) -> bool:
    from cowenv.minimize import run_lenient

    return sig not in run_lenient(config, steps, stop_on={sig}).kernel.signatures


def run_agent(mi: int, agent: str, seed: int, budget: int) -> dict[str, Any]:
    """One (mutant, agent, seed) run: steps to the first attributable violation."""
    import cowenv_agents as ca

    from cowenv.harness import Harness
    from cowenv.scenario import parse_scenario

    m = MUTANTS[mi]
    t0 = time.perf_counter()
    found: dict[str, Any] | None = None
    with planted(m):
        h = Harness(**ENV)
        ag = ca.make_agent(agent)
        steps = episodes = 0
        pending: list[tuple[int, str, dict[str, Any]]] = []
        while steps < budget and found is None:
            rng, rs = ca.episode_rng(seed, mi, episodes)
            base = steps
            pending.clear()

            def hook(i: int, v: dict[str, Any], base: int = base) -> bool:
                if v["kind"] == "simulator":
                    return False
                pending.append((base + i, v["signature"], h.get_schedule()))
                return True

            res = ca.run_episode(h, ag, rng, rs, max_actions=budget - steps,
                                 on_violation=hook, teardown=TEARDOWN)
            steps += res.steps
            episodes += 1
            for at, sig, data in pending:
                sc = parse_scenario(data)
                # Attribution runs without the mutant.
                with _unplanted(m):
                    ok = _attributable(sc.config, sc.steps, sig)
                if ok:
                    found = {"step": at, "signature": sig}
                    break
    return {"mutant": m.name, "agent": agent, "seed": seed, "found": found is not None,
            "steps": found["step"] if found else None,
            "signature": found["signature"] if found else None,
            "seconds": round(time.perf_counter() - t0, 1)}


@contextlib.contextmanager
def _unplanted(m: Mutant) -> Iterator[None]:
    mod = importlib.import_module(m.module)
    cls = getattr(mod, m.cls)
    cur = cls.__dict__[m.method]
    setattr(cls, m.method, _ORIG[(m.module, m.cls, m.method)])
    try:
        yield
    finally:
        setattr(cls, m.method, cur)


def _originals() -> dict[tuple[str, str, str], Any]:
    out = {}
    for m in MUTANTS:
        cls = getattr(importlib.import_module(m.module), m.cls)
        out[(m.module, m.cls, m.method)] = cls.__dict__[m.method]
    return out


_ORIG = _originals()


def run_suite(mi: int) -> dict[str, Any]:
    """Scenario suite and explore (bound 0, flaw scenarios' operations) on one mutant."""
    from cowenv.explore import explore
    from cowenv.scenario import load_scenario, run_scenario

    m = MUTANTS[mi]
    files = sorted((ROOT / "scenarios").rglob("*.yaml"))
    scs = [load_scenario(f) for f in files]
    base = {sc.name: run_scenario(sc, "fixed").passed for sc in scs}
    failed: list[str] = []
    caught_explore: list[str] = []
    with planted(m):
        for sc in scs:
            if base[sc.name] and not run_scenario(sc, "fixed").passed:
                failed.append(sc.name)
        for sc in scs:
            if "flaws" not in str(sc.path):
                continue
            r = explore(sc, 0, "fixed", max_seconds=60)
            if r.findings:
                caught_explore.append(f"{sc.name}: {r.findings[0].signature}")
    return {"mutant": m.name, "scenarios_failed": failed, "explore": caught_explore}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=20_000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--agents", default="random,pct,greybox")
    p.add_argument("--mutants", default="",
                   help="comma-separated mutant names (default: all)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    agents = [x for x in a.agents.split(",") if x]
    names = [m.name for m in MUTANTS]
    chosen = [x for x in a.mutants.split(",") if x] or names
    for x in chosen:
        if x not in names:
            print(f"--mutants: unknown mutant {x!r} (expected one of {', '.join(names)})",
                  file=sys.stderr)
            return 2
    idx = [names.index(x) for x in chosen]
    for i, m in enumerate(MUTANTS):  # every mutant applies
        with planted(m):
            pass
        assert MUTANTS.index(m) == i
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    suites: list[dict[str, Any]] = []
    with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(run_suite, i): "suite" for i in idx}
        for i in idx:
            for ag in agents:
                for s in range(a.seeds):
                    futs[pool.submit(run_agent, i, ag, s, a.budget)] = "run"
        for fu in as_completed(futs):
            r = fu.result()
            (suites if futs[fu] == "suite" else runs).append(r)
            print(json.dumps(r), file=sys.stderr)
    runs.sort(key=lambda r: (names.index(r["mutant"]), agents.index(r["agent"]), r["seed"]))
    suites.sort(key=lambda r: chosen.index(r["mutant"]))
    lines = ["| mutant (path) | " + " | ".join(agents) + " | scenarios | explore (bound 0) |",
             "|" + "---|" * (len(agents) + 3)]
    rate = {}
    sel = [MUTANTS[i] for i in idx]
    for m, su in zip(sel, suites, strict=True):
        row = [f"`{m.name}` ({m.path})"]
        for ag in agents:
            rs = [r for r in runs if r["mutant"] == m.name and r["agent"] == ag]
            f = [r for r in rs if r["found"]]
            row.append(f"{len(f)}/{len(rs)}" + (f", {sorted(r['steps'] for r in f)[0]:,}"
                                                if f else ""))
        row.append(f"caught ({len(su['scenarios_failed'])})" if su["scenarios_failed"]
                   else "missed")
        row.append("caught" if su["explore"] else "missed")
        lines.append("| " + " | ".join(row) + " |")
    for ag in agents:
        det = sum(any(r["found"] for r in runs if r["mutant"] == m.name and r["agent"] == ag)
                  for m in sel)
        rate[ag] = det
    sc_rate = sum(bool(s["scenarios_failed"]) for s in suites)
    ex_rate = sum(bool(s["explore"]) for s in suites)
    n = len(sel)
    lines.append("| **detected (any seed)** | " + " | ".join(f"**{rate[ag]}/{n}**"
                                                          for ag in agents)
                 + f" | **{sc_rate}/{n}** | **{ex_rate}/{n}** |")
    equiv = [m.name for m in sel if m.equivalent]
    ne = n - len(equiv)
    rate_ne = {ag: sum(any(r["found"] for r in runs
                           if r["mutant"] == m.name and r["agent"] == ag)
                       for m in sel if not m.equivalent) for ag in agents}
    sc_ne = sum(bool(s["scenarios_failed"]) for m, s in zip(sel, suites, strict=True)
                if not m.equivalent)
    ex_ne = sum(bool(s["explore"]) for m, s in zip(sel, suites, strict=True)
                if not m.equivalent)
    if equiv:
        lines.append("| **detected, equivalent excluded** | "
                     + " | ".join(f"**{rate_ne[ag]}/{ne}**" for ag in agents)
                     + f" | **{sc_ne}/{ne}** | **{ex_ne}/{ne}** |")
    top = max(rate.values(), default=0)
    bests = [ag for ag in agents if rate[ag] == top]
    md = "\n".join(lines) + (f"\n\nAgent cells: seeds that found it / seeds, fewest steps; "
                             f"budget {a.budget:,} steps per run, `fixed` preset, small "
                             f"geometry.\n")
    if equiv:
        md += (f"Equivalent (no oracle-visible behaviour differs, see `MUTANTS`): "
               f"{', '.join(f'`{x}`' for x in equiv)}.\n")
    if bests:
        best = bests[0]
        md += (f"Best agent{'s' if len(bests) > 1 else ''}: {', '.join(bests)}, "
               f"{rate[best]}/{n} ({100 * rate[best] / n:.0f} %)"
               + (f", {rate_ne[best]}/{ne} ({100 * rate_ne[best] / ne:.0f} %) with the "
                  f"equivalent excluded" if equiv and ne else "")
               + f"; scenarios {sc_rate}/{n}"
               + (f", {sc_ne}/{ne}" if equiv and ne else "") + ".\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.json").write_text(json.dumps(
        {"budget": a.budget, "seeds": a.seeds, "agents": agents, "env": ENV,
         "mutants": [vars(m) for m in sel], "runs": runs, "suites": suites,
         "detected": {"agents": rate, "scenarios": sc_rate, "explore": ex_rate,
                      "of": n},
         "detected_equivalent_excluded": {"agents": rate_ne, "scenarios": sc_ne,
                                          "explore": ex_ne, "of": ne},
         "wall_seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")
    (out / "mutation.md").write_text(md)
    print(json.dumps({"runs": runs, "suites": suites}) if a.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
