"""Fuzzing agents: legality, determinism, PCT's probabilistic guarantee, Q-learning state
hashing, MaskablePPO training and sampling, and the harness teardown."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cowenv_agents as ca
import numpy as np
import pytest
from cowenv_agents.pct import PCTAgent
from cowenv_agents.qlearning import QLearningAgent, abstract_state, state_hash

from cowenv.env import CowEnv

SMALL = {"geometry": "small", "terminate_on_violation": False}


def _schedule(env: CowEnv, agent: ca.Agent, seed: int, episodes: int = 2,
              teardown: int = 0) -> list[list]:
    out = []
    for e in range(episodes):
        rng, rs = ca.episode_rng(seed, 0, e)
        ca.run_episode(env, agent, rng, rs, teardown=teardown)
        out.append(env.get_schedule()["steps"])
    return out


@pytest.mark.parametrize("name", ["random", "pct", "ql"])
def test_agents_take_only_legal_actions_and_are_deterministic(name: str) -> None:
    env = CowEnv(**SMALL)
    agent = ca.make_agent(name)
    illegal = 0
    for e in range(3):
        rng, rs = ca.episode_rng(7, 0, e)
        obs, _ = env.reset(seed=rs)
        agent.begin_episode(env, rng)
        for _ in range(env.max_steps):
            mask = env.action_masks()
            a = agent.act(env, obs, mask)
            assert mask[a], f"{name} chose illegal action {env.describe_action(a)}"
            obs, r, te, tr, info = env.step(a)
            illegal += info["illegal_action"]
            agent.observe(env, a, obs, r, te, tr, info)
            if te or tr:
                break
        agent.end_episode(env)
    assert illegal == 0
    # Same seeds, fresh agent => the very same schedules; another seed => different.
    a1 = _schedule(CowEnv(**SMALL), ca.make_agent(name), seed=3)
    a2 = _schedule(CowEnv(**SMALL), ca.make_agent(name), seed=3)
    a3 = _schedule(CowEnv(**SMALL), ca.make_agent(name), seed=4)
    assert a1 == a2
    assert a1 != a3


def test_episode_seed_streams_are_independent_and_stable() -> None:
    r1, s1 = ca.episode_rng(0, 0, 0)
    r2, s2 = ca.episode_rng(0, 1, 0)
    r3, s3 = ca.episode_rng(0, 0, 1)
    r4, s4 = ca.episode_rng(0, 0, 0)
    assert len({s1, s2, s3}) == 3 and s1 == s4
    assert r1.integers(1 << 30) == r4.integers(1 << 30)
    assert 0 <= s1 < 2**31


# ----------------------------------------------------------------------------- PCT
X = 0x100000  # the tiny case's one region: 4 pages = one PTE table (tiny geometry)


def _tiny_env() -> CowEnv:
    """One populated table in one process; COW PTE on; threads 1-3 (clone twice).

    Only ``read-fault-fills-shared`` is on: a read fault on the never-touched page
    X+3 after the table has been shared by fork writes the zero-page PTE into the
    shared table. A read before the fork fills the PTE first (no later fault), so of
    the orders of {fork, read, read} only "fork first" shows the violation.
    """
    wl = [{"tid": 1, "do": "mmap", "args": {"addr": X, "length": 4 * 4096}},
          {"tid": 1, "do": "write", "args": {"addr": X}},
          {"tid": 1, "do": "prctl_cow_pte"},
          {"tid": 1, "do": "clone"},
          {"tid": 1, "do": "clone"}]
    return CowEnv(variant="cowpte", flaws=["read-fault-fills-shared"], geometry="tiny",
                  workload=wl, terminate_on_violation=False)


def _pct_rate(n_threads: int, depth: int, seeds: int) -> tuple[float, int]:
    env = _tiny_env()
    programs = {1: [("fork", {})]}
    for t in range(2, n_threads + 1):
        programs[t] = [("read", {"addr": X + 3 * 4096})]
    hits = 0
    k = 0
    for s in range(seeds):
        agent = PCTAgent(depth=depth, programs=programs, event_prob=0.0)
        rng, rs = ca.episode_rng(s, n_threads, 0)
        obs, _ = env.reset(seed=rs)
        agent.begin_episode(env, rng)
        steps = 0
        while True:
            mask = env.action_masks()
            runnable = any(mask[t] for t in range(env.config.max_threads + 1))
            if agent.programs_done and not runnable:
                break
            obs, *_ = env.step(agent.act(env, obs, mask))
            steps += 1
            assert steps < 500
        k = max(k, steps)
        hits += "shared-table-write@do_anonymous_page" in env.kernel.signatures
    return hits / seeds, k


@pytest.mark.parametrize("n_threads", [2, 3])
def test_pct_depth1_finds_ordering_bug_with_promised_probability(n_threads: int) -> None:
    """PCT's bound for a depth-1 bug among n threads is 1/n; measure it over seeds."""
    seeds = 300
    rate, _ = _pct_rate(n_threads, depth=1, seeds=seeds)
    bound = 1.0 / n_threads
    margin = 3.0 * math.sqrt(bound * (1 - bound) / seeds)
    assert rate >= bound - margin, f"PCT d=1 found the bug in {rate:.3f} < {bound:.3f}"
    # The ordering really matters: it is not found every time either.
    assert rate < 1.0


def test_pct_change_points_and_priorities() -> None:
    env = CowEnv(**SMALL)
    agent = PCTAgent(depth=4, run_length=50)
    rng, rs = ca.episode_rng(1, 0, 0)
    obs, _ = env.reset(seed=rs)
    agent.begin_episode(env, rng)
    assert len(agent.change_points) == 3
    assert len(set(agent.change_points)) == 3
    assert all(1 <= c <= 50 for c in agent.change_points)
    for _ in range(60):
        mask = env.action_masks()
        a = agent.act(env, obs, mask)
        obs, *_ = env.step(a)
    # After the change points, some threads carry the low priorities d-1, d-2, ...
    low = sorted(p for p in agent.priority.values() if p < agent.depth)
    assert low and all(p == int(p) for p in low)
    with pytest.raises(ValueError):
        PCTAgent(depth=0)
    with pytest.raises(ValueError):
        PCTAgent(start_policy="nope")


def test_pct_start_policy_bias_excludes_ops() -> None:
    env = CowEnv(**SMALL)
    agent = PCTAgent(op_bias={op: 0.0 for op in ("madvise", "mprotect", "munmap", "mmap")},
                     start_policy="op")
    rng, rs = ca.episode_rng(2, 0, 0)
    obs, _ = env.reset(seed=rs)
    agent.begin_episode(env, rng)
    started = set()
    for _ in range(200):
        a = agent.act(env, obs, env.action_masks())
        sp = env.catalogue[a]
        if sp.kind == "start" and sp.tid != 0:
            started.add(sp.op)
        obs, _, te, tr, _ = env.step(a)
        if te or tr:
            break
    assert started and not started & {"madvise", "mprotect", "munmap", "mmap"}


# ----------------------------------------------------------------------------- Q-learning
def test_ql_state_hash_is_stable_across_processes() -> None:
    env = CowEnv(**SMALL)
    env.reset(seed=0)
    h = state_hash(abstract_state(env))
    code = ("from cowenv.env import CowEnv; from cowenv_agents import abstract_state, state_hash;"
            "e = CowEnv(geometry='small', terminate_on_violation=False); e.reset(seed=0);"
            "print(state_hash(abstract_state(e)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert int(out.stdout.strip()) == h


def test_ql_learns_novelty_and_round_trips_its_state() -> None:
    env = CowEnv(**SMALL)
    agent = QLearningAgent(state="fine", actions="catalogue")
    _schedule(env, agent, seed=0, episodes=3)
    env.reset(seed=0)
    s0 = state_hash(abstract_state(env))
    # The initial state is seen at the start of every episode: visited 3 times, and
    # every first action taken there has a negative Q (novelty reward = -visits).
    assert agent.visits[s0] == 3
    assert agent.q[s0] and all(v < 0 for v in agent.q[s0].values())
    # Greedy choice prefers an action never taken in that state.
    agent.epsilon = 0.0
    agent.begin_episode(env, np.random.default_rng(0))
    a = agent.act(env, None, env.action_masks())  # type: ignore[arg-type]
    assert a not in agent.q[s0]
    st = json.loads(json.dumps(agent.state_dict()))
    b = QLearningAgent()
    b.load_state_dict(st)
    assert b.q == agent.q and b.visits == agent.visits


def test_ql_default_learns_over_coarse_states_and_action_kinds() -> None:
    env = CowEnv(**SMALL)
    agent = QLearningAgent()
    _schedule(env, agent, seed=0, episodes=3)
    env.reset(seed=0)
    s0 = state_hash(abstract_state(env, coarse=True))
    assert agent.visits[s0] == 3
    kinds = {(sp.kind, sp.tid, sp.op) for sp in env.catalogue}
    # Q is kept per kind (run t / start op on t / event), far fewer keys than entries.
    assert agent.q[s0] and max(agent.q[s0]) < len(kinds) < len(env.catalogue)
    # Coarse states recur more: on the same trajectory (a projection of the fine state)
    # they take fewer distinct values than the fine abstraction does.
    rng = np.random.default_rng(0)
    coarse_seen, fine_seen = set(), set()
    for ep in range(3):
        env.reset(seed=ep)
        for _ in range(150):
            coarse_seen.add(state_hash(abstract_state(env, coarse=True)))
            fine_seen.add(state_hash(abstract_state(env)))
            legal = np.flatnonzero(env.action_masks())
            _, _, term, trunc, _ = env.step(int(rng.choice(legal)))
            if term or trunc:
                break
    assert len(coarse_seen) < len(fine_seen)


def test_random_agent_choices_are_legal_and_kind_first_spreads_operations() -> None:
    env = CowEnv(**SMALL)
    env.reset(seed=0)
    counts = {}
    for choice in ("template", "op", "weighted"):
        ag = ca.make_agent("random", choice=choice)
        ag.begin_episode(env, np.random.default_rng(1))
        mask = env.action_masks()
        ops = [env.catalogue[ag.act(env, None, mask)] for _ in range(400)]  # type: ignore[arg-type]
        assert all(mask[env.catalogue.index(sp)] for sp in ops)
        counts[choice] = sum(sp.op == "fork" for sp in ops)
    # Uniform over templates almost never forks (one template per thread among hundreds);
    # kind-first gives fork its turn.
    assert counts["op"] > counts["template"] and counts["weighted"] > counts["template"]
    with pytest.raises(ValueError):
        ca.make_agent("random", choice="nope")


# ----------------------------------------------------------------------------- teardown
def test_teardown_finishes_operations_and_exits_every_thread() -> None:
    env = CowEnv(**SMALL)
    agent = ca.make_agent("random")
    rng, rs = ca.episode_rng(5, 0, 0)
    res = ca.run_episode(env, agent, rng, rs, teardown=64)
    k = env.kernel
    assert res.steps <= env.max_steps
    # Either the teardown exited everybody (episode terminated) or only blocked threads
    # remained; user threads that are idle and alive would mean it stopped early.
    if res.terminated:
        assert all(t.exited for tid, t in k.threads.items() if tid != 0)
    else:
        assert not [t for tid, t in k.threads.items()
                    if tid != 0 and not t.exited and t.gen is None]


# ----------------------------------------------------------------------------- PPO
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cowenv_agents.ppo import train_ppo

    d = tmp_path_factory.mktemp("ppo")
    return train_ppo({**SMALL, "max_steps": 32}, 256, d / "model.zip", seed=0, n_envs=2,
                     log_dir=d / "runs", run_name="t", checkpoint_freq=128, eval_freq=128,
                     eval_episodes=1, net_arch=(16,), n_steps=64, teardown=8)


def test_ppo_training_writes_model_logs_checkpoints_and_evaluations(tiny_model: Path) -> None:
    root = tiny_model.parent / "runs" / "t"
    assert tiny_model.is_file() and tiny_model.suffix == ".zip"
    assert list((root / "tb").rglob("events.out.tfevents.*"))
    assert list((root / "checkpoints").glob("ppo_*_steps.zip"))
    assert (root / "eval" / "evaluations.npz").is_file()


def test_ppo_agent_samples_legal_actions_deterministically(tiny_model: Path) -> None:
    env = CowEnv(**SMALL)
    agent = ca.make_agent("ppo", model=str(tiny_model))
    obs, _ = env.reset(seed=0)
    p = agent.probabilities(obs, env.action_masks())  # type: ignore[attr-defined]
    assert abs(p.sum() - 1) < 1e-9 and not p[~env.action_masks()].any()
    s1 = _schedule(env, agent, seed=1, episodes=1)
    s2 = _schedule(env, ca.make_agent("ppo", model=str(tiny_model)), seed=1, episodes=1)
    assert s1 == s2
    other = CowEnv(geometry="small", max_threads=2)
    with pytest.raises(ValueError, match="observation shape|actions"):
        agent.check_env(other)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="model"):
        ca.make_agent("ppo")


def _random_obs(env: CowEnv, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, *env.observation_space.shape), dtype=np.float32)


@pytest.mark.parametrize("arch", ["trained", "relu-2x32"])
def test_ppo_numpy_actor_matches_the_torch_policy(tiny_model: Path, arch: str) -> None:
    from sb3_contrib import MaskablePPO

    env = CowEnv(**SMALL)
    if arch == "trained":
        model = ca.make_agent("ppo", model=str(tiny_model)).model  # type: ignore[attr-defined]
    else:
        import torch

        model = MaskablePPO("MlpPolicy", env, seed=3, device="cpu",
                            policy_kwargs={"net_arch": [32, 32],
                                           "activation_fn": torch.nn.ReLU})
    fast = ca.make_agent("ppo", model=model, backend="numpy")
    slow = ca.make_agent("ppo", model=model, backend="torch")
    assert (fast.backend, slow.backend) == ("numpy", "torch")  # type: ignore[attr-defined]
    obs = _random_obs(env, 64, seed=1)
    masks = np.random.default_rng(2).random((64, env.action_space.n)) < 0.3
    masks[:, 0] = True
    for o, m in zip(obs, masks, strict=True):
        a, b = fast.logits(o), slow.logits(o)  # type: ignore[attr-defined]
        assert a.dtype == np.float32 and a.shape == (env.action_space.n,)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fast.probabilities(o, m),  # type: ignore[attr-defined]
                                   slow.probabilities(o, m),  # type: ignore[attr-defined]
                                   rtol=1e-4, atol=1e-7)
        # The logits are SB3's: its own distribution (the torch path of predict) agrees.
        import torch

        with torch.no_grad():
            dist = model.policy.get_distribution(torch.as_tensor(o[None]))
        np.testing.assert_allclose(a, dist.distribution.logits[0].numpy()
                                   + torch.logsumexp(torch.as_tensor(b), 0).item(),
                                   rtol=1e-4, atol=1e-4)
    # Deterministic mode: the same action as SB3's predict(deterministic=True), both paths.
    fast_d = ca.make_agent("ppo", model=model, backend="numpy", deterministic=True)
    slow_d = ca.make_agent("ppo", model=model, backend="torch", deterministic=True)
    for o, m in zip(obs, masks, strict=True):
        want, _ = model.predict(o, action_masks=m, deterministic=True)
        assert fast_d.act(env, o, m) == slow_d.act(env, o, m) == int(want)
        assert m[fast_d.act(env, o, m)]
    # And on real episodes, sampling: the same schedules.
    s1 = _schedule(env, ca.make_agent("ppo", model=model, backend="numpy"), seed=4)
    s2 = _schedule(env, ca.make_agent("ppo", model=model, backend="torch"), seed=4)
    assert s1 == s2


def test_ppo_numpy_backend_refuses_an_unsupported_policy(tiny_model: Path) -> None:
    import torch
    from sb3_contrib import MaskablePPO

    env = CowEnv(**SMALL)
    model = MaskablePPO("MlpPolicy", env, seed=0, device="cpu",
                        policy_kwargs={"net_arch": [8], "activation_fn": torch.nn.ELU})
    with pytest.raises(ValueError, match="layer ELU"):
        ca.make_agent("ppo", model=model, backend="numpy")
    assert ca.make_agent("ppo", model=model).backend == "torch"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="backend"):
        ca.make_agent("ppo", model=model, backend="jax")


def test_agents_package_is_not_imported_by_cowenv() -> None:
    code = ("import sys, cowenv, cowenv.env, cowenv.cli, cowenv.scenario;"
            "print(any(m.startswith('cowenv_agents') for m in sys.modules),"
            " 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


def test_ppo_eval_cost_benchmark_plays_the_same_schedules_on_both_backends(
        tiny_model: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ppo_eval_cost

    r = ppo_eval_cost.measure(str(tiny_model), "gup-fast-fork-race", episodes=2, repeats=1)
    assert r["same_schedules"] and r["steps"]["ppo-numpy"] == r["steps"]["ppo-torch"] > 0
    assert set(r["ms_per_step"]) == {"random", "ppo-torch", "ppo-numpy"}
