"""Hypothesis stateful test over the kernel API, with the oracles as invariants.

Rules start any operation on an idle thread (every syscall, pins and device I/O,
fork/clone/exit), start reclaim on kswapd, fire ``fail_nth``, and step in-progress
operations one preemption point at a time, so Hypothesis explores interleavings and
shrinks a failure to a short readable program. After every rule: no violation and no
simulator defect. At teardown: every operation finishes, every process exits, the full
accounting recount (``check_accounting``) passes and nothing is leaked.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cowenv.kernel import KSWAPD_TID, Kernel, make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.ops import ADVICES, OPS
from cowenv.workload import leak_report, own_pins

PAGE = 4096
BASE = 0x100000
WINDOW = 24  # pages: three 8-entry tables, six 4-entry tables
USER_OPS = sorted(op for op, spec in OPS.items() if not spec.kthread)
#: Rule choices are uniform, so repeat the operations that make state happen.
WEIGHTED_OPS = USER_OPS + ["write"] * 4 + ["read"] * 2 + ["fork"] * 2 + ["pin"] * 2 + [
    "dev_read", "dev_write", "madvise", "mprotect"]

pages = st.integers(0, WINDOW - 1)
prots = st.sampled_from(["rw", "r", "none", "w"])


def addr_of(page: int) -> int:
    """Byte address of window page ``page``."""
    return BASE + page * PAGE


@st.composite
def spans(draw: st.DrawFn) -> tuple[int, int]:
    """A page-aligned ``(addr, length)`` inside the window."""
    first = draw(pages)
    n = draw(st.integers(1, min(12, WINDOW - first)))
    return addr_of(first), n * PAGE


class KernelMachine(RuleBasedStateMachine):
    """The classic kernel driven one scheduling decision at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Kernel | None = None

    @initialize(ptrs=st.sampled_from([4, 8]), fault_mode=st.sampled_from(["mmap_lock",
                                                                          "vma_lock"]),
                split_ptl=st.booleans(), nr_frames=st.sampled_from([48, 128]),
                nr_swap=st.sampled_from([4, 64]))
    def boot(self, ptrs: int, fault_mode: str, split_ptl: bool, nr_frames: int,
             nr_swap: int) -> None:
        cfg = KernelConfig(ptrs_per_pte=ptrs, fault_mode=fault_mode, split_ptl=split_ptl,
                           nr_frames=nr_frames, nr_swap_slots=nr_swap, max_threads=4,
                           max_processes=3)
        self.k = make_kernel(cfg)
        # Start with the window mapped read/write so that early rules do something.
        self.k.do(1, "mmap", addr=BASE, length=WINDOW * PAGE, prot="rw")

    # ------------------------------------------------------------------ helpers
    def _users_idle(self) -> list[int]:
        assert self.k is not None
        return [t for t in self.k.idle_tids() if t != KSWAPD_TID]

    def _can_exit(self, tid: int) -> bool:
        assert self.k is not None
        others = [t for t in self.k.live_threads() if t.tid not in (KSWAPD_TID, tid)
                  and not (t.gen is not None and t.op == "exit")]
        return bool(others)

    def _args(self, data: st.DataObject, tid: int, op: str) -> dict[str, Any]:
        assert self.k is not None
        if op in ("read", "write"):
            return {"addr": addr_of(data.draw(pages, label="page"))}
        if op == "mmap":
            a, n = data.draw(spans(), label="span")
            return {"addr": a, "length": n, "prot": data.draw(prots, label="prot"),
                    "shared": data.draw(st.booleans(), label="shared"),
                    "populate": data.draw(st.booleans(), label="populate")}
        if op == "munmap":
            a, n = data.draw(spans(), label="span")
            return {"addr": a, "length": n}
        if op == "mprotect":
            a, n = data.draw(spans(), label="span")
            return {"addr": a, "length": n, "prot": data.draw(prots, label="prot")}
        if op == "madvise":
            a, n = data.draw(spans(), label="span")
            return {"addr": a, "length": n,
                    "advice": data.draw(st.sampled_from(ADVICES), label="advice")}
        if op == "pin":
            return {"addr": addr_of(data.draw(pages, label="page")),
                    "write": data.draw(st.booleans(), label="write"),
                    "fast": data.draw(st.booleans(), label="fast")}
        if op in ("unpin", "dev_read", "dev_write"):
            mine = own_pins(self.k, tid)
            choices = st.sampled_from(mine) if mine else st.integers(1, 4)
            return {"pin": data.draw(choices, label="pin")}
        if op == "numa_hint":
            a, n = data.draw(spans(), label="span")
            return {"addr": a, "length": n}
        if op == "clear_refs":
            return {"type": data.draw(st.sampled_from([1, 2, 3, 4]), label="type")}
        if op == "pagemap":
            return {"addr": addr_of(data.draw(pages, label="page"))}
        if op == "mremap":
            a, n = data.draw(spans(), label="span")
            args: dict[str, Any] = {"addr": a, "old_length": n,
                                    "new_length": data.draw(st.integers(1, 12)) * PAGE,
                                    "maymove": data.draw(st.booleans(), label="maymove")}
            if args["maymove"] and data.draw(st.booleans(), label="fixed"):
                args["new_addr"] = addr_of(data.draw(pages, label="new_page"))
            return args
        if op == "move_pages":
            a, n = data.draw(spans(), label="span")
            return {"addr": a, "length": n, "all": data.draw(st.booleans(), label="all")}
        return {}

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: self.k is not None and self._users_idle())
    @rule(data=st.data(), op=st.sampled_from(WEIGHTED_OPS))
    def start_op(self, data: st.DataObject, op: str) -> None:
        assert self.k is not None
        tid = data.draw(st.sampled_from(self._users_idle()), label="tid")
        if op == "exit" and not self._can_exit(tid):
            op = "read"
        self.k.start(tid, op, self._args(data, tid, op))

    @precondition(lambda self: self.k is not None and KSWAPD_TID in self.k.idle_tids())
    @rule(nr=st.integers(1, 6), page=st.none() | pages)
    def start_reclaim(self, nr: int, page: int | None) -> None:
        assert self.k is not None
        args: dict[str, Any] = {"nr": nr}
        live = [p.pid for p in self.k.live_procs()]
        if page is not None and live:
            args.update(pid=live[page % len(live)], addr=addr_of(page))
        self.k.start(KSWAPD_TID, "reclaim", args)

    @precondition(lambda self: self.k is not None and KSWAPD_TID in self.k.idle_tids())
    @rule(nr=st.integers(1, 6), page=st.none() | pages)
    def start_compact(self, nr: int, page: int | None) -> None:
        """kcompactd on the kthread slot (issue 13's migration walker)."""
        assert self.k is not None
        args: dict[str, Any] = {"nr": nr}
        live = [p.pid for p in self.k.live_procs()]
        if page is not None and live:
            args.update(pid=live[page % len(live)], addr=addr_of(page))
        self.k.start(KSWAPD_TID, "compact", args)

    @precondition(lambda self: self.k is not None and self.k.runnable_tids())
    @rule(data=st.data(), n=st.integers(1, 4))
    def step(self, data: st.DataObject, n: int) -> None:
        assert self.k is not None
        tid = data.draw(st.sampled_from(self.k.runnable_tids()), label="tid")
        for _ in range(n):
            if not self.k.is_runnable(self.k.threads[tid]):
                break
            self.k.step(tid)

    @precondition(lambda self: self.k is not None and self.k.runnable_tids())
    @rule()
    def run_everything(self) -> None:
        """Let every in-progress operation finish (round robin)."""
        assert self.k is not None
        for _ in range(10_000):
            r = self.k.runnable_tids()
            if not r:
                break
            for tid in r:
                if self.k.is_runnable(self.k.threads[tid]):
                    self.k.step(tid)

    @precondition(lambda self: self.k is not None)
    @rule(n=st.integers(1, 6))
    def fail_nth(self, n: int) -> None:
        assert self.k is not None
        self.k.event("fail_nth", n=n)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def oracles_hold(self) -> None:
        if self.k is None:
            return
        assert not self.k.defects, self.k.defects
        assert not self.k.violations, [f"{v.signature}: {v.message}" for v in self.k.violations]

    def teardown(self) -> None:
        k = self.k
        if k is None:
            return
        self.run_everything_final()
        assert k.quiescent(), "a deadlock left operations unfinished"
        for t in k.live_threads():
            if t.tid != KSWAPD_TID:
                k.do(t.tid, "exit")
        assert k.oracle is not None
        k.oracle.check_accounting()
        assert not k.defects, k.defects
        assert not k.violations, [f"{v.signature}: {v.message}" for v in k.violations]
        assert not leak_report(k), leak_report(k)

    def run_everything_final(self) -> None:
        """Finish every operation in progress (used by teardown)."""
        assert self.k is not None
        for _ in range(100_000):
            r = self.k.runnable_tids()
            if not r:
                return
            self.k.step(r[0])


KernelMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestKernelMachine = KernelMachine.TestCase
