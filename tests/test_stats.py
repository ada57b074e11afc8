"""`prmtool stats`: the figures of a shard set, as JSON for scripts or as a table for people."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tests.conftest import SAMPLES


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
