"""Every file in scenarios/ is a regression test."""

from pathlib import Path

import pytest

from cowenv.scenario import load_scenario, run_scenario

ROOT = Path(__file__).resolve().parent.parent / "scenarios"
FILES = sorted(p for p in ROOT.rglob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_scenario(path: Path) -> None:
    sc = load_scenario(path)
    r = run_scenario(sc)
    assert r.error is None, r.error
    assert r.passed, (f"expected {r.expected.describe()}, observed "
                      f"{[v.signature + ': ' + v.message for v in r.violations]}")
