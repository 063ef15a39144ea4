"""The action catalogue: operation templates over a workload's regions, and the workload.

A catalogue is a fixed, numbered list of :class:`ActionSpec` entries derived from the
kernel configuration and the workload's regions: run thread ``t`` one preemption
point, start a user template on an idle thread, start a kswapd template, or fire a
``fail_nth`` pressure event. It is plain data, built once per harness
(:class:`cowenv.harness.Harness`), and shared by the env, the campaigns, the agents
and the search tools. Also here: the default starting workload and the vocabulary of
preemption labels (for coverage).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kernel import KSWAPD_TID, Kernel
from .kernel.ops import OPS

_PIN_OPS = ("unpin", "dev_read", "dev_write")
_PIN_VARIANTS = ((False, False), (True, False), (False, True), (True, True))
_RECLAIM_NR = (1, 8)
FAIL_NTH = (1, 2, 3)
#: Hash buckets for preemption labels not found by the source scan.
LABEL_OVERFLOW_BUCKETS = 16
#: Calls whose last (string constant) argument is a lock site ``s`` that yields ``s:wait``.
_WAIT_SITE_CALLS = ("lock", "pte_offset_map_lock", "rmap_walk_anon", "_rmap_map_pte")


# ------------------------------------------------------------------------ labels
@functools.lru_cache(maxsize=1)
def _label_sources() -> tuple[tuple[str, frozenset[str]], ...]:
    found: dict[str, set[str]] = {}
    root = Path(__file__).resolve().parent / "kernel"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            label = None
            if isinstance(node, ast.Yield) and isinstance(node.value, ast.Constant):
                v = node.value.value
                if isinstance(v, str) and ":" in v:
                    label = v
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in _WAIT_SITE_CALLS and node.args):
                last = node.args[-1]
                if isinstance(last, ast.Constant) and isinstance(last.value, str):
                    label = f"{last.value}:wait"
            if label is not None:
                found.setdefault(label, set()).add(path.stem)
    for op in OPS:
        found.setdefault(f"{op}:done", set()).add("ops")
    return tuple((lb, frozenset(fs)) for lb, fs in sorted(found.items()))


def label_sources() -> dict[str, set[str]]:
    """Map each preemption label of the kernel source to the modules that yield it.

    Found by parsing ``cowenv/kernel/*.py``: string constants yielded by a generator
    (``yield "copy_pte_range:table_done"``), ``<site>:wait`` for each constant lock site
    passed to the lock helpers, and ``<op>:done`` for every operation (listed under
    ``ops``). Labels only COW PTE code reaches are those whose only module is ``cowpte``.
    """
    return {lb: set(fs) for lb, fs in _label_sources()}


def label_vocabulary() -> tuple[str, ...]:
    """Every preemption label the kernel source can yield, sorted (see :func:`label_sources`).

    Labels built at run time from a variable site are not found here; they fall into
    :data:`LABEL_OVERFLOW_BUCKETS` CRC-32 buckets.

    Returns:
        The sorted vocabulary (deterministic for a given kernel source).

    """
    return tuple(lb for lb, _ in _label_sources())


# ------------------------------------------------------------------------ workload
def table_bytes(ptrs_per_pte: int, page_size: int = 4096) -> int:
    """Bytes one PTE table maps (one PMD entry)."""
    return ptrs_per_pte * page_size


def default_workload(ptrs_per_pte: int, page_size: int = 4096) -> list[dict[str, Any]]:
    """Return the default starting workload: scenario steps run to completion at reset.

    The parent (tid 1) maps three private anonymous regions laid out so that the
    interesting page-table shapes exist from the start (``T`` = bytes per PTE table):

    * ``A`` = ``[16T, 18T)``: two whole tables, populated (MAP_POPULATE);
    * ``B`` = ``[20.5T, 21.5T)``: one table's worth straddling two PMDs, populated;
    * ``C`` = ``[21.5T, 22T)``: the rest of ``B``'s second PMD (two VMAs in one
      table), one page written.

    then enables COW PTE (``prctl(PR_SET_COW_PTE)``) and clones a second thread (tid 2)
    so that faults, walkers and fork can interleave within one mm. Nothing is forked:
    that (and everything after it) is the agent's choice.

    Args:
        ptrs_per_pte: Entries per PTE table.
        page_size: Bytes per page.

    Returns:
        A list of scenario steps (``{tid, do, args}``).

    """
    T = table_bytes(ptrs_per_pte, page_size)
    half = max(page_size, (ptrs_per_pte // 2) * page_size)
    a, b = 16 * T, 20 * T + half
    c = b + T
    return [
        {"tid": 1, "do": "mmap", "args": {"addr": a, "length": 2 * T, "populate": True}},
        {"tid": 1, "do": "mmap", "args": {"addr": b, "length": T, "populate": True}},
        {"tid": 1, "do": "mmap", "args": {"addr": c, "length": 22 * T - c}},
        {"tid": 1, "do": "write", "args": {"addr": c}},
        {"tid": 1, "do": "prctl_cow_pte"},
        {"tid": 1, "do": "clone"},
    ]


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            return None
    return None


def workload_regions(steps: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Return the ``(addr, length)`` of every ``mmap`` in a workload, in order, once."""
    out: list[tuple[int, int]] = []
    for s in steps:
        if (s.get("do") or s.get("start")) != "mmap":
            continue
        args = s.get("args") or {}
        addr, length = _as_int(args.get("addr")), _as_int(args.get("length"))
        if addr is None or length is None or (addr, length) in out:
            continue
        out.append((addr, length))
    return out


# ------------------------------------------------------------------------ actions
@dataclass(frozen=True)
class ActionSpec:
    """One entry of the action catalogue.

    Attributes:
        kind: ``run`` (step thread ``tid``), ``start`` (start ``op`` on idle ``tid``)
            or ``event`` (``fail_nth`` with ``n``).
        tid: Thread id (0 = kswapd); -1 for the kernel-wide pressure events; a user
            thread's id for its ``/proc/thread-self/fail-nth`` event.
        op: Operation name for ``start``.
        args: Fixed arguments, as sorted ``(name, value)`` pairs.
        pin_slot: For unpin/dev_read/dev_write: index of the pin among the thread's
            process's active pins (oldest first); the pin id is bound when the action
            is taken. -1 otherwise.
        proc_slot: For targeted reclaim: the live process (by pid order) whose page
            at ``addr`` is reclaimed first; its pid is bound when the action is taken.
        n: ``fail_nth`` argument.

    """

    kind: str
    tid: int = -1
    op: str = ""
    args: tuple[tuple[str, Any], ...] = ()
    pin_slot: int = -1
    proc_slot: int = -1
    n: int = 0

    def describe(self) -> str:
        """Short human-readable form, e.g. ``t1 start madvise(addr=0x..., ...)``."""
        if self.kind == "run":
            return f"t{self.tid} run"
        if self.kind == "event":
            if self.tid > 0:  # /proc/thread-self/fail-nth of thread tid
                return f"t{self.tid} fail_nth n={self.n}"
            return f"fail_nth n={self.n}"
        hexed = ("addr", "length", "old_length", "new_length", "new_addr")
        parts = [f"{k}={v:#x}" if k in hexed and isinstance(v, int) and v >= 0
                 else f"{k}={v}" for k, v in self.args]
        if self.pin_slot >= 0:
            parts.append(f"pin=<slot {self.pin_slot}>")
        if self.proc_slot >= 0:
            parts.append(f"pid=<slot {self.proc_slot}>")
        who = f"t{self.tid} " if self.tid >= 0 else ""
        return f"{who}start {self.op}({', '.join(parts)})"


#: Stands for an illegal action (nothing changed but the episode clock).
NOOP = ActionSpec("noop")


def _tmpl(op: str, pin_slot: int = -1, proc_slot: int = -1, **args: Any) -> ActionSpec:
    return ActionSpec("start", -1, op, tuple(sorted(args.items())), pin_slot, proc_slot)


def build_templates(regions: list[tuple[int, int]], ptrs_per_pte: int, page_size: int,
                    pin_slots: int) -> list[ActionSpec]:
    """User-thread operation templates drawn from the workload's regions.

    Per region the pages are grouped into *portions* (the part of the region inside
    one PMD). Addresses: the first, second and last page of every portion. Ranges:
    every region, every portion, the first half of every portion (a partial PMD) and
    its first page.

    Returns:
        Templates (``tid`` unset), in catalogue order.

    """
    P, ps = ptrs_per_pte, page_size
    portions: list[tuple[int, int]] = []
    for addr, length in regions:
        s, e = addr // ps, (addr + length) // ps
        for idx in range(s // P, (e - 1) // P + 1):
            p = (max(s, idx * P), min(e, (idx + 1) * P))
            if p not in portions:
                portions.append(p)
    pts: list[int] = []
    for lo, hi in portions:
        for v in (lo, lo + 1, hi - 1):
            if lo <= v < hi and v not in pts:
                pts.append(v)
    firsts = [lo for lo, _ in portions]
    big: list[tuple[int, int]] = []
    for addr, length in regions:
        r = (addr // ps, length // ps)
        if r not in big:
            big.append(r)
    for lo, hi in portions:
        if (lo, hi - lo) not in big:
            big.append((lo, hi - lo))
    halves = [(lo, (hi - lo) // 2) for lo, hi in portions if hi - lo >= 2]
    halves = [r for i, r in enumerate(halves) if r not in big and r not in halves[:i]]
    singles = [(lo, 1) for lo, hi in portions if (lo, 1) not in big and (lo, 1) not in halves]
    out: list[ActionSpec] = []
    for v in pts:
        out.append(_tmpl("read", addr=v * ps))
        out.append(_tmpl("write", addr=v * ps))
    for v in firsts:
        for w, f in _PIN_VARIANTS:
            out.append(_tmpl("pin", addr=v * ps, write=w, fast=f))
    for j in range(pin_slots):
        for op in _PIN_OPS:
            out.append(_tmpl(op, pin_slot=j))
    for r in big + halves:
        for prot in ("none", "r", "rw"):
            out.append(_tmpl("mprotect", addr=r[0] * ps, length=r[1] * ps, prot=prot))
    for r in big + halves + singles:
        for adv in ("DONTNEED", "FREE"):
            out.append(_tmpl("madvise", addr=r[0] * ps, length=r[1] * ps, advice=adv))
    for r in big:
        out.append(_tmpl("madvise", addr=r[0] * ps, length=r[1] * ps, advice="PAGEOUT"))
    for r in big + halves:
        for adv in ("WIPEONFORK", "DONTFORK"):
            out.append(_tmpl("madvise", addr=r[0] * ps, length=r[1] * ps, advice=adv))
    for r in big + halves:
        out.append(_tmpl("munmap", addr=r[0] * ps, length=r[1] * ps))
    for addr, length in regions:
        out.append(_tmpl("mmap", addr=addr, length=length, populate=True))
        out.append(_tmpl("mmap", addr=addr, length=length))
    for op in ("fork", "clone", "exit", "prctl_cow_pte"):
        out.append(_tmpl(op))
    return out


def build_kswapd_templates(regions: list[tuple[int, int]], ptrs_per_pte: int,
                           page_size: int, max_processes: int) -> list[ActionSpec]:
    """Build the kswapd templates.

    ``reclaim`` of 1 or 8 pages, and a 1-page reclaim that starts with the page mapped
    at the first page of each portion in each process slot.
    """
    P, ps = ptrs_per_pte, page_size
    out = [ActionSpec("start", KSWAPD_TID, "reclaim", (("nr", n),)) for n in _RECLAIM_NR]
    firsts: list[int] = []
    for addr, length in regions:
        s, e = addr // ps, (addr + length) // ps
        for idx in range(s // P, (e - 1) // P + 1):
            v = max(s, idx * P)
            if v not in firsts:
                firsts.append(v)
    for slot in range(max_processes):
        for v in firsts:
            out.append(ActionSpec("start", KSWAPD_TID, "reclaim",
                                  (("addr", v * ps), ("nr", 1)), proc_slot=slot))
    return out


def _portions(regions: list[tuple[int, int]], P: int, ps: int) -> list[tuple[int, int]]:
    """The part of each region inside one PMD, as page ranges ``[lo, hi)``, in order."""
    out: list[tuple[int, int]] = []
    for addr, length in regions:
        s, e = addr // ps, (addr + length) // ps
        for idx in range(s // P, (e - 1) // P + 1):
            p = (max(s, idx * P), min(e, (idx + 1) * P))
            if p not in out:
                out.append(p)
    return out


def build_move_templates(regions: list[tuple[int, int]], ptrs_per_pte: int,
                           page_size: int) -> list[ActionSpec]:
    """User templates of the mremap and migration walkers (part of the walker block).

    mremap (``MREMAP_MAYMOVE``): every region shrunk to half its size, and grown by one
    page (in place if nothing follows it, else moved); its first page moved with
    ``MREMAP_FIXED`` to the first unmapped page of every PMD the regions touch (a hole in
    a table that may be COW-shared); every whole, aligned one-table portion moved with
    ``MREMAP_FIXED`` to an empty aligned PMD two tables past the last region
    (``move_normal_pmd``). ``move_pages``: every region (``MPOL_MF_MOVE``) and the first
    page of every portion (``MPOL_MF_MOVE_ALL``, so that pages shared after fork move).

    Returns:
        Templates (``tid`` unset), in catalogue order.

    """
    P, ps = ptrs_per_pte, page_size
    portions = _portions(regions, P, ps)
    idxs: list[int] = []
    for lo, _ in portions:
        if lo // P not in idxs:
            idxs.append(lo // P)
    covered = {v for a, n in regions for v in range(a // ps, (a + n) // ps)}
    holes = []
    for idx in idxs:
        h = next((v for v in range(idx * P, (idx + 1) * P) if v not in covered), None)
        if h is not None:
            holes.append(h)
    far = (max(idxs) + 2) * P if idxs else 0
    out: list[ActionSpec] = []
    for addr, length in regions:
        if length >= 2 * ps:
            out.append(_tmpl("mremap", addr=addr, old_length=length,
                             new_length=(length // ps // 2) * ps))
        out.append(_tmpl("mremap", addr=addr, old_length=length, new_length=length + ps))
        for h in holes:
            out.append(_tmpl("mremap", addr=addr, old_length=ps, new_length=ps,
                             new_addr=h * ps))
    for lo, hi in portions:
        if hi - lo == P and lo % P == 0:
            out.append(_tmpl("mremap", addr=lo * ps, old_length=P * ps, new_length=P * ps,
                             new_addr=far * ps))
    for addr, length in regions:
        out.append(_tmpl("move_pages", addr=addr, length=length))
    for lo, _ in portions:
        out.append(_tmpl("move_pages", addr=lo * ps, length=ps, all=True))
    return out


def build_compact_templates(regions: list[tuple[int, int]], ptrs_per_pte: int,
                            page_size: int, max_processes: int) -> list[ActionSpec]:
    """Kcompactd templates (kthread slot): ``compact`` of 1 or 8 pages.

    Also a 1-page compaction starting with the page mapped at the first page of each
    portion in each process slot (as :func:`build_kswapd_templates` does for reclaim).
    """
    P, ps = ptrs_per_pte, page_size
    out = [ActionSpec("start", KSWAPD_TID, "compact", (("nr", n),)) for n in _RECLAIM_NR]
    firsts = [lo for lo, _ in _portions(regions, P, ps)]
    for slot in range(max_processes):
        for v in firsts:
            out.append(ActionSpec("start", KSWAPD_TID, "compact",
                                  (("addr", v * ps), ("nr", 1)), proc_slot=slot))
    return out


# ------------------------------------------------------------------------ objectives


# ------------------------------------------------------------------ walkers (issue 13)
#: ``clear_refs`` types in the catalogue: 4 (soft-dirty, the walker COW PTE breaks for)
#: and 1 (accessed bits only).
CLEAR_REFS_TYPES = (4, 1)


def build_scan_templates(regions: list[tuple[int, int]], ptrs_per_pte: int,
                           page_size: int) -> list[ActionSpec]:
    """User templates of the scanning walkers of issue 13 (part of the walker block).

    ``numa_hint`` (``task_numa_work``) over every region and every portion (the part of
    a region inside one PMD), ``clear_refs`` of the thread's own process with each of
    :data:`CLEAR_REFS_TYPES`, and ``swapoff``.

    Returns:
        Templates (``tid`` unset), in catalogue order.

    """
    P, ps = ptrs_per_pte, page_size
    ranges: list[tuple[int, int]] = []
    for addr, length in regions:
        r = (addr // ps, length // ps)
        if r not in ranges:
            ranges.append(r)
    for addr, length in regions:
        s, e = addr // ps, (addr + length) // ps
        for idx in range(s // P, (e - 1) // P + 1):
            lo, hi = max(s, idx * P), min(e, (idx + 1) * P)
            if (lo, hi - lo) not in ranges:
                ranges.append((lo, hi - lo))
    out = [_tmpl("numa_hint", addr=lo * ps, length=n * ps) for lo, n in ranges]
    out.extend(_tmpl("clear_refs", type=ty) for ty in CLEAR_REFS_TYPES)
    out.append(_tmpl("swapoff"))
    return out


def build_walker_templates(regions: list[tuple[int, int]], ptrs_per_pte: int,
                           page_size: int) -> list[ActionSpec]:
    """The per-user-thread walker block of issue 13, appended after the pressure events.

    It is its own per-thread block after the ``fail_nth`` pressure events, so every older
    index keeps its meaning: :func:`build_scan_templates` (``numa_hint``, ``clear_refs``,
    ``swapoff``) then :func:`build_move_templates` (``mremap``, ``move_pages``).

    Returns:
        Templates (``tid`` unset), in catalogue order.

    """
    return (build_scan_templates(regions, ptrs_per_pte, page_size)
            + build_move_templates(regions, ptrs_per_pte, page_size))


def slot_pid(k: Kernel, spec: ActionSpec) -> int:
    """The pid a template's process slot names in ``k`` now (-1: no such process).

    A targeted reclaim or compaction names the live process of that rank (by pid).
    """
    procs = k.live_procs()
    return procs[spec.proc_slot].pid if 0 <= spec.proc_slot < len(procs) else -1


def range_pages(args: dict[str, Any], page_size: int = 4096) -> range:
    """Page numbers of an operation's address range (``addr``, ``length``; empty if none).

    One page without a length.
    """
    a = args.get("addr")
    if not isinstance(a, int) or isinstance(a, bool):
        return range(0)
    n = args.get("length")
    n = int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else page_size
    return range(a // page_size, (a + n - 1) // page_size + 1)


def range_pmds(args: dict[str, Any], ptrs_per_pte: int, page_size: int = 4096) -> range:
    """PMD indices of an operation's address range (``addr``, ``length``; empty if none)."""
    r = range_pages(args, page_size)
    return range(r.start // ptrs_per_pte, (r.stop - 1) // ptrs_per_pte + 1) if r else range(0)
