"""`-o -`: export streams its rows to standard output as JSON lines; every other stage writes a
directory of shards and refuses `-o -` in one line, instead of making a folder named `-`."""

from __future__ import annotations

import json

import pytest

from prmtool.core.errors import InputError
from prmtool.stages import STAGES, stage
from tests.conftest import SAMPLES

EXTRA_OPTIONS = {"filter": ["--rejects", "rejects"]}  # the stage's required options


@pytest.mark.parametrize("name", [name for name in STAGES if name != "export"])
def test_every_stage_but_export_refuses_o_dash_in_one_line(prmtool, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = prmtool(name, SAMPLES / "responses", "-o", "-", *EXTRA_OPTIONS.get(name, []))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: -o -: {name} writes a directory of Parquet shards, not a stream; give -o DIR, then "
        "`prmtool export DIR -o - --format jsonl` streams its rows as JSON lines"
    )
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no folder named `-`, nothing else either


def test_the_python_api_refuses_o_dash_as_the_command_does(tmp_path):
    with pytest.raises(InputError, match="-o -: verify writes a directory of Parquet shards"):
        stage("verify").run([SAMPLES / "responses"], "-")


def test_export_streams_json_lines_and_its_summary_counts_the_problems(prmtool):
    result = prmtool("export", SAMPLES / "responses", "-o", "-", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    problems = {row["problem_id"] for row in rows}
    assert len(rows) == 48 and len(problems) > 1
    assert summary_row(result.stderr, "rows out") == "48"
    assert summary_row(result.stderr, "problems") == str(len(problems))  # it said 0


def test_export_to_stdout_counts_the_problems_its_where_kept(prmtool):
    result = prmtool("export", SAMPLES / "labeled", "-o", "-", "--format", "jsonl", "--where", "first_error >= 0")
    assert result.exit_code == 0, result.stderr
    problems = {json.loads(line)["problem_id"] for line in result.stdout.splitlines()}
    assert 0 < len(problems) < 24
    assert summary_row(result.stderr, "problems") == str(len(problems))


def summary_row(stderr: str, name: str) -> str:
    """The value of one row of a stage's closing summary table."""
    for line in stderr.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0] == name:
            return cells[1]
    raise AssertionError(f"no {name!r} row in {stderr!r}")
