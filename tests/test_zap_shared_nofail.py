"""The fixed design's zap of a partly covered shared PMD under total memory exhaustion.

Regression for the fixed soak's seed 184 (``benchmarks/soak.py --variant fixed --base 6.2
--seed 184 --episodes 1``): the frame pool and its reserve are used up, an OOM victim's
``exit_mmap`` zaps a VMA that covers only part of a PMD whose table it shares. Before the
fix the zap broke COW with a ``__GFP_NOFAIL`` allocation the model let fail, ignored the
failure and cleared entries of the still-shared table (``shared-table-write@zap_pte_range``).
Now teardown allocates nothing, and a ``__GFP_NOFAIL`` allocation outside teardown waits
for the OOM killer instead of returning NULL.
"""

from __future__ import annotations

import numpy as np

from cowenv.kernel import Kernel, make_kernel
from cowenv.kernel.config import AS_POSTED_FLAWS, KernelConfig
from cowenv.kernel.mm import MM_ANONPAGES
from cowenv.kernel.pgtable import PTE_PRESENT
from cowenv.workload import leak_report

PAGE = 4096
A = 0x100000  # PMD 32 with ptrs_per_pte=8: [A, A + 0x8000)
B = 0x110000  # PMD 34
C = 0x120000  # PMD 36
PMD_A = A // PAGE // 8


def _events(k: Kernel, label: str) -> list:
    return [e for e in k.events if e.kind == "event" and e.label == label]


def _shared_parent_child(flaws: tuple[str, ...] = ()) -> tuple[Kernel, int, int]:
    """Parent pid 1 with two VMAs in PMD A (a hole at page 3) and one in PMD B; COW PTE
    fork: the child (returned pid, tid) shares both tables."""
    k = make_kernel(KernelConfig(variant="cowpte", flaws=flaws, ptrs_per_pte=8,
                                 nr_frames=64, nr_swap_slots=0))
    k.do(1, "mmap", addr=A, length=3 * PAGE)
    k.do(1, "mmap", addr=A + 4 * PAGE, length=4 * PAGE)
    k.do(1, "mmap", addr=B, length=8 * PAGE)
    for addr in (A, A + PAGE, A + 4 * PAGE, A + 5 * PAGE, B):
        assert k.do(1, "write", addr=addr) > 0
    assert k.do(1, "prctl_cow_pte") == 0
    child = k.do(1, "fork")
    assert child > 1
    table = k.procs[1].mm.pmd[PMD_A].table
    assert k.procs[child].mm.pmd[PMD_A].table is table and table.refcount == 2
    return k, child, k.procs[child].tids[0]


def _fill_memory(k: Kernel, tid: int, base: int = C) -> None:
    """``tid`` maps 8 PMDs of private memory at ``base`` and writes until no frame is left.

    The pool is given no reserve first (``MemoryPool.RESERVE`` = 0 on this instance), so
    ordinary faults use every frame and nothing is left for a ``__GFP_NOFAIL``
    allocation either: seed 184's state, where the reserve had gone too. Each PMD's
    table is made first (two frames per first write), then one frame per write.
    """
    k.pool.RESERVE = 0
    assert k.do(tid, "mmap", addr=base, length=64 * PAGE) == base
    for i in range(0, 64, 8):
        if k.pool.nr_free < 2:
            break
        assert k.do(tid, "write", addr=base + i * PAGE) > 0
    for i in range(64):
        if k.pool.nr_free == 0:
            break
        if i % 8:
            assert k.do(tid, "write", addr=base + i * PAGE) > 0
    assert k.pool.nr_free == 0 and not _events(k, "oom_kill")


def _run(k: Kernel, limit: int = 10_000) -> None:
    """Step the runnable threads round-robin until none is left."""
    for n in range(limit):
        runnable = k.runnable_tids()
        if not runnable:
            return
        k.step(runnable[n % len(runnable)])
    raise AssertionError("no progress")


def test_oom_victim_exit_over_partly_covered_shared_pmd_allocates_nothing() -> None:
    """Seed 184's situation as a kernel-level schedule.

    The child fills memory (largest rss), reserve included; the parent's
    write fault cannot allocate and the OOM killer kills the child; the child's exit zaps
    VMA [A, A+3p), which covers PMD A only in part, while the parent still shares it.
    """
    k, child, ctid = _shared_parent_child()
    pmm = k.procs[1].mm
    table = pmm.pmd[PMD_A].table
    before = table.entries.copy()
    rss_before = int(pmm.rss[MM_ANONPAGES])
    _fill_memory(k, ctid)  # the child fills memory: it is the largest process
    # A store to a pte_none slot of the shared table breaks COW: no frame, VM_FAULT_OOM.
    k.start(1, "write", {"addr": A + 6 * PAGE})
    for _ in range(50):  # the parent alone, until the OOM killer has picked its victim
        if _events(k, "oom_kill"):
            break
        k.step(1)
    assert [e.data["pid"] for e in _events(k, "oom_kill")] == [child]
    while k.threads[ctid].gen is not None:  # the victim's exit runs first, alone
        k.step(ctid)
    assert not k.procs[child].alive and k.procs[child].mm.dead
    assert not _events(k, "nofail_retry")  # teardown allocated nothing
    assert not k.violations, k.violations  # no shared-table-write, check_mm clean
    # The parent's view is untouched, and its table is no longer shared.
    assert np.array_equal(table.entries, before) and table.refcount == 1
    assert int(pmm.rss[MM_ANONPAGES]) == rss_before
    _run(k)
    assert k.threads[1].result > 0 and not k.violations
    k.do(1, "exit")
    assert leak_report(k) == []


def test_partial_munmap_of_shared_pmd_waits_for_the_oom_killer() -> None:
    """Outside teardown a partial zap must break COW; with ``__GFP_NOFAIL`` the
    allocation loops through the OOM killer (here the parent, the largest process, is
    killed and its exit frees memory) and never fails."""
    k, child, ctid = _shared_parent_child()
    cmm = k.procs[child].mm
    shared = cmm.pmd[PMD_A].table
    before = shared.entries.copy()
    _fill_memory(k, 1)  # the parent fills memory: it is the largest process
    # munmap of [A+4p, A+8p): the VMA goes whole, the PMD only in part (A's VMA stays).
    k.start(ctid, "munmap", {"addr": A + 4 * PAGE, "length": 4 * PAGE})
    _run(k)
    assert k.threads[ctid].result == 0
    assert _events(k, "nofail_retry")
    assert [e.data["pid"] for e in _events(k, "oom_kill")] == [1]
    assert not k.violations, k.violations
    # The child has its own table now; the entries of [A, A+3p) survive, the rest is gone.
    mine = cmm.pmd[PMD_A].table
    assert mine.refcount == 1 and cmm.pmd[PMD_A].write
    assert np.array_equal(mine.entries[:3], before[:3])
    assert (mine.entries[:2] & PTE_PRESENT).all() and not mine.entries[3:].any()
    k.do(ctid, "exit")
    assert not k.violations and leak_report(k) == []


def test_as_posted_partial_zap_keeps_v4s_flaw() -> None:
    """As posted (flaw zap-partial-shared) the partial zap still breaks with an ordinary
    allocation and ignores its failure, as v4 does: the zap writes the shared table."""
    assert "zap-partial-shared" in AS_POSTED_FLAWS
    k, child, ctid = _shared_parent_child(("zap-partial-shared",))
    _fill_memory(k, 1)
    assert k.do(ctid, "munmap", addr=A + 4 * PAGE, length=4 * PAGE) == 0
    assert "shared-table-write@zap_pte_range" in {v.signature for v in k.violations}
    assert not _events(k, "nofail_retry")
