"""The mutation benchmark's planted bugs: applied at run time only, and restored."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import mutation as mu  # noqa: E402

from cowenv.kernel.mmap import MmapMixin  # noqa: E402
from cowenv.scenario import load_scenario, run_scenario  # noqa: E402


def test_every_mutant_applies_and_is_restored():
    before = {m.name: getattr(__import__(m.module, fromlist=[m.cls]), m.cls).__dict__[m.method]
              for m in mu.MUTANTS}
    assert len(mu.MUTANTS) >= 10 and len({m.name for m in mu.MUTANTS}) == len(mu.MUTANTS)
    for m in mu.MUTANTS:
        cls = getattr(__import__(m.module, fromlist=[m.cls]), m.cls)
        with mu.planted(m):
            assert cls.__dict__[m.method] is not before[m.name]
        assert cls.__dict__[m.method] is before[m.name]


def test_a_planted_bug_changes_behaviour_only_inside_the_block():
    sc = load_scenario("scenarios/conformance/basic-cow-after-fork.yaml")
    assert run_scenario(sc, "fixed").passed
    m = next(m for m in mu.MUTANTS if m.name == "zap-rss-half")
    with mu.planted(m):
        assert not run_scenario(sc, "fixed").passed
    assert run_scenario(sc, "fixed").passed
    assert "zap_pte_range" in MmapMixin.__dict__


def test_a_snippet_that_does_not_match_is_refused():
    bad = mu.Mutant("bad", "zap", "cowenv.kernel.mmap", "MmapMixin", "zap_pte_range",
                    "no such code", "pass", "")
    with pytest.raises(RuntimeError, match="0 times"), mu.planted(bad):
        pass
