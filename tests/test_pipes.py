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
