"""The fork cost model: calibration, attribution invariants, determinism, fork_cost objective.

Every figure here comes from running the simulation; the published numbers are only the
targets (BRIEF §3: ≈ 0.0044 s per GiB of fork on both kernels; a write fault after fork
≈ 0.770 µs per page plain and ≈ 0.795 µs with COW PTE; fork of 512 MB "around the same"
on both kernels).
"""

from __future__ import annotations

import numpy as np
import pytest

from cowenv.kernel import Kernel, make_kernel
from cowenv.kernel import cost as C
from cowenv.kernel.config import KernelConfig
from cowenv.workload import random_config, run_random_schedule, teardown

MIB = 1 << 20
BASE = 1 << 32  # 2 MiB aligned


def _kernel(preset: str, mib: int, ptrs: int = 512, oracles: bool = False) -> Kernel:
    pages = mib * MIB // 4096
    cfg = KernelConfig.from_preset(preset, ptrs_per_pte=ptrs, nr_frames=2 * pages + 4096,
                                   nr_swap_slots=0)
    return make_kernel(cfg, oracles=oracles, trace=False)


def _forked(preset: str, mib: int, ptrs: int = 512, oracles: bool = False
            ) -> tuple[Kernel, float]:
    """A populated private mapping of ``mib`` MiB, prctl(PR_SET_COW_PTE), fork.

    Returns the kernel and what the fork cost.
    """
    k = _kernel(preset, mib, ptrs, oracles)
    assert k.do(1, "mmap", addr=BASE, length=mib * MIB, populate=True) == BASE
    assert k.do(1, "prctl_cow_pte") == 0
    before = k.cost.total_ns
    assert k.do(1, "fork") > 0
    return k, k.cost.total_ns - before


def _within(value: float, target: float, tol: float = 0.10) -> bool:
    return abs(value - target) <= tol * abs(target)


# ------------------------------------------------------------------ calibration
@pytest.mark.parametrize("preset", ["classic", "fixed"])
def test_fork_costs_about_4_4_ms_per_gib_on_both_kernels(preset: str) -> None:
    """Pasha Tatashin: ≈ 0.0044 s per GiB of fork on the base and the COW PTE kernel."""
    k, fork_ns = _forked(preset, 1024)
    per_gib_s = fork_ns / 1e9
    assert _within(per_gib_s, C.PASHA_FORK_S_PER_GIB), per_gib_s
    # All of it is fork's own (immediate) cost; nothing deferred yet.
    assert k.cost.immediate_ns == pytest.approx(fork_ns)
    assert k.cost.deferred_ns == 0.0
    # The per-GiB *rate* (fixed per-fork costs cancel) at a smaller size agrees too.
    _, a = _forked(preset, 32)
    _, b = _forked(preset, 64)
    rate = (b - a) * (1024 // 32) / 1e9
    assert _within(rate, C.PASHA_FORK_S_PER_GIB), rate


def test_fork_latency_equal_on_both_kernels_at_512_mb() -> None:
    """Cover letter: fork of 512 MB takes "around 10 ms" in both cases (equal; the
    absolute is another machine's)."""
    _, classic = _forked("classic", 512)
    _, cowpte = _forked("fixed", 512)
    assert _within(cowpte / classic, 1.0), cowpte / classic


@pytest.mark.parametrize("preset,target_us", [("classic", C.V4_WRITE_FAULT_MS_PLAIN * 1e3),
                                              ("fixed", C.V4_WRITE_FAULT_MS_COWPTE * 1e3),
                                              ("as-posted", C.V4_WRITE_FAULT_MS_COWPTE * 1e3)])
def test_write_fault_after_fork_per_page(preset: str, target_us: float) -> None:
    """Cover letter: writing every page after fork, 0.770 µs/page plain, 0.795 with
    COW PTE (one table break per 512 pages). Scaled to 8 MiB (4 full tables)."""
    mib = 8
    pages = mib * MIB // 4096
    k, _ = _forked(preset, mib)
    total0, deferred0 = k.cost.total_ns, k.cost.deferred_ns
    for i in range(pages):
        assert k.do(1, "write", addr=BASE + i * 4096) > 0
    per_page_us = (k.cost.total_ns - total0) / pages / 1e3
    assert _within(per_page_us, target_us), per_page_us
    # Every one of these faults exists because of the fork: all of it is deferred.
    assert (k.cost.deferred_ns - deferred0) == pytest.approx(k.cost.total_ns - total0)
    tables = pages // 512
    breaks = k.cost.deferred.get("cow_break_fixed", 0)
    assert breaks == (0 if preset == "classic" else tables)


def test_cowpte_write_overhead_is_one_table_copy_per_table() -> None:
    """The 0.025 µs/page COW PTE overhead is the table break: (0.795 − 0.770) × 512."""
    pages = 4 * 512
    per_page = {}
    for preset in ("classic", "fixed"):
        k, _ = _forked(preset, 8)
        t0 = k.cost.total_ns
        for i in range(pages):
            k.do(1, "write", addr=BASE + i * 4096)
        per_page[preset] = (k.cost.total_ns - t0) / pages
    diff_us = (per_page["fixed"] - per_page["classic"]) / 1e3
    target = (C.V4_WRITE_FAULT_MS_COWPTE - C.V4_WRITE_FAULT_MS_PLAIN) * 1e3
    assert _within(diff_us, target), diff_us


@pytest.mark.parametrize("ptrs", [512, 8])
@pytest.mark.parametrize("writes", [0, 1, 3])
def test_closed_forms_match_the_simulation(ptrs: int, writes: int) -> None:
    """analytic_fork_cost (used by the benchmark's worst-case ratio) is what the
    simulation charges for: fork N populated tables, then write W pages per table."""
    n_tables = 3
    mib = n_tables * ptrs * 4096 // MIB or 1
    for preset, variant in (("classic", "classic"), ("as-posted", "cowpte"),
                            ("fixed", "cowpte")):
        k = _kernel(preset, max(mib, 1), ptrs, oracles=True)
        length = n_tables * ptrs * 4096
        base = 64 * ptrs * 4096
        k.do(1, "mmap", addr=base, length=length, populate=True)
        k.do(1, "prctl_cow_pte")
        k.do(1, "fork")
        for t in range(n_tables):
            for w in range(writes):
                k.do(1, "write", addr=base + (t * ptrs + w) * 4096)
        want = C.analytic_fork_cost(variant, n_tables, ptrs, writes)
        if preset == "as-posted" and writes:
            # v4's slow path installs its table through pmd_install (pmd_lock + a PMD
            # update) after pmd_clear; the analytic break is the fixed design's.
            want += n_tables * (C.SPIN_LOCK_ROUNDTRIP_NS + C.PMD_UPDATE_NS)
        if preset == "as-posted":
            # v4's fork order (fork-late-wrprotect): pmd_install links the child in a PTL
            # section of its own (one lock round trip and one PMD update more per table)
            # before the entries are processed under the PTL again.
            want += n_tables * (C.SPIN_LOCK_ROUNDTRIP_NS + C.PMD_UPDATE_NS)
        got = k.cost.fork_attributable_ns
        if preset in ("fixed", "as-posted"):
            # Unless the seeded flaw vma-lock-fault-breaks-shared is on (it is not in
            # as-posted), copy_cow_pte_range write-locks the PMD's VMAs before sharing a
            # table: at most one rwsem round trip per table more.
            assert want - 1e-6 <= got <= want + n_tables * C.RWSEM_ROUNDTRIP_NS + 1e-6
        else:
            assert got == pytest.approx(want, rel=1e-9), (preset, ptrs)
        # (As posted, a write fault trips the fault-asserts-write-lock lockdep splat.)
        assert preset == "as-posted" or not k.violations


def test_analytic_worst_ratio_from_the_constants() -> None:
    """The brief's worst pattern loses ≈ 2.3× at x86-64 geometry; a walker that breaks
    without a page copy loses more, and more still on emptied tables."""
    worst = C.analytic_worst_ratio()
    assert 2.0 < worst < 2.7
    assert C.analytic_worst_ratio(4) < worst  # per-fork fixed costs dilute it
    assert C.analytic_walker_ratio() > worst
    assert C.analytic_walker_ratio(present=0) > C.analytic_walker_ratio()


# ------------------------------------------------------------------ attribution
def _partition_holds(k: Kernel) -> None:
    m = k.cost
    cats = set(m.counts) | set(m.immediate) | set(m.deferred) | set(m.unattributed)
    buf = m.buffered()
    for c in sorted(cats):
        parts = (m.immediate.get(c, 0) + m.deferred.get(c, 0) + m.unattributed.get(c, 0)
                 + buf.get(c, 0))
        assert m.counts.get(c, 0) == parts, c
    assert m.fork_attributable_ns == pytest.approx(m.immediate_ns + m.deferred_ns)
    assert m.ns("fork") == pytest.approx(m.fork_attributable_ns)
    assert m.total_ns == pytest.approx(m.immediate_ns + m.deferred_ns + m.ns("unattributed")
                                       + C.ns_of(buf))


@pytest.mark.parametrize("preset", ["classic", "fixed", "as-posted"])
@pytest.mark.parametrize("seed", range(6))
def test_costs_add_up_over_random_schedules(preset: str, seed: int) -> None:
    """Every charge lands in exactly one of immediate / deferred / unattributed (or an
    open fault's buffer), at every step of a random interleaved schedule;
    fork-attributable = immediate + deferred; no fork, no fork-attributable cost."""
    rng = np.random.default_rng(seed)
    k = make_kernel(random_config(rng, preset), trace=False)
    forked = False
    for _ in range(40):
        steps = run_random_schedule(k, rng, 25)
        forked = forked or any(s.get("start") == "fork" for s in steps)
        _partition_holds(k)
    teardown(k, rng)
    # A thread blocked for good (a deadlock a flaw caused, reported) never ends its fault.
    if not any(v.kind == "deadlock" for v in k.violations):
        assert not k.cost.pending()
    _partition_holds(k)
    if not forked:
        assert k.cost.immediate_ns == 0.0 and k.cost.deferred_ns == 0.0
    assert k.cost.total_ns > 0


def test_no_fork_means_no_fork_cost() -> None:
    for preset in ("classic", "fixed"):
        k = _kernel(preset, 4)
        k.do(1, "mmap", addr=BASE, length=4 * MIB, populate=True)
        k.do(1, "prctl_cow_pte")
        for i in range(0, 1024, 37):
            k.do(1, "write", addr=BASE + i * 4096)
        k.do(1, "mprotect", addr=BASE, length=4 * MIB, prot="r")
        k.do(1, "madvise", addr=BASE, length=MIB, advice="DONTNEED")
        assert k.cost.total_ns > 0
        assert k.cost.fork_attributable_ns == 0.0


def test_walker_break_is_deferred_and_classic_pays_nothing() -> None:
    """mprotect after fork: COW PTE breaks every shared table (deferred cost); classic
    changes the PTEs, which fork did not cause."""
    got = {}
    for preset in ("classic", "fixed"):
        k, _ = _forked(preset, 8, oracles=True)
        d0 = k.cost.deferred_ns
        assert k.do(1, "mprotect", addr=BASE, length=8 * MIB, prot="r") == 0
        got[preset] = (k.cost.deferred_ns - d0, k.cost.deferred.get("cow_break_fixed", 0))
        assert not k.violations
    assert got["classic"] == (0.0, 0)
    assert got["fixed"][1] == 4
    assert got["fixed"][0] == pytest.approx(4 * C.cow_break_ns(512))


def test_reuse_after_the_child_exits_is_a_deferred_fault_without_a_copy() -> None:
    k, _ = _forked("classic", 2, oracles=True)
    child = max(k.procs)
    k.do(k.procs[child].tids[0], "exit")
    d0 = dict(k.cost.deferred)
    k.do(1, "write", addr=BASE)
    new = {c: n - d0.get(c, 0) for c, n in k.cost.deferred.items() if n != d0.get(c, 0)}
    assert new.get("fault_entry_exit") == 1
    assert "page_copy" not in new and "page_alloc" not in new


def test_cost_accounting_is_deterministic() -> None:
    snaps = []
    for _ in range(2):
        rng = np.random.default_rng(123)
        k = make_kernel(random_config(rng, "as-posted"), trace=False)
        run_random_schedule(k, rng, 600)
        teardown(k, rng)
        snaps.append(k.cost.snapshot())
    assert snaps[0] == snaps[1]
    assert snaps[0]["fork_attributable_ns"] > 0


def test_unknown_category_is_refused() -> None:
    m = C.CostMeter()
    with pytest.raises(KeyError):
        m.charge("no_such_thing")
    m.charge("page_copy", 2)
    assert m.total_ns == pytest.approx(2 * C.PAGE_COPY_NS)
    assert m.unattributed == {"page_copy": 2}


# ------------------------------------------------------------------ the fork_cost objective
def _template(env, op: str, **args) -> int:
    for j, t in enumerate(env.user_templates):
        if t.op == op and all(dict(t.args).get(a) == v for a, v in args.items()):
            return j
    raise KeyError(op)


def _run_op(env, tid: int, template: int) -> tuple[float, dict]:
    _, r, _, _, info = env.step(env.start_action(tid, template))
    total = r
    while env.kernel.threads[tid].gen is not None:
        _, r, _, _, info = env.step(env.run_action(tid))
        total += r
    return total, info


def test_fork_cost_objective_passes_the_env_checkers() -> None:
    pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    from cowenv.env import CowEnv

    check_env(CowEnv(preset="fixed", geometry="small", objective="fork_cost"),
              skip_render_check=True)
    sb3_check_env(CowEnv(preset="fixed", geometry="small", objective="fork_cost",
                         objective_kwargs={"mode": "ratio"}), warn=False)


@pytest.mark.parametrize("geometry", ["small", "x86_64"])
def test_fork_cost_reward_is_the_extra_fork_cost_of_cowpte(geometry: str) -> None:
    """Fork, then write the first page of every portion: the return is
    (cowpte − classic) fork-attributable cost over the normaliser, positive for COW PTE;
    with preset classic the env's kernel and its shadow agree exactly."""
    from cowenv.env import CowEnv

    returns = {}
    for preset in ("fixed", "classic"):
        env = CowEnv(preset=preset, geometry=geometry, objective="fork_cost", max_steps=400)
        _, info = env.reset(seed=0)
        assert info["fork_cost"]["variant_ns"] == 0.0
        ret, info = _run_op(env, 1, _template(env, "fork"))
        firsts = sorted({dict(t.args)["addr"] // 4096 // env.config.ptrs_per_pte
                         for t in env.user_templates if t.op == "write"})
        for idx in firsts:
            addr = min(dict(t.args)["addr"] for t in env.user_templates if t.op == "write"
                       and dict(t.args)["addr"] // 4096 // env.config.ptrs_per_pte == idx)
            r, info = _run_op(env, 1, _template(env, "write", addr=addr))
            ret += r
        fc = info["fork_cost"]
        assert fc["shadow_skipped"] == 0
        norm = env.objective.logic.normaliser_ns
        assert ret == pytest.approx((fc["variant_ns"] - fc["classic_ns"]) / norm)
        returns[preset] = (ret, fc["ratio"])
    assert returns["classic"] == (pytest.approx(0.0), pytest.approx(1.0))
    assert returns["fixed"][0] > 0 and returns["fixed"][1] > 1.0


def test_fork_cost_shadow_follows_the_child() -> None:
    """Operations on the forked child's thread are mirrored on the shadow's child."""
    from cowenv.env import CowEnv

    env = CowEnv(preset="fixed", geometry="small", objective="fork_cost", max_steps=400)
    env.reset(seed=0)
    _run_op(env, 1, _template(env, "fork"))
    k = env.kernel
    child_pid = max(p.pid for p in k.live_procs())
    ctid = k.procs[child_pid].tids[0]
    writes = [j for j, t in enumerate(env.user_templates) if t.op == "write"]
    for j in writes[:4]:
        _run_op(env, ctid, j)
    _, info = _run_op(env, ctid, _template(env, "exit"))
    fc = info["fork_cost"]
    assert fc["shadow_skipped"] == 0
    assert fc["classic_deferred_ns"] > 0  # the child's COW faults happened on the shadow
    shadow = env.objective.logic.shadow.kernel
    assert len(shadow.live_procs()) == len(k.live_procs())


def test_sequential_twin_is_immune_to_the_order_of_effects() -> None:
    """The shadow runs a write at its start; if the agent then forks and only afterwards
    lets the write run, the env's kernel pays a COW break and copy the shadow never saw.
    The twin (the variant on the same start-ordered operations) does not."""
    from cowenv.env import CowEnv

    env = CowEnv(preset="fixed", geometry="small", objective="fork_cost",
                 objective_kwargs={"twin": True}, max_steps=400)
    env.reset(seed=0)
    k = env.kernel
    assert k.threads[2].gen is None  # the workload's second thread of the parent
    addr = min(dict(t.args)["addr"] for t in env.user_templates if t.op == "write")
    env.step(env.start_action(2, _template(env, "write", addr=addr)))  # started, not run
    _, info = _run_op(env, 1, _template(env, "fork"))
    while k.threads[2].gen is not None:
        _, _, _, _, info = env.step(env.run_action(2))
    fc = info["fork_cost"]
    assert fc["diverged"] == 0 and fc["shadow_skipped"] == 0
    assert fc["variant_deferred_ns"] > 0 and fc["classic_deferred_ns"] == 0
    assert fc["ratio"] > fc["sequential_ratio"]
    # Sequentially, COW PTE's fork is the cheaper one at this geometry.
    assert fc["sequential_ratio"] < 1.0


def test_memory_pressure_is_not_mirrored() -> None:
    from cowenv.env import CowEnv

    env = CowEnv(preset="fixed", geometry="small", objective="fork_cost", max_steps=400)
    env.reset(seed=0)
    reclaim = next(i for i, s in enumerate(env.catalogue)
                   if s.kind == "start" and s.op == "reclaim" and s.proc_slot < 0)
    _, _, _, _, info = env.step(reclaim)
    assert info["fork_cost"]["pressure"] == 1
    assert env.objective.logic.shadow.kernel.threads[0].gen is None
