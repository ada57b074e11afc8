"""`prmtool stats`: the figures of a shard set, as JSON for scripts or as a table for people."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import polars as pl
import pytest

from prmtool.cli.stats import filter_reason_counts
from tests.conftest import SAMPLES, files_under


def stats_json(prmtool, *inputs) -> dict:
    result = prmtool("stats", *inputs, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines()]


def test_stats_of_problems(prmtool):
    figures = stats_json(prmtool, SAMPLES / "problems")
    assert figures["shards"] == 1
    assert figures["rows"] == len(jsonl("test_sample.jsonl")) == 40
    assert figures["problems"] == 40
    assert figures["responses_per_problem"] == {"count": 40, "mean": 1.0, "min": 1, "median": 1.0, "max": 1}
    assert "accuracy" not in figures and "step_labels" not in figures


def test_stats_of_responses_counts_problems_and_steps(prmtool):
    figures = stats_json(prmtool, SAMPLES / "responses")
    rows = jsonl("responses.jsonl")
    per_problem = Counter(row["problem"] for row in rows)
    assert figures["rows"] == len(rows) == 48
    assert figures["problems"] == len(per_problem) == 12
    assert figures["responses_per_problem"] == {"count": 12, "mean": 4.0, "min": 4, "median": 4.0, "max": 4}
    step_counts = sorted(len(row["response"].split("\n\n")) for row in rows)
    assert figures["steps_per_response"]["count"] == 48
    assert figures["steps_per_response"]["min"] == step_counts[0]
    assert figures["steps_per_response"]["max"] == step_counts[-1]
    assert figures["steps_per_response"]["mean"] == round(sum(step_counts) / len(step_counts), 4)


def test_stats_after_verify_reports_accuracy_and_statuses(prmtool, tmp_path):
    """Each sample problem has a correct \\boxed{} response, a correct `#### 1,234` one, a wrong
    one and a truncated one: half the responses are correct, and no problem is all right or
    all wrong."""
    verified = tmp_path / "verified"
    assert prmtool("verify", SAMPLES / "responses", "-o", verified, "--workers", "1", "-q").exit_code == 0

    figures = stats_json(prmtool, verified)
    kinds = Counter(row["response_id"].rsplit("-", 1)[1] for row in jsonl("responses.jsonl"))
    assert kinds == {"boxed": 12, "hashes": 12, "wrong": 12, "truncated": 12}
    assert figures["accuracy"] == pytest.approx((kinds["boxed"] + kinds["hashes"]) / 48) == 0.5
    assert figures["problems_all_correct"] == 0
    assert figures["problems_none_correct"] == 0
    assert figures["verify_status"] == {"no_answer": kinds["truncated"], "ok": 36}


def test_stats_of_labeled_steps_match_the_labels(prmtool):
    figures = stats_json(prmtool, SAMPLES / "labeled")
    rows = jsonl("labeled.jsonl")
    labels = Counter(label for row in rows for label in row["step_labels"])
    assert figures["rows"] == len(rows) == 24
    assert figures["step_labels"] == {"good": labels[1], "bad": labels[0], "unlabeled": labels[None]}
    assert labels[0] == 12, "one bad step in each wrong response"

    first_errors = [row["first_error"] for row in rows]
    assert figures["first_error"]["none"] == first_errors.count(-1) == 12
    errors = [e for e in first_errors if e >= 0]
    assert figures["first_error"]["count"] == len(errors)
    assert figures["first_error"]["min"] == min(errors)
    assert figures["first_error"]["max"] == max(errors)


def test_stats_of_several_shard_sets_together(prmtool):
    figures = stats_json(prmtool, SAMPLES / "responses", SAMPLES / "labeled" / "part-00000.parquet")
    assert figures["shards"] == 2
    assert figures["rows"] == 48 + 24
    assert figures["problems"] == 12


def test_stats_table_names_rows_and_problems(prmtool):
    result = prmtool("stats", SAMPLES / "responses")
    assert result.exit_code == 0, result.stderr
    assert "1 shard(s)" in result.stdout
    assert re.search(r"│ rows\s+│ 48\s+│", result.stdout)
    assert re.search(r"│ problems\s+│ 12\s+│", result.stdout)
    assert re.search(r"│ responses per problem\s+│ count 12, mean 4, min 4, median 4, max 4\s+│", result.stdout)


def test_stats_of_a_missing_path_is_an_input_error(prmtool, tmp_path):
    result = prmtool("stats", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert str(tmp_path / "nowhere") in result.stderr
    assert result.stdout == ""


# --plot: PNG plots of the same shard set, each drawn only when its columns exist.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is only {len(data)} bytes: an empty plot?"


@pytest.fixture
def labeled_with_outcomes(tmp_path):
    """Two problems after verify and label --method mc: per-step MC values (one null), first
    errors (-1 for none, null for an unlabeled row) and outcomes (one null)."""
    frame = pl.DataFrame(
        {
            "problem_id": ["p", "p", "p", "q", "q"],
            "response_id": ["p-0", "p-1", "p-2", "q-0", "q-1"],
            "steps": [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a", "b"], ["a", "b", "c"], ["a"]],
            "correct": [True, False, False, True, None],
            "step_mc": [[1.0, 1.0, 0.75, 1.0], [0.5, 0.25, 0.0, None], [0.0, 0.0], [1.0, 1.0, 1.0], None],
            "first_error": [-1, 2, 0, -1, None],
        },
        schema_overrides={"first_error": pl.Int32},
    )
    directory = tmp_path / "labeled"
    directory.mkdir()
    frame.write_parquet(directory / "part-00000.parquet")
    return directory


def test_stats_plot_writes_a_png_per_plot_the_columns_allow(prmtool, tmp_path, labeled_with_outcomes):
    plots = tmp_path / "report" / "plots"  # created, parents too
    result = prmtool("stats", labeled_with_outcomes, "--plot", plots)
    assert result.exit_code == 0, result.stderr
    assert re.search(r"│ rows\s+│ 5\s+│", result.stdout), "the table, as without --plot"

    assert files_under(plots) == ["accuracy_per_problem.png", "first_error_position.png", "mc_values.png"]
    for png in plots.iterdir():
        assert_png(png)
    assert f"wrote {plots / 'mc_values.png'} (12 step MC values)" in result.stderr, "13 steps, one MC null"
    assert f"wrote {plots / 'first_error_position.png'} (2 first errors)" in result.stderr
    assert f"wrote {plots / 'accuracy_per_problem.png'} (2 problems with an outcome)" in result.stderr
    assert "skipped filter_reasons.png: no filter_reason column" in result.stderr


def test_stats_plot_skips_the_plots_whose_columns_are_missing(prmtool, tmp_path):
    """The labeled sample has first errors but no MC values, outcomes or filter reasons."""
    result = prmtool("stats", SAMPLES / "labeled", "--plot", tmp_path / "plots", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 24

    assert files_under(tmp_path / "plots") == ["first_error_position.png"]
    assert_png(tmp_path / "plots" / "first_error_position.png")
    assert "skipped mc_values.png: no step_mc column" in result.stderr
    assert "skipped accuracy_per_problem.png: no correct column" in result.stderr
    assert "skipped filter_reasons.png: no filter_reason column" in result.stderr


def test_stats_plot_of_kept_and_rejected_rows_draws_the_filter_reasons(prmtool, tmp_path, labeled_with_outcomes):
    """filter writes kept rows to -o and the removed ones, with a filter_reason, to --rejects;
    given both, stats counts the rows without a reason as kept."""
    kept, rejects = tmp_path / "kept", tmp_path / "rejects"
    filtered = prmtool(
        "filter",
        labeled_with_outcomes,
        "-o",
        kept,
        "--rejects",
        rejects,
        "--method",
        "accuracy-band",
        "--band",
        "0.4,1",
        "-q",
    )
    assert filtered.exit_code == 0, filtered.stderr

    result = prmtool("stats", kept, rejects, "--plot", tmp_path / "plots", "-q")
    assert result.exit_code == 0, result.stderr
    assert_png(tmp_path / "plots" / "filter_reasons.png")
    assert result.stderr == "", "-q silences the plot log"
    # p (1 of 3 correct) is outside the band, q (1 of 1) inside; q's row with no outcome goes too.
    both = pl.concat(
        [pl.scan_parquet(kept / "part-00000.parquet"), pl.scan_parquet(rejects / "part-00000.parquet")],
        how="diagonal_relaxed",
    )
    assert filter_reason_counts(both) == {"kept": 1, "accuracy_band": 3, "no_outcome": 1}


def test_stats_plot_into_a_file_is_an_input_error(prmtool, tmp_path):
    (tmp_path / "plots").write_text("not a directory")
    result = prmtool("stats", SAMPLES / "labeled", "--plot", tmp_path / "plots")
    assert result.exit_code == 2
    assert str(tmp_path / "plots") in result.stderr
    assert result.stdout == ""


def test_the_cli_does_not_import_matplotlib_until_it_plots():
    """matplotlib takes a while to import; `prmtool --help` and the other stages never need it."""
    check = "import sys, prmtool.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)


def test_progress_shows_no_rate_early_and_a_token_based_upper_bound_for_time_left():
    """Rows that arrive in bulk in the first seconds show no rate (not `64,430.9 rows/s`); a
    stage that says how many tokens a row may cost gets its time left from tokens, marked as at
    most, before any row is done."""
    from types import SimpleNamespace

    from prmtool.core.report import RateColumn, RemainingColumn

    def task(elapsed, completed, total=100, **fields):
        return SimpleNamespace(elapsed=elapsed, completed=completed, total=total, fields=fields)

    assert RateColumn("rows").render(task(0.5, 60)).plain == ""
    assert RateColumn("rows").render(task(10.0, 60)).plain == "6.0 rows/s"
    assert RemainingColumn().render(task(10.0, 0)).plain == "-:--:--"
    assert RemainingColumn().render(task(10.0, 50)).plain == "0:00:10"
    # 100 rows x 64 tokens at most; 1,600 tokens in 10 s: 4,800 tokens left at 160 tokens/s
    assert RemainingColumn().render(task(10.0, 0, tokens=1600, tokens_per_row=64)).plain == "≤0:00:30"
