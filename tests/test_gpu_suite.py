"""``python -m benchmarks.gpu_suite --tiny``: the GPU suite's own code, run on the CPU with tiny
shapes, writes its table with every owed measurement and a finite positive ratio in each row.
(The numbers are not checked: on a CPU they mean nothing; the point is that the GPU run cannot
fail on a path this one did not take.)"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["a", "a.tps", "b", "c.time_per_user_turn", "c.prefill_tokens_per_turn", "c.prefill_tokens_at_turn_2",
        "c.forward_passes_per_turn", "c.samples_per_accepted_turn", "d", "d.ceiling", "d.share"]


def test_tiny_run_writes_every_row_with_a_finite_positive_ratio(tmp_path):
    out = tmp_path / "suite.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--tiny", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in done.stdout  # the same table on stdout and in the file
    assert text.startswith("gpu_suite --tiny: tiny Llama")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and not line.startswith("| key")]
    assert [r[0].strip() for r in rows] == KEYS
    for key, _what, ours, baseline, _unit, ratio, _reading in rows:
        for value in (ours, baseline, ratio):
            number = float(value)
            assert math.isfinite(number) and number > 0, (key, value)
