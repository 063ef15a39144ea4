"""Delta debugging of schedules: shrink a violating schedule to a 1-minimal one.

:func:`minimize` runs Zeller and Hildebrandt's *ddmin* ("Simplifying and Isolating
Failure-Inducing Input", TSE 2002) over the steps of a scenario. A candidate (a
subsequence of the steps, order kept) is *interesting* when running it reports every
target signature (``kind@site``; the step number may change). The kernel is
deterministic, so each candidate is run once: results are cached by the tuple of step
indices, runs have tracing off and stop as soon as the targets have been reported.

Rule for steps that become illegal after a removal — **skip, then normalise**:

* A candidate is run *leniently*: a step that cannot be carried out at that point is
  skipped as a no-op instead of failing the run. ``start``/``do`` on a thread that is
  not idle (busy, exited or not created yet), or whose arguments name a result that is
  no longer bound, is skipped; ``step``/``until``/``finish`` on a thread that is not
  runnable (idle, blocked, exited, unknown) is skipped (``run`` is lenient already:
  it steps while runnable and is dropped when it ran nothing). A multi-point step that becomes
  illegal part-way keeps the part already done (``step: 3`` that could do 2 counts as
  ``step: 2``; ``until`` that never reaches its label, or ``do``/``finish`` whose thread
  blocks, keep the points they ran). An ``expect`` that names a result no longer bound is
  dropped (its check cannot be made). ``event`` steps are always legal.
* The result is then *normalised*: skipped steps are dropped and partial ones rewritten
  to what actually ran (a blocked ``do`` becomes ``start`` + ``step: m``), so the output
  runs under the strict scenario runner with no illegal step and gives the very same
  trace as the lenient run. A final pass removes each remaining step in turn (same
  lenient rule) and keeps any removal that still shows the violation, until none does:
  the output is **1-minimal** under this rule.

Candidates are never rejected for containing an illegal step: rejecting them would stop
ddmin from removing a ``start`` without every ``step`` of that operation in the same
chunk, and the minimiser would stall on recorded (start/step) schedules.

Both recorded schedules (``start``/``step``/``event``) and hand-written ones (``do``,
``until``, ``finish``, ``run``, with ``as``/``expect``/``check``) are minimised as written: each
step is one unit, so a hand-written ``do`` stays one step.

:func:`pad_schedule` builds the benchmark input: a schedule padded with random steps that
do not matter for its violation (accesses and mappings in a far-away region by idle
threads, whole or interleaved), each insertion verified to keep the schedule valid and
violating.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .kernel import KSWAPD_TID, Kernel, make_kernel
from .kernel.config import PRESETS, KernelConfig
from .kernel.ops import ERRNO_NAMES
from .kernel.trace import trace_hash
from .replay import execute, outcome_of, readable_args
from .scenario import (
    MAX_UNTIL,
    Expectation,
    Scenario,
    StepError,
    apply_step,
    matches,
    override_config,
    resolve_tid,
)

#: Step kinds that run a thread (used to count context switches).
RUNNING_KINDS = ("do", "step", "until", "finish", "run")


class NotReproducible(Exception):
    """The schedule does not show the violation to keep (nothing to minimise)."""


# ------------------------------------------------------------------------------ ddmin
def ddmin(n: int, test: Callable[[Sequence[int]], bool]) -> list[int]:
    """Zeller's ddmin over the indices ``0..n-1``.

    Args:
        n: Number of units; ``test(range(n))`` must hold.
        test: Whether a subsequence of the indices (increasing) is still failing.

    Returns:
        A subsequence for which ``test`` holds and removing any one index fails (the
        last round tests every complement of a single index).

    """
    cur = list(range(n))
    g = 2
    while len(cur) >= 2:
        g = min(g, len(cur))
        size = len(cur) / g
        chunks = [cur[int(i * size):int((i + 1) * size)] for i in range(g)]
        chunks = [c for c in chunks if c]
        reduced = False
        for c in chunks:  # reduce to subset
            if len(c) < len(cur) and test(c):
                cur, g, reduced = c, 2, True
                break
        if not reduced:
            for j in range(len(chunks)):  # reduce to complement
                comp = [x for i, c in enumerate(chunks) if i != j for x in c]
                if test(comp):
                    cur, g, reduced = comp, max(g - 1, 2), True
                    break
        if not reduced:
            if g >= len(cur):
                break
            g = min(2 * g, len(cur))
    if len(cur) == 1 and test([]):
        cur = []
    return cur


# ------------------------------------------------------------------------------ lenient
@dataclass
class LenientRun:
    """A lenient run: the kernel afterwards and the steps that actually took effect."""

    kernel: Kernel
    effective: list[dict[str, Any]]
    stopped: bool


def _names_in(s: dict[str, Any]) -> list[str]:
    """Bound names a start/do step's arguments use (only these argument kinds may)."""
    return [v for a, v in (s.get("args") or {}).items()
            if a in ("pin", "pid", "addr", "nr") and isinstance(v, str) and v.isidentifier()]


def _expect_names(ev: Any) -> list[str]:
    """Bound names an ``expect`` value uses (not ``zero`` and not an errno)."""
    if isinstance(ev, dict):
        return [ev["not"]] if "not" in ev else []
    if (isinstance(ev, str) and ev not in ("zero", "ok", "any-errno")
            and ev.lstrip("-") not in ERRNO_NAMES.values()):
        return [ev]
    return []


def run_lenient(config: KernelConfig, steps: Sequence[dict[str, Any]], *,
                trace: bool = False, stop_on: set[str] | None = None,
                oracles: bool = True) -> LenientRun:
    """Run ``steps`` under the skip rule (see module docstring).

    Args:
        config: Kernel configuration.
        steps: Parsed scenario steps.
        trace: Record the event trace.
        stop_on: Stop once all of these signatures have been reported.
        oracles: Attach the oracles (needed to see violations).

    Returns:
        The kernel and the normalised steps that took effect (strictly runnable).

    """
    k = make_kernel(config, trace=trace, oracles=oracles)
    names: dict[str, Any] = {}
    pending: dict[int, dict] = {}
    out: list[dict[str, Any]] = []

    def one(tid: int, i: int) -> None:
        apply_step(k, {"tid": tid, "step": 1}, names, pending, i)

    def runnable(tid: int) -> bool:
        t = k.threads.get(tid)
        return t is not None and k.is_runnable(t)

    for i, s in enumerate(steps):
        if stop_on and stop_on <= k.signatures:
            return LenientRun(k, out, True)
        if "event" in s:
            if s.get("tid") is not None:  # a thread's fail-nth: only while it lives
                try:
                    et = resolve_tid(s["tid"], names)
                except StepError:
                    continue
                t = k.threads.get(et)
                if t is None or t.exited:
                    continue
                s = dict(s, tid=et)
            apply_step(k, s, names, pending, i)
            out.append(dict(s))
            continue
        try:  # a fork/clone ``as`` name: its thread id, or skip if the fork did not happen
            tid = resolve_tid(s["tid"], names)
        except StepError:
            continue
        if tid != s["tid"]:
            s = dict(s, tid=tid)
        if "do" in s or "start" in s:
            op = s.get("do") or s.get("start")
            if not k.can_start(tid, op) or any(n not in names for n in _names_in(s)):
                continue
            spec: dict[str, Any] = {}
            for key, v in s.items():
                spec["start" if key == "do" else key] = v
            if "expect" in spec and any(n not in names for n in _expect_names(spec["expect"])):
                spec.pop("expect")
                spec.pop("check", None)
            try:
                apply_step(k, spec, names, pending, i)
            except StepError:
                continue  # arguments invalid once resolved (e.g. a name bound to -EFAULT)
            if "start" in s:
                out.append(spec)
                continue
            m = 0
            while k.threads[tid].gen is not None and runnable(tid) and m < MAX_UNTIL:
                one(tid, i)
                m += 1
            if k.threads[tid].gen is None:
                d = {("do" if key == "start" else key): v for key, v in spec.items()}
                out.append(d)
            else:
                out.append(spec)
                if m:
                    out.append({"tid": tid, "step": m})
            continue
        m = 0
        done = False
        if "step" in s:
            while m < s["step"] and runnable(tid):
                one(tid, i)
                m += 1
            done = m == s["step"]
        elif "until" in s:
            while runnable(tid) and m < MAX_UNTIL:
                one(tid, i)
                m += 1
                if k.threads[tid].label == s["until"]:
                    done = True
                    break
        elif "finish" in s:
            while runnable(tid) and m < MAX_UNTIL:
                one(tid, i)
                m += 1
            t = k.threads.get(tid)
            done = m > 0 and t is not None and t.gen is None
        elif "run" in s:  # already lenient: steps while runnable
            while runnable(tid) and m < MAX_UNTIL:
                one(tid, i)
                m += 1
            done = m > 0
        else:  # a step kind this module does not know: strict, skipped if illegal
            try:
                apply_step(k, s, names, pending, i)
                out.append(dict(s))
            except StepError:
                pass
            continue
        if done:
            out.append(dict(s))
        elif m:
            out.append({"tid": tid, "step": m})
    return LenientRun(k, out, bool(stop_on and stop_on <= k.signatures))


def context_switches(steps: Sequence[dict[str, Any]]) -> int:
    """Count changes of running thread between consecutive steps that run a thread."""
    n, last = 0, None
    for s in steps:
        if any(key in s for key in RUNNING_KINDS):
            if last is not None and s["tid"] != last:
                n += 1
            last = s["tid"]
    return n


# ------------------------------------------------------------------------------ minimise
@dataclass
class MinimizeResult:
    """Outcome of :func:`minimize`.

    Attributes:
        data: The minimised scenario as plain data (write it with ``save_scenario``).
        signature: The kept signature(s), comma-separated.
        original_len: Steps in the input.
        minimal_len: Steps in the output.
        context_switches: Context switches left in the output.
        tests: Candidate runs made (cache misses).
        cache_hits: Candidate results served from the cache.
        seconds: Wall time.
        expect_text: The output's expectation, as text.
        complete: False when ``time_limit`` stopped the search early: the output still
            shows the violation (every reduction kept was tested) but may not be
            1-minimal.

    """

    data: dict[str, Any]
    signature: str
    original_len: int
    minimal_len: int
    context_switches: int
    tests: int
    cache_hits: int
    seconds: float
    expect_text: str
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the scenario data)."""
        return {"signature": self.signature, "original_len": self.original_len,
                "minimal_len": self.minimal_len, "context_switches": self.context_switches,
                "tests": self.tests, "cache_hits": self.cache_hits,
                "seconds": round(self.seconds, 3), "expect": self.expect_text}


class _Oracle:
    """Cached interestingness test over subsequences of a fixed step list."""

    def __init__(self, config: KernelConfig, steps: list[dict[str, Any]], targets: set[str],
                 deadline: float | None = None):
        self.config, self.steps, self.targets = config, steps, targets
        self.cache: dict[tuple[int, ...], bool] = {}
        self.tests = 0
        self.hits = 0
        self.deadline = deadline
        self.expired = False

    def __call__(self, idx: Sequence[int]) -> bool:
        key = tuple(idx)
        r = self.cache.get(key)
        if r is not None:
            self.hits += 1
            return r
        if self.deadline is not None and time.process_time() > self.deadline:
            # Out of time: every untested candidate counts as "not failing", so ddmin
            # ends at once with the smallest failing subsequence it has verified.
            self.expired = True
            return False
        self.tests += 1
        run = run_lenient(self.config, [self.steps[i] for i in key], stop_on=self.targets)
        r = self.targets <= run.kernel.signatures
        self.cache[key] = r
        return r


def _one_by_one(config: KernelConfig, steps: list[dict[str, Any]], targets: set[str],
                counter: list[int], deadline: float | None = None) -> list[dict[str, Any]]:
    """Remove single steps while the violation stays; return a normalised 1-minimal list.

    Past ``deadline`` (``time.process_time``) it stops removing: the list is then
    normalised and still failing, but not necessarily 1-minimal.
    """
    cur = run_lenient(config, steps, stop_on=targets).effective
    j = 0
    for _ in range(100_000):
        if j >= len(cur) or (deadline is not None and time.process_time() > deadline):
            break
        cand = cur[:j] + cur[j + 1:]
        counter[0] += 1
        run = run_lenient(config, cand, stop_on=targets)
        if targets <= run.kernel.signatures and len(run.effective) < len(cur):
            cur = run.effective
            j = 0  # re-check from the start: a removal can make earlier steps removable
        else:
            j += 1
    return cur


def minimize(sc: Scenario, signatures: list[str] | None = None,
             time_limit: float | None = None) -> MinimizeResult:
    """Shrink ``sc`` to a 1-minimal schedule that still shows the same violation(s).

    Args:
        sc: The scenario (recorded or hand-written).
        signatures: ``kind@site`` to keep (default: those of ``sc.expect``).
        time_limit: CPU seconds of search at most (this process's ``process_time``, so
            that a loaded machine does not shrink the search; None: no limit). When they
            run out, the smallest schedule verified so far is returned (``complete``
            False); it still shows the violation and replays strictly.

    Returns:
        The minimised scenario and statistics.

    Raises:
        NotReproducible: ``sc`` does not show the signatures under the skip rule.

    """
    t0 = time.perf_counter()
    deadline = None if time_limit is None else time.process_time() + float(time_limit)
    targets = set(signatures or [f"{v['kind']}@{v['site']}" for v in sc.expect.violations])
    if not targets:
        raise NotReproducible("no violation to keep (expect: violation: null)")
    cfg = sc.config
    full = run_lenient(cfg, sc.steps, stop_on=targets)
    if not targets <= full.kernel.signatures:
        seen = ", ".join(sorted(full.kernel.signatures)) or "none"
        raise NotReproducible(f"expected {', '.join(sorted(targets))}, observed {seen}")
    # Steps after the one that completed the violation cannot matter.
    prefix = len(sc.steps)
    probe = execute(cfg, sc.steps, trace=False, stop_on=targets)
    if probe.error is None and probe.stopped:
        prefix = probe.executed
    steps = list(sc.steps[:prefix])
    oracle = _Oracle(cfg, steps, targets)
    if not oracle(range(len(steps))):  # pragma: no cover - guarded above
        steps, oracle = list(sc.steps), _Oracle(cfg, list(sc.steps), targets)
    oracle.deadline = deadline
    keep = ddmin(len(steps), oracle)
    counter = [0]
    final = _one_by_one(cfg, [steps[i] for i in keep], targets, counter, deadline)
    complete = not oracle.expired and (deadline is None or time.process_time() <= deadline)
    # Strict verification run of the output (also yields the new expectation step).
    ex = execute(cfg, final, trace=True)
    if ex.error is not None or not targets <= ex.kernel.signatures:  # pragma: no cover
        raise RuntimeError(f"minimised schedule does not replay strictly: {ex.error}")
    first = {}
    for v in ex.violations:
        first.setdefault(v.signature, v)
    exp_list = [{"kind": first[s].kind, "site": first[s].site, "step": int(first[s].step)}
                for s in sorted(targets, key=lambda s: first[s].step)]
    expect = {"violation": exp_list[0] if len(exp_list) == 1 else exp_list}
    data = _output_data(sc, final, expect, ex)
    return MinimizeResult(
        data=data, signature=", ".join(sorted(targets)), original_len=len(sc.steps),
        minimal_len=len(final), context_switches=context_switches(final),
        tests=oracle.tests + counter[0] + 2, cache_hits=oracle.hits,
        seconds=time.perf_counter() - t0,
        expect_text=Expectation(exp_list).describe(), complete=complete)


def _output_data(sc: Scenario, steps: list[dict[str, Any]], expect: dict[str, Any],
                 ex: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"version": sc.version, "name": f"{sc.name}-min"}
    desc = f"Minimised by `cowenv minimize` from {sc.name} ({len(sc.steps)} -> {len(steps)} steps)."
    d["description"] = (sc.description.strip() + "\n" + desc) if sc.description else desc
    d["config"] = sc.config.to_dict()
    d["seed"] = sc.seed
    d["steps"] = [_readable(s) for s in steps]
    d["expect"] = expect
    ebv = {}
    for pre, e in sc.expect_by_variant.items():
        cfg = override_config(sc.config, pre, None)
        if pre in PRESETS and cfg != sc.config:
            r = execute(cfg, steps, trace=False)
            if r.error is None and matches(e, r.violations) and not r.kernel.defects:
                ebv[pre] = e.to_data()
    if ebv:
        d["expect_by_variant"] = ebv
    d["outcome"] = outcome_of(ex.kernel, ex.labels)
    return d


def _readable(s: dict[str, Any]) -> dict[str, Any]:
    s = {key: v for key, v in s.items() if not key.startswith("_")}
    op = s.get("do") or s.get("start")
    if op and "args" in s:
        if s["args"]:
            s["args"] = readable_args(op, dict(s["args"]))
        else:
            del s["args"]
    return s


# ------------------------------------------------------------------------------ padding
#: Base of the far-away region padding steps use (its own page tables, far from the
#: addresses scenarios use).
PAD_BASE = 0x4000_0000


def _thread_map(cfg: KernelConfig, steps: list[dict[str, Any]]
                ) -> tuple[list[list[int]], bool, set[str]]:
    """Idle user tids before each step (and at the end) of a strict run."""
    idle: list[list[int]] = []
    k = make_kernel(cfg, trace=False)
    names: dict[str, Any] = {}
    pending: dict[int, dict] = {}
    for i, s in enumerate(steps):
        idle.append([t for t in k.idle_tids() if t != KSWAPD_TID])
        try:
            apply_step(k, s, names, pending, i)
        except StepError:
            return idle, False, set(k.signatures)
    idle.append([t for t in k.idle_tids() if t != KSWAPD_TID])
    return idle, True, set(k.signatures)


def pad_schedule(sc: Scenario, n: int, seed: int, *, max_attempts: int = 2000
                 ) -> list[dict[str, Any]]:
    """Insert at least ``n`` random irrelevant steps into ``sc``'s schedule.

    Padding steps are reads, writes and mappings of a far-away region (:data:`PAD_BASE`)
    by threads that are idle at that point, either as one ``do`` or as a ``start`` whose
    ``step: 1`` points are interleaved with the following steps. Each insertion is kept
    only if the padded schedule still runs strictly and still shows ``sc``'s expected
    signatures (so padding is valid and irrelevant by construction).

    Returns:
        The padded steps (parsed form).

    Raises:
        NotReproducible: ``sc`` itself does not show its expected violation.

    """
    rng = np.random.default_rng(seed)
    targets = {f"{v['kind']}@{v['site']}" for v in sc.expect.violations}
    steps = list(sc.steps)
    idle, ok, sigs = _thread_map(sc.config, steps)
    if not ok or not targets <= sigs:
        raise NotReproducible(f"{sc.name}: does not show {', '.join(sorted(targets)) or '-'}")
    ps = sc.config.page_size
    added = 0
    for _ in range(max_attempts):
        if added >= n:
            break
        pos = int(rng.integers(len(steps) + 1))
        if not idle[pos]:
            continue
        tid = idle[pos][int(rng.integers(len(idle[pos])))]
        addr = PAD_BASE + int(rng.integers(16)) * ps
        r = rng.random()
        if r < 0.15:
            group = [(0, {"tid": tid, "do": "mmap",
                          "args": {"addr": PAD_BASE, "length": 16 * ps}})]
        elif r < 0.6:
            group = [(0, {"tid": tid, "do": ("read", "write")[int(rng.integers(2))],
                          "args": {"addr": addr}})]
        else:
            op = ("read", "write")[int(rng.integers(2))]
            group = [(0, {"tid": tid, "start": op, "args": {"addr": addr}})]
            at = 0
            for _ in range(int(rng.integers(1, 6))):
                at += int(rng.integers(0, 3))
                group.append((at, {"tid": tid, "step": 1}))
        cand = list(steps)
        shift = 0
        for off, s in group:  # offsets are relative to the original positions after pos
            p = min(pos + off, len(steps)) + shift
            cand.insert(p, s)
            shift += 1
        new_idle, ok, sigs = _thread_map(sc.config, cand)
        if ok and targets <= sigs:
            steps, idle = cand, new_idle
            added += len(group)
    return steps


def padded_scenario(sc: Scenario, n: int, seed: int) -> Scenario:
    """Return ``sc`` padded by :func:`pad_schedule` (expectation without step numbers)."""
    steps = pad_schedule(sc, n, seed)
    exp = Expectation([{"kind": v["kind"], "site": v["site"]} for v in sc.expect.violations])
    return Scenario(f"{sc.name}-padded", sc.description, sc.config, steps, exp,
                    dict(sc.expect_by_variant), sc.seed, "", sc.version, {})


# ------------------------------------------------------------------------------ CLI
def _setup_minimize(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", help="a schedule whose expectation names a violation")
    sp.add_argument("-o", "--output", required=True, help="where to write the minimised schedule")
    sp.add_argument("--signature", help="kind@site to keep (default: the file's expectation)")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _run_minimize(a: argparse.Namespace) -> int:
    from .cli import EXIT_FAIL, EXIT_OK, BadInput
    from .replay import _check_output, _load, replay_hint
    from .scenario import save_scenario

    sc = _load(a.file)
    _check_output(a.output)
    sigs = None
    if a.signature is not None:
        if not re.fullmatch(r"[a-z-]+@\S+", a.signature):
            raise BadInput(f"--signature: expected kind@site, got {a.signature!r}")
        sigs = [a.signature]
    elif not sc.expect.violations:
        raise BadInput(f"{a.file}: expect.violation: expected a violation to keep "
                       "(nothing to minimise for violation: null; or pass --signature)")
    try:
        res = minimize(sc, sigs)
    except NotReproducible as e:
        print(f"DOES NOT REPRODUCE: {a.file}: {e}")
        print(replay_hint(a.file))
        return EXIT_FAIL
    try:
        save_scenario(res.data, a.output, mkdir=False)
    except OSError as e:
        raise BadInput(f"{a.output}: cannot write ({e.strerror})") from None
    if a.json:
        print(json.dumps(res.to_dict() | {"file": a.file, "output": a.output}, sort_keys=True))
    else:
        print(f"minimised {a.file}: {res.signature}")
        print(f"  steps: {res.original_len} -> {res.minimal_len}"
              f"  (context switches left: {res.context_switches})")
        print(f"  1-minimal: removing any one of the {res.minimal_len} steps loses the "
              f"violation ({res.tests} runs, {res.cache_hits} cached, {res.seconds:.2f} s)")
        print(f"  expect: {res.expect_text}")
        print(f"  wrote {a.output}; {replay_hint(a.output)}")
    return EXIT_OK


#: Subcommands registered with :mod:`cowenv.cli`.
CLI_COMMANDS = {
    "minimize": (_setup_minimize, _run_minimize, "delta-debug a schedule to a 1-minimal one"),
}


__all__ = ["ddmin", "minimize", "run_lenient", "context_switches", "pad_schedule",
           "padded_scenario", "MinimizeResult", "NotReproducible", "trace_hash"]
