"""The swap cache (mm/swap_state.c, 6.2): one folio per slot, shared by every swap PTE."""

from __future__ import annotations

from cowenv.kernel import Kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.memory import PG_anon_exclusive, PG_swapcache
from cowenv.kernel.pgtable import PFN_SHIFT, PTE_PRESENT, PTE_SWAP, PTE_SWP_EXCLUSIVE, PTE_WRITE
from cowenv.workload import leak_report

A = 0x100000


def _k() -> Kernel:
    return Kernel(KernelConfig(ptrs_per_pte=8, nr_frames=64, nr_swap_slots=16))


def _pte(k: Kernel, pid: int, addr: int = A) -> int:
    vpn = addr // 4096
    return int(k.procs[pid].mm.pmd[vpn // k.P].table.entries[vpn % k.P])


def _clean(k: Kernel) -> None:
    assert not k.violations, [v.signature for v in k.violations]


def test_pageout_keeps_the_folio_in_the_swap_cache() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    tok = k.do(1, "write", addr=A)
    pfn = _pte(k, 1) >> PFN_SHIFT
    assert k.do(1, "madvise", addr=A, length=4096, advice="PAGEOUT") == 0
    pte = _pte(k, 1)
    assert pte & PTE_SWAP and pte & PTE_SWP_EXCLUSIVE
    slot = pte >> PFN_SHIFT
    assert k.swap.cache == {slot: pfn} and k.pool.flags[pfn] & PG_swapcache
    assert not k.pool.flags[pfn] & PG_anon_exclusive  # exclusivity is in the swap PTE
    assert k.swap.data[slot] == tok  # pageout wrote it
    # A read swap-in finds the cached folio and maps it exclusive (pte_swp_exclusive) R/O.
    assert k.do(1, "read", addr=A) == tok
    pte = _pte(k, 1)
    assert pte & PTE_PRESENT and not pte & PTE_WRITE and pte >> PFN_SHIFT == pfn
    assert k.pool.flags[pfn] & PG_anon_exclusive and k.pool.flags[pfn] & PG_swapcache
    # The write reuses it (PageAnonExclusive); the stale slot stays until freed.
    k.do(1, "write", addr=A)
    assert _pte(k, 1) >> PFN_SHIFT == pfn
    k.do(1, "exit")
    assert not leak_report(k)
    _clean(k)


def test_two_processes_share_one_swap_cache_folio() -> None:
    """Fork after swap-out: both swap-ins map the same folio (no second copy)."""
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    tok = k.do(1, "write", addr=A)
    k.do(1, "madvise", addr=A, length=4096, advice="PAGEOUT")
    k.do(1, "fork")
    slot = _pte(k, 1) >> PFN_SHIFT
    assert not _pte(k, 1) & PTE_SWP_EXCLUSIVE  # fork marked the entry shared
    assert k.swap.swap_map[slot] == 2
    assert k.do(2, "read", addr=A) == tok
    assert k.do(1, "read", addr=A) == tok
    p1, p2 = _pte(k, 1) >> PFN_SHIFT, _pte(k, 2) >> PFN_SHIFT
    assert p1 == p2 and k.pool.mapcount[p1] == 2
    assert k.pool.refcount[p1] == 3  # two mappings + the swap cache
    # The parent's write must copy (refcount > 1 + swapcache); the child keeps the old.
    new = k.do(1, "write", addr=A)
    assert _pte(k, 1) >> PFN_SHIFT != p1
    assert k.do(2, "read", addr=A) == tok and k.do(1, "read", addr=A) == new
    k.do(2, "exit")
    k.do(1, "exit")
    assert not leak_report(k)
    _clean(k)


def test_reclaim_unmaps_every_process_then_frees_from_the_cache() -> None:
    """kswapd: try_to_unmap over both mappings; written, kept; a second pass frees."""
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    tok = k.do(1, "write", addr=A)
    k.do(1, "fork")
    assert k.do(2, "read", addr=A) == tok
    pfn = _pte(k, 1) >> PFN_SHIFT
    # Clear the young bits first (folio_referenced rotates referenced folios).
    k.do(0, "reclaim", nr=1, pid=1, addr=A)
    k.do(0, "reclaim", nr=1, pid=1, addr=A)
    assert _pte(k, 1) & PTE_SWAP and _pte(k, 2) & PTE_SWAP
    slot = _pte(k, 1) >> PFN_SHIFT
    assert _pte(k, 2) >> PFN_SHIFT == slot and k.swap.swap_map[slot] == 2
    assert k.swap.cache.get(slot) == pfn and k.pool.mapcount[pfn] == 0
    k.do(0, "reclaim", nr=8)  # __remove_mapping: the clean folio leaves the cache
    assert slot not in k.swap.cache and k.pool.is_free(pfn)
    assert k.do(2, "read", addr=A) == tok and k.do(1, "read", addr=A) == tok
    assert _pte(k, 1) >> PFN_SHIFT == _pte(k, 2) >> PFN_SHIFT  # one new cached folio
    k.do(1, "exit")
    k.do(2, "exit")
    assert not leak_report(k)
    _clean(k)


def test_zap_of_the_last_swap_pte_frees_an_unmapped_cache_folio() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    k.do(1, "write", addr=A)
    pfn = _pte(k, 1) >> PFN_SHIFT
    k.do(1, "madvise", addr=A, length=4096, advice="PAGEOUT")
    assert k.do(1, "munmap", addr=A, length=4096) == 0  # free_swap_and_cache
    assert not k.swap.cache and k.pool.is_free(pfn) and len(k.swap.free) == k.swap.nr
    _clean(k)
