"""benchmarks/tails.py: the exponential-tail model of a bug-finding result."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import tails  # noqa: E402


def _write(path: Path, runs: list[dict], budget: int = 100_000) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "bug_finding.json").write_text(json.dumps({"budget": budget, "runs": runs}))
    return path


def _runs(flaw: str, mean: float, n: int, seed: int, budget: int = 100_000) -> list[dict]:
    """Steps to a find drawn as an exponential of ``mean``; beyond the budget: a miss."""
    xs = np.random.default_rng(seed).exponential(mean, n)
    return [{"agent": "a", "flaw": flaw, "seed": i, "found": bool(x < budget),
             "steps": int(x) + 1 if x < budget else None} for i, x in enumerate(xs)]


def test_an_exponential_tail_is_recovered(tmp_path: Path) -> None:
    """Finds at a constant rate: the tail mean is the rate's, P(miss) as observed."""
    d = _write(tmp_path / "r", _runs("slow", 30_000, 4000, 1) + _runs("fast", 2_000, 4000, 2))
    runs, budget = tails.load_runs([str(d)], None)
    rows = {r["flaw"]: r for r in tails.tail_rows(runs, budget, 20_000)}
    slow = rows["slow"]
    assert slow["tail_mean"] == pytest.approx(30_000, rel=0.08)
    assert slow["p_miss"] == pytest.approx(math.exp(-100_000 / 30_000), rel=0.25)
    assert slow["observed"] == pytest.approx(slow["p_miss"], abs=0.015)
    assert rows["fast"]["late"] == 0 and rows["fast"]["p_miss"] == 0.0
    # Tails twice as fast: the factor for P(no miss in 56 seeds) = 0.5 is below 1.
    s = tails.needed_tail_mean(list(rows.values()), budget, 20_000, 56, 0.5)
    p = 56 * slow["p_late"] * math.exp(-80_000 / (s * slow["tail_mean"]))
    assert 0 < s < 1 and math.exp(-p) == pytest.approx(0.5, abs=0.01)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A missing or malformed result, or results of two budgets: one line, exit 2."""
    assert tails.main([str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bug_finding.json" in err
    (tmp_path / "bad.json").write_text("{}")
    assert tails.main([str(tmp_path / "bad.json")]) == 2
    assert "'runs' and 'budget'" in capsys.readouterr().err
    a = _write(tmp_path / "a", _runs("x", 1000, 10, 0))
    b = _write(tmp_path / "b", _runs("x", 1000, 10, 0, 50_000), 50_000)
    assert tails.main([str(a), str(b)]) == 2
    assert "expected one budget" in capsys.readouterr().err
    assert tails.main([str(a), "--agents", "nobody"]) == 2
    with pytest.raises(SystemExit) as e:
        tails.main([str(a), "--target", "1.5"])
    assert e.value.code == 2
    assert tails.main([str(a)]) == 0
    assert "| flaw |" in capsys.readouterr().out
