"""The real kernel as the reference: exported C reproducers and the differential test.

Tests that need a C compiler skip with a clear message where none is present; tests that
need Linux's /proc interfaces skip elsewhere.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cowenv import difftest as dt
from cowenv.export import build, compiler, export_c, lower
from cowenv.kernel import make_kernel
from cowenv.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = sorted((ROOT / "scenarios" / "conformance").rglob("*.yaml"))

needs_cc = pytest.mark.skipif(compiler() is None,
                              reason="no C compiler (set CC or install gcc): exported "
                                     "programs cannot be built here")
needs_linux = pytest.mark.skipif(platform.system() != "Linux"
                                 or not os.path.exists("/proc/self/pagemap"),
                                 reason="needs a Linux kernel with /proc/PID/pagemap")


# ------------------------------------------------------------------------------ export
@needs_cc
@needs_linux
@pytest.mark.parametrize("path", CONFORMANCE, ids=lambda p: p.stem)
def test_exported_conformance_scenario_compiles_and_passes_on_this_kernel(
        path: Path, tmp_path: Path) -> None:
    src = tmp_path / "repro.c"
    src.write_text(export_c(load_scenario(path)))
    exe = tmp_path / "repro"
    build(src, exe)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS step" in r.stdout
    assert " 0 failed" in r.stdout.splitlines()[-1]


@needs_cc
@needs_linux
def test_exported_program_fails_when_the_kernel_disagrees(tmp_path: Path) -> None:
    """The checks can fail: expect a wrong value and the program says FAIL, exits 1."""
    sc = load_scenario(ROOT / "scenarios" / "conformance" / "basic-cow-after-fork.yaml")
    for s in sc.steps:
        if s.get("check") == "No leak from parent into child":
            s["expect"] = {"not": "OLD"}
    src = tmp_path / "bad.c"
    src.write_text(export_c(sc))
    build(src, tmp_path / "bad")
    r = subprocess.run([str(tmp_path / "bad")], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 1
    assert "FAIL step 6: No leak from parent into child" in r.stdout


def test_export_header_explains_races_and_lowering_keeps_the_order() -> None:
    sc = load_scenario(ROOT / "scenarios" / "flaws" / "gup-fast-fork-race.yaml")
    src = export_c(sc)
    assert "collide mode" in src and "RACES: 1 group" in src
    assert "#define PR_SET_COW_PTE 65" in src
    low = lower(sc.config, sc.steps)
    lines = low.text.splitlines()
    assert lines[0].endswith(" 100")  # collide mode: the schedule runs in a loop
    race = lines.index("race 2")
    assert "o=pin" in lines[race + 1] and "o=fork nt=3" in lines[race + 2]


def test_sequential_export_runs_once() -> None:
    sc = load_scenario(ROOT / "scenarios" / "conformance" / "basic-cow-after-fork.yaml")
    low = lower(sc.config, sc.steps)
    assert low.races == 0 and low.text.splitlines()[0].endswith(" 1")
    assert "o=fork nt=2" in low.text and "x=eq:OLD" in low.text


def test_export_lowers_issue13_operations() -> None:
    sc = load_scenario(ROOT / "scenarios" / "upstream" / "mremap-grow-shared.yaml")
    text = lower(sc.config, sc.steps).text
    assert "o=mremap a=0x100000 l=0x2000 nl=0x4000 m=0 na=-1" in text
    assert "o=mremap a=0x100000 l=0x2000 nl=0x3000 na=0x200000 m=1" in text
    assert "op i=7 t=2 o=write" in text  # the fork child `C` runs as model thread 2
    sc = load_scenario(ROOT / "scenarios" / "upstream" / "move-pages-status.yaml")
    text = lower(sc.config, sc.steps).text
    assert "o=move_pages a=0x100000 l=0x7000 ms=1 ma=0 ss=0,-14,-14,-2,0,-14,-14" in text
    assert "ss=u,u,-14 x=v:1" in text
    sc = load_scenario(ROOT / "scenarios" / "upstream" / "fail-nth-per-thread.yaml")
    lines = lower(sc.config, sc.steps).text.splitlines()
    assert "failnth 1 t=1" in lines and "failnth 1 t=2" in lines
    sc = load_scenario(ROOT / "scenarios" / "upstream" / "clear-refs-cow-pte.yaml")
    text = lower(sc.config, sc.steps).text
    assert "o=clear_refs" in text and "ty=4" in text and "o=pagemap" in text


@pytest.mark.parametrize("path,words", [
    ("upstream/numa-hinting.yaml", "numa_hint has no userspace form"),
    ("upstream/migration-pinned-page.yaml", "compact has no userspace form"),
    ("flaws/nr-ptes-on-oom.yaml", "fail_nth without tid has no userspace form"),
])
def test_export_refuses_what_has_no_userspace_form(path: str, words: str) -> None:
    from cowenv.export import ExportError
    sc = load_scenario(ROOT / "scenarios" / path)
    with pytest.raises(ExportError, match=words) as e:
        export_c(sc)
    assert "\n" not in str(e.value)


@needs_cc
@needs_linux
def test_exported_mremap_of_a_shared_mapping_passes_on_this_kernel(tmp_path: Path) -> None:
    src = tmp_path / "grow.c"
    src.write_text(export_c(load_scenario(ROOT / "scenarios" / "upstream" /
                                          "mremap-grow-shared.yaml")))
    build(src, tmp_path / "grow")
    r = subprocess.run([str(tmp_path / "grow")], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS step 5: SIGBUS past the shmem file's size" in r.stdout


# ------------------------------------------------------------------------------ model fixes
def test_model_shmem_read_fault_maps_the_fault_around_window() -> None:
    sc = load_scenario(ROOT / "scenarios" / "conformance" / "linux" /
                       "shmem-read-fault-around.yaml")
    steps = [s for s in sc.steps if "do" in s]
    child_read = next(i for i, s in enumerate(steps) if s["tid"] == 2)
    m = dt.model_run([{k: v for k, v in s.items() if k not in ("expect", "check")}
                      for s in steps[:child_read + 1]])
    # process #1 (the child) mapped both page-cache pages with one read fault
    slot0 = dt.Obs(child_read, "smaps", 1, 0)
    assert m.obs[slot0] == (8, 0, 0, 0)
    assert m.obs[dt.Obs(child_read, "pagemap", 1, 0)] == "11000000"


def test_model_mprotect_and_madvise_without_change_do_not_split() -> None:
    k = make_kernel(dt.CONFIG, trace=False)
    k.do(1, "mmap", addr=0x100000, length=0x4000)
    for advice in ("KEEPONFORK", "DOFORK"):
        assert k.do(1, "madvise", addr=0x101000, length=0x1000, advice=advice) == 0
        assert len(k.procs[1].mm.vmas) == 1
    assert k.do(1, "mprotect", addr=0x101000, length=0x1000, prot="rw") == 0
    assert len(k.procs[1].mm.vmas) == 1
    assert k.do(1, "mprotect", addr=0x101000, length=0x1000, prot="r") == 0
    assert len(k.procs[1].mm.vmas) == 3


# ------------------------------------------------------------------------------ difftest
def test_mismatch_report_is_readable() -> None:
    steps = [{"tid": 1, "do": "mmap", "args": {"addr": 0x100000, "length": 0x1000}},
             {"tid": 1, "do": "read", "args": {"addr": 0x100000}}]
    m = dt.model_run(steps)
    kernel = dict(m.obs)
    kernel[dt.Obs(1, "ret")] = -14
    kernel[dt.Obs(1, "pagemap", 0, 0)] = "50000000"
    diffs = dt.compare(m.obs, kernel, m.steps)
    assert [d.obs.kind for d in diffs] == ["ret", "pagemap"]
    first = diffs[0].describe()
    assert "step 1: return value after read {'addr': 1048576} on thread 1" in first
    assert "model 0" in first and "kernel -14 (-EFAULT)" in first
    assert "exclusively mapped" in diffs[1].describe()
    unknown, known = dt.classify(diffs)
    assert len(unknown) == 2 and not known
    rep = dt.Report(kernel="x", schedules=1, unknown=1, mismatching=1,
                    findings=[{"name": "f", "steps": 2, "original_steps": 9,
                               "schedule": steps, "first_difference": first}])
    text = dt.format_report(rep)
    assert "UNKNOWN f (2 of 9 steps" in text and "thread 1: read" in text and first in text


def test_known_divergences_match_only_their_pattern() -> None:
    lazy = dt.Diff(dt.Obs(3, "smaps", 0, 1), (8, 8, 0, 8), (8, 8, 0, 4), None)
    assert [kd.id for kd in dt.KNOWN_DIVERGENCES if kd.matches(lazy, [])] == [
        "lazyfree-lru-batch"]
    more = dt.Diff(dt.Obs(3, "smaps", 0, 1), (8, 8, 0, 4), (8, 8, 0, 8), None)
    rss = dt.Diff(dt.Obs(3, "smaps", 0, 1), (8, 8, 0, 8), (4, 4, 0, 4), None)
    zero = dt.Diff(dt.Obs(3, "pagemap", 1, 0), "00050000", "01050000", None)
    parent = dt.Diff(dt.Obs(3, "pagemap", 0, 0), "00050000", "01050000", None)
    lost = dt.Diff(dt.Obs(3, "pagemap", 1, 0), "01050000", "00050000", None)
    assert [kd.id for kd in dt.KNOWN_DIVERGENCES if kd.matches(zero, [])] == [
        "no-vma-merge"]
    for d in (more, rss, parent, lost):
        assert not any(kd.matches(d, []) for kd in dt.KNOWN_DIVERGENCES), d
    dev = [{"tid": 1, "do": "dev_write", "args": {"pin": "P"}}] * 4
    assert [kd.id for kd in dt.KNOWN_DIVERGENCES if kd.matches(more, dev)] == [
        "dma-write-not-dirty"]
    assert not any(kd.matches(more, [{"tid": 1, "do": "write"}] * 4)
                   for kd in dt.KNOWN_DIVERGENCES)
    for kd in dt.KNOWN_DIVERGENCES:
        assert len(kd.reason) > 80


def test_random_schedules_are_sequential_legal_and_varied() -> None:
    rng = np.random.default_rng(0)
    ops: set[str] = set()
    for _ in range(40):
        steps = dt.random_schedule(rng, 20)
        assert all("do" in s for s in steps)
        m = dt.model_run(steps)  # strict: raises if a step is illegal
        assert len(m.steps) == len(steps)
        ops |= {s["do"] for s in steps}
    assert ops >= {"mmap", "munmap", "mprotect", "madvise", "read", "write", "fork",
                   "exit", "pin", "dev_read", "dev_write", "unpin"}


@needs_cc
@needs_linux
def test_difftest_a_few_hundred_schedules_finds_no_unknown_mismatch() -> None:
    rep = dt.run_difftest(300, seed=1234, out_dir=None, max_ops=16)
    assert rep.schedules == 300 and rep.errors == 0
    assert rep.observations > 10_000
    assert rep.unknown == 0, dt.format_report(rep)
    assert set(rep.known_by_reason) <= {kd.id for kd in dt.KNOWN_DIVERGENCES}


@needs_cc
@needs_linux
def test_executor_reports_values_errors_and_kernel_state() -> None:
    ex = dt.Executor()
    try:
        steps = [{"tid": 1, "do": "mmap", "args": {"addr": 0x100000, "length": 0x2000}},
                 {"tid": 1, "do": "write", "args": {"addr": 0x100000}},
                 {"tid": 1, "do": "fork"},
                 {"tid": 2, "do": "read", "args": {"addr": 0x100000}},
                 {"tid": 2, "do": "write", "args": {"addr": 0x101000}},
                 {"tid": 1, "do": "read", "args": {"addr": 0x104000}},
                 {"tid": 1, "do": "pin", "args": {"addr": 0x100000, "write": True},
                  "as": "P"},
                 {"tid": 1, "do": "dev_write", "args": {"pin": "P"}},
                 {"tid": 1, "do": "read", "args": {"addr": 0x100000}}]
        obs, err = dt.kernel_run(ex, steps)
        assert not err
        assert [obs[dt.Obs(i, "ret")] for i in range(len(steps))] == [
            0x100000, 1, "ok", 1, 2, -14, "ok", 3, 3]
        assert obs[dt.Obs(2, "pagemap", 0, 0)] == "10000000"  # shared after fork
        assert obs[dt.Obs(4, "smaps", 1, 0)] == (8, 8, 0, 0)
        assert obs[dt.Obs(4, "pagemap", 1, 0)] == "15000000"
        assert obs[dt.Obs(8, "pagemap", 0, 0)] == "50000000"  # pinned: copied at COW
    finally:
        ex.close()


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    from cowenv.cli import main

    assert main(["export", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x.c")]) == 2
    assert main(["difftest", "--n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cannot read file" in err[0] and "--n" in err[1]
    assert main(["export", str(ROOT / "scenarios" / "conformance" / "basic-cow-after-fork.yaml"),
                 "-o", str(tmp_path / "ok.c")]) == 0
    assert "#define COWRT_PROGRAM cowrt_program" in (tmp_path / "ok.c").read_text()
