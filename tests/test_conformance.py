"""The cow.c conformance scenarios: complete, meaningful, and passing on every variant.

``scenarios/conformance/`` holds every anonymous-base-page case of the kernel's
``tools/testing/selftests/mm/cow.c``, on a base page and on a swapped-out base page.
These tests check that the set is complete, that each scenario makes cow.c's own
comparison, that the swapped-out variants really start from a swap entry (cow.c skips
the test otherwise), that every variant passes, and that the scenarios fail on kernels
with the bugs the selftest exists to catch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import cowenv.scenario as scenario_mod
from cowenv.kernel import Kernel
from cowenv.kernel.memory import PG_anon, PG_anon_exclusive
from cowenv.kernel.mm import MMF_HAS_PINNED
from cowenv.kernel.pgtable import PFN_SHIFT, PTE_SWAP
from cowenv.scenario import apply_step, load_scenario, run_scenario

DIR = Path(__file__).resolve().parent.parent / "scenarios" / "conformance"
FILES = sorted(DIR.glob("*.yaml"))
HAVE_COWPTE = importlib.util.find_spec("cowenv.kernel.cowpte") is not None

#: cow.c's anon_test_cases (descriptions) -> scenario file stem, and the check message
#: the selftest prints for the comparison it makes.
COW_C_CASES = {
    "Basic COW after fork()": ("basic-cow-after-fork", "No leak from parent into child"),
    "Basic COW after fork() with mprotect() optimization":
        ("basic-cow-after-fork-mprotect", "No leak from parent into child"),
    "vmsplice() + unmap in child": ("vmsplice-unmap-in-child", "No leak from parent into child"),
    "vmsplice() + unmap in child with mprotect() optimization":
        ("vmsplice-unmap-in-child-mprotect", "No leak from parent into child"),
    "vmsplice() before fork(), unmap in parent after fork()":
        ("vmsplice-before-fork-unmap-in-parent", "No leak from child into parent"),
    "vmsplice() + unmap in parent after fork()":
        ("vmsplice-unmap-in-parent-after-fork", "No leak from child into parent"),
    "R/O-mapping a page registered as iouring fixed buffer":
        ("iouring-fixed-buffer-ro-mapped", "Longterm R/W pin is reliable"),
    "fork() with an iouring fixed buffer":
        ("iouring-fixed-buffer-fork", "Longterm R/W pin is reliable"),
    "R/O GUP pin on R/O-mapped shared page":
        ("ro-gup-pin-on-ro-mapped-shared-page", "Longterm R/O pin is reliable"),
    "R/O GUP-fast pin on R/O-mapped shared page":
        ("ro-gup-fast-pin-on-ro-mapped-shared-page", "Longterm R/O pin is reliable"),
    "R/O GUP pin on R/O-mapped previously-shared page":
        ("ro-gup-pin-on-ro-mapped-previously-shared-page", "Longterm R/O pin is reliable"),
    "R/O GUP-fast pin on R/O-mapped previously-shared page":
        ("ro-gup-fast-pin-on-ro-mapped-previously-shared-page", "Longterm R/O pin is reliable"),
    "R/O GUP pin on R/O-mapped exclusive page":
        ("ro-gup-pin-on-ro-mapped-exclusive-page", "Longterm R/O pin is reliable"),
    "R/O GUP-fast pin on R/O-mapped exclusive page":
        ("ro-gup-fast-pin-on-ro-mapped-exclusive-page", "Longterm R/O pin is reliable"),
}


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_every_anon_base_page_case_is_there() -> None:
    stems = {p.stem for p in FILES}
    for desc, (stem, _) in COW_C_CASES.items():
        assert stem in stems, f"missing {desc!r} ... with base page"
        assert f"{stem}-swapped" in stems, f"missing {desc!r} ... with swapped out base page"
    assert len(FILES) == 2 * len(COW_C_CASES)


@pytest.mark.parametrize("stem,check", sorted(COW_C_CASES.values()))
def test_scenario_makes_the_selftest_comparison(stem: str, check: str) -> None:
    for name in (stem, f"{stem}-swapped"):
        sc = load_scenario(DIR / f"{name}.yaml")
        checked = [s for s in sc.steps if s.get("check") == check]
        assert checked, f"{name}: no step carries cow.c's check {check!r}"
        assert all("expect" in s for s in checked)
        assert set(sc.expect_by_variant) >= {"as-posted", "fixed"}


@pytest.mark.parametrize("path", [p for p in FILES if p.stem.endswith("-swapped")],
                         ids=_ids([p for p in FILES if p.stem.endswith("-swapped")]))
def test_swapped_variant_really_swaps_out(path: Path) -> None:
    """cow.c skips the test unless ``pagemap_is_swapped`` after MADV_PAGEOUT."""
    sc = load_scenario(path)
    k = scenario_mod.make_kernel(sc.config)
    names: dict = {}
    pending: dict = {}
    for i, s in enumerate(sc.steps):
        apply_step(k, dict(s), names, pending, i)
        if s.get("do") == "madvise" and s["args"]["advice"] == "PAGEOUT":
            vpn = s["args"]["addr"] // 4096
            mm = k.procs[1].mm
            pte = int(mm.pmd[vpn // k.P].table.entries[vpn % k.P])
            assert pte & PTE_SWAP, f"{path.stem}: page not swapped out after MADV_PAGEOUT"
            return
    pytest.fail("no MADV_PAGEOUT step")


VARIANTS = ["classic"] + (["as-posted", "fixed"] if HAVE_COWPTE else [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_conformance_passes(variant: str) -> None:
    failed = []
    for p in FILES:
        r = run_scenario(load_scenario(p), variant=variant)
        if not r.passed:
            failed.append(f"{p.stem}: {r.error or [v.signature for v in r.violations]}")
    assert not failed, failed


# --------------------------------------------------------------------- planted bugs
class _ForkKeepsExclusive(Kernel):
    """fork forgets ``page_try_dup_anon_rmap``'s ClearPageAnonExclusive: a later write
    reuses the shared page (the COW leak cow.c exists for)."""

    def copy_pte_entries(self, *a, **kw):  # type: ignore[no-untyped-def]
        ret = yield from super().copy_pte_entries(*a, **kw)
        anon = (self.pool.flags & PG_anon) != 0
        self.pool.flags[anon] |= PG_anon_exclusive
        return ret


class _NoCopyForPinned(Kernel):
    """fork ignores ``page_needs_cow_for_dma``: the pinned page gets shared."""

    def copy_pte_entries(self, t, dst_vma, src_vma, *a, **kw):  # type: ignore[no-untyped-def]
        mm = src_vma.mm
        saved = mm.flags
        mm.flags &= ~MMF_HAS_PINNED
        try:
            return (yield from super().copy_pte_entries(t, dst_vma, src_vma, *a, **kw))
        finally:
            mm.flags = saved


class _NoUnshareOnRoPin(Kernel):
    """GUP takes a R/O pin on a maybe-shared anon page without FAULT_FLAG_UNSHARE."""

    def follow_page_pte(self, t, vma, vpn, write):  # type: ignore[no-untyped-def]
        r = yield from super().follow_page_pte(t, vma, vpn, write)
        if r == "unshare":
            pte = int(vma.mm.pmd[vpn // self.P].table.entries[vpn % self.P])
            if pte >> PFN_SHIFT:  # not the zero page
                return self._grab_pin(t, vma.mm, vpn, pte >> PFN_SHIFT, write)
        return r


@pytest.mark.parametrize("bug,check,min_failing", [
    (_ForkKeepsExclusive, "No leak from parent into child", 4),
    (_ForkKeepsExclusive, "No leak from child into parent", 2),
    (_NoCopyForPinned, "Longterm R/W pin is reliable", 2),
    (_NoUnshareOnRoPin, "Longterm R/O pin is reliable", 4),
])
def test_scenarios_catch_the_bugs_cow_c_catches(monkeypatch: pytest.MonkeyPatch, bug: type,
                                                check: str, min_failing: int) -> None:
    monkeypatch.setattr(scenario_mod, "make_kernel", lambda cfg, **kw: bug(cfg, **kw))
    failing = []
    for p in FILES:
        r = run_scenario(load_scenario(p))
        if any(v.kind == "selftest" and v.site == check for v in r.violations):
            failing.append(p.stem)
    assert len(failing) >= min_failing, failing


#: Files caught per planted bug, base-page vs swapped-out cases (cow.c's selftest checks).
#: Before the swap cache the swapped cases caught 1, 0 and 1: every swap-in made a fresh
#: exclusive copy, so a fork or pin bug never met a shared page.
PLANTED = {
    "fork keeps the page exclusive": (_ForkKeepsExclusive, 7, 7),
    "no unshare before a R/O pin": (_NoUnshareOnRoPin, 4, 4),
    "no copy for a pinned page": (_NoCopyForPinned, 1, 1),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_swapped_cases_catch_the_planted_bugs(monkeypatch: pytest.MonkeyPatch,
                                              name: str) -> None:
    """The swapped-out cases are meaningful: the swap cache shares the folio."""
    bug, n_base, n_swapped = PLANTED[name]
    monkeypatch.setattr(scenario_mod, "make_kernel", lambda cfg, **kw: bug(cfg, **kw))
    base, swapped = [], []
    for p in FILES:
        r = run_scenario(load_scenario(p))
        if any(v.kind == "selftest" for v in r.violations):
            (swapped if p.stem.endswith("-swapped") else base).append(p.stem)
    assert (len(base), len(swapped)) == (n_base, n_swapped), (base, swapped)


class _NoReclaimFlushBeforeFree(Kernel):
    """Planted (issue 13): reclaim frees a folio without flushing the TLB first.

    6.2 ``try_to_unmap_one`` (mm/rmap.c) clears the PTE with TTU_BATCH_FLUSH and
    ``shrink_folio_list`` (mm/vmscan.c) calls ``try_to_unmap_flush`` before the folio
    is written and freed; here the flush of ``try_to_unmap`` is forgotten, so the
    unmapped thread keeps a translation to the freed frame. The mmu_gather half of the
    same bug (``tests/test_tlb.py:_NoFlushBeforeFree``) is caught by no cow.c case: none
    touches memory after a zap, and fork's ``flush_tlb_mm`` drops the parent's entries.
    """

    _noflush = None

    def try_to_unmap(self, t, pfn, slot):  # type: ignore[no-untyped-def]
        self._noflush = t
        try:
            return (yield from super().try_to_unmap(t, pfn, slot))
        finally:
            self._noflush = None

    def flush_tlb_page(self, mm, vpn):  # type: ignore[no-untyped-def]
        if self._noflush is not None and self._cur is self._noflush:
            return
        super().flush_tlb_page(mm, vpn)


def test_swapped_cases_catch_a_missing_reclaim_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing TLB flush before reclaim frees a page: only swapped cases can see it.

    The thread that wrote the page before ``MADV_PAGEOUT`` still holds a writable
    translation; the R/O-pin cases store through it after the page was freed
    (``isolation@tlb_stale_write``). Base-page cases never reclaim, so they cannot.
    """
    monkeypatch.setattr(scenario_mod, "make_kernel",
                        lambda cfg, **kw: _NoReclaimFlushBeforeFree(cfg, **kw))
    base, swapped = [], []
    for p in FILES:
        r = run_scenario(load_scenario(p))
        if any(v.signature.startswith(("isolation@tlb_", "memory-safety@tlb_"))
               for v in r.violations):
            (swapped if p.stem.endswith("-swapped") else base).append(p.stem)
    assert base == []
    assert sorted(swapped) == ["ro-gup-fast-pin-on-ro-mapped-exclusive-page-swapped",
                               "ro-gup-pin-on-ro-mapped-exclusive-page-swapped"], swapped
    # The kernel without the planted bug is clean on the same files.
    monkeypatch.undo()
    for p in FILES:
        if p.stem in swapped:
            assert not run_scenario(load_scenario(p)).violations
