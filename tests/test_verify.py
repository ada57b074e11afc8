"""Outcome verification: final-answer extraction and mathematical equivalence."""

import time

import polars as pl
import pytest

from prmtool.methods.verification import Verdict, extract_answer, last_boxed, verify_answers
from prmtool.stages.verify import verify_rows


@pytest.mark.parametrize(
    "response, answer",
    [
        ("So x = 2.\n\nThe answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{3} first, then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),  # the last box counts
        ("nested \\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
        ("The answer is: 72", "72"),
        ("The answer is 72 dollars.", "72"),
        ("The final answer is $1,234.50.", "1,234.50"),
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("Q: How many?\nA: 18", "18"),
        ("A: She sells 5. The answer is 7.", "7"),  # whichever answer marker comes last
        ("The answer is $\\boxed{5}$.", "5"),
        ("I am not sure.", None),
        ("unclosed \\boxed{12", None),
        ("", None),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{{1,2},{3}}") == "{1,2},{3}"


@pytest.mark.parametrize(
    "gold, pred, correct",
    [
        ("72", "72", True),
        ("72", "72.0", True),
        ("1000", "1,000", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{1}{2}", "0.5", True),
        ("3\\sqrt{2}", "\\sqrt{18}", True),
        ("x^2+1", "1+x^2", True),
        ("1", "10", False),  # openr's substring test accepts this; we must not
        ("10", "1", False),
        ("72", "73", False),
    ],
)
def test_answers_are_compared_by_mathematical_equivalence(gold, pred, correct):
    assert verify_answers([(gold, pred)], timeout=2, workers=1) == [Verdict(correct, "ok")]


def test_missing_answers_and_references_get_their_own_status():
    verdicts = verify_answers([("5", None), (None, "5"), ("", "5")], workers=1)
    assert verdicts == [Verdict(False, "no_answer"), Verdict(False, "no_reference"), Verdict(False, "no_reference")]


def test_a_hanging_comparison_times_out_without_stalling_the_others():
    pairs = [("5", "9^{9^{9^{9^{9}}}}")] + [(str(i), f"{i}.0") for i in range(50)]
    started = time.perf_counter()
    verdicts = verify_answers(pairs, timeout=1, workers=2)
    assert verdicts[0] == Verdict(False, "timeout")
    assert all(v == Verdict(True, "ok") for v in verdicts[1:])
    assert time.perf_counter() - started < 30


def test_verify_rows_adds_three_columns_and_keeps_everything_else():
    frame = pl.DataFrame(
        {
            "problem_id": ["p1", "p1", "p2"],
            "response_id": ["r1", "r2", "r3"],
            "response": ["so \\boxed{4}", "The answer is 5", "no idea"],
            "reference_answer": ["4", "4", "7"],
            "my_column": [1, 2, 3],
        }
    )
    result = verify_rows(frame, timeout=2, workers=1)
    assert result.columns == frame.columns + ["pred_answer", "answer_source", "correct", "verify_status"]
    assert result["pred_answer"].to_list() == ["4", "5", None]
    assert result["correct"].to_list() == [True, False, False]
    assert result["verify_status"].to_list() == ["ok", "ok", "no_answer"]
    assert result["my_column"].to_list() == [1, 2, 3]


def test_verify_command_on_the_sample(prmtool, responses_dir, tmp_path):
    out = tmp_path / "verified"
    result = prmtool("verify", responses_dir, "-o", out, "--workers", "2")
    assert result.exit_code == 0, result.stderr
    verified = pl.read_parquet(out / "part-00000.parquet")
    by_kind = {rid.rsplit("-", 1)[1]: [] for rid in verified["response_id"]}
    for rid, correct in zip(verified["response_id"], verified["correct"]):
        by_kind[rid.rsplit("-", 1)[1]].append(correct)
    # The sample's responses were written so that their correctness is known.
    assert all(by_kind["boxed"]) and all(by_kind["hashes"])
    assert not any(by_kind["wrong"]) and not any(by_kind["truncated"])
    assert set(verified.filter(pl.col("response_id").str.ends_with("truncated"))["verify_status"]) == {"no_answer"}
    assert "correct" in result.stderr and "24" in result.stderr


def test_problems_imported_without_answers_verify_as_no_reference_and_get_no_labels(prmtool, tmp_path):
    """Prompts alone import (for generation); verify cannot judge them: correct is null."""
    import polars as pl

    from prmtool.methods.labeling import label_rows

    source = tmp_path / "prompts.jsonl"
    source.write_text('{"problem": "What is 2 + 2?", "response": "2 + 2 = 4.\\n\\nThe answer is 4."}\n')
    assert prmtool("import", source, "-o", tmp_path / "imported", "-q").exit_code == 0
    assert prmtool("verify", tmp_path / "imported", "-o", tmp_path / "verified", "-q").exit_code == 0
    verified = pl.read_parquet(tmp_path / "verified" / "*.parquet")
    assert verified["verify_status"].to_list() == ["no_reference"]
    assert verified["correct"].to_list() == [None]
    labeled = label_rows(verified, engine=None, method="binary")  # no search runs: no engine needed
    assert labeled["first_error"].to_list() == [None] and labeled["step_labels"].to_list() == [None]
