"""The Ray backend: a Ray campaign finds what a local one finds (same signatures, same
worker:step of every worker's first report); a campaign spans a two-node cluster and
loses nothing when one node's raylet is killed mid-campaign; ``--backend ray`` without
Ray exits 2 with an install hint; ``cowenv train --backend ray`` trains as the local path
does."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from cowenv import cli
from cowenv.campaign import CampaignConfig, CampaignResult, run_campaign
from cowenv.replay import replay
from cowenv.scenario import load_scenario

FLAWS = ["fault-asserts-write-lock", "walker-skips-break", "read-fault-fills-shared"]
ENV = {"geometry": "small", "terminate_on_violation": False, "variant": "cowpte",
       "flaws": FLAWS}
ROOT = Path(__file__).resolve().parents[1]

try:
    import ray
except ImportError:  # pragma: no cover - depends on the installation
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed "
                                                   "(pip install 'cowenv[ray]')")


def _cfg(budget: int, seed: int = 0, workers: int = 2) -> CampaignConfig:
    return CampaignConfig(agent="random", seed=seed, workers=workers, budget=budget,
                          env_kwargs=dict(ENV))


def _found(res: CampaignResult) -> dict[str, dict[str, int]]:
    """signature -> {worker: worker step of that worker's first report}."""
    return {r["signature"]: r["reports"] for r in res.findings}


def _check_same(ray_res: CampaignResult, local: CampaignResult, out: Path) -> None:
    assert not ray_res.errors and not ray_res.interrupted
    assert (ray_res.steps, ray_res.episodes) == (local.steps, local.episodes)
    assert _found(ray_res) == _found(local) and local.findings
    for r in ray_res.findings:  # the first worker:step shown is one of those reports
        assert r["reports"][str(r["worker"])] == r["worker_step"]
        assert r["minimised"] is True and replay(load_scenario(r["file"])).reproduced
    for w in range(2):
        ck = json.loads((out / ".campaign" / f"worker-{w}.json").read_text())
        assert ck["steps"] == local.steps // 2


@pytest.fixture(scope="class")
def local_ray() -> Any:
    """One local Ray instance with 2 CPUs for the single-machine tests."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@needs_ray
class TestOneMachine:
    """Tests sharing one local Ray instance with 2 CPUs."""

    def test_ray_campaign_finds_what_a_local_campaign_finds(self, local_ray: Any,
                                                             tmp_path: Path) -> None:
        from cowenv.ray_backend import RayBackend

        cfg, cfg2 = _cfg(12_000), _cfg(16_000)
        local = run_campaign(cfg, tmp_path / "local", show=False)
        local2 = run_campaign(cfg2, tmp_path / "local", show=False)  # resumed, extended
        with RayBackend() as be:  # joins the running instance, leaves it running
            assert ray.cluster_resources()["CPU"] == 2
            res = run_campaign(cfg, tmp_path / "ray", show=False, backend=be)
            _check_same(res, local, tmp_path / "ray")
            # Resume on Ray: a larger budget extends the campaign exactly as locally.
            res2 = run_campaign(cfg2, tmp_path / "ray", show=False, backend=be)
        assert ray.is_initialized()
        assert _found(res2) == _found(local2) and res2.steps == 16_000
        assert res2.episodes > res.episodes  # the extension ran (and matched local2 above)

    def test_train_backend_ray_learns_what_local_training_learns(self, local_ray: Any,
                                                                 tmp_path: Path) -> None:
        import torch
        from cowenv_agents.ppo import load_model

        def train(backend: str) -> tuple[Path, dict[str, Any]]:
            out = tmp_path / backend / "m.zip"
            argv = ["train", "--backend", backend, "--steps", "256", "--n-envs", "2",
                    "--geometry", "small", "--flaws", ",".join(FLAWS), "--out", str(out),
                    "--log-dir", str(tmp_path / backend / "runs"), "--json"]
            assert cli.main(argv) == 0
            return out, load_model(out).policy.state_dict()

        (_, local), (_, remote) = train("local"), train("ray")
        assert set(local) == set(remote)
        for k in local:  # same seeds, same episodes: the very same network
            assert torch.equal(local[k], remote[k]), k
        assert list((tmp_path / "ray" / "runs" / "m" / "tb").iterdir())  # TensorBoard logs


# ----------------------------------------------------------------------------- cluster
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def _kill_cluster(marks: list[str]) -> None:
    """SIGKILL the processes of our cluster (command line names one of our temp dirs or
    ports) and their descendants: never another cluster's (``ray stop`` kills all)."""
    procs = _procs()
    mine = {p for p, (_, c) in procs.items()
            if p != os.getpid() and any(m in c for m in marks)}
    grew = True
    while grew:
        grew = False
        for p, (pp, _) in procs.items():
            if pp in mine and p not in mine:
                mine.add(p)
                grew = True
    for p in mine:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def cluster() -> Any:
    """A two-node Ray cluster on this machine, one CPU per node, in our temp dirs.

    ``ray start`` under load (the suite runs on two workers) now and then fails its
    GCS handshake (``Failed to get node info: RPC error: Deadline Exceeded``); a failed
    start is killed, its dir wiped, and started again on fresh ports (three tries).
    """
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")])),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # Notice a dead node in ~5 s instead of the default ~30 s.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "5"}
    for attempt in range(3):
        port, client, dash, nm1, nm2, ag1, ag2, me1, me2 = _free_ports(9)
        # Short paths: Ray's unix sockets live under the temp dir (107-byte limit).
        top = Path(tempfile.mkdtemp(prefix="cowray-"))
        head_dir, node_dir = top / "head", top / "node"
        head_dir.mkdir()
        node_dir.mkdir()
        marks = [str(head_dir), str(node_dir), f"--port={client}", f":{port}"]
        try:
            subprocess.run([ray_cli, "start", "--head", "--port", str(port),
                            "--temp-dir", str(head_dir), "--include-dashboard=false",
                            "--ray-client-server-port", str(client), "--dashboard-port",
                            str(dash), "--node-manager-port", str(nm1),
                            "--dashboard-agent-listen-port", str(ag1),
                            "--metrics-export-port", str(me1), *common],
                           env=env, check=True, timeout=60, stdout=subprocess.DEVNULL)
            subprocess.run([ray_cli, "start", "--address", f"127.0.0.1:{port}",
                            "--temp-dir", str(node_dir), "--node-manager-port", str(nm2),
                            "--dashboard-agent-listen-port", str(ag2),
                            "--metrics-export-port", str(me2), *common],
                           env=env, check=True, timeout=60, stdout=subprocess.DEVNULL)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            _kill_cluster(marks)
            shutil.rmtree(top, ignore_errors=True)
            if attempt == 2:
                raise
            continue
        try:
            yield {"address": f"127.0.0.1:{port}", "env": env, "node_manager_port": nm2}
        finally:
            _kill_cluster(marks)
            shutil.rmtree(top, ignore_errors=True)
        return


def _raylet_pid(node_manager_port: int) -> int:
    for p, (_, c) in _procs().items():
        if "raylet" in c.split(" ")[0] and f"--node_manager_port={node_manager_port}" in c:
            return p
    raise AssertionError("no raylet for the second node")


@needs_ray
def test_campaign_spans_two_nodes_and_survives_losing_one(cluster: dict[str, Any],
                                                          tmp_path: Path) -> None:
    budget, seed = 200_000, 2  # long enough that the kill lands mid-campaign
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cowenv", "fuzz", "--backend", "ray", "--address",
           cluster["address"], "--workers", "2", "--budget", str(budget), "--seed", str(seed),
           "--geometry", "small", "--flaws", ",".join(FLAWS), "--out", str(out), "--quiet",
           "--json", "--no-minimise"]
    proc = subprocess.Popen(cmd, env=cluster["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        cks = [out / ".campaign" / f"worker-{w}.json" for w in range(2)]
        t0 = time.monotonic()
        while not all(p.exists() for p in cks):  # each worker's first chunk is done
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 40, "workers did not start"
            time.sleep(0.05)
        nodes = [json.loads(p.read_text())["nodes"][0] for p in cks]
        steps = [json.loads(p.read_text())["steps"] for p in cks]
        assert nodes[0] != nodes[1], "the campaign should use both nodes"
        assert max(steps) < budget // 2, "kill too late: a worker is already done"
        os.kill(_raylet_pid(cluster["node_manager_port"]), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    res = json.loads(stdout)
    assert res["steps"] == budget and not res["interrupted"] and not res["errors"]
    moved = [json.loads(p.read_text())["nodes"] for p in cks]
    assert sorted(len(n) for n in moved) == [1, 2], moved  # one worker restarted elsewhere
    cfg = _cfg(budget, seed=seed)
    cfg.minimise = False
    local = run_campaign(cfg, tmp_path / "local", show=False)
    assert {r["signature"]: r["reports"] for r in res["findings"]} == _found(local)


# ----------------------------------------------------------------------------- CLI
def test_backend_ray_without_ray_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    for argv in (["fuzz", "--backend", "ray", "--budget", "10", "--out", str(tmp_path)],
                 ["train", "--backend", "ray", "--steps", "10", "--out",
                  str(tmp_path / "m.zip")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install 'cowenv[ray]'" in err[0], err
    assert cli.main(["fuzz", "--address", "x:1", "--budget", "10", "--out",
                     str(tmp_path)]) == 2
    assert "--backend ray" in capsys.readouterr().err
