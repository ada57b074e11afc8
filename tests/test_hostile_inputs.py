"""Hostile input: no command may modify its own input, mix two runs in one directory, hang, or
answer bad input with a traceback. Every case ends in exit 2 with one line that names what is
wrong, and the input's bytes unchanged."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import polars as pl
import pytest

from prmtool.core import outputs
from tests.conftest import SAMPLES


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file itself) by the hash of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def one_line_error(result, *named: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("Usage:"), result.stderr
    line = lines[0] if len(lines) == 1 else next(line for line in lines if "Invalid value" in line or "Error" in line)
    assert "Traceback" not in result.stderr
    for name in named:
        assert name in result.stderr, f"{name!r} not in {result.stderr!r}"
    return line


@pytest.fixture
def verified(tmp_path) -> Path:
    """A verified and labeled shard set: what label, score, filter, intervene and export read."""
    frame = pl.read_parquet(SAMPLES / "labeled" / "part-00000.parquet")
    frame = frame.with_columns(
        correct=pl.col("first_error") < 0,
        verify_status=pl.lit("ok"),
        step_rewards=pl.col("steps").list.eval(pl.lit(0.1)),
        prm_score=pl.lit(0.5),
    )
    directory = tmp_path / "in"
    directory.mkdir()
    frame.write_parquet(directory / "part-00000.parquet")
    return directory


# --- every path a command writes, aimed at its input -----------------------------------------

# (command and its options, with IN for the input, OUT for a fresh path) and the option aimed.
WRITERS = [
    (["verify", "IN", "-o", "TARGET"], "-o"),
    (["label", "IN", "-o", "TARGET"], "-o"),
    (["label", "IN", "-o", "OUT", "--method", "omegaprm", "--tree-output", "TARGET"], "--tree-output"),
    (["score", "IN", "-o", "TARGET", "--no-ref"], "-o"),
    (["intervene", "IN", "-o", "TARGET"], "-o"),
    (["intervene", "IN", "-o", "OUT", "--rejects", "TARGET"], "--rejects"),
    (["filter", "IN", "-o", "TARGET", "--rejects", "REJ"], "-o"),
    (["filter", "IN", "-o", "OUT", "--rejects", "TARGET"], "--rejects"),
    (["filter", "IN", "-o", "OUT", "--rejects", "REJ", "--report", "TARGET"], "--report"),
    (["export", "IN", "-o", "TARGET", "--format", "trl-stepwise"], "-o"),
    (
        ["export", "IN", "-o", "OUT", "--format", "trl-stepwise", "--hf-dataset", "TARGET", "--overwrite"],
        "--hf-dataset",
    ),
    (["stats", "IN", "--plot", "TARGET"], "--plot"),
]
# Where the option points: the input folder, its shard, a path inside it, a folder above it.
TARGETS = {
    "the input folder": lambda d: d,
    "the input shard": lambda d: d / "part-00000.parquet",
    "a path inside the input": lambda d: d / "sub",
    "a folder above the input": lambda d: d.parent,
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("argv, option", WRITERS, ids=[f"{argv[0]} {option}" for argv, option in WRITERS])
def test_no_written_path_may_be_an_input_inside_one_or_above_one(prmtool, verified, tmp_path, argv, option, target):
    before = snapshot(verified)
    places = {"IN": verified, "OUT": tmp_path / "out", "REJ": tmp_path / "rej", "TARGET": TARGETS[target](verified)}
    result = prmtool(
        *[places.get(a, a) for a in argv],
        "--overwrite" if "--overwrite" not in argv and argv[0] != "stats" else "--quiet",
    )
    one_line_error(result, option)
    assert snapshot(verified) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "rej").exists(), "nothing half-written"


def test_two_outputs_of_one_command_may_not_nest(prmtool, verified, tmp_path):
    result = prmtool(
        "filter", verified, "-o", tmp_path / "out", "--rejects", tmp_path / "out" / "rej", "--method", "none"
    )
    one_line_error(result, "--rejects", "-o")
    result = prmtool(
        "filter",
        verified,
        "-o",
        tmp_path / "out",
        "--rejects",
        tmp_path / "rej",
        "--method",
        "none",
        "--report",
        tmp_path / "rej" / "report.json",
    )
    one_line_error(result, "--report")


@pytest.mark.parametrize("name", ["..", "../../escaped", "_SUCCESS", ".hidden", "a/b", ""])
def test_split_names_are_plain_names(prmtool, verified, tmp_path, name):
    result = prmtool("export", verified, "-o", tmp_path / "out", "--format", "trl-stepwise", "--split", f"{name}=0.5")
    one_line_error(result, "--holdout")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_recipe_stage_name_cannot_leave_the_workdir(prmtool, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"workdir: {tmp_path / 'work'}\ninput: {SAMPLES / 'test_sample.jsonl'}\n"
        "stages:\n  - stage: import\n    preset: gsm8k\n    name: x/../../../escaped-stage\n",
    )
    one_line_error(prmtool("run", recipe, "--dry-run"), "name")
    assert not list(tmp_path.parent.glob("escaped-stage*"))


def test_a_recipe_workdir_may_not_be_a_file_or_hold_the_input(prmtool, tmp_path):
    (tmp_path / "afile").write_text("x")
    recipe = write_recipe(
        tmp_path,
        f"workdir: {tmp_path / 'afile'}\ninput: {SAMPLES / 'test_sample.jsonl'}\n"
        "stages:\n  - stage: import\n    preset: gsm8k\n",
    )
    one_line_error(prmtool("run", recipe), "not a directory")
    recipe = write_recipe(
        tmp_path,
        f"workdir: {SAMPLES}\ninput: {SAMPLES / 'test_sample.jsonl'}\nstages:\n  - stage: import\n    preset: gsm8k\n",
    )
    one_line_error(prmtool("run", recipe, "--dry-run"), "--workdir")


# --- two runs, one directory ------------------------------------------------------------------


def test_a_second_different_run_into_a_busy_directory_fails_at_once(prmtool, verified, tmp_path):
    out = tmp_path / "out"
    with outputs.output_lock([out], "another run's key"):  # as a run in another process holds it
        started = time.perf_counter()
        one_line_error(prmtool("verify", verified, "-o", out, "--workers", "1"), "another prmtool run")
        assert time.perf_counter() - started < 10
    assert prmtool("verify", verified, "-o", out, "--workers", "1", "-q").exit_code == 0  # free again


def test_partitions_of_one_run_share_the_lock(tmp_path):
    with outputs.output_lock([tmp_path / "out"], "key"), outputs.output_lock([tmp_path / "out"], "key"):
        pass
    with outputs.output_lock([tmp_path / "out"], "key"):
        with pytest.raises(Exception, match="another prmtool run"):
            with outputs.output_lock([tmp_path / "out"], "other key"):
                pass


def test_an_input_edited_in_place_to_the_same_size_is_not_taken_for_the_old_one(prmtool, tmp_path, responses_dir):
    import pyarrow.parquet as pq

    def write_plain(
        frame: pl.DataFrame, path: Path
    ) -> None:  # no compression, dictionaries or statistics: size = content length
        pq.write_table(frame.to_arrow(), path, compression="none", use_dictionary=False, write_statistics=False)

    shard = responses_dir / "part-00000.parquet"
    write_plain(pl.read_parquet(shard), shard)
    out = tmp_path / "out"
    assert prmtool("verify", responses_dir, "-o", out, "--workers", "1", "-q").exit_code == 0
    size, rows = shard.stat().st_size, pl.read_parquet(shard).height
    # one answer edited to another of the same length (18 -> 81): same size, same rows
    frame = pl.read_parquet(shard)
    frame = frame.with_columns(reference_answer=pl.col("reference_answer").str.replace(r"^(\d)(\d)$", "${2}${1}"))
    write_plain(frame, shard)
    assert (shard.stat().st_size, pl.read_parquet(shard).height) == (size, rows)
    one_line_error(prmtool("verify", responses_dir, "-o", out, "--workers", "1"), "different run")


# --- bad input that used to end in a traceback ------------------------------------------------


def test_an_output_that_cannot_be_written_is_one_line(prmtool, verified):
    target = Path("/sys/prmtool-test-output")
    if target.parent.exists() and __import__("os").access(target.parent, __import__("os").W_OK):
        try:
            target.mkdir()
            target.rmdir()
            pytest.skip("/sys is writable here")
        except OSError:
            pass
    one_line_error(prmtool("verify", verified, "-o", target), str(target))


def test_a_full_disk_is_one_line_and_leaves_no_manifest(prmtool, verified, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", no_space)
    one_line_error(prmtool("verify", verified, "-o", tmp_path / "out", "--workers", "1"), "No space left")
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_a_full_disk_during_hf_dataset_leaves_no_success(prmtool, verified, tmp_path, monkeypatch):
    import datasets

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", no_space)
    result = prmtool(
        "export", verified, "-o", tmp_path / "out", "--format", "trl-stepwise", "--hf-dataset", tmp_path / "hf"
    )
    one_line_error(result, "No space left")
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_garbled_parquet_pages_in_stats(prmtool, tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    shard = directory / "part-00000.parquet"
    pl.DataFrame({"problem_id": [f"p{i}" for i in range(5000)], "x": list(range(5000))}).write_parquet(
        shard, compression="uncompressed"
    )
    data = bytearray(shard.read_bytes())
    data[100:4000] = b"\xff" * 3900  # the data pages, the footer intact
    shard.write_bytes(bytes(data))
    one_line_error(prmtool("stats", directory), str(shard))


def test_a_recipe_that_is_not_text(prmtool, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"workdir: w\nstages:\n  - stage: import\xff\n")
    one_line_error(prmtool("run", recipe), "line 3", "UTF-8")


@pytest.fixture
def problems(prmtool, tmp_path) -> Path:
    directory = tmp_path / "problems"
    assert prmtool("import", SAMPLES / "test_sample.jsonl", "--preset", "gsm8k", "-o", directory, "-q").exit_code == 0
    return directory


def test_a_chat_template_the_sandbox_refuses(prmtool, tiny_model_dir, problems, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    result = prmtool(
        "generate", problems, "-o", tmp_path / "out", "--model", model, "--n", "1", "--max-tokens", "4", "-q"
    )
    one_line_error(result, "chat template")


def test_pickle_weights_that_transformers_refuses(prmtool, tiny_model_dir, problems, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    (model / "pytorch_model.bin").write_bytes(
        b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."
    )  # a pickle that runs a command
    result = prmtool(
        "generate", problems, "-o", tmp_path / "out", "--model", model, "--n", "1", "--max-tokens", "4", "-q"
    )
    one_line_error(result, "cannot load model")


def test_a_device_this_machine_lacks(prmtool, verified, tmp_path):
    import torch

    one_line_error(prmtool("label", verified, "-o", tmp_path / "out", "--device", "gpu"), "--device")
    if not torch.cuda.is_available():
        one_line_error(prmtool("label", verified, "-o", tmp_path / "out", "--device", "cuda:7"), "--device cuda:7")
    assert not (tmp_path / "out").exists()


# --- hangs ------------------------------------------------------------------------------------


def test_a_10_mb_adversarial_response_finishes_within_the_timeout(prmtool, tmp_path):
    directory = tmp_path / "hostile"
    directory.mkdir()
    pl.DataFrame(
        {
            "problem_id": ["p", "p", "p"],
            "problem": ["?"] * 3,
            "reference_answer": ["5"] * 3,
            "response_id": ["boxes", "lines", "fine"],
            "response": ["\\boxed{" * (10_000_000 // 7), "\n" * 10_000_000 + "A: 5", "so \\boxed{5}"],
        }
    ).write_parquet(directory / "part-00000.parquet")
    started = time.perf_counter()
    result = prmtool("verify", directory, "-o", tmp_path / "out", "--timeout", "2", "--workers", "2", "-q")
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.stderr
    assert elapsed < 30, f"{elapsed:.1f} s"
    verdicts = pl.read_parquet(tmp_path / "out" / "part-00000.parquet").sort("response_id")
    assert verdicts["correct"].to_list() == [False, True, True]


@pytest.mark.parametrize("levels", [6, 9])
def test_a_yaml_alias_bomb_is_refused(prmtool, tmp_path, levels):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    recipe = write_recipe(tmp_path, "\n".join(lines) + f"\nworkdir: *a{levels - 1}\nstages: []\n")
    started = time.perf_counter()
    one_line_error(prmtool("run", recipe, "--dry-run"), "aliases")
    assert time.perf_counter() - started < 5


def test_small_aliases_are_fine(prmtool, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"workdir: {tmp_path / 'w'}\ninput: {SAMPLES / 'test_sample.jsonl'}\n"
        "stages:\n  - &imp {stage: import, preset: gsm8k}\n  - {<<: *imp, name: import-again}\n",
    )
    assert prmtool("run", recipe, "--dry-run").exit_code == 0


# --- recipes are checked whole before the first stage -----------------------------------------

RECIPE_ERRORS = {
    "an unknown option": ("  - stage: import\n    presett: gsm8k\n", "--presett"),
    "a value of the wrong type": ("  - stage: import\n    preset: gsm8k\n  - stage: generate\n    n: abc\n", "--n"),
    "a value out of range": ("  - stage: import\n    preset: gsm8k\n  - stage: generate\n    n: 0\n", "--n"),
    "an unknown stage": ("  - stage: import\n    preset: gsm8k\n  - stage: lable\n", "lable"),
    "a missing input": ("  - stage: import\n    preset: gsm8k\n    input: no/such/file.jsonl\n", "no/such/file.jsonl"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", RECIPE_ERRORS)
def test_a_recipe_error_fails_before_any_stage_runs(prmtool, tmp_path, case, dry_run):
    stages, named = RECIPE_ERRORS[case]
    recipe = write_recipe(
        tmp_path, f"workdir: {tmp_path / 'w'}\ninput: {SAMPLES / 'test_sample.jsonl'}\nstages:\n{stages}"
    )
    one_line_error(prmtool("run", recipe, *(["--dry-run"] if dry_run else [])), named)
    assert not (tmp_path / "w").exists(), "no stage ran"


# --- silently accepted until now --------------------------------------------------------------


def test_import_refuses_a_gsm8k_answer_without_its_marker(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"question": "1+1?", "answer": "2"}])
    one_line_error(prmtool("import", source, "--preset", "gsm8k", "-o", tmp_path / "out"), "row 0", "####")


def test_import_counts_rows_without_a_reference_answer(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([{"problem": "1+1?", "reference_answer": None}, {"problem": "2+2?", "reference_answer": "4"}])
    result = prmtool("import", source, "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert "1 rows have no reference_answer" in result.stderr


def test_import_refuses_two_problem_texts_under_one_id(prmtool, write_jsonl, tmp_path):
    source = write_jsonl(
        [
            {"problem_id": "p1", "problem": "1+1?", "reference_answer": "2"},
            {"problem_id": "p1", "problem": "2+2?", "reference_answer": "4"},
        ]
    )
    one_line_error(prmtool("import", source, "-o", tmp_path / "out"), "'p1'", "2 different problem texts")


def test_filter_refuses_a_null_problem_id(prmtool, verified, tmp_path):
    shard = verified / "part-00000.parquet"
    pl.read_parquet(shard).with_columns(
        problem_id=pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("problem_id"))
    ).write_parquet(shard)
    one_line_error(
        prmtool("filter", verified, "-o", tmp_path / "out", "--rejects", tmp_path / "rej"), "problem_id", "null"
    )


def test_export_refuses_step_labels_of_another_length_than_steps(prmtool, verified, tmp_path):
    shard = verified / "part-00000.parquet"
    pl.read_parquet(shard).with_columns(
        step_labels=pl.col("step_labels").list.concat(pl.lit([1], dtype=pl.List(pl.Int8)))
    ).write_parquet(shard)
    one_line_error(
        prmtool("export", verified, "-o", tmp_path / "out", "--format", "trl-stepwise"), "step_labels", str(shard)
    )
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_verl_export_refuses_a_null_ground_truth(prmtool, verified, tmp_path):
    shard = verified / "part-00000.parquet"
    pl.read_parquet(shard).with_columns(reference_answer=pl.lit(None, dtype=pl.String)).write_parquet(shard)
    one_line_error(prmtool("export", verified, "-o", tmp_path / "out", "--format", "verl"), "ground_truth")


def test_filter_counts_non_finite_step_values_as_missing(prmtool, verified, tmp_path):
    shard = verified / "part-00000.parquet"
    frame = pl.read_parquet(shard)
    values = [
        [float("inf")] * len(s) if i == 0 else [float("nan")] * len(s) if i == 1 else [0.1] * len(s)
        for i, s in enumerate(frame["steps"])
    ]
    frame.with_columns(step_rewards=pl.Series(values)).write_parquet(shard)
    result = prmtool(
        "filter",
        verified,
        "-o",
        tmp_path / "out",
        "--rejects",
        tmp_path / "rej",
        "--keep",
        "2",
        "--report",
        tmp_path / "report.json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["values_missing"] == 2


# --- every option at and past its bounds ------------------------------------------------------

OUT_OF_RANGE = [
    ("verify", "--timeout", ["nan", "-1", "0", "inf"]),
    ("verify", "--workers", ["-3"]),
    ("generate", "--n", ["-1", "0"]),
    ("generate", "--temperature", ["-0.1", "nan", "inf"]),
    ("generate", "--top-p", ["0", "1.5", "nan"]),
    ("generate", "--max-tokens", ["0"]),
    ("generate", "--seed", ["-1"]),
    ("generate", "--verify-timeout", ["nan", "-1"]),
    ("generate", "--prompt-template", ["no placeholder"]),
    ("label", "--k", ["0"]),
    ("label", "--bad-below", ["nan", "-0.5", "1.5"]),
    ("label", "--alpha", ["0", "nan", "2"]),
    ("label", "--beta", ["0", "nan"]),
    ("label", "--c-puct", ["-1", "inf"]),
    ("label", "--length-scale", ["0", "inf"]),
    ("label", "--search-budget", ["-1"]),
    ("label", "--screen-rollouts", ["0"]),
    ("label", "--prompt-template", ["no placeholder"]),
    ("score", "--beta", ["nan", "0", "-1", "inf"]),
    ("score", "--max-batch-tokens", ["0"]),
    ("score", "--prompt-template", ["no placeholder"]),
    ("intervene", "--candidates", ["0"]),
    ("intervene", "--verify-rollouts", ["0"]),
    ("intervene", "--min-success", ["0"]),
    ("intervene", "--temperature", ["nan"]),
    ("intervene", "--prompt-template", ["no placeholder"]),
    ("filter", "--remove", ["-1"]),
    ("filter", "--keep", ["-1"]),
    ("filter", "--min-steps", ["-1"]),
    ("filter", "--max-steps", ["0"]),
    ("filter", "--threshold", ["nan", "inf"]),
    ("export", "--seed", ["-1"]),
    ("export", "--prompt-template", ["no placeholder"]),
    ("import", "--shard-rows", ["0"]),
    ("verify", "--shard-index", ["-1"]),
    ("verify", "--num-shards", ["0"]),
    ("verify", "--gpus-per-task", ["-1", "nan"]),
    ("verify", "--cpus-per-task", ["0", "nan"]),
]
CASES = [(command, option, value) for command, option, values in OUT_OF_RANGE for value in values]


@pytest.mark.parametrize("command, option, value", CASES, ids=[f"{c} {o} {v}" for c, o, v in CASES])
def test_every_option_out_of_its_range_is_a_usage_error(prmtool, verified, tmp_path, command, option, value):
    extra = ["--rejects", tmp_path / "rej"] if command == "filter" else []
    result = prmtool(command, verified, "-o", tmp_path / "out", *extra, option, value)
    line = one_line_error(result, option)
    if value in ("nan", "inf"):  # out of no range: it is not a number to compare
        assert "finite" in line or "a number" in line, line
    assert not (tmp_path / "out").exists()
