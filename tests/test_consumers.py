"""The exports in the trainers that read them, on CPU with a tiny random-weight model: each
format is loaded, tokenized and trained on for a step, as a user would."""

from __future__ import annotations

import pytest

from tests.conftest import SAMPLES

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
