"""Malformed schedules: exit 2 and exactly one line on stderr naming the file and field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowenv import cli
from cowenv.scenario import ScenarioError, parse_scenario

ROOT = Path(__file__).resolve().parent.parent

GOOD = """version: 1
name: ok
config: {preset: classic, geometry: small, nr_frames: 64}
seed: 0
steps:
  - {tid: 1, do: mmap, args: {addr: 0x100000, length: 0x2000}}
  - {tid: 1, start: write, args: {addr: 0x100000}}
  - {tid: 1, step: 1}
  - {event: fail_nth, n: 1}
expect: {violation: null}
"""


def _edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


H64 = "a" * 64
#: (id, file text or bytes, substrings the one stderr line must contain)
CASES: list[tuple[str, str | bytes, list[str]]] = [
    ("steps-not-list", GOOD.split("steps:")[0] + "steps: 3\n", ["steps", "expected a list"]),
    ("steps-mapping", GOOD.split("steps:")[0] + "steps: {a: 1}\nexpect: {violation: null}\n",
     ["steps", "expected a list"]),
    ("step-not-mapping", _edit("  - {tid: 1, step: 1}", "  - 17"),
     ["steps[2]", "expected a mapping"]),
    ("missing-steps", GOOD.split("steps:")[0] + "expect: {violation: null}\n",
     ["steps", "expected a list"]),
    ("unknown-op", _edit("do: mmap", "do: frobnicate"), ["steps[0].do", "unknown operation"]),
    ("op-not-string", _edit("do: mmap", "do: [mmap]"), ["steps[0].do", "unknown operation"]),
    ("unknown-flaw", _edit("{preset: classic,", "{variant: cowpte, flaws: [no-such-flaw],"),
     ["config.flaws", "no-such-flaw"]),
    ("unaligned-addr", _edit("addr: 0x100000, length", "addr: 0x100001, length"),
     ["steps[0].args.addr", "page-aligned"]),
    ("addr-beyond-task-size", _edit("addr: 0x100000, length", "addr: 0x1000000000000, length"),
     ["steps[0].args.addr"]),
    ("addr-not-int", _edit("args: {addr: 0x100000}}", "args: {addr: 12.5}}"),
     ["steps[1].args.addr", "integer"]),
    ("bad-length", _edit("length: 0x2000", "length: 100"), ["steps[0].args.length"]),
    ("bad-prot", _edit("length: 0x2000}", "length: 0x2000, prot: rx}"), ["steps[0].args.prot"]),
    ("unknown-arg", _edit("length: 0x2000}", "length: 0x2000, color: red}"),
     ["steps[0].args.color"]),
    ("truncated-yaml", GOOD[:GOOD.index("length: 0x2000}}") + 8], ["line ", "not valid YAML"]),
    ("tab-indent", "version: 1\nsteps:\n\t- {tid: 1, step: 1}\n", ["line 3", "not valid YAML"]),
    ("future-version", _edit("version: 1", "version: 2"), ["version", "upgrade cowenv"]),
    ("version-string", _edit("version: 1", "version: '1'"), ["version", "integer"]),
    ("negative-tid", _edit("{tid: 1, step: 1}", "{tid: -1, step: 1}"), ["steps[2].tid"]),
    ("tid-over-max", _edit("{tid: 1, step: 1}", "{tid: 99, step: 1}"),
     ["steps[2].tid", "max_threads"]),
    ("tid-word", _edit("{tid: 1, step: 1}", "{tid: two, step: 1}"), ["steps[2].tid"]),
    ("user-op-on-kswapd", _edit("{tid: 1, start: write", "{tid: 0, start: write"),
     ["steps[1].tid", "user thread"]),
    ("kthread-op-on-user", _edit("{tid: 1, start: write, args: {addr: 0x100000}}",
                                 "{tid: 1, start: reclaim}"), ["steps[1].tid", "kswapd"]),
    ("two-kinds", _edit("{tid: 1, step: 1}", "{tid: 1, step: 1, finish: true}"),
     ["steps[2]", "exactly one of"]),
    ("step-zero", _edit("{tid: 1, step: 1}", "{tid: 1, step: 0}"), ["steps[2].step", ">= 1"]),
    ("until-no-label", _edit("{tid: 1, step: 1}", "{tid: 1, until: somewhere}"),
     ["steps[2].until", "function:point"]),
    ("unknown-event", _edit("event: fail_nth", "event: oom_kill"), ["steps[3].event"]),
    ("negative-fail-nth", _edit("n: 1}", "n: -1}"), ["steps[3].n"]),
    ("unbound-name", _edit("{event: fail_nth, n: 1}", "{tid: 1, do: unpin, args: {pin: P}}"),
     ["steps[3].args.pin", "'P' is neither a number nor a name bound"]),
    ("bad-expect-kind", _edit("expect: {violation: null}",
                              "expect: {violation: {kind: crash, site: x}}"),
     ["expect.violation.kind", "isolation"]),
    ("bad-expect-shape", _edit("expect: {violation: null}", "expect: [1, 2]"), ["expect"]),
    ("bad-expect-step", _edit("expect: {violation: null}",
                              "expect: {violation: {kind: isolation, site: x, step: soon}}"),
     ["expect.violation.step", "integer"]),
    ("bad-step-expect", _edit("{tid: 1, step: 1}", "{tid: 1, do: read, args: {addr: 0x100000},"
                              " expect: [1]}"), ["steps[2].expect"]),
    ("unknown-preset", _edit("preset: classic", "preset: newest"), ["config.preset", "newest"]),
    ("preset-list", _edit("preset: classic", "preset: [classic]"), ["config.preset"]),
    ("bad-geometry", _edit("geometry: small", "geometry: huge"), ["config.geometry"]),
    ("frames-not-int", _edit("nr_frames: 64", "nr_frames: many"), ["config.nr_frames"]),
    ("unknown-top-field", GOOD + "colour: blue\n", ["colour", "unknown field"]),
    ("top-level-list", "- 1\n- 2\n", ["top level", "mapping"]),
    ("empty-file", "", ["top level", "mapping"]),
    ("seed-string", _edit("seed: 0", "seed: zero"), ["seed", "integer"]),
    ("bad-trace-hash", GOOD + "outcome: {trace_hash: xyz, steps: 3}\n",
     ["outcome.trace_hash", "SHA-256"]),
    ("outcome-unknown", GOOD + f"outcome: {{trace_hash: {H64}, when: now}}\n",
     ["outcome.when", "unknown field"]),
    ("outcome-labels-length", GOOD + "outcome: {labels: [null]}\n",
     ["outcome.labels", "one entry per step"]),
    ("outcome-steps-negative", GOOD + "outcome: {steps: -3}\n", ["outcome.steps"]),
    ("recorded-nested", GOOD + "recorded: {agent: {name: x}}\n", ["recorded.agent"]),
    ("bad-variant-expectation", GOOD + "expect_by_variant: {newest: {violation: null}}\n",
     ["expect_by_variant.newest"]),
    ("binary-file", b"\xff\xfe\x00version: 1\n", ["byte 0", "UTF-8"]),
]


@pytest.mark.parametrize("cmd", ["replay", "minimize", "trace"])
def test_missing_file(tmp_path: Path, capsys, cmd: str) -> None:
    p = tmp_path / "absent.yaml"
    argv = [cmd, str(p)] + (["-o", str(tmp_path / "o")] if cmd != "replay" else [])
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and "cannot read file" in lines[0]
    assert cap.out == ""


@pytest.mark.parametrize("case_id, text, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_file_exit_2_one_line(tmp_path: Path, capsys, case_id: str, text: str | bytes,
                                  needles: list[str]) -> None:
    p = tmp_path / f"{case_id}.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    for argv in (["replay", str(p)], ["replay", str(p), "--trace"],
                 ["minimize", str(p), "-o", str(tmp_path / "out.yaml")],
                 ["trace", str(p), "-o", str(tmp_path / "out.json")]):
        assert cli.main(argv) == 2, argv
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1, cap.err
        line = lines[0]
        assert line.startswith(f"{p}: "), line
        for n in needles:
            assert n in line, (n, line)
        assert "Traceback" not in cap.err and cap.out == ""
    assert not (tmp_path / "out.yaml").exists() and not (tmp_path / "out.json").exists()


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("argv, needle", [
    (["replay"], "required"),
    (["minimize", "x.yaml"], "-o"),
    (["trace", "x.yaml"], "-o"),
    (["replay", "x.yaml", "--bogus"], "--bogus"),
    (["minimize", str(ROOT / "tests/data/cow-pte-fault-lock.yaml"), "-o", "o.yaml",
      "--signature", "not a signature"], "--signature"),
])
def test_bad_arguments(capsys, argv: list[str], needle: str) -> None:
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_unwritable_output(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    src = ROOT / "scenarios" / "conformance" / "basic-cow-after-fork.yaml"
    assert cli.main(["trace", str(src), "-o", str(blocker / "sub" / "t.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0]


def test_bad_input_via_subprocess(tmp_path: Path) -> None:
    p = tmp_path / "future.yaml"
    p.write_text(_edit("version: 1", "version: 7"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "cowenv", "replay", str(p)], capture_output=True,
                       text=True, env=env, timeout=60, check=False)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"{p}: version: file is format 7, this cowenv reads up to 1; upgrade cowenv"]


# Anything the YAML loader can produce, dropped into a valid scenario: the parser either
# accepts it or raises ScenarioError; it never raises anything else.
_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["mmap", "kswapd", "0x1000", "fail_nth", "rw"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.lists(st.sampled_from(["config", "steps", 0, 1, 2, 3, "args", "addr", "tid",
                                      "do", "expect", "violation", "outcome", "n", "preset"]),
                     min_size=1, max_size=4), value=_junk)
def test_parser_never_raises_anything_else(path: list, value: object) -> None:
    data = yaml.safe_load(GOOD)
    data["outcome"] = {"steps": 1, "labels": [None, None, None, None]}
    node = data
    for key in path[:-1]:
        nxt = node[key] if isinstance(node, dict) and key in node else (
            node[key] if isinstance(node, list) and isinstance(key, int) and key < len(node)
            else None)
        if not isinstance(nxt, dict | list):
            break
        node = nxt
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    try:
        parse_scenario(data, "fuzz.yaml")
    except ScenarioError as e:
        msg = str(e)
        assert msg.startswith("fuzz.yaml: ") and "\n" not in msg
