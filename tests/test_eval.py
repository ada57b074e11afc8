"""`prmtool eval`: ProcessBench's first-error metrics, checked against values worked out by hand."""

import json

import polars as pl
import pytest

from prmtool.methods.evaluation import best_threshold, first_below, first_error_scores
from tests.conftest import ROOT


def test_error_and_correct_accuracy_and_their_harmonic_mean():
    # 3 erroneous rows (one found exactly, one found late, one missed), 2 correct rows (one
    # called error-free): error acc 1/3, correct acc 1/2, F1 = 2 * (1/3)(1/2) / (1/3 + 1/2) = 0.4
    scores = first_error_scores([2, 0, 1, -1, -1], [2, 1, -1, -1, 0])
    assert (scores.error_rows, scores.correct_rows) == (3, 2)
    assert scores.error_accuracy == pytest.approx(1 / 3)
    assert scores.correct_accuracy == pytest.approx(1 / 2)
    assert scores.f1 == pytest.approx(0.4)


def test_edge_cases():
    only_correct = first_error_scores([-1, -1], [-1, 3])
    assert only_correct.error_accuracy is None and only_correct.correct_accuracy == 0.5 and only_correct.f1 is None
    only_errors = first_error_scores([0, 1], [0, 1])
    assert only_errors.error_accuracy == 1.0 and only_errors.correct_accuracy is None and only_errors.f1 is None
    # a prediction past the last step (or null) is "no error found"
    past_the_end = first_error_scores([-1, -1, 1], [5, None, 1], n_steps=[3, 3, 3])
    assert past_the_end.correct_accuracy == 1.0 and past_the_end.error_accuracy == 1.0 and past_the_end.f1 == 1.0
    assert first_error_scores([1, -1], [0, 0]).f1 == 0.0  # both sides wrong


def test_a_prm_predicts_the_first_step_below_the_threshold():
    assert first_below([0.9, 0.4, 0.1], 0.5) == 1
    assert first_below([0.9, float("nan"), None, 0.2], 0.5) == 3
    assert first_below([0.9, 0.8], 0.5) == -1
    threshold, scores = best_threshold([1, -1], [[0.9, 0.2], [0.8, 0.7]])
    assert 0.2 < threshold <= 0.7 and scores.f1 == 1.0


def test_eval_on_the_processbench_sample(prmtool, tmp_path):
    sample = ROOT / "data_samples/processbench-gsm8k/gsm8k.jsonl"
    assert prmtool("import", sample, "--preset", "processbench", "-o", tmp_path / "pb", "-q").exit_code == 0
    frame = pl.read_parquet(tmp_path / "pb/*.parquet")
    assert frame.height == 400 and int((frame["human_first_error"] >= 0).sum()) == 207
    given = [json.loads(line)["steps"] for line in sample.open()]
    assert sorted(map(tuple, frame["steps"].to_list())) == sorted(map(tuple, given)), "steps kept exactly"

    # a predictor that says "no error" everywhere: correct acc 100, error acc 0, F1 0
    labeled = tmp_path / "labeled"
    labeled.mkdir()
    frame.with_columns(first_error=pl.lit(-1, dtype=pl.Int32)).write_parquet(labeled / "part-00000.parquet")
    result = prmtool("eval", labeled, "--by", "generator", "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    overall = report["results"][0]
    assert overall["group"] == "all" and overall["error_rows"] == 207 and overall["correct_rows"] == 193
    assert (overall["error_accuracy"], overall["correct_accuracy"], overall["f1"]) == (0.0, 1.0, 0.0)
    assert len(report["results"]) == 1 + frame["generator"].n_unique()
    assert "F1" in result.stdout


def test_eval_refuses_what_it_cannot_compute(prmtool, tmp_path):
    responses = ROOT / "data_samples/gsm8k/responses"
    missing = prmtool("eval", responses)
    assert missing.exit_code == 2 and "missing column 'human_first_error'" in missing.stderr
    sweep = prmtool("eval", responses, "--sweep")
    assert sweep.exit_code == 2 and "--sweep needs --pred-from" in sweep.stderr
