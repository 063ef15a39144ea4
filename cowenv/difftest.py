"""Differential testing of the classic model against the Linux kernel this machine runs.

``cowenv difftest [--n N] [--seed S] [--json]`` draws random *sequential* schedules
(each operation completes before the next starts; several processes and threads; fork,
clone, exit, mmap/munmap/mprotect, madvise DONTNEED/FREE/WIPEONFORK/KEEPONFORK/
DONTFORK/DOFORK, loads, stores, R/W long-term pins through io_uring fixed buffers with
device reads and writes) and runs each one twice:

* on the classic model (:func:`model_run`), and
* on the running kernel through the executor: :file:`cowenv/csrc/cowrt.c` built once
  into the cache and kept running, reading schedules on stdin (syz-executor style).

After every operation both sides report the same observations (:class:`Obs`): the
operation's return value or ``-errno`` (fork/clone/pin results, which are ids, compare
as "ok"), and for every live process and every address slot of :class:`~cowenv.export.
Layout` the ``/proc/PID/smaps`` counters Rss, Anonymous, Swap, LazyFree summed over the
slot's VMAs, and per page the ``/proc/PID/pagemap`` bits present, swapped and
exclusively mapped.

A schedule whose observations differ is a *mismatch*. Every difference is matched
against :data:`KNOWN_DIVERGENCES` (the one list of documented differences, each with its
reason and matcher); a mismatch with any unmatched difference is *unknown*: it is
minimised with :func:`cowenv.minimize.ddmin` (the same difference must persist) and
written as a scenario plus its C reproducer.

What is not drawn, and why: MADV_PAGEOUT without active swap (drawn when
``/proc/swaps`` lists a device), kswapd reclaim (cannot be aimed at a page), R/O pins
(this kernel has no ``gup_test``; vmsplice holds a plain reference, not a FOLL_LONGTERM
pin, so it would not test the same thing), fault injection (needs
CONFIG_FAULT_INJECTION) and ``prctl_cow_pte`` (a v4 interface: its option number is
PR_SET_MDWE upstream).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .export import CSRC, Layout, build_cached, compiler, export_c, lower
from .kernel import KSWAPD_TID, make_kernel
from .kernel.config import KernelConfig, config_from_dict
from .kernel.memory import PG_anon, PG_dirty, PG_swapbacked
from .kernel.ops import ERRNO_NAMES
from .kernel.pgtable import PFN_SHIFT, PTE_DIRTY, PTE_PRESENT, PTE_SWAP, ZERO_PFN
from .minimize import ddmin
from .scenario import Expectation, Scenario, StepError, apply_step, dump_scenario

#: The model configuration schedules run on (upstream semantics).
CONFIG: KernelConfig = config_from_dict({"preset": "classic", "nr_frames": 1024,
                                         "max_threads": 8, "max_processes": 8})

#: Address slots the schedules use and both sides observe (gaps keep VMAs apart).
LAYOUT = Layout(nslots=3, origin=0x100000, stride=0x10000, pages=8)

SMAPS_FIELDS = ("Rss", "Anonymous", "Swap", "LazyFree")
PAGEMAP_BITS = ("present", "swapped", "exclusive")
ID_OPS = ("fork", "clone", "pin")


# ------------------------------------------------------------------------ observations
@dataclass(frozen=True)
class Obs:
    """One observation: ``kind`` is ``ret``, ``smaps`` or ``pagemap``.

    ``proc`` is the process's creation index (0 = the first process) and ``slot`` the
    address slot; both are -1 for ``ret``.
    """

    step: int
    kind: str
    proc: int = -1
    slot: int = -1

    def describe(self) -> str:
        """Readable key."""
        if self.kind == "ret":
            return f"step {self.step}: return value"
        return f"step {self.step}: {self.kind} of process #{self.proc} slot {self.slot}"


def _norm_ret(op: str, v: Any) -> Any:
    if op in ID_OPS and isinstance(v, int) and v > 0:
        return "ok"
    return v


def _model_snapshot(k: Any, idx: int, out: dict[Obs, Any]) -> None:
    pool = k.pool
    P = k.P
    for pi, p in enumerate(k.procs.values()):
        if not p.alive:
            continue
        mm = p.mm
        for sl in range(LAYOUT.nslots):
            vpn0 = (LAYOUT.origin + sl * LAYOUT.stride) // 4096
            rss = anon = swap = lazy = 0
            digits = []
            for j in range(LAYOUT.pages):
                vpn = vpn0 + j
                pmd = mm.pmd.get(vpn // P)
                pte = int(pmd.table.entries[vpn % P]) if pmd is not None else 0
                d = 0
                if pte & PTE_PRESENT:
                    d |= 1
                    pfn = pte >> PFN_SHIFT
                    if pfn != ZERO_PFN:
                        rss += 4
                        fl = int(pool.flags[pfn])
                        if fl & PG_anon:
                            anon += 4
                            if not fl & PG_swapbacked and not (pte & PTE_DIRTY or fl & PG_dirty):
                                lazy += 4
                        if int(pool.mapcount[pfn]) == 1:
                            d |= 4
                elif pte & PTE_SWAP:
                    d |= 2
                    swap += 4
                digits.append(str(d))
            out[Obs(idx, "smaps", pi, sl)] = (rss, anon, swap, lazy)
            out[Obs(idx, "pagemap", pi, sl)] = "".join(digits)


@dataclass
class ModelRun:
    """The model's observations and the steps that took effect (lenient run)."""

    obs: dict[Obs, Any]
    steps: list[dict[str, Any]]
    index: list[int]  # original index of each effective step


def model_run(steps: Sequence[dict[str, Any]], *, lenient: bool = False) -> ModelRun:
    """Run sequential ``do`` steps on the classic model, observing after each.

    With ``lenient``, a step that cannot run (its thread is gone, a name it uses is not
    bound) is skipped; the kept steps are returned renumbered.
    """
    k = make_kernel(CONFIG, trace=False, oracles=False)
    names: dict[str, Any] = {}
    pending: dict[int, dict] = {}
    obs: dict[Obs, Any] = {}
    kept: list[dict[str, Any]] = []
    index: list[int] = []
    for i, s in enumerate(steps):
        idx = len(kept)
        if lenient:
            t = k.threads.get(s["tid"])
            uses = [v for a, v in (s.get("args") or {}).items() if a == "pin"
                    and isinstance(v, str)]
            if t is None or t.exited or any(n not in names for n in uses):
                continue
        try:
            apply_step(k, copy.deepcopy(s), names, pending, idx)
        except StepError:
            if lenient:
                continue
            raise
        kept.append(s)
        index.append(i)
        obs[Obs(idx, "ret")] = _norm_ret(s["do"], k.threads[s["tid"]].result)
        _model_snapshot(k, idx, obs)
    return ModelRun(obs, kept, index)


class Executor:
    """The C executor, compiled once into the cache and kept running."""

    def __init__(self) -> None:
        self.exe = build_cached(CSRC.read_text(), "cowrt-executor")
        self.proc: subprocess.Popen[str] | None = None
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen([str(self.exe)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, text: str) -> list[str]:
        """Send one program (ending in ``end``); return its output lines."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        if self.proc.poll() is not None:
            self._start()
            assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(text)
        self.proc.stdin.flush()
        lines = []
        for ln in self.proc.stdout:
            ln = ln.rstrip("\n")
            if ln == "done":
                return lines
            lines.append(ln)
        self.proc = None
        return lines + ["error executor died"]

    def close(self) -> None:
        """Stop the executor."""
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


def kernel_run(ex: Executor, steps: Sequence[dict[str, Any]]) -> tuple[dict[Obs, Any], str]:
    """Run sequential steps on the real kernel; returns (observations, error or "")."""
    low = lower(CONFIG, list(steps), observe=True, layout=LAYOUT, repeat=1)
    ops = {i: s["do"] for i, s in enumerate(steps)}
    obs: dict[Obs, Any] = {}
    err = ""
    for ln in ex.run(low.text):
        f = ln.split()
        if f[0] == "r":
            i = int(f[1])
            obs[Obs(i, "ret")] = _norm_ret(ops[i], int(f[2]))
        elif f[0] == "s":
            obs[Obs(int(f[1]), "smaps", int(f[2]), int(f[3]))] = tuple(int(x) for x in f[4:8])
        elif f[0] == "g":
            obs[Obs(int(f[1]), "pagemap", int(f[2]), int(f[3]))] = f[4]
        elif f[0] == "error":
            err = ln
    return obs, err


# ------------------------------------------------------------------------ comparison
@dataclass
class Diff:
    """One differing observation."""

    obs: Obs
    model: Any
    kernel: Any
    step: dict[str, Any] | None

    def fields(self) -> list[str]:
        """Which smaps counters / pagemap bits differ (``ret`` for a return value)."""
        if self.obs.kind == "ret":
            return ["ret"]
        if self.obs.kind == "smaps":
            if self.model is None or self.kernel is None:
                return ["missing"]
            return [f for f, a, b in zip(SMAPS_FIELDS, self.model, self.kernel, strict=True)
                    if a != b]
        if self.model is None or self.kernel is None:
            return ["missing"]
        out = set()
        for a, b in zip(self.model, self.kernel, strict=False):
            x = int(a) ^ int(b)
            for bit, name in enumerate(PAGEMAP_BITS):
                if x >> bit & 1:
                    out.add(name)
        return sorted(out)

    def signature(self) -> str:
        """``kind:field,...[:op]`` — what must persist while minimising."""
        op = (self.step or {}).get("do", "?")
        sig = f"{self.obs.kind}:{','.join(self.fields())}"
        return f"{sig}:{op}" if self.obs.kind == "ret" else sig

    def describe(self) -> str:
        """One line: where, what the model said, what the kernel said."""
        s = self.step or {}
        op = f"{s.get('do')} {s.get('args', {})} on thread {s.get('tid')}" if s else "?"
        what = ""
        if self.obs.kind == "smaps" and self.model and self.kernel:
            what = " (" + ", ".join(f"{f} kB" for f in SMAPS_FIELDS) + ")"
        if self.obs.kind == "pagemap":
            what = " (per page: 1 present | 2 swapped | 4 exclusively mapped)"
        return (f"{self.obs.describe()} after {op}{what}: model {_fmt(self.model)}, "
                f"kernel {_fmt(self.kernel)}")


def _fmt(v: Any) -> str:
    if isinstance(v, int) and v < 0 and -v in ERRNO_NAMES:
        return f"{v} (-{ERRNO_NAMES[-v]})"
    return repr(v)


def compare(model: dict[Obs, Any], kernel: dict[Obs, Any],
            steps: Sequence[dict[str, Any]]) -> list[Diff]:
    """Every differing observation, in schedule order (model's keys first)."""
    keys = list(model) + [k for k in kernel if k not in model]
    order = {"ret": 0, "smaps": 1, "pagemap": 2}
    keys.sort(key=lambda o: (o.step, order[o.kind], o.proc, o.slot))
    out = []
    for key in keys:
        a, b = model.get(key), kernel.get(key)
        if a != b:
            st = steps[key.step] if 0 <= key.step < len(steps) else None
            out.append(Diff(key, a, b, st))
    return out


# ------------------------------------------------------------------------ known divergences
@dataclass(frozen=True)
class KnownDivergence:
    """A documented difference between the model (6.2 semantics) and this kernel."""

    id: str
    reason: str
    matches: Callable[[Diff, Sequence[dict[str, Any]]], bool]


def _lazyfree_batched(d: Diff, _steps: Sequence[dict[str, Any]]) -> bool:
    return (d.obs.kind == "smaps" and d.fields() == ["LazyFree"] and d.model is not None
            and d.kernel is not None and d.kernel[3] < d.model[3])


def _dma_write_not_dirty(d: Diff, steps: Sequence[dict[str, Any]]) -> bool:
    return (d.obs.kind == "smaps" and d.fields() == ["LazyFree"] and d.model is not None
            and d.kernel is not None and d.kernel[3] > d.model[3]
            and any(s.get("do") == "dev_write" for s in steps[:d.obs.step + 1]))


def _no_vma_merge(d: Diff, _steps: Sequence[dict[str, Any]]) -> bool:
    if d.obs.kind != "pagemap" or d.obs.proc < 1 or d.model is None or d.kernel is None:
        return False
    pairs = [(a, b) for a, b in zip(d.model, d.kernel, strict=True) if a != b]
    return bool(pairs) and all(a == "0" and b == "1" for a, b in pairs)


#: The one list of known divergences: id, reason, matcher. A schedule all of whose
#: differences match one of these is a *known* mismatch.
KNOWN_DIVERGENCES: tuple[KnownDivergence, ...] = (
    KnownDivergence(
        "lazyfree-lru-batch",
        "MADV_FREE: folio_mark_lazyfree() queues the folio on a per-CPU LRU batch "
        "(cpu_fbatches.lru_lazyfree); PG_swapbacked is cleared, and smaps counts the page "
        "as LazyFree, only when that batch is drained. The model clears it at once, as "
        "if drained. Only LazyFree differs, and the kernel shows less.",
        _lazyfree_batched),
    KnownDivergence(
        "no-vma-merge",
        "The model never merges adjacent VMAs (vma_merge). Linux does, so a VMA that only "
        "read faults touched (zero-page PTEs, no anon_vma) can merge with a neighbour that "
        "has an anon_vma; fork's vma_needs_copy then copies its zero-page PTEs to the child, "
        "where the model's child faults them in later. Only a forked process's pagemap "
        "differs, by present non-exclusive (zero page) entries the kernel has and the model "
        "has not; reads return zero either way.",
        _no_vma_merge),
    KnownDivergence(
        "dma-write-not-dirty",
        "A device write through an io_uring fixed buffer (IORING_OP_READ_FIXED) copies into "
        "the pinned page without marking it dirty, so a page MADV_FREE made lazyfree stays "
        "lazyfree in smaps. The model's dev_write marks the page dirty, as a driver's "
        "set_page_dirty_lock() after DMA does. Only LazyFree differs, the kernel shows "
        "more, and a dev_write came before.",
        _dma_write_not_dirty),
)


def classify(diffs: list[Diff], steps: Sequence[dict[str, Any]] = ()
             ) -> tuple[list[Diff], Counter[str]]:
    """Split differences into unknown ones and a count of known ones by reason."""
    unknown = []
    known: Counter[str] = Counter()
    for d in diffs:
        for kd in KNOWN_DIVERGENCES:
            if kd.matches(d, steps):
                known[kd.id] += 1
                break
        else:
            unknown.append(d)
    return unknown, known


# ------------------------------------------------------------------------ generator
_PROTS = ("rw", "rw", "rw", "rw", "r", "none")
_ADVICES = ("DONTNEED", "FREE", "FREE", "WIPEONFORK", "KEEPONFORK", "DONTFORK", "DOFORK")


def random_schedule(rng: np.random.Generator, n_ops: int, *, pins: bool = True,
                    pageout: bool = False) -> list[dict[str, Any]]:
    """A random sequential schedule that is legal on the model (see module docstring).

    ``pageout`` adds MADV_PAGEOUT to the advices (only meaningful with active swap).
    """
    advices = _ADVICES + (("PAGEOUT",) if pageout else ())
    k = make_kernel(CONFIG, trace=False, oracles=False)
    names: dict[str, Any] = {}
    pending: dict[int, dict] = {}
    steps: list[dict[str, Any]] = []
    pin_names: list[str] = []

    def rng_range() -> tuple[int, int]:
        sl = int(rng.integers(LAYOUT.nslots))
        a = int(rng.integers(LAYOUT.pages))
        n = int(rng.integers(1, LAYOUT.pages - a + 1))
        return LAYOUT.origin + sl * LAYOUT.stride + a * 4096, n * 4096

    def rng_page() -> int:
        sl = int(rng.integers(LAYOUT.nslots))
        return LAYOUT.origin + sl * LAYOUT.stride + int(rng.integers(LAYOUT.pages)) * 4096

    # the first op maps something, so most schedules touch memory
    first = True
    for _attempt in range(50 * n_ops):
        if len(steps) >= n_ops:
            break
        live = [t for t in k.live_threads() if t.tid != KSWAPD_TID]
        if not live:
            break
        tid = live[int(rng.integers(len(live)))].tid
        nproc = len(k.live_procs())
        choices = {"mmap": 14, "munmap": 4, "mprotect": 8, "madvise": 12, "read": 18,
                   "write": 22}
        if nproc < 4 and k._free_tid() is not None:
            choices["fork"] = 7
        if len(live) < 6 and k._free_tid() is not None:
            choices["clone"] = 2
        if len(live) > 1:
            choices["exit"] = 4
        good = [p for p in pin_names if isinstance(names.get(p), int) and names[p] > 0]
        if pins:
            choices["pin"] = 5
            if good:
                choices.update({"dev_read": 5, "dev_write": 4, "unpin": 2})
        if first:
            choices = {"mmap": 1}
            first = False
        ops = list(choices)
        w = np.array([choices[o] for o in ops], dtype=float)
        op = ops[int(rng.choice(len(ops), p=w / w.sum()))]
        s: dict[str, Any] = {"tid": tid, "do": op}
        if op == "mmap":
            a, ln = rng_range()
            s["args"] = {"addr": a, "length": ln,
                         "prot": _PROTS[int(rng.integers(len(_PROTS)))]}
            if rng.random() < 0.15:
                s["args"]["shared"] = True
            if rng.random() < 0.2:
                s["args"]["populate"] = True
        elif op == "munmap":
            a, ln = rng_range()
            s["args"] = {"addr": a, "length": ln}
        elif op == "mprotect":
            a, ln = rng_range()
            s["args"] = {"addr": a, "length": ln,
                         "prot": _PROTS[int(rng.integers(len(_PROTS)))]}
        elif op == "madvise":
            a, ln = rng_range()
            s["args"] = {"addr": a, "length": ln,
                         "advice": advices[int(rng.integers(len(advices)))]}
        elif op in ("read", "write"):
            s["args"] = {"addr": rng_page()}
        elif op == "pin":
            mm = k.procs[k.threads[tid].pid].mm
            mapped = [v for v in mm.vmas if v.flags & 2]
            addr = rng_page()
            if mapped and rng.random() < 0.8:  # mostly a writable page: pins that work
                v = mapped[int(rng.integers(len(mapped)))]
                addr = int(rng.integers(v.start, v.end)) * 4096
            s["args"] = {"addr": addr, "write": True}
            s["as"] = f"P{len(pin_names)}"
        elif op in ("dev_read", "dev_write", "unpin"):
            s["args"] = {"pin": good[int(rng.integers(len(good)))]}
        try:
            apply_step(k, copy.deepcopy(s), names, pending, len(steps))
        except StepError:
            continue
        if op == "pin":
            pin_names.append(s["as"])
        steps.append(s)
    return steps


# ------------------------------------------------------------------------ one schedule
@dataclass
class Outcome:
    """Result of one schedule on both sides."""

    steps: list[dict[str, Any]]
    observations: int
    diffs: list[Diff]
    unknown: list[Diff]
    known: Counter[str]
    error: str = ""


def check_schedule(ex: Executor, steps: Sequence[dict[str, Any]], *,
                   lenient: bool = False) -> Outcome:
    """Run ``steps`` on the model and the kernel and compare."""
    m = model_run(steps, lenient=lenient)
    kobs, err = kernel_run(ex, m.steps)
    diffs = compare(m.obs, kobs, m.steps)
    unknown, known = classify(diffs, m.steps)
    return Outcome(m.steps, len(m.obs), diffs, unknown, known, err)


def minimise(ex: Executor, steps: list[dict[str, Any]], signature: str
             ) -> list[dict[str, Any]]:
    """Run ddmin over the steps, keeping an unknown difference with ``signature``."""
    cache: dict[tuple[int, ...], bool] = {}

    def test(idx: Sequence[int]) -> bool:
        key = tuple(idx)
        if key not in cache:
            o = check_schedule(ex, [steps[i] for i in idx], lenient=True)
            cache[key] = any(d.signature() == signature for d in o.unknown)
        return cache[key]

    keep = ddmin(len(steps), test)
    return model_run([steps[i] for i in keep], lenient=True).steps


def finding_scenario(name: str, steps: list[dict[str, Any]], first: Diff) -> Scenario:
    """A scenario of a minimised mismatch: the kernel's value as the step's ``expect``."""
    st = [dict(s) for s in steps]
    if first.obs.kind == "ret" and isinstance(first.kernel, int) and 0 <= first.obs.step < len(st):
        s = st[first.obs.step]
        s["expect"] = first.kernel
        s["check"] = f"as Linux {platform.release()} returns"
    desc = (f"difftest finding on Linux {platform.release()}: first difference "
            f"{first.describe()}")
    return Scenario(name, desc, CONFIG, st, Expectation([]), {})


# ------------------------------------------------------------------------ campaign
@dataclass
class Report:
    """Figures of a difftest run."""

    kernel: str
    schedules: int = 0
    steps: int = 0
    observations: int = 0
    mismatching: int = 0
    unknown: int = 0
    known_by_reason: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    seconds: float = 0.0
    findings: list[dict[str, Any]] = field(default_factory=list)
    not_drawn: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = dict(self.__dict__)
        d["schedules_per_second"] = round(self.schedules / self.seconds, 1) if self.seconds \
            else 0.0
        d["known_divergences"] = {kd.id: kd.reason for kd in KNOWN_DIVERGENCES}
        return d


def swap_active() -> bool:
    """Whether the running kernel has swap on (``/proc/swaps``)."""
    try:
        return len(Path("/proc/swaps").read_text().splitlines()) > 1
    except OSError:
        return False


def run_difftest(n: int, seed: int, *, out_dir: str | None = None, min_ops: int = 8,
                 max_ops: int = 24, minimise_findings: bool = True,
                 max_findings: int = 5) -> Report:
    """Run ``n`` random schedules on both sides; minimise and write unknown mismatches."""
    rep = Report(kernel=platform.release())
    rep.not_drawn = ["MADV_PAGEOUT: " + ("drawn (swap active)" if swap_active()
                                         else "not drawn, no active swap"),
                     "kswapd reclaim: no way to aim it at a page on a real kernel",
                     "R/O pins: vmsplice is not FOLL_LONGTERM (no gup_test here)",
                     "fail_nth: needs CONFIG_FAULT_INJECTION", "prctl_cow_pte: v4 interface"]
    pageout = swap_active()
    rng = np.random.default_rng(seed)
    ex = Executor()
    known: Counter[str] = Counter()
    t0 = time.perf_counter()
    try:
        for i in range(n):
            steps = random_schedule(rng, int(rng.integers(min_ops, max_ops + 1)),
                                    pageout=pageout)
            o = check_schedule(ex, steps)
            rep.schedules += 1
            rep.steps += len(o.steps)
            rep.observations += o.observations
            if o.error:
                rep.errors += 1
            if o.diffs:
                rep.mismatching += 1
            if o.unknown:
                rep.unknown += 1
                if len(rep.findings) < max_findings:
                    rep.findings.append(_finding(ex, o, f"difftest-{seed}-{i}", out_dir,
                                                 minimise_findings))
            elif o.known:
                for r in o.known:
                    known[r] += 1
    finally:
        ex.close()
    rep.seconds = round(time.perf_counter() - t0, 2)
    rep.known_by_reason = dict(known)
    return rep


def _finding(ex: Executor, o: Outcome, name: str, out_dir: str | None,
             do_min: bool) -> dict[str, Any]:
    first = o.unknown[0]
    steps = o.steps
    if do_min:
        steps = minimise(ex, o.steps, first.signature())
        o2 = check_schedule(ex, steps)
        if o2.unknown:
            first = o2.unknown[0]
    sc = finding_scenario(name, steps, first)
    f: dict[str, Any] = {"name": name, "first_difference": first.describe(),
                         "signature": first.signature(), "steps": len(steps),
                         "original_steps": len(o.steps), "schedule": steps}
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.yaml").write_text(dump_scenario(sc.to_data()))
        (d / f"{name}.c").write_text(export_c(sc))
        f["files"] = [str(d / f"{name}.yaml"), str(d / f"{name}.c")]
    return f


def format_report(rep: Report) -> str:
    """Readable report: figures, known divergences by reason, each unknown mismatch."""
    d = rep.to_dict()
    lines = [f"difftest against Linux {rep.kernel}: {rep.schedules} schedules, "
             f"{rep.steps} operations, {rep.observations} observations compared "
             f"({d['schedules_per_second']} schedules/s)",
             f"mismatching schedules: {rep.mismatching} (unknown {rep.unknown}; known "
             f"{rep.mismatching - rep.unknown}); executor errors: {rep.errors}"]
    for r, c in sorted(rep.known_by_reason.items()):
        lines.append(f"  known {r}: {c} schedule(s)")
    lines.append("not drawn: " + "; ".join(rep.not_drawn))
    for f in rep.findings:
        lines.append(f"UNKNOWN {f['name']} ({f['steps']} of {f['original_steps']} steps "
                     "after minimising):")
        for i, s in enumerate(f["schedule"]):
            lines.append(f"  {i:3d}  thread {s['tid']}: {s['do']} {s.get('args', {})}")
        lines.append(f"  first difference: {f['first_difference']}")
        for p in f.get("files", []):
            lines.append(f"  written: {p}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ CLI
def _setup(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--n", type=int, default=200, help="schedules (default 200)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", action="store_true", help="one JSON object")
    sp.add_argument("--out", default="difftest-findings",
                    help="folder for minimised unknown mismatches (scenario + C file)")
    sp.add_argument("--no-minimise", action="store_true")


def _run(a: argparse.Namespace) -> int:
    from .cli import BadInput

    if a.n < 1:
        raise BadInput("--n: expected >= 1")
    if compiler() is None:
        raise BadInput("difftest needs a C compiler (set CC or install gcc)")
    rep = run_difftest(a.n, a.seed, out_dir=a.out, minimise_findings=not a.no_minimise)
    if a.json:
        d = rep.to_dict()
        for f in d["findings"]:
            f.pop("schedule", None)
        print(json.dumps(d, sort_keys=True))
    else:
        print(format_report(rep))
    return 1 if rep.unknown else 0


CLI_COMMANDS = {"difftest": (_setup, _run, "differential test: the model against this kernel")}
