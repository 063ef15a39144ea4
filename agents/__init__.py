"""Fuzzing agents for ``cowenv`` (installed as the package ``cowenv_agents``).

The folder is ``agents/`` in the repository; ``pyproject.toml`` maps it to the import
name ``cowenv_agents`` (a top-level ``agents`` module would collide with other
distributions). ``cowenv`` never imports this package at import time; ``cowenv fuzz``
and ``cowenv train`` import it when they run.

Agents: :class:`RandomAgent` (``random``), :class:`PCTAgent` (``pct``),
:class:`QLearningAgent` (``ql``), :class:`PPOAgent` (``ppo``, MaskablePPO from
sb3-contrib; :mod:`cowenv_agents.ppo` imports torch only when used) and
:class:`GreyboxAgent` (``greybox``, a coverage-guided schedule fuzzer).
"""

from __future__ import annotations

from typing import Any

from .base import (
    Agent,
    EpisodeResult,
    Teardown,
    episode_rng,
    episode_seed_sequence,
    run_episode,
    uniform_legal,
)
from .greybox import GreyboxAgent
from .pct import PCTAgent
from .qlearning import QLearningAgent, abstract_state, state_hash
from .random_agent import RandomAgent

#: Agent names accepted by :func:`make_agent` and ``cowenv fuzz --agent``.
AGENT_NAMES: tuple[str, ...] = ("random", "pct", "ql", "ppo", "greybox")


def make_agent(name: str, model: str | None = None, **kwargs: Any) -> Agent:
    """Build an agent by name.

    Args:
        name: ``random``, ``pct``, ``ql``, ``ppo`` or ``greybox``.
        model: Path of a saved MaskablePPO model (``ppo`` only; trusted input: SB3 models
            are pickle-based).
        **kwargs: Agent-specific settings (e.g. ``depth`` for PCT).

    Returns:
        A fresh agent.

    Raises:
        ValueError: unknown name, or ``ppo`` without a model.

    """
    if name == "random":
        return RandomAgent(**kwargs)
    if name == "pct":
        return PCTAgent(**kwargs)
    if name == "ql":
        return QLearningAgent(**kwargs)
    if name == "greybox":
        return GreyboxAgent(**kwargs)
    if name == "ppo":
        if model is None:
            raise ValueError("ppo: a trained model is needed (--model PATH)")
        from .ppo import PPOAgent

        return PPOAgent(model, **kwargs)
    raise ValueError(f"agent: expected one of {', '.join(AGENT_NAMES)}, got {name!r}")


def needs_observation(name: str) -> bool:
    """Whether agent ``name`` reads observations (:attr:`Agent.needs_observation`).

    Campaigns drive :class:`cowenv.harness.Harness` for agents that do not, and the
    Gymnasium env for those that do.
    """
    if name == "ppo":
        from .ppo import PPOAgent

        return PPOAgent.needs_observation
    classes: dict[str, type[Agent]] = {"random": RandomAgent, "pct": PCTAgent,
                                       "ql": QLearningAgent,
                                       "greybox": GreyboxAgent}
    if name not in classes:
        raise ValueError(f"agent: expected one of {', '.join(AGENT_NAMES)}, got {name!r}")
    return classes[name].needs_observation


__all__ = ["AGENT_NAMES", "Agent", "EpisodeResult", "GreyboxAgent", "PCTAgent", "QLearningAgent",
           "RandomAgent", "Teardown", "abstract_state", "episode_rng", "episode_seed_sequence",
           "make_agent", "needs_observation", "run_episode", "state_hash", "uniform_legal"]
