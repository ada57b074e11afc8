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
    # how the error rows missed: none too early, one too late (1 for 0), one missed (-1 for 1)
    assert (scores.error_too_early, scores.error_too_late, scores.error_missed) == pytest.approx((0, 1 / 3, 1 / 3))
    early = first_error_scores([3, 3, 2], [1, 3, 0])
    assert (early.error_accuracy, early.error_too_early, early.error_too_late) == pytest.approx((1 / 3, 2 / 3, 0))


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
    assert all(header in result.stdout for header in ("F1", "early", "late", "missed"))
    assert (overall["error_too_early"], overall["error_too_late"], overall["error_missed"]) == (0.0, 0.0, 1.0)


def test_eval_refuses_what_it_cannot_compute(prmtool, tmp_path):
    responses = ROOT / "data_samples/gsm8k/responses"
    missing = prmtool("eval", responses)
    assert missing.exit_code == 2 and "missing column 'human_first_error'" in missing.stderr
    sweep = prmtool("eval", responses, "--sweep")
    assert sweep.exit_code == 2 and "--sweep needs --pred-from" in sweep.stderr


def test_step_auroc_ranks_good_steps_above_bad_ones_over_the_steps_the_truth_labels():
    from prmtool.methods.evaluation import auroc, step_auroc, step_labels_from_first_error

    assert step_labels_from_first_error(2, 5) == [1, 1, 0, None, None]
    assert step_labels_from_first_error(-1, 2) == [1, 1] and step_labels_from_first_error(None, 2) == [None, None]
    assert auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert auroc([0.1, 0.8, 0.9], [1, 1, 0]) == 0.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts half
    assert auroc([0.3, 0.4], [1, 1]) is None  # no bad step: undefined
    # row 1: steps 0, 1 good, step 2 bad, step 3 unknown (its 0.95 is left out); row 2: all good.
    # good scores 0.9, 0.7, 0.6, 0.2; bad 0.3: 3 of 4 good steps outscore it -> 0.75
    assert step_auroc([2, -1], [[0.9, 0.7, 0.3, 0.95], [0.6, 0.2]]) == 0.75


def test_agreement_counts_each_way_two_first_error_columns_can_relate():
    from prmtool.methods.evaluation import agreement

    mc = [0, 1, -1, 2, -1, None, 5]
    judge = [0, 2, -1, -1, 1, 3, 9]  # the last: both past the last of 3 steps, i.e. no error
    counts = agreement(mc, judge, [3, 3, 3, 3, 3, 3, 3])
    assert counts == {
        "rows": 7, "same_step": 1, "both_error_free": 2, "different_steps": 1,
        "only_first_finds_error": 1, "only_second_finds_error": 1, "missing": 1,
    }  # fmt: skip


def test_best_of_n_beside_majority_vote_and_the_oracle():
    from prmtool.methods.evaluation import best_of_n

    groups = [
        # the highest score is wrong; the majority "5" is right; one right answer
        [(0.9, "4", False), (0.2, "5", True), (0.1, "5", True)],
        # the highest score is right, the majority wrong
        [(0.1, "7", False), (0.8, "8", True), (0.3, "7", False)],
        # nothing right
        [(0.5, "1", False), (0.4, None, False), (0.3, "2", False)],
    ]
    result = best_of_n(groups, 3)
    assert result == {"n": 3, "problems": 3, "best_of_n": 1 / 3, "majority": 1 / 3, "oracle": 2 / 3}
    first_one = best_of_n(groups, 1)  # one response per problem: all three methods agree
    assert first_one["best_of_n"] == first_one["majority"] == first_one["oracle"] == 0.0
    assert best_of_n(groups, 4)["problems"] == 0  # no group has 4 responses
    ties = best_of_n([[(0.5, "1", False), (0.5, "2", True)]], 2)  # equal scores, one vote each
    assert (ties["best_of_n"], ties["majority"], ties["oracle"]) == (0.0, 0.0, 1.0)  # the earlier one wins


def test_eval_best_of_n_and_agreement_from_the_command_line(prmtool, tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    pl.DataFrame(
        {
            "problem_id": ["p1", "p1", "p2", "p2"],
            "response_id": ["a", "b", "c", "d"],
            "steps": [["x", "y"], ["x"], ["x", "y"], ["x"]],
            "pred_answer": ["1", "2", "3", "3"],
            "correct": [False, True, True, True],
            "prm_score": [0.9, 0.1, 0.2, 0.8],
            "first_error": [0, -1, -1, -1],
            "judge_first_error": [0, 0, -1, None],
        }
    ).write_parquet(rows / "part-00000.parquet")
    bon = prmtool("eval", rows, "--best-of-n", "--n", "1,2", "--json", tmp_path / "bon.json")
    assert bon.exit_code == 0, bon.stderr
    results = json.loads((tmp_path / "bon.json").read_text())["results"]
    assert [r["best_of_n"] for r in results] == [0.5, 0.5] and [r["oracle"] for r in results] == [0.5, 1.0]
    agree = prmtool("eval", rows, "--against", "judge_first_error", "--json", tmp_path / "agree.json")
    assert agree.exit_code == 0, agree.stderr
    report = json.loads((tmp_path / "agree.json").read_text())
    assert (report["same_step"], report["both_error_free"], report["only_second_finds_error"]) == (1, 1, 1)
    assert report["missing"] == 1 and report["agreement"] == 2 / 3
    bad = prmtool("eval", rows, "--best-of-n", "--n", "4,x")
    assert bad.exit_code == 2 and "--n '4,x'" in bad.stderr
