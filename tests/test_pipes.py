"""prmtool in shell pipelines: JSONL in on stdin (`import -`), JSONL out on stdout (`-o -`),
progress and summaries on stderr."""

import json
import subprocess
import sys

from tests.conftest import ROOT, SAMPLES


def shell(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, shell=True, capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    )


PRMTOOL = f"{sys.executable} -m prmtool"


def test_export_writes_json_lines_to_stdout_and_its_summary_to_stderr():
    result = shell(f"{PRMTOOL} export {SAMPLES}/labeled --format jsonl -o - | head -n 3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3 and {"problem_id", "steps", "step_labels", "first_error"} <= set(rows[0])
    assert "Traceback" not in result.stderr  # head closing the pipe early is not an error


def test_the_readme_pipeline_selects_rows_as_jq_would():
    result = shell(
        f"{PRMTOOL} export {SAMPLES}/labeled --format jsonl -o - -q"
        " | python3 -c \"import json, sys; [print(l, end='') for l in sys.stdin if json.loads(l)['first_error'] >= 0]\""
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout and all(json.loads(line)["first_error"] >= 0 for line in result.stdout.splitlines())


def test_any_format_streams_and_verl_keeps_one_row_per_problem():
    result = shell(f"{PRMTOOL} export {SAMPLES}/problems --format verl -o - -q")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len({row["extra_info"]["problem_id"] for row in rows}) == 40


def test_import_reads_json_lines_from_stdin(tmp_path):
    result = shell(f"head -n 5 {SAMPLES}/test_sample.jsonl | {PRMTOOL} import - --preset gsm8k -o {tmp_path / 'p'} -q")
    assert result.returncode == 0, result.stderr
    exported = shell(f"{PRMTOOL} export {tmp_path / 'p'} --format jsonl -o - -q")
    assert len(exported.stdout.splitlines()) == 5


def test_stdout_takes_no_split_and_jsonl_takes_no_directory(tmp_path):
    split = shell(f"{PRMTOOL} export {SAMPLES}/labeled --format jsonl -o - --holdout test=0.5")
    assert split.returncode == 2 and "--holdout: not with -o -" in split.stderr and not split.stdout
    folder = shell(f"{PRMTOOL} export {SAMPLES}/labeled --format jsonl -o {tmp_path / 'out'}")
    assert folder.returncode == 2 and "give -o -" in folder.stderr
    assert not (tmp_path / "out").exists() and not (ROOT / "-").exists()


def test_a_stage_reads_rows_as_json_lines_from_stdin(tmp_path):
    """`-` is standard input for every stage that reads rows: here verify, fed by export."""
    piped = shell(
        f"{PRMTOOL} export {SAMPLES}/responses --format jsonl -o - -q | {PRMTOOL} verify - -o {tmp_path / 'piped'} -q"
    )
    assert piped.returncode == 0, piped.stderr
    direct = shell(f"{PRMTOOL} verify {SAMPLES}/responses -o {tmp_path / 'direct'} -q")
    assert direct.returncode == 0, direct.stderr
    import polars as pl

    from_pipe = pl.read_parquet(tmp_path / "piped" / "*.parquet")
    from_files = pl.read_parquet(tmp_path / "direct" / "*.parquet")
    assert from_pipe.select(from_files.columns).equals(from_files)
    stats = shell(f"{PRMTOOL} export {tmp_path / 'piped'} --format jsonl -o - -q | {PRMTOOL} stats - --json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["rows"] == from_files.height


def test_stdin_that_is_not_json_lines_is_refused_in_one_line(tmp_path):
    refused = {
        "printf 'no json{\\n'": "standard input is not JSON lines of rows: line 1, character 1: not JSON",
        "true": "standard input is empty",
    }
    for given, message in refused.items():
        result = shell(f"{given} | {PRMTOOL} verify - -o {tmp_path / 'out'}")
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
