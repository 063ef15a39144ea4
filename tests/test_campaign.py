"""Fuzzing campaigns: every agent finds and files replayable findings; determinism;
interrupted campaigns (SIGKILL, SIGINT) resume with nothing lost; CLI errors."""

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
from cowenv.campaign import CampaignConfig, run_campaign, worker_budget
from cowenv.replay import replay
from cowenv.scenario import load_scenario

#: Three easy flaws (few signatures: campaigns and their minimisation stay quick).
FLAWS = ["fault-asserts-write-lock", "walker-skips-break", "read-fault-fills-shared"]
ENV = {"geometry": "small", "terminate_on_violation": False, "variant": "cowpte",
       "flaws": FLAWS}


def _replays(path: str | Path) -> bool:
    return replay(load_scenario(path)).reproduced


def _cfg(agent: str, budget: int, workers: int = 1, model: str | None = None,
         seed: int = 0) -> CampaignConfig:
    return CampaignConfig(agent=agent, seed=seed, workers=workers, budget=budget,
                          env_kwargs=dict(ENV), model=model)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from cowenv_agents.ppo import train_ppo

    d = tmp_path_factory.mktemp("model")
    return str(train_ppo(ENV, 512, d / "m.zip", n_envs=2, log_dir=d / "runs", run_name="m",
                         checkpoint_freq=0, eval_freq=0, net_arch=(32,), n_steps=128,
                         teardown=32))


@pytest.mark.parametrize("agent", ["random", "pct", "ql", "ppo"])
def test_each_agent_runs_a_short_campaign(agent: str, tmp_path: Path, model: str) -> None:
    # Smoke runs long enough for a first finding with every agent at seed 0 (the model's
    # changes move the random streams; issue 13 measured the spread over seeds 0-5, and
    # its walkers -- which unshare COW PTE tables -- and per-thread fail-nth actions made
    # random need more than 3000 steps at seed 0; at 6000 seeds 0-5 all find one).
    budget = 6000
    res = run_campaign(_cfg(agent, budget, model=model if agent == "ppo" else None),
                       tmp_path, show=False)
    assert not res.errors and not res.interrupted
    assert res.steps == budget and res.episodes >= budget // 256
    assert res.findings, f"{agent}: no finding in {budget} steps"
    for r in res.findings:
        assert r["minimised"] is True
        assert _replays(r["file"]), r["file"]
        sc = load_scenario(r["file"])
        assert f"{sc.expect.violations[0]['kind']}@{sc.expect.violations[0]['site']}" \
            == r["signature"]
    st = json.loads((tmp_path / "campaign.json").read_text())
    assert st["status"] == "finished" and st["workers"][0]["steps"] == budget
    if agent == "random":  # determinism: same seed => same findings at the same steps
        again = run_campaign(_cfg(agent, budget), tmp_path / "again", show=False)
        assert [(r["signature"], r["worker_step"]) for r in again.findings] == \
            [(r["signature"], r["worker_step"]) for r in res.findings]
        for a, b in zip(again.findings, res.findings, strict=True):
            assert Path(a["file"]).read_text() == Path(b["file"]).read_text()


def test_worker_budget_split() -> None:
    assert [worker_budget(10, 3, w) for w in range(3)] == [4, 3, 3]
    assert sum(worker_budget(12345, 4, w) for w in range(4)) == 12345


def _fuzz_cmd(out: Path, budget: int) -> list[str]:
    return [sys.executable, "-m", "cowenv", "fuzz", "--agent", "random", "--workers", "2",
            "--budget", str(budget), "--geometry", "small", "--flaws", ",".join(FLAWS),
            "--out", str(out), "--quiet"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_findings(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> list:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            rows = json.loads((out / "index.json").read_text())["findings"]
        except (OSError, ValueError, KeyError):
            rows = []
        if len(rows) >= n:
            return rows
        assert proc.poll() is None, "campaign ended before it was interrupted"
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} findings after {timeout}s")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_interrupted_campaign_resumes_with_nothing_lost(how: str, tmp_path: Path) -> None:
    budget = 300_000  # the harness path is fast: leave time to interrupt it mid-campaign
    out = tmp_path / "run"
    # SIGINT back to its default in the child: a shell that runs the suite in the
    # background (job control off) starts everything with SIGINT ignored.
    proc = subprocess.Popen(_fuzz_cmd(out, budget), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    before = _wait_findings(out, 2, proc)
    time.sleep(0.2)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)  # generous: CI runs this beside other campaigns
    if how == "SIGINT":
        assert proc.returncode == 130, err
        st = json.loads((out / "campaign.json").read_text())
        assert st["status"] == "interrupted"
    else:
        assert proc.returncode == -signal.SIGKILL
        time.sleep(1.0)  # orphaned workers notice the main process is gone and stop
    st = json.loads((out / "campaign.json").read_text())
    done_before = sum(w["steps"] for w in st["workers"])
    assert done_before < budget
    kept = {r["signature"]: r for r in json.loads((out / "index.json").read_text())["findings"]}
    assert {r["signature"] for r in before} <= set(kept)
    first_seen = {s: st["findings"][s]["seconds"] for s in kept}
    # Resume: same settings, same folder.
    res = run_campaign(_cfg("random", budget, workers=2), out, show=False)
    assert not res.interrupted and res.steps == budget
    sigs = {r["signature"] for r in res.findings}
    assert set(kept) <= sigs
    st2 = json.loads((out / "campaign.json").read_text())
    for s, secs in first_seen.items():  # known findings were not rediscovered as new
        assert st2["findings"][s]["seconds"] == secs
    for r in res.findings:
        assert r["minimised"] is True
        assert _replays(r["file"]), r["file"]
    # The resumed campaign found exactly what an uninterrupted one finds (per-worker
    # seed streams; a worker resumes at its last checkpoint and replays from there).
    cfg = _cfg("random", budget, workers=2)
    cfg.minimise = False
    ref = run_campaign(cfg, tmp_path / "ref", show=False)
    assert {r["signature"] for r in ref.findings} == sigs


def test_cli_fuzz_json_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    assert cli.main(["fuzz", "--budget", "600", "--workers", "1", "--geometry", "small",
                     "--out", str(out), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 600 and res["out"] == str(out)
    # Another agent on the same folder: refused (exit 2, one line).
    assert cli.main(["fuzz", "--agent", "pct", "--budget", "600", "--workers", "1",
                     "--geometry", "small", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and len(err.strip().splitlines()) == 1
    for argv in (["fuzz", "--agent", "ppo"], ["fuzz", "--workers", "0"],
                 ["fuzz", "--budget", "-1"], ["fuzz", "--model", "x.zip"],
                 ["fuzz", "--agent", "ppo", "--model", str(tmp_path / "missing.zip")],
                 ["fuzz", "--flaws", "no-such-flaw"], ["fuzz", "--depth", "2"],
                 ["train", "--steps", "0"]):
        assert cli.main([*argv, "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, (argv, err)


def test_cli_train_saves_a_model_fuzz_can_use(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    m = tmp_path / "m.zip"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["train", "--steps", "256", "--geometry", "small", "--out", str(m),
                         "--n-envs", "1", "--json"]) == 0
    finally:
        os.chdir(cwd)
    info = json.loads(capsys.readouterr().out)
    assert Path(info["model"]) == m and m.is_file()
    assert list((tmp_path / "runs" / "m" / "tb").rglob("events.out.tfevents.*"))
    assert cli.main(["fuzz", "--agent", "ppo", "--model", str(m), "--budget", "300",
                     "--workers", "1", "--geometry", "small", "--flaws", ",".join(FLAWS),
                     "--out", str(tmp_path / "f"), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 300


def test_minimiser_time_limit_keeps_a_failing_schedule():
    from cowenv.minimize import minimize
    from cowenv.replay import replay
    from cowenv.scenario import load_scenario, parse_scenario

    sc = load_scenario("scenarios/flaws/wipeonfork-shared.yaml")
    full = minimize(sc)
    cut = minimize(sc, time_limit=0.0)
    assert full.complete and not cut.complete
    assert cut.minimal_len >= full.minimal_len
    assert replay(parse_scenario(cut.data)).reproduced


def test_cause_search_names_the_flaw_behind_a_known_signature():
    from cowenv.campaign import cause_flaws, violation_context
    from cowenv.harness import Harness
    from cowenv.scenario import load_scenario

    data = load_scenario("scenarios/flaws/wipeonfork-shared.yaml").to_data()
    data["config"]["flaws"] = ["pmd-clear-window", "wipeonfork-shared"]
    assert cause_flaws(data, "isolation@shadow_sweep",
                       ["pmd-clear-window", "wipeonfork-shared"]) == ["wipeonfork-shared"]
    assert cause_flaws(data, "isolation@shadow_sweep", ["pmd-clear-window"]) == []
    h = Harness(geometry="small")
    h.reset(0)
    assert violation_context(h) == ""
    fork = next(i for i, sp in enumerate(h.catalogue) if sp.kind == "start" and sp.op == "fork"
                and h.mask[i])
    h.step(fork)
    assert violation_context(h) == "fork"
    read = next(i for i, sp in enumerate(h.catalogue) if sp.kind == "start" and sp.op == "read"
                and sp.tid != h.catalogue[fork].tid and h.mask[i])
    h.step(read)
    assert violation_context(h) == "fork>read" and violation_context(h, 1) == "read"


def test_cause_search_confirms_a_flaw_whose_violation_another_masks():
    """On as-posted, fork-ptl-nesting's lockdep splat at the fork turns lockdep off, so
    ptl-recursive-nesting's splat at the next COW break never fires: the schedule shows
    only ``lock-discipline@pmd_install``. Run with ptl-recursive-nesting alone, the same
    schedule shows its own splat, which fixed does not: a masked cause, with the steps
    that took effect (they replay with that flaw alone)."""
    from cowenv.campaign import confirm_flaws
    from cowenv.harness import Harness
    from cowenv.minimize import run_lenient
    from cowenv.scenario import override_config, parse_scenario

    h = Harness(geometry="small", preset="as-posted", terminate_on_violation=False)
    h.reset(0)
    T = h.config.ptrs_per_pte * 4096

    def do(op, tid, **kw):
        h.step(h.find_actions(op, tid=tid, **kw)[0])
        run = h.find_actions("run", tid=tid)[0]
        while h.kernel.threads[tid].gen is not None:
            h.step(run)

    do("fork", 1)
    do("write", 1, addr=16 * T)
    assert "lock-discipline@pte_offset_map_lock" not in h.kernel.signatures
    data = h.get_schedule()
    found = confirm_flaws(data, "lock-discipline@pmd_install",
                          ["ptl-recursive-nesting", "wipeonfork-shared"])
    assert [(f, s, how) for f, s, _, how in found] == [
        ("ptl-recursive-nesting", "lock-discipline@pte_offset_map_lock", "masked")]
    steps = found[0][2]
    sc = parse_scenario(data)
    cfg = override_config(sc.config, "cowpte", ["ptl-recursive-nesting"])
    assert "lock-discipline@pte_offset_map_lock" in run_lenient(cfg, steps).kernel.signatures
    # The candidate's own signature comes first when the flaw shows it.
    own = confirm_flaws(data, "lock-discipline@pmd_install", ["fork-ptl-nesting"])
    assert own == [("fork-ptl-nesting", "lock-discipline@pmd_install", None, "alone")]


def test_leave_one_out_counts_only_a_flaws_known_harm():
    """Two schedules an as-posted campaign recorded (small geometry). In the first,
    table-free-no-deferral's own harm (a walk through the paging-structure cache of a
    freed table) goes away with that flaw off and the others on: a cause. In the second,
    turning rmap-stale-table off makes the fault-asserts-write-lock assertion go away
    (the schedule takes another course): not rmap-stale-table's harm, not a cause."""
    import yaml

    from cowenv.campaign import confirm_flaws, flaw_harms

    assert "memory-safety@tlb_stale_table" in flaw_harms("table-free-no-deferral")
    assert "memory-safety@gup_pte_range" in flaw_harms("table-free-no-deferral")
    assert "lock-discipline@handle_cow_pte_fault" not in flaw_harms("rmap-stale-table")
    d = yaml.safe_load(open(Path(__file__).parent / "data" / "leave-one-out-table-free.yaml"))
    found = confirm_flaws(d, "memory-safety@tlb_stale_table", ["table-free-no-deferral"])
    assert [(f, s, how) for f, s, _, how in found] == [
        ("table-free-no-deferral", "memory-safety@tlb_stale_table", "leave-one-out")]
    d = yaml.safe_load(open(Path(__file__).parent / "data" / "leave-one-out-path-change.yaml"))
    assert confirm_flaws(d, "lock-discipline@handle_cow_pte_fault", ["rmap-stale-table"]) == []


def test_flaw_scenarios_are_the_files_configured_with_the_flaw_alone():
    """A flaw's held-out set (bug-finding benchmark) is its own file plus any scenario
    configured with that flaw and no other; a scenario of several flaws is not in it."""
    from cowenv.campaign import flaw_scenarios

    root = Path(__file__).resolve().parent.parent / "scenarios"
    rel = [p.relative_to(root).as_posix() for p in flaw_scenarios("table-free-no-deferral")]
    assert rel == ["flaws/table-free-no-deferral.yaml",
                   "tlb/table-free-no-deferral-stale-psc.yaml"]
    rel = [p.relative_to(root).as_posix() for p in flaw_scenarios("fork-ptl-nesting")]
    assert rel == ["flaws/fork-ptl-nesting.yaml"]
    rel = [p.relative_to(root).as_posix()
           for p in flaw_scenarios("mremap-ignores-break-failure")]
    assert rel == ["flaws/mremap-ignores-break-failure.yaml",
                   "mremap/ignores-break-failure-move-normal-pmd.yaml"]
    assert flaw_scenarios("no-such-flaw") == []
