"""Quiescent-point checks (cowenv/kernel/debug_vm.py, Oracle.check_shadow) and the
teardown's observation: each check fires on the state it forbids and stays silent on
the legitimate states next to it (COW-shared pages, COW PTE shared tables, swap).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from cowenv_agents import RandomAgent, Teardown, episode_rng, run_episode

from cowenv.harness import Harness
from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.debug_vm import check_debug_vm
from cowenv.kernel.memory import PG_anon_exclusive
from cowenv.kernel.pgtable import PFN_SHIFT, PTE_SWAP, PTE_SWP_EXCLUSIVE, PTE_WRITE
from cowenv.scenario import load_scenario, run_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import mutation as mu  # noqa: E402

A = 0x100000


def _k(variant: str = "classic", flaws: tuple[str, ...] = ()):
    return make_kernel(KernelConfig(variant=variant, flaws=flaws, ptrs_per_pte=8,
                                    nr_frames=128, nr_swap_slots=16))


def _entry(k, pid: int, addr: int = A):
    vpn = addr // 4096
    mm = k.procs[pid].mm
    return mm.pmd[vpn // k.P], vpn % k.P


def _sigs(k) -> set[str]:
    return {v.signature for v in k.violations}


def test_cow_shared_page_is_clean_and_a_writable_share_is_caught() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    k.do(1, "write", addr=A)
    k.do(1, "fork")
    check_debug_vm(k)
    assert not k.violations  # mapped read-only twice: legitimate
    pmd, off = _entry(k, 1)
    pmd.table.entries[off] |= PTE_WRITE  # the parent's PTE wrongly made writable
    check_debug_vm(k)
    assert {"isolation@page_table_check", "isolation@pte_write_anon_exclusive"} <= _sigs(k)


def test_writable_non_exclusive_page_mapped_once_is_caught() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    k.do(1, "write", addr=A)
    pmd, off = _entry(k, 1)
    k.pool.flags[int(pmd.table.entries[off]) >> PFN_SHIFT] &= ~np.int64(PG_anon_exclusive)
    check_debug_vm(k)
    assert _sigs(k) == {"isolation@pte_write_anon_exclusive"}


def test_shared_cow_pte_table_is_clean_until_a_pmd_is_writable() -> None:
    k = _k("cowpte")
    k.do(1, "mmap", addr=A, length=2 * 4096)
    k.do(1, "write", addr=A)
    k.do(1, "write", addr=A + 4096)
    assert k.do(1, "prctl_cow_pte") == 0
    k.do(1, "fork")
    pmd, _ = _entry(k, 1)
    assert pmd.table.refcount == 2 and not pmd.write
    check_debug_vm(k)
    k.oracle.check_shadow()
    assert not k.violations
    pmd.write = True  # a sharer's PMD made writable while the table is still shared
    pmd.table.entries[:2] |= PTE_WRITE
    check_debug_vm(k)
    assert "isolation@page_table_check" in _sigs(k)


def test_pinned_page_must_stay_exclusive_even_unmapped() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    k.do(1, "write", addr=A)
    pin = k.do(1, "pin", addr=A, write=True)
    assert pin >= 0
    assert k.do(1, "munmap", addr=A, length=4096) == 0
    check_debug_vm(k)
    assert not k.violations  # unmapped, still pinned, still PageAnonExclusive
    k.pool.flags[k.pins[pin].pfn] &= ~np.int64(PG_anon_exclusive)
    check_debug_vm(k)
    assert "pin-coherence@sanity_check_pinned_pages" in _sigs(k)


def test_exclusive_swap_entry_must_be_the_only_reference() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    k.do(1, "write", addr=A)
    assert k.do(1, "madvise", addr=A, length=4096, advice="PAGEOUT") == 0
    pmd, off = _entry(k, 1)
    pte = int(pmd.table.entries[off])
    assert pte & PTE_SWAP and pte & PTE_SWP_EXCLUSIVE
    check_debug_vm(k)
    assert not k.violations
    k.do(1, "fork")  # fork clears the marker in both
    assert not int(pmd.table.entries[off]) & PTE_SWP_EXCLUSIVE
    check_debug_vm(k)
    assert not k.violations
    pmd.table.entries[off] |= PTE_SWP_EXCLUSIVE  # marker kept although the child shares it
    check_debug_vm(k)
    assert "accounting@pte_swp_exclusive" in _sigs(k)


def test_shadow_sweep_sees_corruption_without_a_read() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=2 * 4096)
    k.do(1, "write", addr=A)
    tok = k.do(1, "write", addr=A + 4096)
    pin = k.do(1, "pin", addr=A + 4096, write=True)
    assert k.do(1, "madvise", addr=A, length=4096, advice="PAGEOUT") == 0
    assert not k.violations
    slot = int(_entry(k, 1)[0].table.entries[0]) >> PFN_SHIFT
    k.swap.cache.clear()  # (bypassing the swap cache: the slot's data is what a read sees)
    k.swap.data[slot] = 12345
    k.oracle.check_shadow()
    assert [v.signature for v in k.violations] == ["isolation@shadow_sweep"]
    k.pool.content[k.pins[pin].pfn] = tok + 999
    k.oracle.check_shadow()
    k.oracle.check_shadow()  # reported once per (address or pin, value)
    sigs = [v.signature for v in k.violations]
    assert sigs.count("pin-coherence@shadow_sweep") == 1
    assert sigs.count("isolation@shadow_sweep") == 2  # the pinned page's address too


def test_quiescent_points_run_the_checks_after_an_operation() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=2 * 4096)
    k.do(1, "write", addr=A)
    pmd, off = _entry(k, 1)
    k.pool.content[int(pmd.table.entries[off]) >> PFN_SHIFT] = 4242
    k.do(1, "write", addr=A + 4096)  # any operation returning at a quiescent point
    assert "isolation@shadow_sweep" in _sigs(k)


def test_teardown_observes_pins_and_swapped_pages_before_exits() -> None:
    h = Harness(geometry="small", preset="fixed", terminate_on_violation=False)
    h.reset(0)
    cat = h.catalogue
    pin_a = next(i for i, sp in enumerate(cat) if sp.kind == "start" and sp.op == "pin"
                 and sp.tid == 1)
    out = next(i for i, sp in enumerate(cat) if sp.kind == "start" and sp.tid == 1
               and sp.op == "madvise" and dict(sp.args)["advice"] == "PAGEOUT")
    for a in (pin_a, out):
        h.step(a)
        while h.kernel.threads[1].gen is not None:
            h.step(1)
    assert any(p.active for p in h.kernel.pins.values())
    mm = h.kernel.procs[1].mm
    assert any((tb.table.entries & PTE_SWAP).any() for tb in mm.pmd.values())
    td = Teardown()
    ops: list[str] = []
    for _ in range(400):
        a = td.action(h)
        if a is None:
            break
        if cat[a].kind == "start":
            ops.append(cat[a].op)
        h.step(a)
    assert "dev_read" in ops and "read" in ops and "exit" in ops
    first_exit = ops.index("exit")
    assert ops.index("dev_read") < first_exit and ops.index("read") < first_exit
    assert all(t.exited for tid, t in h.kernel.threads.items() if tid != 0)
    assert not [v for v in h.kernel.violations if v.kind != "selftest"]


@pytest.mark.parametrize("flaws", [["numa-fault-writes-shared"], None])
def test_teardown_reads_numa_hinting_entries(flaws) -> None:
    """A NUMA-hinting entry left in a table COW-shared at fork is read back by the
    teardown (a load takes do_numa_page): the flaw shows there; fixed stays silent."""
    from cowenv.kernel.pgtable import pte_protnone

    kw = {"geometry": "small", "terminate_on_violation": False}
    h = Harness(variant="cowpte", flaws=flaws, **kw) if flaws else Harness(preset="fixed", **kw)
    h.reset(0)
    cat = h.catalogue
    for op in ("write", "prctl_cow_pte", "numa_hint", "fork"):  # (tid 2 shares the mm)
        h.step(next(i for i, sp in enumerate(cat)
                    if sp.kind == "start" and sp.tid == 1 and sp.op == op))
        while h.kernel.threads[1].gen is not None:
            h.step(1)
    mm = h.kernel.procs[1].mm
    assert any(pte_protnone(int(e)) for tb in mm.pmd.values() for e in tb.table.entries if e)
    assert not h.kernel.violations
    td = Teardown()
    reads = 0
    for _ in range(400):
        a = td.action(h)
        if a is None:
            break
        reads += cat[a].kind == "start" and cat[a].op == "read"
        h.step(a)
    sigs = {v.signature for v in h.kernel.violations}
    assert reads and sigs == ({"shared-table-write@do_numa_page"} if flaws else set())


@pytest.mark.parametrize("variant", ["classic", "fixed"])
def test_random_episodes_with_teardown_are_silent(variant: str) -> None:
    h = Harness(geometry="small", preset=variant, terminate_on_violation=False)
    ag = RandomAgent()
    for ep in range(6):
        rng, rs = episode_rng(7, 0, ep)
        run_episode(h, ag, rng, rs, teardown=32)
        assert not [v.signature for v in h.kernel.violations], (variant, ep)
        # The observation left the exits their share of the reserve: every user thread
        # has exited or started its exit (one still in an operation when the reserve ran
        # out -- a swapoff retrying while reclaim holds its slot, a long compaction --
        # is the budget's limit, not the observation's).
        left = [t for tid, t in h.kernel.threads.items()
                if tid and not t.exited and t.op != "exit"]
        assert not [t for t in left if t.gen is None], (variant, ep)
        assert sum(1 for _ in left) <= 1, (variant, ep)


def test_new_scenario_catches_unmap_ignores_pin_through_the_pin_check() -> None:
    sc = load_scenario("scenarios/upstream/reclaim-unmap-races-pin.yaml")
    assert run_scenario(sc, "fixed").passed
    m = next(m for m in mu.MUTANTS if m.name == "unmap-ignores-pin")
    with mu.planted(m):
        r = run_scenario(sc, "fixed")
    sigs = [v.signature for v in r.violations]
    assert not r.passed
    assert sigs[0] == "pin-coherence@sanity_check_pinned_pages"
    assert "pin-coherence@dev_read" in sigs  # and the device really reads stale data


def test_numa_reach_counts_the_shared_numa_state() -> None:
    """benchmarks/numa_reach.py: the state it counts is the one the flaw's scenario builds
    right before its read (a COW-shared table holding accessible NUMA-hinting entries)."""
    import numa_reach as nr

    h = Harness(variant="cowpte", flaws=["numa-fault-writes-shared"], geometry="small",
                terminate_on_violation=False)
    h.reset(0)
    cat = h.catalogue
    assert nr.shared_numa_entries(h.kernel) == 0
    for op in ("write", "prctl_cow_pte", "numa_hint"):
        h.step(next(i for i, sp in enumerate(cat)
                    if sp.kind == "start" and sp.tid == 1 and sp.op == op))
        while h.kernel.threads[1].gen is not None:
            h.step(1)
    assert nr.shared_numa_entries(h.kernel) == 0  # protnone, but the table is private
    h.step(next(i for i, sp in enumerate(cat)
                if sp.kind == "start" and sp.tid == 1 and sp.op == "fork"))
    while h.kernel.threads[1].gen is not None:
        h.step(1)
    assert nr.shared_numa_entries(h.kernel) > 0
    r = nr.measure("random", 0, 300)
    assert r["steps"] >= 300 and r["episodes"] >= 1
