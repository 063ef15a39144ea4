"""Export a scenario as a self-contained C program that runs it on a real Linux kernel.

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
from .scenario import Scenario, StepError, apply_step

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


#: Operations of issue 13's walkers that ``csrc/`` does not implement (mremap,
#: move_pages and compaction need their own runtime support).
_NOT_EXPORTED = ("mremap", "move_pages", "compact")


def op_line(i: int, s: dict[str, Any], nt: int | None, names: dict[str, Any],
            tid: int | None = None) -> str:
    """One ``op`` line for scenario step ``s`` (index ``i``)."""
    op = s.get("do") or s.get("start")
    if op in _NOT_EXPORTED:
        known = ", ".join(o for o in OPS if o not in _NOT_EXPORTED)
        raise ExportError(f"step {i}: {op} has no C runtime counterpart yet (the C "
                          f"reproducer covers {known})")
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
            continue  # reclaim: the op runs on a thread of that process (see lower)
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
            info[i] = {"tid": s["tid"]}
            op = s.get("do") or s.get("start")
            if op == "reclaim":
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
        if i in info:
            open_ops[s["tid"]] = i
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
            lines.append(f"failnth {s['n']}")
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
        events = [steps[m] for m in range(i, j) if "event" in steps[m]]
        for e in events:
            lines.append(f"failnth {e['n']}")
        races += 1
        lines.append(f"race {len(members)}")
        lines.extend(_line(m, steps[m], info, names) for m in members)
        i = j
    lines.append("end")
    if races and repeat is None:
        lines[0] = (f"schedule {lay.nslots} {lay.origin:#x} {lay.stride:#x} {lay.pages} "
                    f"{int(observe)} {COLLIDE_REPEAT}")
    return Lowered("\n".join(lines) + "\n", races, notes)


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
        " * program never changes the host's configuration.",
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
