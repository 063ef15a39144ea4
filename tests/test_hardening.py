"""Hardening (issue 17): bad input is one line and exit 2, campaign folder lock, no orphans
after SIGKILL, campaign.json tells the truth, replay's verdict, file modes, multi-file
scenario runs, whole names in piped tables, the scenario format's additions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cowenv import cli
from cowenv.campaign import campaign_status, lock_holder, run_campaign
from cowenv.kernel.config import MAX_FRAMES, KernelConfig
from cowenv.replay import replay
from cowenv.scenario import load_scenario, run_scenario

ROOT = Path(__file__).resolve().parent.parent
FLAWS = "fault-asserts-write-lock,walker-skips-break,read-fault-fills-shared"
SMALL = """version: 1
name: small
config: {preset: classic, geometry: small, nr_frames: 64}
steps:
  - {tid: 1, do: mmap, args: {addr: 0x100000, length: 0x1000}}
  - {tid: 1, do: write, args: {addr: 0x100000}}
  - {tid: 1, do: exit}
expect: {violation: null}
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _one_line(capsys: pytest.CaptureFixture) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert "Traceback" not in cap.err
    return lines[0]


# ------------------------------------------------------------------ bad input: one line, exit 2
@pytest.mark.parametrize("field, value, needle", [
    ("nr_frames", "100000000000", "nr_frames: expected 16 to"),
    ("nr_frames", "300000000", "nr_frames: expected 16 to"),
    ("nr_swap_slots", "100000000000", "nr_swap_slots: expected 0 to"),
    ("geometry", "1048576", "ptrs_per_pte: expected a power of two from 2 to"),
])
def test_resource_caps_in_scenarios(tmp_path: Path, capsys: pytest.CaptureFixture, field: str,
                                    value: str, needle: str) -> None:
    p = tmp_path / "big.yaml"
    p.write_text(SMALL.replace("nr_frames: 64", f"{field}: {value}"))
    for argv in (["scenario", "run", str(p)], ["replay", str(p)],
                 ["trace", str(p), "-o", str(tmp_path / "t.json")],
                 ["minimize", str(p), "-o", str(tmp_path / "m.yaml")]):
        assert cli.main(argv) == 2, argv
        line = _one_line(capsys)
        assert line.startswith(f"{p}: config.") and needle in line, line


def test_config_caps() -> None:
    KernelConfig(nr_frames=MAX_FRAMES, nr_swap_slots=0)  # the cap itself is allowed
    for kw in ({"nr_frames": MAX_FRAMES + 1}, {"nr_swap_slots": -1},
               {"nr_swap_slots": 1 << 40}, {"ptrs_per_pte": 1 << 13}):
        with pytest.raises(ValueError):
            KernelConfig(**kw)


def test_missing_version_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "nov.yaml"
    p.write_text(SMALL.replace("version: 1\n", ""))
    assert cli.main(["replay", str(p)]) == 2
    assert _one_line(capsys) == f"{p}: version: required in a file (expected `version: 1` as " \
                                "the first line)"


@pytest.mark.parametrize("argv, needle", [
    (["fuzz", "--seed", "-1"], "--seed: expected 0 to"),
    (["fuzz", "--teardown", "300"], "--teardown: expected less than --max-steps (256"),
    (["fuzz", "--max-steps", "16"], "--teardown: expected less than --max-steps (16"),
    (["fuzz", "--preset", "fixed", "--flaws", "pmd-clear-window"],
     "--flaws: cannot be combined with --preset fixed"),
    (["fuzz", "--workers", "100000"], "--workers: expected 1 to"),
    (["fuzz", "--budget", str(10**15)], "--budget: expected 0 to"),
    (["fuzz", "--max-steps", str(10**9)], "--max-steps: expected 1 to"),
    (["train", "--seed", "-1"], "--seed: expected 0 to"),
    (["train", "--preset", "classic", "--flaws", "all"], "--flaws: cannot be combined"),
    (["train", "--teardown", "256"], "--teardown: expected less than --max-steps (256"),
    (["train", "--steps", str(10**12)], "--steps: expected 1 to"),
    (["scenario", "run", "scenarios/flaws", "--variant", "fixed", "--flaws", "all"],
     "--flaws: cannot be combined with --variant fixed"),
])
def test_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                   needle: str) -> None:
    out = tmp_path / "never"
    extra = ["--out", str(out)] if argv[0] in ("fuzz", "train") else []
    assert cli.main([*argv, *extra]) == 2
    assert needle in _one_line(capsys)
    assert not out.exists()  # nothing left behind


@pytest.mark.parametrize("kind", ["file", "under-proc", "under-file", "read-only"])
def test_bad_out_folder(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    if kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    f = tmp_path / "afile"
    f.write_text("")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    out = {"file": f, "under-proc": Path("/proc/cowenv-nonexistent/x"),
           "under-file": f / "sub", "read-only": ro}[kind]
    assert cli.main(["fuzz", "--budget", "10", "--quiet", "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert line.startswith("--out: ") and str(out) in line and "expected" in line


def test_budget_cannot_shrink(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    base = ["fuzz", "--workers", "1", "--geometry", "small", "--quiet", "--json",
            "--out", str(out), "--no-minimise"]
    assert cli.main([*base, "--budget", "300"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--budget", "100"]) == 2
    assert "--budget: expected >= 300" in _one_line(capsys)
    st = json.loads((out / "campaign.json").read_text())
    assert st["budget"] == 300 and st["status"] == "finished"


def test_workers_above_cpu_count_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cowenv.campaign import usable_cpus

    n = usable_cpus() + 1
    assert cli.main(["fuzz", "--workers", str(n), "--budget", str(n * 20), "--geometry",
                     "small", "--quiet", "--json", "--no-minimise",
                     "--out", str(tmp_path / "w")]) == 0
    err = capsys.readouterr().err
    assert f"warning: --workers {n} is more than the {n - 1} CPU(s)" in err


@pytest.mark.parametrize("cmd", ["minimize", "trace"])
def test_output_folder_is_not_created(tmp_path: Path, capsys: pytest.CaptureFixture,
                                      cmd: str) -> None:
    dest = tmp_path / "nonexistent" / "dir" / "x.yaml"
    src = ROOT / "tests" / "data" / "cow-pte-fault-lock.yaml"
    assert cli.main([cmd, str(src), "-o", str(dest)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"{dest}: cannot write (-o: no such folder"), line
    assert not (tmp_path / "nonexistent").exists()


# ------------------------------------------------------------------ campaign lock and orphans
def _fuzz_cmd(out: Path, budget: int = 10**7, max_steps: int = 256) -> list[str]:
    return [sys.executable, "-m", "cowenv", "fuzz", "--workers", "2", "--budget", str(budget),
            "--geometry", "small", "--flaws", FLAWS, "--out", str(out), "--quiet",
            "--max-steps", str(max_steps)]


def _wait(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout}s")


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``, recursively."""
    out: list[int] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out + [g for c in out for g in _children(c)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _findings(out: Path) -> int:
    try:
        return len(json.loads((out / "index.json").read_text())["findings"])
    except (OSError, ValueError, KeyError):
        return 0


def test_second_campaign_on_the_same_folder_is_refused(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    # SIGINT back to its default in the child (a background shell starts it ignored).
    proc = subprocess.Popen(_fuzz_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Locked, campaign.json written and the workers started: the campaign runs.
        _wait(lambda: lock_holder(out) == proc.pid and campaign_status(out) == "running"
              and len(_children(proc.pid)) >= 2, 60, proc)
        assert cli.main(["fuzz", "--workers", "2", "--budget", str(10**7), "--geometry",
                         "small", "--flaws", FLAWS, "--out", str(out), "--quiet"]) == 2
        line = _one_line(capsys)
        assert line == (f"--out: {out} is in use by another campaign (pid {proc.pid}); wait "
                        "for it to end or use another --out")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert lock_holder(out) is None and campaign_status(out) == "interrupted"


def test_sigkill_leaves_no_orphans_and_status_tells_the_truth(tmp_path: Path) -> None:
    out = tmp_path / "c"
    # Long episodes: a worker's own parent-alive check (at episode ends) comes too late,
    # and the minimiser is busy with long schedules; only PR_SET_PDEATHSIG stops them.
    proc = subprocess.Popen(_fuzz_cmd(out, max_steps=50_000), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    # Wait until the workers run and the minimiser works on a finding.
    _wait(lambda: _findings(out) >= 1 and len(_children(proc.pid)) >= 4, 90, proc)
    kids = _children(proc.pid)
    assert len(kids) >= 4, kids  # 2 workers, the minimiser, multiprocessing's tracker
    raw = json.loads((out / "campaign.json").read_text())
    assert raw["status"] == "running" and raw["pid"] == proc.pid
    proc.kill()
    proc.wait(timeout=10)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10.0 and any(_alive(k) for k in kids):
        time.sleep(0.02)
    assert not [k for k in kids if _alive(k)], "child processes outlived the SIGKILLed parent"
    # campaign.json still says running (nobody could rewrite it) but the truth is known.
    assert json.loads((out / "campaign.json").read_text())["status"] == "running"
    assert campaign_status(out) == "interrupted"


def test_next_start_reports_a_killed_session(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    argv = ["fuzz", "--workers", "1", "--budget", "300", "--geometry", "small",
            "--out", str(out), "--no-minimise", "--json"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    st = json.loads((out / "campaign.json").read_text())
    st["status"], st["pid"] = "running", 2**22 + 7  # as a SIGKILLed session leaves it
    (out / "campaign.json").write_text(json.dumps(st))
    assert campaign_status(out) == "interrupted"
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"the previous session (pid {2**22 + 7}) was killed while running" in err
    assert json.loads((out / "campaign.json").read_text())["status"] == "finished"


def test_lock_is_released_after_a_campaign(tmp_path: Path) -> None:
    from cowenv.campaign import CampaignConfig

    cfg = CampaignConfig(workers=1, budget=50, env_kwargs={"geometry": "small"},
                         minimise=False)
    run_campaign(cfg, tmp_path, show=False)
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert lock_holder(tmp_path) is None
    run_campaign(cfg, tmp_path, show=False)  # the same process may start it again


# ------------------------------------------------------------------ replay's verdict
def test_replay_verdict_names_the_files_own_signature(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    # A flaw scenario whose first violation is not the one it expects.
    src = ROOT / "scenarios" / "flaws" / "walker-skips-break.yaml"
    sc = load_scenario(src)
    rep = replay(sc)
    first = rep.execution.violations[0].signature
    own = f"{sc.expect.violations[0]['kind']}@{sc.expect.violations[0]['site']}"
    assert first != own
    assert cli.main(["replay", str(src)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"reproduced: {src}: {own} at step "), line
    assert f"; first violation seen: {first} at step " in line
    assert cli.main(["replay", str(src), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [v["signature"] for v in d["expected"]] == [own]
    assert d["first_violation"]["signature"] == first
    assert d["config"]["variant"] == "cowpte"


# ------------------------------------------------------------------ file modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    src = ROOT / "tests" / "data" / "cow-pte-fault-lock.yaml"
    old = os.umask(umask)
    try:
        assert cli.main(["minimize", str(src), "-o", str(tmp_path / "m.yaml")]) == 0
        assert cli.main(["trace", str(src), "-o", str(tmp_path / "t.json")]) == 0
        if umask == 0o022:
            cfg_argv = ["fuzz", "--workers", "1", "--budget", "6000", "--geometry", "small",
                        "--flaws", FLAWS, "--out", str(tmp_path / "c"), "--quiet", "--json"]
            assert cli.main(cfg_argv) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "m.yaml", tmp_path / "t.json"]
    if umask == 0o022:
        c = tmp_path / "c"
        files += [c / "campaign.json", c / "index.json", *c.glob("*.yaml"),
                  *(c / ".campaign").glob("*.json")]
        assert len(files) > 5
    for f in files:
        assert f.stat().st_mode & 0o777 == mode, (f, oct(f.stat().st_mode))


# ------------------------------------------------------------------ scenario run over many files
def test_scenario_run_bad_file_is_a_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "suite"
    d.mkdir()
    (d / "a-good.yaml").write_text(SMALL)
    (d / "b-bad.yaml").write_text(SMALL.replace("do: write", "do: frobnicate"))
    (d / "c-good.yaml").write_text(SMALL.replace("name: small", "name: small2"))
    missing = tmp_path / "missing.yaml"
    assert cli.main(["scenario", "run", str(d), str(missing)]) == 2
    cap = capsys.readouterr()
    errs = cap.err.strip().splitlines()
    assert len(errs) == 2
    assert errs[0].startswith(f"{d / 'b-bad.yaml'}: steps[1].do: unknown operation")
    assert errs[1] == f"{missing}: no such file or folder"
    assert "2 passed, 0 failed, 2 bad input" in cap.out
    for name in ("a-good.yaml", "b-bad.yaml", "c-good.yaml", "missing.yaml"):
        assert name in cap.out
    assert cap.out.count("PASS") == 2 and cap.out.count("ERROR") == 2
    assert cli.main(["scenario", "run", str(d), "--json"]) == 2
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["passed"] for r in rows] == [True, False, True]
    assert rows[1]["bad_input"] is True and "unknown operation" in rows[1]["error"]
    assert rows[0]["config"]["nr_frames"] == 64 and rows[0]["preset"] == "classic"


def test_piped_tables_keep_names_whole(tmp_path: Path) -> None:
    long = "a-scenario-with-a-rather-long-name-" * 4
    p = tmp_path / f"{long}.yaml"
    p.write_text(SMALL)
    r = subprocess.run([sys.executable, "-m", "cowenv", "scenario", "run", str(p)],
                       capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert str(p) in r.stdout  # on one line, not folded


# ------------------------------------------------------------------ the scenario format
FORK_AS = """version: 1
name: fork-as
config: {preset: classic, geometry: small, nr_frames: 64}
steps:
  - {tid: 1, do: mmap, args: {addr: 0x100000, length: 0x1000}}
  - {tid: 1, do: write, args: {addr: 0x100000}, as: FILL, expect: ok}
  - {tid: 1, do: exit}
  - {tid: 2, do: mmap, args: {addr: 0x900000, length: 0x1000}}
expect: {violation: null}
"""


def test_fork_as_names_the_childs_thread(tmp_path: Path) -> None:
    text = """version: 1
name: fork-as
config: {preset: classic, geometry: small, nr_frames: 64, max_threads: 4}
steps:
  - {tid: 1, do: clone, as: T2, expect: {min: 2, max: 2}}
  - {tid: T2, do: exit}
  - {tid: 1, do: mmap, args: {addr: 0x100000, length: 0x1000}}
  - {tid: 1, do: write, args: {addr: 0x100000}, as: FILL, expect: ok}
  - {tid: 1, do: fork, as: CHILD, expect: {min: 1}}
  - {tid: CHILD, do: read, args: {addr: 0x100000}, expect: FILL}
  - {tid: CHILD, start: write, args: {addr: 0x100000}}
  - {tid: CHILD, finish: true}
  - {tid: CHILD, do: mprotect, args: {addr: 0x900000, length: 0x1000, prot: r},
     expect: any-errno}
  - {tid: CHILD, do: exit}
  - {tid: 1, do: exit}
expect: {violation: null}
"""
    p = tmp_path / "f.yaml"
    p.write_text(text)
    sc = load_scenario(p)
    r = run_scenario(sc)
    assert r.passed and r.error is None, (r.error, r.violations)
    assert replay(sc).reproduced
    # The child is tid 2: T2 freed it. A wrong expectation shows as a selftest violation.
    bad = load_scenario_text(tmp_path, text.replace("expect: any-errno", "expect: ok"))
    r = run_scenario(bad)
    assert not r.passed and r.violations[0].kind == "selftest"
    assert "expected ok (>= 0)" in r.violations[0].message


def load_scenario_text(tmp_path: Path, text: str):  # noqa: ANN201
    p = tmp_path / "x.yaml"
    p.write_text(text)
    return load_scenario(p)


@pytest.mark.parametrize("step, needle", [
    ("{tid: CHILD, do: exit}", "steps[3].tid: 'CHILD' is not a thread name bound by an "
                               "earlier fork or clone"),
    ("{tid: 1, do: read, args: {addr: 0x100000}, expect: {min: 3, max: 1}}",
     "steps[3].expect: expected an int, zero, ok, any-errno"),
    ("{tid: 1, do: read, args: {addr: 0x100000}, expect: {min: x}}", "steps[3].expect"),
    ("{tid: 1, do: fork, as: ok}", "steps[3].as: expected a name (not kswapd"),
])
def test_format_errors(tmp_path: Path, capsys: pytest.CaptureFixture, step: str,
                       needle: str) -> None:
    p = tmp_path / "e.yaml"
    p.write_text(FORK_AS.replace("{tid: 2, do: mmap, args: {addr: 0x900000, length: 0x1000}}",
                                 step))
    assert cli.main(["scenario", "run", str(p)]) == 2
    assert needle in _one_line(capsys)


def test_expect_by_variant_own_preset_rule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "o.yaml"
    p.write_text(SMALL + "expect_by_variant: {classic: {violation: {kind: isolation, "
                         "site: user_access}}}\n")
    assert cli.main(["scenario", "run", str(p)]) == 2
    assert "expect_by_variant.classic: the file's own preset" in _one_line(capsys)
    p.write_text(SMALL + "expect_by_variant: {classic: {violation: null}}\n")  # equal: fine
    assert cli.main(["scenario", "run", str(p)]) == 0


def test_labels_command(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["labels", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert cli.main(["labels", "--variant", "classic"]) == 0
    classic = capsys.readouterr().out.split()
    assert cli.main(["labels", "--variant", "as-posted"]) == 0
    cow = capsys.readouterr().out.split()
    assert set(classic) < set(cow) == set(every)
    assert "wp_page_copy:copied" in classic
    assert "handle_cow_pte_fault:pmd_cleared" in cow
    assert "handle_cow_pte_fault:pmd_cleared" not in classic
    from cowenv.catalogue import label_vocabulary

    assert set(every) == set(label_vocabulary())
    assert cli.main(["labels", "--variant", "newest"]) == 2
    assert "--variant: expected one of" in _one_line(capsys)


# ------------------------------------------------------------------ README usage lines
def _readme_usage() -> dict[str, list[set[str]]]:
    """Flags of each README usage line ``    .venv/bin/cowenv CMD ...`` (with continuations)."""
    import re

    out: dict[str, list[set[str]]] = {}
    lines = (ROOT / "README.md").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"    \.venv/bin/cowenv (scenario run|[a-z]+)\b(.*)", line)
        if not m:
            continue
        text = m.group(2).split("#")[0]
        j = i + 1
        while j < len(lines) and re.match(r"        \[", lines[j]):
            text += " " + lines[j]
            j += 1
        out.setdefault(m.group(1), []).append(set(re.findall(r"(?<![\w-])(--[a-z-]+|-o)\b",
                                                             text)))
    return out


def _help_flags(cmd: str, capsys: pytest.CaptureFixture) -> set[str]:
    import re

    with pytest.raises(SystemExit):
        cli.main([*cmd.split(), "--help"])
    text = capsys.readouterr().out
    return set(re.findall(r"(?<![\w-])(--[a-z-]+|-o)\b", text)) - {"--help"}


def test_readme_usage_lines_match_help(capsys: pytest.CaptureFixture) -> None:
    usage = _readme_usage()
    cmds = ["scenario run", "replay", "minimize", "trace", "labels", "fuzz", "train",
            "explore", "export", "difftest"]
    assert set(usage) == set(cmds)
    for cmd in cmds:
        helped = _help_flags(cmd, capsys)
        if cmd in ("minimize", "trace", "export"):
            helped -= {"--output"}  # -o is the spelling the README uses
        full = max(usage[cmd], key=len)
        assert full == helped, (cmd, full ^ helped)  # the complete line: every flag
        for flags in usage[cmd]:  # and no line names a flag --help does not know
            assert flags <= helped | {"--output"}, (cmd, flags - helped)


# ------------------------------------------------------------------ benchmarks' quick mode
def test_fork_cost_quick_never_writes_committed_results(tmp_path: Path) -> None:
    committed = ROOT / "benchmarks" / "out" / "fork_cost.png"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fork_cost.py"), "--quick",
                        "--no-ppo", "--budget", "2", "--json"], capture_output=True, text=True,
                       env=dict(_env(), TMPDIR=str(tmp_path)), timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    plot = Path(json.loads(r.stdout)["plot"])
    assert plot.exists() and tmp_path in plot.parents
    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert after == before


@pytest.mark.parametrize("argv", [["fuzz", "--out", ""], ["train", "--out", ""],
                                  ["train", "--log-dir", " "]])
def test_empty_paths_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert "expected a" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []  # not even a .lock in the current folder
