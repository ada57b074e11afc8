"""The Python API, as README.md shows it: each command is a function returning its summary, each
stage has a per-frame core, and a new stage is one module plus one registry line."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types

import polars as pl
import pytest
import typer
from typer.testing import CliRunner

import prmtool
from prmtool.cli import main
from prmtool.cli.stage_command import stage_command
from prmtool.stages import STAGES
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def python_blocks(section: str) -> list[str]:
    text = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture
def in_a_checkout(tmp_path, monkeypatch):
    """A working directory where the README's relative paths (data_samples/...) resolve."""
    (tmp_path / "data_samples").symlink_to(ROOT / "data_samples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_block(code: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    return printed.getvalue()


def test_the_readme_python_api_examples_run_and_print_what_their_comments_say(in_a_checkout):
    stages_block, frames_block = python_blocks("Python API")
    printed = run_block(stages_block).splitlines()
    assert printed == ["48 24", "--timeout 0: must be a finite number above 0"]
    assert (in_a_checkout / "work/api/verified/_SUCCESS").exists()
    assert (in_a_checkout / "work/api/parts/_SUCCESS-00000-of-00002").exists()
    assert {p.name for p in (in_a_checkout / "work/api/trl").iterdir() if p.is_dir()} == {"train", "test"}

    printed = run_block(frames_block)
    assert printed.strip().endswith("True")
    assert "first_error" in printed


def test_a_command_and_its_function_write_the_same_shards(tmp_path):
    responses = ROOT / "data_samples/gsm8k/responses"
    assert main(["verify", str(responses), "-o", str(tmp_path / "cli"), "--timeout", "2", "-q"]) == 0
    summary = prmtool.verify(responses, tmp_path / "api", timeout=2, quiet=True)
    read = lambda d: pl.read_parquet(d / "*.parquet").sort("response_id")  # noqa: E731
    assert read(tmp_path / "cli").equals(read(tmp_path / "api"))
    assert (summary.stage, summary.rows_in, summary.rows_out) == ("verify", 48, 48)
    # the same run again resumes: every shard is kept
    assert prmtool.verify(responses, tmp_path / "api", timeout=2, quiet=True).shards_skipped == 1


def test_python_settings_are_checked_as_the_command_line_checks_them(tmp_path):
    responses = ROOT / "data_samples/gsm8k/responses"
    with pytest.raises(prmtool.InputError, match="--k 0: must be at least 1"):
        prmtool.label(responses, tmp_path / "out", k=0)
    with pytest.raises(prmtool.InputError, match="unknown setting 'timout'"):
        prmtool.verify(responses, tmp_path / "out", timout=2)
    with pytest.raises(prmtool.InputError, match="required keyword-only argument: 'format'"):
        prmtool.export(responses, tmp_path / "out")
    with pytest.raises(prmtool.InputError, match="--shard-index 2: must be in 0..1"):
        prmtool.verify(responses, tmp_path / "out", partition=(2, 2))
    assert not (tmp_path / "out").exists()


def test_a_new_stage_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    """The README's "Extending" example, as a module: its command, help and Python call."""
    [source] = python_blocks("Extending")
    module = types.ModuleType("prmtool.stages.lengths")
    monkeypatch.setitem(sys.modules, "prmtool.stages.lengths", module)
    exec(compile(source, "prmtool/stages/lengths.py", "exec"), module.__dict__)
    monkeypatch.setitem(STAGES, "lengths", "prmtool.stages.lengths")

    app = typer.Typer(rich_markup_mode=None)
    app.command("lengths", epilog=module.STAGE.examples)(stage_command(prmtool.stage("lengths")))
    app.command("other")(lambda: None)  # two commands, so typer keeps the subcommand name
    runner = CliRunner()
    help_text = runner.invoke(app, ["lengths", "--help"]).output
    for option in ("--unit", "--output", "--overwrite", "--quiet", "--shard-index", "--executor"):
        assert option in help_text
    result = runner.invoke(app, ["lengths", str(ROOT / "data_samples/gsm8k/responses"), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(tmp_path / "a/*.parquet")["response_length"].min() > 0

    prmtool.stage("lengths")(ROOT / "data_samples/gsm8k/responses", tmp_path / "b", unit="words", quiet=True)
    words = pl.read_parquet(tmp_path / "b/*.parquet")
    assert words["response_length"].to_list() == words["response"].str.split(" ").list.len().to_list()
