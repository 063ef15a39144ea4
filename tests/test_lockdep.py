"""Lockdep as modelled after issue 12: primed with the documented order, one-shot."""

from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.locks import LOCK_ORDER, Lockdep, SpinLock


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


def _two_ptls(k, subclass: int, split: bool = True):
    """Thread 1 holds table A's PTL and takes table B's (or the PMD lock)."""
    k.do(1, "mmap", addr=0x100000, length=0x10000)  # two tables of 8 entries
    k.do(1, "write", addr=0x100000)
    k.do(1, "write", addr=0x108000)
    mm = k.procs[1].mm
    t = k.threads[1]
    a, b = (k.pte_lockptr(mm, mm.pmd[i].table) for i in (32, 33))  # PMDs of 0x100000, 0x108000
    list(k.lock(t, a, "write", "first"))
    list(k.lock(t, b, "write", "second", subclass))
    return [v for v in k.violations if "recursive locking" in v.message]


def test_same_class_ptl_nesting_needs_a_subclass() -> None:
    """lockdep's check_deadlock: two ptlocks (one class, ptlock_init) need spin_lock_nested."""
    cfg = KernelConfig.from_preset("classic", ptrs_per_pte=8)
    found = _two_ptls(make_kernel(cfg, oracles=False), 0)
    assert [v.signature for v in found] == ["lock-discipline@second"]
    assert "subclass 0" in found[0].message
    assert _two_ptls(make_kernel(cfg, oracles=False), 1) == []  # SINGLE_DEPTH_NESTING


def test_split_pmd_lock_is_a_ptlock_and_set_subclass_moves_it() -> None:
    k = make_kernel(KernelConfig.from_preset("fixed", ptrs_per_pte=8), oracles=False)
    mm = k.procs[1].mm
    assert k.lockdep_key(mm.page_table_lock) == k.lockdep_key(SpinLock("x", "ptl")) == "ptlock"
    nosplit = make_kernel(KernelConfig.from_preset("fixed", ptrs_per_pte=8, split_ptl=False),
                          oracles=False)
    assert nosplit.lockdep_key(nosplit.procs[1].mm.page_table_lock) == "page_table_lock"
    # lock_set_subclass: a PTL held at subclass 1 recorded back at 0 collides with a
    # second plain acquisition (v4's dst_ptl, then src_ptl).
    k.do(1, "mmap", addr=0x100000, length=0x10000)
    k.do(1, "write", addr=0x100000)
    k.do(1, "write", addr=0x108000)
    t = k.threads[1]
    a, b = (k.pte_lockptr(mm, mm.pmd[i].table) for i in (32, 33))  # PMDs of 0x100000, 0x108000
    list(k.lock(t, a, "write", "first", 1))
    k.lock_set_subclass(t, a, 0)
    list(k.lock(t, b, "write", "second"))
    assert [v.signature for v in k.violations] == ["lock-discipline@second"]


def test_classic_and_fixed_forks_breaks_and_mremaps_are_annotated() -> None:
    for preset in ("classic", "fixed"):
        k = _fork_and_write(KernelConfig.from_preset(preset, ptrs_per_pte=8))
        k.do(2, "write", addr=0x108000)
        assert k.do(1, "mremap", addr=0x100000, old_length=0x1000, new_length=0x1000,
                    new_addr=0x200000) == 0x200000
        assert not [v for v in k.violations if v.kind == "lock-discipline"], preset
