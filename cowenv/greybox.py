"""Coverage-guided schedule fuzzing: the coverage signal, the corpus and the mutations.

This module is the library half of ``cowenv fuzz --agent greybox`` (the agent is
:class:`cowenv_agents.greybox.GreyboxAgent`). It knows nothing about agents:

* :class:`FeatureTracker` turns each step of an episode into *features* (32-bit ids).
  Two feedbacks (:data:`FEEDBACKS`):

  - ``label``: the preemption label a step stopped at (plain label coverage, what the
    observation's coverage bitmap holds);
  - ``interleaving`` (default): labels, plus *concurrent pairs* ``(M, L)``: thread ``t``
    reached label ``L`` while a *related* thread ``u`` was paused mid-operation at ``M``
    (with each operation's variant: its arguments other than addresses, e.g. a writable
    GUP-fast pin, ``MADV_FREE``)
    (related: same mm, or their mms share a COW PTE table, or one of them is kswapd; the
    Snowboard/KRace idea of coverage that sees which code ran against which), the lock
    classes other threads held when ``L`` was reached, the lock a step waited for, the
    page-table-sharing state (how many PMD entries point at a shared table, bucketed)
    at every label and operation start, the state of every active pin (still mapped
    where it was taken, in a COW-shared table, ``PageAnonExclusive``), the stale
    entries the CPUs' TLBs and paging-structure caches hold (:func:`_tlb_states`: a
    cached table freed or replaced, a cached writable page write-protected, with or
    without a flush pending) and every violation signature.

* :class:`CorpusEntry` / :class:`Corpus`: schedules kept because they reached a feature
  nothing earlier reached. An entry is a list of catalogue indices (stable for a harness
  configuration) plus its feature set; on disk it is a scenario file (``get_schedule``
  data, replayable with ``cowenv replay``) whose ``recorded`` block carries the action
  indices, the features and a digest of the catalogue. Minimisation is AFL's: each
  entry is trimmed to the last step that reached a new feature, and
  :meth:`Corpus.favoured` is a greedy set cover (the shortest entry per feature), which
  parent selection prefers and :meth:`Corpus.cull` keeps.

* :func:`mutate`: insert / delete / splice operations, change a start's thread or
  arguments, move a preemption point, insert runs of one thread (a preemption), insert a
  pressure event (or a thread's ``fail_nth`` right before one of its calls), truncate;
  ``preempt`` (another thread's operation and a few of its points inside a thread's
  operation: a race window), ``insert_missing`` (an operation kind the schedule
  lacks), ``insert_use`` (a load, store or device access to what an earlier
  operation touched) and ``hoist`` (a later operation of one thread moved, with its
  first points, inside an earlier operation of another). Parents are cut at the points
  where they reached something new (:attr:`CorpusEntry.cuts`).

* :func:`seed_plan`: a scenario (``scenarios/``, an earlier finding) as an abstract plan
  (start ``op`` on ``tid`` with these arguments, step to this label, finish, event) that
  the agent maps onto the catalogue of its own configuration at run time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .catalogue import ActionSpec, range_pages, range_pmds, slot_pid
from .kernel import KSWAPD_TID, Kernel
from .kernel.memory import PG_allocated, PG_anon_exclusive
from .kernel.mm import (
    MMF_COW_PTE,
    MMF_COW_PTE_READY,
    VM_DONTCOPY,
    VM_WIPEONFORK,
    vma_is_accessible,
)
from .kernel.pgtable import (
    PFN_SHIFT,
    PTE_MIGRATION,
    PTE_PRESENT,
    PTE_SWAP,
    PTE_SWP_EXCLUSIVE,
    PTE_WRITE,
    ZERO_PFN,
    pte_protnone,
)

FEEDBACKS = ("label", "interleaving")
#: ``recorded`` keys of a corpus file.
REC_ACTIONS = "greybox_actions"
REC_FEATURES = "greybox_features"
REC_CATALOGUE = "greybox_catalogue"
REC_CUTS = "greybox_cuts"
REC_STATES = "greybox_states"
#: Plan argument: the range is exactly one of the scenario's mappings (:func:`seed_plan`).
WHOLE_VMA = "whole_vma"
#: Most cut points kept per corpus entry (:attr:`CorpusEntry.cuts`).
MAX_CUTS = 16


def fid(*parts: Any) -> int:
    """A stable 32-bit feature id (CRC-32; Python's ``hash`` is salted per process)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def catalogue_digest(catalogue: tuple[ActionSpec, ...] | list[ActionSpec]) -> str:
    """Digest of a catalogue: corpus files only load into a harness with the same one."""
    return f"{zlib.crc32(repr(tuple(catalogue)).encode()):08x}"


def _pin_states(k: Kernel) -> list[tuple[int, int, int, int]]:
    """The state of every active pin, as a sorted list of small tuples.

    Per pin: writable pin, the pinned page still mapped at the pin's address in the
    pinning mm (the pin and the process agree), that mapping's PMD entry write-protected
    (the table is COW-shared), and the page ``PageAnonExclusive``. A pinned page in a
    shared table, or not exclusive, is the state GUP's ``sanity_check_pinned_pages`` and
    the COW PTE pin checks are about; reaching it is progress towards a pin-coherence
    violation, which only a later device read or write shows.
    """
    out = []
    P = k.config.ptrs_per_pte
    for pin in k.pins.values():
        if not pin.active:
            continue
        e = pin.mm.pmd.get(pin.vpn // P)
        mapped = wp = 0
        if e is not None:
            pte = int(e.table.entries[pin.vpn % P])
            mapped = int(bool(pte & PTE_PRESENT) and pte >> PFN_SHIFT == pin.pfn)
            wp = int(not e.write)
        excl = int(bool(int(k.pool.flags[pin.pfn]) & PG_anon_exclusive))
        out.append((int(pin.write), mapped, wp, excl))
    return sorted(out)


def _shared_tables(k: Kernel) -> tuple[int, dict[int, set[int]]]:
    """Number of write-protected (COW-shared) PMD entries, and each pid's table ids."""
    n = 0
    tables: dict[int, set[int]] = {}
    for p in k.procs.values():
        if not p.alive:
            continue
        s: set[int] = set()
        for e in p.mm.pmd.values():
            s.add(id(e.table))
            if not e.write:
                n += 1
        tables[p.pid] = s
    return n, tables


def _shared_contents(k: Kernel) -> set[str]:
    """What the COW-shared page tables hold (the page-table-sharing states of issue 15).

    The kinds of entry found in a PTE table referenced by more than one PMD entry
    (``cow_pte_count`` > 1): ``zero`` (the zero page), ``anon`` (another present page),
    ``pinned`` (a present page a pin holds), ``numa`` (``pte_protnone`` in an accessible
    VMA: a load runs ``do_numa_page``), ``protnone`` (in a ``PROT_NONE`` VMA),
    ``swap``/``swap-excl`` (a swap entry, ``pte_swp_exclusive`` or not), ``migration``;
    and ``psc`` when a live thread's paging-structure cache holds such a table. Each is
    one step from a flaw's trigger (a NUMA-hinting load, ``remove_migration_ptes``, a
    device read, a load through the cache while the table is dropped), which the search
    then has to take; without the state as a feature an episode that reached it joins
    the corpus only if it also reached a new interleaving pair. Entries are looked at
    once per table (a shared table is scanned once, through its first mapper).
    """
    out: set[str] = set()
    P = k.config.ptrs_per_pte
    pinned = {pin.pfn for pin in k.pins.values() if pin.active} if k.pins else set()
    shared: set[int] = set()  # id() of the shared tables scanned
    for p in k.live_procs():
        mm = p.mm
        for idx, e in mm.pmd.items():
            tb = e.table
            if tb.refcount < 2 or id(tb) in shared:
                continue
            shared.add(id(tb))
            ents = tb.entries
            for j in np.flatnonzero(ents):
                x = int(ents[j])
                if x & PTE_MIGRATION:
                    out.add("migration")
                elif x & PTE_SWAP:
                    out.add("swap-excl" if x & PTE_SWP_EXCLUSIVE else "swap")
                elif pte_protnone(x):
                    v = mm.find_vma(idx * P + int(j))
                    out.add("numa" if v is not None and vma_is_accessible(v) else "protnone")
                else:
                    pfn = x >> PFN_SHIFT
                    out.add("zero" if pfn == ZERO_PFN else
                            "pinned" if pfn in pinned else "anon")
    if shared and k.config.tlb:
        for t in k.threads.values():
            if not t.exited and any(id(v[0]) in shared for v in t.psc.values()):
                out.add("psc")
                break
    return out


def _fork_layouts(k: Kernel, data: bool = False) -> set[str]:
    """How the next fork would treat the populated PMDs of a COW PTE process.

    v4 02/14 ``copy_cow_pte_range`` walks every VMA of the PMD (``for_each_vma_range``);
    one that refuses sharing (``VM_DONTCOPY``; ``VM_WIPEONFORK`` too, fixed) sends the
    PMD to ``recover_pte_range`` and the later VMAs to ``copy_pte_range`` from
    ``recover_end``. For each populated PMD (a non-zero entry) of an mm with
    ``MMF_COW_PTE`` (or ``MMF_COW_PTE_READY``: its next fork sets it) that holds such a
    VMA: ``fork:<flag>-before`` (it lies before a populated VMA that does not refuse),
    ``fork:<flag>-after`` (after one), ``fork:<flag>-populated`` (it has populated
    entries itself), ``<flag>`` being ``dontcopy`` or ``wipeonfork``. A fork is one
    step from each: the corner layouts of the recover path and of the wipe-on-fork
    check, which an episode reaches only by a rare ``madvise`` on part of a region.

    With ``data``, each of them also as ``<layout>-data`` when the populated VMA it
    names (the later one, the earlier one, the refusing one) maps a page holding data:
    a present entry whose page's content is not zero (a store reached it). The oracles
    compare contents (the shadow, a read), so a page lost or leaked by the recover or
    wipe-on-fork path is visible only if it held something other than zeroes; a
    region only populated (``MAP_POPULATE``, a read's zero page) reaches the layout
    and shows nothing (``recover-skips-vma`` seed 2, counted by a probe not kept: 21
    COW forks in the ``dontcopy-before`` layout, every page of the later VMA
    zero-filled; the test of the flaw with and without a store shows the rule).
    """
    out: set[str] = set()
    for p in k.live_procs():
        out |= fork_layouts_of(k, p.mm, data)
    return out


def fork_layouts_of(k: Kernel, mm: Any, data: bool = False) -> set[str]:
    """:func:`_fork_layouts` of one mm (empty unless it has ``MMF_COW_PTE[_READY]``)."""
    out: set[str] = set()
    if not mm.flags & (MMF_COW_PTE | MMF_COW_PTE_READY):
        return out
    P = k.config.ptrs_per_pte
    content = k.pool.content

    def holds_data(e: np.ndarray) -> bool:
        pres = (e & PTE_PRESENT) != 0
        return bool(pres.any() and content[e[pres] >> PFN_SHIFT].any())

    for idx, e in mm.pmd.items():
        ents = e.table.entries
        if not ents.any():
            continue
        lo, hi = idx * P, (idx + 1) * P
        vmas = mm.vmas_in(lo, hi)
        if not any(v.flags & (VM_DONTCOPY | VM_WIPEONFORK) for v in vmas):
            continue
        seen_pop = seen_data = False
        refusing: list[str] = []
        for v in vmas:
            ve = ents[max(v.start, lo) - lo:min(v.end, hi) - lo]
            pop = bool(ve.any())
            dat = data and pop and holds_data(ve)
            flag = ("dontcopy" if v.flags & VM_DONTCOPY else
                    "wipeonfork" if v.flags & VM_WIPEONFORK else "")
            if flag:
                if pop:
                    out.add(f"fork:{flag}-populated")
                if dat:
                    out.add(f"fork:{flag}-populated-data")
                if seen_pop:
                    out.add(f"fork:{flag}-after")
                if seen_data:
                    out.add(f"fork:{flag}-after-data")
                refusing.append(flag)
            elif pop:
                seen_pop = True
                out.update(f"fork:{f}-before" for f in refusing)
                if dat:
                    seen_data = True
                    out.update(f"fork:{f}-before-data" for f in refusing)
    return out


def _tlb_states(k: Kernel) -> set[tuple[str, str, int]]:
    """What the CPUs' caches hold that the page tables no longer say (:mod:`cowenv.kernel.tlb`).

    Per live user thread: a paging-structure-cache entry whose table was freed or
    reused (``psc``/``freed``), unlinked with its free pending (``unlinked``), or no
    longer the table its PMD entry points at (``replaced``); a TLB entry whose frame
    was freed or reused (``tlb``/``freed``) or that is writable where the page tables
    no longer grant the store (``tlb``/``wp``); each with whether a flush is pending for
    the thread's mm. These are the states one access away from the TLB oracles
    (``memory-safety@tlb_stale_table``, ``tlb_stale_entry``, ``isolation@tlb_stale_write``):
    the window between an unlink or a write-protection and its flush, which a search
    then has to use. TLB entries are only looked at while a thread holds at most
    :data:`_TLB_SCAN` of them (the cost of the feature stays per step, not per page).
    """
    out: set[tuple[str, str, int]] = set()
    if not k.config.tlb:
        return out
    pool = k.pool
    P = k.config.ptrs_per_pte
    for t in k.threads.values():
        if t.exited or (not t.psc and not t.tlb):
            continue
        p = k.procs.get(t.pid)
        if p is None:
            continue
        mm = p.mm
        pend = int(bool(k.tlb_pending.get(mm.id, 0)))
        for idx, (table, tgen, _w) in t.psc.items():
            tp = table.pfn
            if pool.gen[tp] != tgen or not pool.flags[tp] & PG_allocated:
                out.add(("psc", "freed", pend))
            elif table.freed:
                out.add(("psc", "unlinked", pend))
            else:
                e = mm.pmd.get(idx)
                if e is None or e.table is not table:
                    out.add(("psc", "replaced", pend))
        if len(t.tlb) > _TLB_SCAN:
            continue
        for vpn, (pfn, gen, writable, _d) in t.tlb.items():
            if pool.gen[pfn] != gen or not pool.flags[pfn] & PG_allocated:
                out.add(("tlb", "freed", pend))
            elif writable:
                e = mm.pmd.get(vpn // P)
                ok = False
                if e is not None and e.write:
                    pte = int(e.table.entries[vpn % P])
                    ok = bool(pte & PTE_WRITE) and pte >> PFN_SHIFT == pfn
                if not ok:
                    out.add(("tlb", "wp", pend))
    return out


def _arg_state(k: Kernel, spec: ActionSpec) -> tuple[str, str]:
    """The state of the page a starting call addresses, in the caller's page tables.

    ``(pmd, pte)``: the PMD entry is absent (``none``), COW-shared (write-protected and
    the table referenced more than once, ``shared``), write-protected with one
    reference left (``wp``) or ``private``; the PTE is ``none``, ``present``,
    ``protnone`` (``pte_protnone``: a ``PROT_NONE`` or NUMA-hinting entry, on which a
    fault runs ``do_numa_page``) or ``swap`` (another non-present entry). A call's
    argument state, as syzkaller's resources give a call the state an earlier call
    left: the same ``mremap`` on a range whose table is shared runs another path (a
    break first) than on a private one. ``("", "")`` for a
    call without an address.
    """
    a = dict(spec.args).get("addr")
    t = k.threads.get(spec.tid)
    p = k.procs.get(t.pid) if t is not None else None
    if not isinstance(a, int) or isinstance(a, bool) or p is None:
        return "", ""
    P = k.config.ptrs_per_pte
    vpn = a // k.config.page_size
    e = p.mm.pmd.get(vpn // P)
    if e is None:
        return "none", "none"
    pte = int(e.table.entries[vpn % P])
    st = "present" if pte & PTE_PRESENT else ("swap" if pte else "none")
    if st == "present" and pte_protnone(pte):
        st = "protnone"  # PROT_NONE or NUMA-hinting: a load takes another path
    if e.write:
        return "private", st
    # Write-protected: shared with another mm, or left write-protected after the other
    # sharers went (the next break reuses the table without copying).
    return ("shared" if e.table.refcount > 1 else "wp"), st


def call_context(k: Kernel, spec: ActionSpec) -> tuple[str, str, str, str]:
    """A starting call's context: ``(operation, variant, PMD state, PTE state)``.

    The operation with its arguments other than addresses (:func:`spec_variant`) and the
    state of the page it addresses (:func:`_arg_state`): what the fault triage's code
    feature ``A`` hashes, and the unit the agent's context-sensitive fault injection
    tries (``fault_contexts``).
    """
    return (spec.op, spec_variant(spec), *_arg_state(k, spec))


def range_class(k: Kernel, spec: ActionSpec, pmd: bool = False) -> str:
    """Where a ranged call's boundaries fall among the caller's VMAs.

    ``split``: the range starts or ends inside a VMA, so the call splits it first
    (``__split_vma``, whose COW PTE v4 03/14 ``break_cow_pte(vma, NULL, addr)`` breaks
    the table of the split address before anything else); ``whole``: it covers whole
    VMAs (or runs into a hole), so the first break is the walker's own
    (``change_pte_range``'s, ``move_page_tables``'s, ``zap_pte_range``'s); ``hole``: no
    VMA in range; ``""``: no range (``addr`` with ``length``, or ``old_length`` for
    mremap). The two first classes fail their first allocation at different call
    sites: a proxy of the allocation's calling context (FIFUZZ's unit) that the
    operation, its variant and the page state do not see. With ``pmd``, a split whose
    every split address is PMD-aligned is ``split-pmd``: the split's break is of the
    table *after* the address, so a walker over the lower part breaks its own table
    next (the second allocation), where a split inside a table leaves it nothing to
    break. A proxy read from the arguments and the VMA boundaries only: an ``mprotect``
    to a VMA's own protection (``mprotect_fixup`` leaves it alone) and the ``madvise``
    advices that change no VMA flag (``MADV_DONTNEED``, ``MADV_FREE``, ...) split nothing
    although they are classed ``split``.
    """
    args = dict(spec.args)
    if "length" not in args and "old_length" in args:
        args["length"] = args["old_length"]
    r = range_pages(args, k.config.page_size)
    t = k.threads.get(spec.tid)
    p = k.procs.get(t.pid) if t is not None else None
    if not r or "length" not in args or p is None:
        return ""
    vs = p.mm.vmas_in(r.start, r.stop)
    if not vs:
        return "hole"
    cuts = [x for x, inside in ((r.start, vs[0].start < r.start), (r.stop, vs[-1].end > r.stop))
            if inside]
    if not cuts:
        return "whole"
    P = k.config.ptrs_per_pte
    return "split-pmd" if pmd and all(x % P == 0 for x in cuts) else "split"


def spec_variant(spec: ActionSpec) -> str:
    """An operation's variant: its arguments other than addresses (``fast=True,write=True``)."""
    return ",".join(f"{a}={v}" for a, v in spec.args if a not in ("addr", "length", "pid"))


#: Most TLB entries of a thread :func:`_tlb_states` looks at.
_TLB_SCAN = 64


class FeatureTracker:
    """Features of the steps of one episode (see the module docstring).

    Args:
        feedback: One of :data:`FEEDBACKS`.
        tlb: With ``interleaving``, also the TLB staleness features (:func:`_tlb_states`).
        faults: Also the code features (:attr:`code`: call argument states, injected
            allocation failures).
        args: Call argument states (``A``) are corpus features too (a call reaching a
            page in a state no call reached before: syzkaller's resources, the state an
            earlier call left).
        contents: With ``interleaving``, at the end of each operation, what the
            COW-shared tables hold (``C``, :func:`_shared_contents`) with the operation.
        layouts: With ``contents``, the fork layouts (:func:`_fork_layouts`) are ``C``
            states too.
        layout_data: With ``layouts``, also the fork layouts whose pages hold data
            (:func:`_fork_layouts` ``data``).

    """

    def __init__(self, feedback: str = "interleaving", tlb: bool = True,
                 faults: bool = False, args: bool = False, contents: bool = False,
                 layouts: bool = False, layout_data: bool = False) -> None:
        if feedback not in FEEDBACKS:
            raise ValueError(f"feedback: expected one of {', '.join(FEEDBACKS)}")
        self.feedback = feedback
        self.tlb = bool(tlb)
        self.faults = bool(faults)
        self.args = bool(args)
        self.contents = bool(contents)
        self.layouts = bool(layouts)
        self.layout_data = bool(layout_data)
        #: The *code* features of the last step (with ``faults``; :meth:`step`): a
        #: call's argument state and injected allocation failures.
        self.code: list[int] = []
        #: The *state* features produced so far (``C``: what the COW-shared tables
        #: hold, and with ``layouts`` the fork layouts), id -> the kind
        #: (:func:`_shared_contents`, :func:`_fork_layouts`), for
        #: :meth:`Corpus.choose_state`.
        self.state_ids: dict[int, str] = {}
        self._ne = 0
        self._nv = 0
        self._variant: dict[int, str] = {}

    def reset(self, k: Kernel) -> list[int]:
        """Start of an episode (after the harness reset); features of the workload."""
        self._ne = len(k.events)
        self._nv = len(k.violations)
        self._variant = {}
        return [fid("V", v.signature) for v in k.violations]

    def step(self, k: Kernel, spec: ActionSpec) -> list[int]:
        """Features of the step just taken with catalogue entry ``spec``.

        With ``faults``, :attr:`code` is set to the step's *code* features: at an
        operation start, the call with its variant (arguments other than addresses)
        and the state of the page it addresses (``A``, :func:`_arg_state`: the same
        ``mremap`` on a range whose table is COW-shared runs another path, a break
        first, than on a private one), and an injected allocation failure (``F``: the
        failing thread's operation and the allocation site, the error path a kernel's
        coverage would show). ``F`` is also a corpus feature; ``A`` only feeds the
        fault triage (:class:`cowenv_agents.GreyboxAgent`, ``fault_triage``) and the
        adaptive exploration rate.
        """
        ev = k.events
        new = ev[self._ne:]
        self._ne = len(ev)
        out: list[int] = []
        code: list[int] = []
        self.code = code
        faults = self.faults
        if faults:
            for e in new:
                if e.kind == "event" and e.label == "alloc_fail":
                    ft = k.threads.get(e.tid)
                    code.append(fid("F", ft.op if ft is not None else "", e.data))
            out.extend(code)
        vs = k.violations
        if len(vs) > self._nv:
            out.extend(fid("V", v.signature) for v in vs[self._nv:])
            self._nv = len(vs)
        inter = self.feedback == "interleaving"
        if spec.kind == "run":
            label = ""
            for e in reversed(new):
                if e.kind == "point":
                    label = e.label
                    break
                if e.kind == "end":
                    label = f"{e.label}:done"
                    break
            if not label:
                return out
            out.append(fid("L", label))
            if not inter:
                return out
            t = k.threads.get(spec.tid)
            nshared, tables = _shared_tables(k)
            out.append(fid("S", label, min(nshared, 3)))
            for e in new:
                if e.kind == "wait":
                    out.append(fid("W", label, e.label.split(".")[-1].split(":")[0]))
            held: set[str] = set()
            for u in k.threads.values():
                if u is t or u.exited:
                    continue
                for lk, mode in u.held:
                    held.add(f"{lk.cls}/{mode}")
                if u.gen is None or t is None:
                    continue
                related = (u.pid == t.pid or u.tid == KSWAPD_TID or t.tid == KSWAPD_TID
                           or bool(tables.get(u.pid, set()) & tables.get(t.pid, set())))
                if related:
                    out.append(fid("P", u.label or f"{u.op}:start", label,
                                   self._variant.get(u.tid, ""),
                                   self._variant.get(t.tid, "")))
            out.append(fid("K", label, ",".join(sorted(held))))
            if self.contents and label.endswith(":done"):
                cs = _shared_contents(k)
                if self.layouts:
                    cs |= _fork_layouts(k, self.layout_data)
                for c in sorted(cs):
                    f = fid("C", label, c)
                    self.state_ids[f] = c
                    out.append(f)
            if k.pins:
                out.extend(fid("G", *g) for g in _pin_states(k))
            if self.tlb:
                out.extend(fid("T", *x) for x in sorted(_tlb_states(k)))
        if spec.kind == "start" and (faults or self.args):
            a = fid("A", spec.op, spec_variant(spec), *_arg_state(k, spec))
            if faults:
                code.append(a)
            if self.args:
                out.append(a)
        if spec.kind == "start" and inter:
            self._variant[spec.tid] = spec_variant(spec)
            nshared, _ = _shared_tables(k)
            out.append(fid("O", spec.op, min(nshared, 3)))
            if k.pins:
                out.extend(fid("G", spec.op, *g) for g in _pin_states(k))
        return out


@dataclass
class CorpusEntry:
    """One corpus schedule.

    Attributes:
        actions: Catalogue indices (the agent's actions; the harness teardown excluded).
        features: Every feature the schedule reached.
        name: File stem on disk ("" = memory only).
        picks: Times chosen as a parent.
        cuts: Action counts after which the episode reached a feature new to the corpus
            (ascending, the last one ``len(actions)``; at most :data:`MAX_CUTS`). A
            parent is cut at one of them (:meth:`Corpus.choose_cut`): the prefix is a
            state the search had not reached, and the search goes on from there (with
            the whole entry only, the random continuation after a long prefix is a few
            actions, and nearly every episode reaches some new interleaving pair, so
            entries grow to whole episodes).

    """

    actions: list[int]
    features: frozenset[int]
    name: str = ""
    picks: int = 0
    cuts: tuple[int, ...] = ()
    #: State feature (:attr:`FeatureTracker.state_ids`) -> action count after which the
    #: schedule first reached it (those it reached within ``actions``).
    state_at: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.actions)
        cuts = sorted({c for c in self.cuts if 0 < c <= n} | {n})
        if len(cuts) > MAX_CUTS:  # evenly spaced, the last one kept
            step = len(cuts) / MAX_CUTS
            cuts = [cuts[min(len(cuts) - 1, int((i + 1) * step) - 1)]
                    for i in range(MAX_CUTS)]
        self.cuts = tuple(cuts)


@dataclass
class Corpus:
    """The corpus: entries, the union of their features, and the favoured subset."""

    entries: list[CorpusEntry] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    #: Feature -> number of episodes that reached it (:meth:`count`; rarity).
    hits: dict[int, int] = field(default_factory=dict)
    #: The *state* features (:attr:`FeatureTracker.state_ids`: id -> kind), for
    #: :meth:`choose_state`.
    state: dict[int, str] = field(default_factory=dict)
    #: State kind -> number of episodes that reached a state feature of that kind.
    kind_hits: dict[str, int] = field(default_factory=dict)
    _fav: list[int] | None = None
    _rare: list[int] | None = None
    _states: dict[int, list[int]] | None = None

    def count(self, features: set[int] | frozenset[int]) -> None:
        """Record that one episode reached ``features`` (for :meth:`choose`'s rarity)."""
        h = self.hits
        for f in features:
            h[f] = h.get(f, 0) + 1
        st = self.state
        if st:
            kh = self.kind_hits
            for c in {st[f] for f in features if f in st}:
                kh[c] = kh.get(c, 0) + 1
        self._rare = None

    def novel(self, features: set[int] | frozenset[int]) -> set[int]:
        """Features not reached by any entry yet."""
        return set(features) - self.seen

    def add(self, entry: CorpusEntry) -> bool:
        """Add ``entry`` (once per name); returns whether it was added."""
        if entry.name and entry.name in self.names:
            return False
        self.entries.append(entry)
        self.seen |= entry.features
        if entry.name:
            self.names.add(entry.name)
        self._fav = None
        self._rare = None
        self._states = None
        return True

    def favoured(self) -> list[int]:
        """Indices of a greedy set cover: for each feature the shortest entry reaching it.

        AFL's ``cull_queue``: walk features; an entry is favoured if it is the shortest
        (then oldest) entry covering some feature not yet covered by a favoured entry.
        """
        if self._fav is not None:
            return self._fav
        best: dict[int, int] = {}
        for i, e in enumerate(self.entries):
            n = len(e.actions)
            for f in e.features:
                j = best.get(f)
                if j is None or n < len(self.entries[j].actions):
                    best[f] = i
        covered: set[int] = set()
        fav: list[int] = []
        for i in sorted(set(best.values())):
            e = self.entries[i]
            if e.features - covered:
                fav.append(i)
                covered |= e.features
        self._fav = fav
        return fav

    def cull(self) -> int:
        """Keep only the favoured entries (corpus minimisation); returns how many went."""
        fav = set(self.favoured())
        before = len(self.entries)
        self.entries = [e for i, e in enumerate(self.entries) if i in fav]
        self._fav = None
        self._rare = None
        self._states = None
        return before - len(self.entries)

    def rarest(self) -> list[int]:
        """Indices of the entries that reach the rarest features (FairFuzz's rare branches).

        A feature is rare when at most twice the minimum number of episodes reached it
        (features never counted, e.g. of loaded files, count as reached once); for each
        rare feature the shortest entry reaching it is kept.
        """
        if self._rare is not None:
            return self._rare
        h = self.hits
        best: dict[int, int] = {}
        lo = None
        for e in self.entries:
            for f in e.features:
                c = h.get(f, 1)
                if lo is None or c < lo:
                    lo = c
        cut = 2 * (lo or 1)
        for i, e in enumerate(self.entries):
            n = len(e.actions)
            for f in e.features:
                if h.get(f, 1) <= cut:
                    j = best.get(f)
                    if j is None or n < len(self.entries[j].actions):
                        best[f] = i
        self._rare = sorted(set(best.values()))
        return self._rare

    def choose(self, rng: np.random.Generator) -> CorpusEntry:
        """A parent: a :meth:`rarest` entry (1/2), a favoured one (2/5), or any (1/10).

        Power schedule: within the pool drawn, two candidates are drawn and the one
        chosen fewer times so far wins (a tournament: AFLFast's point that the energy of
        an input should fall with the times it was fuzzed, without its bookkeeping).
        """
        fav = self.favoured()
        r = rng.random()
        rare = self.rarest() if r < 0.5 else []
        if rare:
            pool = rare
        elif fav and r < 0.9:
            pool = fav
        else:
            pool = range(len(self.entries))  # type: ignore[assignment]
        a = self.entries[pool[int(rng.integers(len(pool)))]]
        b = self.entries[pool[int(rng.integers(len(pool)))]]
        e = b if b.picks < a.picks else a
        e.picks += 1
        return e

    def choose_state(self, rng: np.random.Generator) -> tuple[CorpusEntry, int] | None:
        """A state feature and an entry that reached it, rarer states first; else None.

        Among the state features (:attr:`state`) some entry reached within its actions
        (:attr:`CorpusEntry.state_at`): the kind of entry is drawn with weight 1 /
        (episodes that reached a state of that kind, :attr:`kind_hits`), then a feature
        of that kind (the kind after one operation or another) with weight 1 /
        (episodes that reached it), then one of the entries that reached it uniformly.
        A state is one step from a trigger (a NUMA-hinting or migration entry in a table
        two mms map...): the interleaving pairs that make most entries rare in
        :meth:`rarest` are new in nearly every episode, so an entry that reached such a
        state is drawn there about as often as any other; and a rare kind is drawn
        before the rare operations after which a common kind (a present page) was seen.
        """
        if self._states is None:
            idx: dict[int, list[int]] = {}
            for i, e in enumerate(self.entries):
                for f in e.state_at:
                    idx.setdefault(f, []).append(i)
            self._states = idx
        idx = self._states
        if not idx:
            return None
        st = self.state
        kinds = sorted({st[f] for f in idx})
        w = np.array([1.0 / max(1, self.kind_hits.get(c, 1)) for c in kinds])
        c = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        fs = sorted(f for f in idx if st[f] == c)
        w = np.array([1.0 / max(1, self.hits.get(f, 1)) for f in fs])
        f = fs[int(rng.choice(len(fs), p=w / w.sum()))]
        ents = idx[f]
        e = self.entries[ents[int(rng.integers(len(ents)))]]
        e.picks += 1
        return e, f

    @staticmethod
    def choose_cut(entry: CorpusEntry, rng: np.random.Generator) -> list[int]:
        """The parent's actions up to one of its :attr:`CorpusEntry.cuts` (uniform)."""
        cuts = entry.cuts or (len(entry.actions),)
        return list(entry.actions[:cuts[int(rng.integers(len(cuts)))]])


# ----------------------------------------------------------------------------- mutations
class CatalogueIndex:
    """The catalogue grouped for mutations: runs, starts by (tid, op), events, uses.

    Args:
        catalogue: The harness's catalogue.
        ptrs_per_pte: Entries per table of its configuration (groups addresses by PMD).

    """

    def __init__(self, catalogue: tuple[ActionSpec, ...] | list[ActionSpec],
                 ptrs_per_pte: int = 512) -> None:
        self.catalogue = tuple(catalogue)
        self.ptrs_per_pte = int(ptrs_per_pte)
        #: Start index -> (PMD index, address) of every user start with an address.
        self.where: dict[int, tuple[int, int]] = {}
        #: PMD index -> user read/write starts at an address in it (:data:`USE_OPS`).
        self.uses: dict[int, list[int]] = {}
        #: The device's side of a pin: dev_read / dev_write starts.
        self.pin_uses: list[int] = []
        #: (tid, op, page) -> start, for the user accesses (:data:`USE_OPS`).
        self.access_at: dict[tuple[int, str, int], int] = {}
        #: (tid, PMD index) -> reads of that thread in that PMD.
        self.reads_in: dict[tuple[int, int], list[int]] = {}
        #: (tid, pin slot) -> the device's read of that pin.
        self.dev_read_of: dict[tuple[int, int], int] = {}
        #: Start index -> PMD indices of its address range (empty: no address).
        self.span: dict[int, range] = {}
        self.run: dict[int, int] = {}
        self.by_tid_op: dict[tuple[int, str], list[int]] = {}
        self.ops_of: dict[int, list[str]] = {}
        self.events: list[int] = []
        #: ``fail_nth`` events by thread (``/proc/thread-self/fail-nth``); under -1 the
        #: kernel-wide ``pressure_fail_nth`` ones.
        self.fail_of: dict[int, list[int]] = {}
        self.index_of: dict[ActionSpec, int] = {}
        for i, sp in enumerate(self.catalogue):
            self.index_of[sp] = i
            if sp.kind == "run":
                self.run[sp.tid] = i
            elif sp.kind == "start":
                self.span[i] = range_pmds(dict(sp.args), self.ptrs_per_pte)
                self.by_tid_op.setdefault((sp.tid, sp.op), []).append(i)
                ops = self.ops_of.setdefault(sp.tid, [])
                if sp.op not in ops:
                    ops.append(sp.op)
                addr = dict(sp.args).get("addr")
                if sp.tid != KSWAPD_TID and isinstance(addr, int) \
                        and not isinstance(addr, bool):
                    pmd = (addr >> 12) // self.ptrs_per_pte
                    self.where[i] = (pmd, addr)
                    if sp.op in USE_OPS:
                        self.uses.setdefault(pmd, []).append(i)
                        self.access_at[(sp.tid, sp.op, addr >> 12)] = i
                        if sp.op == "read":
                            self.reads_in.setdefault((sp.tid, pmd), []).append(i)
                elif sp.op in ("dev_read", "dev_write"):
                    self.pin_uses.append(i)
                    if sp.op == "dev_read":
                        self.dev_read_of[(sp.tid, sp.pin_slot)] = i
            elif sp.kind == "event":
                self.events.append(i)
                # tid -1: the kernel-wide pressure_fail_nth events.
                self.fail_of.setdefault(sp.tid, []).append(i)
        self.tids = sorted(self.run)
        self.user_tids = [t for t in self.tids if t != KSWAPD_TID and t in self.ops_of]

    def random_start(self, rng: np.random.Generator, tid: int | None = None) -> int:
        """An operation-level random start: thread, then operation, then template."""
        tids = [t for t in self.tids if t in self.ops_of]
        if tid is None or tid not in self.ops_of:
            tid = tids[int(rng.integers(len(tids)))]
        ops = self.ops_of[tid]
        op = ops[int(rng.integers(len(ops)))]
        c = self.by_tid_op[(tid, op)]
        return c[int(rng.integers(len(c)))]

    def start_of(self, rng: np.random.Generator, tid: int, op: str) -> int | None:
        """A random template of ``op`` on ``tid`` (None if the thread has none)."""
        c = self.by_tid_op.get((tid, op))
        return c[int(rng.integers(len(c)))] if c else None

    def fault_for(self, rng: np.random.Generator, a: int) -> int | None:
        """A ``fail_nth`` event aimed at start ``a``: its thread's (``n`` random), else None.

        syzkaller's fault injection: the fault is armed on the thread right before the
        call whose allocations it should fail.
        """
        sp = self.catalogue[a]
        c = self.fail_of.get(sp.tid) if sp.kind == "start" else None
        return c[int(rng.integers(len(c)))] if c else None

    def with_tid(self, a: int, tid: int) -> int | None:
        """The same start template on thread ``tid`` (None if it has none)."""
        sp = self.catalogue[a]
        if sp.kind != "start":
            return None
        other = ActionSpec(sp.kind, tid, sp.op, sp.args, sp.pin_slot, sp.proc_slot, sp.n)
        return self.index_of.get(other)


#: The operations ``insert_use`` inserts: a user access (a load or a store).
USE_OPS = ("read", "write")

MUTATIONS = ("insert_start", "delete", "splice", "change_thread", "change_args",
             "move_point", "insert_runs", "insert_event", "truncate", "preempt",
             "insert_missing", "insert_use", "hoist")
#: The greybox agent's default: all but ``insert_use`` and ``hoist``, which measured
#: worse (README "Greybox": 2 of 4 flaws slower or not found at seed 0, none found
#: sooner, and neither finds gup-fast-fork-race or free-pmd-deferred-flush).
DEFAULT_MUTATIONS = MUTATIONS[:11]


def mutate(actions: list[int], rng: np.random.Generator, ci: CatalogueIndex,
           other: list[int] | None = None, max_len: int = 256,
           kinds: tuple[str, ...] = MUTATIONS) -> tuple[list[int], list[str]]:
    """Apply 1–3 random mutations (:data:`MUTATIONS`) to a copy of ``actions``.

    ``preempt``, ``insert_missing``, ``insert_use`` and ``hoist`` are the ones that aim:
    a thread's operation inserted, with a few of its points, where another thread is
    mid-operation; an operation kind the schedule lacks; an access to what an earlier
    operation touched; a later operation moved into an earlier one of another thread.

    Args:
        actions: The parent schedule (catalogue indices).
        rng: Randomness.
        ci: The catalogue, grouped.
        other: A second corpus schedule for ``splice``.
        max_len: Longest result kept.
        kinds: The mutations to draw from (default all of :data:`MUTATIONS`).

    Returns:
        The child schedule and the names of the mutations applied.

    """
    a = list(actions)
    done: list[str] = []
    for _ in range(int(rng.integers(1, 4))):
        m = kinds[int(rng.integers(len(kinds)))]
        n = len(a)
        pos = int(rng.integers(n + 1))
        if m == "insert_start":
            a.insert(pos, ci.random_start(rng))
        elif m == "delete" and n:
            ln = int(rng.integers(1, 9))
            del a[min(pos, n - 1):min(pos, n - 1) + ln]
        elif m == "splice" and other:
            j = int(rng.integers(len(other) + 1))
            a = a[:pos] + list(other[j:])
        elif m in ("change_thread", "change_args") and n:
            starts = [i for i, x in enumerate(a) if ci.catalogue[x].kind == "start"
                      and ci.catalogue[x].tid != KSWAPD_TID]
            if not starts:
                continue
            i = starts[int(rng.integers(len(starts)))]
            sp = ci.catalogue[a[i]]
            if m == "change_thread":
                tids = [t for t in ci.user_tids if t != sp.tid]
                if not tids:
                    continue
                b = ci.with_tid(a[i], tids[int(rng.integers(len(tids)))])
                if b is None:
                    continue
                # The thread's later runs follow it (a run of the old tid after the start
                # becomes a run of the new one, up to the old tid's next start).
                old, new = sp.tid, ci.catalogue[b].tid
                a[i] = b
                for j in range(i + 1, len(a)):
                    sj = ci.catalogue[a[j]]
                    if sj.tid == old and sj.kind == "start":
                        break
                    if sj.kind == "run" and sj.tid == old:
                        a[j] = ci.run[new]
            else:
                c = ci.by_tid_op[(sp.tid, sp.op)]
                a[i] = c[int(rng.integers(len(c)))]
        elif m == "move_point" and n >= 2:
            runs = [i for i, x in enumerate(a) if ci.catalogue[x].kind == "run"]
            if not runs:
                continue
            i = runs[int(rng.integers(len(runs)))]
            x = a.pop(i)
            j = min(len(a), max(0, i + int(rng.integers(-8, 9))))
            a.insert(j, x)
        elif m == "insert_runs":
            tid = ci.tids[int(rng.integers(len(ci.tids)))]
            a[pos:pos] = [ci.run[tid]] * int(rng.integers(1, 6))
        elif m == "insert_event" and ci.events:
            # Half the time aimed at an operation: its thread's fail_nth right before
            # one of the schedule's starts (syzkaller's per-call fault injection); else
            # any pressure event anywhere.
            starts = [i for i, x in enumerate(a) if ci.fault_for(rng, x) is not None]
            if starts and rng.random() < 0.5:
                i = starts[int(rng.integers(len(starts)))]
                b = ci.fault_for(rng, a[i])
                assert b is not None
                a.insert(i, b)
            else:
                a.insert(pos, ci.events[int(rng.integers(len(ci.events)))])
        elif m == "truncate" and n:
            a = a[:pos]
        elif m == "preempt" and n:
            # A preemption inside another thread's operation: at a point where the
            # schedule runs thread u (u is mid-operation there), another thread starts
            # an operation and runs a few points before u goes on -- the race window
            # of a pair of operations, which separate insert_start / insert_runs
            # mutations seldom place together.
            runs = [i for i, x in enumerate(a) if ci.catalogue[x].kind == "run"]
            if not runs:
                continue
            i = runs[int(rng.integers(len(runs)))] + int(rng.integers(2))
            u = ci.catalogue[a[min(i, n - 1)]].tid
            tids = [t for t in ci.tids if t != u and t in ci.ops_of]
            if not tids:
                continue
            t = tids[int(rng.integers(len(tids)))]
            a[i:i] = [ci.random_start(rng, t)] + [ci.run[t]] * int(rng.integers(1, 9))
        elif m == "insert_missing":
            # An operation kind the schedule does not start yet (on a user thread),
            # run for a few points: the schedule's context grows by a kind of
            # operation it lacked (a madvise, a fork, a pin...), not by one more of
            # the kinds it already has.
            have = {ci.catalogue[x].op for x in a if ci.catalogue[x].kind == "start"}
            t = ci.user_tids[int(rng.integers(len(ci.user_tids)))] if ci.user_tids else None
            if t is None:
                continue
            ops = [op for op in ci.ops_of[t] if op not in have]
            if not ops:
                continue
            b = ci.start_of(rng, t, ops[int(rng.integers(len(ops)))])
            if b is None:
                continue
            a[pos:pos] = [b] + [ci.run[t]] * int(rng.integers(0, 9))
        elif m == "insert_use" and n:
            # A use of what an earlier operation touched (syzkaller's resources: a
            # call's result fed to a later call): after a start on an address, a load
            # or store by some thread in the same page table (half the time at the same
            # address), or after a pin the device's read or write of a pin. The states
            # the interleaving features reward (a pin in a shared table, a stale
            # paging-structure-cache entry) are harmless until something uses them.
            cand = [i for i, x in enumerate(a) if x in ci.where]
            if not cand:
                continue
            i = cand[int(rng.integers(len(cand)))]
            pmd, addr = ci.where[a[i]]
            if ci.catalogue[a[i]].op == "pin" and ci.pin_uses and rng.random() < 0.5:
                uses = ci.pin_uses
            else:
                uses = ci.uses.get(pmd, [])
                same = [u for u in uses if ci.where[u][1] == addr]
                if same and rng.random() < 0.5:
                    uses = same
            if not uses:
                continue
            b = uses[int(rng.integers(len(uses)))]
            j = int(rng.integers(i + 1, n + 1))
            a[j:j] = [b] + [ci.run[ci.catalogue[b].tid]] * int(rng.integers(1, 4))
        elif m == "hoist" and n:
            # An operation moved into an earlier operation of another thread: a start
            # and the first few points of its thread after it go to a point where the
            # schedule runs another thread (CHESS's preemption, at operation level):
            # two operations a seed runs one after the other (a pin, then a fork)
            # become a race of the two.
            starts = [i for i, x in enumerate(a) if ci.catalogue[x].kind == "start"]
            if not starts:
                continue
            i = starts[int(rng.integers(len(starts)))]
            t = ci.catalogue[a[i]].tid
            runs_t: list[int] = []
            for j in range(i + 1, n):
                sj = ci.catalogue[a[j]]
                if sj.tid == t and sj.kind == "start":
                    break
                if sj.kind == "run" and sj.tid == t:
                    runs_t.append(j)
            before = [j for j in range(i) if ci.catalogue[a[j]].kind == "run"
                      and ci.catalogue[a[j]].tid != t]
            if not before:
                continue
            carry = runs_t[:int(rng.integers(len(runs_t) + 1))]
            moved = [a[i]] + [a[j] for j in carry]
            gone = {i, *carry}
            at = before[int(rng.integers(len(before)))] + 1
            a = [x for j, x in enumerate(a[:at]) if j not in gone] + moved + [
                x for j, x in enumerate(a[at:], at) if j not in gone]
        else:
            continue
        done.append(m)
    return a[:max_len], done


# ----------------------------------------------------------------------------- race pairs
def paused_tables(k: Kernel, tid: int) -> set[int]:
    """The page tables (pfns) thread ``tid``'s paused operation works on now.

    The tables whose PTE lock (split PTL) it holds, else those its operation's address
    range maps in its mm (``addr`` .. ``addr + length``, one page without a length), else
    none (an operation without a range, or a thread not mid-operation). The footprint a
    Snowboard/Razzer-style pair is aimed at: the object the paused thread is inside.
    The kernel thread (kswapd/kcompactd) has no mm: the tables of any mm whose PTE lock
    it holds (an rmap walk in ``try_to_unmap_one`` / ``try_to_migrate_one`` /
    ``remove_migration_pte``), else the table its target page is mapped through (the
    ``pid`` and ``addr`` a targeted reclaim or compaction was given).
    """
    t = k.threads.get(tid)
    if t is None or t.exited or t.gen is None:
        return set()
    if t.pid in k.procs:
        mm = k.procs[t.pid].mm
        mms = [mm]
    elif tid == KSWAPD_TID:
        target = k.procs.get(t.args.get("pid"))
        mm = target.mm if target is not None else None
        mms = [p.mm for p in k.live_procs()]
    else:
        return set()
    held = [lk for lk, _m in t.held]
    out = {e.table.pfn for m in mms for e in m.pmd.values()
           if k.config.split_ptl and any(e.table.ptl is lk for lk in held)}
    if out or mm is None:
        return out
    return {mm.pmd[i].table.pfn for i in range_pmds(t.args, k.P, k.config.page_size)
            if i in mm.pmd}


def _template_target(k: Kernel, sp: ActionSpec) -> tuple[Any, range] | None:
    """The mm and the pages start template ``sp`` addresses now; None without a range.

    A user thread's template addresses its process's mm; a targeted reclaim or
    compaction the mm of its process slot's process (None when the slot is empty).
    """
    pages = range_pages(dict(sp.args), k.config.page_size)
    if not pages:
        return None
    pid = slot_pid(k, sp) if sp.proc_slot >= 0 else getattr(k.threads.get(sp.tid), "pid", -1)
    p = k.procs.get(pid)
    return (p.mm if p is not None else None), pages


def _meets(k: Kernel, sp: ActionSpec, tables: set[int], populated: bool) -> bool:
    """Whether template ``sp`` addresses a page mapped through one of ``tables``.

    ``populated``: at an entry that is not ``pte_none``. A template without a range
    meets every table.
    """
    tgt = _template_target(k, sp)
    if tgt is None:
        return True
    mm, pages = tgt
    if mm is None:
        return False
    P = k.P
    for vpn in pages:
        e = mm.pmd.get(vpn // P)
        if e is not None and e.table.pfn in tables and (
                not populated or int(e.table.entries[vpn % P])):
            return True
    return False


def meets_walk(k: Kernel, ci: CatalogueIndex, i: int, walk: tuple[int, int, int]) -> bool:
    """Whether start template ``i`` addresses a populated entry of a paused walk's range.

    ``walk`` is a paused thread's :attr:`cowenv.kernel.sched.Thread.walk` (table pfn,
    ``lo``, ``hi``): the entries it checked and will still process. Snowboard's potential
    memory communication at its finest grain: the entries the paused operation is
    about to change, not every populated entry of its table. A template without a
    range does not meet it (it may touch the table, but not aimed at those entries).
    """
    tgt = _template_target(k, ci.catalogue[i])
    if tgt is None or tgt[0] is None:
        return False
    mm, pages = tgt
    pfn, lo, hi = walk
    P = k.P
    for vpn in pages:
        e = mm.pmd.get(vpn // P)
        if e is not None and e.table.pfn == pfn and lo <= vpn % P < hi \
                and int(e.table.entries[vpn % P]):
            return True
    return False


def race_candidates(k: Kernel, ci: CatalogueIndex, u: int, tables: set[int],
                    mask: np.ndarray, kthreads: bool = False) -> list[int]:
    """Starts of other threads that touch one of ``tables`` while thread ``u`` is paused.

    Razzer's and Snowboard's race pairs, found dynamically: for every idle user thread
    ``t`` other than ``u`` whose process is ``u``'s or maps one of the tables (a COW-shared
    table), every legal start template of ``t`` whose address falls in a PMD of ``t``'s
    mm that points at one of the tables, and every legal start without an address (an
    operation without a range may touch the whole mm: fork, exit, ``clear_refs``; the
    over-approximation :func:`cowenv.explore._reads` makes too).

    ``kthreads`` (with ``u`` a user thread): also the kernel thread's idle reclaim and
    compaction starts aimed at a page mapped through one of the tables (the template's
    process slot and address), and the untargeted ones (LRU order: any table).
    """
    tu = k.threads.get(u)
    if tu is None or not tables:
        return []
    out: list[int] = []
    if kthreads and u != KSWAPD_TID:
        kt = k.threads.get(KSWAPD_TID)
        if kt is not None and kt.gen is None:
            out.extend(i for op in ci.ops_of.get(KSWAPD_TID, ())
                       for i in ci.by_tid_op[(KSWAPD_TID, op)]
                       if mask[i] and _meets(k, ci.catalogue[i], tables, populated=False))
    for t in ci.user_tids:
        th = _idle_user(k, t)
        if t == u or th is None:
            continue
        mm = k.procs[th.pid].mm
        idxs = {i for i, e in mm.pmd.items() if e.table.pfn in tables}
        if th.pid != tu.pid and not idxs:
            continue
        for op in ci.ops_of.get(t, ()):
            for i in ci.by_tid_op[(t, op)]:
                if not mask[i]:
                    continue
                r = ci.span[i]
                if not r or any(j in idxs for j in r):
                    out.append(i)
    return out


def kthread_window_candidates(k: Kernel, ci: CatalogueIndex, mask: np.ndarray,
                              multi_vma: bool = False,
                              gup_fast: bool = False) -> list[tuple[int, int, int]]:
    """Kernel-thread windows possible now: (user thread, its ``fork``, a kthread start).

    Snowboard's memory-communication pairs (Gong et al., SOSP 2021) for the rmap: the
    kernel thread's reclaim or compaction of a page walks that page's rmap
    (``rmap_walk_anon``: the anon_vma's VMAs, each VMA's PMD and table, v4 04/14's
    ``break_cow_pte`` in ``page_vma_mapped_walk``), and ``fork`` of the page's process
    writes what that walk reads (``copy_cow_pte_range`` shares the tables, 02/14;
    ``anon_vma_fork`` links the child's VMAs into the anon_vma). A candidate is an idle
    user thread ``u`` with a legal ``fork`` start whose mm fork would share tables from
    (``MMF_COW_PTE``, or ``MMF_COW_PTE_READY``, which the next fork turns into it), and
    a legal targeted reclaim or compaction start of the idle kernel thread aimed at a
    page ``u``'s mm maps at a present entry. ``multi_vma``: only pages whose PMD spans
    two or more VMAs of that mm, if there are any (v4 shares a PMD whole, at its first
    VMA, while the rmap and ``dup_mmap`` go VMA by VMA: the seam a walk and a fork can
    see differently).

    ``gup_fast``: the other operation may also be a GUP-fast ``pin`` (``fast``) of an
    idle sibling thread (same process) aimed at such a page: the other walker ``fork``
    does not exclude (``gup_fast`` takes no lock, ``mmap_lock`` held for write by
    ``dup_mmap`` blocks the process's calls that take it; mm/gup.c, 6.2,
    ``lockless_pages_from_mm`` backs off only on ``write_protect_seq``; the seeded
    flaw ``gup-fast-fork-race``, review R8, shares outside that section, v4 inside it).
    Its tuples name the pin's start; the caller tells the kinds apart by the start's
    thread.
    """
    kt = k.threads.get(KSWAPD_TID)  # (no process: not an _idle_user)
    kt_idle = not (kt is None or kt.gen is not None or kt.exited
                   or KSWAPD_TID not in ci.ops_of)
    if not kt_idle and not gup_fast:
        return []
    P = k.P
    out: list[tuple[int, int, int]] = []
    multi: list[tuple[int, int, int]] = []  # those whose page's PMD spans 2+ VMAs
    kstarts = [i for op in ci.ops_of[KSWAPD_TID] for i in ci.by_tid_op[(KSWAPD_TID, op)]
               if mask[i] and ci.catalogue[i].proc_slot >= 0] if kt_idle else []
    for u in ci.user_tids:
        t = _idle_user(k, u)
        if t is None:
            continue
        mm = k.procs[t.pid].mm
        if not mm.flags & (MMF_COW_PTE | MMF_COW_PTE_READY):
            continue
        forks = [i for i in ci.by_tid_op.get((u, "fork"), ()) if mask[i]]
        if not forks:
            continue
        others = kstarts
        if gup_fast:
            others = kstarts + [
                i for s in ci.user_tids if s != u
                and (ts := _idle_user(k, s)) is not None and ts.pid == t.pid
                for i in ci.by_tid_op.get((s, "pin"), ())
                if mask[i] and dict(ci.catalogue[i].args).get("fast")]
        for i in others:
            tgt = _template_target(k, ci.catalogue[i])
            if tgt is None or tgt[0] is not mm:
                continue
            if any((e := mm.pmd.get(v // P)) is not None
                   and int(e.table.entries[v % P]) & PTE_PRESENT for v in tgt[1]):
                out.extend((u, f, i) for f in forks)
                lo = tgt[1][0] // P * P  # the PMD's first page (VMAs are in pages)
                if multi_vma and sum(1 for v in mm.vmas
                                     if v.start < lo + P and v.end > lo) >= 2:
                    multi.extend((u, f, i) for f in forks)
    return multi or out


def _idle_user(k: Kernel, tid: int) -> Any:
    """User thread ``tid`` if it is alive, between operations and its process exists.

    None otherwise (the kernel thread has no process: never one).
    """
    t = k.threads.get(tid)
    if t is None or t.exited or t.gen is not None or t.pid not in k.procs:
        return None
    return t


def release_window_candidates(k: Kernel, ci: CatalogueIndex, mask: np.ndarray,
                               pages: dict[int, set[int]],
                               no_split: bool = False) -> list[tuple[int, int, int]]:
    """Table releases a release window may search now: (user thread, PMD, ``munmap``).

    The lifetime of a refcounted page table shared between mms is what COW PTE adds
    (v4 03/14: ``free_pmd_range`` drops this mm's reference, the last sharer frees the
    table): KRace's and Razzer's use-after-free triangle, free / use / free. A
    candidate is an idle user thread ``u`` with an idle sibling (same process: the
    other CPU whose cached walk may outlive the drop), a legal ``munmap`` start of
    ``u`` covering a whole PMD of its mm whose table another live mm maps too, the
    table holding a present entry at a page of ``pages`` (PMD index -> pages a load or
    pin template addresses).

    ``no_split``: only the ``munmap`` starts that split no VMA at a COW-protected PMD,
    where there are any. ``__split_vma`` breaks the table of the split address first
    (v4 03/14 ``mm/mmap.c``: ``err = break_cow_pte(vma, NULL, addr);``), and the break
    flushes this mm's TLBs, paging-structure caches included (x86's ``INVLPG`` drops
    every paging-structure-cache entry of the PCID): a sibling's walk cached before such
    a ``munmap`` is gone before the drop, and the triangle needs a second preemption
    of the ``munmap`` (the sibling's first load after the split, its second after the
    other mm's free).
    """
    P = k.P
    holders: dict[int, set[int]] = {}
    for p in k.live_procs():
        for e in p.mm.pmd.values():
            if e.table.refcount > 1:
                holders.setdefault(e.table.pfn, set()).add(p.pid)
    if not any(len(v) > 1 for v in holders.values()):
        return []
    span = P * k.config.page_size
    live = [u for u in ci.user_tids if _idle_user(k, u) is not None]
    out: list[tuple[int, int, int]] = []
    nosplit: list[tuple[int, int, int]] = []  # those that split no VMA at a COW PMD
    for u in live:
        pid = k.threads[u].pid
        if not any(v != u and k.threads[v].pid == pid for v in live):
            continue
        muns = [(a, dict(ci.catalogue[a].args)) for a in ci.by_tid_op.get((u, "munmap"), ())
                if mask[a]]
        if not muns:
            continue
        mm = k.procs[pid].mm
        whole = ({a for a, ar in muns
                  if not munmap_splits_cow_pmd(k, mm, ar["addr"], ar["length"])}
                 if no_split else set())
        for i, e in sorted(mm.pmd.items()):
            if len(holders.get(e.table.pfn, ())) < 2 or not any(
                    int(e.table.entries[v % P]) & PTE_PRESENT for v in pages.get(i, ())):
                continue
            lo, hi = i * span, (i + 1) * span
            for a, ar in muns:
                if ar["addr"] <= lo and ar["addr"] + ar["length"] >= hi:
                    out.append((u, i, a))
                    if a in whole:
                        nosplit.append((u, i, a))
    return nosplit or out


def munmap_splits_cow_pmd(k: Kernel, mm: Any, addr: int, length: int) -> bool:
    """Whether ``munmap(addr, length)`` splits a VMA at a COW-protected PMD of ``mm``.

    A boundary strictly inside a VMA is a ``__split_vma``; its PMD entry not writable
    (``!pmd_write``: a table COW PTE shares or shared) makes v4's ``break_cow_pte`` of
    it do work. A coarse test: with the table's other holders gone
    (``cow_pte_count == 1``) ``handle_cow_pte_fault``'s fast path only makes the PMD
    writable, without the flush, and counts as a split here all the same.
    """
    ps = k.config.page_size
    for b in (addr // ps, (addr + length) // ps):
        e = mm.pmd.get(b // k.P)
        if e is not None and not e.write and any(v.start < b < v.end for v in mm.vmas):
            return True
    return False


def fault_window_calls(k: Kernel, ci: CatalogueIndex,
                       mask: np.ndarray) -> list[tuple[int, int]]:
    """Calls a fault window may fail now: (user thread, start template).

    FIFUZZ's context-sensitive fault injection (Jiang et al., USENIX Security 2020)
    applied to one state: the error paths COW PTE adds are those of the calls that meet
    a COW-shared table, which may break it (``break_cow_pte``, v4 03/14, called from
    write and swap-in faults, ``mprotect``, ``madvise``, ``mremap`` and the rmap walks
    in 04/14-09/14), drop their reference to it (the zap of ``munmap`` and ``exit``,
    ``free_pmd_range``) or share it again (``fork``, 02/14), and allocate on the way
    (a failed break, a failed ``copy_cow_pte_range``). A candidate is
    a legal start of an idle user thread that has ``fail_nth`` events, whose mm maps a
    table another mm maps too (``refcount > 1``), and whose range meets a PMD of such a
    table, or that has no range (``fork``, ``exit``: the whole mm).
    """
    out: list[tuple[int, int]] = []
    for u in ci.user_tids:
        t = _idle_user(k, u)
        if t is None or not ci.fail_of.get(u):
            continue
        shared = {i for i, e in k.procs[t.pid].mm.pmd.items() if e.table.refcount > 1}
        if not shared:
            continue
        for op in ci.ops_of.get(u, ()):
            for a in ci.by_tid_op[(u, op)]:
                r = ci.span[a]
                if mask[a] and (not r or any(j in shared for j in r)):
                    out.append((u, a))
    return out


def fork_window_candidates(k: Kernel, ci: CatalogueIndex,
                           mask: np.ndarray) -> list[tuple[int, int]]:
    """Forks a fork-layout window may run now: (user thread, its ``fork`` start).

    v4 02/14 ``copy_cow_pte_range`` decides per PMD, at its first VMA, whether the
    whole table is shared: the corner layouts of :func:`fork_layouts_of` (a
    ``VM_DONTCOPY`` or ``VM_WIPEONFORK`` VMA in a PMD with another populated VMA) are
    where as-posted and the fixed design part (``recover_pte_range``'s fallback, the
    wipe-on-fork check), and a fork is one step from each. A candidate is an idle user
    thread with a legal ``fork`` start whose mm (``MMF_COW_PTE``, or ``_READY``) has
    such a layout (``-before`` or ``-after``) and a layout with a page holding data
    (``-data``: the shadow compares contents, a zero-filled page shows nothing) — per
    mm, not necessarily in the same PMD (a coarse test; the fork's own run decides).
    """
    out: list[tuple[int, int]] = []
    corner: dict[int, bool] = {}  # pid -> its mm qualifies (threads of a process share it)
    for u in ci.user_tids:
        t = _idle_user(k, u)
        if t is None:
            continue
        forks = [i for i in ci.by_tid_op.get((u, "fork"), ()) if mask[i]]
        if not forks:
            continue
        if t.pid not in corner:
            lay = fork_layouts_of(k, k.procs[t.pid].mm, data=True)
            corner[t.pid] = (any(x.endswith("-data") for x in lay)
                             and any(x.endswith(("-before", "-after")) for x in lay))
        if corner[t.pid]:
            out.extend((u, f) for f in forks)
    return out


def meets_entries(k: Kernel, ci: CatalogueIndex, i: int, tables: set[int]) -> bool:
    """Whether start template ``i`` addresses a populated entry of one of ``tables``.

    Snowboard's potential memory communication (Gong et al., SOSP 2021), at the grain of
    a PTE: a pair is worth running when both operations access the same location. A
    template with an address range meets the paused operation's tables where its
    thread's mm maps one of them at an address of the range whose entry is not
    ``pte_none`` (a present, swap, migration or PROT_NONE entry the paused operation can
    read or rewrite); a template without a range (fork, exit) meets every table. A
    targeted reclaim or compaction addresses the page of its process slot's process.
    """
    return _meets(k, ci.catalogue[i], tables, populated=True)


# ----------------------------------------------------------------------------- seeds
def seed_plan(steps: list[dict[str, Any]], ptrs_per_pte: int = 0) -> list[tuple[Any, ...]]:
    """A scenario's steps as an abstract plan for :class:`cowenv_agents.GreyboxAgent`.

    Plan items: ``("start", tid, op, args)``, ``("until", tid, label)``,
    ``("finish", tid)`` (run to the end of the operation, or until blocked),
    ``("steps", tid, n)``, ``("event", n, tid)`` (tid -1: the pressure event), and two
    that carry what the scenario's numbers mean: ``("geometry", P)`` first (entries per
    table of the scenario's configuration, when given: its addresses are read in that
    geometry, :func:`entry_class`) and ``("spawn", tid, new_tid, op)`` right before a
    ``fork``/``clone`` start (the thread id the scenario's kernel gives the new thread:
    the lowest free one, as :meth:`cowenv.kernel.sched.SchedMixin._free_tid`; the agent
    maps it onto the thread the workload's kernel gives, or onto a thread the workload
    already cloned). ``mmap`` steps are left out (the harness workload maps its own
    regions, but a range that is exactly one of the scenario's mappings gets the
    argument :data:`WHOLE_VMA`: a munmap of a whole VMA frees its tables, one of a part
    splits the VMA first); arguments keep their scenario values and are matched to the
    nearest catalogue template when played; bound names (``pin: PIN``) become the
    thread's oldest pin slot.
    """
    plan: list[tuple[Any, ...]] = []
    if ptrs_per_pte:
        plan.append(("geometry", int(ptrs_per_pte)))
    alive = {1}
    vmas: set[tuple[Any, Any]] = set()

    def spawn() -> int:
        n = 1
        while n in alive:
            n += 1
        alive.add(n)
        return n

    for s in steps:
        if "event" in s:
            et = s.get("tid")  # /proc/thread-self/fail-nth of a numbered thread
            et = et if isinstance(et, int) and not isinstance(et, bool) else -1
            plan.append(("event", int(s.get("n", 1)), et))
            continue
        tid = s.get("tid")
        if tid is None:
            continue
        op = s.get("do") or s.get("start")
        if op:
            args = dict(s.get("args") or {})
            if op == "mmap":
                if isinstance(args.get("addr"), int) and isinstance(args.get("length"), int):
                    vmas.add((args["addr"], args["length"]))
                continue
            if (args.get("addr"), args.get("length")) in vmas:
                args[WHOLE_VMA] = True
            if op in ("fork", "clone"):
                plan.append(("spawn", int(tid), spawn(), str(op)))
            elif op == "exit":
                alive.discard(int(tid))
            plan.append(("start", int(tid), str(op), args))
            if "do" in s:
                plan.append(("finish", int(tid)))
        elif "until" in s:
            plan.append(("until", int(tid), str(s["until"])))
        elif s.get("finish") or s.get("run"):
            plan.append(("finish", int(tid)))
        elif "step" in s:
            plan.append(("steps", int(tid), int(s["step"])))
    return plan


def entry_class(page: int, ptrs_per_pte: int) -> Any:
    """Where page ``page`` sits in its page table, comparable across geometries.

    The first and second entries and the last one are themselves (``0``, ``1``, ``"L"``:
    the catalogue's address templates are a portion's first, second and last page);
    any other entry is its fraction of the table (the second VMA of a PMD that starts
    half-way is ``0.5`` with 8 or with 512 entries per table).
    """
    e = page % ptrs_per_pte
    if e == ptrs_per_pte - 1 and e > 1:
        return "L"
    if e < 2:
        return e
    return round(e / ptrs_per_pte, 3)


def scenario_files(paths: list[str | Path], exclude: list[str] | None = None) -> list[Path]:
    """Scenario files under ``paths`` (files or folders, recursively), sorted.

    Files whose stem is in ``exclude`` (e.g. the flaw a benchmark measures) are left out.
    """
    ex = set(exclude or ())
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(p.rglob("*.yaml")))
        elif p.is_file():
            out.append(p)
    return [p for p in out if p.stem not in ex and not p.name.startswith(".")]


__all__ = ["FEEDBACKS", "MAX_CUTS", "DEFAULT_MUTATIONS", "MUTATIONS", "REC_CUTS", "REC_STATES",
           "USE_OPS",
           "WHOLE_VMA",
           "CatalogueIndex", "Corpus", "CorpusEntry",
           "FeatureTracker", "call_context", "catalogue_digest", "entry_class", "fid", "mutate",
           "paused_tables", "race_candidates", "range_pmds", "scenario_files", "seed_plan",
           "spec_variant"]
