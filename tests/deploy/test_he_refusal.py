"""Issue 11: a he round with 2 sites is refused in a real loopback deployment, naming the reason.

With 2 hospitals each could subtract its own update from the aggregate and read the other's, whatever
the encryption. Secure aggregation refuses before any model leaves the server (the sites refuse too:
tests/privacy/test_he_pieces.py, test_secagg.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rehearse_he_with_2_hospitals_is_refused_naming_the_reason(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "fedmed", "rehearse", "--privacy", "he", "--hospitals", "2",
                             "--rounds", "1", "--out", str(out), "--workdir", str(work)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode != 0, result.stdout[-3000:]
    output = result.stdout + result.stderr
    assert "secure aggregation needs 3" in output, output[-3000:]
    assert "FINISHED:EXECUTION_EXCEPTION" in output
    # the downloaded job result records the refusal; no round ran, so no site's update was ever aggregated
    doc = json.loads(next(work.rglob("app_server/fedmed/metrics.json")).read_text())
    assert doc["finished"] is False and "only 2 site(s) advertised keys" in doc["error"] and doc["rounds"] == []
