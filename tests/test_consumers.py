"""The exports in the trainers that read them, on CPU with a tiny random-weight model: each
format is loaded, tokenized and trained on for a step, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES

trl = pytest.importorskip("trl", reason="the consumer tests need trl (in the test extra)")

LABELED = SAMPLES / "labeled"


def sft_trainer(dataset, model_dir, output_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=1000,  # the tiny model's context (1024); the samples fit whole
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir)
    )


def load(directory, tmp_path):
    import datasets

    return datasets.load_dataset(
        "parquet", data_files=str(directory / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf_cache")
    )


@pytest.mark.parametrize("format", ["sft-messages", "sft-prompt-completion", "sft-prompt-completion-chat"])
def test_trl_sft_trainer_trains_on_every_sft_format(prmtool, tmp_path, tiny_model_dir, format):
    out = tmp_path / "sft"
    assert prmtool("export", LABELED, "-o", out, "-f", format, "-q").exit_code == 0
    trainer = sft_trainer(load(out / "train", tmp_path), tiny_model_dir, tmp_path / "run")
    result = trainer.train()
    assert result.training_loss > 0


def test_open_turn_stays_open_in_trl_sft_trainers_tokens(prmtool, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    counts = {}
    for name, extra in [("closed", []), ("open", ["--open-turn"])]:
        out = tmp_path / name
        assert prmtool("export", LABELED, "-o", out, "-f", "sft-messages", *extra, "-q").exit_code == 0
        trainer = sft_trainer(load(out / "train", tmp_path / name), tiny_model_dir, tmp_path / f"run-{name}")
        first = trainer.train_dataset[0]
        counts[name] = first["input_ids"].count(end_of_turn)
    # one end-of-turn per message when closed (user, assistant); the assistant's is gone when open
    assert counts["open"] == counts["closed"] - 1


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The embedded model's own tokenizer (SmolLM2's byte-level BPE), as a trainer would load it."""
    from transformers import AutoTokenizer

    from prmtool.engines.model_files import locate_model

    location = locate_model(None)
    return AutoTokenizer.from_pretrained(location.folder, gguf_file=location.gguf_file)


def test_math_shepherd_reads_as_openrlhf_reads_it_one_placeholder_token_per_labeled_step(
    prmtool, tmp_path, smollm2_tokenizer
):
    """OpenRLHF's PRM dataset (`--input_key input --label_key value --placeholder_token TAG
    --reward_tokens + -`) tokenizes `input`, finds the placeholder token's positions and puts the
    i-th `value` there; it needs the tag to be one token. SmolLM2 splits the default ` ки` in
    two, so this export picks ` §`, which it keeps whole."""
    import polars as pl

    assert len(smollm2_tokenizer.encode(" ки", add_special_tokens=False)) == 2  # why --step-tag exists
    out = tmp_path / "ms"
    assert prmtool("export", LABELED, "-o", out, "-f", "math-shepherd", "--step-tag", "§", "-q").exit_code == 0
    rows = load(out / "train", tmp_path)
    (placeholder,) = smollm2_tokenizer.encode(" §", add_special_tokens=False)
    reward_ids = {sign: smollm2_tokenizer.encode(sign, add_special_tokens=False) for sign in "+-"}
    assert all(len(ids) == 1 for ids in reward_ids.values())
    exported = pl.read_parquet(out / "train" / "*.parquet")
    assert exported.columns == ["input", "label", "value", "task"]
    for row in rows:
        ids = smollm2_tokenizer(row["input"], add_special_tokens=False)["input_ids"]
        positions = [i for i, token in enumerate(ids) if token == placeholder]
        assert len(positions) == len(row["value"]) > 0
        assert set(row["value"]) <= {"+", "-"}


def test_math_shepherd_converts_back_to_trl_stepwise_rows_as_trls_old_script_did(prmtool, tmp_path):
    """TRL's Math-Shepherd conversion script turned each row into prompt, completions (the
    steps) and labels by cutting `input` at the tag and reading `+`/`-` from `label` at the same
    places; done here on the export, it gives back trl-stepwise's own rows."""
    import polars as pl

    tag = "ки"
    ms, stepwise = tmp_path / "ms", tmp_path / "stepwise"
    assert prmtool("export", LABELED, "-o", ms, "-f", "math-shepherd", "-q").exit_code == 0
    assert prmtool("export", LABELED, "-o", stepwise, "-f", "trl-stepwise", "-q").exit_code == 0
    converted = []
    for row in pl.read_parquet(ms / "train" / "*.parquet").iter_rows(named=True):
        pieces = row["input"].split(f" {tag}")[:-1]  # each step ends with its tag
        label = row["label"]
        labels, cursor = [], 0
        for piece in pieces:
            cursor += len(piece)
            labels.append(label[cursor + 1] == "+")  # the sign stands where the tag stood
            cursor += 2
        converted.append((pieces, labels))
    trl_rows = pl.read_parquet(stepwise / "train" / "*.parquet")
    assert len(converted) == trl_rows.height
    for (pieces, labels), prompt, completions, expected in zip(
        converted, trl_rows["prompt"].to_list(), trl_rows["completions"].to_list(), trl_rows["labels"].to_list()
    ):
        steps = [pieces[0].removeprefix(prompt + " ")] + [p.removeprefix("\n") for p in pieces[1:]]
        assert steps == completions and labels == expected


CONSUMERS = ROOT / ".consumers"


@pytest.fixture(scope="session")
def consumers() -> Path:
    """TRL 1.13.0 and verl 0.9.1, each in its own folder (tests/consumers/install.sh; pip, once)."""
    result = subprocess.run(["bash", str(ROOT / "tests/consumers/install.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"tests/consumers/install.sh failed (it needs pip to reach an index):\n{result.stderr[-2000:]}")
    return CONSUMERS


def run_consumer(script: str, site: Path, *args) -> dict:
    """A consumer script in its own process, with its consumer's folder first on the path."""
    environment = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "TRL_EXPERIMENTAL_SILENCE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/consumers" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, f"{script}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_trl_1_13_prm_trainer_trains_on_trl_stepwise(prmtool, tmp_path, tiny_model_dir, consumers):
    """PRMTrainer (trl.experimental.prm in TRL 1.13.0, gone from 1.14 on) tokenizes each row's
    steps with its separator and labels one token per step, then trains."""
    out = tmp_path / "prm"
    assert prmtool("export", LABELED, "-o", out, "-f", "trl-stepwise", "-q").exit_code == 0
    report = run_consumer("trl_prm_trainer.py", consumers / "trl-1.13.0", out, tiny_model_dir, tmp_path / "run")
    assert report["rows"] > 0 and report["loss"] > 0
    assert report["labeled_tokens_of_first_row"] == report["steps_of_first_row"]


def test_verl_reads_the_export_as_its_trainer_does_and_both_rewards_accept_boxed_answers(
    prmtool, tmp_path, tiny_model_dir, consumers
):
    """verl 0.9.1's RLHFDataset loads OUT/train.parquet (a file: verl's data.train_files), the
    prompt renders through the chat template, and a right `\\boxed{}` answer scores 1.0, a wrong
    one 0.0, both by verl's routing of the default data_source and by prmtool's reward loaded
    as `reward.custom_reward_function.path/name`."""
    import polars as pl

    out = tmp_path / "verl"
    assert prmtool("export", LABELED, "-o", out, "-f", "verl", "--holdout", "test=0.3", "-q").exit_code == 0
    for split in ("train", "test"):  # one file per split, holding the split folder's rows
        assert pl.read_parquet(out / f"{split}.parquet").equals(pl.read_parquet(out / split / "*.parquet"))
    report = run_consumer("verl_rows.py", consumers / "verl-0.9.1", out, tiny_model_dir, tmp_path / "run")
    first = pl.read_parquet(out / "train.parquet").row(0, named=True)
    assert report["rows"] == pl.read_parquet(out / "train.parquet").height
    assert report["data_source"] == "lighteval/MATH"
    assert report["prompt"].startswith("<|im_start|>user\n" + first["prompt"][0]["content"])
    assert report["prompt"].endswith("<|im_start|>assistant\n")
    assert report["ground_truth"] == first["reward_model"]["ground_truth"]
    assert report["extra_info"] == {"split": "train", "index": 0, "problem_id": first["extra_info"]["problem_id"]}
    assert report["builtin_reward"] == [1.0, 0.0]
    assert report["prmtool_reward"] == [1.0, 0.0]


def test_train_puts_its_hard_labels_on_the_tokens_trl_1_13s_prm_trainer_labels(
    prmtool, tmp_path, tiny_model_dir, consumers
):
    """`prmtool train` builds its sequences with score's own `classifier_inputs`; on the same
    rows, TRL 1.13's PRMTrainer (its `tokenize_row`, from a trl-stepwise export) gives the same
    token ids, labels the same positions, and with the same labels."""
    import polars as pl
    from transformers import AutoTokenizer

    from prmtool.methods.training import build_examples

    out = tmp_path / "prm"
    assert prmtool("export", LABELED, "-o", out, "-f", "trl-stepwise", "-q").exit_code == 0
    report = run_consumer("trl_prm_labels.py", consumers / "trl-1.13.0", out, tiny_model_dir)
    examples, _ = build_examples(
        pl.read_parquet(LABELED / "*.parquet"),
        AutoTokenizer.from_pretrained(tiny_model_dir),
        target="label",
        scope="all",
        separator=report["separator"],
        max_length=100_000,
    )
    ours = {tuple(e.input_ids): (e.positions, [int(t) for t in e.targets]) for e in examples}
    theirs = {tuple(row["input_ids"]): (row["positions"], row["labels"]) for row in report["rows"]}
    assert len(theirs) == len(report["rows"]) == len(examples) > 0
    assert ours == theirs
    assert {0, 1} <= {label for _, labels in theirs.values() for label in labels}  # good and bad steps both


def test_math_shepherd_soft_reads_as_openrlhf_soft_labels_one_value_per_placeholder(
    prmtool, tmp_path, smollm2_tokenizer
):
    """OpenRLHF's PRM dataset in its soft-label mode: `value` is a list of floats, put at the
    placeholder tokens of `input` in order; each is the step's step_mc."""
    import polars as pl

    labeled = tmp_path / "labeled"
    labeled.mkdir()
    frame = pl.read_parquet(LABELED / "*.parquet")
    step_mc = [[None if label is None else (0.75 if label else 0.0) for label in row] for row in frame["step_labels"]]
    frame.with_columns(step_mc=pl.Series(step_mc, dtype=pl.List(pl.Float64))).write_parquet(labeled / "part.parquet")
    out = tmp_path / "soft"
    result = prmtool("export", labeled, "-o", out, "-f", "math-shepherd-soft", "--step-tag", "§", "-q")
    assert result.exit_code == 0, result.stderr
    (placeholder,) = smollm2_tokenizer.encode(" §", add_special_tokens=False)
    rows = load(out / "train", tmp_path)
    assert len(rows) == frame.height
    for row, expected in zip(rows, step_mc):
        ids = smollm2_tokenizer(row["input"], add_special_tokens=False)["input_ids"]
        positions = [i for i, token in enumerate(ids) if token == placeholder]
        assert len(positions) == len(row["value"]) > 0
        assert row["value"] == [v for v in expected if v is not None]  # the prefix up to the first unlabelled step
        assert all(isinstance(v, float) for v in row["value"])


def test_qwen_prm_puts_one_extra_0_token_per_labelled_step_through_the_chat_template(
    prmtool, tmp_path, smollm2_tokenizer
):
    """Qwen2.5-Math-PRM's usage: apply the chat template to the messages and read each step's
    reward at the `<extra_0>` tokens (a special token of Qwen's tokenizer; added here, as a
    trainer of another base adds it)."""
    import copy

    import polars as pl

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    separator = tokenizer.convert_tokens_to_ids("<extra_0>")
    out = tmp_path / "qwen"
    assert prmtool("export", LABELED, "-o", out, "-f", "qwen-prm", "-q").exit_code == 0
    rows = load(out / "train", tmp_path)
    stepwise = pl.read_parquet(LABELED / "*.parquet")
    assert len(rows) == stepwise.height
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.count(separator) == len(row["labels"]) > 0
        assert row["messages"][2]["content"].endswith("<extra_0>")
