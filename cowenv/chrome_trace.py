"""Export a schedule's event trace as Chrome trace-event JSON (Perfetto, chrome://tracing).

Layout (the JSON Object Format of the Trace Event Format):

* one process track per simulated process (``pid`` = process id) plus ``pid 0`` named
  ``kernel`` holding kswapd (``tid 0``) and a ``scheduler`` track for events that belong
  to no thread (pressure events, teardown checks);
* one thread track per thread (``tid`` = thread id);
* a complete slice (``ph: "X"``) per operation, from its start to its return, with its
  arguments and return value (an operation still running at the end is marked
  ``unfinished``);
* thread-scoped instants (``ph: "i"``) for preemption points (``cat: point``) and lock
  events (``cat: lock``: acquire, release, wait, downgrade), allocation failures
  (``cat: event``);
* a global instant (``s: "g"``) at each violation, plus an instant on the thread that
  was running.

Timestamps are deterministic: scheduler step ``k`` spans ``((k-1)·U, k·U]`` with
:data:`STEP_US` = U microseconds; the preemption point (or return) that ends step ``k``
is at ``k·U`` and the lock events before it are spread evenly inside the step. An
operation started after step ``s`` begins at ``s·U``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text
from .kernel import KSWAPD_TID
from .kernel.trace import Event, trace_hash
from .replay import Execution, execute

#: Microseconds per scheduler step.
STEP_US = 1000
#: Chrome ``tid`` of the scheduler track (events of no thread); above any thread id.
SCHEDULER_TID = 10_000


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(a): _jsonable(x) for a, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, bool | str | float):
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)


def _times(events: list[Event]) -> list[int]:
    """Timestamp (µs) of each event (see module docstring)."""
    ts = [0] * len(events)
    i = 0
    while i < len(events):
        j = i
        while j < len(events) and events[j].step == events[i].step:
            j += 1
        k = events[i].step
        inside = [x for x in range(i, j) if events[x].kind != "start"
                  and not (events[x].kind == "event" and events[x].tid < 0)]
        for x in range(i, j):
            ts[x] = k * STEP_US
        # events of step k (other than between-step starts/pressure events) in ((k-1)U, kU]
        n = len(inside)
        for rank, x in enumerate(inside):
            ts[x] = (k - 1) * STEP_US + (rank + 1) * STEP_US // n if k > 0 else 0
        i = j
    return ts


def chrome_trace(ex: Execution, name: str = "") -> dict[str, Any]:
    """Build the trace-event document for an execution run with ``track_pids=True``.

    Args:
        ex: The execution (its kernel must have tracing on).
        name: Scenario name (stored in ``otherData``).

    Returns:
        A JSON-able dict ``{traceEvents, displayTimeUnit, otherData}``.

    """
    k = ex.kernel
    evs = k.events
    pids = ex.event_pids if len(ex.event_pids) == len(evs) else [
        (k.threads[e.tid].pid if e.tid in k.threads else 0) for e in evs]
    ts = _times(evs)
    out: list[dict[str, Any]] = []
    tracks: dict[tuple[int, int], str] = {}

    def track(i: int) -> tuple[int, int]:
        e = evs[i]
        if e.tid < 0:
            key = (0, SCHEDULER_TID)
            tracks.setdefault(key, "scheduler")
        else:
            key = (0 if e.tid == KSWAPD_TID else pids[i], e.tid)
            tracks.setdefault(key, "kswapd" if e.tid == KSWAPD_TID else f"t{e.tid}")
        return key

    open_ops: dict[tuple[int, int], dict[str, Any]] = {}
    end_ts = k.step_no * STEP_US
    for i, e in enumerate(evs):
        pid, tid = track(i)
        base = {"pid": pid, "tid": tid, "ts": ts[i]}
        if e.kind == "start":
            sl = {"name": e.label, "cat": "op", "ph": "X", **base, "dur": 0,
                  "args": {"args": _jsonable(e.data), "step": e.step}}
            open_ops[(pid, tid)] = sl
            out.append(sl)
        elif e.kind == "end":
            sl = open_ops.pop((pid, tid), None)
            if sl is not None:
                sl["dur"] = ts[i] - sl["ts"]
                sl["args"]["result"] = _jsonable(e.data)
        elif e.kind == "point":
            out.append({"name": e.label, "cat": "point", "ph": "i", "s": "t", **base})
        elif e.kind in ("lock", "unlock", "wait", "downgrade"):
            mode = f" ({e.data})" if e.data else ""
            out.append({"name": f"{e.kind} {e.label}{mode}", "cat": "lock", "ph": "i",
                        "s": "t", **base})
        elif e.kind == "violation":
            args = {"message": str(e.data), "step": e.step}
            out.append({"name": f"violation {e.label}", "cat": "violation", "ph": "i",
                        "s": "g", **base, "args": args})
            out.append({"name": f"violation {e.label}", "cat": "violation", "ph": "i",
                        "s": "t", **base, "args": args})
        else:
            out.append({"name": f"{e.kind} {e.label}", "cat": "event", "ph": "i", "s": "t",
                        **base, "args": {"data": _jsonable(e.data)}})
    for sl in open_ops.values():
        sl["dur"] = max(0, end_ts - sl["ts"])
        sl["args"]["unfinished"] = True
    meta: list[dict[str, Any]] = []
    for pid in sorted({p for p, _ in tracks}):
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                     "args": {"name": "kernel" if pid == 0 else f"process {pid}"}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                     "args": {"sort_index": pid}})
    for (pid, tid), tname in sorted(tracks.items()):
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                     "args": {"name": tname}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                     "args": {"sort_index": tid}})
    other = {"scenario": name, "variant": k.config.variant, "flaws": list(k.config.flaws),
             "scheduler_steps": k.step_no, "step_us": STEP_US,
             "trace_hash": trace_hash(evs),
             "violations": [v.signature for v in ex.violations]}
    if ex.error is not None:
        other["illegal_step"] = {"index": ex.error[0], "message": ex.error[1]}
    return {"traceEvents": meta + out, "displayTimeUnit": "ms", "otherData": other}


def validate_chrome_trace(doc: Any) -> list[str]:
    """Check a document against the trace-event format as this module uses it.

    Returns:
        Problems found (empty when the document is well-formed): required keys and
        types per phase, non-negative durations, and no overlapping slices on a track.

    """
    errs: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["top level: expected an object with a traceEvents list"]
    slices: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for n, e in enumerate(doc["traceEvents"]):
        w = f"traceEvents[{n}]"
        if not isinstance(e, dict):
            errs.append(f"{w}: expected an object")
            continue
        ph = e.get("ph")
        if ph not in ("X", "B", "E", "i", "I", "M"):
            errs.append(f"{w}.ph: unexpected phase {ph!r}")
            continue
        for key in ("name", "pid", "tid"):
            if key not in e:
                errs.append(f"{w}.{key}: missing")
        if not isinstance(e.get("name"), str):
            errs.append(f"{w}.name: expected a string")
        if not all(isinstance(e.get(x), int) and not isinstance(e.get(x), bool)
                   for x in ("pid", "tid")):
            errs.append(f"{w}: pid and tid must be integers")
        if ph == "M":
            if not isinstance(e.get("args"), dict) or not e["args"]:
                errs.append(f"{w}.args: metadata needs args")
            continue
        if not isinstance(e.get("ts"), int | float) or e["ts"] < 0:
            errs.append(f"{w}.ts: expected a non-negative number")
            continue
        if ph == "X":
            d = e.get("dur")
            if not isinstance(d, int | float) or d < 0:
                errs.append(f"{w}.dur: expected a non-negative number")
                continue
            slices.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + d))
        if ph in ("i", "I") and e.get("s", "t") not in ("g", "p", "t"):
            errs.append(f"{w}.s: expected g, p or t")
    for key, sl in slices.items():
        sl.sort()
        for (a0, a1), (b0, _b1) in zip(sl, sl[1:], strict=False):
            if b0 < a1:
                errs.append(f"track {key}: slices overlap at {a0}..{a1} and {b0}")
                break
    return errs


def write_json(doc: dict[str, Any], path: str | Path, *, mkdir: bool = False) -> None:
    """Write ``doc`` as JSON atomically (temp file + rename).

    Args:
        doc: The trace document.
        path: Destination file.
        mkdir: Create missing folders (off: a user's ``-o`` names an existing folder).
    """
    atomic_write_text(path, json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n",
                      mkdir=mkdir)


# ------------------------------------------------------------------------------ CLI
def _setup_trace(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", help="a schedule or scenario (.yaml)")
    sp.add_argument("-o", "--output", required=True, help="Chrome trace-event JSON to write")


def _run_trace(a: argparse.Namespace) -> int:
    from .cli import EXIT_OK, BadInput
    from .replay import _check_output, _load

    sc = _load(a.file)
    _check_output(a.output)
    ex = execute(sc.config, sc.steps, trace=True, track_pids=True)
    doc = chrome_trace(ex, name=sc.name)
    try:
        write_json(doc, a.output)
    except OSError as e:
        raise BadInput(f"{a.output}: cannot write ({e.strerror})") from None
    n = len(doc["traceEvents"])
    note = f"; stopped at illegal step {ex.error[0]}: {ex.error[1]}" if ex.error else ""
    print(f"wrote {a.output}: {n} trace events, {ex.kernel.step_no} scheduler steps{note} "
          "(open in https://ui.perfetto.dev or chrome://tracing)")
    return EXIT_OK


#: Subcommands registered with :mod:`cowenv.cli`.
CLI_COMMANDS = {
    "trace": (_setup_trace, _run_trace, "export a schedule's trace as Chrome trace JSON"),
}
