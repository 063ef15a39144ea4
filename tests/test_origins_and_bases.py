"""Flaw origins (v4 or seeded), the presets built from them, and kernel bases (issue 12)."""

from pathlib import Path

import pytest

from cowenv.kernel import make_kernel
from cowenv.kernel.config import (
    AS_POSTED_FLAWS,
    FLAW_IDS,
    FLAW_ORIGINS,
    FLAW_SOURCES,
    PRESETS,
    KernelConfig,
    config_from_dict,
)
from cowenv.scenario import load_scenario, preset_of, run_scenario

ROOT = Path(__file__).resolve().parent.parent


def test_every_flaw_has_an_origin_and_a_source() -> None:
    assert set(FLAW_ORIGINS) == set(FLAW_IDS) == set(FLAW_SOURCES)
    assert set(FLAW_ORIGINS.values()) == {"v4", "seeded"}
    for f in FLAW_IDS:
        if FLAW_ORIGINS[f] == "v4":
            assert "/14" in FLAW_SOURCES[f], f  # cites the patch number
        else:
            assert FLAW_SOURCES[f].startswith("seeded"), f


def test_corrections_of_the_brief_are_seeded() -> None:
    for f in ("walker-skips-break", "gup-fast-fork-race", "vma-lock-fault-breaks-shared"):
        assert FLAW_ORIGINS[f] == "seeded"
        assert f not in PRESETS["as-posted"][1]
        assert f in PRESETS["review"][1]


def test_presets() -> None:
    assert PRESETS["as-posted"] == ("cowpte", AS_POSTED_FLAWS)
    assert set(PRESETS["as-posted"][1]) == {f for f in FLAW_IDS if FLAW_ORIGINS[f] == "v4"}
    assert set(PRESETS["review"][1]) == set(FLAW_IDS)
    for name in PRESETS:
        assert preset_of(KernelConfig.from_preset(name)) == name
    assert KernelConfig.from_preset("as-posted").base == "6.2"
    assert KernelConfig.from_preset("fixed").base == "6.2"
    assert config_from_dict({"flaws": "as-posted"}).flaws == AS_POSTED_FLAWS


def test_vma_lock_needs_a_base_with_per_vma_locks() -> None:
    with pytest.raises(ValueError, match="vma_lock needs per-VMA locks"):
        KernelConfig(fault_mode="vma_lock", base="6.2")
    assert KernelConfig(fault_mode="vma_lock").base == "6.5"
    assert KernelConfig(fault_mode="vma_lock", base="6.4").base == "6.4"
    assert config_from_dict({"base": 6.5}).base == "6.5"
    with pytest.raises(ValueError, match="base"):
        KernelConfig(base="5.19")


@pytest.mark.parametrize("base", ["6.2", "6.5"])
def test_pte_offset_map_lock_rechecks_only_on_6_5(base: str) -> None:
    """6.5's __pte_offset_map_lock re-checks pmd_same under the PTL and retries; 6.2's
    macro does not: a table replaced while the caller waited for its PTL is handed back."""
    from cowenv.kernel.pgtable import PmdEntry

    k = make_kernel(KernelConfig(ptrs_per_pte=8, base=base), oracles=False)
    k.do(1, "mmap", addr=0x100000, length=0x8000)
    k.do(1, "write", addr=0x100000)
    tid2 = k.do(1, "clone")
    mm = k.procs[1].mm
    idx = 0x100000 // 4096 // 8
    old = mm.pmd[idx].table
    holder, waiter = k.threads[1], k.threads[tid2]
    ptl = k.pte_lockptr(mm, old)
    k.lock(holder, ptl, "write", "test")  # uncontended: taken at once
    gen = k.pte_offset_map_lock(waiter, mm, idx, "test")
    assert next(gen) == "test:wait"
    new = k.pte_alloc_one(mm, "test")
    mm.pmd[idx] = PmdEntry(new, True)  # the table is replaced while waiter waits
    k.unlock(holder, ptl, "write", "test")
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
    table, _ = stop.value.value
    assert table is (old if base == "6.2" else new)


@pytest.mark.parametrize("name", ["pmd-clear-window", "rmap-stale-table"])
def test_old_schedules_are_clean_on_v4(name: str) -> None:
    """The schedules the catalogue used to give are harmless on v4 as posted."""
    for p in sorted((ROOT / "scenarios" / "windows").glob("*.yaml")):
        sc = load_scenario(p)
        r = run_scenario(sc, flaws=[name])
        assert r.error is None and not r.violations, (p, r.violations)


def test_flaw_scenarios_flaw_alone_and_fixed() -> None:
    for p in sorted((ROOT / "scenarios" / "flaws").glob("*.yaml")):
        sc = load_scenario(p)
        r = run_scenario(sc, flaws=[p.stem])
        assert r.error is None and r.passed, (p, [v.signature for v in r.violations])
        r = run_scenario(sc, variant="fixed")
        assert r.error is None and not r.violations, (p, [v.signature for v in r.violations])
