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
    runs = {(b, por): explore(sc, bound=b, por=por, cache=False)
            for b in (0, 1) for por in (True, False)}
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


def test_new_operations_flaw_found_and_fixed_certified():
    """mremap with an injected allocation failure (issue 13's walkers): found, replayable,
    and ``fixed`` certified on the same operations."""
    sc = load_scenario("scenarios/flaws/mremap-ignores-break-failure.yaml")
    res = explore(sc, bound=1)
    sigs = {f.signature: f for f in res.findings}
    assert "shared-table-write@move_ptes" in sigs
    assert sigs["shared-table-write@move_ptes"].preemptions == 0
    rep = replay(parse_scenario(sigs["shared-table-write@move_ptes"].schedule))
    assert rep.reproduced, rep.summary()
    cert = explore(sc, bound=1, variant="fixed")
    assert cert.findings == [] and cert.complete and cert.interleavings + cert.pruned_cache > 1


def test_per_thread_fail_nth_stays_with_its_thread():
    sc = load_scenario("scenarios/upstream/fail-nth-per-thread.yaml")
    progs = programs_of(sc)
    marked = {tid: [it.op for it in p if it.thread_fail_nth is not None]
              for tid, p in progs.items()}
    assert marked[1] and marked[2]
    assert all(not it.events for p in progs.values() for it in p)


def _run_op(run, tid):
    """Run thread ``tid``'s next operation to its end; return the union of its writes."""
    from cowenv.explore import _diff, _snapshot

    w: set = set()
    run.execute(tid)
    while run.k.threads[tid].gen is not None:
        before = _snapshot(run.k)
        run.execute(tid)
        w |= _diff(before, _snapshot(run.k))
    return w


def test_tlb_flush_conflicts_with_the_flushed_cpus_access():
    """A flush writes the other CPUs' TLBs; their accesses read their own TLB and the
    frames it caches (a TLB hit reads no page table)."""
    from cowenv.explore import Run, _reads

    sc = load_scenario("scenarios/upstream/tlb-mprotect-flushes.yaml")
    run = Run(sc.config, programs_of(sc))
    for tid in (1, 1, 2):  # mmap, clone, thread 2's store (fills its TLB)
        _run_op(run, tid)
    tlb2 = dict(run.k.threads[2].tlb)
    assert tlb2
    w = _run_op(run, 1)  # mprotect(PROT_READ): change_pte_range, then the flush
    assert ("tlb", 2) in w
    run.execute(2)  # thread 2 starts its next store
    r = _reads(run.k, 2)
    assert r is not None and ("tlb", 2) in r


def test_reads_cover_mremap_destination_and_other_mms():
    from cowenv.explore import Run, _reads

    sc = load_scenario("scenarios/flaws/mremap-dst-shared.yaml")
    run = Run(sc.config, programs_of(sc))
    for _ in range(5):  # mmap, mmap, write, prctl, fork
        _run_op(run, 1)
    run.execute(1)  # mremap starts
    assert run.k.threads[1].op == "mremap"
    r = _reads(run.k, 1)
    mm = run.k.procs[1].mm
    assert r is not None
    assert {("pmd", (mm.id, i)) for i in mm.pmd} <= r  # the whole mm, destination included


def test_reads_of_rmap_and_every_mm_walkers_are_global():
    """MADV_PAGEOUT (rmap walks over other mms) and swapoff (every mm) conflict with all."""
    from cowenv.explore import Run, _reads

    sc = load_scenario("scenarios/upstream/swapoff.yaml")
    run = Run(sc.config, programs_of(sc))
    for _ in range(4):  # mmap and three stores
        _run_op(run, 1)
    run.execute(1)
    assert run.k.threads[1].op == "madvise"
    assert _reads(run.k, 1) is None


def test_shortest_trigger_stops_at_the_first_run_that_shows_the_flaw():
    from cowenv.explore import shortest_trigger

    sc = load_scenario("scenarios/flaws/mremap-dst-shared.yaml")
    hit, tried = shortest_trigger(sc, {"shared-table-write@move_ptes"}, bound=2)
    assert hit is not None and hit.bound == 0 and len(tried) == 1
    assert hit.stopped and not hit.complete
    full = explore(sc, bound=0)
    assert hit.interleavings < full.interleavings
    none, tried = shortest_trigger(sc, {"no-such@signature"}, bound=1, variant="fixed")
    assert none is None and [r.bound for r in tried] == [0, 1]
    assert all(r.complete and not r.stopped for r in tried)


REDUCE_CASES = ("scenarios/flaws/fault-asserts-write-lock.yaml",
                "scenarios/flaws/swapin-ignores-break-failure.yaml",
                "scenarios/flaws/zap-partial-shared.yaml")


def test_state_cache_keeps_every_signature_and_final_state():
    """State caching prunes revisits, never a verdict: with and without it (each with and
    without snapshots, on the flaw and on fixed, bounds 1 and 2) the violation signatures
    and the set of final states reached (a cached subtree contributes its first visit's)
    are the same, and the cache did prune."""
    pruned = 0
    for path in REDUCE_CASES:
        sc = load_scenario(path)
        for variant in (None, "fixed"):
            for bound in (1, 2):
                for snaps in (False, True):
                    plain = explore(sc, bound, variant, cache=False, snapshots=snaps,
                                    collect_finals=True)
                    cached = explore(sc, bound, variant, cache=True, snapshots=snaps,
                                     collect_finals=True)
                    assert plain.pruned_cache == 0 and plain.complete and cached.complete
                    assert {f.signature for f in plain.findings} == \
                           {f.signature for f in cached.findings}, (path, variant, bound)
                    assert plain.final_states and plain.final_states == cached.final_states
                    assert cached.interleavings <= plain.interleavings
                    pruned += cached.pruned_cache
    assert pruned > 0


def test_snapshots_change_the_cost_not_the_search():
    """Resuming from quiescent snapshots explores exactly the runs re-execution does."""
    for path in REDUCE_CASES:
        sc = load_scenario(path)
        a = explore(sc, 2, "fixed", cache=False, snapshots=False)
        b = explore(sc, 2, "fixed", cache=False, snapshots=True)
        assert (a.interleavings, a.states, a.pruned_sleep, a.pruned_bound) == \
               (b.interleavings, b.states, b.pruned_sleep, b.pruned_bound)
        assert b.restores > 0 and b.transitions < a.transitions
        c = explore(sc, 2, None, cache=False, snapshots=True)
        d = explore(sc, 2, None, cache=False, snapshots=False)
        assert [(f.signature, f.preemptions, f.schedule) for f in c.findings] == \
               [(f.signature, f.preemptions, f.schedule) for f in d.findings]


def test_state_key_is_exact_and_survives_a_snapshot():
    """Equal states get equal keys however they were reached (run on from a restored
    snapshot or from scratch); a different state gets a different key."""
    from cowenv.explore import Run

    sc = load_scenario("scenarios/flaws/zap-partial-shared.yaml")
    progs = programs_of(sc)
    a = Run(sc.config, progs)
    for _ in range(2):
        _run_op(a, 1)
    b = Run.restore(progs, a.snapshot())
    assert a.state_key() == b.state_key()
    _run_op(a, 1)
    assert a.state_key() != b.state_key()
    _run_op(b, 1)
    assert a.state_key() == b.state_key()
    assert a.k.pool.content.tolist() == b.k.pool.content.tolist()


def test_a_thread_waiting_for_a_folio_lock_sleeps():
    """A fault on a migration entry waits for the folio lock (migration_entry_wait): the
    explorer treats it as blocked (no spinning to MAX_DEPTH, no preemption to leave it)."""
    from cowenv.explore import MAX_DEPTH

    sc = load_scenario("scenarios/flaws/fork-shares-migration-entry.yaml")
    res = explore(sc, bound=1, variant="fixed")
    assert res.complete and not res.findings
    assert res.deepest < MAX_DEPTH // 10
    hit = {f.signature: f.preemptions for f in explore(sc, bound=1).findings}
    assert hit.get("accounting@remove_migration_ptes") == 1


def _toy(items, extra):
    for v in items:
        yield from _toy_inner(v + extra)


def _toy_inner(x):
    y = x * 2
    yield y


def _key_of(obj):
    import io
    import pickle

    from cowenv.explore import _KeyPickler

    buf = io.BytesIO()
    _KeyPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def test_state_key_sees_a_suspended_threads_position_locals_and_stack():
    """A thread inside an operation is keyed by its generator chain: code position,
    locals, and the frame's value stack (a loop's iterator position)."""
    def at(items, extra, n):
        g = _toy(items, extra)
        for _ in range(n):
            next(g)
        return g

    same = [at([1, 1, 2], 0, 1), at([1, 1, 2], 0, 1)]
    assert _key_of(same[0]) == _key_of(same[1])
    assert _key_of(at([1, 1, 2], 0, 1)) != _key_of(at([1, 1, 2], 5, 1))  # a local
    # same locals (v == 1, y == 2) and position, iterator one element further on
    assert _key_of(at([1, 1, 2], 0, 1)) != _key_of(at([1, 1, 2], 0, 2))
    assert _key_of(at([1, 1, 2], 0, 2)) != _key_of(at([1, 1, 2], 0, 3))
    ks = _key_of({"a", "b", "c"})
    assert ks == _key_of({"c", "b", "a"})


def _free_pmd_start(variant=None):
    """free-pmd-deferred-flush's set-up (through the fork) run, and its racing operations."""
    from cowenv.explore import OpItem
    from cowenv.minimize import run_lenient
    from cowenv.scenario import override_config

    sc = load_scenario("scenarios/flaws/free-pmd-deferred-flush.yaml")
    cfg = override_config(sc.config, variant, None) if variant else sc.config
    setup = sc.steps[:6]
    assert setup[-1].get("do") == "fork"
    k = run_lenient(cfg, setup).kernel
    progs = {1: [OpItem("munmap", {"addr": 0x100000, "length": 0x8000})],
             2: [OpItem("read", {"addr": 0x100000}), OpItem("read", {"addr": 0x101000})],
             3: [OpItem("exit", {})]}
    return sc, cfg, setup, k, progs


def test_explore_from_a_given_kernel_state_finds_and_replays():
    """A search started from a kernel state (a fuzzer's cut) finds the race, its schedule
    replays after the steps that built that state, and the fixed kernel shows nothing."""
    from cowenv.explore import Run
    from cowenv.minimize import run_lenient

    sc, cfg, setup, k, progs = _free_pmd_start()
    before = len(k.events), k.step_no
    res = explore(sc, 1, start=Run.start_snapshot(k, progs), progs=progs)
    assert (len(k.events), k.step_no) == before  # the start kernel is not touched
    sigs = {f.signature: f for f in res.findings}
    assert "memory-safety@tlb_stale_table" in sigs
    steps = sigs["memory-safety@tlb_stale_table"].schedule["steps"]
    assert {s["tid"] for s in steps} == {1, 2, 3}  # only the window's operations
    again = run_lenient(cfg, [*setup, *steps]).kernel
    assert "memory-safety@tlb_stale_table" in again.signatures
    sc2, _cfg, _setup, k2, progs2 = _free_pmd_start("fixed")
    cert = explore(sc2, 1, start=Run.start_snapshot(k2, progs2), progs=progs2)
    assert cert.complete and not cert.findings and cert.interleavings > 1


def test_explore_start_needs_a_quiescent_kernel_and_max_transitions_stops():
    import pytest

    from cowenv.explore import Run

    sc, _cfg, _setup, k, progs = _free_pmd_start()
    res = explore(sc, 1, start=Run.start_snapshot(k, progs), progs=progs, max_transitions=5)
    assert not res.complete and 5 <= res.transitions < 40
    k.start(1, "read", {"addr": 0x100000})
    with pytest.raises(ValueError, match="quiescent"):
        Run.start_snapshot(k, progs)
