"""The action harness: the env is a thin adapter over it, and agents run on either."""

from __future__ import annotations

import cowenv_agents as ca
import gymnasium as gym
import numpy as np
import pytest

import cowenv
from cowenv.env import CowEnv
from cowenv.harness import Harness

SMALL_KW = dict(gym.spec(cowenv.SMALL_ENV_ID).kwargs)


def test_harness_and_env_give_the_same_episode():
    env = CowEnv(**SMALL_KW, terminate_on_violation=False)
    h = Harness(**SMALL_KW, terminate_on_violation=False)
    env.reset(seed=3)
    h.reset(3)
    rng = np.random.default_rng(3)
    for _ in range(400):
        assert np.array_equal(env.action_masks(), h.mask)
        legal = np.flatnonzero(h.mask)
        a = int(legal[rng.integers(len(legal))]) if rng.random() < 0.95 else 10**9
        _, r, term, trunc, info = env.step(a)
        st = h.step(a)
        assert (r, term, trunc) == (st.reward, st.terminated, st.truncated)
        assert info["violations"] == st.violation_dicts()
        assert info["illegal_action"] == st.illegal
        if term or trunc:
            env.reset(seed=4)
            h.reset(4)
    assert env.get_schedule() == h.get_schedule()


def test_invalid_actions_never_crash_the_harness():
    h = Harness(**SMALL_KW)
    with pytest.raises(RuntimeError, match="reset"):
        h.step(0)
    h.reset(0)
    for a in (-1, 10**30, "x", None, 3.7, len(h.catalogue)):
        st = h.step(a)
        assert st.illegal and st.reward == 0.0


@pytest.mark.parametrize("agent_name", ["random", "pct", "ql"])
def test_agents_find_the_same_on_harness_and_env(agent_name):
    """Campaign workers drive the harness for agents that read no observation."""
    results = []
    for host in (CowEnv(**SMALL_KW), Harness(**SMALL_KW)):
        agent = ca.make_agent(agent_name)
        assert not agent.needs_observation
        out = []
        for ep in range(6):
            rng, seed = ca.episode_rng(7, 0, ep)
            res = ca.run_episode(host, agent, rng, seed, teardown=24)
            out.append((res.steps, res.ret, res.terminated, sorted(res.signatures.items())))
        results.append(out)
    assert results[0] == results[1]


def test_ppo_needs_the_observation():
    from cowenv_agents.ppo import PPOAgent

    assert PPOAgent.needs_observation


def test_fault_mode_follows_the_base_unless_given() -> None:
    """Per-VMA-lock faults are the default on a base that has them (6.4+), not on 6.2."""
    from cowenv.harness import Harness

    assert Harness(geometry="small").config.fault_mode == "mmap_lock"
    assert Harness(geometry="small").config.base == "6.2"
    h = Harness(geometry="small", base="6.5")
    assert (h.config.base, h.config.fault_mode) == ("6.5", "vma_lock")
    assert Harness(geometry="small", base="6.4").config.fault_mode == "vma_lock"
    assert Harness(geometry="small", base="6.5", fault_mode="mmap_lock").config.fault_mode \
        == "mmap_lock"
    for bad in ({"base": "7.0"}, {"base": "6.2", "fault_mode": "vma_lock"}):
        with pytest.raises(ValueError):
            Harness(geometry="small", **bad)
