"""OOM as 6.2 does it, and per-thread fault injection (/proc/thread-self/fail-nth)."""

from __future__ import annotations

import pytest

from cowenv.kernel import Kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.ops import ENOMEM
from cowenv.kernel.sched import KernelUsageError
from cowenv.workload import leak_report

A = 0x100000


def _k(nr_frames: int = 64) -> Kernel:
    return Kernel(KernelConfig(ptrs_per_pte=8, nr_frames=nr_frames, nr_swap_slots=0))


def _events(k: Kernel, label: str) -> list:
    return [e for e in k.events if e.kind == "event" and e.label == label]


def test_injected_fault_failure_retries_the_access() -> None:
    """VM_FAULT_OOM → pagefault_out_of_memory: "Retrying PF"; a store never gets -ENOMEM."""
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    k.event("fail_nth", tid=1, n=1)
    tok = k.do(1, "write", addr=A)
    assert tok > 0 and len(_events(k, "alloc_fail")) == 1
    assert not _events(k, "oom_kill")  # an injected failure kills nobody
    assert not k.violations


def test_fail_nth_is_per_thread_and_per_operation() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=8 * 4096)
    k.do(1, "clone")
    k.event("fail_nth", tid=2, n=1)
    k.do(1, "write", addr=A)  # tid 1's allocations are not affected
    assert not _events(k, "alloc_fail")
    # fork's first allocation (the child's PTE table) fails: -ENOMEM, as fork(2) does.
    assert k.do(2, "fork") == -ENOMEM
    assert len(_events(k, "alloc_fail")) == 1
    # The counter applies to one operation only and is reset when it returns.
    k.event("fail_nth", tid=1, n=50)
    k.do(1, "write", addr=A + 4096)
    assert k.threads[1].fail_nth == 0 and k.threads[1].fail_nth_next == 0
    k.do(1, "write", addr=A + 2 * 4096)
    assert len(_events(k, "alloc_fail")) == 1
    with pytest.raises(KernelUsageError):
        k.event("fail_nth", tid=9, n=1)


def test_pressure_event_is_kernel_wide() -> None:
    k = _k()
    k.do(1, "mmap", addr=A, length=4096)
    k.event("pressure_fail_nth", n=1)
    assert k.do(1, "write", addr=A) > 0  # retried after the injected failure
    assert len(_events(k, "alloc_fail")) == 1 and k.fail_nth == 0


def test_oom_kills_the_largest_process_and_the_access_retries() -> None:
    """Pool exhaustion in a fault: out_of_memory kills the top oom_badness process."""
    k = _k(nr_frames=48)
    k.do(1, "mmap", addr=A, length=64 * 4096)
    k.do(1, "write", addr=A + 63 * 4096)  # the parent's table for its last page
    k.do(1, "fork")  # pid 2 (tid 2)
    i = 0
    while k.pool.nr_free > k.pool.RESERVE:  # the child fills memory
        assert k.do(2, "write", addr=A + i * 4096) > 0
        i += 1
    assert not _events(k, "oom_kill")
    # The parent's store cannot allocate: the child (largest rss) is killed.
    k.start(1, "write", {"addr": A + 62 * 4096})
    for _ in range(10_000):
        runnable = k.runnable_tids()
        if not runnable:
            break
        k.step(2 if 2 in runnable else runnable[0])
    kills = _events(k, "oom_kill")
    assert kills and kills[0].data["pid"] == 2
    assert not k.procs[2].alive and k.threads[2].exited
    assert k.threads[1].result > 0  # the store completed after the retry
    k.do(1, "exit")
    assert not leak_report(k) and not k.violations
