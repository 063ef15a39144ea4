"""cowenv: adversarial fault scheduling against a simulated Linux mm with COW PTE tables.

Importing the package registers the Gymnasium ids ``cowenv/CowPte-v0`` and
``cowenv/CowPteSmall-v0`` cheaply: only gymnasium's registry is touched; the env module
(and the kernel) are imported when an env is made.
"""

from __future__ import annotations

__version__ = "0.1.0"

ENV_ID = "cowenv/CowPte-v0"
SMALL_ENV_ID = "cowenv/CowPteSmall-v0"
#: Keyword arguments that make ``cowenv/CowPteSmall-v0`` out of the default env.
SMALL_KWARGS = {"geometry": "small"}


def _register() -> None:
    """Register the env ids with Gymnasium if they are not registered yet (idempotent)."""
    try:
        from gymnasium.envs.registration import register, registry
    except ImportError:  # gymnasium is a dependency; tolerate its absence at import
        return
    if ENV_ID not in registry:
        register(id=ENV_ID, entry_point="cowenv.env:CowEnv")
    if SMALL_ENV_ID not in registry:
        register(id=SMALL_ENV_ID, entry_point="cowenv.env:CowEnv", kwargs=dict(SMALL_KWARGS))


_register()
