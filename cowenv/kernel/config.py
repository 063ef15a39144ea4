"""Kernel configuration: variant, flaws, geometry, limits and fault mode.

A :class:`KernelConfig` is plain data. It is everything (besides the schedule) that a
run depends on, so that a scenario file can carry it verbatim.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

#: The flaw catalogue of BRIEF §4. Ids are stable public names; order is the catalogue's.
#: ``read-fault-fills-shared`` (reference notes C8) was added by cowenv: an anonymous read
#: fault on ``pte_none`` installs the zero-page PTE into the shared table.
#: ``recover-skips-vma`` was found by cowenv's soak test: after ``recover_pte_range`` v4
#: falls back to ``copy_pte_range`` only if ``recover_end`` lies inside ``src_vma``.
#: ``fork-ptl-nesting`` was added by issue 12 (v4 02/14 takes ``pmd_install``'s
#: ``pmd_lock`` inside the source PTE lock), and so were ``fork-late-wrprotect`` (v4's
#: fork links the child's PMD writable and write-protects both PMDs after dropping the
#: PTL) and ``recover-double-copy`` (reference notes C7). ``table-free-no-deferral``
#: (reference notes C6) needs the TLB model of issue 13 (``pte_free`` without
#: ``tlb_remove_table``). ``numa-fault-writes-shared`` was added by issue 13
#: with NUMA hinting (``do_numa_page`` on a shared table, v4 03/14).
#: ``mremap-ignores-break-failure``, ``mremap-dst-shared`` and
#: ``fork-shares-migration-entry`` came with the mremap and migration walkers (issue 13).
FLAW_IDS: tuple[str, ...] = (
    "fault-asserts-write-lock",
    "pmd-clear-window",
    "mprotect-ignores-break-failure",
    "walker-skips-break",
    "vma-lock-fault-breaks-shared",
    "rmap-stale-table",
    "zap-partial-shared",
    "swapin-ignores-break-failure",
    "nr-ptes-on-oom",
    "wipeonfork-shared",
    "gup-fast-fork-race",
    "read-fault-fills-shared",
    "recover-skips-vma",
    "fork-ptl-nesting",
    "fork-late-wrprotect",
    "recover-double-copy",
    "table-free-no-deferral",
    "numa-fault-writes-shared",
    "mremap-ignores-break-failure",
    "mremap-dst-shared",
    "fork-shares-migration-entry",
    "ptl-recursive-nesting",
    "free-pmd-deferred-flush",
)

#: Where each flaw comes from (issue 12; BRIEF §4 with its corrections).
#: ``v4``: the posted code does it (the patch and line are quoted in :data:`FLAW_SOURCES`).
#: ``seeded``: a concern of the seed thread or the review that v4's code does not have,
#: kept as a benchmark flaw. ``as-posted`` is exactly the ``v4`` flaws; ``review`` adds
#: the seeded ones. Displays (``cowenv scenario run``, campaign summaries,
#: ``benchmarks/bug_finding.py``) read the origin from here.
FLAW_ORIGINS: dict[str, str] = {
    "fault-asserts-write-lock": "v4",
    "pmd-clear-window": "v4",
    "mprotect-ignores-break-failure": "v4",
    "walker-skips-break": "seeded",
    "vma-lock-fault-breaks-shared": "seeded",
    "rmap-stale-table": "v4",
    "zap-partial-shared": "v4",
    "swapin-ignores-break-failure": "v4",
    "nr-ptes-on-oom": "v4",
    "wipeonfork-shared": "v4",
    "gup-fast-fork-race": "seeded",
    "read-fault-fills-shared": "v4",
    "recover-skips-vma": "v4",
    "fork-ptl-nesting": "v4",
    "fork-late-wrprotect": "v4",
    "recover-double-copy": "v4",
    "table-free-no-deferral": "v4",
    "numa-fault-writes-shared": "v4",
    "mremap-ignores-break-failure": "v4",
    "mremap-dst-shared": "v4",
    "fork-shares-migration-entry": "v4",
    "ptl-recursive-nesting": "v4",
    "free-pmd-deferred-flush": "v4",
}

#: For each flaw: the v4 patch and the line(s) that make it (``v4``), or the review
#: source and why v4 does not have it (``seeded``).
FLAW_SOURCES: dict[str, str] = {
    "fault-asserts-write-lock":
        "03/14 mm/memory.c handle_cow_pte_fault: `mmap_assert_write_locked(mm);` "
        "(reached from __handle_mm_fault under mmap_read_lock; review R3)",
    "pmd-clear-window":
        "03/14 mm/memory.c handle_cow_pte_fault: `mm_dec_nr_ptes(mm); pmd_clear(pmd); "
        "orig_dst_pte = dst_pte = pte_alloc_map_lock(mm, pmd, addr, &dst_ptl);` then "
        "`set_pte_at(mm, addr, dst_pte, *src_pte);` for every non-none entry (review R3)",
    "mprotect-ignores-break-failure":
        "09/14 mm/mprotect.c change_pte_range: `if (break_cow_pte(vma, pmd, addr)) "
        "return 0;` (review R2)",
    "walker-skips-break":
        "seeded (seed, review R1): v4 07/14 madvise_free_pte_range does break: "
        "`if (break_cow_pte(vma, pmd, addr)) goto next;`",
    "vma-lock-fault-breaks-shared":
        "seeded (seed, review R4): per-VMA-lock faults are 6.4; v4 is based on v6.2-rc7",
    "rmap-stale-table":
        "04/14 mm/page_vma_mapped.c page_vma_mapped_walk: `if (break_cow_pte(vma, "
        "pvmw->pmd, pvmw->address)) return not_found(pvmw);` then `if (!map_pte(pvmw))`: "
        "nothing keeps the table unshared between the break and the PTL (review R5)",
    "zap-partial-shared":
        "03/14 mm/memory.c zap_pte_range: `if (!range_in_vma(vma, addr & PMD_MASK, "
        "(addr + PMD_SIZE) & PMD_MASK))` tests the VMA, not the zap range; "
        "`pte_is_shared = true` keeps the entries (analysis C1)",
    "swapin-ignores-break-failure":
        "03/14 mm/memory.c handle_pte_fault: `handle_cow_pte_fault(vmf); return "
        "do_swap_page(vmf);` (result ignored; analysis C2)",
    "nr-ptes-on-oom":
        "03/14 mm/memory.c handle_cow_pte_fault: `mm_dec_nr_ptes(mm);` before the "
        "allocation; on failure only `set_pmd_at(mm, addr, pmd, cowed_entry);` (analysis C3)",
    "wipeonfork-shared":
        "02/14 mm/memory.c copy_cow_pte_range: only `if (curr->vm_flags & VM_DONTCOPY)` "
        "refuses sharing (analysis C4)",
    "gup-fast-fork-race":
        "seeded (review R8): v4 02/14 shares from copy_pmd_range, inside "
        "copy_page_range's raw_write_seqcount_begin(&src_mm->write_protect_seq)",
    "read-fault-fills-shared":
        "03/14 mm/memory.c __handle_mm_fault: breaks only `if ((flags & "
        "(FAULT_FLAG_WRITE|FAULT_FLAG_UNSHARE) || vma->vm_ops) && ...)`: an anonymous "
        "read fault fills the shared table with the zero page (analysis C8)",
    "recover-skips-vma":
        "02/14 mm/memory.c copy_pmd_range: falls back to copy_pte_range only when "
        "recover_end lies inside src_vma, else `continue` (found by cowenv's soak)",
    "fork-ptl-nesting":
        "02/14 mm/memory.c copy_cow_pte_range: `spin_lock(src_ptl); pmd_get_pte(src_pmd); "
        "pmd_install(dst_mm, dst_pmd, &pte_table);`: pmd_lock inside the PTE lock, against "
        "upstream's pmd_lock -> PTE lock; on x86-64 both are ptlocks of ptlock_init()'s "
        "one lockdep class (include/linux/mm.h): a lockdep splat at every COW fork",
    "fork-late-wrprotect":
        "02/14 mm/memory.c copy_cow_pte_range: `pmd_get_pte(src_pmd); pmd_install(dst_mm, "
        "dst_pmd, &pte_table); spin_unlock(src_ptl);` links the child's PMD writable, each "
        "VMA ends with `spin_unlock(src_ptl); ... cond_resched();`, and only `out: "
        "pmdp_set_wrprotect(src_mm, orig_addr, src_pmd); set_pmd_at(dst_mm, orig_addr, "
        "dst_pmd, pmd_wrprotect(*src_pmd));` write-protects, with no lock held: rmap's "
        "break_cow_pte sees pmd_write and rewrites the shared table",
    "recover-double-copy":
        "02/14 mm/memory.c copy_pmd_range: `if (!pmd_none(*dst_pmd) && !pmd_write(*dst_pmd)) "
        "continue;` skips only a shared child PMD, so after recover_pte_range the next VMA "
        "of the PMD calls copy_cow_pte_range again: every entry accounted to the child "
        "twice, the first private table leaked (reference notes C7)",
    "table-free-no-deferral":
        "03/14 mm/memory.c handle_cow_pte_fault: `if (!pmd_put_pte(&cowed_entry)) { "
        "pgtable_t token = pmd_pgtable(*pmd); ... pmd_clear(pmd); pte_free(mm, token);` "
        "frees the new table, visible in the PMD since pte_alloc_map_lock, with no "
        "tlb_remove_table (RCU/IPI) and before `flush_tlb_range(vma, start, end);` "
        "(analysis C6)",
    "numa-fault-writes-shared":
        "03/14 mm/memory.c handle_pte_fault: breaks only before do_swap_page (`if "
        "(!pte_present(vmf->orig_pte)) { ... handle_cow_pte_fault(vmf); return "
        "do_swap_page(vmf); }`), then `if (pte_protnone(vmf->orig_pte) && "
        "vma_is_accessible(vmf->vma)) return do_numa_page(vmf);` unbroken; "
        "__handle_mm_fault breaks only for write/unshare faults or vm_ops: an anonymous "
        "read fault on a NUMA-hinting entry rewrites the shared table (issue 13)",
    "mremap-ignores-break-failure":
        "03/14 mm/mremap.c move_page_tables: `/* TLB flush twice time here? */ "
        "break_cow_pte(vma, old_pmd, old_addr);` (result ignored; analysis C2): a failed "
        "break moves the still-shared table's entries (move_ptes) or installs it behind a "
        "writable PMD (move_normal_pmd's pmd_populate)",
    "mremap-dst-shared":
        "03/14 mm/mremap.c breaks only old_pmd; 6.2 move_ptes then does `new_pte = "
        "pte_offset_map(new_pmd, new_addr); ... set_pte_at(mm, new_addr, new_pte, pte);` "
        "into a COW-ed target table (found by cowenv's mremap walker)",
    "fork-shares-migration-entry":
        "02/14 mm/memory.c copy_cow_pte_range: `for_each_vma_range(vmi, curr, end)` runs "
        "copy_nonpresent_pte on the entries of every VMA of the PMD, before dup_mmap's "
        "anon_vma_fork links the child's copy of the later ones into the rmap: a "
        "remove_migration_ptes walk in between misses the child's migration entry; and "
        "04/14 remove_migration_pte's `PVMW_SYNC | PVMW_MIGRATION | PVMW_BREAK_COW_PTE` "
        "with page_vma_mapped_walk's `if (break_cow_pte(vma, pvmw->pmd, pvmw->address)) "
        "return not_found(pvmw);` leaves the entry of a shared table behind when the break "
        "fails (found by cowenv's soak and migration walker)",
    "ptl-recursive-nesting":
        "03/14 mm/memory.c handle_cow_pte_fault: `orig_dst_pte = dst_pte = "
        "pte_alloc_map_lock(mm, pmd, addr, &dst_ptl);` then, dst_ptl held, `src_pte = "
        "pte_offset_map_lock(mm, &cowed_entry, addr, &src_ptl);` (and in the reuse branch "
        "`dst_pte = pte_offset_map_lock(mm, pmd, addr, &dst_ptl);` under src_ptl); 02/14 "
        "recover_pte_range: `spin_lock(dst_ptl); ... spin_lock(src_ptl);`: two split PTE "
        "locks, one lockdep class (ptlock_init's spin_lock_init), no spin_lock_nested "
        "(upstream copy_pte_range: `spin_lock_nested(src_ptl, SINGLE_DEPTH_NESTING)`): "
        "lockdep's \"possible recursive locking detected\"",
    "free-pmd-deferred-flush":
        "03/14 mm/memory.c free_pmd_range: `spin_lock(ptl); if (!pmd_put_pte(pmd)) {...} "
        "spin_unlock(ptl); pmd_clear(pmd); mm_dec_nr_ptes(tlb->mm); "
        "tlb_flush_pmd_range(tlb, addr, PAGE_SIZE);` drops this mm's reference and only "
        "widens the gather: this mm's CPUs are flushed at tlb_finish_mmu, while the other "
        "sharer may free the table meanwhile (tlb_remove_table flushes its own mm's CPUs "
        "only), leaving this mm's paging-structure caches on a freed table (found with "
        "the TLB model of issue 13)",
}

#: Signatures a campaign on a preset should treat as already known (issue 12): on
#: ``as-posted``/``review`` the lockdep splat of ``fault-asserts-write-lock`` fires at the
#: first COW break outside fork in nearly every episode, and ``fork-ptl-nesting``'s at
#: every COW fork. The flaw stays faithful (v4's
#: ``mmap_assert_write_locked`` is a ``WARN_ON`` that fires every time); campaigns pass
#: these as the env's ``ignore_signatures`` so that the other flaws' harm is what gets
#: filed, minimised and summarised. Where this is wired: ``campaign.default_env_kwargs``.
PRESET_KNOWN_SIGNATURES: dict[str, tuple[str, ...]] = {
    "as-posted": ("lock-discipline@handle_cow_pte_fault", "lock-discipline@pmd_install",
                  "lock-discipline@pte_offset_map_lock", "lock-discipline@recover_pte_range"),
    "review": ("lock-discipline@handle_cow_pte_fault", "lock-discipline@pmd_install",
               "lock-discipline@pte_offset_map_lock", "lock-discipline@recover_pte_range"),
}

#: Kernel bases (the upstream release whose semantics the model follows).
#: ``6.2``: v4's base (v6.2-rc7): ``pte_offset_map[_lock]`` cannot fail and walks
#: whatever the PMD holds; no per-VMA locks. ``6.4``: adds per-VMA-lock faults. ``6.5``:
#: ``pte_offset_map_lock`` re-checks the PMD under the PTL and fails/retries (Hugh
#: Dickins' series). R/O long-term pins unshare the zero page on every base (84209e87c696
#: is in v6.2-rc1). See docs/kernel-bases.md.
BASES: tuple[str, ...] = ("6.2", "6.4", "6.5")

#: Variant names. ``classic`` is upstream (>= 6.2) semantics; ``cowpte`` is COW PTE v4.
VARIANTS: tuple[str, ...] = ("classic", "cowpte")

#: Presets: a preset names a variant plus a flaw set.
#: ``as-posted`` = the v4-origin flaws (on base 6.2 by default); ``review`` = as-posted
#: plus the seeded flaws.
AS_POSTED_FLAWS: tuple[str, ...] = tuple(f for f in FLAW_IDS if FLAW_ORIGINS[f] == "v4")
SEEDED_FLAWS: tuple[str, ...] = tuple(f for f in FLAW_IDS if FLAW_ORIGINS[f] == "seeded")
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "classic": ("classic", ()),
    "as-posted": ("cowpte", AS_POSTED_FLAWS),
    "review": ("cowpte", FLAW_IDS),
    "fixed": ("cowpte", ()),
}

#: Geometry presets. ``x86_64`` is the real one (4 KiB pages, 512 PTEs per table, so one
#: PTE table maps 2 MiB); ``small`` keeps 4 KiB pages but 8 entries per table so that RL
#: episodes touch several tables with a handful of pages.
GEOMETRIES: dict[str, int] = {"x86_64": 512, "small": 8, "tiny": 4}

FAULT_MODES: tuple[str, ...] = ("mmap_lock", "vma_lock")

#: Resource caps, checked when a config is built (so a scenario file or a flag asking for
#: more fails with one line instead of a numpy ``MemoryError``). The frame pool costs about
#: 150 bytes per frame in arrays and free lists, so 2**22 frames (16 GiB simulated) is
#: about 600 MB; the swap device costs less per slot. ``PTRS_PER_PTE`` above 4096 is no
#: real geometry.
MAX_FRAMES = 1 << 22
MAX_SWAP_SLOTS = 1 << 22
MAX_PTRS_PER_PTE = 4096


@functools.lru_cache(maxsize=64)
def _version_at_least(base: str, version: str) -> bool:
    """``base >= version`` as dotted version numbers (memoised: called on hot paths)."""
    return tuple(map(int, base.split("."))) >= tuple(map(int, version.split(".")))


@dataclass(frozen=True)
class KernelConfig:
    """Everything the simulated kernel is parameterised by.

    Attributes:
        variant: ``classic`` (upstream) or ``cowpte`` (COW PTE v4).
        flaws: Flaw ids switched on (only meaningful for ``cowpte``); kept sorted in
            catalogue order so equal configs compare and serialise equally.
        ptrs_per_pte: Entries per PTE table (``PTRS_PER_PTE``); 512 on x86-64.
        page_size: Bytes per page (4096).
        nr_frames: Size of the physical frame pool (pages and page-table pages alike).
        nr_swap_slots: Size of the swap device in pages.
        fault_mode: ``mmap_lock`` (faults take mmap_lock for read) or ``vma_lock``
            (faults take only the per-VMA read lock, as since Linux 6.4).
        split_ptl: ``USE_SPLIT_PTE_PTLOCKS``: a lock per PTE table (True) or the per-mm
            ``page_table_lock`` for every table (False).
        max_threads: Cap on user threads (tids 1..max_threads).
        max_processes: Cap on live processes.
        lockdep: ``CONFIG_PROVE_LOCKING``: ``mmap_assert_*`` splats and lock-order
            inversion reports. Off, ``mmap_assert_write_locked`` only checks that the
            lock is held at all (``VM_BUG_ON_MM(!rwsem_is_locked)``), as in a
            production kernel like the one the v4 author ran cow.c on.
        base: The upstream release whose semantics are modelled (:data:`BASES`). Empty
            (the default) resolves to ``6.2``, v4's base, unless ``fault_mode`` is
            ``vma_lock``, which needs per-VMA locks and resolves to ``6.5`` (what cowenv
            modelled before bases existed). ``vma_lock`` with base ``6.2`` is an error.
        tlb: Model a per-thread TLB and paging-structure cache filled by the MMU walk,
            with the kernel's flushes and ``mmu_gather`` (:mod:`cowenv.kernel.tlb`). Off,
            every user access walks the live page tables (no stale translation exists).
    """

    variant: str = "classic"
    flaws: tuple[str, ...] = ()
    ptrs_per_pte: int = 512
    page_size: int = 4096
    nr_frames: int = 4096
    nr_swap_slots: int = 1024
    fault_mode: str = "mmap_lock"
    split_ptl: bool = True
    max_threads: int = 8
    max_processes: int = 8
    lockdep: bool = True
    base: str = ""
    tlb: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, "
                             f"got {self.variant!r}")
        unknown = [f for f in self.flaws if f not in FLAW_IDS]
        if unknown:
            raise ValueError(f"flaws: unknown flaw id {unknown[0]!r} "
                             f"(known: {', '.join(FLAW_IDS)})")
        object.__setattr__(self, "flaws", tuple(f for f in FLAW_IDS if f in self.flaws))
        if self.flaws and self.variant != "cowpte":
            raise ValueError("flaws: flaws apply only to the cowpte variant")
        if (self.ptrs_per_pte < 2 or self.ptrs_per_pte & (self.ptrs_per_pte - 1)
                or self.ptrs_per_pte > MAX_PTRS_PER_PTE):
            raise ValueError(f"ptrs_per_pte: expected a power of two from 2 to "
                             f"{MAX_PTRS_PER_PTE}, got {self.ptrs_per_pte}")
        if self.page_size != 4096:
            raise ValueError("page_size: only 4096 is modelled")
        if not 16 <= self.nr_frames <= MAX_FRAMES:
            raise ValueError(f"nr_frames: expected 16 to {MAX_FRAMES} (the frame pool is "
                             f"held in memory), got {self.nr_frames}")
        if not 0 <= self.nr_swap_slots <= MAX_SWAP_SLOTS:
            raise ValueError(f"nr_swap_slots: expected 0 to {MAX_SWAP_SLOTS}, "
                             f"got {self.nr_swap_slots}")
        if self.fault_mode not in FAULT_MODES:
            raise ValueError(f"fault_mode: expected one of {', '.join(FAULT_MODES)}")
        if not self.base:
            object.__setattr__(self, "base", "6.5" if self.fault_mode == "vma_lock" else "6.2")
        if self.base not in BASES:
            raise ValueError(f"base: expected one of {', '.join(BASES)}, got {self.base!r}")
        if self.fault_mode == "vma_lock" and not self.base_at_least("6.4"):
            raise ValueError(f"fault_mode: vma_lock needs per-VMA locks (Linux 6.4); "
                             f"base {self.base} has none (use base 6.4 or 6.5)")
        if not 1 <= self.max_threads <= 64:
            raise ValueError("max_threads: expected 1..64")
        if not 1 <= self.max_processes <= 64:
            raise ValueError("max_processes: expected 1..64")

    def base_at_least(self, version: str) -> bool:
        """Whether the modelled base is ``version`` or later (e.g. ``"6.5"``)."""
        return _version_at_least(self.base, version)

    def has(self, flaw: str) -> bool:
        """Return whether flaw ``flaw`` is switched on."""
        return flaw in self.flaws

    @property
    def pmd_size(self) -> int:
        """Bytes mapped by one PTE table (one PMD entry)."""
        return self.ptrs_per_pte * self.page_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists instead of tuples) for YAML/JSON."""
        d = asdict(self)
        d["flaws"] = list(self.flaws)
        return d

    @classmethod
    def from_preset(cls, preset: str, **kw: Any) -> KernelConfig:
        """Build a config from a preset name (``classic``, ``as-posted``, ``review``, ``fixed``)."""
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        variant, flaws = PRESETS[preset]
        kw.setdefault("flaws", flaws)
        return cls(variant=variant, **kw)


def config_from_dict(d: dict[str, Any]) -> KernelConfig:
    """Build a config from plain data (as found in a scenario file).

    Accepts ``preset`` (sets variant and flaws), ``variant``, ``flaws``, ``geometry``
    (a preset name from :data:`GEOMETRIES` or an int = entries per table) and the
    other :class:`KernelConfig` fields.

    Raises:
        ValueError: naming the offending field.
    """
    d = dict(d)
    kw: dict[str, Any] = {}
    preset = d.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        kw["variant"], kw["flaws"] = PRESETS[preset]
    if "variant" in d:
        v = d.pop("variant")
        if v in PRESETS and v not in VARIANTS:
            kw["variant"], kw["flaws"] = PRESETS[v]
        else:
            kw["variant"] = v
    if "flaws" in d:
        f = d.pop("flaws")
        if isinstance(f, str):
            if f == "as-posted":
                f = list(AS_POSTED_FLAWS)
            elif f in ("review", "all"):
                f = list(FLAW_IDS)
            elif f in ("fixed", "none", ""):
                f = []
            else:
                f = [x.strip() for x in f.split(",") if x.strip()]
        if not isinstance(f, list | tuple) or not all(isinstance(x, str) for x in f):
            raise ValueError("flaws: expected a list of flaw ids")
        kw["flaws"] = tuple(f)
    if "geometry" in d:
        g = d.pop("geometry")
        if isinstance(g, str):
            if g not in GEOMETRIES:
                raise ValueError(f"geometry: expected one of {', '.join(GEOMETRIES)} or an int")
            kw["ptrs_per_pte"] = GEOMETRIES[g]
        elif isinstance(g, int) and not isinstance(g, bool):
            kw["ptrs_per_pte"] = g
        else:
            raise ValueError("geometry: expected a preset name or an int (entries per table)")
    ints = ("ptrs_per_pte", "page_size", "nr_frames", "nr_swap_slots", "max_threads",
            "max_processes")
    for k in ints:
        if k in d:
            v = d.pop(k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{k}: expected an integer, got {v!r}")
            kw[k] = v
    if "fault_mode" in d:
        kw["fault_mode"] = d.pop("fault_mode")
    if "base" in d:
        b = d.pop("base")
        if isinstance(b, float | int) and not isinstance(b, bool):
            b = f"{b:.1f}"
        if not isinstance(b, str):
            raise ValueError(f"base: expected one of {', '.join(BASES)}, got {b!r}")
        kw["base"] = b
    for b in ("split_ptl", "lockdep", "tlb"):
        if b in d:
            v = d.pop(b)
            if not isinstance(v, bool):
                raise ValueError(f"{b}: expected true or false")
            kw[b] = v
    if d:
        raise ValueError(f"{sorted(d)[0]}: unknown config field")
    if kw.get("flaws") and "variant" not in kw:
        kw["variant"] = "cowpte"
    return KernelConfig(**kw)


__all__ = ["MAX_FRAMES", "MAX_SWAP_SLOTS", "MAX_PTRS_PER_PTE",
           "FLAW_IDS", "FLAW_ORIGINS", "PRESET_KNOWN_SIGNATURES", "FLAW_SOURCES",
           "AS_POSTED_FLAWS", "SEEDED_FLAWS", "BASES", "VARIANTS", "PRESETS", "GEOMETRIES",
           "FAULT_MODES", "KernelConfig",
           "config_from_dict"]
