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

from .kernel.config import FLAW_IDS, PRESETS

EXIT_OK, EXIT_FAIL, EXIT_BADINPUT = 0, 1, 2


class BadInput(Exception):
    """User input error: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise BadInput(f"{self.prog}: {message}")


def _flaws_arg(s: str) -> list[str]:
    if s in ("", "none"):
        return []
    if s == "all":
        return list(FLAW_IDS)
    if s in PRESETS:  # a preset's flaw set (as-posted: the v4-origin flaws)
        return list(PRESETS[s][1])
    out = [x.strip() for x in s.split(",") if x.strip()]
    for f in out:
        if f not in FLAW_IDS:
            raise BadInput(f"--flaws: unknown flaw id {f!r} (known: {', '.join(FLAW_IDS)})")
    return out


def flaw_origins_text(flaws: Any) -> str:
    """Flaws with their origin (``v4`` or ``seeded``): each one, or counts when many."""
    from .kernel.config import FLAW_ORIGINS

    flaws = list(flaws or ())
    if not flaws:
        return "-"
    if len(flaws) <= 2:
        return ", ".join(f"{f} ({FLAW_ORIGINS.get(f, '?')})" for f in flaws)
    n_v4 = sum(FLAW_ORIGINS.get(f) == "v4" for f in flaws)
    return f"{n_v4} v4, {len(flaws) - n_v4} seeded"


# ----------------------------------------------------------------------------- tables
def print_table(table: Any, *, stderr: bool = False) -> None:
    """Print a rich table; names are never broken when the output is not a terminal.

    On a terminal the table fits the window (long cells fold). Into a pipe or a file every
    column is ``no_wrap`` and the width unbounded, so signatures and file names stay whole
    and a ``grep`` finds them.
    """
    from rich.console import Console

    c = Console(stderr=stderr)
    if not c.is_terminal:
        for col in table.columns:
            col.no_wrap, col.overflow = True, "ignore"
        c = Console(stderr=stderr, width=100_000, no_color=True, highlight=False)
    c.print(table)


# ----------------------------------------------------------------------------- scenario
def _setup_scenario(sp: argparse.ArgumentParser) -> None:
    sub = sp.add_subparsers(dest="action", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run scenario files or folders")
    r.add_argument("paths", nargs="+")
    r.add_argument("--variant", help="classic, cowpte, or a preset: as-posted, fixed")
    r.add_argument("--flaws", help="comma-separated flaw ids (implies cowpte; not with a "
                                   "preset as --variant)")
    r.add_argument("--json", action="store_true", help="one JSON object per scenario")


def check_variant_flaws(variant: str | None, flaws: str | None, flag: str = "--variant"
                        ) -> None:
    """Refuse ``--flaws`` together with a preset (the preset fixes the flaw set).

    Raises:
        BadInput: naming both flags.
    """
    from .kernel.config import PRESETS

    if flaws is not None and variant is not None and variant in PRESETS:
        raise BadInput(f"--flaws: cannot be combined with {flag} {variant} (a preset fixes "
                       f"the flaws); use --flaws alone (the cowpte variant) or drop --flaws")


def _run_scenario(a: argparse.Namespace) -> int:
    from .kernel.config import PRESETS, VARIANTS
    from .scenario import ScenarioError, collect, load_scenario, run_scenario

    if a.variant is not None and a.variant not in VARIANTS and a.variant not in PRESETS:
        raise BadInput("--variant: expected one of "
                       f"{', '.join(sorted(set(VARIANTS) | set(PRESETS)))}")
    check_variant_flaws(a.variant, a.flaws)
    flaws = _flaws_arg(a.flaws) if a.flaws is not None else None
    # Every bad path or file is an error row; the good ones still run; exit 2 at the end.
    rows: list[tuple[str, Any]] = []  # (path, RunResult or error line)
    for path in a.paths:
        try:
            files = collect([path])
        except ScenarioError as e:
            rows.append((path, str(e)))
            continue
        if not files:
            rows.append((path, f"{path}: no scenario files (*.yaml, *.yml) in this folder"))
        for f in files:
            try:
                sc = load_scenario(f)
            except ScenarioError as e:
                rows.append((str(f), str(e)))
                continue
            try:
                rows.append((str(f), run_scenario(sc, a.variant, flaws)))
            except ValueError as e:  # the override makes an invalid configuration
                rows.append((str(f), f"{sc.path}: {e}"))
    bad = [msg for _p, msg in rows if isinstance(msg, str)]
    results = [r for _p, r in rows if not isinstance(r, str)]
    for msg in bad:
        print(msg, file=sys.stderr)
    if not results:  # nothing ran: the error lines are the whole output
        return EXIT_BADINPUT
    if a.json:
        for path, r in rows:
            d = {"path": path, "error": r, "bad_input": True, "passed": False} \
                if isinstance(r, str) else r.to_dict()
            print(json.dumps(d, sort_keys=True))
    else:
        from rich.table import Table

        t = Table(title=f"{len(rows)} scenario(s)")
        for c in ("scenario", "flaws (origin)", "expected", "observed", "pass"):
            t.add_column(c)
        for path, r in rows:
            if isinstance(r, str):
                t.add_row(path, "-", "-", f"[red]bad input: {r.removeprefix(path + ': ')}[/red]",
                          "[red]ERROR[/red]")
                continue
            obs = ", ".join(v.signature for v in r.violations) or "none"
            if r.error:
                obs = f"[red]error: {r.error}[/red]"
            flaws = flaw_origins_text(r.config.flaws if r.config is not None else ())
            t.add_row(r.path or r.name, flaws, r.expected.describe(), obs,
                      "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]")
        print_table(t)
        n = sum(r.passed for r in results)
        tail = f", {len(bad)} bad input" if bad else ""
        print(f"{n} passed, {len(results) - n} failed{tail}")
    if bad:
        return EXIT_BADINPUT
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAIL


# ----------------------------------------------------------------------------- labels


def _setup_labels(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--variant", help="classic, cowpte or a preset (as-posted, fixed); "
                                      "default: every label")
    sp.add_argument("--json", action="store_true", help="print one JSON list")


def _run_labels(a: argparse.Namespace) -> int:
    from .catalogue import label_sources
    from .kernel.config import PRESETS, VARIANTS

    if a.variant is not None and a.variant not in VARIANTS and a.variant not in PRESETS:
        raise BadInput("--variant: expected one of "
                       f"{', '.join(sorted(set(VARIANTS) | set(PRESETS)))}")
    variant = PRESETS[a.variant][0] if a.variant in PRESETS else a.variant
    src = label_sources()
    labels = sorted(lab for lab, files in src.items()
                    if variant != "classic" or files - {"cowpte"})
    if a.json:
        print(json.dumps(labels))
    else:
        print("\n".join(labels))
    return EXIT_OK


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int], str]] = {
    "scenario": (_setup_scenario, _run_scenario, "run scripted scenarios"),
    "labels": (_setup_labels, _run_labels, "list the preemption labels (for until: steps)"),
}


def _register_optional() -> None:
    """Subcommands living in other modules register here (imported lazily)."""
    import importlib

    for mod in ("cowenv.replay", "cowenv.minimize", "cowenv.chrome_trace", "cowenv.campaign_cli",
                "cowenv.export", "cowenv.difftest", "cowenv.explore"):
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
