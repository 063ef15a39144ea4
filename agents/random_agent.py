"""Uniform random scheduling: every legal catalogue action is equally likely."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import Agent, uniform_legal

if TYPE_CHECKING:
    from cowenv.env import CowEnv


class RandomAgent(Agent):
    """Pick uniformly among the legal actions of ``env.action_masks()``.

    No state across episodes. This is the "plain random" baseline of SCTBench: it is
    uniform over *actions*, so an idle thread's many start templates together are far
    more likely than running a busy thread one preemption point.
    """

    name = "random"

    def act(self, env: CowEnv, obs: np.ndarray, mask: np.ndarray) -> int:  # noqa: D102
        return uniform_legal(self.rng, mask)
