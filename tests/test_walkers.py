"""Issue 13's walkers: NUMA hinting, swapoff, clear_refs/pagemap and PROT_NONE.

Unit checks of the upstream semantics the scenarios under ``scenarios/upstream/`` do not
pin down, the planted bug "swapoff skipping one mm" (caught by a scenario), and the
per-thread fail-nth catalogue actions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.memory import PG_locked
from cowenv.kernel.pgtable import PTE_PRESENT, PTE_SOFT_DIRTY, PTE_SWAP, PTE_USER, PTE_WRITE
from cowenv.kernel.task_mmu import PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP
from cowenv.scenario import load_scenario, run_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import mutation as mu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
A = 0x100000


def kern(preset: str = "classic", **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("ptrs_per_pte", 8)
    kw.setdefault("nr_frames", 128)
    kw.setdefault("nr_swap_slots", 32)
    return make_kernel(KernelConfig.from_preset(preset, **kw))


def pte(k, tid: int, addr: int) -> int:  # type: ignore[no-untyped-def]
    mm = k.mm_of(k.threads[tid])
    vpn = addr // 4096
    return int(mm.pmd[vpn // k.P].table.entries[vpn % k.P])


# ------------------------------------------------------------------ PROT_NONE / NUMA
def test_prot_none_is_protnone_and_sigsegv_without_fixing_the_entry():
    k = kern()
    k.do(1, "mmap", addr=A, length=0x2000)
    tok = k.do(1, "write", addr=A)
    assert k.do(1, "mprotect", addr=A, length=0x2000, prot="none") == 0
    e = pte(k, 1, A)
    assert e & PTE_PRESENT and not e & (PTE_USER | PTE_WRITE)  # pte_protnone
    assert k.do(1, "read", addr=A) == -14 and k.do(1, "write", addr=A) == -14
    assert pte(k, 1, A) == e  # no "spurious fault fix" rewrote it
    assert k.do(1, "pagemap", addr=A) & PM_PRESENT  # pte_present() still true
    assert k.do(1, "mprotect", addr=A, length=0x2000, prot="r") == 0
    assert k.do(1, "read", addr=A) == tok and not k.violations


def test_numa_hint_skips_single_threaded_shared_and_zero_pages():
    k = kern()
    k.do(1, "mmap", addr=A, length=0x4000)
    k.do(1, "write", addr=A)
    k.do(1, "read", addr=A + 0x1000)  # zero page
    assert k.do(1, "numa_hint", addr=A, length=0x4000) == 0  # mm_users == 1
    k.do(1, "clone")
    assert k.do(1, "numa_hint", addr=A, length=0x4000) == 1
    e = pte(k, 1, A)
    assert not e & PTE_USER and not e & PTE_WRITE
    assert k.do(2, "write", addr=A) > 0  # do_numa_page, writable again (exclusive anon)
    assert pte(k, 1, A) & PTE_WRITE
    k.do(1, "fork")
    assert k.do(1, "numa_hint", addr=A, length=0x4000) == 0  # page_count != 1
    assert not k.violations and not k.defects


def test_numa_hint_trylock_fails_while_mmap_lock_is_write_held():
    k = kern()
    k.do(1, "mmap", addr=A, length=0x2000)
    k.do(1, "write", addr=A)
    k.do(1, "clone")
    k.start(2, "mprotect", {"addr": A, "length": 0x1000, "prot": "r"})
    k.step(2)  # holds mmap_lock for write
    assert k.threads[2].gen is not None
    assert k.do(1, "numa_hint", addr=A, length=0x2000) == 0  # mmap_read_trylock failed
    k.run(2)


# ------------------------------------------------------------------ soft-dirty
def test_soft_dirty_survives_swap_out_and_in():
    k = kern()
    k.do(1, "mmap", addr=A, length=0x1000)
    k.do(1, "write", addr=A)
    assert pte(k, 1, A) & PTE_SOFT_DIRTY
    assert k.do(1, "madvise", addr=A, length=0x1000, advice="PAGEOUT") == 0
    k.do(0, "reclaim", nr=4)
    e = pte(k, 1, A)
    assert e & PTE_SWAP and e & PTE_SOFT_DIRTY  # pte_swp_mksoft_dirty
    assert k.do(1, "clear_refs", type=4) == 0
    assert not pte(k, 1, A) & PTE_SOFT_DIRTY  # pte_swp_clear_soft_dirty
    assert k.do(1, "pagemap", addr=A) == PM_SWAP
    k.do(1, "read", addr=A)
    assert k.do(1, "pagemap", addr=A) & (PM_PRESENT | PM_SOFT_DIRTY) == PM_PRESENT


def test_clear_refs_skips_pinned_writable_entries_and_rejects_bad_input():
    k = kern()
    k.do(1, "mmap", addr=A, length=0x2000)
    k.do(1, "write", addr=A)
    k.do(1, "write", addr=A + 0x1000)
    assert k.do(1, "pin", addr=A, write=True) > 0
    assert k.do(1, "clear_refs", type=4) == 0
    assert pte(k, 1, A) & PTE_WRITE  # pte_is_pinned: left alone
    assert not pte(k, 1, A + 0x1000) & PTE_WRITE
    assert k.do(1, "clear_refs", type=5) == -22 and k.do(1, "clear_refs", type=4, pid=99) == -3


def test_clear_refs_young_types_touch_only_accessed_bits():
    k = kern()
    k.do(1, "mmap", addr=A, length=0x1000)
    k.do(1, "write", addr=A)
    before = pte(k, 1, A)
    assert k.do(1, "clear_refs", type=2) == 0
    assert pte(k, 1, A) == before & ~(1 << 3)
    assert k.do(1, "clear_refs", type=3) == 0  # only file (shmem) VMAs
    assert pte(k, 1, A) == before & ~(1 << 3)


# ------------------------------------------------------------------ swapoff
def test_swapoff_empties_the_device_and_keeps_it_usable():
    k = kern()
    k.do(1, "mmap", addr=A, length=0x4000)
    toks = [k.do(1, "write", addr=A + i * 0x1000) for i in range(4)]
    k.do(1, "madvise", addr=A, length=0x4000, advice="PAGEOUT")
    k.do(0, "reclaim", nr=8)
    k.do(1, "fork")
    assert k.swap.inuse_pages() > 0
    assert k.do(1, "swapoff") == 0
    assert k.swap.inuse_pages() == 0 and k.swap.writeok
    assert [k.do(2, "read", addr=A + i * 0x1000) for i in range(4)] == toks
    k.oracle.check_accounting()
    assert not k.violations and not k.defects


def test_swapoff_fails_with_enomem_and_reinserts_the_device():
    k = kern(nr_frames=32)
    k.do(1, "mmap", addr=A, length=0x4000)
    for i in range(4):
        k.do(1, "write", addr=A + i * 0x1000)
    k.do(1, "madvise", addr=A, length=0x4000, advice="PAGEOUT")
    k.do(0, "reclaim", nr=8)
    k.event("fail_nth", tid=1, n=1)
    assert k.do(1, "swapoff") == -12
    assert k.swap.writeok and k.swap.inuse_pages() > 0
    assert k.do(1, "swapoff") == 0 and k.swap.inuse_pages() == 0


def test_planted_swapoff_skipping_one_mm_is_caught_by_a_scenario():
    sc = load_scenario(ROOT / "scenarios" / "upstream" / "swapoff.yaml")
    assert run_scenario(sc).passed
    m = next(m for m in mu.MUTANTS if m.name == "swapoff-skips-mm")
    with mu.planted(m):
        r = run_scenario(sc)
    assert not r.passed
    sites = {v.site for v in r.violations if v.kind == "selftest"}
    assert "swapoff brings every entry back" in sites
    assert "child entry present after swapoff" in sites
    # The oracle sees it at the first pass that ran alone, before the return value.
    first = r.violations[0]
    assert first.signature == "syscall-contract@swapoff" and "mm2 vpn 0x100" in first.message
    assert run_scenario(sc).passed


def test_swapoff_may_give_up_only_while_another_task_is_in_the_kernel():
    """The pass cap stands in for a signal: legitimate while reclaim holds a folio locked.

    kswapd paused in ``folio_referenced`` with a swap-cache folio locked: the kernel's
    swapoff would sleep in ``folio_lock``; the model's skips it, spins through its 16
    passes and returns -EINTR -- and the oracle stays silent, since no pass ran alone.
    Once kswapd is done, a swapoff that runs alone succeeds.
    """
    k = kern("fixed")
    k.do(1, "mmap", addr=A, length=0x2000)
    k.do(1, "write", addr=A)
    k.do(1, "write", addr=A + 0x1000)
    k.do(1, "madvise", addr=A, length=0x2000, advice="PAGEOUT")
    k.do(0, "reclaim", nr=8)
    k.do(1, "read", addr=A)  # swapped in: mapped and still in the swap cache
    k.start(0, "reclaim", {"nr": 8})
    while not any(int(k.pool.flags[p]) & PG_locked for p in k.swap.cache.values()):
        k.step(0)
    assert k.do(1, "swapoff") == -4
    assert not k.violations
    k.run(0)
    assert k.do(1, "swapoff") == 0 and k.swap.inuse_pages() == 0
    assert not k.violations


# ------------------------------------------------------------------ catalogue
def test_per_thread_fail_nth_actions_and_observation():
    from cowenv.env import CowEnv

    env = CowEnv(geometry="small", preset="fixed")
    env.reset(seed=0)
    idx = {sp.tid: i for i, sp in enumerate(env.catalogue)
           if sp.kind == "event" and sp.tid > 0 and sp.n == 1}
    obs, _, _, _, info = env.step(idx[2])
    assert not info["illegal_action"] and env.kernel.threads[2].fail_nth_next == 1
    t0, t1 = env.obs_layout["threads"]
    width = (t1 - t0) // (env.config.max_threads + 1)
    assert obs[t0 + 2 * width + width - 1] == pytest.approx(1 / 3)
    assert obs[t0 + 1 * width + width - 1] == 0.0
    assert not env.action_masks()[idx[2]]  # one pending write at a time
    rec = env.get_schedule()["steps"][-1]
    assert rec == {"event": "fail_nth", "tid": 2, "n": 1}
    assert np.isfinite(obs).all()
    # The armed counter is consumed by thread 2's next operation and reset at its end.
    env.step(env.find_actions("read", tid=2)[0])
    assert env.kernel.threads[2].fail_nth_next == 0
