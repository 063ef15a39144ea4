"""Export a scenario as a self-contained C program that runs it on a real Linux kernel.

Every operation with a userspace form is exported, issue 13's included (``mremap``,
``move_pages`` with its status array, ``clear_refs``, ``pagemap``, ``swapoff``, and
``{event: fail_nth, tid: T}`` as that thread's ``/proc/thread-self/fail-nth``). Those with
none are refused with one line naming them: ``compact`` (kcompactd), ``numa_hint``
(``task_numa_work``) and the kernel-wide ``pressure_fail_nth`` / ``fail_nth`` without a
thread.

``cowenv export FILE -o repro.c [--build]`` writes one C file: a header comment (what
the scenario is, how to build and run it, what cannot be reproduced exactly), the
schedule as an embedded program text, and the runtime :file:`cowenv/csrc/cowrt.c`
(libc and raw system calls only). The same runtime, built without an embedded program,
is the executor of :mod:`cowenv.difftest`.

Lowering (:func:`lower`): each ``do``/``start`` step becomes one ``op`` line naming the
thread, the operation, its arguments and its check. The classic model runs the scenario
alongside to learn what the C program cannot compute on its own: the thread id the
kernel gives a ``fork`` child or a ``clone`` thread, and which operations interleave.
Operations the schedule interleaves inside each other (a ``start`` with steps of other
threads before it completes) form a *race group*: the program sends them to their
threads together and releases them at once; the whole schedule then runs in a loop
(syzkaller's collide mode), since an interleaving finer than a system call cannot be
forced on a real kernel.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kernel import make_kernel
from .kernel.config import KernelConfig
from .kernel.ops import ADVICES, ERRNO_NAMES, OPS, parse_prot
from .scenario import TID_KEY, Scenario, StepError, apply_step, resolve_tid

CSRC = Path(__file__).with_name("csrc") / "cowrt.c"

#: Simulated address A runs at COWRT_BASE + A on the real kernel (see cowrt.c).
COWRT_BASE = 0x100000000000

#: Highest simulated address the runtime accepts (base + address stays below 47 bits).
MAX_ADDR = 0x600000000000

#: Iterations of a schedule with race groups (collide mode) unless told otherwise.
COLLIDE_REPEAT = 100


@dataclass
class Layout:
    """Address windows the executor observes: ``nslots`` slots of ``pages`` pages.

    Slot ``i`` starts at ``origin + i * stride``; a gap between slots keeps the real
    kernel from merging VMAs of different slots.
    """

    nslots: int = 0
    origin: int = 0x100000
    stride: int = 0x10000
    pages: int = 8


@dataclass
class Lowered:
    """A scenario lowered to the runtime's program text."""

    text: str
    races: int = 0
    notes: list[str] = field(default_factory=list)


class ExportError(ValueError):
    """The scenario cannot be exported (one line)."""


#: Boolean arguments and their one-letter keys in the runtime's command lines.
_FLAG_KEYS = {"shared": "s", "populate": "u", "write": "w", "fast": "f"}


def _errno_value(name: str) -> int:
    inv = {n: c for c, n in ERRNO_NAMES.items()}
    return -inv[name.lstrip("-")]


def expect_token(ev: Any) -> str:
    """The runtime's ``x=`` form of a scenario ``expect``."""
    if isinstance(ev, dict):
        return f"ne:{ev['not']}"
    if ev == "zero":
        return "v:0"
    if isinstance(ev, bool):
        return f"v:{int(ev)}"
    if isinstance(ev, int):
        return f"v:{ev}"
    if isinstance(ev, str) and ev.lstrip("-") in ERRNO_NAMES.values():
        return f"v:{_errno_value(ev)}"
    return f"eq:{ev}"


#: Operations with no userspace form, and why (the export refuses them, one line).
_NO_USERSPACE_FORM = {
    "compact": "kcompactd's migration of chosen LRU pages has no system call (the closest, "
               "/proc/sys/vm/compact_memory, compacts every zone and needs root)",
    "numa_hint": "task_numa_work runs from the scheduler tick when NUMA balancing is on; no "
                 "system call makes it scan a given range",
}

#: Event steps with no userspace form.
_NO_USERSPACE_EVENT = (
    "fails the n-th allocation anywhere in the kernel, whichever thread makes it (memory "
    "pressure, not a Linux interface); use {event: fail_nth, tid: T, n: N} for "
    "/proc/thread-self/fail-nth")

#: Argument names of issue 13's operations -> the runtime's keys (see cowrt.c).
_KEYS = {"old_length": "l", "new_length": "nl", "new_addr": "na", "all": "ma", "stat": "ms",
         "type": "ty"}

#: move_pages pages per call in the runtime (``MAXST`` of cowrt.c).
MAX_MOVE_PAGES = 64

#: Operations whose ``pid`` argument picks the process they act on (run on its thread).
_PID_OPS = ("reclaim", "clear_refs", "pagemap")


def op_line(i: int, s: dict[str, Any], nt: int | None, names: dict[str, Any],
            tid: int | None = None) -> str:
    """One ``op`` line for scenario step ``s`` (index ``i``)."""
    op = s.get("do") or s.get("start")
    if op in _NO_USERSPACE_FORM:
        raise ExportError(f"step {i}: {op} has no userspace form: {_NO_USERSPACE_FORM[op]}")
    args = dict(s.get("args") or {})
    for spec in OPS[op].args:  # defaults (mmap's prot "rw", ...)
        if spec.name not in args and not spec.required:
            args[spec.name] = spec.default
    parts = [f"op i={i} t={tid if tid is not None else s['tid']} o={op}"]
    for k, v in args.items():
        if k == "pin":
            parts.append(f"pin={v}")
            continue
        if isinstance(v, str) and k in ("addr", "pid", "nr") and v in names:
            v = names[v]
        if k == "addr":
            if int(v) >= MAX_ADDR:
                raise ExportError(f"step {i}: address {int(v):#x} is above {MAX_ADDR:#x}")
            parts.append(f"a={int(v):#x}")
        elif k == "length":
            parts.append(f"l={int(v):#x}")
        elif k == "prot":
            parts.append(f"p={parse_prot(v)}")
        elif k in _FLAG_KEYS:
            parts.append(f"{_FLAG_KEYS[k]}={int(bool(v))}")
        elif k == "advice":
            parts.append(f"v={ADVICES.index(str(v).upper().removeprefix('MADV_'))}")
        elif k == "nr":
            parts.append(f"n={int(v)}")
        elif k == "pid":
            continue  # the op runs on a thread of that process (see lower)
        elif k == "maymove":
            parts.append(f"m={int(bool(v))}")
        elif k == "new_addr":
            if int(v) >= MAX_ADDR:
                raise ExportError(f"step {i}: address {int(v):#x} is above {MAX_ADDR:#x}")
            parts.append(f"na={int(v):#x}" if int(v) >= 0 else "na=-1")
        elif k in _KEYS:
            val = int(bool(v)) if isinstance(v, bool) else int(v)
            parts.append(f"{_KEYS[k]}={val:#x}" if k.endswith("length") else
                         f"{_KEYS[k]}={val}")
    if op == "move_pages" and int(args["length"]) // 4096 > MAX_MOVE_PAGES:
        raise ExportError(f"step {i}: move_pages of {int(args['length']) // 4096} pages: the "
                          f"runtime passes at most {MAX_MOVE_PAGES} per call")
    if "status" in s:
        parts.append("ss=" + ",".join("u" if x is None else str(int(x)) for x in s["status"]))
    if nt is not None:
        parts.append(f"nt={nt}")
    if "as" in s:
        parts.append(f"as={s['as']}")
    if "expect" in s:
        parts.append(f"x={expect_token(s['expect'])}")
    if s.get("check"):
        parts.append("c=" + " ".join(str(s["check"]).split()))
    return " ".join(parts)


def lower(config: KernelConfig, steps: list[dict[str, Any]], *, observe: bool = False,
          layout: Layout | None = None, repeat: int | None = None) -> Lowered:
    """Lower scenario steps to the runtime's program text (see module docstring).

    Raises:
        ExportError: an operation the runtime cannot perform.
    """
    lay = layout or Layout()
    k = make_kernel(config, trace=False, oracles=False)
    names: dict[str, Any] = {}
    pending: dict[int, dict] = {}
    notes: list[str] = []
    # Pass 1: run on the model; per op step: new thread id, completion step, pid->tid.
    info: dict[int, dict[str, Any]] = {}
    open_ops: dict[int, int] = {}  # tid -> index of the step that started its op
    done_at: dict[int, int] = {}
    failed_at = None
    for i, s in enumerate(steps):
        if "do" in s or "start" in s:
            # a fork/clone child named by `as` runs as the thread id the model gave it
            try:
                mtid: int | None = resolve_tid(s["tid"], names)
            except StepError:
                mtid = None
            info[i] = {"tid": mtid, "model_tid": mtid}
            op = s.get("do") or s.get("start")
            if op in _PID_OPS and (op == "reclaim" or s.get("args", {}).get("pid", 0)):
                pid = s.get("args", {}).get("pid", 0)
                pid = names.get(pid, pid) if isinstance(pid, str) else pid
                p = k.procs.get(pid)
                info[i]["tid"] = p.tids[0] if p is not None and p.alive and p.tids else None
        try:
            apply_step(k, copy.deepcopy(s), names, pending, i)
        except StepError as e:
            failed_at = i
            notes.append(f"the model stopped at step {i} ({e}); later steps lowered as written")
            break
        if i in info and info[i]["model_tid"] is not None:
            open_ops[info[i]["model_tid"]] = i
        for tid, j in list(open_ops.items()):
            t = k.threads.get(tid)
            if t is None or t.gen is None:
                done_at[j] = i
                del open_ops[tid]
                op = steps[j].get("do") or steps[j].get("start")
                res = t.result if t is not None else None
                info[j]["nt"] = None
                if op == "clone" and isinstance(res, int) and res > 0:
                    info[j]["nt"] = res
                elif op == "fork" and isinstance(res, int) and res > 0 and res in k.procs:
                    info[j]["nt"] = k.procs[res].tids[0] if k.procs[res].tids else None
    for j in open_ops.values():
        done_at[j] = len(steps) - 1
    # Pass 2: emit lines; race groups where an op completes after a later op starts.
    lines = [f"schedule {lay.nslots} {lay.origin:#x} {lay.stride:#x} {lay.pages} "
             f"{int(observe)} {repeat or 1}"]
    races = 0
    i = 0
    n = len(steps)
    while i < n:
        s = steps[i]
        if "event" in s:
            lines.append(_failnth_line(i, s, names))
            i += 1
            continue
        if "do" not in s and "start" not in s:
            i += 1
            continue
        if failed_at is not None and i >= failed_at and i not in info:
            info[i] = {"tid": s["tid"], "nt": None}
        end = done_at.get(i, i)
        if "do" in s or end == i:
            lines.append(_line(i, s, info, names))
            i += 1
            continue
        # a race group: every op started before the last member completes
        members = [i]
        j = i + 1
        while j <= end and j < n:
            if "do" in steps[j] or "start" in steps[j]:
                members.append(j)
                end = max(end, done_at.get(j, j))
            j += 1
        for m in range(i, j):
            if "event" in steps[m]:
                lines.append(_failnth_line(m, steps[m], names))
        races += 1
        lines.append(f"race {len(members)}")
        lines.extend(_line(m, steps[m], info, names) for m in members)
        i = j
    lines.append("end")
    if races and repeat is None:
        lines[0] = (f"schedule {lay.nslots} {lay.origin:#x} {lay.stride:#x} {lay.pages} "
                    f"{int(observe)} {COLLIDE_REPEAT}")
    return Lowered("\n".join(lines) + "\n", races, notes)


def _failnth_line(i: int, s: dict[str, Any], names: dict[str, Any]) -> str:
    """``failnth N t=TID`` for ``{event: fail_nth, tid: T}``; other events are refused."""
    tid = s.get("tid")
    if s["event"] != "fail_nth" or tid is None:
        raise ExportError(f"step {i}: {s['event']} without tid has no userspace form: it "
                          + _NO_USERSPACE_EVENT)
    if isinstance(tid, str):
        tid = names.get(TID_KEY + tid)
        if tid is None:
            raise ExportError(f"step {i}: fail_nth: thread {s['tid']!r} does not exist when "
                              "the model runs the schedule")
    return f"failnth {s['n']} t={int(tid)}"


def _line(i: int, s: dict[str, Any], info: dict[int, dict[str, Any]],
          names: dict[str, Any]) -> str:
    inf = info.get(i, {})
    op = s.get("do") or s.get("start")
    nt = inf.get("nt") if op in ("fork", "clone") else None
    if op in ("fork", "clone") and nt is None:
        nt = 0  # the model refused it: the runtime's thread 0 pipes take the child
    tid = inf.get("tid", s["tid"])
    if op == "reclaim":
        if tid is None or (s.get("args") or {}).get("addr", -1) == -1:
            return f"# step {i}: reclaim without a mapped page: not reproducible"
    if op in _PID_OPS and tid is None:
        return f"# step {i}: {op} of a process that is gone: not reproducible"
    if tid is None or isinstance(tid, str):
        return f"# step {i}: thread {s['tid']!r} never existed in the model run: not reproducible"
    return op_line(i, s, nt, names, tid=tid)


def _c_string(text: str) -> str:
    out = []
    for ln in text.splitlines():
        esc = ln.replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'    "{esc}\\n"')
    return "\n".join(out)


def export_c(sc: Scenario, repeat: int | None = None) -> str:
    """The C reproducer of scenario ``sc`` (a complete, self-contained source file)."""
    low = lower(sc.config, sc.steps, repeat=repeat)
    desc = " ".join((sc.description or "").split())
    wrapped = []
    line = ""
    for w in desc.split():
        if len(line) + len(w) > 80:
            wrapped.append(line)
            line = ""
        line += ("" if not line else " ") + w
    if line:
        wrapped.append(line)
    hdr = [
        "/*",
        f" * cowenv reproducer: {sc.name}",
        f" * from {sc.path or '<data>'} (config: {sc.config.to_dict()})",
        " *",
        *[f" *   {w.replace('*/', '* /')}" for w in wrapped],
        " *",
        " * Build:  cc -O2 -pthread -o repro repro.c",
        " * Run:    ./repro [ITERATIONS]",
        " * Output: a PASS/FAIL/XFAIL/SKIP line per checked step; exit 0 iff nothing FAILed.",
        " *",
        " * Each simulated process is a real process and each simulated thread a real",
        " * thread, driven step by step over pipes by a coordinator, so the order of",
        " * operations across processes is the schedule's. Simulated address A is mapped at",
        f" * {COWRT_BASE:#x} + A; regions get MADV_NOHUGEPAGE.",
        " * prctl_cow_pte issues prctl(65) (PR_SET_COW_PTE of the v4 patch) and reports",
        " * 'kernel without COW PTE' when refused (on upstream >= 6.3 option 65 is",
        " * PR_SET_MDWE: it is not issued there). R/O pins use vmsplice (as cow.c), R/W",
        " * long-term pins io_uring fixed buffers (raw syscalls); fail_nth uses",
        " * /proc/thread-self/fail-nth when present; reclaim needs active swap. The",
        " * program never changes the host's configuration (swapoff excepted: see below).",
    ]
    ops = {s.get("do") or s.get("start") for s in sc.steps}
    if "move_pages" in ops:
        hdr += [
            " *",
            " * move_pages: every page is asked to go to node 0. The model migrates each page",
            " * it can isolate; Linux stores the node and moves nothing for a page already on",
            " * node 0 (checked before -EACCES), so on a one-node machine statuses the",
            " * scenario expects as -EACCES, or a pinned page's failed migration, read 0.",
            " * Untouched anonymous pages are -EFAULT up to 6.11 (follow_page FOLL_DUMP's",
            " * no_page_table) and -ENOENT since folio_walk (6.12).",
        ]
    if "swapoff" in ops:
        hdr += [
            " *",
            " * swapoff: swapoff(2) of the first device in /proc/swaps, then swapon(2) of it",
            " * with its priority (root only; skipped without swap or CAP_SYS_ADMIN).",
        ]
    if low.races:
        hdr += [
            " *",
            f" * RACES: {low.races} group(s) of operations interleave inside each other in the",
            " * schedule. Interleavings finer than a system call cannot be forced on a real",
            " * kernel: each group's operations are released together in their threads and",
            " * the whole schedule runs in a loop (syzkaller collide mode); pass ITERATIONS",
            f" * to change the default of {COLLIDE_REPEAT}. A pass means the race was not",
            " * hit, not that it cannot be.",
        ]
    for nt in low.notes:
        hdr.append(f" * NOTE: {nt}")
    hdr.append(" */")
    body = CSRC.read_text()
    return ("\n".join(hdr) + "\nstatic const char cowrt_program[] =\n" + _c_string(low.text)
            + ";\n#define COWRT_PROGRAM cowrt_program\n\n" + body)


# ------------------------------------------------------------------------------ building
def compiler() -> str | None:
    """The system C compiler (``$CC``, cc, gcc, clang), or None."""
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def cache_dir() -> Path:
    """Where compiled artefacts go (never the source tree)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = Path(base) / "cowenv"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(src: Path, out: Path) -> None:
    """Compile ``src`` to ``out``.

    Raises:
        ExportError: no compiler, or the compiler failed (its first lines).
    """
    cc = compiler()
    if cc is None:
        raise ExportError("no C compiler found (set CC or install gcc)")
    r = subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(src)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise ExportError(f"{cc} failed: " + " ".join(r.stderr.splitlines()[:3]))


def build_cached(source: str, stem: str) -> Path:
    """Compile C ``source`` once into the cache (keyed by its hash); return the binary."""
    h = hashlib.sha256(source.encode()).hexdigest()[:16]
    d = cache_dir()
    exe = d / f"{stem}-{h}"
    if not exe.exists():
        src = d / f"{stem}-{h}.c"
        src.write_text(source)
        tmp = d / f"{stem}-{h}.tmp{os.getpid()}"
        build(src, tmp)
        os.replace(tmp, exe)
    return exe


# ------------------------------------------------------------------------------ CLI
def _setup_export(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", help="scenario file (YAML)")
    sp.add_argument("-o", "--output", required=True, help="C file to write")
    sp.add_argument("--build", action="store_true",
                    help="compile it with the system C compiler (binary beside the C file)")
    sp.add_argument("--repeat", type=int, default=None,
                    help=f"iterations (default 1, {COLLIDE_REPEAT} with race groups)")


def _run_export(a: argparse.Namespace) -> int:
    from .cli import BadInput
    from .fileio import atomic_write_text
    from .scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(a.file)
        src = export_c(sc, repeat=a.repeat)
    except (ScenarioError, ExportError) as e:
        raise BadInput(str(e)) from None
    atomic_write_text(a.output, src)
    print(f"wrote {a.output}")
    if a.build:
        out = Path(a.output).with_suffix("")
        if out == Path(a.output):
            out = Path(str(a.output) + ".bin")
        try:
            build(Path(a.output), out)
        except ExportError as e:
            print(f"build: {e}")
            return 1
        print(f"built {out}")
    return 0


CLI_COMMANDS = {"export": (_setup_export, _run_export, "export a scenario as a C reproducer")}
