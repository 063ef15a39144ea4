"""Soundness soak: seeded random schedules over the whole kernel API.

Every episode draws a small random configuration (geometry, fault mode, split PTLs, a
tight frame pool and swap device), runs a random interleaving of every operation,
reclaim on kswapd and ``fail_nth`` events, finishes and exits everything, and must end
with no violation, no simulator defect and nothing leaked. The classic variant must be
clean (it is upstream Linux); ``fixed`` (COW PTE without any flaw) must be too.

A failing episode prints the command that reproduces it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cowenv import workload
from cowenv.kernel import Kernel, make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.trace import trace_hash
from cowenv.scenario import parse_scenario, run_scenario
from cowenv.workload import Knobs, Layout, run_episode

HAVE_COWPTE = importlib.util.find_spec("cowenv.kernel.cowpte") is not None

#: ≥ 10^5 scheduler steps per variant in total, split into chunks for pytest-xdist.
CHUNKS = 6
EPISODES_PER_CHUNK = 9
STEPS_PER_EPISODE = 2000
MIN_STEPS_PER_CHUNK = 100_000 // CHUNKS




def _explain(variant: str, r: workload.EpisodeResult) -> str:
    lines = [f"episode seed {r.seed} on {variant} ({r.config}):"]
    lines += [f"  violation {v}" for v in r.violations[:5]]
    lines += [f"  defect {d}" for d in r.defects[:5]]
    lines += [f"  leak {x}" for x in r.leaks[:5]]
    lines.append(f"  reproduce: python benchmarks/soak.py --variant {variant} "
                 f"--seed {r.seed} --episodes 1 --steps {STEPS_PER_EPISODE}")
    return "\n".join(lines)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_soak_classic(chunk: int) -> None:
    steps = 0
    failures = []
    for i in range(EPISODES_PER_CHUNK):
        seed = 10_000 + chunk * EPISODES_PER_CHUNK + i
        r = run_episode(seed, STEPS_PER_EPISODE, "classic")
        steps += r.steps
        if not r.clean:
            failures.append(_explain("classic", r))
    assert not failures, "\n".join(failures)
    assert steps >= MIN_STEPS_PER_CHUNK


@pytest.mark.skipif(not HAVE_COWPTE, reason="cowenv/kernel/cowpte.py absent")
def test_soak_fixed() -> None:
    steps = 0
    failures = []
    for seed in range(10_000, 10_000 + CHUNKS * EPISODES_PER_CHUNK):
        r = run_episode(seed, STEPS_PER_EPISODE, "fixed")
        steps += r.steps
        if not r.clean:
            failures.append(_explain("fixed", r))
    assert not failures, "\n".join(failures)
    assert steps >= 100_000


def test_schedule_is_deterministic_and_replays() -> None:
    """Same seed, same schedule and trace; the recorded schedule is a scenario that
    replays to the identical trace."""
    def record(seed: int) -> tuple[list[dict], str, KernelConfig]:
        rng = np.random.default_rng(seed)
        cfg = workload.random_config(rng)
        k = make_kernel(cfg)
        steps = workload.run_random_schedule(k, rng, 600)
        steps += workload.teardown(k, rng)
        assert not k.violations and not k.defects
        return steps, trace_hash(k.events), cfg

    s1, h1, cfg = record(7)
    s2, h2, _ = record(7)
    assert s1 == s2 and h1 == h2
    s3, h3, _ = record(8)
    assert h3 != h1
    sc = parse_scenario({"version": 1, "name": "soak-7", "config": cfg.to_dict(),
                         "steps": s1, "expect": {"violation": None}})
    r = run_scenario(sc)
    assert r.error is None and r.passed
    assert r.trace_hash == h1


def test_schedules_cover_the_api() -> None:
    """The generator reaches every operation, every advice and both pin paths."""
    rng = np.random.default_rng(3)
    k = make_kernel(workload.random_config(rng))
    seen_ops: set[str] = set()
    seen_advice: set[str] = set()
    seen_events = 0
    for _ in range(6000):
        s = workload.next_step(rng, k)
        if s is None:
            break
        if "start" in s:
            seen_ops.add(s["start"])
            if s["start"] == "madvise":
                seen_advice.add(s["args"]["advice"])
            if s["start"] == "pin":
                seen_ops.add("pin-fast" if s["args"]["fast"] else "pin-slow")
        elif "event" in s:
            seen_events += 1
        workload.apply(k, s)
    from cowenv.kernel.ops import ADVICES, OPS

    assert set(OPS) | {"pin-fast", "pin-slow"} <= seen_ops
    assert set(ADVICES) == seen_advice
    assert seen_events > 0
    assert not k.violations and not k.defects


class _LeakyZap(Kernel):
    """A planted bug: zap_pte_range forgets to uncharge one anon page per table."""

    def zap_pte_range(self, t, vma, table, idx, lo, hi, clear=True):  # type: ignore[no-untyped-def]
        before = vma.mm.rss[1]
        super().zap_pte_range(t, vma, table, idx, lo, hi, clear)
        if vma.mm.rss[1] < before:
            vma.mm.rss[1] += 1


class _NoUnshare(Kernel):
    """A planted bug: fork keeps PageAnonExclusive (CVE-2020-29374-like COW leak)."""

    def copy_pte_entries(self, *a, **kw):  # type: ignore[no-untyped-def]
        from cowenv.kernel.memory import PG_anon, PG_anon_exclusive

        ret = yield from super().copy_pte_entries(*a, **kw)
        anon = (self.pool.flags & PG_anon) != 0
        self.pool.flags[anon] |= PG_anon_exclusive
        return ret


@pytest.mark.parametrize("bug,signature", [
    (_LeakyZap, "accounting@get_mm_counter"),
    (_NoUnshare, "accounting@PageAnonExclusive"),
])
def test_soak_catches_planted_bugs(monkeypatch: pytest.MonkeyPatch, bug: type,
                                   signature: str) -> None:
    """The soak has teeth: a planted kernel bug is found within a few episodes."""
    monkeypatch.setattr(workload, "make_kernel", lambda cfg, **kw: bug(cfg, **kw))
    found: set[str] = set()
    for seed in range(6):
        r = run_episode(seed, 1500, "classic",
                        knobs=Knobs(weights={**workload.DEFAULT_WEIGHTS, "fork": 3.0}),
                        layout=Layout(nr_pages=24))
        found |= {v.split(":", 1)[0] for v in r.violations}
        if signature in found:
            break
    assert signature in found
