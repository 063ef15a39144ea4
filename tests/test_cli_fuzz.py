"""Property test (issue 17): no input makes a tool print a traceback.

Valid scenario files are mutated (fields deleted or retyped, huge and negative numbers,
wrong nesting, YAML type changes, damaged text) and fed to ``scenario run``, ``replay``,
``minimize`` and ``trace`` in-process through :func:`cowenv.cli.main`; random flag lists
go to ``fuzz`` and ``train`` (argument parsing and validation only: the campaign and the
training are replaced by stubs). Every call must end with exit status 0, 1 or 2, print no
traceback, print exactly one line on stderr when it exits 2, and finish in bounded time.

``COWENV_FUZZ_EXAMPLES`` sets the examples per tool (default 500); the long run of the
README is ``COWENV_FUZZ_EXAMPLES=20000``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowenv import cli

N = int(os.environ.get("COWENV_FUZZ_EXAMPLES", "500"))
SETTINGS = settings(max_examples=N, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
#: Seconds one call may take: a bound that catches a hang, not a benchmark. The largest
#: legal inputs are slow for real: ``minimize`` of a file with ``nr_frames: 1048576`` builds
#: a million-frame kernel per ddmin run and took 38 s on a loaded 2-core machine.
MAX_SECONDS = 120.0
#: Scratch folder; in memory where possible (the tools fsync what they write).
WORK = Path(tempfile.mkdtemp(prefix="cowenv-cli-fuzz-",
                             dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))

BASES = [
    """version: 1
name: cow-pte-fault-lock
config: {preset: as-posted, geometry: small, nr_frames: 64}
steps:
  - {tid: 1, do: prctl_cow_pte}
  - {tid: 1, do: mmap, args: {addr: 0x100000, length: 0x8000}}
  - {tid: 1, do: write, args: {addr: 0x100000}, as: OLD}
  - {tid: 1, do: fork, as: CHILD}
  - {tid: 1, do: write, args: {addr: 0x100000}}
  - {tid: CHILD, do: read, args: {addr: 0x100000}, expect: OLD}
  - {tid: CHILD, do: exit}
  - {tid: 1, do: exit}
expect: {violation: {kind: lock-discipline, site: handle_cow_pte_fault}}
expect_by_variant:
  fixed: {violation: null}
""",
    """version: 1
name: interleaved
description: start, step, until, finish, run, events and checks
config: {variant: cowpte, flaws: [pmd-clear-window], geometry: tiny, nr_frames: 48,
         nr_swap_slots: 8, fault_mode: mmap_lock, split_ptl: true, lockdep: false,
         max_threads: 4, max_processes: 3}
seed: 3
steps:
  - {tid: 1, do: mmap, args: {addr: 0x200000, length: 0x4000, prot: rw, populate: true}}
  - {tid: 1, do: clone, as: T}
  - {tid: 1, do: pin, args: {addr: 0x200000, write: false}, as: P}
  - {tid: T, start: write, args: {addr: 0x201000}}
  - {tid: T, step: 2}
  - {event: fail_nth, n: 1}
  - {tid: 1, do: madvise, args: {addr: 0x200000, length: 0x1000, advice: PAGEOUT},
     expect: ok}
  - {tid: T, finish: true}
  - {tid: kswapd, start: reclaim, args: {nr: 2}}
  - {tid: 0, run: true}
  - {tid: 1, do: dev_read, args: {pin: P}, expect: {min: 0}}
  - {tid: 1, do: mprotect, args: {addr: 0x900000, length: 0x1000, prot: r},
     expect: any-errno, check: "mprotect of a hole fails"}
  - {tid: 1, do: unpin, args: {pin: P}}
  - {tid: 1, start: exit}
  - {tid: 1, until: "exit:done"}
expect: {violation: null}
outcome: {steps: 40, events: 100,
          trace_hash: 0000000000000000000000000000000000000000000000000000000000000000}
recorded: {agent: random, seed: 3}
""",
]
BASE_DATA = [yaml.safe_load(b) for b in BASES]
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

SPECIAL_INTS = [10**11, 3 * 10**8, 4194305, -1, 2**31, 2**63, 10**100, -2**63, 2**64, 2**47,
                65537, 0, 1, 2, 7, 16, 63, 64, 4096, 0x100000]
CONFIG_FIELDS = ["nr_frames", "nr_swap_slots", "geometry", "ptrs_per_pte", "max_threads",
                 "max_processes", "page_size", "seed", "version"]
SPECIAL_STRS = ["", "0x1000", "1e11", "3e8", "kswapd", "CHILD", "OLD", "P", "T", "mmap",
                "fork", "exit", "-EFAULT", "EINVAL", "ok", "any-errno", "zero", "x:y",
                "wp_page_copy:copied", "as-posted", "fixed", "classic", "cowpte", "none",
                "small", "x86_64", "null", "~", "yes", "\t", "é", "a" * 300, "{", "[1, 2]"]
scalars = (st.none() | st.booleans() | st.sampled_from(SPECIAL_INTS)
           | st.integers(-2**70, 2**70) | st.floats() | st.sampled_from(SPECIAL_STRS)
           | st.text(max_size=8))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["tid", "do", "args", "addr", "length",
                                                       "kind", "site", "violation", "n",
                                                       "step", "x", "min", "max", "not"]),
                                      inner, max_size=3), max_leaves=6)


def _nodes(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path to a value inside plain data."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _nodes(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _nodes(v, (*path, i))
    return out


def _get(root: Any, path: tuple) -> Any:
    for k in path:
        root = root[k]
    return root


def _retype(v: Any, draw: Any) -> Any:
    """A YAML type change of ``v``: number <-> string, scalar <-> list/mapping."""
    if isinstance(v, bool):
        return draw(st.sampled_from([str(v).lower(), int(v), [v]]))
    if isinstance(v, int):
        return draw(st.sampled_from([str(v), hex(v), float(v) if abs(v) < 2**60 else 1e300,
                                     [v], {"value": v}, -v, v * 2**40]))
    if isinstance(v, str):
        return draw(st.sampled_from([[v], {v: v}, len(v), v.upper(), v + "x", v[:1], None]))
    if isinstance(v, list):
        return draw(st.sampled_from([{str(i): x for i, x in enumerate(v)}, v[:1], v * 2,
                                     [v], "list", len(v)]))
    if isinstance(v, dict):
        return draw(st.sampled_from([list(v.items()), list(v.values()), [v], "mapping",
                                     {"nested": v}, {}]))
    return draw(junk)


def mutate(draw: Any, data: Any) -> Any:
    """Apply 1-3 random structural mutations to scenario data (in place; returned)."""
    for _ in range(draw(st.integers(1, 3))):
        paths = _nodes(data)
        how = draw(st.sampled_from(["number", "config", "delete", "replace", "retype", "nest",
                                    "insert", "duplicate"]))
        if how == "config" and isinstance(data, dict):  # a huge or negative resource size
            key = draw(st.sampled_from(CONFIG_FIELDS))
            where = data if key in ("seed", "version") else data.get("config")
            if isinstance(where, dict):
                where[key] = draw(st.sampled_from(SPECIAL_INTS))
            continue
        if how == "number":  # a huge, negative or odd number where a number is
            nums = [p for p in paths if p and isinstance(_get(data, p), int)]
            if nums:
                p = draw(st.sampled_from(nums))
                _get(data, p[:-1])[p[-1]] = draw(st.sampled_from(SPECIAL_INTS)
                                                 | st.integers(-2**70, 2**70))
            continue
        path = draw(st.sampled_from(paths))
        if not path:
            if how in ("replace", "retype"):
                data = draw(junk) if how == "replace" else _retype(data, draw)
            continue
        parent, key = _get(data, path[:-1]), path[-1]
        if how == "delete":
            del parent[key]
        elif how == "replace":
            parent[key] = draw(junk)
        elif how == "retype":
            parent[key] = _retype(parent[key], draw)
        elif how == "nest":
            parent[key] = draw(st.sampled_from([[parent[key]], {"x": parent[key]},
                                                {key if isinstance(key, str) else "k":
                                                 parent[key]}]))
        elif how == "insert":
            if isinstance(parent, dict):
                parent[draw(st.sampled_from(["as", "expect", "args", "check", "tid", "step",
                                             "event", "until", "version", "outcome",
                                             "extra"]))] = draw(junk)
            else:
                parent.insert(key, draw(junk))
        elif how == "duplicate" and isinstance(parent, list):
            parent.insert(key, parent[key])
    return data


def text_mutation(draw: Any, text: str) -> str:
    """Damage the YAML text itself: truncate, drop or repeat a line, splice characters."""
    how = draw(st.sampled_from(["truncate", "drop-line", "repeat-line", "splice", "indent"]))
    lines = text.splitlines(keepends=True)
    if how == "truncate":
        return text[:draw(st.integers(0, len(text)))]
    i = draw(st.integers(0, len(lines) - 1))
    if how == "drop-line":
        return "".join(lines[:i] + lines[i + 1:])
    if how == "repeat-line":
        return "".join(lines[:i + 1] + lines[i:])
    if how == "indent":
        return "".join(lines[:i] + [draw(st.sampled_from(["\t", "  ", " "])) + lines[i]]
                       + lines[i + 1:])
    j = draw(st.integers(0, len(text)))
    return text[:j] + draw(st.sampled_from(["{", "}", "[", "]", ":", "- ", "#", "'", '"', "&a",
                                            "*a", "!!python/object:os.system ''", "\x00",
                                            "0x", "-", "e11"])) + text[j:]


@st.composite
def scenario_text(draw: Any) -> str:
    """A mutated valid scenario, as YAML text."""
    i = draw(st.integers(0, len(BASE_DATA) - 1))
    if draw(st.integers(0, 4)) == 0:
        return text_mutation(draw, BASES[i])
    data = mutate(draw, copy.deepcopy(BASE_DATA[i]))
    try:
        return yaml.dump(data, Dumper=DUMPER, sort_keys=False,
                         default_flow_style=draw(st.booleans()),
                         allow_unicode=draw(st.booleans()))
    except (yaml.YAMLError, ValueError, OverflowError):
        return BASES[i]


def run_cli(argv: list[str]) -> tuple[int, str, str, float]:
    """``cowenv.cli.main(argv)`` with stdout/stderr captured; SystemExit is an exit code."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse --help / --version
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0


def check_contract(argv: list[str], rc: int, out: str, err: str, secs: float) -> None:
    """Exit status per contract, no traceback, one line for bad input, bounded time."""
    assert rc in (0, 1, 2), (argv, rc, out, err)
    assert "Traceback" not in out and "Traceback" not in err, (argv, err)
    if rc == 2:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1, (argv, err)
        assert out == "", (argv, out)
    assert secs < MAX_SECONDS, (argv, secs)


def _file(text: str) -> Path:
    p = WORK / "case.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    return p


@pytest.mark.parametrize("tool", ["scenario", "replay", "minimize", "trace"])
def test_mutated_scenarios_never_traceback(tool: str) -> None:
    @SETTINGS
    @given(text=scenario_text(), extra=st.sampled_from([[], ["--json"], ["--trace"],
                                                        ["--variant", "fixed"],
                                                        ["--signature", "selftest@x"]]))
    def one(text: str, extra: list[str]) -> None:
        p = _file(text)
        o = WORK / ("out.json" if tool == "trace" else "out.yaml")
        if tool == "scenario":
            argv = ["scenario", "run", str(p)] + (extra if extra[:1] in (["--json"],
                                                                         ["--variant"]) else [])
        elif tool == "replay":
            argv = ["replay", str(p)] + (extra if extra[:1] in (["--json"], ["--trace"]) else [])
        elif tool == "minimize":
            argv = ["minimize", str(p), "-o", str(o)] + (
                extra if extra[:1] in (["--json"], ["--signature"]) else [])
        else:
            argv = ["trace", str(p), "-o", str(o)]
        check_contract(argv, *run_cli(argv))

    one()


# ------------------------------------------------------------------ fuzz and train flags
FLAG_VALUES = st.sampled_from(["0", "1", "2", "-1", "3", "64", "256", "100000", "9" * 30,
                               "1e3", "0x10", "abc", "", "small", "tiny", "x86_64", "7",
                               "as-posted", "fixed", "classic", "none", "all",
                               "pmd-clear-window", "no-such-flaw", "mmap_lock", "vma_lock",
                               "random", "pct", "ql", "ppo", "/proc/cowenv/x", "/dev/null",
                               "-", "--budget", "é"]) | st.integers(-10**15, 10**15).map(str)
FUZZ_FLAGS = ["--agent", "--model", "--budget", "--workers", "--seed", "--out", "--depth",
              "--teardown", "--preset", "--flaws", "--geometry", "--fault-mode", "--max-steps"]
FUZZ_SWITCHES = ["--no-minimise", "--json", "--quiet", "--bogus", "-x"]
TRAIN_FLAGS = ["--steps", "--out", "--seed", "--log-dir", "--n-envs", "--teardown",
               "--preset", "--flaws", "--geometry", "--fault-mode", "--max-steps"]
TRAIN_SWITCHES = ["--each-flaw", "--json", "--bogus"]


@st.composite
def flag_list(draw: Any, flags: list[str], switches: list[str]) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            argv.append(draw(st.sampled_from(switches)))
        else:
            argv += [draw(st.sampled_from(flags)), draw(FLAG_VALUES)]
    if draw(st.booleans()) and argv:
        argv.pop()  # a flag without its value
    return argv


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep validation, drop the work: no workers, no training; run in the scratch folder."""
    import cowenv_agents.ppo as ppo

    import cowenv.campaign as camp

    def fake_locked(cfg: camp.CampaignConfig, outp: Path, show: bool,
                    backend: Any = None) -> camp.CampaignResult:
        return camp.CampaignResult(str(outp), 0, 0, [], False, 0.0)

    def fake_train(configs: Any, steps: int, out: Any, **kw: Any) -> Path:
        return Path(str(out))

    monkeypatch.setattr(camp, "_run_locked", fake_locked)
    monkeypatch.setattr(ppo, "train_ppo", fake_train)
    monkeypatch.chdir(WORK)  # relative --out values (folders are created) land here


@pytest.mark.parametrize("cmd", ["fuzz", "train"])
def test_fuzz_and_train_flags_never_traceback(cmd: str, stubbed: None) -> None:
    flags, switches = (FUZZ_FLAGS, FUZZ_SWITCHES) if cmd == "fuzz" else (TRAIN_FLAGS,
                                                                          TRAIN_SWITCHES)

    @SETTINGS
    @given(argv=flag_list(flags, switches))
    def one(argv: list[str]) -> None:
        base = [cmd, "--out", str(WORK / f"{cmd}-out")]
        if cmd == "train":
            base += ["--log-dir", str(WORK / "runs")]
        full = base + argv
        check_contract(full, *run_cli(full))

    one()


def test_memory_stayed_bounded() -> None:
    """The whole module (every example above) ran within 2 GB (resource caps hold)."""
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2 * 1024 * 1024
