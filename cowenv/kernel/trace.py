"""Violations and the event trace.

Not a kernel file: the simulation's own record. Every preemption point, lock event and
violation is an :class:`Event`; :func:`trace_hash` fingerprints a run for replay.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

#: Violation kinds (BRIEF §5), plus ``simulator`` for Python exceptions inside the
#: simulation, which are defects of cowenv itself, never kernel findings.
KINDS = ("isolation", "pin-coherence", "accounting", "memory-safety", "shared-table-write",
         "lock-discipline", "deadlock", "syscall-contract", "selftest", "simulator")


@dataclass(frozen=True)
class Violation:
    """One oracle finding.

    Attributes:
        kind: One of :data:`KINDS`.
        site: The kernel function (or accessor) where it was observed.
        message: What went wrong, with the numbers.
        step: Scheduler step at which it was observed.
        tid: Thread that was running (0 = kswapd, -1 = none / teardown check).
    """

    kind: str
    site: str
    message: str
    step: int
    tid: int

    @property
    def signature(self) -> str:
        """Stable deduplication key: ``kind@site``."""
        return f"{self.kind}@{self.site}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, with the signature."""
        d = asdict(self)
        d["signature"] = self.signature
        return d


class Event(NamedTuple):
    """A trace event (a named tuple: cheap to create on every step).

    Attributes:
        step: Scheduler step.
        tid: Thread id (-1 for events that belong to no thread).
        kind: ``start`` (an operation began), ``point`` (stopped at a preemption point),
            ``end`` (operation returned), ``lock``/``unlock``/``wait`` (lock events),
            ``event`` (pressure event), ``violation``, ``out`` (an operation's output
            parameters just before its ``end``: ``move_pages``'s status array).
        label: Preemption label, lock name, operation name or violation signature.
        data: Small plain-data payload (operation args, return value, …).
    """

    step: int
    tid: int
    kind: str
    label: str
    data: Any = None

    def to_list(self) -> list[Any]:
        """Compact canonical form used for hashing and export."""
        return [self.step, self.tid, self.kind, self.label, self.data]


def trace_hash(events: list[Event]) -> str:
    """SHA-256 of the canonical JSON of a trace (stable across processes)."""
    h = hashlib.sha256()
    for e in events:
        h.update(json.dumps(e.to_list(), sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()
