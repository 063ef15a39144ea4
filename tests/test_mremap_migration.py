"""The mremap and migration walkers (issue 13): semantics, COW PTE handling, planted bugs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cowenv.kernel import KernelConfig, make_kernel
from cowenv.kernel.pgtable import PFN_SHIFT, PTE_MIGRATION
from cowenv.scenario import load_scenario, run_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import mutation as mu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = sorted((ROOT / "scenarios" / "upstream").glob("*.yaml"))
T = 8 * 4096  # bytes per table at the small geometry


def _kernel(preset: str):  # type: ignore[no-untyped-def]
    return make_kernel(KernelConfig.from_preset(preset, ptrs_per_pte=8, nr_frames=256))


@pytest.mark.parametrize("preset", ["classic", "fixed"])
def test_mremap_moves_data_and_accounting(preset: str) -> None:
    k = _kernel(preset)
    k.do(1, "mmap", addr=16 * T + 3 * 4096, length=T)
    toks = [k.do(1, "write", addr=16 * T + (3 + i) * 4096) for i in range(8)]
    k.do(1, "prctl_cow_pte")
    k.do(1, "fork")
    rss = k.procs[1].mm.rss[1]
    # across PMDs, misaligned: extents bounded by both PMD boundaries
    assert k.do(1, "mremap", addr=16 * T + 3 * 4096, old_length=T, new_length=T,
                new_addr=40 * T + 5 * 4096) == 40 * T + 5 * 4096
    assert [k.do(1, "read", addr=40 * T + (5 + i) * 4096) for i in range(8)] == toks
    assert k.procs[1].mm.rss[1] == rss
    assert k.do(1, "read", addr=16 * T + 3 * 4096) < 0  # the old range is gone
    assert [k.do(2, "read", addr=16 * T + (3 + i) * 4096) for i in range(8)] == toks
    assert not k.violations, [v.signature for v in k.violations]


@pytest.mark.parametrize("preset", ["classic", "fixed"])
def test_mremap_whole_pmd_moves_the_table(preset: str) -> None:
    k = _kernel(preset)
    k.do(1, "mmap", addr=16 * T, length=T, populate=True)
    table = k.procs[1].mm.pmd[16].table
    assert k.do(1, "mremap", addr=16 * T, old_length=T, new_length=T,
                new_addr=32 * T) == 32 * T
    mm = k.procs[1].mm
    assert 16 not in mm.pmd and mm.pmd[32].table is table and mm.nr_ptes == 1
    assert not k.violations


def test_mremap_failure_moves_back_and_returns_enomem() -> None:
    k = _kernel("classic")
    k.do(1, "mmap", addr=16 * T + 4096, length=2 * 4096)
    tok = k.do(1, "write", addr=16 * T + 4096)
    k.event("fail_nth", n=1)  # the new PMD's pte_alloc fails
    assert k.do(1, "mremap", addr=16 * T + 4096, old_length=8192, new_length=8192,
                new_addr=40 * T) == -12
    assert k.do(1, "read", addr=16 * T + 4096) == tok
    assert k.do(1, "read", addr=40 * T) < 0
    assert not k.violations


def test_a_failed_unmap_of_the_old_range_leaves_it_mapped_and_empty() -> None:
    """Random agent, benchmark run (``fixed``): the old range reads zero, legitimately.

    ``move_vma`` (mm/mremap.c, 6.2) ignores a failing ``do_vmi_munmap`` of the old range
    ("OOM: unable to split vma, just get accounts right") and returns the new address:
    the old range stays mapped with its entries moved away, so a load there zero-fills.
    In the model only COW PTE's break in ``__split_vma`` can fail the split: here the
    table of the PMD after the old range is still shared with the child, the split at
    the old range's end must break it, and that allocation fails (the first one, the
    break of the old table in ``move_page_tables``, succeeds). The shadow used to keep
    the old range's data until ``on_munmap``, which never came: ``isolation`` at
    ``do_anonymous_page`` and ``shadow_sweep``.
    """
    k = _kernel("fixed")
    k.do(1, "mmap", addr=16 * T, length=2 * T)
    a = k.do(1, "write", addr=16 * T)
    b = k.do(1, "write", addr=16 * T + 7 * 4096)
    c = k.do(1, "write", addr=17 * T)
    k.do(1, "prctl_cow_pte")
    k.do(1, "fork")
    k.event("fail_nth", n=2)
    assert k.do(1, "mremap", addr=16 * T, old_length=T, new_length=T,
                new_addr=32 * T) == 32 * T
    mm = k.procs[1].mm
    assert [(v.start, v.end) for v in mm.vmas][:1] == [(16 * 8, 18 * 8)]  # not unmapped
    assert k.do(1, "read", addr=16 * T + 7 * 4096) == 0
    assert k.do(1, "read", addr=16 * T) == 0
    assert [k.do(1, "read", addr=32 * T), k.do(1, "read", addr=32 * T + 7 * 4096)] == [a, b]
    assert k.do(1, "read", addr=17 * T) == c
    assert k.do(2, "read", addr=16 * T + 7 * 4096) == b
    k.do(2, "exit")
    k.do(1, "exit")
    assert not k.violations, [v.signature for v in k.violations]


@pytest.mark.parametrize("preset", ["classic", "fixed"])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_mremap_failure_keeps_a_pin_at_the_old_address(preset: str, fail_at: int) -> None:
    """Soak classic seed 244: a pin's shadow must follow the entries moved back.

    ``move_vma`` (mm/mremap.c, 6.2): "On error, move entries back from new area to old
    ... and then proceed to unmap new area instead of old". The pinned page stays mapped
    at the old address, so a DMA write through the pin is what the process reads there.
    The shadow used to leave the pin at the new (unmapped) address: the DMA write was
    not recorded and the sweep reported the old address (``isolation@shadow_sweep``).
    ``fail_at`` picks the failing allocation: with 1 the first extent's ``pte_alloc``
    fails (nothing moved), with 2 the second's (the first page was moved, then moved
    back).
    """
    k = _kernel(preset)
    old = 16 * T + 6 * 4096  # two pages each side of a PMD boundary
    k.do(1, "mmap", addr=old - 4096, length=5 * 4096)
    toks = [k.do(1, "write", addr=old + i * 4096) for i in range(3)]
    pins = [k.do(1, "pin", addr=old + i * 4096, write=True) for i in range(3)]
    assert min(pins) > 0
    k.event("fail_nth", n=fail_at)
    writes = k.cost.counts.get("pte_write", 0)
    assert k.do(1, "mremap", addr=old, old_length=3 * 4096, new_length=4 * 4096,
                maymove=True, new_addr=40 * T + 7 * 4096) == -12
    # move_ptes charges 2 PTE writes per entry moved: one entry there and back, or none
    assert k.cost.counts.get("pte_write", 0) - writes == (4 if fail_at == 2 else 0)
    assert [k.do(1, "read", addr=old + i * 4096) for i in range(3)] == toks
    dma = [k.do(1, "dev_write", pin=p) for p in pins]
    assert [k.do(1, "read", addr=old + i * 4096) for i in range(3)] == dma
    assert k.do(1, "read", addr=40 * T + 7 * 4096) < 0  # the new range was unmapped
    assert not k.violations, [(v.signature, v.message) for v in k.violations]


@pytest.mark.parametrize("preset", ["classic", "fixed"])
@pytest.mark.parametrize("fail_at", [0, 2])
def test_a_gup_fast_pin_taken_during_mremap_follows_its_page(preset: str,
                                                             fail_at: int) -> None:
    """GUP-fast takes no mmap_lock: it may pin a page mremap has not moved yet.

    After a complete move the page is mapped at the new address, and a DMA write through
    the pin is what the process reads there (the shadow used to keep the pin at the old,
    unmapped address: ``isolation@shadow_sweep`` on the new one). After a short move
    (``fail_at`` 2) it is back at the old address.
    """
    k = _kernel(preset)
    old, new = 16 * T + 6 * 4096, 40 * T + 7 * 4096
    k.do(1, "mmap", addr=old - 4096, length=5 * 4096)
    for i in range(3):
        k.do(1, "write", addr=old + i * 4096)
    tid = k.do(1, "clone")
    if fail_at:
        k.event("fail_nth", n=fail_at)
    k.start(1, "mremap", {"addr": old, "old_length": 3 * 4096, "new_length": 4 * 4096,
                          "maymove": True, "new_addr": new})
    while k.threads[1].label != "move_page_tables:cond_resched":
        k.step(1)  # copy_vma done, no entry moved yet
    pin = k.do(tid, "pin", addr=old + 2 * 4096, write=True, fast=True)
    assert pin > 0
    ret = k.run(1)
    assert ret == (-12 if fail_at else new)
    dma = k.do(tid, "dev_write", pin=pin)
    assert k.do(tid, "read", addr=(old if fail_at else new) + 2 * 4096) == dma
    assert not k.violations, [(v.signature, v.message) for v in k.violations]


@pytest.mark.parametrize("preset", ["classic", "fixed"])
def test_migration_moves_to_a_new_frame(preset: str) -> None:
    k = _kernel(preset)
    k.do(1, "mmap", addr=16 * T, length=T)
    tok = k.do(1, "write", addr=16 * T)
    k.do(1, "prctl_cow_pte")
    k.do(1, "fork")
    mm = k.procs[1].mm
    old = int(mm.pmd[16].table.entries[0]) >> PFN_SHIFT
    # mapcount 2: the page's status is -EACCES, the call itself succeeds (do_pages_move)
    assert k.do(1, "move_pages", addr=16 * T, length=4096) == 0
    assert k.threads[1].out == {"status": [-13]}
    assert k.do(1, "move_pages", addr=16 * T, length=4096, all=True) == 0
    assert k.threads[1].out == {"status": [0]}
    new = int(k.procs[1].mm.pmd[16].table.entries[0]) >> PFN_SHIFT
    assert new != old and k.pool.is_free(old)
    assert k.do(2, "read", addr=16 * T) == tok and k.do(1, "read", addr=16 * T) == tok
    assert not k.violations, [v.signature for v in k.violations]


def test_a_fault_waits_on_a_migration_entry() -> None:
    k = _kernel("classic")
    k.do(1, "mmap", addr=16 * T, length=T)
    tok = k.do(1, "write", addr=16 * T)
    k.do(1, "clone")
    k.start(1, "move_pages", {"addr": 16 * T, "length": 4096})
    while k.step(1) != "move_to_new_folio:done":
        pass
    assert int(k.procs[1].mm.pmd[16].table.entries[0]) & PTE_MIGRATION
    k.start(2, "read", {"addr": 16 * T})
    assert [k.step(2) for _ in range(3)][-1] == "migration_entry_wait:folio_wait"
    assert k.run(1) == 0
    assert k.run(2) == tok
    assert not k.violations


def test_split_vma_breaks_cow_as_v4() -> None:
    """v4 03/14 mm/mmap.c: __split_vma breaks the table of the split address first."""
    k = _kernel("fixed")
    k.do(1, "mmap", addr=16 * T, length=T, populate=True)
    k.do(1, "prctl_cow_pte")
    k.do(1, "fork")
    mm = k.procs[1].mm
    assert not mm.pmd[16].write
    k.event("fail_nth", n=1)
    assert k.do(1, "munmap", addr=16 * T + 4 * 4096, length=4096) == -12  # split failed
    assert len(mm.vmas) == 1 and not mm.pmd[16].write
    assert k.do(1, "munmap", addr=16 * T + 4 * 4096, length=4096) == 0
    assert mm.pmd[16].write and mm.pmd[16].table.refcount == 1
    assert not k.violations


@pytest.mark.parametrize("mutant,signature", [
    ("mremap-drops-rss", "accounting@get_mm_counter"),
    ("migration-entry-left", "accounting@remove_migration_ptes"),
])
def test_planted_walker_bugs_are_caught(mutant: str, signature: str) -> None:
    """Issue 13 "Must show": each planted bug of the new paths is caught by a scenario."""
    m = next(x for x in mu.MUTANTS if x.name == mutant)
    caught = []
    with mu.planted(m):
        for p in UPSTREAM:
            r = run_scenario(load_scenario(p), "fixed")
            if any(v.signature == signature for v in r.violations):
                caught.append(p.stem)
    assert caught, f"{mutant}: no upstream scenario reports {signature}"
    for p in UPSTREAM:
        assert run_scenario(load_scenario(p), "fixed").passed, p.stem


def test_move_pages_status_array_as_do_pages_move() -> None:
    """Per-page status of do_pages_move/do_pages_stat (mm/migrate.c, 6.2)."""
    k = _kernel("classic")
    k.do(1, "mmap", addr=16 * T, length=T)
    k.do(1, "write", addr=16 * T)             # page 0: anonymous, movable
    k.do(1, "read", addr=16 * T + 4096)       # page 1: the zero page
    # page 2: never touched (none entry of an anonymous VMA); page 3 swapped out
    k.do(1, "write", addr=16 * T + 3 * 4096)
    k.do(1, "madvise", addr=16 * T + 3 * 4096, length=4096, advice="PAGEOUT")
    k.do(1, "write", addr=16 * T + 4 * 4096)  # page 4: movable
    pin = k.do(1, "pin", addr=16 * T + 4 * 4096, write=True)
    assert pin > 0
    assert k.do(1, "move_pages", addr=16 * T, length=5 * 4096, stat=True) == 0
    assert k.threads[1].out == {"status": [0, -14, -14, -2, 0]}
    ev = [e for e in k.events if e.kind == "out"][-1]
    assert ev.label == "move_pages" and ev.data == {"status": [0, -14, -14, -2, 0]}
    # Page 1 flushes the batch {0}: migrated, node 0; pages 1-3 fail lookup; page 4 is
    # pinned: isolated, migration fails 10 times: 1 not migrated, its slot not written.
    assert k.do(1, "move_pages", addr=16 * T, length=5 * 4096) == 1
    assert k.threads[1].out == {"status": [0, -14, -14, -2, None]}
    assert k.do(1, "move_pages", addr=16 * T + 4 * 4096, length=4096) == 1
    assert k.threads[1].out == {"status": [None]}
    k.do(1, "munmap", addr=16 * T + 5 * 4096, length=4096)
    # The pinned page before a failing one: status[1] = -EFAULT, the batch {page 4}
    # fails 1: 1 + nr_pages - i = 1 + 2 - 1, then "if (err > 0) err--" (page i counted).
    assert k.do(1, "move_pages", addr=16 * T + 4 * 4096, length=2 * 4096) == 1
    assert k.threads[1].out == {"status": [None, -14]}
    assert not k.violations, [v.signature for v in k.violations]
