"""``mm_struct``, ``vm_area_struct`` and ``anon_vma``.

Models ``include/linux/mm_types.h`` (``struct mm_struct``, ``struct vm_area_struct``,
the ``MM_*`` rss counters, ``MMF_*`` flags) and ``struct anon_vma`` of
``include/linux/rmap.h``, as of 6.2; ``VM_*`` flags from ``include/linux/mm.h``.

Upper page-table levels are collapsed: an mm maps a PMD index (virtual address divided
by the bytes one PTE table maps) straight to a :class:`PmdEntry`. ``pgtables_bytes``
still counts PMD and PUD table pages the way ``mm_inc_nr_pmds``/``mm_inc_nr_puds`` would,
so ``VmPTE`` comes out like the kernel's (see :meth:`MmStruct.pgtables_bytes`).
"""

from __future__ import annotations

from .locks import RwSemaphore, SpinLock
from .pgtable import PmdEntry

# enum mm_counter (include/linux/mm_types_task.h)
MM_FILEPAGES = 0
MM_ANONPAGES = 1
MM_SWAPENTS = 2
MM_SHMEMPAGES = 3
NR_MM_COUNTERS = 4
MM_COUNTER_NAMES = ("MM_FILEPAGES", "MM_ANONPAGES", "MM_SWAPENTS", "MM_SHMEMPAGES")

# mm->flags bits (include/linux/sched/coredump.h); MMF_COW_PTE* are from COW PTE v4 01/14.
MMF_HAS_PINNED = 1 << 27
MMF_COW_PTE_READY = 1 << 29
MMF_COW_PTE = 1 << 30

# vma->vm_flags (subset).
VM_READ = 1 << 0
VM_WRITE = 1 << 1
VM_SHARED = 1 << 3
VM_MAYWRITE = 1 << 5
VM_DONTCOPY = 1 << 17
VM_WIPEONFORK = 1 << 25
#: ``VM_SOFTDIRTY`` (``CONFIG_MEM_SOFT_DIRTY``): set on every new VMA by ``mmap_region``
#: ("New (or expanded) vma always get soft dirty status"); cleared by
#: ``clear_refs_write(CLEAR_REFS_SOFT_DIRTY)``; while clear, the VMA tracks soft-dirty
#: (``vma_soft_dirty_enabled``) and pagemap reports only the PTEs' own bits.
VM_SOFTDIRTY = 1 << 27

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2


class AnonVma:
    """``struct anon_vma``: the rmap root for anonymous pages; its VMAs via the chain.

    ``root`` is ``anon_vma->root``: the anon_vma of the oldest ancestor process. The
    kernel's ``anon_vma_lock_read/write`` take ``root->rwsem``, so one lock serialises
    rmap walks and ``anon_vma_fork``/``unlink_anon_vmas`` over a whole fork tree.
    """

    __slots__ = ("id", "vmas", "lock", "root")

    def __init__(self, aid: int, root: AnonVma | None = None) -> None:
        self.id = aid
        self.vmas: list[Vma] = []
        self.lock = RwSemaphore(f"anon_vma{aid}.rwsem", "anon_vma")
        self.root: AnonVma = root if root is not None else self


class Vma:
    """``struct vm_area_struct`` over virtual page numbers ``[start, end)``.

    Attributes:
        mm: Owning mm.
        start: First virtual page number.
        end: One past the last virtual page number.
        flags: ``VM_*`` bits (prot bits VM_READ/VM_WRITE included).
        anon_vma: The VMA's own anon_vma (new anonymous pages link to it), or None
            until the first anonymous fault (``anon_vma_prepare``).
        chain: Every anon_vma this VMA is linked into (``anon_vma_chain``): its own plus
            its ancestors' after ``anon_vma_fork``.
        shmem: Backing shmem object for shared anonymous mappings, else None.
        pgoff: ``vm_pgoff``: page offset into ``shmem`` of ``start``; for an anonymous
            VMA the page number ``start`` had at mmap time (see :meth:`linear_page_index`).
        lock: The per-VMA lock (``vma->vm_lock``), used in the ``vma_lock`` fault mode.
        detached: Set once the VMA is unlinked from the mm (munmap/exit).
        lock_seq: ``vm_lock_seq``: equal to ``mm.mm_lock_seq`` while write-locked.
    """

    __slots__ = ("id", "mm", "start", "end", "flags", "anon_vma", "chain", "shmem", "pgoff",
                 "lock", "detached", "lock_seq")

    def __init__(self, vid: int, mm: MmStruct, start: int, end: int, flags: int,
                 shmem: object | None = None, pgoff: int = 0) -> None:
        self.id = vid
        self.mm = mm
        self.start = start
        self.end = end
        self.flags = flags
        self.anon_vma: AnonVma | None = None
        self.chain: list[AnonVma] = []
        self.shmem = shmem
        self.pgoff = pgoff
        self.lock = RwSemaphore(f"vma{vid}.lock", "vma_lock")
        self.detached = False
        self.lock_seq = -1

    def linear_page_index(self, vpn: int) -> int:
        """``linear_page_index``: ``vm_pgoff`` plus the page's offset in the VMA.

        Anonymous VMAs start with ``vm_pgoff`` = their first page (``do_mmap``), so the
        index of an anonymous page is the page number it was first faulted at; mremap
        moves a VMA and keeps its ``vm_pgoff``, so rmap finds moved pages through it.
        """
        return self.pgoff + (vpn - self.start)

    def vpn_of_index(self, index: int) -> int | None:
        """``vma_address``: the page of this VMA whose linear index is ``index``, or None."""
        v = self.start + (index - self.pgoff)
        return v if self.start <= v < self.end else None

    @property
    def shared(self) -> bool:
        """``VM_SHARED``."""
        return bool(self.flags & VM_SHARED)

    def is_cow_mapping(self) -> bool:
        """``is_cow_mapping``: private and may be written."""
        return (self.flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE

    def prot(self) -> int:
        """PROT_* bits from VM_READ/VM_WRITE."""
        return (PROT_READ if self.flags & VM_READ else 0) | (
            PROT_WRITE if self.flags & VM_WRITE else 0)

    def __repr__(self) -> str:
        return f"Vma({self.id}, {self.start:#x}-{self.end:#x}, {self.flags:#x})"


def vma_is_accessible(vma: Vma) -> bool:
    """``vma_is_accessible`` (include/linux/mm.h, 6.2): ``vm_flags & VM_ACCESS_FLAGS``.

    Read, write or exec; the model has no ``VM_EXEC`` (x86 has no write-only pages).
    """
    return bool(vma.flags & (VM_READ | VM_WRITE))


class MmStruct:
    """``struct mm_struct``.

    Attributes:
        id: Stable id (also used in lock names).
        vmas: VMAs sorted by start.
        pmd: PMD index -> :class:`PmdEntry`; absent = ``pmd_none``.
        rss: ``mm->rss_stat`` counters, indexed by ``MM_*``.
        nr_ptes: PTE tables charged to this mm (``mm_inc_nr_ptes``).
        flags: ``MMF_*`` bits.
        write_protect_seq: ``seqcount_t`` bumped around fork's write-protection
            (``raw_write_seqcount_begin`` makes it odd).
        users: Live threads using the mm (``mm_users``).
    """

    def __init__(self, mid: int, ptrs_per_pte: int) -> None:
        self.id = mid
        self.ptrs_per_pte = ptrs_per_pte
        self.vmas: list[Vma] = []
        self.pmd: dict[int, PmdEntry] = {}
        self.rss = [0] * NR_MM_COUNTERS
        self.nr_ptes = 0
        self.flags = 0
        self.write_protect_seq = 0
        self.mm_lock_seq = 0
        self.mmap_lock = RwSemaphore(f"mm{mid}.mmap_lock", "mmap_lock")
        self.page_table_lock = SpinLock(f"mm{mid}.page_table_lock", "page_table_lock")
        self.users = 0
        self.dead = False
        self.pid = 0

    # -- VMA tree (mm->mm_mt) -------------------------------------------------------
    def find_vma(self, vpn: int) -> Vma | None:
        """``vma_lookup``: the VMA containing ``vpn``, or None."""
        for v in self.vmas:
            if v.start <= vpn < v.end:
                return v
            if v.start > vpn:
                break
        return None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """``for_each_vma_range``: VMAs overlapping ``[start, end)``, in order."""
        return [v for v in self.vmas if v.start < end and v.end > start]

    def insert_vma(self, vma: Vma) -> None:
        """``vma_link``."""
        self.vmas.append(vma)
        self.vmas.sort(key=lambda v: v.start)

    # -- page-table accounting --------------------------------------------------------
    def mm_inc_nr_ptes(self) -> None:
        """``mm_inc_nr_ptes``: charge one PTE table to ``pgtables_bytes``."""
        self.nr_ptes += 1

    def mm_dec_nr_ptes(self) -> None:
        """``mm_dec_nr_ptes``."""
        self.nr_ptes -= 1

    def pgtables_bytes(self) -> int:
        """``mm_pgtables_bytes``: PTE tables + PMD tables + PUD tables, 4 KiB each.

        PTE tables come from the ``nr_ptes`` counter (so a missed ``mm_dec_nr_ptes``
        shows at teardown, as ``check_mm`` reports it). PMD and PUD tables are derived
        from the populated PMD entries: one PMD table per 512 PMD entries' range and one
        PUD table per 512 PMD tables' range that holds any. The kernel keeps an upper
        table until ``free_pgtables`` covers its whole range; the model frees it with the
        last PTE table under it (a simplification that only matters for ``VmPTE``).
        """
        puds = sorted({i // 512 for i in self.pmd})
        nr_pmds = len(puds)
        nr_puds = len({p // 512 for p in puds})
        return (self.nr_ptes + nr_pmds + nr_puds) * 4096
