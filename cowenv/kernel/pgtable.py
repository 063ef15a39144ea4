"""Page-table entries, PTE tables and PMD entries.

Models the x86-64 PTE bits of ``arch/x86/include/asm/pgtable_types.h`` (present, RW,
USER, accessed, dirty; the swap-entry encoding and ``_PAGE_SWP_EXCLUSIVE`` of 6.2), a PTE
table page with its split PTL and refcount (``struct ptdesc``/``struct page``), and PMD
entries (with COW PTE v4's write-protected "shared" PMD).

A PTE is an ``int64``; a PTE table is a numpy array of them so that bulk walkers
(``copy_pte_range``, ``zap_pte_range``, ``change_pte_range``) are vectorised.

Encoding (a simplification of x86-64's ``pte_t``; only the bits the model needs):

====================  ====  ===========================================================
bit                   name  meaning
====================  ====  ===========================================================
0                     P     ``_PAGE_PRESENT``
1                     RW    ``_PAGE_RW`` (writable)
2                     D     ``_PAGE_DIRTY``
3                     A     ``_PAGE_ACCESSED`` ("young")
4                     U     accessible; clear in a ``pte_protnone`` entry (see below)
5                     SWP   a non-present swap entry (payload = swap slot)
6                     SWX   ``pte_swp_exclusive`` marker of a swap entry
7                     SD    ``_PAGE_SOFT_DIRTY`` (``_PAGE_SWP_SOFT_DIRTY`` in a swap entry)
8                     MIG   a non-present migration entry (payload = the pfn migrated)
9..                   pfn   page frame number, or swap slot for SWP entries
====================  ====  ===========================================================

A migration entry (``include/linux/swapops.h`` of 6.2: ``SWP_MIGRATION_READ``,
``SWP_MIGRATION_READ_EXCLUSIVE``, ``SWP_MIGRATION_WRITE``) is ``MIG`` plus the pfn; its
type is carried by ``RW`` (writable) and ``SWX`` (readable exclusive), and the young and
dirty bits that ``make_migration_entry_young``/``_dirty`` (6.1) keep by ``A``/``D``. It
is never ``SWP``: the model's swap entries are only real swap slots.

``0`` is ``pte_none``. Frame 0 is the shared zero page (``ZERO_PFN``).

**PROT_NONE and NUMA-hinting entries** (x86 ``_PAGE_PROTNONE``, 6.2): bit P is the
kernel's ``pte_present()`` -- ``_PAGE_PRESENT | _PAGE_PROTNONE`` -- so every walker that
asks ``pte_present`` (fork, zap, rmap, the oracles' recounts) treats a PROT_NONE entry as
present, as in Linux. A ``pte_protnone`` entry (``PAGE_NONE``: hardware-present bit clear,
``_PAGE_PROTNONE`` set) is ``P`` set with ``U`` clear: the MMU (``_hw_walk``, GUP-fast)
refuses it, and a fault on it is SIGSEGV in a PROT_NONE VMA (``access_error``) or a
NUMA-hinting fault (``do_numa_page``) in an accessible one. mprotect(PROT_NONE) and
``change_prot_numa`` make such entries through ``change_pte_range``'s ``pte_modify``.

**Soft-dirty** (``CONFIG_MEM_SOFT_DIRTY``, x86): ``pte_mkdirty`` sets ``_PAGE_DIRTY |
_PAGE_SOFT_DIRTY``, so every kernel-made dirty entry (:func:`mk_pte` with ``dirty``) is
soft-dirty; the MMU's own dirty-bit update sets ``_PAGE_DIRTY`` only. ``pte_modify``
keeps it (``_PAGE_CHG_MASK``); swap-out moves it to ``_PAGE_SWP_SOFT_DIRTY`` and swap-in
back; ``clear_refs`` (``fs/proc/task_mmu.c``) clears it.
"""

from __future__ import annotations

import numpy as np

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_DIRTY = 1 << 2
PTE_YOUNG = 1 << 3
PTE_USER = 1 << 4
PTE_SWAP = 1 << 5
PTE_SWP_EXCLUSIVE = 1 << 6
PTE_SOFT_DIRTY = 1 << 7
PTE_MIGRATION = 1 << 8
PFN_SHIFT = 9
FLAG_MASK = (1 << PFN_SHIFT) - 1

#: The shared zero page: ``my_zero_pfn()``; never refcounted by mappings.
ZERO_PFN = 0


def mk_pte(pfn: int, write: bool, dirty: bool = False, young: bool = True,
           user: bool = True) -> int:
    """Build a present PTE (``mk_pte`` + ``pte_mkwrite``/``pte_mkdirty``/``pte_mkyoung``)."""
    v = (pfn << PFN_SHIFT) | PTE_PRESENT
    if write:
        v |= PTE_WRITE
    if dirty:
        v |= PTE_DIRTY | PTE_SOFT_DIRTY  # x86 pte_mkdirty: _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    if young:
        v |= PTE_YOUNG
    if user:
        v |= PTE_USER
    return v


def swp_entry_to_pte(slot: int, exclusive: bool) -> int:
    """Build a swap PTE (``swp_entry_to_pte``, optionally ``pte_swp_mkexclusive``)."""
    return (slot << PFN_SHIFT) | PTE_SWAP | (PTE_SWP_EXCLUSIVE if exclusive else 0)


def make_migration_entry(pfn: int, write: bool, exclusive: bool, young: bool,
                         dirty: bool) -> int:
    """A migration entry for ``pfn``; ``exclusive`` is ignored when writable.

    ``make_writable_migration_entry`` / ``make_readable_exclusive_migration_entry`` /
    ``make_readable_migration_entry``, with ``make_migration_entry_young``/``_dirty``.
    """
    v = (pfn << PFN_SHIFT) | PTE_MIGRATION
    if write:
        v |= PTE_WRITE
    elif exclusive:
        v |= PTE_SWP_EXCLUSIVE
    if young:
        v |= PTE_YOUNG
    if dirty:
        v |= PTE_DIRTY
    return v


def is_migration_entry(pte: int) -> bool:
    """``is_migration_entry(pte_to_swp_entry(pte))``."""
    return bool(pte & PTE_MIGRATION)


def pte_pfn(pte: int) -> int:
    """Return the frame (or swap slot) of ``pte``."""
    return pte >> PFN_SHIFT


def pte_present(pte: int) -> bool:
    """``pte_present``."""
    return bool(pte & PTE_PRESENT)


def pte_protnone(pte: int) -> bool:
    """``pte_protnone`` (x86): a PROT_NONE or NUMA-hinting entry (present, inaccessible)."""
    return pte & (PTE_PRESENT | PTE_USER) == PTE_PRESENT


def is_swap_pte(pte: int) -> bool:
    """``is_swap_pte``: a non-none, non-present entry."""
    return bool(pte & PTE_SWAP)


def describe_pte(pte: int) -> str:
    """Human-readable form of a PTE for traces and renders."""
    if pte == 0:
        return "none"
    if pte & PTE_MIGRATION:
        kind = "w" if pte & PTE_WRITE else ("x" if pte & PTE_SWP_EXCLUSIVE else "r")
        return f"migration:{pte >> PFN_SHIFT}/{kind}"
    if pte & PTE_SWAP:
        return (f"swap:{pte >> PFN_SHIFT}{'x' if pte & PTE_SWP_EXCLUSIVE else ''}"
                f"{'s' if pte & PTE_SOFT_DIRTY else ''}")
    bits = "".join(c for c, b in (("w", PTE_WRITE), ("d", PTE_DIRTY), ("a", PTE_YOUNG),
                                  ("u", PTE_USER), ("s", PTE_SOFT_DIRTY)) if pte & b)
    return f"pfn:{pte >> PFN_SHIFT}/{bits}"


class PteTable:
    """A PTE table page (``pgtable_t``): its entries, refcount and split PTL.

    The table's identity is the frame it occupies (``pfn``), as in the kernel where a
    page table is a ``struct page``. ``refcount`` models the table page's ``_refcount``,
    which COW PTE uses as the number of PMD entries that point at the table
    (``cow_pte_count``); upstream it is always 1 while the table is installed.
    """

    __slots__ = ("pfn", "entries", "refcount", "ptl", "freed", "gen", "fork_tid")

    def __init__(self, pfn: int, nr: int, ptl: object, gen: int) -> None:
        self.pfn = pfn
        self.entries = np.zeros(nr, dtype=np.int64)
        self.refcount = 1
        self.ptl = ptl
        self.freed = False
        self.gen = gen
        #: Oracle annotation, not kernel state: the tid of a fork that is still processing
        #: the entries of this table after linking it into the child (COW PTE v4's order,
        #: flaw ``fork-late-wrprotect``); its own writes are not "writes to a shared
        #: table" for DH's sanity check. None otherwise.
        self.fork_tid: int | None = None

    def __repr__(self) -> str:
        return f"PteTable(pfn={self.pfn}, ref={self.refcount}{', freed' if self.freed else ''})"


class PmdEntry:
    """A populated PMD entry pointing at a PTE table.

    ``write`` is the PMD's ``_PAGE_RW``. Upstream it is always set for a PTE-table
    PMD; COW PTE write-protects it to mark the table shared (``!pmd_write(*pmd)``).
    ``pmd_none`` is modelled by the absence of the entry in ``mm.pmd``.
    """

    __slots__ = ("table", "write")

    def __init__(self, table: PteTable, write: bool = True) -> None:
        self.table = table
        self.write = write

    def same(self, other: PmdEntry | None) -> bool:
        """``pmd_same``."""
        return other is not None and other.table is self.table and other.write == self.write

    def __repr__(self) -> str:
        return f"pmd({self.table.pfn}{'' if self.write else ',ro'})"
