"""The ``cowenv`` command line.

Subcommands register themselves in :data:`COMMANDS` (name -> (setup_parser, run)); bad
input exits 2 with one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .kernel.config import FLAW_IDS

EXIT_OK, EXIT_FAIL, EXIT_BADINPUT = 0, 1, 2


class BadInput(Exception):
    """User input error: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise BadInput(f"{self.prog}: {message}")


def _flaws_arg(s: str) -> list[str]:
    if s in ("", "none"):
        return []
    if s in ("all", "as-posted"):
        return list(FLAW_IDS)
    out = [x.strip() for x in s.split(",") if x.strip()]
    for f in out:
        if f not in FLAW_IDS:
            raise BadInput(f"--flaws: unknown flaw id {f!r} (known: {', '.join(FLAW_IDS)})")
    return out


# ----------------------------------------------------------------------------- scenario
def _setup_scenario(sp: argparse.ArgumentParser) -> None:
    sub = sp.add_subparsers(dest="action", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run scenario files or folders")
    r.add_argument("paths", nargs="+")
    r.add_argument("--variant", help="classic, cowpte, or a preset: as-posted, fixed")
    r.add_argument("--flaws", help="comma-separated flaw ids (implies cowpte)")
    r.add_argument("--json", action="store_true", help="one JSON object per scenario")


def _run_scenario(a: argparse.Namespace) -> int:
    from .kernel.config import PRESETS, VARIANTS
    from .scenario import ScenarioError, collect, load_scenario, run_scenario

    if a.variant is not None and a.variant not in VARIANTS and a.variant not in PRESETS:
        raise BadInput("--variant: expected one of "
                       f"{', '.join(sorted(set(VARIANTS) | set(PRESETS)))}")
    flaws = _flaws_arg(a.flaws) if a.flaws is not None else None
    try:
        files = collect(a.paths)
        scs = [load_scenario(f) for f in files]
    except ScenarioError as e:
        raise BadInput(str(e)) from None
    if not scs:
        raise BadInput(f"no scenario files (*.yaml) under {' '.join(a.paths)}")
    results = []
    for sc in scs:
        try:
            results.append(run_scenario(sc, a.variant, flaws))
        except ValueError as e:
            raise BadInput(f"{sc.path}: {e}") from None
    if a.json:
        for r in results:
            print(json.dumps(r.to_dict(), sort_keys=True))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{len(results)} scenario(s)")
        for c in ("scenario", "expected", "observed", "pass"):
            t.add_column(c)
        for r in results:
            obs = ", ".join(v.signature for v in r.violations) or "none"
            if r.error:
                obs = f"[red]error: {r.error}[/red]"
            t.add_row(r.path or r.name, r.expected.describe(), obs,
                      "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]")
        Console(width=200).print(t)
        n = sum(r.passed for r in results)
        print(f"{n} passed, {len(results) - n} failed")
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAIL


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int], str]] = {
    "scenario": (_setup_scenario, _run_scenario, "run scripted scenarios"),
}


def _register_optional() -> None:
    """Subcommands living in other modules register here (imported lazily)."""
    import importlib

    for mod in ("cowenv.replay", "cowenv.campaign", "cowenv.explore"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        for name, entry in getattr(m, "CLI_COMMANDS", {}).items():
            COMMANDS[name] = entry


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cowenv`` script."""
    _register_optional()
    p = _Parser(prog="cowenv", description="COW PTE page-table fuzzing environment")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name, (setup, _run, help_) in COMMANDS.items():
        setup(sub.add_parser(name, help=help_))
    try:
        a = p.parse_args(argv)
        return COMMANDS[a.cmd][1](a)
    except BadInput as e:
        print(str(e), file=sys.stderr)
        return EXIT_BADINPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_main() -> Any:
    """``python -m cowenv``."""
    sys.exit(main())
