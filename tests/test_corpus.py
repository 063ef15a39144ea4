"""Replay the committed corpus: a refactor must give bit-identical traces and episodes.

``tests/corpus/corpus.json.gz`` was recorded before the kernel and env were split into
modules (``tests/corpus/make_corpus.py`` says how it is built). Every schedule must
replay to the same trace hash, step count and violation signatures; every env episode to
the same observations, rewards and flags; every scenario file to the same trace hash.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from cowenv.kernel import make_kernel
from cowenv.kernel.config import config_from_dict
from cowenv.kernel.ops import OPS
from cowenv.scenario import apply_step

sys.path.insert(0, str(Path(__file__).parent / "corpus"))
from make_corpus import CORPUS, env_digest, kernel_outcome, scenario_entries  # noqa: E402

ENTRIES = json.loads(gzip.decompress(CORPUS.read_bytes()))["entries"]
KERNEL = [e for e in ENTRIES if e["kind"] == "kernel"]
ENV = [e for e in ENTRIES if e["kind"] == "env"]


def test_corpus_covers_presets_geometries_fault_modes_and_every_op():
    assert len(KERNEL) >= 500
    combos = Counter((e["config"]["variant"], tuple(e["config"]["flaws"]),
                      e["config"]["ptrs_per_pte"], e["config"]["fault_mode"]) for e in KERNEL)
    assert len({(v, f) for v, f, _, _ in combos}) == 3  # classic, as-posted, fixed
    assert {p for _, _, p, _ in combos} >= {8, 512}
    assert {m for _, _, _, m in combos} == {"mmap_lock", "vma_lock"}
    started = {s["start"] for e in KERNEL for s in e["steps"] if "start" in s}
    assert started >= set(OPS), sorted(set(OPS) - started)
    assert {e["env_id"] for e in ENV} == {"cowenv/CowPteSmall-v0", "cowenv/CowPte-v0"}


@pytest.mark.parametrize("chunk", range(4))
def test_kernel_schedules_replay_to_the_same_trace(chunk):
    for e in KERNEL[chunk::4]:
        k = make_kernel(config_from_dict(dict(e["config"])), trace=True)
        for i, s in enumerate(e["steps"]):
            apply_step(k, s, {}, {}, i)
        assert kernel_outcome(k) == {key: e[key] for key in
                                     ("trace_hash", "step_no", "signatures", "defects")}, \
            f"corpus seed {e['seed']} diverged"


def test_env_episodes_replay_to_the_same_observations_and_rewards():
    import gymnasium as gym

    for e in ENV:
        env = gym.make(e["env_id"], preset=e["preset"], terminate_on_violation=False)
        assert env_digest(env, e["seed"], e["actions"]) == (e["digest"], e["trace_hash"]), \
            f"{e['env_id']} {e['preset']} seed {e['seed']} diverged"
        env.close()


def test_scenarios_replay_to_the_same_trace():
    recorded = {e["path"]: e for e in ENTRIES if e["kind"] == "scenario"}
    now = {e["path"]: e for e in scenario_entries()}
    for path, e in recorded.items():
        assert path in now, f"{path} is gone"
        assert now[path] == e, f"{path}: trace differs"
