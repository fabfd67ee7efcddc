"""benchmarks/stress.py as a correctness test: nothing lost, torn, missed or raised.

Small by default (4 processes x 2 threads x 25 operations); FLECHE_STRESS=full runs the
benchmark's own default size (8 processes x 4 threads x 500 operations).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleche.testing import FULL_SIZE as FULL  # FLECHE_STRESS=full

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["index", "pickle", "sqlite", "h5"])
def test_stress_loses_nothing(tmp_path, store):
    if store == "h5":
        pytest.importorskip("h5py", reason="the h5 extra is not installed")
    if store == "sqlite":
        pytest.importorskip("sqlalchemy", reason="the sql extra is not installed")
    size = [] if FULL else ["--processes", "4", "--threads", "2", "--ops", "25"]
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress.py"), "--store", store,
         "--dir", str(tmp_path), "--json", str(out), *size],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["exceptions"] == 0, result["exception_samples"]
    assert result["lost_writes"] == 0 and result["acknowledged_writes"] > 0
    assert result["torn_or_corrupt_reads"] == 0
    assert result["transient_misses"] == 0
    assert result["duplicate_computations"] == 0
