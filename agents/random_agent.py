"""Random scheduling: a uniformly random legal action, or a random kind first.

``choice="weighted"`` (the default) picks the kind of action (run a busy thread, a
pressure event, or one of the operations) with the soak's operation weights, then an
entry of that kind uniformly; ``choice="op"`` picks the kind uniformly;
``choice="template"`` is uniform over the legal catalogue entries (SCTBench's "plain
random") (:class:`cowenv_agents.base.KindChooser`). The default is the one the
bug-finding benchmark measured best (README "Agents: which to use").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import Agent, KindChooser

if TYPE_CHECKING:
    from cowenv.env import CowEnv


class RandomAgent(Agent):
    """Pick a random legal action of ``env.action_masks()`` (see the module docstring).

    No state across episodes.

    Args:
        choice: ``weighted`` (default), ``op`` or ``template``
            (:data:`cowenv_agents.base.CHOICES`).

    """

    name = "random"

    def __init__(self, choice: str = "weighted") -> None:
        super().__init__()
        KindChooser((), choice)  # validates
        self.choice = choice
        self._chooser: KindChooser | None = None
        self._env = 0

    def act(self, env: CowEnv, obs: np.ndarray, mask: np.ndarray) -> int:  # noqa: D102
        if self._chooser is None or self._env != id(env):
            self._chooser = KindChooser(env.catalogue, self.choice)
            self._env = id(env)
        return self._chooser.choose(self.rng, mask)
