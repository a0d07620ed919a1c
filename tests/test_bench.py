"""The benchmark scripts in bench/ start from any directory: their imports of the repo's flat modules resolve and
their options parse (the runs themselves are long and print figures; they are not part of the fast suite)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = ["bench_azr.py", "bench_generation.py", "bench_model.py", "bench_proposals.py", "bench_sandbox.py",
           "bench_update.py"]


def test_every_benchmark_is_listed():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help_runs_from_elsewhere(script, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
