"""Schedules: recording, exact replay, minimisation, Chrome trace export, findings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from cowenv import cli
from cowenv.chrome_trace import chrome_trace, validate_chrome_trace
from cowenv.findings import FindingStore, signature_slug
from cowenv.kernel import make_kernel
from cowenv.kernel.config import KernelConfig
from cowenv.kernel.trace import trace_hash
from cowenv.minimize import (
    context_switches,
    ddmin,
    minimize,
    padded_scenario,
    run_lenient,
)
from cowenv.replay import (
    ScheduleRecorder,
    execute,
    hash_probe,
    random_schedule,
    replay,
    replay_in_subprocess,
    source_digest,
)
from cowenv.scenario import dump_scenario, load_scenario, parse_scenario, save_scenario
from cowenv.workload import random_config

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "cow-pte-fault-lock.yaml"


def _cowpte_available() -> bool:
    try:
        make_kernel(KernelConfig.from_preset("as-posted", ptrs_per_pte=8, nr_frames=64))
    except Exception:  # noqa: BLE001 - cowpte.py absent or broken: classic only
        return False
    return True


DIGEST = source_digest()  # of the sources this process imported
COWPTE = _cowpte_available()
PRESETS = ["classic", "as-posted", "fixed"] if COWPTE else ["classic"]
needs_cowpte = pytest.mark.skipif(not COWPTE, reason="cowenv.kernel.cowpte not available")


def _config(preset: str, i: int) -> KernelConfig:
    """Configs varied over geometry, fault mode, split PTL and pool size."""
    return random_config(np.random.default_rng(1000 + i), preset)


def _schedules(n: int) -> list[dict]:
    out = []
    for i in range(n):
        preset = PRESETS[i % len(PRESETS)]
        length = 300 if preset == "as-posted" else 120
        out.append(random_schedule(_config(preset, i), seed=i, length=length,
                                   name=f"{preset}-{i}"))
    return out


def _violating(n: int, length: int = 200) -> list[dict]:
    cfg = KernelConfig.from_preset("as-posted", ptrs_per_pte=8, nr_frames=256)
    out = []
    for seed in range(400):
        d = random_schedule(cfg, seed, length, stop_on_violation=True)
        if d["expect"]["violation"]:
            out.append(d)
            if len(out) == n:
                break
    return out


# ------------------------------------------------------------------------------ fidelity
def test_replay_fidelity_in_separate_process(tmp_path: Path) -> None:
    """>= 200 random schedules replay to the same outcome and trace hash in a fresh
    interpreter with a different PYTHONHASHSEED (files written and read as YAML)."""
    scheds = _schedules(240)
    files = []
    for i, d in enumerate(scheds):
        p = tmp_path / f"s{i:03d}.yaml"
        save_scenario(d, p)
        files.append(str(p))
    seed = 4242 if os.environ.get("PYTHONHASHSEED") != "4242" else 4243
    probe, results, digest = replay_in_subprocess(files, hash_seed=seed)
    assert probe != hash_probe(), "child must run with a different hash seed"
    if digest != DIGEST:
        pytest.skip("cowenv sources changed while the test ran (concurrent edit)")
    assert len(results) == len(scheds)
    for d, r in zip(scheds, results, strict=True):
        assert r["reproduced"], (d["name"], r["divergence"])
        assert r["trace_hash"] == d["outcome"]["trace_hash"], d["name"]
        v = d["expect"]["violation"]
        assert r["violation"] == (f"{v['kind']}@{v['site']}" if v else None)
    violating = sum(1 for d in scheds if d["expect"]["violation"])
    clean = len(scheds) - violating
    assert clean >= 100
    if COWPTE:
        assert violating >= 10, violating


def test_env_episodes_replay_and_minimise(tmp_path: Path) -> None:
    """Schedules recorded by the environment replay exactly in another process."""
    env_mod = pytest.importorskip("cowenv.env")
    env = env_mod.CowEnv(preset="as-posted" if COWPTE else "classic", geometry="small")
    scheds = []
    for ep in range(24):
        env.reset(seed=ep)
        rng = np.random.default_rng(ep)
        done = False
        while not done:
            a = int(rng.choice(np.flatnonzero(env.action_masks())))
            _, _, term, trunc, _ = env.step(a)
            done = term or trunc
        scheds.append(env.get_schedule())
    probe, results, digest = replay_in_subprocess(data=scheds, hash_seed=777)
    if digest != DIGEST:
        pytest.skip("cowenv sources changed while the test ran (concurrent edit)")
    for d, r in zip(scheds, results, strict=True):
        assert r["reproduced"], (d["name"], r["divergence"])
        assert r["trace_hash"] == d["outcome"]["trace_hash"]
    bad = [d for d in scheds if d["expect"]["violation"]]
    if bad:
        res = minimize(parse_scenario(bad[0]))
        assert res.minimal_len <= len(bad[0]["steps"])
        assert replay(parse_scenario(res.data)).reproduced


def test_recorder_roundtrip_and_readable_form(tmp_path: Path) -> None:
    cfg = KernelConfig.from_preset("classic", ptrs_per_pte=8, nr_frames=64)
    rec = ScheduleRecorder(make_kernel(cfg))
    rec.start(1, "mmap", {"addr": 0x100000, "length": 0x2000})
    while rec.k.threads[1].gen is not None:
        rec.step(1)
    rec.event("fail_nth", n=2)
    rec.start(0, "reclaim", {"nr": np.int64(1)})
    rec.step(0)
    d = rec.scenario_data(name="rec", seed=7, recorded={"agent": "test", "episode": 3})
    assert d["steps"][0] == {"tid": 1, "start": "mmap",
                             "args": {"addr": "0x100000", "length": 0x2000}}
    assert d["steps"][-3] == {"event": "fail_nth", "n": 2}
    assert d["steps"][-1] == {"tid": 0, "step": 1}
    assert d["config"]["ptrs_per_pte"] == 8 and d["seed"] == 7 and d["version"] == 1
    assert d["expect"] == {"violation": None}
    assert len(d["outcome"]["labels"]) == len(d["steps"])
    p = tmp_path / "rec.yaml"
    save_scenario(d, p)
    text = p.read_text()
    assert "  - {tid: 1, start: mmap, args: {addr: '0x100000', length: 8192}}" in text
    assert yaml.safe_load(text) == d == yaml.safe_load(dump_scenario(d))
    assert replay(load_scenario(p)).reproduced


# ------------------------------------------------------------------------------ replay CLI
def _recorded(tmp_path: Path, violating: bool) -> tuple[Path, dict]:
    d = _violating(1)[0] if violating else random_schedule(
        KernelConfig.from_preset("classic", ptrs_per_pte=8, nr_frames=256), 3, 80)
    p = tmp_path / "rec.yaml"
    save_scenario(d, p)
    return p, d


@needs_cowpte
def test_replay_cli_reproduces_and_prints_timeline(tmp_path: Path, capsys) -> None:
    p, d = _recorded(tmp_path, violating=True)
    assert cli.main(["replay", str(p)]) == 0
    out = capsys.readouterr().out
    v = d["expect"]["violation"]
    assert out.startswith(f"reproduced: {p}: {v['kind']}@{v['site']} at step {v['step']}")
    assert cli.main(["replay", str(p), "--trace"]) == 0
    out = capsys.readouterr().out
    assert "t1 (pid 1)" in out and "✖" in out and "step" in out


@pytest.mark.parametrize("tamper, needle", [
    ("step", "observed it at step"),
    ("missing", "observed none"),
    ("hash", "trace differs"),
    ("steps", "scheduler steps, replay took"),
    ("label", "recorded stop at"),
    ("illegal", "became illegal"),
    ("spurious", "expected no violation, observed"),
])
def test_replay_cli_reports_divergence(tmp_path: Path, capsys, tamper: str, needle: str) -> None:
    violating = tamper in ("step", "spurious") and COWPTE
    p, d = _recorded(tmp_path, violating=violating)
    d = json.loads(json.dumps(d))
    if tamper == "step":
        if not violating:
            d["expect"] = {"violation": {"kind": "selftest", "site": "x", "step": 1}}
            needle = "observed none"
        else:
            d["expect"]["violation"]["step"] += 1
    elif tamper == "missing":
        d["expect"] = {"violation": {"kind": "isolation", "site": "user_access", "step": 41}}
        needle = "expected isolation@user_access at step 41, observed none"
    elif tamper == "hash":
        d["outcome"]["trace_hash"] = "0" * 64
    elif tamper == "steps":
        d["outcome"]["steps"] += 1
    elif tamper == "label":
        i = next(i for i, x in enumerate(d["outcome"]["labels"]) if x)
        d["outcome"]["labels"][i] = "nowhere:point"
        needle = f"schedule step {i} "
    elif tamper == "illegal":
        d["steps"].insert(0, {"tid": 5, "step": 1})
        d["outcome"].pop("labels")
    elif tamper == "spurious":
        if not violating:
            pytest.skip("needs a violating schedule (cowpte)")
        d["expect"] = {"violation": None}
    save_scenario(d, p)
    assert cli.main(["replay", str(p)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"DIVERGED: {p}: ")
    assert needle in out
    assert f"to replay: cowenv replay {p} --trace" in out


def test_replay_json_and_scenario_files(capsys) -> None:
    for p in sorted((ROOT / "scenarios").rglob("*.yaml"))[:5]:
        rc = cli.main(["replay", str(p), "--json"])
        r = json.loads(capsys.readouterr().out)
        assert rc == (0 if r["reproduced"] else 1)
        assert len(r["trace_hash"]) == 64


# ------------------------------------------------------------------------------ minimise
def test_ddmin_finds_the_two_relevant_units() -> None:
    calls: list[tuple[int, ...]] = []

    def test(idx) -> bool:
        calls.append(tuple(idx))
        return 3 in idx and 17 in idx

    assert ddmin(40, test) == [3, 17]
    assert ddmin(1, lambda idx: 0 in idx) == [0]


def test_context_switches() -> None:
    steps = [{"tid": 1, "start": "read"}, {"tid": 1, "step": 1}, {"tid": 2, "start": "read"},
             {"tid": 2, "step": 1}, {"event": "fail_nth", "n": 1}, {"tid": 1, "step": 1},
             {"tid": 1, "do": "read"}, {"tid": 0, "until": "a:b"}]
    assert context_switches(steps) == 3


def _assert_one_minimal(sc_data: dict, sig: str) -> None:
    sc = parse_scenario(sc_data)
    for j in range(len(sc.steps)):
        cand = sc.steps[:j] + sc.steps[j + 1:]
        k = run_lenient(sc.config, cand, stop_on={sig}).kernel
        assert sig not in k.signatures, f"step {j} is removable"


@needs_cowpte
def test_minimize_recorded_schedules_are_runnable_and_one_minimal() -> None:
    for d in _violating(3):
        sc = parse_scenario(d)
        res = minimize(sc)
        out = parse_scenario(res.data)
        assert res.minimal_len == len(out.steps) <= len(sc.steps)
        rep = replay(out)
        assert rep.reproduced, rep.divergence
        v = d["expect"]["violation"]
        sig = f"{v['kind']}@{v['site']}"
        assert rep.execution.violations and sig in {x.signature for x in rep.execution.violations}
        assert res.context_switches == context_switches(out.steps)
        _assert_one_minimal(res.data, sig)


@needs_cowpte
def test_minimize_padded_hand_written_scenario() -> None:
    sc = load_scenario(FIXTURE)
    padded = padded_scenario(sc, 60, seed=3)
    assert len(padded.steps) >= len(sc.steps) + 60
    kinds = {next(k for k in ("do", "start", "step") if k in s) for s in padded.steps
             if "tid" in s}
    assert {"do", "start", "step"} <= kinds
    res = minimize(padded)
    assert res.minimal_len <= len(sc.steps) + 2
    out = parse_scenario(res.data)
    assert replay(out).reproduced
    assert all("do" in s for s in out.steps)  # hand-written do steps survive as do
    assert res.data["expect_by_variant"] == {"fixed": {"violation": None}}
    _assert_one_minimal(res.data, "lock-discipline@handle_cow_pte_fault")


def test_minimize_selftest_signature_classic(tmp_path: Path, capsys) -> None:
    """A failing selftest check (classic variant) minimises; 'as' names keep working."""
    src = tmp_path / "wrong.yaml"
    src.write_text("""
version: 1
name: wrong
config: {preset: classic, geometry: small, nr_frames: 256}
steps:
  - {tid: 1, do: mmap, args: {addr: 0x100000, length: 0x8000}}
  - {tid: 1, do: write, args: {addr: 0x100000}, as: OLD}
  - {tid: 1, do: write, args: {addr: 0x101000}}
  - {tid: 1, do: fork, as: CHILD}
  - {tid: 2, do: read, args: {addr: 0x100000}, expect: OLD}
  - {tid: 2, do: write, args: {addr: 0x102000}}
  - {tid: 1, do: write, args: {addr: 0x100000}, as: NEW}
  - {tid: 2, do: read, args: {addr: 0x100000}, expect: NEW, check: "leak expected"}
  - {tid: 1, do: exit}
expect: {violation: {kind: selftest, site: leak expected}}
""")
    out = tmp_path / "out" / "min.yaml"
    out.parent.mkdir()  # -o never creates folders
    assert cli.main(["minimize", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps: 9 -> 4" in text and "context switches left: 1" in text
    assert "1-minimal" in text
    d = yaml.safe_load(out.read_text())
    assert [s.get("do") for s in d["steps"]] == ["mmap", "fork", "write", "read"]
    assert d["expect"]["violation"]["step"] == 7
    assert cli.main(["replay", str(out)]) == 0


def test_illegal_step_rule_skip_and_normalise() -> None:
    cfg = KernelConfig.from_preset("classic", ptrs_per_pte=8, nr_frames=64)
    steps = parse_scenario({"config": {"preset": "classic", "geometry": "small"}, "steps": [
        {"tid": 1, "do": "mmap", "args": {"addr": 0x100000, "length": 0x8000}},
        {"tid": 1, "do": "write", "args": {"addr": 0x100000}},
        {"tid": 1, "do": "clone"},
        {"tid": 2, "start": "mprotect", "args": {"addr": 0x100000, "length": 0x1000,
                                                 "prot": "r"}},
        {"tid": 2, "step": 1},                   # holds mmap_lock for write
        {"tid": 1, "do": "write", "args": {"addr": 0x102000}},  # blocks: start + step m
        {"tid": 3, "step": 2},                   # no such thread: skipped
        {"tid": 2, "start": "read", "args": {"addr": 0x100000}},  # busy: skipped
        {"tid": 2, "step": 50},                  # partial: step m
        {"tid": 1, "finish": True},
        {"tid": 1, "until": "nowhere:never"},    # idle: skipped
    ]}).steps
    # What a removal can leave behind: names whose binding step is gone.
    steps.append({"tid": 1, "do": "unpin", "args": {"pin": "P"}})  # unbound: skipped
    steps.append({"tid": 1, "do": "read", "args": {"addr": 0x100000}, "expect": "GONE"})
    lr = run_lenient(cfg, steps, trace=True)
    eff = lr.effective
    kinds = [next(k for k in ("do", "start", "step", "finish", "until") if k in s) for s in eff]
    assert kinds == ["do", "do", "do", "start", "step", "start", "step", "step", "finish",
                     "do"]
    assert eff[5] == {"tid": 1, "start": "write", "args": {"addr": 0x102000}}
    assert eff[6] == {"tid": 1, "step": 1}  # the fault ran one point, then blocked
    assert eff[7]["tid"] == 2 and 1 <= eff[7]["step"] < 50
    assert "expect" not in eff[-1]  # the name it checked against is not bound
    strict = execute(cfg, eff, trace=True)
    assert strict.error is None
    assert trace_hash(strict.kernel.events) == trace_hash(lr.kernel.events)


def test_lenient_equals_strict_on_valid_schedules() -> None:
    for d in _schedules(12):
        sc = parse_scenario(d)
        lr = run_lenient(sc.config, sc.steps, trace=True)
        assert trace_hash(lr.kernel.events) == d["outcome"]["trace_hash"]
        assert lr.effective == sc.steps


def test_minimize_cli_bad_and_failing_input(tmp_path: Path, capsys) -> None:
    clean = ROOT / "scenarios" / "conformance" / "basic-cow-after-fork.yaml"
    assert cli.main(["minimize", str(clean), "-o", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expect.violation" in err[0] and str(clean) in err[0]
    d = yaml.safe_load(clean.read_text())
    d["expect"] = {"violation": {"kind": "isolation", "site": "user_access"}}
    p = tmp_path / "never.yaml"
    save_scenario(d, p)
    assert cli.main(["minimize", str(p), "-o", str(tmp_path / "x.yaml")]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT REPRODUCE" in out and "observed none" in out
    assert not (tmp_path / "x.yaml").exists()


# ------------------------------------------------------------------------------ chrome trace
@needs_cowpte
def test_chrome_trace_shape(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.json"
    assert cli.main(["trace", str(FIXTURE), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert validate_chrome_trace(doc) == []
    evs = doc["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[(1, 1)] == "t1" and names[(2, 2)] == "t2"
    procs = {e["pid"]: e["args"]["name"] for e in evs if e["name"] == "process_name"}
    assert procs[1] == "process 1"
    sc = load_scenario(FIXTURE)
    ops = [e for e in evs if e["ph"] == "X"]
    assert len(ops) == len(sc.steps)  # one slice per operation (all do steps)
    assert [e["name"] for e in ops] == [s["do"] for s in sc.steps]
    assert all(e["dur"] > 0 for e in ops)
    glob = [e for e in evs if e["ph"] == "i" and e.get("s") == "g"]
    assert glob and glob[0]["name"] == "violation lock-discipline@handle_cow_pte_fault"
    assert any(e.get("cat") == "lock" for e in evs)
    assert any(e.get("cat") == "point" for e in evs)
    # timestamps are scheduler steps x a fixed unit: the document is deterministic
    out2 = tmp_path / "t2.json"
    assert cli.main(["trace", str(FIXTURE), "-o", str(out2)]) == 0
    assert out.read_bytes() == out2.read_bytes()


def test_chrome_trace_interleaved_and_unfinished() -> None:
    for d in _schedules(9):
        sc = parse_scenario(d)
        ex = execute(sc.config, sc.steps, trace=True, track_pids=True)
        doc = chrome_trace(ex, sc.name)
        assert validate_chrome_trace(json.loads(json.dumps(doc))) == []
        starts = sum(1 for e in ex.kernel.events if e.kind == "start")
        assert sum(1 for e in doc["traceEvents"] if e["ph"] == "X") == starts


def test_validate_chrome_trace_catches_problems() -> None:
    bad = {"traceEvents": [
        {"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 10},
        {"name": "b", "ph": "X", "pid": 1, "tid": 1, "ts": 5, "dur": 10},
        {"name": "c", "ph": "Q", "pid": 1, "tid": 1, "ts": 0},
        {"name": "d", "ph": "i", "pid": "1", "tid": 1, "ts": -1},
    ]}
    errs = validate_chrome_trace(bad)
    assert any("overlap" in e for e in errs) and any("phase" in e for e in errs)
    assert any("integers" in e for e in errs)
    assert validate_chrome_trace([]) != []


# ------------------------------------------------------------------------------ findings
def test_signature_slug() -> None:
    assert signature_slug("isolation@user_access") == "isolation--user_access"
    assert signature_slug("selftest@No leak from parent into child") == \
        "selftest--No-leak-from-parent-into-child"


@needs_cowpte
def test_finding_store_dedups_and_resumes(tmp_path: Path) -> None:
    scheds = _violating(6)
    by_sig: dict[str, list[dict]] = {}
    for d in scheds:
        v = d["expect"]["violation"]
        by_sig.setdefault(f"{v['kind']}@{v['site']}", []).append(d)
    store_dir = tmp_path / "findings"
    with FindingStore(store_dir) as fs:
        written = [fs.add(d) for d in scheds]
        assert sum(p is not None for p in written) == len(by_sig) == len(fs)
        for sig in by_sig:
            p = fs.path_for(sig)
            assert p.name == signature_slug(sig) + ".yaml" and p.exists()
            sc = load_scenario(p)
            assert replay(sc).reproduced
            # The stored file is the first schedule of that signature, minimised (a
            # local minimum: a later schedule of the same signature may be shorter).
            assert len(sc.steps) <= len(by_sig[sig][0]["steps"])
    idx = json.loads((store_dir / "index.json").read_text())
    assert [r["signature"] for r in idx["findings"]] == fs.signatures
    hits = {r["signature"]: r["hits"] for r in idx["findings"]}
    assert hits == {s: len(v) for s, v in by_sig.items()}
    (store_dir / "junk.yaml").write_text("steps: [")
    fs2 = FindingStore(store_dir)
    assert set(fs2.signatures) == set(by_sig)
    assert len(fs2.errors) == 1 and "junk.yaml" in fs2.errors[0]
    assert fs2.add(scheds[0]) is None
    fs2.flush()
    idx2 = json.loads((store_dir / "index.json").read_text())
    sig0 = fs.signatures[0]
    assert {r["signature"]: r["hits"] for r in idx2["findings"]}[sig0] == hits[sig0] + \
        (1 if scheds[0] in by_sig[sig0] else 0)
    assert not list(store_dir.glob(".*"))  # no temp files left behind
    with pytest.raises(ValueError):
        fs2.add(random_schedule(KernelConfig.from_preset("classic", ptrs_per_pte=8), 1, 10))
