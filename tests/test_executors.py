"""Executors and partitions: which part of the input a process runs, and how Ray tasks are told."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from prmtool.core.errors import InputError
from prmtool.core.partition import Partition
from prmtool.core.shards import InputShard
from prmtool.executors import partition_to_run
from prmtool.executors.ray import run_partition
from prmtool.stages import stage


def shard(name: str) -> InputShard:
    return InputShard(path=Path("/data") / name, size=1, rows=1, schema=pl.Schema({"problem_id": pl.String}))


def test_partitions_of_shards_are_round_robin_by_name_and_cover_every_shard_once():
    found = [shard(f"part-{i:05d}.parquet") for i in reversed(range(7))]
    parts = [Partition(i, 3).take_shards(found) for i in range(3)]
    assert [[s.name[5:10] for s in part] for part in parts] == [
        ["00000", "00003", "00006"],
        ["00001", "00004"],
        ["00002", "00005"],
    ]
    assert Partition().take_shards(found) == found


def test_partitions_of_problems_keep_each_group_whole_and_are_stable():
    problem_ids = pl.Series("problem_id", [f"p{i % 50}" for i in range(400)])
    masks = [Partition(i, 4).owns_problems(problem_ids) for i in range(4)]
    assert sum(mask.cast(pl.Int32) for mask in masks).to_list() == [1] * 400  # each row in exactly one
    for mask in masks:
        owned = set(problem_ids.filter(mask))
        assert not owned & set(problem_ids.filter(~mask))  # no group straddles
    # crc32, not a seeded hash: the same ids go to the same partition in any process
    assert Partition(1, 4).owns_problems(pl.Series("problem_id", ["p7"])).to_list() == masks[1].to_list()[7:8]


def test_partition_names_and_manifests_carry_the_partition():
    assert Partition(2, 8).manifest_name() == "_SUCCESS-00002-of-00008"
    assert Partition(2, 8).shard_name("part-00000.parquet") == "part-00000.00002-of-00008.parquet"
    assert Partition().manifest_name() == "_SUCCESS" and Partition().shard_name("a.parquet") == "a.parquet"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0, None), "go together"),
        ((None, 4), "go together"),
        ((4, 4), "must be in 0..3"),
        ((-1, 4), "must be in 0..3"),
        ((0, 0), "at least 1"),
    ],
)
def test_a_bad_partition_is_an_input_error(arguments, message):
    with pytest.raises(InputError, match=message):
        Partition.of(*arguments)


def test_ray_options_belong_to_the_ray_executor():
    with pytest.raises(InputError, match="apply to --executor ray"):
        partition_to_run(None, None, "local", gpus_per_task=1)
    with pytest.raises(InputError, match="given only --num-shards|give only --num-shards"):
        partition_to_run(0, 2, "ray")
    with pytest.raises(InputError, match="expected one of local, ray"):
        partition_to_run(None, None, "slurm")
    assert partition_to_run(1, 2) == Partition(1, 2)


def test_a_ray_task_runs_the_users_stage_and_settings_on_its_own_partition(prmtool, tmp_path, monkeypatch):
    """The body of a Ray task, called here without Ray: it runs the stage the user ran, with the
    same settings, on partition i of n, quietly, and answers with the exit code the command line
    would give."""
    responses = tmp_path / "responses"
    sample = Path(__file__).parents[1] / "data_samples/gsm8k/responses.jsonl"
    assert prmtool("import", sample, "--shard-rows", "10", "-o", responses, "-q").exit_code == 0
    settings = stage("verify").settings(workers=1)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # a task moves to the driver's working directory: this one
    second = run_partition("verify", [str(responses)], out, settings, False, 1, 2, str(tmp_path))
    assert (out / "_SUCCESS-00001-of-00002").exists() and not (out / "_SUCCESS").exists()
    first = run_partition("verify", [str(responses)], out, settings, False, 0, 2, str(tmp_path))
    # (exit code, message, rows in, rows out): the driver adds up the rows for its summary
    assert first[:2] == second[:2] == (0, "") and first[2] + second[2] == 48 and first[3] + second[3] == 48
    assert (out / "_SUCCESS").exists()
    code, message = run_partition("verify", [str(tmp_path / "missing")], out, settings, False, 0, 2, str(tmp_path))
    assert code == 2 and "missing" in message


def test_partitions_run_separately_add_up_to_the_whole_run(prmtool, tmp_path):
    """Two processes (or Slurm tasks) each run one partition; the second to finish writes
    _SUCCESS, and the output equals one whole run."""
    responses = tmp_path / "responses"
    assert (
        prmtool(
            "import",
            Path(__file__).parents[1] / "data_samples/gsm8k/responses.jsonl",
            "--shard-rows",
            "10",
            "-o",
            responses,
            "-q",
        ).exit_code
        == 0
    )
    partitioned, whole = tmp_path / "partitioned", tmp_path / "whole"
    assert (
        prmtool(
            "verify", responses, "-o", partitioned, "--workers", "1", "-q", "--shard-index", "1", "--num-shards", "2"
        ).exit_code
        == 0
    )
    assert not (partitioned / "_SUCCESS").exists()
    assert (
        prmtool(
            "verify", responses, "-o", partitioned, "--workers", "1", "-q", "--shard-index", "0", "--num-shards", "2"
        ).exit_code
        == 0
    )
    assert (partitioned / "_SUCCESS").exists()
    assert prmtool("verify", responses, "-o", whole, "--workers", "1", "-q").exit_code == 0
    read = lambda d: pl.read_parquet(d / "*.parquet").sort("response_id")  # noqa: E731
    assert read(partitioned).equals(read(whole))
    # a rerun of a finished partition does nothing
    before = {p.name: p.stat().st_mtime_ns for p in partitioned.glob("*.parquet")}
    assert (
        prmtool(
            "verify", responses, "-o", partitioned, "--workers", "1", "-q", "--shard-index", "0", "--num-shards", "2"
        ).exit_code
        == 0
    )
    assert {p.name: p.stat().st_mtime_ns for p in partitioned.glob("*.parquet")} == before
