"""Swap slots: ``swap_free`` of ``mm/swapfile.c`` (6.2).

The swap device itself (slots, counts, data) is :class:`cowenv.kernel.memory.SwapDevice`.
There is no swap cache yet: swap-out writes the slot and frees the page, swap-in copies
the slot into a fresh page (see :mod:`cowenv.kernel.memory`).
"""

from __future__ import annotations


class SwapfileMixin:
    """Part of :class:`~cowenv.kernel.kernel.Kernel` (``self`` is the kernel)."""

    def swap_free(self, slot: int, site: str, n: int = 1) -> None:
        """``swap_free``/``free_swap_and_cache``: drop swap_map references."""
        self.swap.swap_map[slot] -= n
        if self.swap.swap_map[slot] < 0:
            self._report("accounting", site, f"swap_map underflow on slot {slot}")
            self.swap.swap_map[slot] = 0
        if self.swap.swap_map[slot] == 0:
            self.swap.free_slot(slot)
