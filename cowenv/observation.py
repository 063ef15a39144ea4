"""The observation encoder of :class:`cowenv.env.CowEnv`: kernel state as a fixed-size vector.

Only the env uses it; campaigns whose agents read no observation skip it entirely
(:mod:`cowenv.harness`). The layout is documented in :class:`cowenv.env.CowEnv`
(``## Observation Space``) and given by :attr:`ObservationEncoder.layout`.

The buffer is updated in place, sparsely: a ``start`` action re-encodes only its thread,
an event only the pressure block, and scalar stores go through a ``memoryview`` of the
buffer (the same float32 rounding as numpy, about twice as fast per element). A test
checks that the incremental encoding always equals the full one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .catalogue import ActionSpec
from .harness import Harness
from .kernel import Kernel
from .kernel.locks import LOCK_ORDER, WRITE
from .kernel.mm import (
    MM_ANONPAGES,
    MM_SHMEMPAGES,
    MM_SWAPENTS,
    MMF_COW_PTE,
    MMF_COW_PTE_READY,
    MMF_HAS_PINNED,
)
from .kernel.ops import OPS

OP_NAMES: tuple[str, ...] = tuple(OPS)
THREAD_STATES = ("exited", "idle", "runnable", "blocked")


class ObservationEncoder:
    """Encodes a harness's kernel into the env's observation vector.

    Args:
        h: The harness (its configuration, PMD slots, regions, coverage and clock).

    Attributes:
        layout: ``name -> (start, end)`` offsets of the blocks ``threads``,
            ``processes``, ``pmds``, ``pressure`` and ``coverage``.
        size: Length of the vector.

    """

    def __init__(self, h: Harness) -> None:
        self.config = h.config
        self.pmd_indices = h.pmd_indices
        self.region_pages = h.region_pages
        self.max_steps = h.max_steps
        self._cov = h.coverage
        self._op_index = {op: i for i, op in enumerate(OP_NAMES)}
        self._lock_class = {c: i for i, c in enumerate(LOCK_ORDER)}
        NT = self.config.max_threads
        NP, NS, NL = self.config.max_processes, len(self.pmd_indices), len(LOCK_ORDER)
        # ... + 1: the thread's fail-nth (issue 13, the last float of a thread slot).
        self._ft = 4 + 1 + len(OP_NAMES) + NP + NL + NL + 1 + 1
        self._fp = 15
        self._fm = 5 + NP
        layout: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in (("threads", (NT + 1) * self._ft), ("processes", NP * self._fp),
                           ("pmds", NP * NS * self._fm), ("pressure", 6),
                           ("coverage", h.coverage.n_slots)):
            layout[name] = (off, off + size)
            off += size
        self.layout = layout
        self.size = off
        self._obs = np.zeros(off, dtype=np.float32)
        self._ov = memoryview(self._obs)
        self._cov0 = layout["coverage"][0]
        self._p0 = layout["processes"][0]
        self._m0 = layout["pmds"][0]
        self._x0 = layout["pressure"][0]
        # Blank state of everything but the coverage: every thread slot "absent".
        self._blank = np.zeros(self._cov0, dtype=np.float32)
        self._blank[0:(NT + 1) * self._ft:self._ft] = 1.0
        self._blank_mv = memoryview(self._blank)
        self._t_proc = 5 + len(OP_NAMES)
        self._t_held = self._t_proc + NP
        self._inv_L = 1.0 / h.coverage.n_slots
        self._swap_nr = max(1, self.config.nr_swap_slots)
        self._np = NP
        self._pins_active = 0
        self._elapsed = 0

    @property
    def thread_width(self) -> int:
        """Floats per thread slot."""
        return self._ft

    def reset(self) -> None:
        """Clear the buffer and copy in the coverage bitmap (a new episode)."""
        self._obs[:] = 0.0
        self._pins_active = 0
        self.cover_all()

    def cover_all(self) -> None:
        """Copy the coverage bitmap into the coverage block."""
        seen = np.frombuffer(self._cov.seen, dtype=np.uint8)
        self._obs[self._cov0:] = seen

    def cover(self, slot: int) -> None:
        """Mark coverage slot ``slot`` (a label reached for the first time)."""
        self._ov[self._cov0 + slot] = 1.0

    def encode(self, k: Kernel, spec: ActionSpec | None = None, elapsed: int = 0) -> np.ndarray:
        """Refresh the observation buffer from kernel ``k`` and return a copy.

        ``spec`` is the action just taken: ``start`` only changes that thread, an event
        only the pressure state, so only those parts are re-encoded (a test checks that
        this always equals the full encoding). None = encode everything.
        """
        self._elapsed = elapsed
        o = self._obs
        ov = self._ov
        kind = "run" if spec is None else spec.kind
        if kind == "run":
            ov[:self._cov0] = self._blank_mv  # memoryview copy: cheaper than numpy's
            procs = [p for p in k.procs.values() if p.alive]  # k.live_procs(), inlined
            if len(procs) > self._np:
                del procs[self._np:]
            pslot = {p.pid: i for i, p in enumerate(procs)}
            self._enc_threads(k, ov, k.threads.items(), pslot)
            self._enc_mms(k, ov, procs)
        elif kind == "start" or (kind == "event" and spec.tid > 0):
            # a start changes its thread; a per-thread fail-nth event its fail-nth field
            tid = spec.tid
            t = k.threads[tid]
            pslot = {}
            i = 0
            for p in k.procs.values():  # the slot of t's process among the live ones
                if p.alive:
                    if i == self._np:
                        break
                    if p.pid == t.pid:
                        pslot[p.pid] = i
                        break
                    i += 1
            self._thread_blank(o, tid)
            self._enc_threads(k, ov, ((tid, t),), pslot)
        self._enc_pressure(k, ov)
        return o.copy()

    def _thread_blank(self, o: np.ndarray, tid: int) -> None:
        """Reset thread ``tid``'s slot to its blank state ("absent")."""
        b = tid * self._ft
        self._ov[b:b + self._ft] = self._blank_mv[b:b + self._ft]

    def _enc_threads(self, k: Kernel, o: Any, items: Any, pslot: dict[int, int]) -> None:
        """Encode the ``(tid, thread)`` pairs of ``items`` (sparse stores)."""
        max_threads = self.config.max_threads
        ft = self._ft
        op_index = self._op_index
        label_slot = self._cov.slot_of
        inv_L = self._inv_L
        t_proc = self._t_proc
        for tid, t in items:
            if t.exited or tid > max_threads:
                continue
            base = tid * ft
            o[base] = 0.0
            w = t.waiting
            if t.gen is None:
                o[base + 1] = 1.0
            else:
                o[base + (2 if w is None or w[0].can_acquire(tid, w[1]) else 3)] = 1.0
                o[base + 5 + op_index[t.op]] = 1.0
            label = t.label
            if label:
                s = label_slot.get(label)
                if s is None:
                    s = self._cov.slot(label)
                o[base + 4] = (s + 1) * inv_L
            ps = pslot.get(t.pid)
            if ps is not None:
                o[base + t_proc + ps] = 1.0
            fn = t.fail_nth_next or t.fail_nth  # written, or armed for the running op
            if fn:
                o[base + ft - 1] = 1.0 if fn >= 3 else fn / 3
            if t.held or w is not None:
                hb = base + self._t_held
                lock_class = self._lock_class
                for lk, mode in t.held:
                    c = lock_class.get(lk.cls)
                    if c is not None:
                        if mode == WRITE:
                            o[hb + c] = 1.0
                        elif o[hb + c] == 0.0:
                            o[hb + c] = 0.5
                if w is not None:
                    lk, mode = w
                    c = lock_class.get(lk.cls)
                    nl = len(LOCK_ORDER)
                    if c is not None:
                        o[hb + nl + c] = 1.0
                    if mode == WRITE:
                        o[hb + 2 * nl] = 1.0

    def _enc_mms(self, k: Kernel, o: Any, procs: list[Any]) -> None:
        """Encode per-process summaries and per-PMD-slot sharing state (sparse stores)."""
        NT, NP = self.config.max_threads, self.config.max_processes
        pincount: dict[int, int] = {}
        for pin in k.pins.values():
            if pin.active:
                pincount[pin.pid] = pincount.get(pin.pid, 0) + 1
        self._pins_active = sum(pincount.values())
        inv_rp = 1.0 / self.region_pages
        NS = len(self.pmd_indices)
        inv_nt = 1.0 / NT
        b = self._p0
        fp = self._fp
        for p in procs:
            mm = p.mm
            rss = mm.rss
            o[b] = 1.0
            if rss[MM_ANONPAGES]:
                x = rss[MM_ANONPAGES] * inv_rp
                o[b + 1] = 0.0 if x < 0.0 else (x if x < 1.0 else 1.0)
            if rss[MM_SWAPENTS]:
                x = rss[MM_SWAPENTS] * inv_rp
                o[b + 2] = 0.0 if x < 0.0 else (x if x < 1.0 else 1.0)
            if rss[MM_SHMEMPAGES]:
                x = rss[MM_SHMEMPAGES] * inv_rp
                o[b + 3] = 0.0 if x < 0.0 else (x if x < 1.0 else 1.0)
            if mm.nr_ptes > 0:
                o[b + 4] = 1.0 if mm.nr_ptes >= NS else mm.nr_ptes / NS
            f = mm.flags
            if f:
                if f & MMF_HAS_PINNED:
                    o[b + 5] = 1.0
                if f & MMF_COW_PTE_READY:
                    o[b + 6] = 1.0
                if f & MMF_COW_PTE:
                    o[b + 7] = 1.0
            o[b + 8] = len(p.tids) * inv_nt
            ml = mm.mmap_lock
            if ml.readers:
                o[b + 9] = len(ml.readers) * inv_nt
            if ml.writer is not None:
                o[b + 10] = 1.0
            if ml.waiters:
                o[b + 11] = len(ml.waiters) * inv_nt
            if mm.page_table_lock.owner is not None:
                o[b + 12] = 1.0
            n = pincount.get(p.pid, 0)
            if n:
                o[b + 13] = 1.0 if n >= 2 else 0.5
            if mm.write_protect_seq & 1:
                o[b + 14] = 1.0
            b += fp
        fm = self._fm
        n = len(procs)
        inv_np = 1.0 / NP
        split = self.config.split_ptl
        pmd_idx = self.pmd_indices
        NS = len(pmd_idx)
        if n > 1:  # the tables each process's PMD slots point at, for the sharing bits
            tables = [[None if (e := p.mm.pmd.get(idx)) is None else e.table
                       for idx in pmd_idx] for p in procs]
        b0 = self._m0
        for i, p in enumerate(procs):
            d = p.mm.pmd
            if not d:
                b0 += NS * fm
                continue
            ptl_i = None if split else p.mm.page_table_lock
            b = b0
            b0 += NS * fm
            for j, idx in enumerate(pmd_idx):
                pmd = d.get(idx)
                if pmd is None:
                    b += fm
                    continue
                tb = pmd.table
                o[b] = 1.0
                if pmd.write:
                    o[b + 1] = 1.0
                rc = tb.refcount
                if rc > 0:
                    o[b + 2] = 1.0 if rc >= NP else rc * inv_np
                if (tb.ptl if split else ptl_i).owner is not None:
                    o[b + 3] = 1.0
                if tb.freed:
                    o[b + 4] = 1.0
                if n > 1:
                    for q, row in enumerate(tables):
                        if q != i and row[j] is tb:
                            o[b + 5 + q] = 1.0
                b += fm

    def _enc_pressure(self, k: Kernel, o: Any) -> None:
        x0 = self._x0
        fn = k.fail_nth
        o[x0] = 1.0 if fn >= 3 else fn / 3
        o[x0 + 1] = k.pool.nr_free / k.pool.nr
        o[x0 + 2] = len(k.swap.free) / self._swap_nr
        x = self._pins_active / 4
        o[x0 + 3] = x if x < 1.0 else 1.0
        idle = 1.0
        for t in k.threads.values():
            if t.gen is not None:
                idle = 0.0
                break
        o[x0 + 4] = idle
        x = self._elapsed / self.max_steps
        o[x0 + 5] = x if x < 1.0 else 1.0


__all__ = ["OP_NAMES", "THREAD_STATES", "ObservationEncoder"]
