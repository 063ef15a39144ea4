"""Issue 12, the rest: v4's fork order, the double copy after recover_pte_range (C7),
the fixed design without per-fork bookkeeping, and the zero page under R/O long-term pins
on every base."""

import pytest

from cowenv.kernel import make_kernel
from cowenv.kernel.config import AS_POSTED_FLAWS, BASES, FLAW_ORIGINS, KernelConfig
from cowenv.kernel.memory import PG_anon_exclusive
from cowenv.kernel.mm import MM_ANONPAGES
from cowenv.kernel.pgtable import PFN_SHIFT, PTE_PRESENT, ZERO_PFN


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("fast", [False, True])
def test_ro_longterm_pin_of_the_zero_page_unshares_on_every_base(base: str, fast: bool) -> None:
    """84209e87c696 ("mm/gup: reliable R/O long-term pinning in COW mappings") is in
    v6.2-rc1, so on every modelled base a R/O FOLL_LONGTERM pin of the shared zero page in
    a private mapping unshares first (GUP-fast leaves the special zero-page PTE to the slow
    path); a later write through the page table is visible through the pin."""
    k = make_kernel(KernelConfig(ptrs_per_pte=8, base=base, nr_frames=64))
    addr = 0x100000
    k.do(1, "mmap", addr=addr, length=0x8000)
    assert k.do(1, "read", addr=addr) == 0
    mm = k.procs[1].mm
    idx, off = divmod(addr // 4096, 8)
    assert int(mm.pmd[idx].table.entries[off]) >> PFN_SHIFT == ZERO_PFN
    pin = k.do(1, "pin", addr=addr, write=False, fast=fast)
    assert pin > 0
    pfn = k.pins[pin].pfn
    pte = int(mm.pmd[idx].table.entries[off])
    assert pfn != ZERO_PFN and pte & PTE_PRESENT and pte >> PFN_SHIFT == pfn
    assert int(k.pool.flags[pfn]) & PG_anon_exclusive
    k.do(1, "write", addr=addr)
    assert k.do(1, "dev_read", pin=pin) == k.do(1, "read", addr=addr) != 0
    assert not k.violations


def test_new_fork_flaws_are_v4_and_as_posted() -> None:
    for f in ("fork-late-wrprotect", "recover-double-copy"):
        assert FLAW_ORIGINS[f] == "v4"
        assert f in AS_POSTED_FLAWS


@pytest.mark.parametrize("flaws", [(), ("recover-double-copy",)])
def test_second_vma_after_recover(flaws: tuple[str, ...]) -> None:
    """After recover_pte_range for the first VMA of a PMD, the next VMA's copy_pmd_range
    meets a writable child PMD: v4 shares again (double accounting: the child's rss
    counts the first VMA's page twice), the fixed design copies into pte_none slots."""
    k = make_kernel(KernelConfig(variant="cowpte", flaws=flaws, ptrs_per_pte=8,
                                 nr_frames=128))
    k.do(1, "mmap", addr=0x100000, length=0x8000)
    attrs = set(vars(k))
    k.do(1, "write", addr=0x100000)
    k.do(1, "write", addr=0x105000)
    assert k.do(1, "madvise", addr=0x102000, length=0x2000, advice="DONTFORK") == 0
    assert k.do(1, "prctl_cow_pte") == 0
    child = k.do(1, "fork")
    cmm = k.procs[child].mm
    assert int(cmm.pmd[0x100 // 8].table.entries[0]) != 0  # A's page recovered
    assert cmm.rss[MM_ANONPAGES] == (3 if flaws else 2)  # MM_ANONPAGES: A twice with v4
    assert bool(k.violations) == bool(flaws)
    # No per-fork bookkeeping: the kernel has the same state as before the fork.
    assert set(vars(k)) == attrs and not hasattr(k, "_recovered")


def test_v4_order_links_the_child_writable_before_the_entries() -> None:
    """fork-late-wrprotect: at v4's cond_resched() after the VMA the child's PMD points at
    the parent's table, both PMDs writable, table refcount 2; at the end both are
    write-protected."""
    k = make_kernel(KernelConfig(variant="cowpte", flaws=("fork-late-wrprotect",),
                                 ptrs_per_pte=8, nr_frames=128))
    k.do(1, "mmap", addr=0x100000, length=0x4000)
    k.do(1, "write", addr=0x100000)
    assert k.do(1, "prctl_cow_pte") == 0
    k.start(1, "fork")
    t = k.threads[1]
    while t.label != "copy_cow_pte_range:cond_resched":
        k.step(1)
    spmd = k.procs[1].mm.pmd[0x100 // 8]
    assert spmd.write and spmd.table.refcount == 2
    while t.gen is not None:
        k.step(1)
    assert not spmd.write
    assert not k.violations


def test_lenient_run_drops_a_fail_nth_event_for_a_dead_thread() -> None:
    """The minimiser's lenient replay skips a per-thread event whose thread has exited
    (a soak schedule minimised down past a thread's exit used to raise)."""
    from cowenv.minimize import run_lenient

    cfg = KernelConfig(ptrs_per_pte=8, nr_frames=64)
    steps = [{"tid": 1, "do": "clone"}, {"tid": 2, "do": "exit"},
             {"event": "fail_nth", "tid": 2, "n": 1},
             {"tid": 1, "do": "mmap", "args": {"addr": 0x100000, "length": 0x1000}}]
    run = run_lenient(cfg, steps)
    assert not any("event" in s for s in run.effective)
    assert [s.get("do") or s.get("start") for s in run.effective if "event" not in s][-1] == "mmap"
