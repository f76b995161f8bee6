"""scripts/bench_plots.py: the figures of docs/benchmarks.md, drawn from the measured files under results/."""

from __future__ import annotations

import pytest

from conftest import SCRIPTS, load_script


@pytest.fixture(scope="module")
def plots():
    return load_script("bench_plots")


def test_eviction_stages_are_the_medians_of_the_steady_evictions(plots, tmp_path):
    log = tmp_path / "e.log"
    log.write_text(
        # the first eviction compresses the prompt (another shape) and is left out, as is eviction 1 of any shape
        "budget_evict: eviction 1: 1024 -> 512 cells (388 protected), pos_max = 1023, 28.0 ms (inputs 0.03, order 21.0, "
        "read-back 0.02, gather 6.6, metadata 0.2, wait 0.000 ms; 30 layers, two graphs; seq 0)\n"
        "budget_evict: eviction 2: 576 -> 512 cells (388 protected), pos_max = 1087, 10.0 ms (inputs 0.1, order 5.0, "
        "read-back 0.1, gather 4.0, metadata 0.2, wait 0.0 ms; 30 layers, two graphs; seq 0)\n"
        "budget_evict: eviction 3: 576 -> 512 cells (388 protected), pos_max = 1151, 12.0 ms (inputs 0.1, order 7.0, "
        "read-back 0.1, gather 4.4, metadata 0.3, wait 0.0 ms; 30 layers, two graphs; seq 0)\n"
        "budget_evict: eviction 4: 576 -> 512 cells (388 protected), pos_max = 1215, 11.0 ms (inputs 0.1, order 6.0, "
        "read-back 0.1, gather 4.2, metadata 0.25, wait 0.0 ms; 30 layers, two graphs; seq 0)\n")
    med, n = plots.eviction_stages(log)
    assert n == 3
    assert med["total"] == pytest.approx(11.0)
    assert med["order"] == pytest.approx(6.0)
    assert med["gather"] == pytest.approx(4.2)
    assert med["metadata"] == pytest.approx(0.25)
    assert med["plan"] == 0.0


def test_recorded_runs_parse(plots):
    # the files the docs' figures come from: a renamed or re-encoded file must fail here, not in the docs
    results = SCRIPTS.parent / "results"
    for _, rel in plots.EVICTION_RUNS:
        med, n = plots.eviction_stages(results / rel)
        assert n >= 3 and med["total"] > 0
    speed, kv = plots.batched_run(results / plots.BATCHED_RUNS[0][1])
    assert speed == pytest.approx(1189.32, abs=0.01)
    assert kv == pytest.approx(65.0)


def test_figures_are_written(plots, tmp_path):
    pytest.importorskip("matplotlib")
    assert plots.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "eviction_split.png").stat().st_size > 10_000
    assert (tmp_path / "many_sequences.png").stat().st_size > 10_000
