"""Shard sets in and out: how inputs are named, what a bad input gets you, resume, and the
promises every run keeps (atomic files, untouched inputs, quiet when asked)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from prmtool import __version__
from prmtool.core import shards
from tests.conftest import SAMPLES, files_under

RESPONSES = SAMPLES / "responses" / "part-00000.parquet"


@pytest.fixture
def two_shards(tmp_path) -> Path:
    """Eight responses in two shards of four: a.parquet and b.parquet."""
    rows = pl.read_parquet(RESPONSES).head(8)
    target = tmp_path / "shards"
    target.mkdir()
    rows.head(4).write_parquet(target / "a.parquet")
    rows.tail(4).write_parquet(target / "b.parquet")
    return target


def assert_input_error(result, *named: str) -> None:
    """Exit code 2 and one line on stderr that names what is wrong."""
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for name in named:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"


def summary_count(stderr: str, label: str) -> int:
    match = re.search(rf"{label}\s*│\s*([\d,]+)", stderr)
    assert match, f"no '{label}' in the summary:\n{stderr}"
    return int(match.group(1).replace(",", ""))


def verify(prmtool, *args):
    return prmtool("verify", *args, "--workers", "1")


# --- bad input: verify --------------------------------------------------------------------


def test_nonexistent_input_path(prmtool, tmp_path):
    result = verify(prmtool, tmp_path / "nowhere", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "nowhere"), "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_glob_that_matches_nothing(prmtool, tmp_path):
    pattern = str(tmp_path / "*.parquet")
    result = verify(prmtool, pattern, "-o", tmp_path / "out")
    assert_input_error(result, pattern, "matches no Parquet file")
    assert not (tmp_path / "out").exists()


def test_directory_without_parquet_files(prmtool, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a shard")
    result = verify(prmtool, tmp_path / "empty", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "empty"), "holds no Parquet file")
    assert not (tmp_path / "out").exists()


def test_corrupt_parquet_file(prmtool, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.parquet").write_bytes(b"this is not parquet at all\x00\x01")
    result = verify(prmtool, tmp_path / "in", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "in" / "x.parquet"), "not a readable Parquet file")
    assert not (tmp_path / "out").exists()


def test_missing_required_column(prmtool, tmp_path):
    pl.read_parquet(RESPONSES).drop("reference_answer").write_parquet(tmp_path / "x.parquet")
    result = verify(prmtool, tmp_path / "x.parquet", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "x.parquet"), "missing required column 'reference_answer'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "column, value, type_name",
    [("response", pl.lit(3, dtype=pl.Int64), "Int64"), ("correct", pl.lit("yes"), "String")],
)
def test_contract_column_of_the_wrong_type(prmtool, tmp_path, column, value, type_name):
    pl.read_parquet(RESPONSES).with_columns(value.alias(column)).write_parquet(tmp_path / "x.parquet")
    result = verify(prmtool, tmp_path / "x.parquet", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "x.parquet"), f"column '{column}' has type {type_name}")
    assert not (tmp_path / "out").exists()


def test_duplicate_response_id_within_one_shard(prmtool, tmp_path):
    rows = pl.read_parquet(RESPONSES).head(3)
    pl.concat([rows, rows.tail(1)]).write_parquet(tmp_path / "x.parquet")
    result = verify(prmtool, tmp_path / "x.parquet", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "x.parquet"), "duplicate response_id", rows["response_id"][2])
    assert not (tmp_path / "out").exists()


def test_duplicate_response_id_across_two_shards(prmtool, tmp_path, two_shards):
    """Ids must be unique over the whole shard set, not only within a file."""
    pl.read_parquet(two_shards / "a.parquet").head(1).write_parquet(two_shards / "c.parquet")
    result = verify(prmtool, two_shards, "-o", tmp_path / "out")
    duplicate = pl.read_parquet(two_shards / "a.parquet")["response_id"][0]
    assert_input_error(result, str(two_shards / "a.parquet"), str(two_shards / "c.parquet"), duplicate)
    assert not (tmp_path / "out").exists()


def test_null_response_id(prmtool, tmp_path):
    pl.read_parquet(RESPONSES).head(3).with_columns(response_id=pl.lit(None, dtype=pl.String)).write_parquet(
        tmp_path / "x.parquet"
    )
    result = verify(prmtool, tmp_path / "x.parquet", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert str(tmp_path / "x.parquet") in result.stderr and "response_id" in result.stderr
    assert not (tmp_path / "out").exists()


def test_output_directory_equal_to_the_input_directory(prmtool, two_shards):
    before = files_under(two_shards)
    result = verify(prmtool, two_shards, "-o", two_shards)
    assert_input_error(result, str(two_shards), "choose another -o")
    assert files_under(two_shards) == before


def test_missing_output_option_is_a_usage_error(prmtool, two_shards):
    result = prmtool("verify", two_shards)
    assert result.exit_code == 2
    assert "Missing option '--output'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error(prmtool):
    result = prmtool("verfy", "x", "-o", "y")
    assert result.exit_code == 2
    assert "No such command 'verfy'" in result.stderr


# --- bad input: export and import ---------------------------------------------------------


def test_export_reports_bad_input_the_same_way(prmtool, tmp_path, two_shards):
    (two_shards / "x.parquet").write_bytes(b"garbage")
    result = prmtool("export", two_shards, "-o", tmp_path / "out", "-f", "sft-messages")
    assert_input_error(result, str(two_shards / "x.parquet"), "not a readable Parquet file")
    assert not (tmp_path / "out").exists()

    (two_shards / "x.parquet").unlink()
    result = prmtool("export", two_shards, "-o", two_shards, "-f", "sft-messages")
    assert_input_error(result, str(two_shards), "choose another -o")
    assert files_under(two_shards) == ["a.parquet", "b.parquet"]


def test_export_refuses_a_response_column_of_the_wrong_type(prmtool, tmp_path):
    pl.read_parquet(RESPONSES).with_columns(response=pl.lit(3, dtype=pl.Int64)).write_parquet(tmp_path / "x.parquet")
    result = prmtool("export", tmp_path / "x.parquet", "-o", tmp_path / "out", "-f", "sft-prompt-completion")
    assert_input_error(result, str(tmp_path / "x.parquet"), "column 'response' has type Int64")
    assert not (tmp_path / "out").exists()


def test_import_of_a_missing_file(prmtool, tmp_path):
    result = prmtool("import", tmp_path / "nope.jsonl", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "nope.jsonl"), "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_import_of_an_unknown_extension(prmtool, tmp_path):
    (tmp_path / "problems.txt").write_text("What is 2 + 3?\n")
    result = prmtool("import", tmp_path / "problems.txt", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "problems.txt"), "unknown format", ".jsonl")
    assert not (tmp_path / "out").exists()


def test_import_of_malformed_jsonl(prmtool, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"problem": "What is 2 + 3?", "reference_answer": "5"}\n{"problem": \n')
    result = prmtool("import", tmp_path / "bad.jsonl", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "bad.jsonl"), "line 2, character 13: not JSON")
    assert not (tmp_path / "out").exists()
    (tmp_path / "bad.jsonl").write_text('{"problem": "What is 2 + 3?", "reference_answer": "5"}\n\n["a list"]\n')
    result = prmtool("import", tmp_path / "bad.jsonl", "-o", tmp_path / "out")
    assert_input_error(result, str(tmp_path / "bad.jsonl"), "line 3: a JSON list, not an object of columns")


def test_import_without_a_problem_column(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"question": "What is 2 + 3?", "reference_answer": "5"}])
    result = prmtool("import", source, "-o", tmp_path / "out")
    assert_input_error(result, str(source), "column 'problem'", "has: question, reference_answer")
    assert not (tmp_path / "out").exists()


def test_import_names_the_row_with_an_empty_problem(prmtool, write_jsonl, tmp_path):
    """Rows are numbered from 0, as in a data frame."""
    source = write_jsonl(
        [
            {"problem": "What is 2 + 3?", "reference_answer": "5"},
            {"problem": "What is 7 * 6?", "reference_answer": "42"},
            {"problem": None, "reference_answer": "1"},
        ]
    )
    result = prmtool("import", source, "-o", tmp_path / "out")
    assert_input_error(result, str(source), "row 2", "column 'problem' is empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "mapping, message",
    [
        ("question", "--map 'question': expected SRC=DST"),
        ("=problem", "expected SRC=DST"),
        ("quest=problem", "--map names missing column 'quest'"),
    ],
)
def test_import_with_a_bad_map(prmtool, write_jsonl, tmp_path, mapping, message):
    source = write_jsonl([{"question": "What is 2 + 3?", "reference_answer": "5"}])
    result = prmtool("import", source, "--map", mapping, "-o", tmp_path / "out")
    assert_input_error(result, message)
    assert not (tmp_path / "out").exists()


def test_import_with_a_bad_split_rule(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"problem": "q", "reference_answer": "1", "response": "a\n\nb"}])
    result = prmtool("import", source, "--split", "regex:(", "-o", tmp_path / "out")
    assert_input_error(result, "--split 'regex:('", "invalid regular expression")
    assert not (tmp_path / "out").exists()


def test_import_into_the_directory_of_its_input(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"problem": "What is 2 + 3?", "reference_answer": "5"}])
    result = prmtool("import", source, "-o", tmp_path)
    assert_input_error(result, str(tmp_path), "holds the input")
    assert files_under(tmp_path) == ["input.jsonl"]


# --- naming inputs ------------------------------------------------------------------------


def test_inputs_may_mix_a_file_a_directory_and_a_glob(prmtool, tmp_path):
    rows = pl.read_parquet(RESPONSES).head(6)
    for folder, name, start in [("files", "a.parquet", 0), ("folder", "b.parquet", 2), ("globbed", "c.parquet", 4)]:
        (tmp_path / folder).mkdir()
        rows.slice(start, 2).write_parquet(tmp_path / folder / name)

    result = verify(
        prmtool,
        tmp_path / "files" / "a.parquet",
        tmp_path / "folder",
        str(tmp_path / "glob*" / "*.parquet"),
        "-o",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "out") == ["_SUCCESS", "a.parquet", "b.parquet", "c.parquet"]
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert sorted(out["response_id"]) == sorted(rows["response_id"])
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.parquet", "b.parquet", "c.parquet"]
    assert manifest["outputs"] == [
        {"file": name, "rows": 2, "size": (tmp_path / "out" / name).stat().st_size,
         "xxh3": shards.content_digest(tmp_path / "out" / name)}
        for name in ("a.parquet", "b.parquet", "c.parquet")
    ]  # fmt: skip


def test_two_inputs_sharing_a_file_name_are_refused(prmtool, tmp_path):
    """Output shards take their input's name, so two inputs named alike would collide."""
    rows = pl.read_parquet(RESPONSES).head(4)
    for folder, start in [("one", 0), ("two", 2)]:
        (tmp_path / folder).mkdir()
        rows.slice(start, 2).write_parquet(tmp_path / folder / "part-00000.parquet")
    result = verify(prmtool, tmp_path / "one", tmp_path / "two", "-o", tmp_path / "out")
    assert_input_error(
        result, str(tmp_path / "one" / "part-00000.parquet"), str(tmp_path / "two" / "part-00000.parquet")
    )
    assert not (tmp_path / "out").exists()


def test_the_same_file_named_twice_is_read_once(prmtool, tmp_path, two_shards):
    result = verify(prmtool, two_shards, two_shards / "a.parquet", "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(tmp_path / "out" / "*.parquet").height == 8


# --- resume -------------------------------------------------------------------------------


def test_resume_skips_a_finished_shard_and_writes_the_rest(prmtool, tmp_path, two_shards):
    """A run that stopped after a.parquet is resumed by running the same command again."""
    first = tmp_path / "first"
    assert verify(prmtool, two_shards, "-o", first).exit_code == 0

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(first / "a.parquet", resumed / "a.parquet")
    finished = (resumed / "a.parquet").read_bytes()

    result = verify(prmtool, two_shards, "-o", resumed)
    assert result.exit_code == 0, result.stderr
    assert summary_count(result.stderr, "shards skipped") == 1
    assert summary_count(result.stderr, "shards written") == 1
    assert summary_count(result.stderr, "rows out") == 8
    assert (resumed / "a.parquet").read_bytes() == finished, "the finished shard is left alone"
    assert files_under(resumed) == ["_SUCCESS", "a.parquet", "b.parquet"]
    assert pl.read_parquet(resumed / "b.parquet").equals(pl.read_parquet(first / "b.parquet"))

    again = verify(prmtool, two_shards, "-o", resumed)
    assert summary_count(again.stderr, "shards skipped") == 2


def test_a_finished_shard_from_other_options_needs_overwrite(prmtool, tmp_path, two_shards):
    out = tmp_path / "out"
    assert verify(prmtool, two_shards, "-o", out, "--quiet").exit_code == 0
    (out / "b.parquet").unlink()
    (out / "_SUCCESS").unlink()

    result = verify(prmtool, two_shards, "-o", out, "--timeout", "2")
    assert_input_error(result, str(out / "a.parquet"), "different run", "--overwrite")
    assert files_under(out) == ["a.parquet"], "nothing written when refused"

    result = verify(prmtool, two_shards, "-o", out, "--timeout", "2", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert summary_count(result.stderr, "shards written") == 2
    for name in ("a.parquet", "b.parquet"):
        record = json.loads(pq.read_schema(out / name).metadata[b"prmtool"])
        assert record["stage"] == "verify" and record["version"] == __version__
        assert record["arguments"] == {"timeout": 2.0, "extract": "cascade"}
        assert record["input"] == {
            "path": str((two_shards / name).resolve()),
            "size": (two_shards / name).stat().st_size,
            "rows": 4,
            "xxh3": shards.content_digest(two_shards / name),  # an edit of the same size is a new input
        }


def test_an_interrupted_run_exits_130_and_the_rerun_finishes_it(prmtool, tmp_path, two_shards, monkeypatch):
    import prmtool.stages.verify as verify_stage

    real_verify_rows = verify_stage.verify_rows
    calls = []

    def interrupted_on_second_shard(frame, **kwargs):
        calls.append(frame.height)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_verify_rows(frame, **kwargs)

    monkeypatch.setattr(verify_stage, "verify_rows", interrupted_on_second_shard)
    out = tmp_path / "out"
    result = verify(prmtool, two_shards, "-o", out)
    assert result.exit_code == 130
    assert "rerun the same command to resume" in result.stderr
    assert files_under(out) == ["_JOURNAL", "a.parquet"], "no _SUCCESS: the run is not complete, its journal says"

    monkeypatch.setattr(verify_stage, "verify_rows", real_verify_rows)
    result = verify(prmtool, two_shards, "-o", out)
    assert result.exit_code == 0
    assert summary_count(result.stderr, "shards skipped") == 1
    assert files_under(out) == ["_SUCCESS", "a.parquet", "b.parquet"]


# --- what every run promises --------------------------------------------------------------


def digest(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in files_under(directory)}


def test_runs_leave_no_temporary_files_and_inputs_untouched(prmtool, tmp_path, two_shards):
    inputs = digest(two_shards)
    assert verify(prmtool, two_shards, "-o", tmp_path / "verified", "--quiet").exit_code == 0
    assert (
        prmtool(
            "export",
            tmp_path / "verified",
            "-o",
            tmp_path / "sft",
            "-f",
            "sft-messages",
            "--split",
            "test=0.5",
            "--hf-dataset",
            tmp_path / "hf",
            "-q",
        ).exit_code
        == 0
    )
    assert prmtool("import", SAMPLES / "responses.jsonl", "-o", tmp_path / "imported", "-q").exit_code == 0

    assert digest(two_shards) == inputs
    assert list(tmp_path.rglob(".*.tmp*")) == []
    assert list(SAMPLES.rglob(".*.tmp*")) == []
    # one problem per shard, one problem per split
    assert files_under(tmp_path / "sft") in (
        ["_SUCCESS", "test/a.parquet", "train/b.parquet"],
        ["_SUCCESS", "test/b.parquet", "train/a.parquet"],
    )
    assert (tmp_path / "hf" / "dataset_dict.json").exists()


def test_a_run_keeps_every_input_row_and_column(prmtool, tmp_path, two_shards):
    pl.read_parquet(two_shards / "a.parquet").with_columns(model=pl.lit("toy-7b")).write_parquet(
        two_shards / "a.parquet"
    )
    assert verify(prmtool, two_shards, "-o", tmp_path / "out", "-q").exit_code == 0
    before = pl.read_parquet(two_shards / "a.parquet")
    after = pl.read_parquet(tmp_path / "out" / "a.parquet")
    assert after.columns == before.columns + ["pred_answer", "answer_source", "correct", "verify_status"]
    assert after.select(before.columns).equals(before)


def test_quiet_prints_nothing_on_stderr(prmtool, tmp_path, two_shards):
    result = verify(prmtool, two_shards, "-o", tmp_path / "verified", "--quiet")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    result = prmtool("export", tmp_path / "verified", "-o", tmp_path / "sft", "-f", "sft-messages", "--quiet")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


def all_commands() -> list[str]:
    import typer

    from prmtool.cli.commands import app

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", all_commands())
def test_every_command_has_help_with_examples(prmtool, command):
    result = prmtool(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert re.search(rf"^\s+prmtool {command} \S", result.stdout, re.MULTILINE)


def test_version(prmtool):
    result = prmtool("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"prmtool {__version__}"


def test_a_directory_of_split_folders_is_read_whole_and_its_shard_names_keep_the_split(prmtool, tmp_path):
    """An export's layout (OUT/train/, OUT/test/): stats and every stage read the split folders,
    and two splits' files of the same name become two output shards, never one."""
    import polars as pl

    rows = pl.read_parquet(SAMPLES / "responses" / "*.parquet")
    half = rows.height // 2
    for split, part in (("train", rows.head(half)), ("test", rows.tail(rows.height - half))):
        (tmp_path / "data" / split).mkdir(parents=True)
        part.write_parquet(tmp_path / "data" / split / "part-00000.parquet")
    assert prmtool("stats", tmp_path / "data").exit_code == 0
    given_apart = prmtool("verify", tmp_path / "data/train", tmp_path / "data/test", "-o", tmp_path / "a", "-q")
    assert given_apart.exit_code == 2 and "share the name part-00000.parquet" in given_apart.stderr
    nested = prmtool("verify", tmp_path / "data", "-o", tmp_path / "v", "-q")
    assert nested.exit_code == 0, nested.stderr
    names = sorted(p.name for p in (tmp_path / "v").glob("*.parquet"))
    assert names == ["test-part-00000.parquet", "train-part-00000.parquet"]
    assert pl.read_parquet(tmp_path / "v" / "*.parquet").height == rows.height


def test_a_stage_that_keeps_no_rows_writes_a_zero_row_shard_every_loader_takes(prmtool, tmp_path):
    """The shard keeps the full schema and its provenance, polars reads it, and `datasets`
    reads the folder it sits in beside shards with rows (a row group of no rows would stop it)."""
    import datasets
    import pyarrow.parquet as pq

    assert prmtool("verify", SAMPLES / "responses", "-o", tmp_path / "verified", "-q").exit_code == 0
    result = prmtool(
        "filter", tmp_path / "verified", "-o", tmp_path / "none", "--rejects", tmp_path / "rejects",
        "--method", "none", "--where", "1 = 0", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    empty = tmp_path / "none" / "part-00000.parquet"
    verified = pl.read_parquet(tmp_path / "verified" / "*.parquet")
    assert pl.read_parquet(empty).schema == verified.schema and pl.read_parquet(empty).height == 0
    assert b"prmtool" in pq.read_schema(empty).metadata  # provenance, for resume
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "part-00000.parquet").write_bytes((tmp_path / "verified" / "part-00000.parquet").read_bytes())
    (mixed / "part-00001.parquet").write_bytes(empty.read_bytes())
    loaded = datasets.load_dataset(
        "parquet", data_files=str(mixed / "*.parquet"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert loaded.num_rows == verified.height
    again = prmtool(
        "filter", tmp_path / "verified", "-o", tmp_path / "none", "--rejects", tmp_path / "rejects",
        "--method", "none", "--where", "1 = 0",
    )  # fmt: skip
    assert again.exit_code == 0 and "already complete" in again.stderr  # a rerun skips it
