"""scripts/eviction_token_cost.py: per-token decode times split around decode-time evictions."""

from __future__ import annotations

import subprocess
import sys

from conftest import SCRIPTS, load_script

SCRIPT = SCRIPTS / "eviction_token_cost.py"


def test_tokens_are_split_by_the_eviction_count():
    split = load_script("eviction_token_cost").split_token_times
    times = [1.0, 1.1, 9.0, 1.5, 1.0, 8.0, 7.0, 1.2]
    counts = [3, 3, 4, 4, 4, 5, 6, 6]  # evictions before: 3; tokens 2, 5 and 6 evicted
    ordinary, evicting, after = split(times, counts, evictions_before=3)
    assert evicting == [9.0, 8.0, 7.0]
    assert after == [1.5, 1.2]  # token 6 followed an eviction but evicted itself: counted as evicting
    assert ordinary == [1.0, 1.1, 1.0]


def test_the_script_times_evictions_of_the_default_model(model_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_path), "--kv-budget", "64",
                           "--interval", "16", "--tokens", "120", "--threads", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kv_budget 64, interval 16, 120 tokens" in proc.stdout
    n = int(proc.stdout.split(" tokens, ")[1].split(" evictions")[0])
    assert n >= 3  # 64 + 16 cells reached at ~67 tokens, then one eviction per 16
    assert "evicting token: median" in proc.stdout


def test_a_budget_below_the_window_is_refused_with_a_message(model_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_path), "--kv-budget", "8",
                           "--tokens", "10"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "kv_budget" in proc.stderr and "Traceback" not in proc.stderr
