"""`prmtool filter`: keep the responses whose process and outcome agree.

PROF (docs/algorithms.md, "PROF consistency filtering"), Qwen's consensus filter, an accuracy band
and --where. Kept rows go to -o, removed rows to --rejects with a filter_reason: the two
together are always exactly the input."""

from __future__ import annotations

import json
import math
import re

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from prmtool.methods.filtering import REASONS, filter_rows
from tests.conftest import files_under, write_shards

NAN = float("nan")


def responses(
    problem_id: str, outcomes: list[tuple[bool | None, float | None]], steps: int | list[int] = 3
) -> pl.DataFrame:
    """One problem's responses: (correct, mean step reward) each, ids `{problem_id}-0`, ... .
    A value of None gives a null step_rewards list."""
    counts = steps if isinstance(steps, list) else [steps] * len(outcomes)
    return pl.DataFrame(
        {
            "problem_id": [problem_id] * len(outcomes),
            "response_id": [f"{problem_id}-{i}" for i in range(len(outcomes))],
            "correct": [correct for correct, _ in outcomes],
            "steps": [[f"step {j}" for j in range(n)] for n in counts],
            "step_rewards": [None if value is None else [value] * 2 for _, value in outcomes],
        },
        schema_overrides={"correct": pl.Boolean, "step_rewards": pl.List(pl.Float64)},
    )


def ids(frame: pl.DataFrame) -> list[str]:
    return sorted(frame["response_id"])


def reasons(rejected: pl.DataFrame) -> dict[str, str]:
    return dict(zip(rejected["response_id"], rejected["filter_reason"]))


# The paper's worked example: n = 8, 5 correct and 3 wrong, k = 4.
PAPER = responses(
    "p",
    [(True, 0.9), (True, 0.8), (True, 0.3), (True, 0.2), (True, 0.1), (False, 0.7), (False, 0.4), (False, 0.05)],
)


# --- PROF: the balance rule -----------------------------------------------------------------


def test_paper_example_removes_three_correct_and_one_wrong_leaving_two_and_two():
    """c = min(4, round((5 - 3 + 4) / 2)) = 3: the 3 correct ones with the lowest mean step
    value go, and 4 - 3 = 1 wrong one, the one with the highest value."""
    kept, rejected = filter_rows(PAPER, remove=4)
    assert ids(kept) == ["p-0", "p-1", "p-6", "p-7"]
    assert kept["correct"].to_list() == [True, True, False, False]
    assert reasons(rejected) == {
        "p-2": "prof_correct_low_value",
        "p-3": "prof_correct_low_value",
        "p-4": "prof_correct_low_value",
        "p-5": "prof_incorrect_high_value",
    }


def test_all_correct_group_loses_its_k_lowest():
    group = responses("p", [(True, v) for v in (0.8, 0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.4)])
    kept, rejected = filter_rows(group, remove=4)
    assert sorted(kept["step_rewards"].list.first()) == [0.5, 0.7, 0.8, 0.9]
    assert set(rejected["filter_reason"]) == {"prof_correct_low_value"}


def test_all_wrong_group_loses_its_k_highest():
    """c = round((0 - 8 + 4) / 2) = -2 <= 0: all k removals come from the wrong ones."""
    group = responses("p", [(False, v) for v in (0.8, 0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.4)])
    kept, rejected = filter_rows(group, remove=4)
    assert sorted(kept["step_rewards"].list.first()) == [0.1, 0.2, 0.3, 0.4]
    assert set(rejected["filter_reason"]) == {"prof_incorrect_high_value"}


def test_mode_correct_removes_only_the_c_correct_ones():
    kept, rejected = filter_rows(PAPER, remove=4, mode="correct")
    assert ids(rejected) == ["p-2", "p-3", "p-4"]
    assert kept["correct"].to_list() == [True, True, False, False, False]


def test_mode_incorrect_removes_only_the_k_minus_c_wrong_ones():
    kept, rejected = filter_rows(PAPER, remove=4, mode="incorrect")
    assert reasons(rejected) == {"p-5": "prof_incorrect_high_value"}
    assert kept.height == 7


def test_mode_correct_on_an_all_wrong_group_removes_nothing():
    group = responses("p", [(False, 0.5)] * 8)
    kept, rejected = filter_rows(group, remove=4, mode="correct")
    assert (kept.height, rejected.height) == (8, 0)


@pytest.mark.parametrize(
    "n_correct, n_incorrect, k, removed_correct",
    [
        (4, 3, 4, 2),  # (4 - 3 + 4) / 2 = 2.5 rounds to 2 (to even, as Python's round)
        (3, 4, 4, 2),  # 1.5 rounds to 2
        (2, 3, 2, 0),  # 0.5 rounds to 0
        (6, 3, 4, 4),  # 3.5 rounds to 4
        (1, 6, 4, 0),  # -0.5 rounds to 0: all 4 from the wrong ones
    ],
)
def test_balance_rule_rounds_halves_to_even(n_correct, n_incorrect, k, removed_correct):
    group = responses("p", [(True, 0.5)] * n_correct + [(False, 0.5)] * n_incorrect)
    _, rejected = filter_rows(group, remove=k)
    assert rejected["correct"].sum() == removed_correct
    assert rejected.height == k


def test_keep_m_sets_k_to_n_minus_m_in_each_group():
    groups = pl.concat(
        [PAPER, responses("q", [(True, 0.9), (True, 0.1), (True, 0.5), (True, 0.6), (False, 0.2), (False, 0.3)])]
    )
    kept, rejected = filter_rows(groups, keep=4)
    assert kept.group_by("problem_id").len().sort("problem_id").rows() == [("p", 4), ("q", 4)]
    # q: n = 6, k = 2, c = round((4 - 2 + 2) / 2) = 2: its two lowest correct ones go.
    assert ids(rejected.filter(pl.col("problem_id") == "q")) == ["q-1", "q-2"]


def test_a_group_is_decided_alone_whatever_other_groups_hold():
    alone, _ = filter_rows(PAPER, remove=4)
    with_other, rejected = filter_rows(pl.concat([responses("q", [(False, 0.9)] * 3), PAPER]), remove=4)
    assert ids(with_other) == ids(alone)
    assert set(reasons(rejected.filter(pl.col("problem_id") == "q")).values()) == {"group_too_small"}


# --- PROF: length penalty, ties, missing values, small groups -------------------------------


def test_length_penalty_goes_first_and_counts_toward_k():
    """One correct response with 1 step and one wrong one with 31 are removed first; the
    balance rule then removes k' = 4 - 2 = 2 from the rest (4 correct, 2 wrong):
    c = round((4 - 2 + 2) / 2) = 2, leaving 2 correct and 2 wrong."""
    graded = [
        (True, 0.9),
        (True, 0.8),
        (True, 0.3),
        (True, 0.2),
        (True, 0.95),
        (False, 0.7),
        (False, 0.4),
        (False, 0.05),
    ]
    group = responses("p", graded, steps=[3, 3, 3, 3, 1, 3, 3, 31])
    kept, rejected = filter_rows(group, remove=4)
    assert reasons(rejected) == {
        "p-4": "too_few_steps",
        "p-7": "too_many_steps",
        "p-2": "prof_correct_low_value",
        "p-3": "prof_correct_low_value",
    }
    assert kept["correct"].to_list() == [True, True, False, False]


def test_length_penalty_removes_every_badly_sized_response_even_beyond_k():
    group = responses("p", [(True, 0.5)] * 8, steps=[40, 40, 40, 40, 40, 3, 3, 3])
    kept, rejected = filter_rows(group, remove=4)
    assert ids(kept) == ["p-5", "p-6", "p-7"]
    assert set(rejected["filter_reason"]) == {"too_many_steps"}


def test_step_bounds_are_inclusive_and_configurable():
    group = responses("p", [(True, 0.5)] * 4, steps=[1, 2, 30, 31])
    kept, rejected = filter_rows(group, remove=0)
    assert ids(kept) == ["p-1", "p-2"]
    assert reasons(rejected) == {"p-0": "too_few_steps", "p-3": "too_many_steps"}
    kept, _ = filter_rows(group, remove=0, min_steps=0, max_steps=100)
    assert kept.height == 4


def test_null_steps_count_as_zero_steps():
    group = responses("p", [(True, 0.5)] * 2).with_columns(
        steps=pl.Series([None, ["a", "b"]], dtype=pl.List(pl.String))
    )
    _, rejected = filter_rows(group, remove=0)
    assert reasons(rejected) == {"p-0": "too_few_steps"}


def test_ties_are_broken_by_response_id_whatever_the_row_order():
    group = responses("p", [(True, 0.5)] * 5 + [(False, 0.5)] * 3)
    _, rejected = filter_rows(group, remove=4)
    assert ids(rejected) == ["p-0", "p-1", "p-2", "p-5"], "the smaller ids go first on each side"
    _, shuffled = filter_rows(group.sample(fraction=1.0, shuffle=True, seed=7), remove=4)
    assert ids(shuffled) == ids(rejected)


def test_a_response_without_value_ranks_as_the_worst_of_its_side():
    """Null, empty and all-NaN step values give no value: such a correct response goes
    before the lowest-valued one, such a wrong one before the highest-valued one."""
    group = responses("p", [(True, 0.9), (True, 0.1), (True, None), (False, 0.9), (False, None)])
    group = group.with_columns(step_rewards=pl.Series([[0.9], [0.1], [NAN, NAN], [0.9], []], dtype=pl.List(pl.Float64)))
    # 3 correct, 2 wrong, k = 2: c = round(1.5) = 2 correct ones go, the valueless one first.
    _, rejected = filter_rows(group, remove=2)
    assert reasons(rejected) == {"p-2": "prof_correct_low_value", "p-1": "prof_correct_low_value"}
    # k = 3: c = round(2) = 2 and k - c = 1 wrong one, the valueless one before the 0.9.
    _, rejected = filter_rows(group, remove=3, mode="incorrect")
    assert reasons(rejected) == {"p-4": "prof_incorrect_high_value"}


def test_nan_steps_are_skipped_in_the_mean():
    """[0.9, NaN] has mean value 0.9, so it outranks 0.5 and stays."""
    group = responses("p", [(True, 0.5), (True, 0.9)]).with_columns(
        step_rewards=pl.Series([[0.5], [0.9, NAN]], dtype=pl.List(pl.Float64))
    )
    _, rejected = filter_rows(group, keep=1)
    assert ids(rejected) == ["p-0"]


def test_prm_score_is_used_as_it_is():
    group = responses("p", [(True, 0.0)] * 3).with_columns(prm_score=pl.Series([0.2, NAN, 0.1]))
    _, rejected = filter_rows(group, value="prm_score", keep=1)
    assert ids(rejected) == ["p-1", "p-2"], "NaN is missing, so worst; then the lower 0.1"


def test_remove_k_at_least_the_group_size_rejects_the_whole_group():
    groups = pl.concat([responses("small", [(True, 0.5), (False, 0.5), (True, 0.1), (False, 0.2)]),
                        responses("one", [(True, 0.5)]), PAPER])  # fmt: skip
    kept, rejected = filter_rows(groups, remove=4)
    assert set(kept["problem_id"]) == {"p"}
    assert reasons(rejected.filter(pl.col("problem_id") != "p")) == {
        "small-0": "group_too_small", "small-1": "group_too_small", "small-2": "group_too_small",
        "small-3": "group_too_small", "one-0": "group_too_small",
    }  # fmt: skip


def test_keep_never_empties_a_group_and_keeps_groups_of_one():
    groups = pl.concat([responses("one", [(False, 0.5)]), PAPER])
    kept, _ = filter_rows(groups, keep=4)
    assert ids(kept.filter(pl.col("problem_id") == "one")) == ["one-0"]


def test_remove_zero_applies_only_the_length_penalty():
    group = responses("p", [(True, 0.5)] * 3, steps=[3, 1, 3])
    kept, rejected = filter_rows(group, remove=0)
    assert (ids(kept), reasons(rejected)) == (["p-0", "p-2"], {"p-1": "too_few_steps"})


def test_null_outcome_is_rejected_and_not_part_of_the_group():
    group = PAPER.with_columns(correct=pl.when(pl.col("response_id") == "p-0").then(None).otherwise(pl.col("correct")))
    kept, rejected = filter_rows(group, keep=4)
    assert reasons(rejected)["p-0"] == "no_outcome"
    assert kept.height == 4, "the 7 with an outcome form the group: k = 7 - 4 = 3"


# --- the other methods ----------------------------------------------------------------------


def labeled(rows: list[tuple[bool | None, int | None, list[float] | None]]) -> pl.DataFrame:
    """(correct, MC first_error, per-step PRM values) per response, all of problem p."""
    return pl.DataFrame(
        {
            "problem_id": ["p"] * len(rows),
            "response_id": [f"p-{i}" for i in range(len(rows))],
            "correct": [r[0] for r in rows],
            "first_error": [r[1] for r in rows],
            "step_rewards": [r[2] for r in rows],
        },
        schema_overrides={"correct": pl.Boolean, "first_error": pl.Int32, "step_rewards": pl.List(pl.Float64)},
    )


def test_consensus_keeps_wrong_responses_whose_mc_and_prm_first_errors_agree():
    rows = labeled([
        (False, 1, [0.3, -0.2, -0.5]),  # PRM's first step below 0 is step 1, MC says 1: kept
        (False, 2, [0.3, -0.2, -0.5]),  # MC says 2: disagree
        (False, 1, [0.3, 0.2, 0.1]),  # the PRM flags nothing (-1): disagree
        (False, 0, [NAN, -0.1]),  # NaN is not below the threshold; step 1 is: disagree
        (False, None, [0.1, -0.2]),  # unlabeled wrong response
        (True, -1, [0.1, 0.2]),  # correct and not flagged: kept
        (True, -1, [0.1, -0.2]),  # correct but flagged: disagree
        (True, -1, None),  # no PRM values to check
    ])  # fmt: skip
    kept, rejected = filter_rows(rows, method="consensus")
    assert ids(kept) == ["p-0", "p-5"]
    assert reasons(rejected) == {
        "p-1": "consensus_disagree", "p-2": "consensus_disagree", "p-3": "consensus_disagree",
        "p-4": "no_label", "p-6": "consensus_disagree", "p-7": "no_value",
    }  # fmt: skip


def test_consensus_threshold_and_step_mc_default():
    rows = labeled([(False, 0, [0.4, 0.9]), (False, 1, [0.6, 0.45])]).rename({"step_rewards": "step_mc"})
    kept, _ = filter_rows(rows, method="consensus", value="step_mc")  # default threshold 0.5 for MC values
    assert ids(kept) == ["p-0", "p-1"]
    kept, rejected = filter_rows(rows, method="consensus", value="step_mc", threshold=0.42)
    assert ids(kept) == ["p-0"], "below 0.42, p-1 has no PRM error while MC says step 1"
    assert reasons(rejected) == {"p-1": "consensus_disagree"}


def test_accuracy_band_keeps_problems_with_mixed_outcomes():
    groups = pl.concat([responses(f"acc{n}", [(True, 0.5)] * n + [(False, 0.5)] * (4 - n)) for n in range(5)])
    kept, rejected = filter_rows(groups, method="accuracy-band")
    assert sorted(set(kept["problem_id"])) == ["acc1", "acc2", "acc3"], "accuracies 0.25, 0.5, 0.75"
    assert set(rejected["problem_id"]) == {"acc0", "acc4"}
    assert set(rejected["filter_reason"]) == {"accuracy_band"}
    kept, _ = filter_rows(groups, method="accuracy-band", band=(0.5, 1.0))
    assert sorted(set(kept["problem_id"])) == ["acc2", "acc3", "acc4"], "both bounds are inclusive"


def test_where_alone_and_before_a_method():
    rows = PAPER.with_columns(verify_status=pl.Series(["ok"] * 7 + [None]))
    kept, rejected = filter_rows(rows, method="none", where="verify_status = 'ok'")
    assert reasons(rejected) == {"p-7": "where"}, "null counts as false"
    # --where comes first: PROF sees 5 correct and 2 wrong, so keep=4 gives c = round((5-2+3)/2) = 3.
    kept, rejected = filter_rows(rows, keep=4, where="verify_status = 'ok'")
    assert ids(kept) == ["p-0", "p-1", "p-5", "p-6"]
    assert reasons(rejected)["p-7"] == "where"


# --- properties -----------------------------------------------------------------------------


def prof_reference(
    rows: list[dict], remove: int | None, keep: int | None, mode: str, min_steps: int, max_steps: int
) -> dict[str, str]:
    """The spec, group by group, in plain Python: response_id -> filter_reason."""
    out: dict[str, str] = {}
    by_problem: dict[str, list[dict]] = {}
    for row in rows:
        if row["correct"] is None:
            out[row["response_id"]] = "no_outcome"
        else:
            by_problem.setdefault(row["problem_id"], []).append(row)
    for group in by_problem.values():
        n = len(group)
        k = remove if keep is None else max(0, n - keep)
        rest = []
        for row in group:
            if row["n_steps"] < min_steps:
                out[row["response_id"]] = "too_few_steps"
            elif row["n_steps"] > max_steps:
                out[row["response_id"]] = "too_many_steps"
            else:
                rest.append(row)
        if k >= n:
            out.update((row["response_id"], "group_too_small") for row in rest)
            continue
        k_rest = max(0, k - (n - len(rest)))
        correct = [r for r in rest if r["correct"]]
        wrong = [r for r in rest if not r["correct"]]
        c = max(0, min(k_rest, round((len(correct) - len(wrong) + k_rest) / 2)))
        w = k_rest - c
        c, w = (c, 0) if mode == "correct" else (0, w) if mode == "incorrect" else (c, w)
        missing = lambda r: r["value"] is None or math.isnan(r["value"])  # noqa: E731
        correct.sort(key=lambda r: (not missing(r), 0 if missing(r) else r["value"], r["response_id"]))
        wrong.sort(key=lambda r: (not missing(r), 0 if missing(r) else -r["value"], r["response_id"]))
        out.update((r["response_id"], "prof_correct_low_value") for r in correct[:c])
        out.update((r["response_id"], "prof_incorrect_high_value") for r in wrong[:w])
    return out


@st.composite
def response_sets(draw) -> pl.DataFrame:
    rows = []
    for p in range(draw(st.integers(1, 5))):
        for i in range(draw(st.integers(1, 10))):
            rows.append({
                "problem_id": f"p{p}",
                "response_id": f"p{p}-{draw(st.integers(0, 10**6))}-{i}",
                "correct": draw(st.sampled_from([True, True, False, False, None])),
                "n_steps": draw(st.sampled_from([0, 1, 2, 3, 5, 30, 31])),
                "value": draw(st.sampled_from([0.1, 0.2, 0.5, 0.5, 0.9, -1.0, None, NAN])),
                "first_error": draw(st.sampled_from([None, -1, 0, 1, 2])),
            })  # fmt: skip
    frame = pl.DataFrame(rows, schema={"problem_id": pl.String, "response_id": pl.String, "correct": pl.Boolean,
                                       "n_steps": pl.Int64, "value": pl.Float64, "first_error": pl.Int32})  # fmt: skip
    return frame.with_columns(
        steps=pl.col("n_steps").map_elements(lambda n: [f"s{j}" for j in range(n)], return_dtype=pl.List(pl.String)),
        step_rewards=pl.when(pl.col("value").is_null()).then(None).otherwise(pl.concat_list("value", "value")),
    )


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    rows=response_sets(),
    budget=st.sampled_from([("remove", 0), ("remove", 2), ("remove", 4), ("keep", 1), ("keep", 3), ("default", None)]),
    mode=st.sampled_from(["both", "correct", "incorrect"]),
    bounds=st.sampled_from([(2, 30), (0, 100), (3, 5)]),
)
def test_prof_matches_the_spec_written_as_a_plain_loop(rows, budget, mode, bounds):
    remove = {"remove": budget[1], "keep": None, "default": 4}[budget[0]]
    keep = budget[1] if budget[0] == "keep" else None
    options = {budget[0]: budget[1]} if budget[0] != "default" else {}
    _, rejected = filter_rows(rows, mode=mode, min_steps=bounds[0], max_steps=bounds[1], **options)
    expected = prof_reference(rows.to_dicts(), remove, keep, mode, *bounds)
    assert reasons(rejected) == expected


@PROPERTY
@given(
    rows=response_sets(),
    method=st.sampled_from(
        [
            {"method": "prof"},
            {"method": "prof", "keep": 2, "mode": "correct"},
            {"method": "prof", "mode": "incorrect"},
            {"method": "consensus"},
            {"method": "accuracy-band"},
            {"method": "none", "where": "n_steps > 2"},
        ]
    ),  # fmt: skip
)
def test_kept_and_rejected_rows_are_exactly_the_input_rows(rows, method):
    kept, rejected = filter_rows(rows, **method)
    assert kept.columns == rows.columns
    assert rejected.columns == rows.columns + ["filter_reason"]
    assert set(rejected["filter_reason"]) <= set(REASONS)
    together = pl.concat([kept, rejected.drop("filter_reason")]).sort("response_id")
    assert_frame_equal(together, rows.sort("response_id"))


# --- the command ----------------------------------------------------------------------------


def summary_count(stderr: str, label: str) -> int:
    match = re.search(rf"{label}\s*│\s*([\d,]+)", stderr)
    assert match, f"no '{label}' in the summary:\n{stderr}"
    return int(match.group(1).replace(",", ""))


# q: 6 correct and 2 wrong; c = min(4, round((6 - 2 + 4) / 2)) = 4 correct ones go.
TWO_PROBLEMS = pl.concat(
    [
        PAPER,
        responses(
            "q",
            [(True, 0.6), (False, 0.5), (True, 0.4), (True, 0.3), (True, 0.2), (False, 0.1), (True, 0.0), (True, 0.9)],
        ),
    ]
)


def test_a_group_split_over_shards_is_filtered_as_one(prmtool, tmp_path):
    """Problem p's 8 responses are split 4 + 4 over two shards (and q's 8 sit in the second).
    Filtered shard by shard, each half of p would be a group of 4 and lost whole to --remove 4;
    filtered as one set, p keeps its 2 correct and 2 wrong."""
    inputs = write_shards(tmp_path / "scored", TWO_PROBLEMS, [4, 12])
    result = prmtool("filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects")
    assert result.exit_code == 0, result.stderr
    assert (
        files_under(tmp_path / "kept")
        == files_under(tmp_path / "rejects")
        == ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    )

    kept = pl.read_parquet(tmp_path / "kept" / "*.parquet")
    rejected = pl.read_parquet(tmp_path / "rejects" / "*.parquet")
    expected_kept, expected_rejected = filter_rows(TWO_PROBLEMS, remove=4)
    assert_frame_equal(kept, expected_kept)
    assert_frame_equal(rejected, expected_rejected)
    assert ids(kept.filter(pl.col("problem_id") == "p")) == ["p-0", "p-1", "p-6", "p-7"]
    # Each output shard holds the rows of the input shard of the same name.
    for name in ("part-00000.parquet", "part-00001.parquet"):
        source = pl.read_parquet(inputs / name)
        back = pl.concat(
            [
                pl.read_parquet(tmp_path / "kept" / name),
                pl.read_parquet(tmp_path / "rejects" / name).drop("filter_reason"),
            ]
        )
        assert_frame_equal(back.sort("response_id"), source.sort("response_id"))


def test_summary_and_json_report(prmtool, tmp_path):
    inputs = write_shards(tmp_path / "scored", TWO_PROBLEMS, [16])
    result = prmtool(
        "filter",
        inputs,
        "-o",
        tmp_path / "kept",
        "--rejects",
        tmp_path / "rejects",
        "--report",
        tmp_path / "report.json",
    )
    assert result.exit_code == 0, result.stderr
    assert summary_count(result.stderr, "rows in") == 16
    assert summary_count(result.stderr, "rows out") == 8
    assert summary_count(result.stderr, "groups") == 2
    assert summary_count(result.stderr, "positives before") == 11
    assert summary_count(result.stderr, "positives after") == 4
    assert summary_count(result.stderr, "negatives after") == 4
    assert summary_count(result.stderr, "removed prof correct low value") == 7

    report = json.loads((tmp_path / "report.json").read_text())
    assert report == {
        "stage": "filter",
        "arguments": {
            "method": "prof",
            "where": None,
            "mode": "both",
            "value": "step_rewards",
            "min_steps": 2,
            "max_steps": 30,
            "remove": 4,
        },
        "method": "prof",
        "rows_in": 16,
        "kept": 8,
        "removed": 8,
        "removed_by_reason": {"prof_correct_low_value": 7, "prof_incorrect_high_value": 1},
        "groups": 2,
        "groups_kept": 2,
        "groups_emptied": 0,
        "balance": {"before": {"positive": 11, "negative": 5}, "after": {"positive": 4, "negative": 4}},
        "values_missing": 0,
    }


def test_output_shards_carry_filter_provenance(prmtool, tmp_path):
    inputs = write_shards(tmp_path / "scored", PAPER, [8])
    assert (
        prmtool(
            "filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects", "--keep", "2", "-q"
        ).exit_code
        == 0
    )
    for directory, part in [("kept", "kept"), ("rejects", "rejected")]:
        record = json.loads(pq.read_schema(tmp_path / directory / "part-00000.parquet").metadata[b"prmtool"])
        assert record["stage"] == "filter"
        assert record["arguments"]["keep"] == 2 and record["arguments"]["part"] == part
        assert record["input"]["path"] == str((inputs / "part-00000.parquet").resolve())


def test_an_input_with_no_row_kept_still_gets_its_output_shard(prmtool, tmp_path):
    inputs = write_shards(tmp_path / "scored", responses("p", [(True, 0.5)] * 2), [2])
    result = prmtool("filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects")
    assert result.exit_code == 0, result.stderr
    assert "every row was removed" in result.stderr and "group" in result.stderr
    empty = pl.read_parquet(tmp_path / "kept" / "part-00000.parquet")
    assert empty.height == 0 and empty.columns == PAPER.columns


def test_missing_value_column_is_an_input_error_naming_file_and_column(prmtool, tmp_path):
    inputs = write_shards(tmp_path / "scored", PAPER, [8])
    result = prmtool(
        "filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects", "--value", "step_values"
    )
    assert result.exit_code == 2
    assert str(inputs / "part-00000.parquet") in result.stderr and "'step_values'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "kept").exists() and not (tmp_path / "rejects").exists()


def test_missing_required_column_in_one_shard_writes_nothing(prmtool, tmp_path):
    inputs = write_shards(tmp_path / "scored", PAPER, [4, 4])
    pl.read_parquet(inputs / "part-00001.parquet").drop("steps").write_parquet(inputs / "part-00001.parquet")
    result = prmtool("filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects")
    assert result.exit_code == 2
    assert "part-00001.parquet" in result.stderr and "missing required column 'steps'" in result.stderr
    assert files_under(tmp_path / "kept") == files_under(tmp_path / "rejects") == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--remove", "2", "--keep", "2"], "--remove and --keep exclude each other"),
        (["--band", "0.2,0.8"], "--band applies to --method accuracy-band"),
        (["--method", "consensus", "--remove", "2"], "--remove applies to --method prof"),
        (["--method", "consensus", "--value", "prm_score"], "needs per-step values"),
        (["--method", "accuracy-band", "--band", "0.9,0.1"], "--band '0.9,0.1'"),
        (["--method", "majority"], "--method 'majority'"),
        (["--mode", "wrong"], "--mode 'wrong'"),
        (["--keep", "0"], "--keep 0"),
        (["--where", "no_such_column > 1"], "no_such_column"),
        (["--method", "none", "--where", "response_id"], "--where 'response_id'"),  # not true/false
        # a Boolean against a word polars would cast to null: every row would go, unasked
        (["--method", "none", "--where", "correct = 'yes'"], "correct is true or false, never 'yes'"),
        (["--method", "none", "--where", "NOT ('TRUE' <> correct)"], "never 'TRUE'"),
    ],
)
def test_usage_errors_are_one_line_and_write_nothing(prmtool, tmp_path, args, message):
    inputs = write_shards(tmp_path / "scored", PAPER, [8])
    result = prmtool("filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "kept").exists()


def test_where_may_compare_a_boolean_with_the_exact_words_true_and_false(prmtool, tmp_path):
    inputs = write_shards(tmp_path / "scored", PAPER, [8])
    args = ("-o", tmp_path / "kept", "--rejects", tmp_path / "rejects", "--method", "none")
    result = prmtool("filter", inputs, *args, "--where", "correct = 'true'")
    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(tmp_path / "kept" / "*.parquet")["correct"].to_list() == [True] * 5


@pytest.mark.parametrize("rejects", ["kept", "kept/rejects"])
def test_rejects_must_be_apart_from_the_output(prmtool, tmp_path, rejects):
    inputs = write_shards(tmp_path / "scored", PAPER, [8])
    result = prmtool("filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / rejects)
    assert result.exit_code == 2 and "must be separate paths" in result.stderr


def test_rerun_is_a_no_op_and_other_options_need_overwrite(prmtool, tmp_path):
    inputs = write_shards(tmp_path / "scored", PAPER, [8])
    args = ("filter", inputs, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects")
    assert prmtool(*args, "-q").exit_code == 0
    again = prmtool(*args)
    assert again.exit_code == 0 and "already complete" in again.stderr

    refused = prmtool(*args, "--keep", "6")
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    assert prmtool(*args, "--keep", "6", "--overwrite", "-q").exit_code == 0
    assert pl.read_parquet(tmp_path / "kept" / "part-00000.parquet").height == 6
    assert pl.read_parquet(tmp_path / "rejects" / "part-00000.parquet").height == 2


def test_help_shows_examples(prmtool):
    result = prmtool("filter", "--help")
    assert result.exit_code == 0
    assert "prmtool filter work/scored -o work/prof --rejects work/prof_rejects" in result.stdout
