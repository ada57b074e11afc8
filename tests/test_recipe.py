"""`prmtool run RECIPE.yaml`: a pipeline as one resumable command.

Most tests use the model-free stages (import -> verify -> filter -> export) so that they take
seconds; the last one runs the README's quickstart recipe end to end with the embedded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
import typer

from prmtool.cli import app
from prmtool.cli.recipe import load_recipe
from tests.conftest import ROOT, SAMPLES

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def small_recipe(tmp_path) -> Path:
    return write_recipe(
        tmp_path,
        f"""
workdir: {tmp_path / "work"}
input: {SAMPLES / "responses.jsonl"}
stages:
  - stage: import
    shard-rows: 20
  - stage: verify
    workers: 1
  - stage: filter
    method: accuracy-band
    band: "0.2,0.8"
    rejects: "{{workdir}}/03-filter-rejects"
  - stage: export
    format: sft-messages
""",
    )


def stage_files(workdir: Path) -> dict[str, int]:
    """Every output file with its modification time: what a skipped stage must not touch."""
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in sorted(workdir.rglob("*.parquet"))}


def actions(stderr: str) -> dict[str, str]:
    """`[02-verify] skip   prmtool ...` lines -> {"02-verify": "skip"}."""
    found = {}
    for line in stderr.splitlines():
        if line.startswith("[") and "] " in line and "prmtool " in line:
            label, rest = line[1:].split("] ", 1)
            found[label] = rest.split()[0]
    return found


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_a_valid_sequence_of_prmtool_commands(recipe):
    """Each stage's command line parses with the real CLI: no unknown option or bad value."""
    command = typer.main.get_command(app)
    for step in load_recipe(recipe).steps:
        argv = step.argv()
        subcommand = command.commands[argv[0]]
        subcommand.make_context(argv[0], argv[1:])  # raises on an unknown option or bad value


def test_a_recipe_runs_every_stage_into_numbered_directories(prmtool, small_recipe, tmp_path):
    result = prmtool("run", small_recipe, "--quiet")
    assert result.exit_code == 0, result.stderr
    work = tmp_path / "work"
    for directory in ("01-import", "02-verify", "03-filter", "03-filter-rejects", "04-export"):
        assert (work / directory / "_SUCCESS").exists(), directory
    assert set(actions(result.stderr).values()) == {"run"}
    kept = pl.read_parquet(work / "03-filter" / "*.parquet")
    rejected = pl.read_parquet(work / "03-filter-rejects" / "*.parquet")
    assert kept.height + rejected.height == 48  # nothing lost on the way


def test_a_second_run_skips_every_complete_unchanged_stage(prmtool, small_recipe, tmp_path):
    assert prmtool("run", small_recipe, "-q").exit_code == 0
    before = stage_files(tmp_path / "work")
    result = prmtool("run", small_recipe, "-q")
    assert result.exit_code == 0
    assert set(actions(result.stderr).values()) == {"skip"}
    assert stage_files(tmp_path / "work") == before


def test_a_changed_option_reruns_its_stage_and_every_later_one(prmtool, small_recipe, tmp_path):
    assert prmtool("run", small_recipe, "-q").exit_code == 0
    result = prmtool("run", small_recipe, "-q", "--set", "filter.band=0.0,0.5")
    assert result.exit_code == 0, result.stderr
    assert actions(result.stderr) == {
        "01-import": "skip",
        "02-verify": "skip",
        "03-filter": "rerun",
        "04-export": "rerun",
    }
    manifest = json.loads((tmp_path / "work" / "03-filter" / "_SUCCESS").read_text())
    assert manifest["arguments"]["band"] == [0.0, 0.5]


def test_options_that_change_only_speed_rerun_nothing(prmtool, small_recipe, tmp_path):
    """--workers (and label's --rounds and --speculate) change how fast a stage runs, never
    what it writes: a recipe changed only there skips its stages as they are."""
    assert prmtool("run", small_recipe, "-q").exit_code == 0
    before = stage_files(tmp_path / "work")
    result = prmtool("run", small_recipe, "-q", "--set", "verify.workers=2")
    assert result.exit_code == 0, result.stderr
    assert set(actions(result.stderr).values()) == {"skip"}
    assert stage_files(tmp_path / "work") == before


def test_a_changed_input_reruns_everything_after_it(prmtool, small_recipe, tmp_path):
    assert prmtool("run", small_recipe, "-q").exit_code == 0
    smaller = tmp_path / "fewer.jsonl"
    smaller.write_text("".join((SAMPLES / "responses.jsonl").read_text().splitlines(keepends=True)[:20]))
    result = prmtool("run", small_recipe, "-q", "--set", f"import.input={smaller}")
    assert result.exit_code == 0, result.stderr
    assert set(actions(result.stderr).values()) == {"rerun"}
    assert pl.read_parquet(tmp_path / "work" / "02-verify" / "*.parquet").height == 20


def test_from_recomputes_a_stage_and_the_rest_until_stops_early(prmtool, small_recipe, tmp_path):
    result = prmtool("run", small_recipe, "-q", "--until", "verify")
    assert result.exit_code == 0
    assert list(actions(result.stderr)) == ["01-import", "02-verify"]
    assert not (tmp_path / "work" / "03-filter").exists()

    assert prmtool("run", small_recipe, "-q").exit_code == 0
    result = prmtool("run", small_recipe, "-q", "--from", "filter")
    assert actions(result.stderr) == {
        "01-import": "skip",
        "02-verify": "skip",
        "03-filter": "rerun",
        "04-export": "rerun",
    }


def test_dry_run_prints_the_plan_and_writes_nothing(prmtool, small_recipe, tmp_path):
    result = prmtool("run", small_recipe, "--dry-run")
    assert result.exit_code == 0
    assert "prmtool verify" in result.stderr and "--workers 1" in result.stderr
    assert not (tmp_path / "work").exists()


def test_dry_run_estimates_rows_tokens_and_time_for_every_stage(prmtool, tmp_path):
    """Upper bounds from the options: 20 problems x n 4 = 80 responses; the drop rule's binary
    search over the assumed 8 steps takes at most 3 levels of up to --max-k (4 x k) rollouts
    each; time at the given throughput."""
    recipe = ROOT / "recipes" / "quickstart.yaml"
    work = tmp_path / "work"
    result = prmtool("run", recipe, "--dry-run", "--workdir", work, "--tokens-per-second", "100")
    assert result.exit_code == 0, result.stderr
    estimates = [line.strip() for line in result.stderr.splitlines() if line.startswith("    ")]
    assert estimates[1].startswith("20 rows in; at most 5,120 generated tokens (4 responses x 64 tokens per problem)")
    assert "at most 51 s at 100 tokens/s (given)" in estimates[1]
    assert estimates[3].startswith(
        "80 rows in; at most 184,320 generated tokens (3 levels x up to 16 rollouts x 48 tokens per response)"
    )
    assert "at most 31 min at 100 tokens/s" in estimates[3]
    assert estimates[6].startswith("40 rows in")  # PROF keeps 2 of each problem's 4
    assert "estimate: at most 225,280 generated tokens in all; 38 min at the rates above" in result.stderr
    assert not work.exists()


def test_dry_run_times_a_stage_by_the_throughput_an_earlier_run_measured(prmtool, tmp_path):
    from prmtool.cli.estimate import record_throughput
    from prmtool.stages import stage

    recipe = ROOT / "recipes" / "quickstart.yaml"
    unknown = prmtool("run", recipe, "--dry-run", "--workdir", tmp_path / "work")
    assert "time unknown: give --tokens-per-second" in unknown.stderr
    settings = stage("generate").settings(engine="hf", device=None, model=None)
    record_throughput(settings, tokens=5_000, seconds=10.0)  # as a run of the embedded model here would
    measured = prmtool("run", recipe, "--dry-run", "--workdir", tmp_path / "work")
    assert "at most 10 s at 500 tokens/s (measured here" in measured.stderr
    assert "estimate: at most 225,280 generated tokens in all; 8 min at the rates above" in measured.stderr


def test_an_interrupted_stage_resumes_from_its_finished_shards(prmtool, small_recipe, tmp_path):
    assert prmtool("run", small_recipe, "-q").exit_code == 0
    verified = tmp_path / "work" / "02-verify"
    # As if verify had been killed after its first shard: the manifest and later shards are missing.
    (verified / "_SUCCESS").unlink()
    for late in sorted(verified.glob("*.parquet"))[1:]:
        late.unlink()
    first = sorted(verified.glob("*.parquet"))[0]
    first_written = first.stat().st_mtime_ns
    result = prmtool("run", small_recipe, "-q")
    assert result.exit_code == 0, result.stderr
    assert actions(result.stderr)["02-verify"] == "resume"
    assert first.stat().st_mtime_ns == first_written  # the finished shard was not redone
    assert (verified / "_SUCCESS").exists()


def test_a_failing_stage_stops_the_recipe_with_how_to_resume(prmtool, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
workdir: {tmp_path / "work"}
input: {SAMPLES / "responses.jsonl"}
stages:
  - stage: import
  - stage: export
    format: trl-stepwise
    where: "no_such_column > 1"
""",
    )
    result = prmtool("run", recipe, "-q", "--workdir", tmp_path / "elsewhere")
    assert result.exit_code == 2  # as the stage exits: the --where names no column of the input
    assert "stage 02-export failed" in result.stderr
    # the hint repeats the command exactly as typed, workdir and all
    assert f"rerun `prmtool run {recipe} -q --workdir {tmp_path / 'elsewhere'}`" in result.stderr
    assert result.stderr.count("failed") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: []\n", "non-empty `stages:` list"),
        ("stages:\n  - stage: sample\n", "unknown stage 'sample'"),
        ("stages:\n  - stage: verify\n", "no input"),
        ("input: x\nstages:\n  - stage: verify\n  - stage: verify\n", "a second stage named 'verify'"),
        ("input: x\nsteps: []\nstages:\n  - stage: verify\n", "unknown top-level key 'steps'"),
        ("stages: [\n", "not valid YAML"),
    ],
)
def test_a_bad_recipe_is_a_one_line_error_naming_the_file(prmtool, tmp_path, text, message):
    recipe = write_recipe(tmp_path, text)
    result = prmtool("run", recipe, "--dry-run")
    assert result.exit_code == 2
    assert message in result.stderr and str(recipe) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("override", ["filter.kep=2", "verify.workers=many", "filter.method=prfo"])
def test_a_typo_in_any_stage_fails_before_the_first_stage_runs_even_in_dry_run(prmtool, small_recipe, override):
    for extra in ([], ["--dry-run"]):
        result = prmtool("run", small_recipe, "--set", override, *extra)
        assert result.exit_code == 2, result.stderr
        assert "03-filter" in result.stderr or "02-verify" in result.stderr
        assert "] run" not in result.stderr  # no stage was started
    assert not (small_recipe.parent / "work").exists()


def test_input_paths_are_relative_to_the_recipe_file(prmtool, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (tmp_path / "data.jsonl").write_text((SAMPLES / "responses.jsonl").read_text())
    recipe = write_recipe(folder, "input: ../data.jsonl\nstages:\n  - stage: import\n  - stage: verify\n")
    monkeypatch.chdir(tmp_path.parent)  # anywhere but the recipe's folder
    result = prmtool("run", recipe, "--dry-run", "--workdir", tmp_path / "work")
    assert result.exit_code == 0, result.stderr
    assert str(tmp_path / "data.jsonl") in result.stderr
    missing = write_recipe(folder, "input: data.jsonl\nstages:\n  - stage: import\n")
    result = prmtool("run", missing, "--dry-run", "--workdir", tmp_path / "work")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_set_needs_stage_dot_option_and_a_known_stage(prmtool, small_recipe):
    assert "expected STAGE.OPTION=VALUE" in prmtool("run", small_recipe, "--dry-run", "--set", "k=8").stderr
    assert "no such stage" in prmtool("run", small_recipe, "--dry-run", "--set", "label.k=8").stderr


@pytest.mark.slow
def test_the_quickstart_recipe_runs_the_whole_pipeline_with_the_embedded_model(prmtool, tmp_path, monkeypatch):
    """The README's main job, with smaller settings so that it takes about a minute."""
    monkeypatch.chdir(ROOT)
    work = tmp_path / "quickstart"
    result = prmtool(
        "run",
        "recipes/quickstart.yaml",
        "-q",
        "--workdir",
        work,
        "--set",
        "generate.n=2",
        "--set",
        "generate.max-tokens=48",
        "--set",
        "label.max-tokens=16",
        "--set",
        "label.k=1",
        "--set",
        "filter.keep=1",
        "--set",
        "intervene.candidates=1",
        "--set",
        "intervene.max-tokens=16",
        "--set",
        "intervene.proposer-max-tokens=32",
    )
    assert result.exit_code == 0, result.stderr
    problems = pl.read_parquet(work / "01-import" / "*.parquet")
    generated = pl.read_parquet(work / "02-generate" / "*.parquet")
    assert generated.height == 2 * problems.height  # 2 samples per problem
    scored = pl.read_parquet(work / "05-score" / "*.parquet")
    for column in ("correct", "step_labels", "first_error", "step_rewards", "prm_score"):
        assert column in scored.columns
    kept = pl.read_parquet(work / "06-filter" / "*.parquet")
    rejected = pl.read_parquet(work / "06-filter-rejects" / "*.parquet")
    assert kept.height + rejected.height == generated.height
    for done in ("07-export-prm", "08-intervene", "09-export-sft"):
        assert (work / done / "_SUCCESS").exists()
    assert os.listdir(work / "08-intervene-rejects")


def test_the_makefile_runs_the_quickstart_recipes_commands(prmtool, monkeypatch, tmp_path):
    """recipes/Makefile chains the same stages with the same options as quickstart.yaml, as
    plain CLI calls: `make -n` prints the commands the recipe's plan would run. Both plan a
    fresh workdir under tmp_path, whatever a run of the main job left in work/."""
    import shlex
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("needs make")
    monkeypatch.chdir(ROOT)
    work = tmp_path / "quickstart"
    made = subprocess.run(
        ["make", "-n", "-f", "recipes/Makefile", f"WORK={work}"], capture_output=True, text=True, check=True
    ).stdout.replace("\\\n", " ")
    planned = [
        line.split("] ", 1)[1].split(None, 1)[1]
        for line in prmtool("run", "recipes/quickstart.yaml", "--dry-run", "--workdir", work).stderr.splitlines()
        if line.startswith("[")
    ]

    def as_call(line: str) -> tuple[str, str, frozenset[str]]:
        """(subcommand, input, sorted OPTION=VALUE arguments): option order does not matter."""
        words = shlex.split(line)[1:]
        arguments = []
        while words:
            word = words.pop(0)
            arguments.append(
                f"{word}={words.pop(0)}" if word.startswith("-") and words and not words[0].startswith("-") else word
            )
        return arguments[0], arguments[1], tuple(sorted(arguments[2:]))

    assert sorted(map(as_call, made.strip().splitlines())) == sorted(map(as_call, planned))
    assert len(planned) == 9


def test_model_is_the_policy_of_every_model_stage_unless_one_names_its_own(tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
workdir: {tmp_path / "work"}
input: problems.jsonl
model: ./policy-from-the-recipe
stages:
  - stage: import
  - stage: generate
  - stage: verify
  - stage: label
    model: ./labeller
  - stage: score
  - stage: intervene
""",
    )

    def policies(**kwargs) -> dict[str, str | None]:
        steps = load_recipe(recipe, **kwargs).steps
        return {s.stage: s.options.get("policy" if s.stage == "score" else "model") for s in steps}

    assert policies() == {
        "import": None,
        "generate": "./policy-from-the-recipe",
        "verify": None,
        "label": "./labeller",
        "score": "./policy-from-the-recipe",
        "intervene": "./policy-from-the-recipe",
    }
    chosen = policies(model="./from-the-command-line", overrides=["generate.model=./from-set"])
    assert chosen["generate"] == "./from-set"  # --set wins over --model
    assert chosen["score"] == chosen["intervene"] == "./from-the-command-line"
    assert chosen["label"] == "./labeller"


def test_run_model_puts_the_model_on_every_model_stages_command_line(prmtool):
    result = prmtool("run", ROOT / "recipes" / "quickstart.yaml", "--dry-run", "--model", "./my-model")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert sum("--model ./my-model" in line for line in lines) == 3  # generate, label, intervene
    assert sum("--policy ./my-model" in line for line in lines) == 1  # score


def test_dry_run_says_when_stages_run_different_policy_models(prmtool, tmp_path):
    mixed = prmtool("run", ROOT / "recipes/quickstart.yaml", "--dry-run", "--workdir", tmp_path / "w",
                    "--set", f"generate.model={tmp_path / 'Qwen2.5-Math-7B'}")  # fmt: skip
    assert "note: the stages run different policy models" in mixed.stderr
    assert f"02-generate: {tmp_path / 'Qwen2.5-Math-7B'}" in mixed.stderr
    assert "04-label, 05-score, 08-intervene: the embedded SmolLM2-135M-Instruct" in mixed.stderr
    same = prmtool("run", ROOT / "recipes/quickstart.yaml", "--dry-run", "--workdir", tmp_path / "w")
    assert "different policy models" not in same.stderr


def test_a_recipe_can_end_with_eval_which_writes_its_report_and_is_skipped_when_unchanged(prmtool, tmp_path):
    sample = tmp_path / "pb.jsonl"
    sample.write_text("".join((ROOT / "data_samples/processbench-gsm8k/gsm8k.jsonl").read_text().splitlines(True)[:20]))
    recipe = write_recipe(
        tmp_path,
        f"""
workdir: {tmp_path / "work"}
input: {sample}
stages:
  - stage: import
    preset: processbench
  - stage: eval
    truth: human_first_error
    pred: human_first_error   # the truth against itself: every metric is 1
""",
    )
    first = prmtool("run", recipe)
    assert first.exit_code == 0, first.stderr
    report = json.loads((tmp_path / "work/02-eval/eval.json").read_text())
    overall = report["results"][0]
    assert overall["rows"] == 20
    assert {overall[k] for k in ("error_accuracy", "correct_accuracy", "f1") if overall[k] is not None} == {1.0}
    assert actions(prmtool("run", recipe).stderr) == {"01-import": "skip", "02-eval": "skip"}


def test_the_closing_line_says_what_each_export_holds(prmtool, small_recipe, tmp_path):
    first = prmtool("run", small_recipe)
    assert first.exit_code == 0, first.stderr
    rows = pl.read_parquet(tmp_path / "work/04-export/train/*.parquet").height
    closing = first.stderr.strip().splitlines()[-1]
    assert f"04-export/: {rows:,} rows (" in closing and "problems)" in closing
    again = prmtool("run", small_recipe).stderr.strip().splitlines()[-1]  # skipped: rows from the manifest
    assert f"04-export/: {rows:,} rows" in again


def test_false_turns_a_switch_that_is_on_by_default_off_and_leaves_others_out(prmtool, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
workdir: {tmp_path / "work"}
input: {SAMPLES / "responses.jsonl"}
stages:
  - stage: import
  - stage: generate
    verify: false
  - stage: label
    speculate: false
""",
    )
    argv = {step.stage: step.argv() for step in load_recipe(recipe).steps}
    assert "--no-speculate" in argv["label"]  # label's --speculate is on unless turned off
    assert not any(arg.startswith(("--verify", "--no-verify")) for arg in argv["generate"])  # off by default
    planned = prmtool("run", recipe, "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    assert "--no-speculate" in planned.stderr
