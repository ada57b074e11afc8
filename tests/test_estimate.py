"""`prmtool run --dry-run` times each model stage by the latest rate measured here for that
stage, engine, device and model, and says what the rate rests on."""

from __future__ import annotations

import json
import re

import polars as pl

from prmtool.cli import estimate
from prmtool.stages import stage
from tests.conftest import SAMPLES


def estimate_lines(stderr: str) -> dict[str, str]:
    """Each stage's estimate line, by the stage's label (`02-generate`)."""
    lines, label = {}, None
    for line in stderr.splitlines():
        if line.startswith("["):
            label = line[1:].split("]", 1)[0]
        elif line.startswith("    ") and label:
            lines[label] = line.strip()
    return lines


def test_the_estimate_rests_on_the_latest_run_of_the_stage_and_says_so(prmtool, tmp_path, tiny_model_dir):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(json.dumps({"question": f"{i} + 2?", "answer": f"#### {i + 2}"}) + "\n" for i in range(4))
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
    n: 8
    max-tokens: 64
"""
    )
    before = prmtool("run", recipe, "--dry-run", "--workdir", tmp_path / "plan")
    assert "time unknown" in estimate_lines(before.stderr)["02-generate"]

    assert prmtool("run", recipe, "-q").exit_code == 0
    measured = json.loads(estimate.throughput_file().read_text())
    [(key, record)] = measured.items()
    assert key == f"generate|hf|cpu|{tiny_model_dir}"  # --engine auto recorded as the engine it ran
    after = estimate_lines(prmtool("run", recipe, "--dry-run", "--workdir", tmp_path / "plan").stderr)["02-generate"]
    rate = f"{record['tokens_per_second']:,.0f} tokens/s"
    assert re.search(
        rf"at {rate} \(measured here [\d-]+ [\d:]+: generate on hf, cpu, over {record['tokens']:,} tokens in "
        rf"\d+ s, model load included\)$",
        after,
    ), after
    # the bound has every response run to max-tokens; the run says what a row took
    assert record["rows"] == 4
    per_row = record["tokens"] / 4
    likely = min(4 * 8 * 64, round(per_row * 4))
    assert f"likely about {likely:,} ({per_row:,.0f} a row in the latest run here)" in after
    # a plan with other samples or lengths learns nothing of a row from that run: its bound stands
    longer = prmtool("run", recipe, "--dry-run", "--workdir", tmp_path / "plan", "--set", "generate.max-tokens=512")
    other = estimate_lines(longer.stderr)["02-generate"]
    assert "likely about" not in other and f"at most {4 * 8 * 512:,} generated tokens" in other


def test_a_later_run_replaces_the_rate_and_each_stage_keeps_its_own(tmp_path):
    generate = stage("generate").settings(model=None, device="cpu")
    label = stage("label").settings(model=None, device="cpu")
    estimate.record_throughput(generate, tokens=1_000, seconds=100.0)  # a slow early run
    estimate.record_throughput(generate, tokens=18_400, seconds=100.0)  # the latest
    assert estimate.measured_throughput(generate, "generate")["tokens_per_second"] == 184
    # label has no run of its own yet: it rests on generate's, and says so
    assert "no label run measured yet" in estimate.measured_throughput(label, "label")["basis"]
    estimate.record_throughput(label, tokens=1_500, seconds=300.0, stage="label")
    assert estimate.measured_throughput(label, "label")["tokens_per_second"] == 5
    assert estimate.measured_throughput(generate, "generate")["tokens_per_second"] == 184  # not label's


def test_a_rate_of_one_engine_or_device_is_not_used_for_another(tmp_path):
    estimate.record_throughput(stage("generate").settings(engine="hf", device="cpu"), tokens=1_000, seconds=10.0)
    assert estimate.measured_throughput(stage("generate").settings(engine="hf", device="cpu")) is not None
    assert estimate.measured_throughput(stage("generate").settings(engine="vllm", device="cuda")) is None


def test_a_standalone_stage_command_records_its_rate_too(prmtool, tmp_path, tiny_model_dir):
    pl.read_parquet(SAMPLES / "problems" / "*.parquet").head(3).write_parquet(tmp_path / "problems.parquet")
    result = prmtool(
        "generate", tmp_path / "problems.parquet", "-o", tmp_path / "r", "--model", tiny_model_dir,
        "--n", "8", "--max-tokens", "64", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert list(json.loads(estimate.throughput_file().read_text())) == [f"generate|hf|cpu|{tiny_model_dir}"]


def test_a_run_too_short_to_measure_a_rate_is_not_recorded(tmp_path):
    """A few hundred tokens measure the model load, not the engine: such a run keeps the rate
    an earlier, longer run measured."""
    settings = stage("generate").settings(engine="hf", device="cpu")
    estimate.record_throughput(settings, tokens=20_000, seconds=100.0)
    estimate.record_throughput(settings, tokens=8, seconds=8.0)
    assert estimate.measured_throughput(settings)["tokens_per_second"] == 200
