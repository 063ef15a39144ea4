"""TLB flush call sites: ``arch/x86/include/asm/tlbflush.h`` of 6.2 (a hook).

``flush_tlb_mm`` and ``flush_tlb_mm_range`` as the walkers of this tree call them
(``clear_refs_write``'s ``flush_tlb_mm``, ``change_prot_numa``'s ``tlb_finish_mmu``).
The model has no TLB yet: a flush is recorded in the trace (an ``event`` named
``flush_tlb``) and charged to the cost model, and changes nothing else. When a TLB model
is present it is wired here: these two methods are the only flush entry points the
walkers use, so a TLB model overrides them and nothing else changes.
"""

from __future__ import annotations

from .mm import MmStruct
from .sched import Thread


class TlbflushMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def flush_tlb_mm_range(self, t: Thread, mm: MmStruct, start: int, end: int,
                           site: str) -> None:
        """``flush_tlb_mm_range(mm, start, end, ...)`` over virtual pages ``[start, end)``.

        A no-op hook (recorded and charged) until a TLB model is wired here.

        Lock contract: none (called with or without the PTL, as its callers do).
        """
        self._ev(t.tid, "event", "flush_tlb",
                 {"mm": mm.id, "start": start, "end": end, "site": site})
        self.cost.charge("tlb_flush_range")

    def flush_tlb_mm(self, t: Thread, mm: MmStruct, site: str) -> None:
        """``flush_tlb_mm(mm)``: the whole address space (a no-op hook, see the module)."""
        self.flush_tlb_mm_range(t, mm, 0, -1, site)
