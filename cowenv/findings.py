"""Findings deduplicated by violation signature, stored as runnable scenario files.

A campaign hands every violating schedule to :meth:`FindingStore.add`. The first schedule
of each signature (``kind@site``) is minimised (:func:`cowenv.minimize.minimize`) and
written atomically as ``DIR/<signature-slug>.yaml``, a scenario that
``cowenv replay`` reproduces and that can be copied into ``scenarios/`` as it is; later
schedules with a known signature only bump its hit count. ``DIR/index.json`` (written
atomically) lists the findings in discovery order. On start the store reads the
``*.yaml`` files already in ``DIR`` (and the hit counts of ``index.json``), so a resumed
campaign keeps its findings and does not write them again.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text
from .scenario import Scenario, ScenarioError, load_scenario, parse_scenario, save_scenario

INDEX_NAME = "index.json"


def signature_slug(sig: str) -> str:
    """File-name form of a signature: ``isolation@user_access`` -> ``isolation--user_access``."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", sig.replace("@", "--")).strip("-.")
    return s[:120] or hashlib.sha1(sig.encode()).hexdigest()[:12]


def _signature_of(sc: Scenario) -> str | None:
    if not sc.expect.violations:
        return None
    v = sc.expect.violations[0]
    return f"{v['kind']}@{v['site']}"


class FindingStore:
    """One file per violation signature in a directory.

    Args:
        directory: Where findings live (created if missing).
        minimise: Minimise each new finding before writing it (falls back to the
            schedule as given when it does not reproduce under the minimiser).

    Attributes:
        findings: ``signature -> {file, steps, original_steps, hits, minimised, order}``.
        errors: One line per ``*.yaml`` file in the directory that could not be read.

    """

    def __init__(self, directory: str | Path, *, minimise: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.minimise = minimise
        self.findings: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        for p in sorted(self.dir.glob("*.yaml")):
            try:
                sc = load_scenario(p)
            except ScenarioError as e:
                self.errors.append(str(e))
                continue
            sig = _signature_of(sc)
            if sig is not None and sig not in self.findings:
                self.findings[sig] = {"file": p.name, "steps": len(sc.steps),
                                      "original_steps": len(sc.steps), "hits": 1,
                                      "minimised": None, "order": len(self.findings)}
        self._merge_index()

    def _merge_index(self) -> None:
        p = self.dir / INDEX_NAME
        try:
            idx = json.loads(p.read_text())
            rows = idx["findings"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("signature") in self.findings:
                f = self.findings[row["signature"]]
                for key in ("hits", "original_steps", "minimised", "order"):
                    if key in row:
                        f[key] = row[key]

    def __contains__(self, signature: str) -> bool:
        return signature in self.findings

    def __len__(self) -> int:
        return len(self.findings)

    @property
    def signatures(self) -> list[str]:
        """Known signatures in discovery order."""
        return sorted(self.findings, key=lambda s: self.findings[s]["order"])

    def path_for(self, signature: str) -> Path:
        """Where the finding of ``signature`` is (or would be) stored."""
        if signature in self.findings:
            return self.dir / self.findings[signature]["file"]
        slug = signature_slug(signature)
        taken = {f["file"] for f in self.findings.values()}
        if f"{slug}.yaml" in taken or (self.dir / f"{slug}.yaml").exists():
            slug += "-" + hashlib.sha1(signature.encode()).hexdigest()[:8]
        return self.dir / f"{slug}.yaml"

    def add(self, schedule: Scenario | dict[str, Any], signature: str | None = None
            ) -> Path | None:
        """Store ``schedule`` if its signature is new.

        Args:
            schedule: A recorded schedule (scenario data or a parsed scenario) whose
                expectation names its violation.
            signature: ``kind@site`` to file it under (default: its first expected
                violation).

        Returns:
            The file written, or None when the signature was already known (its hit
            count is bumped; call :meth:`flush` to persist counts).

        Raises:
            ValueError: the schedule names no violation, or is not a valid scenario.

        """
        sc = schedule if isinstance(schedule, Scenario) else parse_scenario(schedule)
        sig = signature or _signature_of(sc)
        if sig is None:
            raise ValueError("finding: expect.violation: expected a violation to file")
        if sig in self.findings:
            self.findings[sig]["hits"] += 1
            return None
        data: dict[str, Any] = sc.to_data()
        minimised = False
        if self.minimise:
            from .minimize import NotReproducible, minimize

            try:
                res = minimize(sc, [sig])
                data, minimised = res.data, True
            except NotReproducible:
                pass
        path = self.path_for(sig)
        save_scenario(data, path)
        self.findings[sig] = {"file": path.name, "steps": len(data["steps"]),
                              "original_steps": len(sc.steps), "hits": 1,
                              "minimised": minimised, "order": len(self.findings)}
        self.flush()
        return path

    def flush(self) -> None:
        """Write ``index.json`` atomically."""
        rows = [{"signature": s, **self.findings[s]} for s in self.signatures]
        atomic_write_text(self.dir / INDEX_NAME,
                      json.dumps({"version": 1, "findings": rows}, indent=1, sort_keys=True)
                      + "\n")

    def __enter__(self) -> FindingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
