"""The throughput shortcuts change nothing: each fast path against its plain counterpart.

* :meth:`cowenv.harness.Harness.reset` unpickles a snapshot of the post-workload kernel
  instead of re-running the workload (``Harness.reset_snapshot``);
* :meth:`cowenv.harness.Harness._compute_mask` memoises masks by a small key
  (``Harness._mask_key``) instead of building each one;

The trace-hash corpus (``tests/test_corpus.py``) replays env episodes through every fast
path too; these tests compare the two paths step by step, with random legal actions.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import cowenv
from cowenv.harness import Harness
from cowenv.kernel.trace import trace_hash

ENV_IDS = [cowenv.SMALL_ENV_ID, cowenv.ENV_ID]


def harness_rollout(h: Harness, n: int, seed: int, rng_seed: int):
    """Random legal actions on a harness; yields what each step did, as plain data."""
    rng = np.random.default_rng(rng_seed)
    h.reset(seed)
    for _ in range(n):
        legal = np.flatnonzero(h.mask)
        st = h.step(int(legal[rng.integers(len(legal))]))
        oc = st.outcome
        yield (h.actions[-1], oc.record, oc.label, st.reward, st.terminated, st.truncated,
               st.defect, st.extra, st.violation_dicts(), list(st.events), st.new_slot,
               h.mask.tobytes())
        if st.terminated or st.truncated:
            yield ("schedule", h.get_schedule(), trace_hash(h.kernel.events))
            h.reset(seed + 1)


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("preset", ["as-posted", "classic", "fixed"])
def test_reset_snapshot_equals_running_the_workload(env_id, preset):
    kw = dict(gym.spec(env_id).kwargs, preset=preset)
    snap, fresh = Harness(**kw), Harness(**kw)
    fresh.reset_snapshot = False
    a = list(harness_rollout(snap, 900, seed=2, rng_seed=9))
    assert snap._snapshot is not None and fresh._snapshot is None
    b = list(harness_rollout(fresh, 900, seed=2, rng_seed=9))
    assert sum(1 for x in a if x[0] == "schedule") >= 2  # several resets were exercised
    assert a == b
    assert snap.get_schedule() == fresh.get_schedule()
    assert trace_hash(snap.kernel.events) == trace_hash(fresh.kernel.events)


def test_reset_snapshot_is_a_private_copy():
    """Each reset gets its own kernel: an episode never leaks into the next one."""
    h = Harness(**gym.spec(cowenv.SMALL_ENV_ID).kwargs)
    h.reset(0)
    k0 = h.kernel
    n0, steps0 = len(k0.events), k0.step_no
    list(harness_rollout(h, 50, seed=0, rng_seed=1))
    h.reset(0)
    assert h.kernel is not k0 and h.kernel.pool is not k0.pool
    assert (len(h.kernel.events), h.kernel.step_no) == (n0, steps0)


def test_unpicklable_workload_state_falls_back_to_running_the_workload(monkeypatch):
    """A state that cannot be pickled disables the snapshot; resets still work."""
    import cowenv.harness as harness_mod

    def refuse(obj):
        raise TypeError("cannot pickle 'generator' object")

    monkeypatch.setattr(harness_mod, "snapshot_dumps", refuse)
    h = Harness(**gym.spec(cowenv.SMALL_ENV_ID).kwargs)
    ref = Harness(**gym.spec(cowenv.SMALL_ENV_ID).kwargs)
    ref.reset_snapshot = False
    assert list(harness_rollout(h, 300, 0, 3)) == list(harness_rollout(ref, 300, 0, 3))
    assert h._snapshot is None


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_memoised_masks_equal_masks_built_from_scratch(env_id):
    h = Harness(**dict(gym.spec(env_id).kwargs, preset="as-posted", max_processes=2))
    rng = np.random.default_rng(4)
    h.reset(0)
    built = 0
    for _ in range(1500):
        assert np.array_equal(h.mask, h._build_mask())
        assert not h.mask.flags.writeable
        legal = np.flatnonzero(h.mask)
        st = h.step(int(legal[rng.integers(len(legal))]))
        if st.terminated or st.truncated:
            assert np.array_equal(h.mask, h._build_mask())  # the "done" mask
            h.reset(0)
            built += 1
    assert built >= 3
    assert 1 < len(h._mask_memo) <= Harness._MASK_MEMO


def test_snapshot_reset_interns_strings_and_keeps_instance_layout():
    """The unpickled kernel's strings are the interned ones, and its instance attributes
    were restored one by one (not through ``__dict__``): what keeps its steps as fast as
    a fresh kernel's."""
    import sys

    import cowenv.harness as harness_mod

    restored: list[str] = []
    orig = harness_mod._set_attrs

    def spy(obj, state):
        restored.append(type(obj).__name__)
        orig(obj, state)

    h = Harness(**gym.spec(cowenv.SMALL_ENV_ID).kwargs)
    h.reset(0)
    harness_mod._set_attrs = spy
    try:
        h.reset(1)
    finally:
        harness_mod._set_attrs = orig
    assert type(h.kernel).__name__ in restored and "Oracle" in restored
    mm = h.kernel.procs[1].mm
    for s in (mm.mmap_lock.cls, mm.page_table_lock.cls, h.kernel.threads[1].op,
              *h.kernel.coverage):
        assert s is sys.intern(s)
