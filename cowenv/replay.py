"""Schedules: record every episode, replay it exactly, and show it as a trace.

A recorded schedule *is* a scenario (:mod:`cowenv.scenario`, ``version: 1``): the full
kernel configuration, the seed, the steps in readable form and the outcome as its
expectation. Recording adds one optional top-level field, ``outcome``, that pins the run
down for replay fidelity::

    expect: {violation: {kind: isolation, site: user_access, step: 41}}
    outcome:
      trace_hash: 3f1c…        # SHA-256 of the event trace (cowenv.kernel.trace.trace_hash)
      steps: 57                # kernel scheduler steps taken
      events: 212              # trace events recorded
      labels: [null, read:done, "handle_pte_fault:pte_locked", …]   # optional, one per step

Recorded steps use the scheduler's primitives only: ``{tid, start: op, args}``,
``{tid, step: 1}`` and ``{event: fail_nth, n}`` (kswapd is tid 0); hand-written scenarios
may also use ``do``/``until``/``finish``. ``labels[i]`` is the preemption label step ``i``
stopped at (``null`` for steps that run no thread); it lets a replay say *where* a
schedule diverged, not only *that* it did.

Replay (``cowenv replay FILE``, :func:`replay`) runs the steps on a fresh kernel (no agent,
no environment) with :func:`cowenv.scenario.apply_step`, exactly like the scenario
runner but without the runner's extra end-of-run accounting check (a recorded episode
never had it, and it would add events to the trace). It reproduces when every step is
legal, each recorded label matches, each expected violation appears with the same
signature at the same step, and — when recorded — the step count and trace hash match.
Like shuttle, replay fails loudly: the first divergence is reported with the schedule
step and what differs.

The timeline (``--trace``) and the Chrome trace export (:mod:`cowenv.chrome_trace`) are
views of the same event trace. Minimisation lives in :mod:`cowenv.minimize`, finding
deduplication in :mod:`cowenv.findings`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .kernel import KSWAPD_TID, Kernel, make_kernel
from .kernel.config import KernelConfig
from .kernel.ops import ADVICES, OPS
from .kernel.trace import Event, Violation, trace_hash
from .scenario import (
    FORMAT_VERSION,
    Scenario,
    ScenarioError,
    StepError,
    apply_step,
    dedup,
    load_scenario,
    preset_of,
    resolve_tid,
)

# ------------------------------------------------------------------------------ recording


def _plain(v: Any) -> Any:
    """Numpy scalars and tuples into plain YAML-able data."""
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def readable_args(op: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """Arguments of ``op`` as written in a schedule: plain ints, addresses in hex.

    Only the arguments given are written (defaults stay implicit, as in hand-written
    scenarios); address arguments become ``"0x…"`` strings, which the loader accepts.
    """
    spec = {a.name: a for a in OPS[op].args} if op in OPS else {}
    out: dict[str, Any] = {}
    for k, v in (args or {}).items():
        v = _plain(v)
        a = spec.get(k)
        if a is not None and a.type == "addr" and isinstance(v, int) and v >= 0:
            v = hex(v)
        out[k] = v
    return out


def expect_of(violations: list[Violation]) -> dict[str, Any]:
    """Return the expectation a run establishes: its first violation or none."""
    if not violations:
        return {"violation": None}
    v = violations[0]
    return {"violation": {"kind": v.kind, "site": v.site, "step": int(v.step)}}


def outcome_of(k: Kernel, labels: list[str | None] | None = None) -> dict[str, Any]:
    """Return the ``outcome`` record of a finished run (trace hash only if tracing)."""
    out: dict[str, Any] = {}
    if k.tracing:
        out["trace_hash"] = trace_hash(k.events)
        out["events"] = len(k.events)
    out["steps"] = int(k.step_no)
    if labels is not None:
        out["labels"] = list(labels)
    return out


def record_from_kernel_run(k: Kernel, steps: list[dict[str, Any]], *, name: str = "recorded",
                           seed: int = 0, description: str = "",
                           labels: list[str | None] | None = None,
                           recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scenario data for a schedule that was just run on kernel ``k``.

    Args:
        k: The kernel the steps were applied to (fresh at the first step).
        steps: The schedule's steps in scenario form (``start``/``step``/``event``…).
        name: Scenario name.
        seed: The episode's seed (recorded for the agent's reproducibility).
        description: Free text.
        labels: Optional preemption label per step (see module docstring).
        recorded: Optional provenance (``{agent: …, episode: …}``): plain scalars.

    Returns:
        Plain data that :func:`cowenv.scenario.parse_scenario` accepts and
        :func:`cowenv.scenario.save_scenario` writes.

    """
    d: dict[str, Any] = {"version": FORMAT_VERSION, "name": name}
    if description:
        d["description"] = description
    d["config"] = k.config.to_dict()
    d["seed"] = int(seed)
    d["steps"] = [_plain(s) for s in steps]
    d["expect"] = expect_of(dedup(k.violations))
    d["outcome"] = outcome_of(k, labels)
    if recorded:
        d["recorded"] = _plain(recorded)
    return d


def thread_label(k: Kernel, tid: int) -> str:
    """Where thread ``tid`` stands: its preemption label, or ``<op>:done`` when idle."""
    t = k.threads[tid]
    return t.label if t.gen is not None else f"{t.op}:done"


class ScheduleRecorder:
    """Drive a kernel and write down what was done, in scenario form.

    Every call is passed to the kernel first; only calls that succeed are recorded, so
    the schedule never contains an illegal step.

    Args:
        kernel: A fresh kernel (nothing run on it yet).

    """

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        self.steps: list[dict[str, Any]] = []
        self.labels: list[str | None] = []

    def start(self, tid: int, op: str, args: dict[str, Any] | None = None) -> None:
        """``Kernel.start`` + record ``{tid, start: op, args}``."""
        args = {a: _plain(v) for a, v in (args or {}).items()}
        self.k.start(tid, op, args)
        s: dict[str, Any] = {"tid": int(tid), "start": op}
        if args:
            s["args"] = readable_args(op, args)
        self.steps.append(s)
        self.labels.append(None)

    def step(self, tid: int) -> str:
        """``Kernel.step`` + record ``{tid, step: 1}``; returns the label."""
        label = self.k.step(tid)
        self.steps.append({"tid": int(tid), "step": 1})
        self.labels.append(thread_label(self.k, tid))
        return label

    def event(self, name: str, **args: Any) -> None:
        """``Kernel.event`` + record ``{event: name, …}``."""
        self.k.event(name, **args)
        self.steps.append({"event": name, **{a: _plain(v) for a, v in args.items()}})
        self.labels.append(None)

    def scenario_data(self, name: str = "recorded", seed: int = 0, description: str = "",
                      recorded: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the schedule so far as scenario data (see :func:`record_from_kernel_run`)."""
        return record_from_kernel_run(self.k, self.steps, name=name, seed=seed,
                                      description=description, labels=self.labels,
                                      recorded=recorded)


# ------------------------------------------------------------------------ random schedules
def _random_args(k: Kernel, op: str, rng: np.random.Generator, addrs: list[int]
                 ) -> dict[str, Any]:
    ps = k.config.page_size

    def addr() -> int:
        return addrs[int(rng.integers(len(addrs)))]

    def length() -> int:
        return int(rng.integers(1, 9)) * ps

    if op == "mmap":
        return {"addr": addr(), "length": length(),
                "prot": ("rw", "rw", "r", "none")[int(rng.integers(4))],
                "shared": bool(rng.random() < 0.15), "populate": bool(rng.random() < 0.2)}
    if op == "munmap":
        return {"addr": addr(), "length": length()}
    if op == "mprotect":
        return {"addr": addr(), "length": length(),
                "prot": ("r", "rw", "none")[int(rng.integers(3))]}
    if op == "madvise":
        return {"addr": addr(), "length": length(),
                "advice": ADVICES[int(rng.integers(len(ADVICES)))]}
    if op in ("read", "write"):
        return {"addr": addr()}
    if op == "pin":
        return {"addr": addr(), "write": bool(rng.random() < 0.5), "fast": bool(rng.random() < 0.5)}
    if op in ("unpin", "dev_read", "dev_write"):
        return {"pin": int(rng.integers(1, 5))}
    if op == "reclaim":
        procs = [p.pid for p in k.live_procs()]
        if procs and rng.random() < 0.5:
            return {"nr": int(rng.integers(1, 5)), "pid": procs[int(rng.integers(len(procs)))],
                    "addr": addr()}
        return {"nr": int(rng.integers(1, 5))}
    return {}


#: Relative weights of user operations in :func:`random_schedule`.
USER_OP_WEIGHTS: dict[str, float] = {
    "mmap": 3, "munmap": 1, "mprotect": 1.5, "madvise": 2, "read": 4, "write": 5, "fork": 1.5,
    "clone": 0.7, "exit": 0.4, "prctl_cow_pte": 0.8, "pin": 1.2, "unpin": 0.5,
    "dev_read": 0.5, "dev_write": 0.5,
}


def random_schedule(config: KernelConfig, seed: int, length: int = 60, *,
                    p_step: float = 0.55, p_event: float = 0.03, p_kswapd: float = 0.08,
                    stop_on_violation: bool = False, name: str | None = None,
                    trace: bool = True) -> dict[str, Any]:
    """Record a schedule of ``length`` random *legal* scheduler actions.

    Addresses are drawn from a few page tables' worth of pages at 0x100000, so that
    mappings, forks and faults collide. The result is scenario data with its observed
    outcome as the expectation (the generator for fidelity tests and benchmarks).

    Args:
        config: Kernel configuration.
        seed: Seed of the action generator (also written as the scenario's seed).
        length: Number of actions.
        p_step: Probability of stepping a runnable thread rather than starting an op.
        p_event: Probability of a ``fail_nth`` event.
        p_kswapd: Probability that a start goes to kswapd (reclaim).
        stop_on_violation: Stop at the first violation (as an episode would).
        name: Scenario name (default ``random-<seed>``).
        trace: Record the event trace (needed for ``outcome.trace_hash``).

    """
    rng = np.random.default_rng(seed)
    k = make_kernel(config, trace=trace)
    rec = ScheduleRecorder(k)
    P, ps = config.ptrs_per_pte, config.page_size
    base = 0x100000 - (0x100000 % config.pmd_size) if config.pmd_size <= 0x100000 \
        else config.pmd_size
    pages = list(range(4 * P)) if P <= 16 else list(range(16)) + list(range(P, P + 16))
    addrs = [base + p * ps for p in pages]
    ops = list(USER_OP_WEIGHTS)
    w = np.array([USER_OP_WEIGHTS[o] for o in ops])
    w = w / w.sum()
    for _ in range(length):
        if stop_on_violation and k.violations:
            break
        runnable = k.runnable_tids()
        idle = [t for t in k.idle_tids() if t != KSWAPD_TID]
        r = rng.random()
        if r < p_event:
            rec.event("fail_nth", n=int(rng.integers(1, 4)))
        elif runnable and (r < p_event + p_step or not idle):
            rec.step(runnable[int(rng.integers(len(runnable)))])
        elif k.threads[KSWAPD_TID].idle and rng.random() < p_kswapd:
            rec.start(KSWAPD_TID, "reclaim", _random_args(k, "reclaim", rng, addrs))
        elif idle:
            tid = idle[int(rng.integers(len(idle)))]
            op = ops[int(rng.choice(len(ops), p=w))]
            rec.start(tid, op, _random_args(k, op, rng, addrs))
        elif runnable:
            rec.step(runnable[int(rng.integers(len(runnable)))])
        else:
            break  # everybody exited or deadlocked
    return rec.scenario_data(name=name or f"random-{seed}", seed=seed)


# ------------------------------------------------------------------------------ execution
@dataclass
class Execution:
    """What running a schedule did.

    Attributes:
        kernel: The kernel after the run.
        labels: Label each executed step stopped at (None if it ran no thread).
        error: ``(index, message)`` of the first illegal step (strict mode), else None.
        executed: Number of schedule steps carried out.
        event_pids: Process id of each trace event's thread at the time (0 = kernel).
        stopped: The run stopped early because the target signatures all appeared.

    """

    kernel: Kernel
    labels: list[str | None]
    error: tuple[int, str] | None
    executed: int
    event_pids: list[int] = field(default_factory=list)
    stopped: bool = False

    @property
    def violations(self) -> list[Violation]:
        """First occurrence of each signature, in order."""
        return dedup(self.kernel.violations)


def execute(config: KernelConfig, steps: list[dict[str, Any]], *, trace: bool = True,
            stop_on: set[str] | None = None, track_pids: bool = False) -> Execution:
    """Run ``steps`` strictly (an illegal step ends the run) on a fresh kernel.

    Args:
        config: Kernel configuration.
        steps: Parsed scenario steps.
        trace: Record the event trace.
        stop_on: Stop as soon as every one of these signatures has been reported.
        track_pids: Fill :attr:`Execution.event_pids` (for the Chrome trace).

    """
    k = make_kernel(config, trace=trace)
    names: dict[str, Any] = {}
    pending: dict[int, dict] = {}
    labels: list[str | None] = []
    pids: list[int] = []
    error = None
    stopped = False
    executed = 0
    for i, s in enumerate(steps):
        before = k.step_no
        try:
            apply_step(k, s, names, pending, i)
        except StepError as e:
            error = (i, str(e))
            break
        finally:
            if track_pids:
                for e in k.events[len(pids):]:
                    t = k.threads.get(e.tid)
                    pids.append(int(t.pid) if t is not None else 0)
        tid = s.get("tid")
        if isinstance(tid, str):  # a fork/clone ``as`` name; bound once the step ran
            try:
                tid = resolve_tid(tid, names)
            except StepError:
                tid = None
        labels.append(thread_label(k, tid) if tid is not None and k.step_no != before else None)
        executed = i + 1
        if stop_on and stop_on <= k.signatures:
            stopped = True
            break
    return Execution(k, labels, error, executed, pids, stopped)


# ------------------------------------------------------------------------------ replay
def compact_step(s: dict[str, Any]) -> str:
    """One-line flow-style text of a step, as in a scenario file."""
    parts = []
    for key, v in s.items():
        if key.startswith("_"):
            continue
        if isinstance(v, dict):
            v = "{" + ", ".join(f"{a}: {x}" for a, x in v.items()) + "}"
        parts.append(f"{key}: {v}")
    return "{" + ", ".join(parts) + "}"


@dataclass
class ReplayReport:
    """Result of :func:`replay`.

    Attributes:
        reproduced: The outcome matched.
        divergence: One line saying at which step and how it diverged (None if not).
        execution: The run.
        checks: What was compared (``violation``, ``labels``, ``steps``, ``trace_hash``).

    """

    reproduced: bool
    divergence: str | None
    execution: Execution
    checks: list[str]
    expected: list[dict[str, Any]] = field(default_factory=list)

    def expected_seen(self) -> list[Violation]:
        """The observed violations that the file's expectation names, in its order."""
        vs = self.execution.violations
        out = []
        for e in self.expected:
            hit = [v for v in vs if v.kind == e["kind"] and v.site == e["site"]
                   and ("step" not in e or v.step == e["step"])]
            if hit:
                out.append(hit[0])
        return out

    def summary(self) -> str:
        """One line: the file's own expectation as reproduced, then the first violation.

        The verdict names the signature the file expects (a finding file's own), not
        whichever violation happened first; the first one seen is listed after it when it
        is another signature.
        """
        k = self.execution.kernel
        vs = self.execution.violations
        seen = self.expected_seen()
        if self.expected and seen:
            what = ", ".join(f"{v.signature} at step {v.step}" for v in seen)
            if vs and vs[0].signature not in {v.signature for v in seen}:
                what += f"; first violation seen: {vs[0].signature} at step {vs[0].step}"
        elif self.expected:
            what = "expected violation not seen"
        else:
            what = "no violation, as expected" if not vs else (
                f"first violation seen: {vs[0].signature} at step {vs[0].step}")
        h = trace_hash(k.events)[:12] if k.tracing else "-"
        return f"{what}; {k.step_no} scheduler steps, trace {h}… (checked {', '.join(self.checks)})"


def _violation_divergence(sc: Scenario, vs: list[Violation]) -> str | None:
    exp = sc.expect.violations
    if not exp:
        if vs:
            v = vs[0]
            return f"expected no violation, observed {v.signature} at step {v.step}: {v.message}"
        return None
    for e in exp:
        sig = f"{e['kind']}@{e['site']}"
        want = sig + (f" at step {e['step']}" if "step" in e else "")
        hit = [v for v in vs if v.signature == sig]
        if not hit:
            other = (f"observed {vs[0].signature} at step {vs[0].step} instead" if vs
                     else "observed none")
            return f"expected {want}, {other}"
        if "step" in e and hit[0].step != e["step"]:
            return f"expected {want}, observed it at step {hit[0].step}"
    return None


def replay(sc: Scenario) -> ReplayReport:
    """Replay ``sc`` exactly and compare with its recorded outcome."""
    out = sc.extra.get("outcome") or {}
    ex = execute(sc.config, sc.steps, trace=True)
    k = ex.kernel
    checks = ["violation"]
    div = None
    if ex.error is not None:
        i, msg = ex.error
        div = f"schedule step {i} {compact_step(sc.steps[i])} became illegal: {msg}"
    rec_labels = out.get("labels")
    if div is None and rec_labels is not None:
        checks.append("labels")
        for i, (a, b) in enumerate(zip(rec_labels, ex.labels, strict=False)):
            if a != b:
                div = (f"schedule step {i} {compact_step(sc.steps[i])}: recorded stop at "
                       f"{a or 'nothing'}, replay stopped at {b or 'nothing'}")
                break
    if div is None:
        div = _violation_divergence(sc, ex.violations)
    if div is None and "steps" in out:
        checks.append("steps")
        if out["steps"] != k.step_no:
            div = f"recorded {out['steps']} scheduler steps, replay took {k.step_no}"
    if div is None and "trace_hash" in out:
        checks.append("trace_hash")
        h = trace_hash(k.events)
        if h != out["trace_hash"]:
            n = out.get("events")
            more = (f" ({n} events recorded, {len(k.events)} replayed)"
                    if n is not None and n != len(k.events) else "")
            div = (f"trace differs: recorded hash {out['trace_hash'][:12]}…, replayed "
                   f"{h[:12]}…{more}; the schedule, labels and violations agree")
    if div is None and k.defects:
        div = f"simulator defect: {k.defects[0]}"
    return ReplayReport(div is None, div, ex, checks, [dict(e) for e in sc.expect.violations])


def replay_hint(path: str | Path) -> str:
    """How to replay a saved schedule (printed with every failure, like shuttle)."""
    return f"to replay: cowenv replay {path} --trace"


# ------------------------------------------------------------------------------ timeline
def _ev_text(e: Event) -> str:
    if e.kind == "point":
        return e.label
    if e.kind == "end":
        return f"◀ {e.label} = {e.data}"
    if e.kind == "start":
        args = ", ".join(f"{a}={hex(v) if a == 'addr' and isinstance(v, int) and v >= 0 else v}"
                         for a, v in (e.data or {}).items())
        return f"▶ {e.label}({args})"
    if e.kind in ("lock", "unlock", "wait"):
        sym = {"lock": "+", "unlock": "-", "wait": "…"}[e.kind]
        return f"{sym}{e.label}({e.data})"
    if e.kind == "downgrade":
        return f"↓{e.label}"
    if e.kind == "violation":
        return f"✖ {e.label}"
    if e.kind == "event":
        return f"⚡{e.label}" + (f" {e.data}" if e.data else "")
    return f"{e.kind} {e.label}"


def timeline_rows(k: Kernel) -> tuple[list[int], list[tuple[str, dict[int, list[Event]]]]]:
    """Group a trace into timeline rows.

    Returns:
        ``(tids, rows)``: the thread columns, and one row per scheduler step (keyed by
        the step number as text) plus a row for each start or pressure event between
        steps (keyed ``""``); each row maps a tid (``-1`` = no thread) to its events.

    """
    tids = sorted({e.tid for e in k.events if e.tid >= 0})
    rows: list[tuple[str, dict[int, list[Event]]]] = []
    cur_step = -1
    for e in k.events:
        between = e.kind == "start" or (e.kind == "event" and e.tid < 0)
        if between:
            rows.append(("", {e.tid: [e]}))
            cur_step = -1
            continue
        if e.step != cur_step or not rows or rows[-1][0] == "":
            if not (rows and rows[-1][0] == str(e.step)):
                rows.append((str(e.step), {}))
            cur_step = e.step
        rows[-1][1].setdefault(e.tid, []).append(e)
    return tids, rows


def print_timeline(k: Kernel, console: Any = None, title: str = "") -> None:
    """Print a per-thread column timeline (rich): one row per scheduler step."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    tids, rows = timeline_rows(k)
    con = console or Console(width=max(100, 14 + 34 * (len(tids) + 1)))
    t = Table(title=title or None, show_lines=False, pad_edge=False)
    t.add_column("step", justify="right", style="dim")
    names = {tid: ("kswapd" if tid == KSWAPD_TID else f"t{tid}") for tid in tids}
    for tid in tids:
        pid = k.threads[tid].pid if tid in k.threads else 0
        t.add_column(f"{names[tid]}" + (f" (pid {pid})" if tid != KSWAPD_TID else ""),
                     overflow="fold")
    t.add_column("events", overflow="fold")
    for step, cells in rows:
        row: list[Any] = [step]
        bad = False
        for tid in tids + [-1]:
            txt = Text()
            for j, e in enumerate(cells.get(tid, [])):
                if j:
                    txt.append(" ")
                style = {"point": "bold", "end": "green", "start": "cyan", "violation":
                         "bold red", "event": "yellow", "wait": "magenta"}.get(e.kind, "dim")
                txt.append(_ev_text(e), style=style)
                bad = bad or e.kind == "violation"
            row.append(txt)
        t.add_row(*row, style="on #3a0000" if bad else None)
    con.print(t)


# ------------------------------------------------------------------------------ CLI
def _load(path: str) -> Scenario:
    from .cli import BadInput

    try:
        return load_scenario(path)
    except ScenarioError as e:
        raise BadInput(str(e)) from None


def _check_output(path: str) -> None:
    """Refuse an ``-o`` that cannot be written, before any work (folders are not created)."""
    from .cli import BadInput
    from .fileio import check_output_path

    why = check_output_path(path)
    if why is not None:
        raise BadInput(f"{path}: cannot write (-o: {why})")


def _setup_replay(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", help="a recorded schedule or scenario (.yaml)")
    sp.add_argument("--trace", action="store_true", help="print a per-thread timeline")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _run_replay(a: argparse.Namespace) -> int:
    from .cli import EXIT_FAIL, EXIT_OK

    sc = _load(a.file)
    rep = replay(sc)
    if a.trace:
        print_timeline(rep.execution.kernel, title=f"{sc.name} ({a.file})")
    if a.json:
        k = rep.execution.kernel
        print(json.dumps({"file": a.file, "reproduced": rep.reproduced,
                          "divergence": rep.divergence, "checks": rep.checks,
                          "steps": k.step_no, "trace_hash": trace_hash(k.events),
                          "config": sc.config.to_dict(), "preset": preset_of(sc.config),
                          "expected": [v.to_dict() for v in rep.expected_seen()],
                          "first_violation": (rep.execution.violations[0].to_dict()
                                              if rep.execution.violations else None),
                          "violations": [v.to_dict() for v in rep.execution.violations]},
                         sort_keys=True))
    elif rep.reproduced:
        print(f"reproduced: {a.file}: {rep.summary()}")
    else:
        print(f"DIVERGED: {a.file}: {rep.divergence}")
        print(replay_hint(a.file))
    return EXIT_OK if rep.reproduced else EXIT_FAIL


#: Subcommands registered with :mod:`cowenv.cli`.
CLI_COMMANDS = {
    "replay": (_setup_replay, _run_replay, "replay a recorded schedule and check its outcome"),
}


def main(argv: list[str] | None = None) -> int:
    """``python -m cowenv.replay`` = ``cowenv replay``."""
    from .cli import main as cli_main

    return cli_main(["replay", *(sys.argv[1:] if argv is None else argv)])


# ------------------------------------------------------------------------------ batches
_PROBE = "cowenv-hash-probe"

def replay_batch(sources: list[str | dict[str, Any]]) -> list[dict[str, Any]]:
    """Replay many schedules (file paths or scenario data); one summary dict each.

    Each summary has ``reproduced``, ``divergence``, ``trace_hash``, ``steps`` and the
    first ``violation`` signature (or None); a malformed source gets ``error``.
    """
    from .scenario import parse_scenario

    out: list[dict[str, Any]] = []
    for src in sources:
        try:
            sc = load_scenario(src) if isinstance(src, str) else parse_scenario(src)
        except ScenarioError as e:
            out.append({"error": str(e)})
            continue
        rep = replay(sc)
        k = rep.execution.kernel
        vs = rep.execution.violations
        out.append({"name": sc.name, "reproduced": rep.reproduced,
                    "divergence": rep.divergence, "trace_hash": trace_hash(k.events),
                    "steps": k.step_no, "violation": vs[0].signature if vs else None})
    return out


def batch_main() -> None:
    """Replay a batch read from stdin and write the results to stdout, as JSON.

    Input ``{"files": [...]}`` and/or ``{"data": [...]}``; output ``{"hash_probe": …,
    "results": [...]}``. The fidelity test and benchmark run this in a separate process
    with another ``PYTHONHASHSEED`` (``hash_probe`` shows the seed really differs).
    """
    digest = source_digest()
    req = json.load(sys.stdin)
    results = replay_batch(list(req.get("files", [])) + list(req.get("data", [])))
    json.dump({"hash_probe": hash(_PROBE), "source_digest": digest, "results": results},
              sys.stdout)


def source_digest() -> str:
    """Return a SHA-256 over the ``cowenv`` package's Python sources.

    Recording and replaying processes compare it: a schedule recorded by one version of
    the simulator is only expected to replay exactly on the same version.
    """
    import hashlib

    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def replay_in_subprocess(files: list[str] | None = None,
                         data: list[dict[str, Any]] | None = None, *,
                         hash_seed: int = 12345, timeout: float = 600.0
                         ) -> tuple[int, list[dict[str, Any]], str]:
    """Replay schedules in a fresh interpreter with ``PYTHONHASHSEED=hash_seed``.

    Returns:
        ``(hash_probe, results, source_digest)``: the child's ``hash()`` of a fixed
        string (compare it with :func:`hash_probe` to show the seeds differ), the
        :func:`replay_batch` results (files first, then data, in order) and the child's
        :func:`source_digest` (compare it with this process's: the simulator must not
        change between recording and replay).

    Raises:
        RuntimeError: the child failed (its stderr's last line is included).

    """
    import os
    import subprocess

    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    req = json.dumps({"files": files or [], "data": data or []})
    p = subprocess.run([sys.executable, "-c", "from cowenv.replay import batch_main; batch_main()"],
                       input=req, capture_output=True, text=True, env=env, timeout=timeout,
                       check=False)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"replay subprocess exited {p.returncode}: {last}")
    out = json.loads(p.stdout)
    return int(out["hash_probe"]), list(out["results"]), str(out["source_digest"])


def hash_probe() -> int:
    """Return ``hash()`` of the string :func:`batch_main` probes, in this process."""
    return hash(_PROBE)


if __name__ == "__main__":
    sys.exit(main())
