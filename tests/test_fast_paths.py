"""The throughput shortcuts change nothing: each fast path against its plain counterpart.

* :meth:`cowenv.harness.Harness.reset` unpickles a snapshot of the post-workload kernel
  instead of re-running the workload (``Harness.reset_snapshot``);
* :meth:`cowenv.harness.Harness._compute_mask` memoises masks by a small key
  (``Harness._mask_key``) instead of building each one, with their legal indices
  (``Harness.legal``, ``legal_actions()``) and the bytes :meth:`Harness.step` tests
  legality with;
* :meth:`cowenv.kernel.Kernel.start` validates arguments through
  :func:`cowenv.kernel.ops.validate_args_memo` (memoised :func:`validate_args`);
* batches of up to ``PagePool.SMALL_BATCH`` pages take scalar paths in the frame pool,
  ``page_alloc`` and ``rmap`` instead of numpy's (``SMALL_BATCH = 0``: always numpy);

The trace-hash corpus (``tests/test_corpus.py``) replays env episodes through every fast
path too; these tests compare the two paths step by step, with random legal actions.
"""

from __future__ import annotations

import re

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
        assert np.array_equal(h.legal, legal) and not h.legal.flags.writeable
        assert h.legal_actions() is h.legal
        assert h._mask_bytes == h.mask.tobytes()
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


def test_illegal_and_odd_actions_are_no_ops_as_before():
    """The legality test reads the mask's bytes: out-of-range, illegal, numpy and
    non-integer actions are no-ops exactly as a numpy mask lookup made them."""
    h = Harness(**gym.spec(cowenv.SMALL_ENV_ID).kwargs)
    h.reset(0)
    illegal = int(np.flatnonzero(~h.mask)[0])
    n0 = h.kernel.step_no
    for a in (illegal, -1, len(h.catalogue), "x", None, 2.5, np.int64(illegal)):
        st = h.step(a)
        assert st.illegal and st.reward == 0.0
    assert h.illegal_actions == 7 and h.kernel.step_no == n0
    legal = int(h.legal[0])
    assert not h.step(np.int64(legal)).illegal  # a numpy integer is an action too
    assert h.actions[-1] == legal and type(h.actions[-1]) is int


def test_env_legal_actions_match_the_mask():
    env = gym.make(cowenv.SMALL_ENV_ID).unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        legal = env.legal_actions()
        assert np.array_equal(legal, np.flatnonzero(env.action_masks()))
        _, _, term, trunc, _ = env.step(int(legal[rng.integers(len(legal))]))
        if term or trunc:
            env.reset()


def test_validate_args_memo_equals_validate_args():
    """Same result (a fresh dict each time) and the same refusals, memoised or not;
    values equal to an int but of another class are validated, not looked up."""
    from cowenv.kernel.ops import _VALID_MEMO, validate_args, validate_args_memo

    cases = [("madvise", {"addr": 0x10000, "length": 0x2000, "advice": "dontneed"}),
             ("madvise", {"advice": "DONTNEED", "length": 0x2000, "addr": 0x10000}),
             ("mprotect", {"addr": "0x10000", "length": 4096, "prot": "r"}),
             ("reclaim", {"nr": 1}), ("reclaim", {}), ("reclaim", {"nr": True}),
             ("reclaim", {"nr": np.int64(1)}), ("reclaim", {"nr": 1.0}),
             ("madvise", {"addr": 0x10001, "length": 0x2000, "advice": "DONTNEED"}),
             ("madvise", {"addr": 0x10000, "length": 0x2000, "advice": "BOGUS"}),
             ("nosuchop", {}), ("read", {"addr": 0x10000, "nosucharg": 1})]
    for _ in range(2):  # the second round hits the memo
        for op, args in cases:
            try:
                want = validate_args(op, dict(args))
            except ValueError as e:
                with pytest.raises(ValueError, match=re.escape(str(e))):
                    validate_args_memo(op, dict(args))
                continue
            got = validate_args_memo(op, dict(args))
            assert got == want and [type(v) for v in got.values()] == [
                type(v) for v in want.values()]
            got["addr"] = -5  # the caller's copy: the memo is not changed
            assert validate_args_memo(op, dict(args)) == want
    assert not any(isinstance(v, bool) or type(v).__module__ == "numpy"
                   for key in _VALID_MEMO for v in key)


class _NumpyPathsHarness(Harness):
    """A harness whose kernels take the numpy paths for every batch (``SMALL_BATCH`` 0)."""

    def reset(self, seed: int = 0):  # noqa: D102
        out = super().reset(seed)
        self.kernel.pool.SMALL_BATCH = 0
        return out


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("preset", ["as-posted", "fixed"])
def test_small_batch_scalar_paths_equal_numpy_paths(env_id, preset):
    """One-page and small-batch scalar paths: the same trace, violations, masks and pool."""
    kw = dict(gym.spec(env_id).kwargs, preset=preset)
    fast, plain = Harness(**kw), _NumpyPathsHarness(**kw)
    a = list(harness_rollout(fast, 1500, seed=0, rng_seed=5))
    b = list(harness_rollout(plain, 1500, seed=0, rng_seed=5))
    assert plain.kernel.pool.SMALL_BATCH == 0 and fast.kernel.pool.SMALL_BATCH > 0
    assert sum(1 for x in a if x[0] == "schedule") >= 2
    assert a == b
    pa, pb = fast.kernel.pool, plain.kernel.pool
    for name in ("refcount", "mapcount", "pincount", "flags", "content", "anon_vma", "index",
                 "shmem", "gen", "lru_seq", "swap"):
        assert np.array_equal(getattr(pa, name), getattr(pb, name)), name
    assert (pa.free, pa.nr_free, pa.lru_clock) == (pb.free, pb.nr_free, pb.lru_clock)
