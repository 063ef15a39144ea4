"""Lockdep as modelled after issue 12: primed with the documented order, one-shot."""

from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.locks import LOCK_ORDER, Lockdep


def test_documented_order_is_known_before_it_is_observed() -> None:
    ld = Lockdep()
    # ptl -> page_table_lock goes against pmd_lock -> PTE lock: reported the first time.
    assert ld.acquire(["ptl"], "page_table_lock") is not None
    assert not ld.debug_locks


def test_lockdep_reports_once_then_turns_itself_off() -> None:
    ld = Lockdep()
    assert ld.acquire(["mmap_lock"], "ptl") is None  # the documented direction
    assert ld.acquire(["anon_vma"], "mmap_lock") is not None
    assert ld.acquire(["ptl"], "anon_vma") is None  # debug_locks is off now


def test_order_table_is_upstreams() -> None:
    assert LOCK_ORDER.index("mmap_lock") < LOCK_ORDER.index("anon_vma")
    assert LOCK_ORDER.index("page_table_lock") < LOCK_ORDER.index("ptl")


def _fork_and_write(cfg: KernelConfig):
    k = make_kernel(cfg, oracles=False)
    k.do(1, "mmap", addr=0x100000, length=0x10000)  # two tables of 8 entries
    k.do(1, "write", addr=0x100000)
    k.do(1, "write", addr=0x108000)
    k.do(1, "prctl_cow_pte")
    k.do(1, "fork")
    k.do(1, "write", addr=0x100000)
    return k


def test_as_posted_splats_once_at_fork_then_assert_is_silent() -> None:
    k = _fork_and_write(KernelConfig.from_preset("as-posted", ptrs_per_pte=8))
    sigs = [v.signature for v in k.violations]
    assert sigs == ["lock-discipline@pmd_install"]


def test_assert_alone_warns_every_time() -> None:
    cfg = KernelConfig(variant="cowpte", flaws=("fault-asserts-write-lock",), ptrs_per_pte=8)
    k = _fork_and_write(cfg)
    k.do(1, "write", addr=0x108000)  # the other shared table
    assert [v.signature for v in k.violations] == ["lock-discipline@handle_cow_pte_fault"] * 2


def test_fixed_takes_pmd_lock_before_the_pte_lock() -> None:
    k = _fork_and_write(KernelConfig.from_preset("fixed", ptrs_per_pte=8))
    assert k.violations == []
    locks = [e for e in k.events if e.kind == "lock"]
    names = [e.label for e in locks]
    # In the break, page_table_lock (pmd_lock) is taken, then a ptl, never the reverse.
    i = max(j for j, n in enumerate(names) if n.endswith("page_table_lock"))
    assert names[i + 1].startswith("ptl:")
