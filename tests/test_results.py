"""The results table's statistics (benchmarks/results.py): t-intervals and the verdicts."""

import math

import pytest

from benchmarks import results


def test_t_interval_is_the_students_t_half_width():
    mean, half = results.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # t(0.975, 4 dof) = 2.776445 (tables); sd = sqrt(2.5), n = 5.
    assert mean == 3.0
    assert half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert math.isnan(results.t_interval([88.0])[1])


def test_compare_by_welch_t():
    hi, lo = [89.1, 89.3, 89.2, 89.0, 89.4], [88.1, 88.3, 88.2, 88.0, 88.4]
    verdict, diff, p = results.compare(hi, lo)
    assert verdict == "reproduced" and diff == pytest.approx(1.0) and p < 1e-4
    assert results.compare(lo, hi)[0] == "not reproduced"
    noisy = [88.0, 89.5, 88.2, 89.1, 88.6]
    assert results.compare(noisy, [88.5, 88.7, 88.4, 88.9, 88.6])[0] == "not resolved"
    assert results.compare([89.0], lo)[0] == "not resolved"  # one seed: no test


def test_chain_verdict():
    assert results.chain_verdict(["reproduced", "reproduced"]) == "reproduced"
    assert results.chain_verdict(["reproduced", "not resolved"]) == "not resolved"
    assert results.chain_verdict(["not resolved", "not reproduced"]) == "not reproduced"


def test_verdict_lines_name_every_claim():
    rows = [dict(spec=s, label=s, accuracies=[0.88, 0.881, 0.879], coupled=[], agreements=[])
            for _, specs in results.CLAIMS for s in specs]
    rows.append(dict(spec="method=sb", label="SB", accuracies=[0.87], agreements=[1.0, 0.9999]))
    text = "\n".join(results.verdict_lines(rows))
    for claim, _ in results.CLAIMS:
        assert claim in text
    assert "is the trained one (Lahoud & Achanta 2019): not reproduced" in text


def test_a_row_with_one_seed_says_there_is_no_test():
    rows = [dict(spec=s, label=s, accuracies=[0.88, 0.881, 0.879], coupled=[], agreements=[])
            for _, specs in results.CLAIMS for s in specs]
    rows[0]["accuracies"] = [0.89]
    text = "\n".join(results.verdict_lines(rows))
    assert "no test with n = 1 and 3" in text
    assert "nan" not in text


def test_resumed_runs_count_for_accuracy_but_not_for_train_time():
    row = dict(accuracies=[], times=[], extra=[], agreements=[], coupled=[])
    results._add_run(row, 0, {"test_accuracy": 0.88, "train_time_s": 300.0, "resumed_from_step": None})
    results._add_run(row, 1, {"test_accuracy": 0.89, "train_time_s": 40.0, "resumed_from_step": 800})
    assert row["accuracies"] == [0.88, 0.89]
    assert row["times"] == [300.0]


def test_a_recipe_summary_reads_resume_info_from_its_stages(tmp_path):
    import json

    (tmp_path / "coupled").mkdir()
    (tmp_path / "decoupled").mkdir()
    (tmp_path / "recipe.json").write_text(json.dumps({"test_accuracy": 0.9}))
    (tmp_path / "coupled" / "final.json").write_text(json.dumps({"resumed_from_step": None}))
    (tmp_path / "decoupled" / "final.json").write_text(json.dumps({"resumed_from_step": 120}))
    assert results._finished(str(tmp_path))["resumed_from_step"] == 120
