"""prmtool as other tools call it: verl's reward function on rows of a verl export."""

import threading

import polars as pl

from prmtool.integrations.verl_reward import compute_score


def test_verl_calls_the_reward_with_keywords_and_gets_a_float():
    # the exact call of verl's reward managers
    score = compute_score(
        data_source="lighteval/MATH",
        solution_str="She sells 9 eggs for $2 each.\n\nThe answer is $\\boxed{18}$.",
        ground_truth="18",
        extra_info={"split": "train", "index": 0, "problem_id": "gsm8k-test-0"},
    )
    assert score == 1.0 and isinstance(score, float)
    assert compute_score("lighteval/MATH", "The answer is \\boxed{19}", "18") == 0.0
    assert compute_score("lighteval/MATH", "Therefore, she makes $18 every day.", "18") == 1.0
    assert compute_score("lighteval/MATH", "I do not know", "18") == 0.0
    assert compute_score("lighteval/MATH", "#### 1,000", "1000") == 1.0


def test_the_reward_runs_outside_the_main_thread():
    """Math-Verify's timeouts need the main thread; a reward worker's thread gets no alarm."""
    scores = []
    worker = threading.Thread(target=lambda: scores.append(compute_score("x", "so \\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join()
    assert scores == [1.0]


def test_the_reward_scores_a_verl_export_row(prmtool, tmp_path):
    from tests.conftest import ROOT

    out = tmp_path / "verl"
    assert prmtool("export", ROOT / "data_samples/gsm8k/problems", "-o", out, "-f", "verl", "-q").exit_code == 0
    row = pl.read_parquet(out / "train/*.parquet").row(0, named=True)
    assert row["data_source"] == "lighteval/MATH"
    answer = row["reward_model"]["ground_truth"]
    reply = f"Working it out.\n\nThe answer is \\boxed{{{answer}}}."
    assert compute_score(row["data_source"], reply, row["reward_model"]["ground_truth"], row["extra_info"]) == 1.0
