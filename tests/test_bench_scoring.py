"""scripts/bench_scoring.py: maml-eval at several score_every settings, timed, and checked to agree where both scored."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_dirs, run_in_process
from test_e2e import SINE


def test_the_scoring_bench_times_each_setting_and_finds_them_in_agreement(tmp_path):
    run_in_process("maml-train", SINE, cwd=tmp_path)  # sinusoid: 10 inner steps at test
    (run,) = run_dirs(tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_scoring.py"), str(run / "last.pt"), "--every", "1,4",
                             "--tasks", "3", "--query", "5", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "score_every=4: " in result.stdout and "steps scored: 0, 4, 8, 10" in result.stdout
    assert "| 1 | 11 |" in result.stdout and "| 4 | 4 |" in result.stdout
    assert "The settings agree at every step both scored." in result.stdout
    assert not list(Path(run).glob("eval_*.json"))  # the bench's own reports stay in its temporary folder
