"""Systematic exploration: preemption bounding, sleep sets, replayable findings, certificates."""

from __future__ import annotations

import json

from cowenv.cli import main
from cowenv.explore import Footprint, explore, programs_of
from cowenv.replay import replay
from cowenv.scenario import load_scenario, parse_scenario

FLAW = "scenarios/flaws/fault-asserts-write-lock.yaml"


def test_programs_keep_each_threads_operations_in_order():
    sc = load_scenario("scenarios/flaws/mprotect-ignores-break-failure.yaml")
    progs = programs_of(sc)
    assert [it.op for it in progs[1]] == ["mmap", "write", "prctl_cow_pte", "fork", "mprotect",
                                          "read", "exit"]
    assert progs[1][4].events == [1]  # the fail_nth belongs to the mprotect after it
    assert [it.op for it in progs[2]] == ["exit"]


def test_finds_the_flaw_with_a_replayable_schedule_and_certifies_fixed():
    sc = load_scenario(FLAW)
    res = explore(sc, bound=1)
    sigs = {f.signature: f for f in res.findings}
    assert "lock-discipline@handle_cow_pte_fault" in sigs
    f = sigs["lock-discipline@handle_cow_pte_fault"]
    assert f.preemptions == 0
    rep = replay(parse_scenario(f.schedule))
    assert rep.reproduced, rep.summary()
    cert = explore(sc, bound=1, variant="fixed")
    assert cert.findings == [] and cert.complete
    assert cert.interleavings >= 2 and cert.states > 10 and cert.transitions > 0


def test_bound_and_reduction_change_the_work_not_the_verdict():
    sc = load_scenario(FLAW)
    runs = {(b, por): explore(sc, bound=b, por=por) for b in (0, 1) for por in (True, False)}
    for b in (0, 1):
        assert {f.signature for f in runs[(b, True)].findings} == \
               {f.signature for f in runs[(b, False)].findings}
        assert runs[(b, True)].interleavings <= runs[(b, False)].interleavings
    assert runs[(0, False)].interleavings < runs[(1, False)].interleavings
    assert runs[(1, True)].pruned_sleep > 0


def test_footprints_conflict_on_shared_locks_and_read_write_only():
    a = Footprint(frozenset({"mm1.mmap_lock"}), frozenset(), frozenset({("vmas", 1)}))
    b = Footprint(frozenset(), frozenset({("vmas", 1)}), frozenset({("vmas", 1)}))
    c = Footprint(frozenset({"mm1.mmap_lock"}), frozenset(), frozenset())
    d = Footprint(frozenset(), frozenset(), frozenset({("vmas", 1)}))
    assert a.conflicts(b) and a.conflicts(c) and not d.conflicts(a)
    assert Footprint(frozenset(), frozenset(), frozenset(), everything=True).conflicts(d)


def test_cli_json_and_exit_codes(capsys, tmp_path):
    assert main(["explore", FLAW, "--preemptions", "0", "--json", "--out", str(tmp_path)]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["bound"] == 0 and d["findings"]
    assert list(tmp_path.glob("*.yaml"))
    assert main(["explore", FLAW, "--preemptions", "0", "--variant", "fixed"]) == 0
    assert "certificate" in capsys.readouterr().out
    assert main(["explore", FLAW, "--preemptions", "-1"]) == 2


def test_each_signature_is_reported_with_its_fewest_preemptions():
    """DFS meets swapin's race first through a preempted run; a 0-preemption run exists."""
    sc = load_scenario("scenarios/flaws/swapin-ignores-break-failure.yaml")
    b0 = {f.signature: f.preemptions for f in explore(sc, bound=0).findings}
    b1 = {f.signature: f.preemptions for f in explore(sc, bound=1).findings}
    assert "shared-table-write@do_swap_page" in b0
    assert set(b0) <= set(b1)
    assert all(b1[s] == 0 for s in b0)
