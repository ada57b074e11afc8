"""Exported steps are training text: a lossless split glues a blank piece's separator to the
next step ("\\nStep 2"), and a trainer joining steps with its own separator would turn that into
an empty line. Export drops those blank lines; the row's `steps` keep every byte."""

from __future__ import annotations

import polars as pl

from prmtool.methods.formats import training_step
from prmtool.methods.steps import make_splitter, split_steps

RESPONSE = "Step 1: 2 + 3 = 5.\n\n\nStep 2: 5 * 4 = 20.\n\n \n\nThe answer is \\boxed{20}.\n\n"


def test_a_lossless_split_carries_separators_into_step_starts():
    steps = split_steps(RESPONSE, make_splitter("blank-line"))
    assert "\n\n".join(steps) == RESPONSE
    assert steps[1].startswith("\nStep 2") and steps[2].startswith(" \n\nThe answer")


def test_training_steps_lose_only_blank_lines_at_their_ends():
    assert training_step("\nStep 2: 5 * 4 = 20.") == "Step 2: 5 * 4 = 20."
    assert training_step(" \n\nThe answer is 20.\n\n") == "The answer is 20."
    assert training_step("  indented = 1\nsecond line") == "  indented = 1\nsecond line"


def test_trl_stepwise_and_math_shepherd_export_steps_without_leading_blank_lines(prmtool, tmp_path):
    steps = split_steps(RESPONSE, make_splitter("blank-line"))
    pl.DataFrame(
        {
            "problem_id": ["p1"],
            "problem": ["What is (2 + 3) * 4?"],
            "response_id": ["r1"],
            "response": [RESPONSE],
            "steps": [steps],
            "step_labels": [[1, 1, 1]],
        },
        schema_overrides={"step_labels": pl.List(pl.Int8)},
    ).write_parquet(tmp_path / "labeled.parquet")
    assert prmtool("export", tmp_path / "labeled.parquet", "-o", tmp_path / "trl", "-f", "trl-stepwise").exit_code == 0
    [row] = pl.read_parquet(tmp_path / "trl" / "train").to_dicts()
    assert row["completions"] == ["Step 1: 2 + 3 = 5.", "Step 2: 5 * 4 = 20.", "The answer is \\boxed{20}."]
    # TRL's PRM trainer joins them with step_separator: no empty lines in the training text
    assert "\n\n" not in "\n".join(row["completions"])

    assert prmtool("export", tmp_path / "labeled.parquet", "-o", tmp_path / "ms", "-f", "math-shepherd").exit_code == 0
    [shepherd] = pl.read_parquet(tmp_path / "ms" / "train").to_dicts()
    assert "\n\n" not in shepherd["input"] and shepherd["input"].count("ки") == 3
