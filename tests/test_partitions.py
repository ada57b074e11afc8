"""Scale-out: `--shard-index i --num-shards n` runs partition i of n of any stage, with no
coordination between partitions (a Slurm array, `xargs -P`, or `--executor ray`).

What a user can rely on, for every stage:
- running every partition 0..n-1, in any order, gives exactly the rows of one whole run;
- `_SUCCESS` appears when the last partition finishes, and lists every partition's files;
- `verify` and the other map stages partition by input shard; `filter`, `import` and `export`
  by problem, so a group (`problem_id`) is never split between two partitions;
- a bad `--shard-index`/`--num-shards` is a one-line usage error (exit 2) that writes nothing;
- rerunning a finished partition does nothing.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from prmtool.executors.ray import run_partition
from tests.conftest import SAMPLES, write_shards

# --- data -----------------------------------------------------------------------------------


def scored_responses(problems: int = 12, per_problem: int = 8, seed: int = 0) -> pl.DataFrame:
    """Responses with outcomes and step rewards, as `score` leaves them: some with 1 or 31
    steps (PROF's length penalty), a few with no outcome or no reward."""
    rng = random.Random(seed)
    rows = []
    for p in range(problems):
        for r in range(per_problem):
            steps = rng.choice([1, 3, 4, 5, 6, 31] if r == 0 else [3, 4, 5, 6])
            rows.append({
                "problem_id": f"problem-{p:02d}",
                "problem": f"What is {p} + {p}?",
                "reference_answer": str(2 * p),
                "response_id": f"problem-{p:02d}-response-{r}",
                "response": "\n\n".join(f"step {j}" for j in range(steps)),
                "steps": [f"step {j}" for j in range(steps)],
                "correct": None if rng.random() < 0.05 else rng.random() < 0.6,
                "step_rewards": None if rng.random() < 0.05 else [rng.gauss(0, 1) for _ in range(steps)],
            })  # fmt: skip
    rng.shuffle(rows)  # each problem's responses end up spread over the shards
    return pl.DataFrame(rows, schema_overrides={"correct": pl.Boolean, "step_rewards": pl.List(pl.Float64)})


@pytest.fixture
def scored(tmp_path) -> Path:
    """96 responses to 12 problems in 4 shards of different sizes; problem-00's 8 responses
    are spread over all 4 shards."""
    directory = write_shards(tmp_path / "scored", scored_responses(), [17, 31, 9, 39])
    shard_of_each = [
        pl.read_parquet(f).filter(pl.col("problem_id") == "problem-00").height for f in sorted(directory.iterdir())
    ]
    assert all(shard_of_each), "the data should spread problem-00 over every shard"
    return directory


# --- helpers --------------------------------------------------------------------------------


def shard_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.rglob("*.parquet") if not f.name.startswith((".", "_")))


def rows_of(directory: Path) -> pl.DataFrame:
    """Every row of a shard set, sorted by response_id (empty shards count too)."""
    return pl.concat([pl.read_parquet(f) for f in shard_files(directory)]).sort("response_id")


def canonical_rows(directory: Path) -> list[str]:
    """Rows of a format with no response_id (export), as sorted JSON: compares every column."""
    return sorted(
        json.dumps(row, sort_keys=True) for f in shard_files(directory) for row in pl.read_parquet(f).to_dicts()
    )


def run_every_partition(prmtool, command: list, outputs: list[Path], count: int) -> None:
    """Partitions count-1, ..., 1, 0 one after another (the order does not matter): each
    output's `_SUCCESS` appears only when the last one finishes, and it lists every file."""
    for step, index in enumerate(reversed(range(count))):
        result = prmtool(*command, "--shard-index", index, "--num-shards", count, "-q")
        assert result.exit_code == 0, result.stderr
        last = step == count - 1
        for output in outputs:
            assert (output / f"_SUCCESS-{index:05d}-of-{count:05d}").exists()
            assert (output / "_SUCCESS").exists() == last, f"after partition {index}"
    for output in outputs:
        manifest = json.loads((output / "_SUCCESS").read_text())
        listed = {entry["file"]: entry["rows"] for entry in manifest["outputs"]}
        on_disk = {str(f.relative_to(output)): pl.read_parquet(f).height for f in shard_files(output)}
        assert listed == on_disk
        assert manifest["partitions"] == count


def assert_rerun_is_a_no_op(
    prmtool, command: list, outputs: list[Path], count: int, says: str = "already complete"
) -> None:
    """Partition 0 again: it says so and rewrites no shard."""
    files = [f for output in outputs for f in shard_files(output)]
    before = {f: f.stat().st_mtime_ns for f in files}
    again = prmtool(*command, "--shard-index", 0, "--num-shards", count)
    assert again.exit_code == 0, again.stderr
    assert re.search(says, again.stderr), again.stderr
    assert {f: f.stat().st_mtime_ns for f in files} == before


# --- verify: a map stage, partitioned by input shard ------------------------------------------


@pytest.fixture
def responses(tmp_path) -> Path:
    """16 of the GSM8K sample's responses in 3 shards."""
    sample = pl.read_parquet(SAMPLES / "responses" / "part-00000.parquet").head(16)
    return write_shards(tmp_path / "responses", sample, [6, 5, 5])


def test_verify_partitions_by_input_shard_and_together_equal_the_whole_run(prmtool, tmp_path, responses):
    whole = prmtool("verify", responses, "-o", tmp_path / "whole", "--workers", "1", "-q")
    assert whole.exit_code == 0, whole.stderr
    for count in (2, 3):
        output = tmp_path / f"in-{count}"
        command = ["verify", responses, "-o", output, "--workers", "1"]
        run_every_partition(prmtool, command, [output], count)
        # A map stage writes each input shard's output under the input's name, whichever
        # partition ran it.
        assert [f.name for f in shard_files(output)] == [f.name for f in shard_files(responses)]
        assert_frame_equal(rows_of(output), rows_of(tmp_path / "whole"))
    assert_rerun_is_a_no_op(prmtool, command, [output], 3, says=r"shards skipped\s*│\s*1\b")


# --- filter: partitioned by problem -----------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
def test_filter_partitions_are_whole_problems_and_together_equal_the_whole_run(prmtool, tmp_path, scored, count):
    options = ["--method", "prof", "--value", "step_rewards", "--keep", "5"]
    whole = prmtool("filter", scored, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejected", *options, "-q")
    assert whole.exit_code == 0, whole.stderr

    kept, rejected = tmp_path / f"kept-{count}", tmp_path / f"rejected-{count}"
    command = ["filter", scored, "-o", kept, "--rejects", rejected, *options]
    run_every_partition(prmtool, command, [kept, rejected], count)

    assert_frame_equal(rows_of(kept), rows_of(tmp_path / "kept"))
    assert_frame_equal(rows_of(rejected), rows_of(tmp_path / "rejected"))
    # Each partition writes one kept and one rejected file per input shard, named after it.
    assert [f.name for f in shard_files(kept)] == sorted(
        f"part-{shard:05d}.{index:05d}-of-{count:05d}.parquet" for shard in range(4) for index in range(count)
    )
    # A problem's responses, kept or rejected, all come from one partition.
    problems_of = {
        index: set(pl.concat([pl.read_parquet(f, columns=["problem_id"]) for d in (kept, rejected)
                              for f in d.glob(f"*.{index:05d}-of-{count:05d}.parquet")])["problem_id"])
        for index in range(count)
    }  # fmt: skip
    assert sum(len(ids) for ids in problems_of.values()) == len(set().union(*problems_of.values())) == 12
    assert_rerun_is_a_no_op(prmtool, command, [kept, rejected], count)


def test_filter_report_of_a_partition_covers_its_groups(prmtool, tmp_path, scored):
    """--report with a partition goes to the report's name with the partition in it; the
    partitions' figures add up to the whole run's."""
    common = ["--rejects", tmp_path / "rejected", "--keep", "5", "-q"]
    assert (
        prmtool("filter", scored, "-o", tmp_path / "kept", *common, "--report", tmp_path / "whole.json").exit_code == 0
    )
    common = ["--rejects", tmp_path / "rejected-2", "--keep", "5", "-q"]
    for index in range(2):
        args = ["--report", tmp_path / "prof.json", "--shard-index", index, "--num-shards", 2]
        assert prmtool("filter", scored, "-o", tmp_path / "kept-2", *common, *args).exit_code == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    parts = [json.loads((tmp_path / f"prof.{index:05d}-of-00002.json").read_text()) for index in range(2)]
    assert not (tmp_path / "prof.json").exists()
    for figure in ("rows_in", "kept", "removed", "groups", "groups_kept"):
        assert sum(part[figure] for part in parts) == whole[figure]


# --- import: partitioned by problem, ids as in the whole run -----------------------------------


def test_import_partitions_give_the_whole_runs_rows_and_ids(prmtool, write_jsonl, tmp_path):
    """Ids are given before rows are set aside: a repeated response (same problem, same text)
    gets the same occurrence-based id in a partition as in the whole run."""
    rows_a = [
        {"problem": f"What is {p} + 1?", "reference_answer": str(p + 1), "response": text}
        for p in range(6)
        for text in (f"It is {p + 1}.", f"It is {p + 1}.", f"Maybe {p}.\n\nNo, {p + 1}.")
    ]
    rows_b = [{"problem": "What is 0 + 1?", "reference_answer": "1", "response": "One."}]  # problem 0 again
    rows_b += [
        {"problem": f"What is {p} * 2?", "reference_answer": str(2 * p), "response": f"{2 * p}"} for p in range(4)
    ]
    sources = [write_jsonl(rows_a, "a.jsonl"), write_jsonl(rows_b, "b.jsonl")]
    assert prmtool("import", *sources, "-o", tmp_path / "whole", "--shard-rows", "4", "-q").exit_code == 0

    for count in (2, 3):
        output = tmp_path / f"in-{count}"
        command = ["import", *sources, "-o", output, "--shard-rows", "4"]
        run_every_partition(prmtool, command, [output], count)
        assert_frame_equal(rows_of(output), rows_of(tmp_path / "whole"))
        problems = [
            set(
                pl.read_parquet(output / "*.{index:05d}-of-{count:05d}.parquet".format(index=i, count=count))[
                    "problem_id"
                ]
            )
            for i in range(count)
        ]
        assert sum(map(len, problems)) == len(set().union(*problems)), "a problem in two partitions"
    assert_rerun_is_a_no_op(prmtool, command, [output], count)


# --- export: partitioned by problem, the split and verl's numbering as in the whole run -------


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize(
    "format_options", [["-f", "verl"], ["-f", "sft-messages", "--where", "correct"]], ids=["verl", "sft"]
)
def test_export_partitions_keep_the_whole_runs_split(prmtool, tmp_path, scored, count, format_options):
    options = [*format_options, "--split", "test=0.25", "--seed", "7"]
    assert prmtool("export", scored, "-o", tmp_path / "whole", *options, "-q").exit_code == 0
    output = tmp_path / f"in-{count}"
    command = ["export", scored, "-o", output, *options]
    run_every_partition(prmtool, command, [output], count)
    for split in ("train", "test"):
        assert canonical_rows(output / split) == canonical_rows(tmp_path / "whole" / split)
    assert_rerun_is_a_no_op(prmtool, command, [output], count)


def test_export_hf_dataset_with_partitions_is_refused(prmtool, tmp_path, scored):
    result = prmtool("export", scored, "-o", tmp_path / "out", "-f", "verl", "--hf-dataset", tmp_path / "hf",
                     "--shard-index", "0", "--num-shards", "2")  # fmt: skip
    assert result.exit_code == 2
    assert "--hf-dataset" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()


# --- usage errors ------------------------------------------------------------------------------


STAGES = {
    "verify": lambda data, out: ["verify", data, "-o", out],
    "filter": lambda data, out: ["filter", data, "-o", out, "--rejects", out.with_name("rejected")],
    "import": lambda data, out: ["import", SAMPLES / "responses.jsonl", "-o", out],
    "export": lambda data, out: ["export", data, "-o", out, "-f", "verl"],
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard-index", "2", "--num-shards", "2"], "--shard-index 2: must be in 0..1"),
        (["--shard-index", "-1", "--num-shards", "2"], "--shard-index -1: must be at least 0"),
        (["--num-shards", "0", "--shard-index", "0"], "--num-shards 0: must be at least 1"),
        (["--shard-index", "0"], "give both or neither"),
        (["--num-shards", "2"], "give both or neither"),
        (["--executor", "ray", "--shard-index", "0", "--num-shards", "2"], "--shard-index is chosen by --executor ray"),
        (["--gpus-per-task", "1"], "apply to --executor ray"),
        (["--executor", "slurm"], "--executor 'slurm'"),
    ],
    ids=[
        "index-too-large",
        "index-negative",
        "zero-shards",
        "index-alone",
        "count-alone",
        "index-with-ray",
        "gpus-local",
        "unknown-executor",
    ],
)
def test_bad_partition_options_are_one_line_usage_errors(prmtool, tmp_path, scored, stage, args, message):
    out = tmp_path / "out"
    result = prmtool(*STAGES[stage](scored, out), *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("rejected").exists()


# --- --executor ray -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_executor_ray_runs_the_partitions_as_tasks(prmtool, tmp_path, responses, scored, local_ray):
    """One Ray task per partition on a local cluster: the output is the local whole run's."""
    assert prmtool("verify", responses, "-o", tmp_path / "verified", "--workers", "1", "-q").exit_code == 0
    on_ray = prmtool(
        "verify", responses, "-o", tmp_path / "verified-ray", "--workers", "1", "--executor", "ray", "--num-shards", "2"
    )
    assert on_ray.exit_code == 0, on_ray.stderr
    assert "all 2 partitions done" in on_ray.stderr
    rows = rows_of(tmp_path / "verified").height
    assert f"rows in {rows:,}, rows out {rows:,}" in on_ray.stderr
    assert (tmp_path / "verified-ray" / "_SUCCESS").exists()
    assert_frame_equal(rows_of(tmp_path / "verified-ray"), rows_of(tmp_path / "verified"))

    assert prmtool("filter", scored, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejected", "-q").exit_code == 0
    on_ray = prmtool(
        "filter",
        scored,
        "-o",
        tmp_path / "kept-ray",
        "--rejects",
        tmp_path / "rejected-ray",
        "--executor",
        "ray",
        "--num-shards",
        "2",
    )
    assert on_ray.exit_code == 0, on_ray.stderr
    for part in ("kept", "rejected"):
        assert (tmp_path / f"{part}-ray" / "_SUCCESS").exists()
        assert_frame_equal(rows_of(tmp_path / f"{part}-ray"), rows_of(tmp_path / part))


def die_in_the_second_partition(stage_name, inputs, output, settings, overwrite, index, count, working_directory):
    """The body of a Ray task whose worker dies in partition 1, as when its node is lost."""
    if index == 1:
        os._exit(1)
    return run_partition(stage_name, inputs, output, settings, overwrite, index, count, working_directory)


def test_a_partition_whose_ray_task_dies_is_reported_and_only_it_reruns(
    prmtool, tmp_path, responses, local_ray, monkeypatch
):
    import prmtool.executors.ray as executor

    command = ["verify", responses, "-o", tmp_path / "out", "--workers", "1", "--executor", "ray", "--num-shards", "2"]
    monkeypatch.setattr(executor, "run_partition", die_in_the_second_partition)
    failed = prmtool(*command)
    assert failed.exit_code == 1
    assert "partition 1 of 2 exited 1: its Ray task died" in failed.stderr
    assert "rerun the same command to redo only the failed partitions" in failed.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()  # the output is not complete
    monkeypatch.undo()
    again = prmtool(*command)
    assert again.exit_code == 0, again.stderr
    assert prmtool("verify", responses, "-o", tmp_path / "whole", "--workers", "1", "-q").exit_code == 0
    assert_frame_equal(rows_of(tmp_path / "out"), rows_of(tmp_path / "whole"))
