"""Hostile values, round two (issue 38): no command writes a wrong value with exit 0, answers bad
input with a traceback, or hangs. A bad value is a one-line error (exit 2) that names the file,
row, column or option; where a warning is right, the summary counts it. The concurrency and
ownership cases live in tests/test_hostile_inputs.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT, SAMPLES
from tests.test_hostile_inputs import one_line_error, write_recipe

LABELED = SAMPLES / "labeled" / "part-00000.parquet"


def shard_of(tmp_path: Path, frame: pl.DataFrame, name: str = "in") -> Path:
    """`frame` as the one shard of a fresh folder."""
    folder = tmp_path / name
    folder.mkdir()
    frame.write_parquet(folder / "part-00000.parquet")
    return folder


def on_row(row: int, value, otherwise: str) -> pl.Expr:
    """`value` on one row, the column `otherwise` elsewhere."""
    return pl.when(pl.int_range(pl.len()) == row).then(value).otherwise(pl.col(otherwise))


@pytest.fixture
def labeled() -> pl.DataFrame:
    """The labeled GSM8K sample: steps, step_labels, first_error."""
    return pl.read_parquet(LABELED)


# --- wrong values written with exit 0 ---------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_lone_surrogate_in_json_is_refused_not_stored_as_a_nul(prmtool, tmp_path, suffix):
    row = '{"question": "a \\ud800 b", "answer": "x #### 5"}'
    source = tmp_path / f"in.{suffix}"
    source.write_text('{"question": "fine \\ud83d\\ude00", "answer": "x #### 4"}\n' + row + "\n")
    if suffix == "json":
        source.write_text(f'[{{"question": "fine", "answer": "x #### 4"}}, {row}]')
    one_line_error(prmtool("import", source, "--preset", "gsm8k", "-o", tmp_path / "out"), "row 1", "'question'")
    assert not (tmp_path / "out").exists()


def test_a_surrogate_pair_is_one_character(prmtool, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"question": "smile \\ud83d\\ude00", "answer": "x #### 4"}\n')
    assert prmtool("import", source, "--preset", "gsm8k", "-o", tmp_path / "out", "-q").exit_code == 0
    assert pl.read_parquet(tmp_path / "out" / "*.parquet")["problem"].to_list() == ["smile \N{GRINNING FACE}"]


EXPORT_VALUES = {
    "a null problem": ("problem", lambda: on_row(2, None, "problem"), "sft-messages", "column 'problem' is null"),
    "a null problem (verl)": ("problem", lambda: on_row(2, None, "problem"), "verl", "column 'problem' is null"),
    "a null problem (math-shepherd)": (
        "problem",
        lambda: on_row(2, None, "problem"),
        "math-shepherd",
        "column 'problem' is null",
    ),
    "a null response": ("response", lambda: on_row(2, None, "response"), "sft-prompt-completion", "'response' is null"),
    "a step label of 7": (
        "step_labels",
        lambda: on_row(2, pl.col("step_labels").list.eval(pl.lit(7, pl.Int8)), "step_labels"),
        "trl-stepwise",
        "'step_labels' holds a value other than 1",
    ),
    "a step label of -1": (
        "step_labels",
        lambda: on_row(2, pl.col("step_labels").list.eval(pl.lit(-1, pl.Int8)), "step_labels"),
        "math-shepherd",
        "'step_labels' holds a value other than 1",
    ),
    "a null step": (
        "steps",
        lambda: on_row(
            2,
            pl.col("steps").list.eval(pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.element())),
            "steps",
        ),
        "trl-stepwise",
        "'steps' holds a null step",
    ),
}


@pytest.mark.parametrize("case", EXPORT_VALUES)
def test_export_refuses_a_value_it_would_write_wrongly(prmtool, tmp_path, labeled, case):
    column, value, format, message = EXPORT_VALUES[case]
    folder = shard_of(tmp_path, labeled.with_columns(value().alias(column)))
    result = prmtool("export", folder, "-o", tmp_path / "out", "-f", format)
    one_line_error(result, str(folder / "part-00000.parquet"), "row 2", message)
    assert not (tmp_path / "out").exists()
    one_line_error(prmtool("export", folder, "-o", "-", "-f", format), "row 2", message)


def test_export_checks_only_the_rows_where_keeps(prmtool, tmp_path, labeled):
    folder = shard_of(tmp_path, labeled.with_columns(problem=on_row(2, None, "problem")))
    result = prmtool("export", folder, "-o", tmp_path / "out", "-f", "sft-messages", "--where", "problem IS NOT NULL")
    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(tmp_path / "out" / "train" / "*.parquet").height == labeled.height - 1


PROCESSBENCH = {"id": "a", "problem": "1+1?", "steps": ["One and one.", "So 2."], "label": 1}
PROCESSBENCH_ROWS = {
    "label 1.7": ({"label": 1.7}, "label 1.7 is not a step index"),
    "a label past the last step": ({"label": 2}, "label 2 is not a step index"),
    "a label below -1": ({"label": -2}, "label -2 is not a step index"),
    "a label past int64": ({"label": 2**70}, "is not a step index"),
    "a text label": ({"label": "one"}, "column 'label' must hold step indices"),
    "steps as one text": ({"steps": "One and one. So 2."}, "'steps' must be a list of step texts"),
    "a null step": ({"steps": ["One and one.", None]}, "holds a null step"),
    "no steps": ({"steps": []}, "'steps' is empty"),
}


@pytest.mark.parametrize("case", PROCESSBENCH_ROWS)
def test_processbench_labels_and_steps_are_checked(prmtool, write_jsonl, tmp_path, case):
    change, message = PROCESSBENCH_ROWS[case]
    source = write_jsonl([dict(PROCESSBENCH, id="fine"), dict(PROCESSBENCH, **change)])
    result = prmtool("import", source, "--preset", "processbench", "-o", tmp_path / "out")
    one_line_error(result, str(source), "--preset processbench", message)
    if "column" not in message and "list" not in message:
        assert "row 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_processbench_whole_number_labels_are_kept(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([dict(PROCESSBENCH, id="a", label=-1), dict(PROCESSBENCH, id="b", label=1.0)])
    assert prmtool("import", source, "--preset", "processbench", "-o", tmp_path / "out", "-q").exit_code == 0
    assert pl.read_parquet(tmp_path / "out" / "*.parquet")["human_first_error"].to_list() == [-1, 1]


@pytest.mark.parametrize(
    "preset, row, message",
    [
        ("gsm8k", {"question": "q", "answer": "x #### "}, "'####' line of 'answer' has no answer"),
        ("math", {"problem": "q", "solution": "so \\boxed{}"}, "last \\boxed{} of 'solution' is empty"),
        (None, {"problem": "q", "reference_answer": "  "}, "'reference_answer' is blank"),
    ],
)
def test_an_empty_reference_answer_is_refused(prmtool, write_jsonl, tmp_path, preset, row, message):
    source = write_jsonl([row])
    preset_options = ["--preset", preset] if preset else []
    one_line_error(prmtool("import", source, *preset_options, "-o", tmp_path / "out"), "row 0", message)


def test_problems_without_any_reference_answer_still_import(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"problem": "q", "reference_answer": None}])  # an all-null column: no type at all
    result = prmtool("import", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "1 rows have no reference_answer" in result.stderr


def eval_rows(labeled: pl.DataFrame) -> pl.DataFrame:
    """Labeled rows with a human first error (the labels' own) and what --best-of-n reads."""
    return labeled.with_columns(
        human_first_error=pl.col("first_error"),
        pred_answer=pl.lit("18"),
        correct=pl.col("first_error") < 0,
        prm_score=pl.int_range(pl.len()).cast(pl.Float64),
    )


@pytest.mark.parametrize("option, column", [("--truth", "human_first_error"), ("--pred", "first_error")])
def test_eval_refuses_a_first_error_below_minus_one(prmtool, tmp_path, labeled, option, column):
    folder = shard_of(tmp_path, eval_rows(labeled).with_columns(on_row(4, -5, column).cast(pl.Int32).alias(column)))
    one_line_error(prmtool("eval", folder), "row 4", f"{option} {column} -5", "not -1 (no error) or a step index")


def test_eval_refuses_a_true_first_error_past_the_last_step(prmtool, tmp_path, labeled):
    rows = eval_rows(labeled).with_columns(human_first_error=on_row(4, 99, "human_first_error").cast(pl.Int32))
    one_line_error(prmtool("eval", shard_of(tmp_path, rows)), "row 4", "--truth human_first_error 99")


def test_eval_counts_rows_without_a_truth(prmtool, tmp_path, labeled):
    rows = eval_rows(labeled).with_columns(human_first_error=on_row(4, None, "human_first_error").cast(pl.Int32))
    result = prmtool("eval", shard_of(tmp_path, rows), "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.stderr
    assert "1 rows have no --truth human_first_error" in result.stderr
    (everything,) = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert (everything["rows"], everything["rows_without_truth"]) == (labeled.height - 1, 1)


def test_best_of_n_counts_responses_without_a_score(prmtool, tmp_path, labeled):
    rows = eval_rows(labeled).with_columns(prm_score=on_row(0, float("nan"), "prm_score"))
    result = prmtool("eval", shard_of(tmp_path, rows), "--best-of-n", "--json", tmp_path / "bon.json")
    assert result.exit_code == 0, result.stderr
    assert "1 responses have no --score prm_score (null or NaN)" in result.stderr
    assert json.loads((tmp_path / "bon.json").read_text())["responses_without_score"] == 1


def test_best_of_n_refuses_a_text_score(prmtool, tmp_path, labeled):
    rows = eval_rows(labeled).with_columns(prm_score=pl.lit("0.5"))
    result = prmtool("eval", shard_of(tmp_path, rows), "--best-of-n")
    one_line_error(result, "--score 'prm_score' has type String")
    assert "100" not in result.stdout


def test_a_verify_timeout_past_an_hour_is_a_usage_error(prmtool, tmp_path, responses_dir):
    one_line_error(prmtool("verify", responses_dir, "-o", tmp_path / "out", "--timeout", "1e10"), "--timeout 1e10")
    one_line_error(
        prmtool("generate", responses_dir, "-o", tmp_path / "out", "--verify", "--verify-timeout", "1e10"),
        "--verify-timeout 1e10",
    )
    assert not (tmp_path / "out").exists()


def test_an_hour_of_timeout_verifies_as_usual(prmtool, tmp_path, responses_dir):
    assert prmtool("verify", responses_dir, "-o", tmp_path / "out", "--timeout", "3600", "-q").exit_code == 0
    statuses = set(pl.read_parquet(tmp_path / "out" / "*.parquet")["verify_status"])
    assert statuses <= {"ok", "no_answer"}


@pytest.mark.parametrize("command", [["stats"], ["verify", "-o", "OUT"], ["export", "-o", "OUT", "-f", "sft-messages"]])
def test_shards_in_a_subfolder_beside_shards_at_the_top_are_not_ignored(prmtool, tmp_path, labeled, command):
    folder = shard_of(tmp_path, labeled.head(10))
    (folder / "more").mkdir()
    labeled.tail(10).write_parquet(folder / "more" / "part-00000.parquet")
    argv = [tmp_path / "out" if a == "OUT" else a for a in command]
    one_line_error(prmtool(argv[0], folder, *argv[1:]), str(folder), "more/")
    assert not (tmp_path / "out").exists()


def test_a_verl_export_still_reads_as_its_split_files(prmtool, tmp_path):
    out = tmp_path / "verl"
    assert prmtool("export", SAMPLES / "labeled", "-o", out, "-f", "verl", "--holdout", "test=0.3", "-q").exit_code == 0
    result = prmtool("stats", out, "--json")  # train.parquet and test.parquet hold train/ and test/
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["shards"] == 2


@pytest.mark.parametrize("key", ["help: true", "h: true", "output: elsewhere", "o: elsewhere", "overwrite: true"])
def test_a_recipe_may_not_set_what_the_recipe_itself_sets(prmtool, tmp_path, key):
    recipe = write_recipe(
        tmp_path,
        f"workdir: {tmp_path / 'w'}\ninput: {SAMPLES / 'test_sample.jsonl'}\n"
        f"stages:\n  - stage: import\n    preset: gsm8k\n    {key}\n",
    )
    for dry_run in ([], ["--dry-run"]):
        one_line_error(prmtool("run", recipe, *dry_run), "stage 01-import", key.split(":")[0])
    assert not (tmp_path / "w").exists() and not (tmp_path / "elsewhere").exists()
    name, value = key.split(": ")
    clean = write_recipe(
        tmp_path,
        f"workdir: {tmp_path / 'w'}\ninput: {SAMPLES / 'test_sample.jsonl'}\n"
        "stages:\n  - stage: import\n    preset: gsm8k\n",
    )
    one_line_error(prmtool("run", clean, "--dry-run", "--set", f"import.{name}={value}"), name)


def test_a_recipes_eval_may_not_name_its_json(prmtool, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"workdir: {tmp_path / 'w'}\ninput: {SAMPLES / 'labeled'}\nstages:\n  - stage: eval\n"
        f"    truth: first_error\n    json: {tmp_path / 'x.json'}\n",
    )
    one_line_error(prmtool("run", recipe, "--dry-run"), "json")


# --- tracebacks -------------------------------------------------------------------------------


@pytest.fixture
def model_loads(monkeypatch) -> list:
    """A stand-in for every model loader: it records the load and refuses it, so a test sees
    whether a command got as far as loading a model (20 s for the embedded one on CPU)."""
    import prmtool.engines as engines
    from prmtool.core.errors import InputError

    loads = []

    def stand_in(*args, **kwargs):
        loads.append(args)
        raise InputError("stand-in loader: a model would load here")

    monkeypatch.setattr(engines, "load_engine", stand_in)
    monkeypatch.setattr(engines, "load_step_classifier", stand_in)
    return loads


NULL_STEP_COMMANDS = {
    "score": ["--no-ref"],
    "label": [],
    "intervene": [],
}


@pytest.mark.parametrize("command", NULL_STEP_COMMANDS)
@pytest.mark.parametrize("null", ["a null step", "null steps"])
def test_a_null_step_is_refused_before_any_model_loads(prmtool, tmp_path, labeled, model_loads, command, null):
    steps = (
        pl.col("steps").list.eval(pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.element()))
        if null == "a null step"
        else pl.lit(None, pl.List(pl.String))
    )
    frame = labeled.with_columns(correct=pl.col("first_error") < 0, steps=on_row(3, steps, "steps"))
    folder = shard_of(tmp_path, frame)
    result = prmtool(command, folder, "-o", tmp_path / "out", *NULL_STEP_COMMANDS[command])
    one_line_error(result, str(folder / "part-00000.parquet"), "row 3", "'steps'")
    assert model_loads == [], "the input is checked before any model loads"
    assert not list((tmp_path / "out").glob("*.parquet")) if (tmp_path / "out").exists() else True


EVAL_TYPES = {
    "a text --pred": (["--pred", "first_error"], {"first_error": pl.col("first_error").cast(pl.String)}),
    "a text --truth": ([], {"human_first_error": pl.col("human_first_error").cast(pl.String)}),
    "a float --truth": ([], {"human_first_error": pl.col("human_first_error").cast(pl.Float64)}),
    "text step scores": (["--pred-from", "step_mc"], {"step_mc": pl.lit("0.5")}),
    "a list of texts as step scores": (["--pred-from", "step_mc"], {"step_mc": pl.col("steps")}),
    "a text --against": (["--against", "judge"], {"judge": pl.col("first_error").cast(pl.String)}),
}


@pytest.mark.parametrize("case", EVAL_TYPES)
def test_eval_names_a_column_of_the_wrong_type(prmtool, tmp_path, labeled, case):
    options, columns = EVAL_TYPES[case]
    folder = shard_of(tmp_path, eval_rows(labeled).with_columns(**columns))
    (column,) = columns
    one_line_error(prmtool("eval", folder, *options), str(folder / "part-00000.parquet"), f"'{column}' has type")


@pytest.mark.parametrize("options", [["--best-of-n"], []], ids=["best-of-n", "first errors"])
def test_eval_on_no_rows_says_so(prmtool, tmp_path, labeled, options):
    one_line_error(prmtool("eval", shard_of(tmp_path, eval_rows(labeled).head(0)), *options), "no rows to evaluate")


@pytest.mark.parametrize(
    "column, value",
    [
        ("prm_score", pl.lit("high")),
        ("correct", pl.lit("yes")),
        ("prm_score", pl.struct(a=pl.lit(1.0))),
        ("step_mc", pl.struct(a=pl.lit(1.0))),
        ("steps", pl.lit(3)),
    ],
)
def test_stats_names_a_column_of_the_wrong_type(prmtool, tmp_path, labeled, column, value):
    folder = shard_of(tmp_path, labeled.with_columns(value.alias(column)))
    one_line_error(prmtool("stats", folder), str(folder / "part-00000.parquet"), f"column '{column}' has type")


def test_stats_json_is_valid_json_with_nan_values(prmtool, tmp_path, labeled):
    rows = labeled.with_columns(
        prm_score=on_row(0, float("nan"), "first_error").cast(pl.Float64),
        step_mc=pl.col("steps").list.eval(pl.lit(float("nan"))),
    )
    result = prmtool("stats", shard_of(tmp_path, rows), "--json")
    assert result.exit_code == 0, result.stderr
    assert "NaN" not in result.stdout
    figures = json.loads(result.stdout)
    assert figures["prm_score"]["nan"] == 1 and figures["prm_score"]["count"] == labeled.height - 1
    assert figures["step_mc"] == {"count": 0, "nan": rows["steps"].list.len().sum()}


def test_shard_rows_past_int64_is_a_usage_error(prmtool, tmp_path):
    result = prmtool("import", SAMPLES / "test_sample.jsonl", "--preset", "gsm8k", "-o", tmp_path / "out")
    assert result.exit_code == 0
    one_line_error(
        prmtool("import", SAMPLES / "test_sample.jsonl", "-o", tmp_path / "o2", "--shard-rows", str(2**70)),
        "--shard-rows",
    )


@pytest.mark.parametrize("key", ["workdir", "input", "model", "engine"])
def test_a_recipe_key_that_is_not_text(prmtool, tmp_path, key):
    values = {"workdir": str(tmp_path / "w"), "input": str(SAMPLES / "test_sample.jsonl"), key: "123"}
    values[key] = 123
    recipe = write_recipe(
        tmp_path,
        "".join(f"{name}: {value}\n" for name, value in values.items())
        + "stages:\n  - stage: import\n    preset: gsm8k\n",
    )
    one_line_error(prmtool("run", recipe, "--dry-run"), f"{key}: expected a path or name as text")


def test_executor_ray_without_ray_installed(prmtool, tmp_path, responses_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    result = prmtool("verify", responses_dir, "-o", tmp_path / "out", "--executor", "ray")
    one_line_error(result, "--executor ray needs Ray", "pip install")
    assert not (tmp_path / "out").exists()


def run_cli(*args, **options) -> subprocess.CompletedProcess:
    """`python -m prmtool ARGS` in a process of its own (the project's code first on the path)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "prmtool", *map(str, args)], capture_output=True, text=True, env=environment, **options
    )


def closed(fd: int):
    """A preexec_fn closing one of the child's standard descriptors, as `<&-` or `>&-` does."""
    return lambda: os.close(fd)


@pytest.mark.parametrize(
    "args, fd, said",
    [
        (["import", "-", "-o", "OUT"], 0, "standard input is closed"),
        (["stats", "-"], 0, "standard input is closed"),
        (["stats", SAMPLES / "labeled"], 1, "standard output is closed"),
        (["export", SAMPLES / "labeled", "-o", "-", "-f", "jsonl"], 1, "standard output is closed"),
    ],
    ids=["import -", "stats -", "stats", "export -o -"],
)
def test_a_closed_standard_stream_is_one_line(tmp_path, args, fd, said):
    result = run_cli(*[tmp_path / "out" if a == "OUT" else a for a in args], preexec_fn=closed(fd), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: -: {said}"
    assert not (tmp_path / "out").exists()


def test_a_stage_with_stdout_closed_still_writes_its_shards(tmp_path):
    source = SAMPLES / "test_sample.jsonl"
    result = run_cli("import", source, "--preset", "gsm8k", "-o", tmp_path / "out", preexec_fn=closed(1), timeout=120)
    assert result.returncode == 0, result.stderr  # its summary goes to stderr, as always
    assert pl.read_parquet(tmp_path / "out" / "part-00000.parquet").height == len(source.read_text().splitlines())


# --- hangs ------------------------------------------------------------------------------------


def test_a_thousand_verify_workers_are_capped_at_the_cpus(prmtool, tmp_path, responses_dir):
    from prmtool.core.options import default_workers

    started = time.perf_counter()
    result = prmtool("verify", responses_dir, "-o", tmp_path / "out", "--workers", "1000")
    assert result.exit_code == 0, result.stderr
    assert f"--workers 1000: capped at {default_workers()}" in result.stderr
    assert time.perf_counter() - started < 60
    assert pl.read_parquet(tmp_path / "out" / "part-00000.parquet")["verify_status"].is_in(["ok", "no_answer"]).all()


def test_a_catastrophic_split_pattern_ends_in_a_time_limit(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"problem": "q", "reference_answer": "1", "response": "a" * 40 + "b"}])
    started = time.perf_counter()
    result = prmtool("import", source, "--split", "regex:(a|aa)+$", "-o", tmp_path / "out")
    one_line_error(result, "--split 'regex:(a|aa)+$'", "backtracks")
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out").exists()


def test_a_fine_split_pattern_splits_a_long_text_in_time(prmtool, write_jsonl, tmp_path):
    response = "Step: x\n" * 200_000  # 1.6 MB, 200,000 steps
    source = write_jsonl([{"problem": "q", "reference_answer": "1", "response": response}])
    assert prmtool("import", source, "--split", "regex:Step:", "-o", tmp_path / "out", "-q").exit_code == 0
    assert pl.read_parquet(tmp_path / "out" / "*.parquet")["steps"].list.len().item() == 200_000


@pytest.mark.parametrize("command", [["verify", "-o", "OUT"], ["import", "-o", "OUT"]])
def test_a_fifo_named_parquet_is_refused_not_read(tmp_path, labeled, command):
    folder = shard_of(tmp_path, labeled)
    fifo = folder / "part-00001.parquet"
    os.mkfifo(fifo)
    if command[0] == "import":
        folder = fifo.with_name("rows.jsonl")
        os.mkfifo(folder)
    argv = [tmp_path / "out" if a == "OUT" else a for a in command]
    result = run_cli(argv[0], folder, *argv[1:], timeout=60)  # its own process: a hang is a timeout, not a stall
    assert result.returncode == 2, result.stderr
    assert "not a regular file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    one_fifo = run_cli("stats", fifo, timeout=60)
    assert one_fifo.returncode == 2 and "not a regular file" in one_fifo.stderr


def test_five_thousand_holdout_names_are_refused_at_once(prmtool, tmp_path):
    names = ",".join(f"s{i}=0.0001" for i in range(5000))
    started = time.perf_counter()
    result = prmtool("export", SAMPLES / "labeled", "-o", tmp_path / "out", "-f", "trl-stepwise", "--holdout", names)
    one_line_error(result, "--holdout", "5,000 splits")
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "out").exists()


ORPHAN = """
import multiprocessing, os, sys, time
from prmtool.methods import verification


def busy(marker):  # a comparison that takes two minutes
    open(marker, "w").close()
    time.sleep(120)


pool = verification._shared_pool(1)
pool.schedule(busy, args=(sys.argv[1],))
while not os.path.exists(sys.argv[1]):  # the worker is inside its task
    time.sleep(0.05)
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
time.sleep(120)
"""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except FileNotFoundError:
        return False
    return state not in "ZX"  # a zombie waits only for its reaper


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_verify_workers_die_with_their_killed_parent(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, str(tmp_path / "started")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers and all(running(pid) for pid in workers)
    os.kill(parent.pid, signal.SIGKILL)  # no atexit, no pool.stop(): only the kernel can end them
    parent.wait()
    deadline = time.monotonic() + 5
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if running(pid)]
    for pid in survivors:  # leave no process behind, even when failing
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "a worker outlived its parent"


# --- a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["verify"], ["export", "-f", "sft-messages"], ["import"]])
def test_a_full_disk_names_the_file_it_could_not_write(prmtool, tmp_path, labeled, monkeypatch, command):
    import pyarrow.parquet as pq

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")  # as pyarrow raises it: no file name

    monkeypatch.setattr(pq, "write_table", no_space)
    source = write_source = shard_of(tmp_path, labeled)
    if command[0] == "import":
        source = write_source / "rows.parquet"
        labeled.select("problem", "reference_answer").write_parquet(source)
    result = prmtool(command[0], source, "-o", tmp_path / "out", *command[1:])
    line = one_line_error(result, "No space left on device")
    assert f"{tmp_path / 'out'}/" in line and ".parquet" in line, line
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_a_full_disk_while_writing_the_manifest_names_it(prmtool, tmp_path, responses_dir, monkeypatch):
    from prmtool.core import outputs, shards

    def no_space(handle):
        raise OSError(28, "No space left on device")  # as pyarrow and json writes raise it: no file name

    def replace_atomically(path, write, *args):
        return outputs.replace_atomically(path, no_space if path.name == shards.MANIFEST else write, *args)

    monkeypatch.setattr(shards, "replace_atomically", replace_atomically)
    one_line_error(prmtool("verify", responses_dir, "-o", tmp_path / "out"), str(tmp_path / "out" / shards.MANIFEST))


@pytest.fixture
def full_disk(tmp_path):
    """A tmpfs of 8 KiB: a real full disk (needs the right to mount; skipped without it)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_names_the_file(prmtool, responses_dir, full_disk):
    result = prmtool("verify", responses_dir, "-o", full_disk / "out")
    one_line_error(result, str(full_disk / "out" / "part-00000.parquet"), "No space left on device")
    assert not (full_disk / "out" / "_SUCCESS").exists()
