"""`prmtool run` checks what its stages need before it touches any record: a run that cannot
load its model leaves a finished run's records and outputs as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def finished_run(prmtool, tmp_path, tiny_model_dir):
    """A recipe with a model stage, run to the end once."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n" for i in range(3))
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
workdir: {tmp_path / "work"}
input: {problems}
model: {tiny_model_dir}
stages:
  - stage: import
    preset: gsm8k
  - stage: generate
    n: 1
    max-tokens: 4
  - stage: verify
    workers: 1
"""
    )
    result = prmtool("run", recipe, "-q")
    assert result.exit_code == 0, result.stderr
    return recipe


def everything_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "options, message",
    [
        (["--engine", "vllm"], "stage 02-generate: --engine vllm: vLLM is not installed (pip install -e '.[vllm]'"),
        (["--model", "no-such-model"], "stage 02-generate: model no-such-model not found"),
        (["--set", "generate.device=cuda"], "stage 02-generate: --device cuda: this machine has no CUDA device"),
        (["--set", "generate.engine=tpu"], "stage 02-generate: --engine 'tpu': expected one of hf, vllm, auto"),
    ],
    ids=["vllm-not-installed", "missing-model", "no-gpu", "unknown-engine"],
)
def test_a_run_that_fails_its_checks_leaves_every_record_as_it_was(prmtool, finished_run, tmp_path, options, message):
    before = everything_under(tmp_path / "work")
    result = prmtool("run", finished_run, *options)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "error:" in result.stderr and len(result.stderr.strip().splitlines()) == 1  # no stage line printed
    assert everything_under(tmp_path / "work") == before
    again = prmtool("run", finished_run)  # the finished run is still finished
    assert again.exit_code == 0 and again.stderr.count("] skip ") == 3


def test_a_model_folder_whose_config_does_not_load_is_refused_before_any_stage(prmtool, finished_run, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    before = everything_under(tmp_path / "work")
    result = prmtool("run", finished_run, "--model", broken)
    assert result.exit_code == 2
    assert f"stage 02-generate: model {broken}: its config does not load" in result.stderr
    assert everything_under(tmp_path / "work") == before


def test_dry_run_says_when_the_run_would_fail_its_checks(prmtool, finished_run, tmp_path):
    result = prmtool("run", finished_run, "--engine", "vllm", "--dry-run")
    assert result.exit_code == 0
    assert "note: the run would stop before its first stage: " in result.stderr
    assert "--engine vllm: vLLM is not installed" in result.stderr


def test_finished_stages_still_agree_the_engine_a_dry_run_and_a_partial_rerun_take(
    finished_run, tiny_model_dir, monkeypatch
):
    """Every model stage of the recipe, run or finished, takes part in choosing one engine per
    model: a dry run after a run (every stage skipped) times each stage by the rate of the engine
    it ran on, and a partial rerun runs on the engine the whole recipe ran on."""
    from prmtool.cli.recipe import load_recipe, preflight
    from prmtool.engines import choice

    def by_length(model, *, device, prompt_tokens, vllm_options=None, stage=None):  # as on a GPU with vLLM, at 7B
        long = prompt_tokens is not None and prompt_tokens > 128
        return choice.Choice("vllm" if long else "hf", f"{prompt_tokens} tokens")

    monkeypatch.setattr(choice, "choose_engine", by_length)
    finished_run.write_text(finished_run.read_text() + "  - stage: label\n    k: 1\n    max-tokens: 4\n")
    recipe = load_recipe(finished_run, [], None, None, None)
    agreed = preflight(recipe, None, 3)  # import, generate, verify: all finished, nothing to check
    assert agreed[str(tiny_model_dir)].engine == "vllm"  # label's longer prompts decide for generate too
