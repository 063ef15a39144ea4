"""The TLB, the paging-structure cache and the mmu_gather (cowenv/kernel/tlb.py)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cowenv import scenario as scenario_mod
from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig, config_from_dict
from cowenv.kernel.kernel import Kernel
from cowenv.kernel.pgtable import PTE_USER
from cowenv.kernel.trace import trace_hash
from cowenv.scenario import apply_step, load_scenario, run_scenario
from cowenv.workload import Layout, run_random_schedule, teardown

ROOT = Path(__file__).resolve().parent.parent
TLB_SCENARIOS = sorted((ROOT / "scenarios" / "upstream").glob("tlb-*.yaml"))
PS = 4096


def _k(**kw: object) -> Kernel:
    cfg = KernelConfig(ptrs_per_pte=8, nr_frames=256, **kw)  # type: ignore[arg-type]
    return make_kernel(cfg)


def _do(k: Kernel, tid: int, op: str, **args: object) -> object:
    k.start(tid, op, dict(args))
    while k.threads[tid].gen is not None:
        k.step(tid)
    return k.threads[tid].result


def test_config_field_round_trips_and_is_checked():
    assert KernelConfig().tlb is True
    assert config_from_dict({"tlb": False}).tlb is False
    with pytest.raises(ValueError, match="tlb: expected true or false"):
        config_from_dict({"tlb": 1})


def test_a_walk_fills_the_tlb_and_a_hit_skips_the_page_tables():
    k = _k()
    _do(k, 1, "mmap", addr=0x100000, length=0x8000)
    tok = _do(k, 1, "write", addr=0x100000)
    t = k.threads[1]
    vpn = 0x100000 // PS
    pfn, _gen, writable, dirty = t.tlb[vpn]
    assert writable and dirty and vpn // 8 in t.psc
    # A hit reads the frame named by the entry, not the (here: doctored) PTE.
    table = k.procs[1].mm.pmd[vpn // 8].table
    saved = int(table.entries[vpn % 8])
    table.entries[vpn % 8] = 0
    assert _do(k, 1, "read", addr=0x100000) == tok
    table.entries[vpn % 8] = saved


def test_zap_frees_pages_only_after_the_flush():
    """MADV_DONTNEED: the page stays allocated, and in the other thread's TLB, until
    tlb_finish_mmu; then the entry is gone and the page is free."""
    k = _k()
    _do(k, 1, "mmap", addr=0x100000, length=0x8000)
    _do(k, 1, "write", addr=0x100000)
    assert _do(k, 1, "clone") == 2
    _do(k, 2, "read", addr=0x100000)
    vpn = 0x100000 // PS
    pfn = k.threads[2].tlb[vpn][0]
    k.start(1, "madvise", {"addr": 0x100000, "length": 0x1000, "advice": "DONTNEED"})
    while k.threads[1].label != "zap_pte_range:table_done":
        k.step(1)
    assert int(k.procs[1].mm.pmd[vpn // 8].table.entries[vpn % 8]) == 0  # PTE cleared
    assert k.pool.refcount[pfn] == 1 and not k.pool.is_free(pfn)  # not freed yet
    assert vpn in k.threads[2].tlb  # not flushed yet
    assert k.tlb_pending.get(k.procs[1].mm.id)
    while k.threads[1].gen is not None:
        k.step(1)
    assert vpn not in k.threads[2].tlb and k.pool.is_free(pfn)
    assert not k.tlb_pending
    assert _do(k, 2, "read", addr=0x100000) == 0
    assert not k.violations


def test_a_range_above_the_ceiling_is_a_full_flush_and_psc_always_goes():
    k = _k()
    mm = k.procs[1].mm
    t = k.threads[1]
    t.tlb.update({1: (1, 1, True, True), 100: (2, 1, True, True)})
    t.psc[50] = (None, 0, True)
    k.flush_tlb_range(mm, 0, 2)
    assert 1 not in t.tlb and 100 in t.tlb and not t.psc
    k.flush_tlb_range(mm, 0, 34)  # > 33 pages: everything
    assert not t.tlb


class _NoFlushBeforeFree(Kernel):
    """The planted bug: tlb_flush_mmu frees the gathered pages without flushing."""

    def flush_tlb_mm_range(self, mm, start, end, freed_tables=False):  # type: ignore[no-untyped-def]
        if self._cur is not None and self._cur.gathers:
            return  # the gather's flush is forgotten; ptep_clear_flush still flushes
        super().flush_tlb_mm_range(mm, start, end, freed_tables)


@pytest.mark.parametrize("path", TLB_SCENARIOS, ids=lambda p: p.stem)
def test_tlb_scenarios_are_clean_on_classic_and_fixed(path: Path):
    sc = load_scenario(path)
    assert run_scenario(sc).passed
    r = run_scenario(sc, "fixed")
    assert r.passed and not r.violations, [v.signature for v in r.violations]


def test_the_stale_entry_oracle_catches_a_missing_flush_before_a_free(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(scenario_mod, "make_kernel",
                        lambda cfg, **kw: _NoFlushBeforeFree(cfg, **kw))
    up = ROOT / "scenarios" / "upstream"
    r = run_scenario(load_scenario(up / "tlb-dontneed-flushes-before-free.yaml"))
    assert "memory-safety@tlb_stale_entry" in {v.signature for v in r.violations}
    r = run_scenario(load_scenario(up / "tlb-mprotect-flushes.yaml"))
    assert "isolation@tlb_stale_write" in {v.signature for v in r.violations}


def test_the_flaw_scenario_needs_the_flaw_and_the_tlb_model():
    sc = load_scenario(ROOT / "scenarios/flaws/table-free-no-deferral.yaml")
    r = run_scenario(sc)
    assert "memory-safety@gup_pte_range" in {v.signature for v in r.violations}
    assert not run_scenario(sc, "fixed").violations
    # Switched on alone, through the other preset paths too.
    for preset in ("as-posted", "review"):
        assert run_scenario(sc, preset).passed


def _random_run(cfg: KernelConfig, seed: int) -> tuple[str, list[str]]:
    k = make_kernel(cfg)
    rng = np.random.default_rng(seed)
    steps = run_random_schedule(k, rng, 400, Layout(nr_pages=48, max_len_pages=24))
    steps += teardown(k, rng)
    # The recorded schedule replays to the same trace on a fresh kernel.
    k2 = make_kernel(cfg)
    for i, s in enumerate(copy.deepcopy(steps)):
        apply_step(k2, s, {}, {}, i)
    assert trace_hash(k2.events) == trace_hash(k.events)
    return trace_hash(k.events), sorted(k.signatures)


@pytest.mark.parametrize("preset", ["classic", "fixed"])
def test_random_schedules_are_deterministic_and_clean(preset: str):
    cfg = KernelConfig.from_preset(preset, ptrs_per_pte=8, nr_frames=128, nr_swap_slots=32,
                                   max_threads=6, max_processes=4)
    for seed in range(6):
        h1, sigs = _random_run(cfg, seed)
        h2, _ = _random_run(cfg, seed)
        assert h1 == h2
        assert sigs == [], (seed, sigs)
    off = replace(cfg, tlb=False)
    assert _random_run(off, 0)[1] == []


@pytest.mark.parametrize("shared", [True, False])
def test_numa_hint_store_before_its_flush_is_the_accepted_window(shared: bool):
    """Soak classic seed 1114 (base 6.2): ``isolation@tlb_stale_write`` mid-NUMA-scan.

    ``change_prot_numa`` (mm/mempolicy.c, 6.2) wraps ``change_protection`` in
    ``tlb_gather_mmu`` .. ``tlb_finish_mmu``: ``change_pte_range`` only records each
    protnone entry (``tlb_flush_pte_range``) and ``inc_tlb_flush_pending`` covers the
    walk, so a store through a writable TLB entry of a page already made protnone, before
    the scan's flush, is the kernel's accepted window. The model used to make the entries
    protnone with no flush pending and flush only at the end: the store was reported.
    After the scan the entry is flushed and the next store takes the NUMA-hinting fault.
    """
    k = _k()
    base = 0x100000  # two tables of 8 pages
    _do(k, 1, "mmap", addr=base, length=16 * PS, shared=shared)
    toks = [_do(k, 1, "write", addr=base + i * 8 * PS) for i in range(2)]
    tid = _do(k, 1, "clone")  # two threads: private entries are scanned too
    assert isinstance(tid, int) and tid > 1
    vpn = base // PS
    assert k.threads[1].tlb[vpn][2]  # a writable entry for the first page
    k.start(tid, "numa_hint", {"addr": base, "length": 16 * PS})
    while k.threads[tid].label != "change_prot_numa:table_done":
        k.step(tid)
    mm = k.procs[1].mm
    assert not int(mm.pmd[vpn // 8].table.entries[0]) & PTE_USER  # made protnone
    new = _do(k, 1, "write", addr=base)  # a TLB hit: no fault, the old frame
    assert new != toks[0]
    assert not k.violations, [(v.signature, v.message) for v in k.violations]
    assert k.tlb_pending.get(mm.id)  # because the scan's gather is open
    assert k.run(tid) == 2
    assert vpn not in k.threads[1].tlb and not k.tlb_pending.get(mm.id)
    assert _do(k, 1, "read", addr=base) == new  # do_numa_page restores the entry
    assert _do(k, 1, "read", addr=base + 8 * PS) == toks[1]
    assert not k.violations, [(v.signature, v.message) for v in k.violations]
