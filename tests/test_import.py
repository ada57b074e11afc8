"""`prmtool import`: bring problems and responses from common file formats into the row contract."""

from __future__ import annotations

import json
import re

import polars as pl
import pyarrow.parquet as pq
import pytest

from prmtool import __version__
from prmtool.core import shards
from prmtool.stages.import_ import stable_id
from tests.conftest import SAMPLES, files_under

PROBLEMS = [
    {"problem": "What is 2 + 3?", "reference_answer": "5"},
    {"problem": "What is 7 * 6?", "reference_answer": "42"},
    {"problem": "What is 10 / 4?", "reference_answer": "5/2"},
]


def read_output(directory) -> pl.DataFrame:
    return pl.read_parquet(directory / "*.parquet")


def problems_of(frame: pl.DataFrame) -> list[dict]:
    return frame.select("problem", "reference_answer").to_dicts()


# --- one source format after another -------------------------------------------------------


def test_import_jsonl_writes_one_parquet_shard_in_the_row_contract(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(PROBLEMS, "problems.jsonl")
    result = prmtool("import", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "out") == ["_SUCCESS", "part-00000.parquet"]
    frame = read_output(tmp_path / "out")
    assert frame.columns[:3] == ["problem_id", "problem", "reference_answer"]
    assert frame.schema["problem_id"] == pl.String
    assert problems_of(frame) == PROBLEMS
    assert frame["problem_id"].to_list() == [stable_id(p["problem"]) for p in PROBLEMS]


def test_import_json_list_of_records(prmtool, tmp_path):
    source = tmp_path / "problems.json"
    source.write_text(json.dumps(PROBLEMS))
    assert prmtool("import", source, "-o", tmp_path / "out").exit_code == 0
    assert problems_of(read_output(tmp_path / "out")) == PROBLEMS


def test_import_csv_keeps_answers_as_written(prmtool, tmp_path):
    """CSV cells stay text: an answer such as `007` or `5/2` is not turned into a number."""
    source = tmp_path / "problems.csv"
    source.write_text('problem,reference_answer\n"What is 2 + 3, really?",5\nA code,007\n')
    assert prmtool("import", source, "-o", tmp_path / "out").exit_code == 0
    frame = read_output(tmp_path / "out")
    assert problems_of(frame) == [
        {"problem": "What is 2 + 3, really?", "reference_answer": "5"},
        {"problem": "A code", "reference_answer": "007"},
    ]


def test_import_parquet_with_numeric_answers_casts_them_to_text(prmtool, tmp_path):
    source = tmp_path / "problems.parquet"
    pl.DataFrame({"problem": ["What is 2 + 3?", "What is 7 * 6?"], "reference_answer": [5, 42]}).write_parquet(source)
    assert prmtool("import", source, "-o", tmp_path / "out").exit_code == 0
    frame = read_output(tmp_path / "out")
    assert frame.schema["reference_answer"] == pl.String
    assert frame["reference_answer"].to_list() == ["5", "42"]


def test_import_datasets_folder_saved_with_save_to_disk(prmtool, tmp_path):
    import datasets

    datasets.Dataset.from_list(PROBLEMS).save_to_disk(str(tmp_path / "hf"))
    assert prmtool("import", tmp_path / "hf", "-o", tmp_path / "out", "--quiet").exit_code == 0
    assert problems_of(read_output(tmp_path / "out")) == PROBLEMS


def test_import_datasets_dict_folder_picks_the_split_named_by_dataset_split(prmtool, tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PROBLEMS[:2]), "test": datasets.Dataset.from_list(PROBLEMS[2:])}
    ).save_to_disk(str(tmp_path / "hf"))

    result = prmtool("import", tmp_path / "hf", "-o", tmp_path / "out", "--dataset-split", "test", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert problems_of(read_output(tmp_path / "out")) == PROBLEMS[2:]


def test_import_datasets_dict_with_several_splits_asks_for_dataset_split(prmtool, tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PROBLEMS[:2]), "test": datasets.Dataset.from_list(PROBLEMS[2:])}
    ).save_to_disk(str(tmp_path / "hf"))

    result = prmtool("import", tmp_path / "hf", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "--dataset-split" in result.stderr and "train, test" in result.stderr
    assert not (tmp_path / "out").exists()
    typo = prmtool("import", tmp_path / "hf", "-o", tmp_path / "out", "--dataset-split", "tset")
    assert typo.exit_code == 2
    assert "--dataset-split 'tset': no such split (has: train, test); did you mean 'test'?" in typo.stderr


def test_import_several_files_into_one_shard_set(prmtool, write_jsonl, tmp_path):
    first = write_jsonl(PROBLEMS[:2], "a.jsonl")
    second = tmp_path / "b.csv"
    second.write_text("problem,reference_answer\nWhat is 10 / 4?,5/2\n")
    assert prmtool("import", first, second, "-o", tmp_path / "out").exit_code == 0
    assert problems_of(read_output(tmp_path / "out")) == PROBLEMS


# --- column conventions -------------------------------------------------------------------


def test_map_renames_source_columns_to_contract_columns(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"question": "What is 2 + 3?", "gold": "5", "source": "toy"}])
    result = prmtool(
        "import", source, "--map", "question=problem", "--map", "gold=reference_answer", "-o", tmp_path / "out"
    )
    assert result.exit_code == 0, result.stderr
    frame = read_output(tmp_path / "out")
    assert frame.select("problem", "reference_answer", "source").to_dicts() == [
        {"problem": "What is 2 + 3?", "reference_answer": "5", "source": "toy"}
    ]
    assert "question" not in frame.columns and "gold" not in frame.columns


def test_preset_gsm8k_splits_the_answer_at_the_four_hashes(prmtool, tmp_path):
    """GSM8K's `answer` is the worked solution, then `#### X`: X becomes reference_answer
    (thousands separators dropped), the text before it reference_solution."""
    source = SAMPLES / "test_sample.jsonl"
    originals = [json.loads(line) for line in source.read_text().splitlines()]
    result = prmtool("import", source, "--preset", "gsm8k", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr

    frame = read_output(tmp_path / "out")
    assert frame.height == len(originals) == 40
    assert {"question", "answer"}.isdisjoint(frame.columns)
    for row, original in zip(frame.iter_rows(named=True), originals):
        solution, answer = original["answer"].split("####")
        assert row["problem"] == original["question"]
        assert row["reference_answer"] == answer.strip().replace(",", "")
        assert row["reference_solution"] == solution.strip()
    assert frame["reference_answer"][0] == "18"
    assert frame["reference_solution"][0].startswith("Janet sells 16 - 3 - 4")


def test_preset_gsm8k_matches_the_shipped_problems_sample(prmtool, tmp_path):
    assert prmtool("import", SAMPLES / "test_sample.jsonl", "--preset", "gsm8k", "-o", tmp_path / "out").exit_code == 0
    assert read_output(tmp_path / "out").equals(read_output(SAMPLES / "problems"))


def test_preset_math_takes_the_last_boxed_answer_with_nested_braces(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(
        [
            {"problem": "Half of one?", "solution": "First $\\boxed{2}$ was wrong; it is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "A set?", "solution": "So the answer is \\boxed{\\{1, 2\\}}"},
        ]
    )
    result = prmtool("import", source, "--preset", "math", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    frame = read_output(tmp_path / "out")
    assert frame["reference_answer"].to_list() == ["\\frac{1}{2}", "\\{1, 2\\}"]
    assert frame["reference_solution"][0] == "First $\\boxed{2}$ was wrong; it is $\\boxed{\\frac{1}{2}}$."


def test_preset_math_uses_an_answer_column_when_there_is_one(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"problem": "Half of one?", "solution": "It is $\\boxed{0.5}$.", "answer": "\\frac{1}{2}"}])
    assert prmtool("import", source, "--preset", "math", "-o", tmp_path / "out").exit_code == 0
    assert read_output(tmp_path / "out")["reference_answer"].to_list() == ["\\frac{1}{2}"]


def test_a_split_given_for_problems_alone_is_said_to_do_nothing(prmtool, tmp_path):
    args = ("import", SAMPLES / "test_sample.jsonl", "--preset", "gsm8k", "-o", tmp_path / "out")
    result = prmtool(*args, "--split", "think")
    assert result.exit_code == 0, result.stderr
    assert "--split think: the rows have no responses to split (give it to generate)" in result.stderr
    assert "no responses to split" not in prmtool(*args[:-1], tmp_path / "plain").stderr


def test_unknown_preset_is_refused(prmtool, write_jsonl, tmp_path):
    result = prmtool("import", write_jsonl(PROBLEMS), "--preset", "aime", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "--preset 'aime'" in result.stderr and "gsm8k, math" in result.stderr
    assert not (tmp_path / "out").exists()


# --- ids ----------------------------------------------------------------------------------


def test_problem_id_is_stable_across_runs_and_shared_by_identical_problems(prmtool, write_jsonl, tmp_path):
    rows = [PROBLEMS[0], PROBLEMS[1], dict(PROBLEMS[0])]
    source = write_jsonl(rows)
    assert prmtool("import", source, "-o", tmp_path / "first").exit_code == 0
    assert prmtool("import", source, "-o", tmp_path / "second").exit_code == 0
    first = read_output(tmp_path / "first")["problem_id"].to_list()
    second = read_output(tmp_path / "second")["problem_id"].to_list()
    assert first == second
    assert first[0] == first[2] != first[1]
    assert all(re.fullmatch(r"[0-9a-f]{16}", pid) for pid in first)


def test_problem_ids_given_in_the_source_are_kept_as_text(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"problem_id": 7, **PROBLEMS[0]}, {"problem_id": 8, **PROBLEMS[1]}])
    result = prmtool("import", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert read_output(tmp_path / "out")["problem_id"].to_list() == ["7", "8"]


# --- responses ----------------------------------------------------------------------------

RESPONSES = [
    {"problem": "What is 2 + 3?", "reference_answer": "5", "response": "2 + 3 = 5.\n\nThe answer is 5."},
    {"problem": "What is 2 + 3?", "reference_answer": "5", "response": "Add them.\nIt is 6.\n\n\n\nThe answer is 6."},
    {"problem": "What is 2 + 3?", "reference_answer": "5", "response": "2 + 3 = 5.\n\nThe answer is 5."},
]


def test_responses_get_stable_response_ids_and_lossless_blank_line_steps(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(RESPONSES)
    assert prmtool("import", source, "-o", tmp_path / "first").exit_code == 0
    assert prmtool("import", source, "-o", tmp_path / "second").exit_code == 0
    frame = read_output(tmp_path / "first")

    assert frame.columns == ["problem_id", "problem", "reference_answer", "response_id", "response", "steps"]
    assert frame.schema["steps"] == pl.List(pl.String)
    ids = frame["response_id"].to_list()
    assert ids == read_output(tmp_path / "second")["response_id"].to_list()
    assert len(set(ids)) == 3, "an identical second response still gets its own id"
    assert frame["problem_id"].n_unique() == 1

    steps = frame["steps"].to_list()
    assert steps[0] == ["2 + 3 = 5.", "The answer is 5."]
    assert steps[1] == ["Add them.\nIt is 6.", "\n\nThe answer is 6."]
    for row in frame.iter_rows(named=True):
        assert "\n\n".join(row["steps"]) == row["response"]


def test_split_line_cuts_responses_at_every_newline(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(RESPONSES[1:2])
    assert prmtool("import", source, "--split", "line", "-o", tmp_path / "out").exit_code == 0
    steps = read_output(tmp_path / "out")["steps"].to_list()[0]
    # The blank lines cannot be steps of their own: they open the next step, so no byte is lost.
    assert steps == ["Add them.", "It is 6.", "\n\n\nThe answer is 6."]
    assert "\n".join(steps) == RESPONSES[1]["response"]


def test_response_ids_given_in_the_source_are_kept(prmtool, tmp_path):
    result = prmtool("import", SAMPLES / "responses.jsonl", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    frame = read_output(tmp_path / "out")
    assert frame["response_id"][:4].to_list() == [
        f"gsm8k-test-0-{kind}" for kind in ("boxed", "hashes", "wrong", "truncated")
    ]
    assert frame.equals(read_output(SAMPLES / "responses"))


# --- shards, resume, provenance ------------------------------------------------------------


def test_shard_rows_writes_several_numbered_shards(prmtool, tmp_path):
    result = prmtool(
        "import", SAMPLES / "test_sample.jsonl", "--preset", "gsm8k", "--shard-rows", "15", "-o", tmp_path / "out"
    )
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "out") == [
        "_SUCCESS",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    sizes = [pl.read_parquet(tmp_path / "out" / f"part-0000{i}.parquet").height for i in range(3)]
    assert sizes == [15, 15, 10]
    assert read_output(tmp_path / "out").equals(read_output(SAMPLES / "problems"))


def test_rerun_with_the_same_options_is_a_no_op(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(PROBLEMS)
    out = tmp_path / "out"
    assert prmtool("import", source, "-o", out).exit_code == 0
    before = {name: (out / name).stat().st_mtime_ns for name in files_under(out)}

    result = prmtool("import", source, "-o", out)
    assert result.exit_code == 0
    assert "already complete" in result.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in files_under(out)} == before


def test_rerun_with_different_options_needs_overwrite(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(PROBLEMS)
    out = tmp_path / "out"
    assert prmtool("import", source, "-o", out).exit_code == 0

    refused = prmtool("import", source, "--shard-rows", "2", "-o", out)
    assert refused.exit_code == 2
    assert str(out) in refused.stderr and "--overwrite" in refused.stderr
    assert files_under(out) == ["_SUCCESS", "part-00000.parquet"]

    replaced = prmtool("import", source, "--shard-rows", "2", "-o", out, "--overwrite")
    assert replaced.exit_code == 0
    assert files_under(out) == ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    assert problems_of(read_output(out)) == PROBLEMS


def test_overwrite_recomputes_when_the_source_changed(prmtool, write_jsonl, tmp_path):
    out = tmp_path / "out"
    assert prmtool("import", write_jsonl(PROBLEMS[:1]), "-o", out).exit_code == 0
    assert prmtool("import", write_jsonl(PROBLEMS), "-o", out).exit_code == 2, "the source grew: not the same run"
    assert prmtool("import", write_jsonl(PROBLEMS), "-o", out, "--overwrite").exit_code == 0
    assert problems_of(read_output(out)) == PROBLEMS


def test_every_shard_records_its_provenance_in_the_parquet_metadata(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(PROBLEMS)
    assert (
        prmtool("import", source, "--shard-rows", "2", "--map", "problem=problem", "-o", tmp_path / "out").exit_code
        == 0
    )
    for shard in sorted((tmp_path / "out").glob("*.parquet")):
        record = json.loads(pq.read_schema(shard).metadata[b"prmtool"])
        assert record["stage"] == "import"
        assert record["version"] == __version__
        assert record["arguments"] == {
            "map": ["problem=problem"],
            "preset": None,
            "split": "blank-line",
            "shard_rows": 2,
            "dataset_split": None,
        }


def test_success_manifest_lists_inputs_outputs_and_arguments(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(PROBLEMS)
    assert prmtool("import", source, "--shard-rows", "2", "-o", tmp_path / "out").exit_code == 0
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["stage"] == "import"
    assert manifest["version"] == __version__
    assert manifest["arguments"]["shard_rows"] == 2
    assert manifest["inputs"] == [
        {"path": str(source), "size": source.stat().st_size, "xxh3": shards.content_digest(source)}
    ]
    out = tmp_path / "out"
    assert manifest["outputs"] == [  # each with its size and hash: a reader checks it is still the file written
        {"file": name, "rows": rows, "size": (out / name).stat().st_size, "xxh3": shards.content_digest(out / name)}
        for name, rows in [("part-00000.parquet", 2), ("part-00001.parquet", 1)]
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", manifest["finished"])


def test_summary_on_stderr_counts_rows_and_problems(prmtool, tmp_path):
    result = prmtool("import", SAMPLES / "responses.jsonl", "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert re.search(r"rows out\s*│\s*48\b", result.stderr)
    assert re.search(r"problems\s*│\s*12\b", result.stderr)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_quiet_import_prints_nothing(prmtool, tmp_path, suffix):
    source = tmp_path / f"p{suffix}"
    source.write_text(json.dumps(PROBLEMS[0]) + "\n" if suffix == ".jsonl" else "problem,reference_answer\nq,1\n")
    result = prmtool("import", source, "-o", tmp_path / "out", "--quiet")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


def test_steps_given_with_the_responses_are_kept_when_they_join_back(prmtool, write_jsonl, tmp_path):
    """Labels that came with the data refer to its own steps, so those steps are kept."""
    rows = [
        {
            "problem": "1+1?",
            "reference_answer": "2",
            "response": "1+1\n\n=2",
            "steps": ["1+1", "=2"],
            "step_labels": [1, 1],
        }
    ]
    result = prmtool("import", write_jsonl(rows), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(tmp_path / "out" / "part-00000.parquet")["steps"].to_list() == [["1+1", "=2"]]


def test_steps_that_do_not_join_back_to_the_response_are_refused(prmtool, write_jsonl, tmp_path):
    rows = [{"problem": "1+1?", "reference_answer": "2", "response": "1+1\n=2", "steps": ["1+1", "=2"]}]
    result = prmtool("import", write_jsonl(rows), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "row 0: column 'steps' does not join back" in result.stderr
    assert not (tmp_path / "out").exists()


def test_preset_math_refuses_a_solution_without_a_boxed_answer(prmtool, write_jsonl, tmp_path):
    rows = [{"problem": "p", "solution": "\\boxed{1}"}, {"problem": "q", "solution": "no box here"}]
    result = prmtool("import", write_jsonl(rows), "--preset", "math", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "row 1: --preset math found no \\boxed{} answer" in result.stderr
