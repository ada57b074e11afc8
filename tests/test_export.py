"""`prmtool export`: training-ready datasets that TRL, Math-Shepherd-style PRM training and verl
load as they are. Each output is checked the way a trainer reads it: through `datasets`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import polars as pl
import pytest
from datasets import Features, List, Value

from prmtool.methods.formats import FORMATS
from tests.conftest import SAMPLES, files_under

LABELED = SAMPLES / "labeled"
RESPONSES = SAMPLES / "responses"
PROBLEMS = SAMPLES / "problems"

MESSAGES = List({"role": Value("string"), "content": Value("string")})


def load(directory: Path, tmp_path: Path) -> datasets.Dataset:
    """An exported split as a trainer reads it."""
    return datasets.load_dataset(
        "parquet", data_files=str(directory / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf_cache")
    )


def summary_count(stderr: str, label: str) -> int:
    match = re.search(rf"{label}\s*│\s*([\d,]+)", stderr)
    assert match, f"no '{label}' in the summary:\n{stderr}"
    return int(match.group(1).replace(",", ""))


def labeled_jsonl() -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / "labeled.jsonl").read_text().splitlines()]


# --- the formats ----------------------------------------------------------------------------


def test_trl_stepwise_is_prompt_completions_and_bool_labels(prmtool, tmp_path):
    result = prmtool("export", LABELED, "-o", tmp_path / "out", "--format", "trl-stepwise")
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "out") == ["_SUCCESS", "train/part-00000.parquet"]

    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.features == Features(
        {"prompt": Value("string"), "completions": List(Value("string")), "labels": List(Value("bool"))}
    )
    assert dataset.num_rows == 24
    first = dataset[0]
    assert first["prompt"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert first["completions"] == [
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer’s market.",
        "The answer is $\\boxed{18}$.",
    ]
    assert first["labels"] == [True, True, True]


def test_trl_stepwise_keeps_the_labeled_prefix_of_each_response(prmtool, tmp_path):
    """A wrong response is labeled up to its first bad step; the steps after it are
    unlabeled, so the exported example stops at the bad step."""
    assert prmtool("export", LABELED, "-o", tmp_path / "out", "-f", "trl-stepwise").exit_code == 0
    dataset = load(tmp_path / "out" / "train", tmp_path)
    for row, source in zip(dataset, labeled_jsonl()):
        labeled = [label for label in source["step_labels"] if label is not None]
        assert row["labels"] == [bool(label) for label in labeled]
        assert row["completions"] == source["steps"][: len(labeled)]
        if source["first_error"] >= 0:
            assert row["labels"][-1] is False and len(row["labels"]) == source["first_error"] + 1


def test_trl_stepwise_skips_unlabeled_rows_and_truncates_at_the_first_unlabeled_step(prmtool, tmp_path):
    rows = pl.DataFrame(
        {
            "problem_id": ["p1", "p1", "p2", "p2"],
            "problem": ["One?", "One?", "Two?", "Two?"],
            "response_id": ["a", "b", "c", "d"],
            "steps": [["s1", "s2", "s3"], ["t1", "t2", "t3"], ["u1", "u2"], ["v1", "v2"]],
            "step_labels": [[1, 1, 1], [1, 0, None], None, [None, 1]],
        },
        schema_overrides={"step_labels": pl.List(pl.Int8)},
    )
    (tmp_path / "labeled").mkdir()
    rows.write_parquet(tmp_path / "labeled" / "part-00000.parquet")

    result = prmtool("export", tmp_path / "labeled", "-o", tmp_path / "out", "-f", "trl-stepwise")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.to_list() == [
        {"prompt": "One?", "completions": ["s1", "s2", "s3"], "labels": [True, True, True]},
        {"prompt": "One?", "completions": ["t1", "t2"], "labels": [True, False]},
    ]
    assert summary_count(result.stderr, "skipped unlabeled") == 2
    assert summary_count(result.stderr, "truncated at unlabeled step") == 1
    assert summary_count(result.stderr, "rows out") == 2


def test_math_shepherd_tags_each_step_and_labels_it_plus_or_minus(prmtool, tmp_path):
    result = prmtool("export", LABELED, "-o", tmp_path / "out", "-f", "math-shepherd")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.features == Features(
        {"input": Value("string"), "label": Value("string"), "value": List(Value("string")), "task": Value("string")}
    )
    assert dataset.num_rows == 24

    for row, source in zip(dataset, labeled_jsonl()):
        labels = [label for label in source["step_labels"] if label is not None]
        assert row["input"].startswith(source["problem"] + " ")
        assert row["input"].count("ки") == len(labels)
        # Each tag in `input` stands where `label` has that step's + or -.
        signs = iter("+" if label else "-" for label in labels)
        assert re.sub("ки", lambda _: next(signs), row["input"]) == row["label"]
        steps = row["input"].removeprefix(source["problem"] + " ").split(" ки\n")
        assert [s.removesuffix(" ки") for s in steps] == source["steps"][: len(labels)]

    wrong, source = dataset[1], labeled_jsonl()[1]
    assert source["response_id"].endswith("-wrong")
    assert wrong["label"].endswith(" -") and wrong["label"].count(" +") == source["first_error"]


def test_sft_messages_is_user_then_assistant_turns(prmtool, tmp_path):
    result = prmtool("export", RESPONSES, "-o", tmp_path / "out", "-f", "sft-messages")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.features == Features({"messages": MESSAGES})
    source = pl.read_parquet(RESPONSES / "part-00000.parquet")
    assert dataset.num_rows == source.height == 48
    assert dataset[0]["messages"] == [
        {"role": "user", "content": source["problem"][0]},
        {"role": "assistant", "content": source["response"][0]},
    ]


def test_sft_messages_with_system_prompt_and_prompt_template(prmtool, tmp_path):
    result = prmtool(
        "export", RESPONSES, "-o", tmp_path / "out", "-f", "sft-messages",
        "--system-prompt", "You are a careful solver.",
        "--prompt-template", "Solve step by step.\n\n{problem}",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    source = pl.read_parquet(RESPONSES / "part-00000.parquet")
    messages = load(tmp_path / "out" / "train", tmp_path)[5]["messages"]
    assert messages == [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "Solve step by step.\n\n" + source["problem"][5]},
        {"role": "assistant", "content": source["response"][5]},
    ]


def test_sft_prompt_completion_is_two_strings(prmtool, tmp_path):
    result = prmtool("export", RESPONSES, "-o", tmp_path / "out", "-f", "sft-prompt-completion")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.features == Features({"prompt": Value("string"), "completion": Value("string")})
    source = pl.read_parquet(RESPONSES / "part-00000.parquet")
    assert dataset["prompt"] == [p + "\n\n" for p in source["problem"]]  # TRL joins the two as they are
    assert dataset["completion"] == source["response"].to_list()


def test_verl_rl_parquet_has_rule_reward_and_extra_info(prmtool, tmp_path):
    result = prmtool("export", PROBLEMS, "-o", tmp_path / "out", "-f", "verl", "--data-source", "openai/gsm8k")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.features == Features(
        {
            "data_source": Value("string"),
            "prompt": MESSAGES,
            "ability": Value("string"),
            "reward_model": {"style": Value("string"), "ground_truth": Value("string")},
            "extra_info": {"split": Value("string"), "index": Value("int64"), "problem_id": Value("string")},
        }
    )
    problems = pl.read_parquet(PROBLEMS / "part-00000.parquet")
    assert dataset.num_rows == problems.height == 40
    assert dataset[0] == {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": problems["problem"][0]}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "18"},
        "extra_info": {"split": "train", "index": 0, "problem_id": problems["problem_id"][0]},
    }
    assert [row["ground_truth"] for row in dataset["reward_model"]] == problems["reference_answer"].to_list()
    assert [info["index"] for info in dataset["extra_info"]] == list(range(40))


def test_verl_keeps_one_row_per_problem_even_across_shards(prmtool, tmp_path):
    """RL trains on prompts: the 4 responses to each problem become one verl row. Problem 5's
    responses are spread over two shards and still give one row."""
    responses = pl.read_parquet(RESPONSES / "part-00000.parquet")
    (tmp_path / "responses").mkdir()
    responses.slice(0, 22).write_parquet(tmp_path / "responses" / "a.parquet")
    responses.slice(22).write_parquet(tmp_path / "responses" / "b.parquet")

    result = prmtool("export", tmp_path / "responses", "-o", tmp_path / "out", "-f", "verl")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    ids = [info["problem_id"] for info in dataset["extra_info"]]
    assert ids == responses["problem_id"].unique(maintain_order=True).to_list()
    assert len(ids) == 12
    assert [info["index"] for info in dataset["extra_info"]] == list(range(12)), "numbered on across shards"
    assert summary_count(result.stderr, "merged responses of one problem") == 36


def test_unknown_format_is_refused(prmtool, tmp_path):
    result = prmtool("export", RESPONSES, "-o", tmp_path / "out", "-f", "alpaca")
    assert result.exit_code == 2
    assert "--format 'alpaca'" in result.stderr and "trl-stepwise" in result.stderr
    assert not (tmp_path / "out").exists()


def test_stepwise_format_on_unlabeled_responses_names_the_missing_column(prmtool, tmp_path):
    result = prmtool("export", RESPONSES, "-o", tmp_path / "out", "-f", "trl-stepwise")
    assert result.exit_code == 2
    assert "missing required column 'step_labels'" in result.stderr
    assert str(RESPONSES / "part-00000.parquet") in result.stderr
    assert not (tmp_path / "out").exists()


# --- filtering ------------------------------------------------------------------------------


def test_where_correct_after_verify_keeps_only_correct_responses(prmtool, tmp_path):
    verified = tmp_path / "verified"
    assert prmtool("verify", RESPONSES, "-o", verified, "--workers", "1", "--quiet").exit_code == 0
    rows = pl.read_parquet(verified / "part-00000.parquet")

    result = prmtool("export", verified, "-o", tmp_path / "sft", "-f", "sft-prompt-completion", "--where", "correct")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "sft" / "train", tmp_path)
    correct = rows.filter(pl.col("correct"))
    assert correct.height == 24, "the boxed and the #### response of each of 12 problems"
    assert dataset["completion"] == correct["response"].to_list()
    assert summary_count(result.stderr, "removed by where") == 24


def test_where_takes_any_sql_condition(prmtool, tmp_path):
    result = prmtool(
        "export",
        LABELED,
        "-o",
        tmp_path / "out",
        "-f",
        "trl-stepwise",
        "--where",
        "first_error = -1 AND problem LIKE 'Janet%'",
    )
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.num_rows == 1
    assert dataset[0]["labels"] == [True, True, True]


@pytest.mark.parametrize(
    "expression, named",
    [("correct AND", "correct AND"), ("no_such_column > 1", "no_such_column")],
    ids=["bad-expression", "unknown-column"],
)
def test_where_that_cannot_be_applied_is_an_error_naming_it(prmtool, tmp_path, expression, named):
    result = prmtool("export", LABELED, "-o", tmp_path / "out", "-f", "trl-stepwise", "--where", expression)
    assert result.exit_code == 2
    assert "--where" in result.stderr and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_where_naming_a_column_only_some_shards_have_writes_nothing(prmtool, tmp_path):
    """Every input is checked before the first output file is written."""
    labeled = pl.read_parquet(LABELED / "part-00000.parquet")
    (tmp_path / "mixed").mkdir()
    labeled.head(12).write_parquet(tmp_path / "mixed" / "a.parquet")
    labeled.tail(12).drop("first_error").write_parquet(tmp_path / "mixed" / "b.parquet")

    result = prmtool(
        "export", tmp_path / "mixed", "-o", tmp_path / "out", "-f", "trl-stepwise", "--where", "first_error = -1"
    )
    assert result.exit_code == 2
    assert "b.parquet" in result.stderr and "first_error" in result.stderr
    assert files_under(tmp_path / "out") == []


# --- splits ---------------------------------------------------------------------------------


def split_prompts(out: Path, tmp_path: Path) -> dict[str, set[str]]:
    return {split: set(load(out / split, tmp_path)["prompt"]) for split in ("train", "test")}


def test_split_holds_out_whole_problems(prmtool, tmp_path):
    result = prmtool(
        "export", LABELED, "-o", tmp_path / "out", "-f", "trl-stepwise", "--split", "test=0.25", "--seed", "0"
    )
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "out") == ["_SUCCESS", "test/part-00000.parquet", "train/part-00000.parquet"]

    prompts = split_prompts(tmp_path / "out", tmp_path)
    held_out = len(prompts["test"])
    assert held_out and len(prompts["train"]) == 12 - held_out, "every problem on one side (a quarter in expectation)"
    assert prompts["train"].isdisjoint(prompts["test"])
    rows = 2 * held_out  # both responses of each held-out problem
    assert load(tmp_path / "out" / "test", tmp_path).num_rows == rows
    assert summary_count(result.stderr, "rows test") == rows
    assert summary_count(result.stderr, "rows train") == 24 - rows


def test_a_problems_split_does_not_depend_on_the_other_problems(prmtool, tmp_path):
    """Exports of overlapping subsets (two stages of one run that kept different problems) put
    every shared problem on the same side."""
    rows = pl.read_parquet(LABELED / "*.parquet")
    dropped = sorted(set(rows["problem_id"]))[:3]
    subset = tmp_path / "subset"
    subset.mkdir()
    rows.filter(~pl.col("problem_id").is_in(dropped)).write_parquet(subset / "part-00000.parquet")
    for name, source in [("all", LABELED), ("part", subset)]:
        args = ("export", source, "-o", tmp_path / name, "-f", "trl-stepwise", "--split", "test=0.5", "--seed", "0")
        assert prmtool(*args).exit_code == 0
    whole, part = split_prompts(tmp_path / "all", tmp_path), split_prompts(tmp_path / "part", tmp_path)
    assert part["test"] <= whole["test"] and part["train"] <= whole["train"]
    assert part["test"] and part["train"]


def test_split_is_deterministic_for_a_seed_and_changes_with_it(prmtool, tmp_path):
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        args = ("export", LABELED, "-o", tmp_path / name, "-f", "trl-stepwise", "--split", "test=0.25", "--seed", seed)
        assert prmtool(*args).exit_code == 0
    a, b, c = (split_prompts(tmp_path / name, tmp_path) for name in "abc")
    assert a == b
    assert a["test"] != c["test"]


def test_split_with_several_held_out_sets(prmtool, tmp_path):
    result = prmtool("export", PROBLEMS, "-o", tmp_path / "out", "-f", "verl", "--split", "test=0.25,valid=0.25")
    assert result.exit_code == 0, result.stderr
    sizes = {split: load(tmp_path / "out" / split, tmp_path).num_rows for split in ("train", "test", "valid")}
    assert sum(sizes.values()) == 40 and all(5 <= sizes[s] <= 15 for s in ("test", "valid")), sizes


@pytest.mark.parametrize("spec", ["test", "test=1.5", "train=0.1", "test=0.6,valid=0.6"])
def test_bad_split_is_refused(prmtool, tmp_path, spec):
    result = prmtool("export", PROBLEMS, "-o", tmp_path / "out", "-f", "verl", "--split", spec)
    assert result.exit_code == 2
    assert f"--holdout {spec!r}" in result.stderr  # --split is the old spelling of --holdout
    assert not (tmp_path / "out").exists()


def test_verl_numbers_extra_info_index_within_each_split(prmtool, tmp_path):
    """Two shards, two splits: each split's index runs 0, 1, 2, ... over all its rows."""
    assert (
        prmtool(
            "import",
            SAMPLES / "test_sample.jsonl",
            "--preset",
            "gsm8k",
            "--shard-rows",
            "20",
            "-o",
            tmp_path / "problems",
            "-q",
        ).exit_code
        == 0
    )
    result = prmtool(
        "export", tmp_path / "problems", "-o", tmp_path / "out", "-f", "verl", "--split", "test=0.25", "--seed", "3"
    )
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "out") == [
        "_SUCCESS",
        "test.parquet",  # one file per split, for verl's data.train_files / data.val_files
        "test/part-00000.parquet",
        "test/part-00001.parquet",
        "train.parquet",
        "train/part-00000.parquet",
        "train/part-00001.parquet",
    ]
    seen = set()
    for split in ("train", "test"):
        infos = load(tmp_path / "out" / split, tmp_path)["extra_info"]
        assert [info["index"] for info in infos] == list(range(len(infos)))
        assert pl.read_parquet(tmp_path / "out" / f"{split}.parquet")["extra_info"].to_list() == infos
        assert {info["split"] for info in infos} == {split}
        ids = {info["problem_id"] for info in infos}
        assert ids.isdisjoint(seen)
        seen |= ids
    assert len(seen) == 40


def test_hf_dataset_saves_a_dataset_dict_with_the_splits(prmtool, tmp_path):
    result = prmtool(
        "export",
        PROBLEMS,
        "-o",
        tmp_path / "out",
        "-f",
        "verl",
        "--split",
        "test=0.25",
        "--hf-dataset",
        tmp_path / "hf",
    )
    assert result.exit_code == 0, result.stderr
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(loaded, datasets.DatasetDict)
    assert sorted(loaded) == ["test", "train"]
    written = {name: load(tmp_path / "out" / name, tmp_path).num_rows for name in ("train", "test")}
    assert {name: loaded[name].num_rows for name in loaded} == written and sum(written.values()) == 40
    assert loaded["test"].to_list() == load(tmp_path / "out" / "test", tmp_path).to_list()
    assert loaded["train"].features == load(tmp_path / "out" / "train", tmp_path).features


def test_hf_dataset_that_exists_needs_overwrite(prmtool, tmp_path):
    (tmp_path / "hf").mkdir()
    result = prmtool("export", PROBLEMS, "-o", tmp_path / "out", "-f", "verl", "--hf-dataset", tmp_path / "hf")
    assert result.exit_code == 2
    assert str(tmp_path / "hf") in result.stderr and "--overwrite" in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_rerun_is_a_no_op_and_other_options_need_overwrite(prmtool, tmp_path):
    out = tmp_path / "out"
    assert prmtool("export", PROBLEMS, "-o", out, "-f", "verl", "-q").exit_code == 0
    again = prmtool("export", PROBLEMS, "-o", out, "-f", "verl")
    assert again.exit_code == 0 and "already complete" in again.stderr

    refused = prmtool("export", PROBLEMS, "-o", out, "-f", "verl", "--data-source", "gsm8k")
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    assert (
        prmtool("export", PROBLEMS, "-o", out, "-f", "verl", "--data-source", "gsm8k", "--overwrite", "-q").exit_code
        == 0
    )
    assert set(load(out / "train", tmp_path)["data_source"]) == {"gsm8k"}


def test_quiet_export_with_hf_dataset_prints_nothing(prmtool, tmp_path):
    result = prmtool(
        "export", PROBLEMS, "-o", tmp_path / "out", "-f", "verl", "--hf-dataset", tmp_path / "hf", "--quiet"
    )
    assert result.exit_code == 0
    assert (result.stdout, result.stderr) == ("", "")
    assert (tmp_path / "hf" / "dataset_dict.json").exists()


# --- interventions --------------------------------------------------------------------------


@pytest.fixture
def interventions(tmp_path) -> Path:
    """Rows as `prmtool intervene` writes them: the wrong response, and the guided response
    (the steps before its first error plus the intervention). One row has none."""
    source = pl.read_parquet(LABELED / "part-00000.parquet").filter(pl.col("first_error") >= 0).head(3)
    guided = [
        "\n\n".join(steps[:first_error] + ["Let me recompute this step carefully."])
        for steps, first_error in zip(source["steps"].to_list(), source["first_error"])
    ]
    rows = source.with_columns(guided_response=pl.Series([guided[0], guided[1], None], dtype=pl.String))
    (tmp_path / "interventions").mkdir()
    rows.write_parquet(tmp_path / "interventions" / "part-00000.parquet")
    return tmp_path / "interventions"


def test_sft_takes_the_guided_response_as_the_assistant_turn(prmtool, tmp_path, interventions):
    rows = pl.read_parquet(interventions / "part-00000.parquet")
    result = prmtool("export", interventions, "-o", tmp_path / "out", "-f", "sft-messages")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    assert dataset.features == Features({"messages": MESSAGES}), "closed turns: the plain format"
    assistant = [messages[-1]["content"] for messages in dataset["messages"]]
    assert assistant == [rows["guided_response"][0], rows["guided_response"][1], rows["response"][2]]
    assert assistant[0].endswith("Let me recompute this step carefully.") and "\\boxed" not in assistant[0]
    assert summary_count(result.stderr, "assistant turn from guided response") == 2


@pytest.mark.parametrize(
    "format, columns",
    [
        ("sft-messages", {"messages": MESSAGES}),
        ("sft-prompt-completion", {"prompt": Value("string"), "completion": Value("string")}),
    ],
)
def test_open_turn_marks_the_assistant_turn_to_be_continued(prmtool, tmp_path, interventions, format, columns):
    """InT trains on guided responses with no end-of-turn after them: the model learns the
    corrective step, not to stop there."""
    result = prmtool("export", interventions, "-o", tmp_path / "out", "-f", format, "--open-turn")
    assert result.exit_code == 0, result.stderr
    dataset = load(tmp_path / "out" / "train", tmp_path)
    kwargs = {"continue_final_message": Value("bool")}
    assert dataset.features == Features(
        {**columns, "continue_final_message": Value("bool"), "chat_template_kwargs": kwargs}
    )
    assert dataset["continue_final_message"] == [True] * 3
    # TRL's SFTTrainer passes a row's chat_template_kwargs to the chat template: the turn stays open
    assert dataset["chat_template_kwargs"] == [{"continue_final_message": True}] * 3
    if "messages" in columns:
        from tests.engine_fixtures import build_tokenizer

        tokenizer = build_tokenizer()
        messages = dataset["messages"][0]
        opened = tokenizer.apply_chat_template(messages, tokenize=False, **dataset["chat_template_kwargs"][0])
        closed = tokenizer.apply_chat_template(messages, tokenize=False)
        assert opened.endswith(messages[-1]["content"]) and closed.endswith("<|im_end|>\n")
    completions = dataset["completion"] if "completion" in columns else [m[-1]["content"] for m in dataset["messages"]]
    assert completions[0] == pl.read_parquet(interventions / "part-00000.parquet")["guided_response"][0]


def test_open_turn_is_only_for_the_sft_formats(prmtool, tmp_path):
    result = prmtool("export", LABELED, "-o", tmp_path / "out", "-f", "trl-stepwise", "--open-turn")
    assert result.exit_code == 2
    assert (
        "--open-turn: only for sft-messages, sft-prompt-completion, sft-prompt-completion-chat, not trl-stepwise"
        in result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_an_export_whose_rows_are_all_unlabeled_says_which_column_the_format_reads(prmtool, tmp_path):
    unlabeled = tmp_path / "unlabeled"  # as binary search with hard labels leaves step_mc: null
    unlabeled.mkdir()
    frame = pl.read_parquet(LABELED / "*.parquet").with_columns(step_mc=pl.lit(None, pl.List(pl.Float64)))
    frame.write_parquet(unlabeled / "p.parquet")
    result = prmtool("export", unlabeled, "-o", tmp_path / "soft", "-f", "math-shepherd-soft")
    assert result.exit_code == 0 and "no rows to export" in result.stderr
    assert "reads step_mc" in result.stderr and "label --method mc, or --label soft" in result.stderr
    frame.with_columns(step_labels=pl.col("step_labels").list.eval(pl.lit(None, pl.Int8))).write_parquet(
        unlabeled / "p.parquet"
    )
    result = prmtool("export", unlabeled, "-o", tmp_path / "hard", "-f", "trl-stepwise")
    assert result.exit_code == 0 and "reads step_labels up to the first unlabeled step" in result.stderr


@pytest.mark.parametrize("format", [name for name in FORMATS if name != "jsonl"])  # jsonl: -o - only
def test_an_export_of_no_rows_writes_an_empty_shard_with_the_formats_columns(prmtool, tmp_path, format):
    source = PROBLEMS if format == "verl" else LABELED
    if format == "math-shepherd-soft":  # soft labels: the sample's labels as Monte Carlo values
        source = tmp_path / "with-mc"
        source.mkdir()
        frame = pl.read_parquet(LABELED / "*.parquet")
        frame.with_columns(step_mc=pl.col("step_labels").cast(pl.List(pl.Float64))).write_parquet(source / "p.parquet")
    assert prmtool("export", source, "-o", tmp_path / "full", "-f", format, "-q").exit_code == 0
    result = prmtool("export", source, "-o", tmp_path / "none", "-f", format, "--where", "false", "--split", "test=0.5")
    assert result.exit_code == 0, result.stderr
    assert "no rows to export" in result.stderr
    for split in ("train", "test"):
        empty = pl.read_parquet(tmp_path / "none" / split / "*.parquet")
        assert empty.height == 0
        assert empty.schema == pl.read_parquet(tmp_path / "full" / "train" / "*.parquet").schema


def test_the_prompt_template_shapes_every_formats_prompt(prmtool, tmp_path):
    """A PRM trains on the prompt the policy saw."""
    template = "Solve: {problem}"
    for format, column in [("trl-stepwise", "prompt"), ("math-shepherd", "input"), ("sft-prompt-completion", "prompt")]:
        out = tmp_path / format
        assert prmtool("export", LABELED, "-o", out, "-f", format, "--prompt-template", template, "-q").exit_code == 0
        assert all(text.startswith("Solve: ") for text in pl.read_parquet(out / "train/*.parquet")[column])


def test_a_system_prompt_is_refused_where_a_format_has_no_system_turn(prmtool, tmp_path):
    result = prmtool("export", LABELED, "-o", tmp_path / "out", "-f", "trl-stepwise", "--system-prompt", "Be brief.")
    assert result.exit_code == 2
    assert "--system-prompt: trl-stepwise has no system turn" in result.stderr
    assert not (tmp_path / "out").exists()


def test_prompt_completion_plain_and_conversational(prmtool, tmp_path):
    args = ("--prompt-template", "Q: {problem}", "-q")
    assert prmtool("export", LABELED, "-o", tmp_path / "plain", "-f", "sft-prompt-completion", *args).exit_code == 0
    plain = pl.read_parquet(tmp_path / "plain/train/*.parquet")
    assert all(p.endswith("\n\n") for p in plain["prompt"]), "TRL joins prompt and completion as they are"
    chat_args = ("-f", "sft-prompt-completion-chat", "--system-prompt", "Be brief.", *args)
    assert prmtool("export", LABELED, "-o", tmp_path / "chat", *chat_args).exit_code == 0
    row = pl.read_parquet(tmp_path / "chat/train/*.parquet").row(0, named=True)
    assert [t["role"] for t in row["prompt"]] == ["system", "user"] and row["prompt"][0]["content"] == "Be brief."
    assert [t["role"] for t in row["completion"]] == ["assistant"]
    assert row["completion"][0]["content"] == plain["completion"][0]


def test_math_shepherd_takes_a_step_tag_a_tokenizer_keeps_whole(prmtool, tmp_path):
    out = tmp_path / "out"
    assert prmtool("export", LABELED, "-o", out, "-f", "math-shepherd", "--step-tag", "<step>", "-q").exit_code == 0
    row = pl.read_parquet(out / "train/*.parquet").row(0, named=True)
    steps = row["input"].split("\n")
    assert all(step.endswith(" <step>") for step in steps)
    assert all(line.endswith((" +", " -")) for line in row["label"].split("\n")) and len(steps) > 1
    refused = prmtool("export", LABELED, "-o", tmp_path / "x", "-f", "trl-stepwise", "--step-tag", "<step>")
    assert refused.exit_code == 2 and "--step-tag is for --format math-shepherd" in refused.stderr
