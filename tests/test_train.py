"""`prmtool train`: a PRM fine-tuned on labelled rows, read back by `score --prm`, on CPU with a
tiny random-weight model (tests/engine_fixtures.py) and the labelled GSM8K sample."""

from __future__ import annotations

import json

import polars as pl
import pytest

from prmtool.core.errors import InputError
from prmtool.executors import run_stage
from prmtool.methods.training import build_examples, epoch_batches, pack
from prmtool.stages import stage
from tests.conftest import SAMPLES, write_shards

LABELED = SAMPLES / "labeled"
# Small enough to take seconds on CPU: responses cut at 256 tokens, 512 tokens a step.
FAST = ("--device", "cpu", "--max-length", "256", "--batch-tokens", "512", "-q")


def manifest(model_dir):
    return json.loads((model_dir / "_SUCCESS").read_text())


def test_loss_falls_and_the_folder_scores_every_step_with_score_prm(prmtool, tmp_path, tiny_model_dir):
    model_dir = tmp_path / "prm"
    result = prmtool(
        "train",
        LABELED,
        "-o",
        model_dir,
        "--base",
        tiny_model_dir,
        "--max-steps",
        "8",
        "--learning-rate",
        "1e-3",
        *FAST,
    )
    assert result.exit_code == 0, result.stderr
    training = manifest(model_dir)["training"]
    assert training["steps"] == 8 and training["tokens"] > 0
    assert training["last_loss"] < training["first_loss"]
    assert not (model_dir / "checkpoint").exists()  # the finished folder keeps only the model

    scored = tmp_path / "scored"
    result = prmtool("score", LABELED, "-o", scored, "--scorer", "token-classification", "--prm", model_dir, "-q")
    assert result.exit_code == 0, result.stderr
    rows = pl.read_parquet(scored / "*.parquet")
    assert rows["step_rewards"].list.len().to_list() == rows["steps"].list.len().to_list()
    assert rows["step_rewards"].explode().is_between(0, 1).all()


def test_in_a_log_file_progress_comes_as_plain_lines_with_the_running_loss(
    prmtool, tmp_path, tiny_model_dir, monkeypatch
):
    """Where stderr is not a terminal (nohup, make, a Slurm log) there is no bar to update."""
    monkeypatch.setenv("PRMTOOL_PROGRESS_SECONDS", "0.05")
    model_dir = tmp_path / "prm"
    args = [a for a in FAST if a != "-q"]
    result = prmtool("train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--max-steps", "2", *args)
    assert result.exit_code == 0, result.stderr
    assert "train" in result.stderr and "optimizer steps" in result.stderr


def test_two_processes_under_torchrun_share_the_rows_and_rank_0_writes(tmp_path, tiny_model_dir):
    """Several GPUs work as several CPU processes do here (gloo instead of NCCL)."""
    import sys

    from tests.gpu.test_train_on_gpu import prmtool as in_processes  # the command in processes of its own

    model_dir = tmp_path / "prm"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--module")
    args = ("train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--max-steps", "3", *FAST)
    result = in_processes(*args, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifest(model_dir)["training"]["steps"] == 3
    assert not (model_dir / "checkpoint").exists()


def test_a_rerun_is_skipped_and_a_changed_option_needs_overwrite(prmtool, tmp_path, tiny_model_dir):
    model_dir = tmp_path / "prm"
    args = ("train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--max-steps", "1", *FAST)
    assert prmtool(*args).exit_code == 0
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert prmtool(*args).exit_code == 0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    changed = prmtool(*args, "--seed", "1")
    assert changed.exit_code == 2 and "--overwrite" in changed.stderr
    assert prmtool(*args, "--seed", "1", "--overwrite").exit_code == 0
    assert manifest(model_dir)["arguments"]["seed"] == 1


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(
    prmtool, tmp_path, tiny_model_dir, monkeypatch
):
    from safetensors.torch import load_file

    from prmtool.engines.hf import training

    args = ("--base", tiny_model_dir, "--max-steps", "4", "--save-steps", "2", "--learning-rate", "1e-3", *FAST)
    assert prmtool("train", LABELED, "-o", tmp_path / "whole", *args).exit_code == 0

    real_step, calls = training._optimizer_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(training, "_optimizer_step", interrupted)
    assert prmtool("train", LABELED, "-o", tmp_path / "resumed", *args).exit_code == 130
    assert json.loads((tmp_path / "resumed/checkpoint/progress.json").read_text()) == {"step": 2}
    assert not (tmp_path / "resumed/_SUCCESS").exists()
    monkeypatch.setattr(training, "_optimizer_step", real_step)
    assert prmtool("train", LABELED, "-o", tmp_path / "resumed", *args).exit_code == 0
    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert whole.keys() == resumed.keys()
    assert all((whole[k] - resumed[k]).abs().max() < 1e-6 for k in whole)


def test_lora_trains_and_saves_merged_weights_score_loads(prmtool, tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    model_dir = tmp_path / "lora"
    result = prmtool(
        "train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--lora-rank", "4", "--max-steps", "2", *FAST
    )
    assert result.exit_code == 0, result.stderr
    assert not list(model_dir.glob("adapter_*"))  # merged: a plain model folder
    result = prmtool("score", LABELED, "-o", tmp_path / "s", "--scorer", "token-classification", "--prm", model_dir)
    assert result.exit_code == 0, result.stderr


def test_max_steps_0_saves_the_base_with_its_untrained_head(prmtool, tmp_path, tiny_model_dir):
    model_dir = tmp_path / "untrained"
    assert (
        prmtool("train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--max-steps", "0", *FAST).exit_code == 0
    )
    assert manifest(model_dir)["training"]["steps"] == 0
    assert json.loads((model_dir / "config.json").read_text())["id2label"] == {"0": "bad", "1": "good"}


# ---------------------------------------------------------------- what a step is trained towards


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rows() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "problem": ["What is 2 + 3?", "What is 4 * 5?"],
            "steps": [["2 + 3 = 5.", "The answer is 5."], ["Think: 4 * 5.", "4 * 5 = 21.", "The answer is 21."]],
            "step_labels": [[1, 1], [1, 0, None]],
            "step_mc": [[1.0, 0.75], [0.5, 0.0, 0.0]],
            "correct": [True, False],
            "thinking_steps": [0, 1],
        },
        schema_overrides={"step_labels": pl.List(pl.Int8)},
    )


def targets(frame, tokenizer, target="label", scope="all", max_length=1000):
    examples, counts = build_examples(
        frame, tokenizer, target=target, scope=scope, separator="\n", max_length=max_length
    )
    return [e.targets for e in examples], counts


def test_hard_soft_and_outcome_targets(tokenizer):
    assert targets(rows(), tokenizer)[0] == [[1.0, 1.0], [1.0, 0.0]]  # the unlabelled step after the error: none
    assert targets(rows(), tokenizer, "mc")[0] == [[1.0, 0.75], [0.5, 0.0, 0.0]]
    assert targets(rows(), tokenizer, "outcome")[0] == [[1.0, 1.0], [0.0, 0.0, 0.0]]


def test_wrong_responses_whose_labels_rest_on_no_right_rollout_are_left_out_unless_kept(tokenizer):
    """label_right_rollouts 0 on a wrong response: the policy never solved the problem from any
    prefix, so its labels name no error; outcome targets do not rest on rollouts."""
    frame = rows().with_columns(label_right_rollouts=pl.Series([None, 0], dtype=pl.Int32))
    assert targets(frame, tokenizer) == ([[1.0, 1.0]], {"responses_unsolved_skipped": 1, "responses_trained": 1,
                                                        "steps_trained": 2})  # fmt: skip
    assert len(targets(frame, tokenizer, "mc")[0]) == 1
    assert len(targets(frame, tokenizer, "outcome")[0]) == 2
    kept, _ = build_examples(
        frame, tokenizer, target="label", scope="all", separator="\n", max_length=1000, skip_unsolved=False
    )
    assert [e.targets for e in kept] == [[1.0, 1.0], [1.0, 0.0]]
    solved_once = frame.with_columns(label_right_rollouts=pl.Series([None, 1], dtype=pl.Int32))
    assert len(targets(solved_once, tokenizer)[0]) == 2


def test_steps_thinking_and_solution_split_at_thinking_steps(tokenizer):
    assert targets(rows(), tokenizer, "mc", "thinking")[0] == [[0.5]]  # the first row has no thinking
    assert targets(rows(), tokenizer, "mc", "solution")[0] == [[1.0, 0.75], [0.0, 0.0]]
    without = rows().drop("thinking_steps")  # no column: every step is a solution step
    assert targets(without, tokenizer, "mc", "solution")[0] == targets(without, tokenizer, "mc", "all")[0]


def test_sequences_end_at_the_last_target_and_steps_past_max_length_are_counted(tokenizer):
    from prmtool.methods.step_rewards import classifier_inputs

    frame = rows()
    examples, _ = build_examples(frame, tokenizer, target="label", scope="all", separator="\n", max_length=1000)
    ids, positions = classifier_inputs(tokenizer, frame["problem"][1], frame["steps"][1].to_list(), "\n")
    assert examples[1].input_ids == ids[: positions[1] + 1]  # the unlabelled third step is left out
    assert examples[1].positions == positions[:2]
    short, counts = build_examples(frame, tokenizer, target="mc", scope="all", separator="\n", max_length=positions[1])
    assert counts["steps_truncated"] == 2 and counts["responses_truncated"] == 1  # the second row's last two
    assert short[1].positions == positions[:1]


def test_a_target_outside_0_1_names_its_row(tokenizer):
    bad = rows().with_columns(step_mc=pl.Series([[1.0, 1.5], [0.5, 0.0, 0.0]]))
    with pytest.raises(InputError, match=r"source: row 0: step_mc holds a value outside \[0, 1\]"):
        build_examples(bad, tokenizer, target="mc", scope="all", separator="\n", max_length=100, source="source")


def test_packing_fills_rows_without_padding_and_keeps_every_sequence_once():
    lengths = [300, 200, 100, 400, 50, 250]
    batches = pack(lengths, 512, list(range(6)))
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 512 for b in batches)
    assert len(batches) == 3  # 1350 tokens in rows of 512
    assert epoch_batches(lengths, 512, seed=0, epoch=1) == epoch_batches(lengths, 512, seed=0, epoch=1)


def test_a_packed_row_gives_each_sequence_the_logits_it_has_alone(tiny_model_dir):
    """Sequences back to back in one row, their bounds given to the attention (or read from the
    position ids restarting at 0), each see only themselves: the logits they have alone."""
    import torch

    from prmtool.engines.hf.training import collate, load_for_training
    from prmtool.methods.training import Example, TrainingConfig

    model = load_for_training(TrainingConfig(base=str(tiny_model_dir), device="cpu")).eval()
    assert model.config._attn_implementation == "prmtool_varlen"  # no block-diagonal mask
    first, second = torch.randint(0, 300, (1, 30)), torch.randint(0, 300, (1, 20))
    examples = [Example(first[0].tolist(), [29], [1.0]), Example(second[0].tolist(), [4, 19], [0.0, 1.0])]
    batch = collate(examples, [[0, 1]])
    assert batch["cu_seq_lens"].tolist() == [0, 30, 50] and batch["where"].tolist() == [29, 34, 49]
    with torch.no_grad():
        alone = [model(input_ids=s, use_cache=False).logits[0] for s in (first, second)]
        bounds = dict(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"], max_length_q=30,
                      max_length_k=30)  # fmt: skip
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **bounds)
        from_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    for logits in (packed.logits[0], from_positions.logits[0]):
        assert torch.allclose(logits[:30], alone[0], atol=1e-5) and torch.allclose(logits[30:], alone[1], atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_a_missing_target_column_and_partitions_are_usage_errors(prmtool, tmp_path, tiny_model_dir):
    out = tmp_path / "prm"
    result = prmtool("train", LABELED, "-o", out, "--base", tiny_model_dir, "--target", "mc", *FAST)
    assert result.exit_code == 2 and "missing required column 'step_mc'" in result.stderr
    result = prmtool("train", LABELED, "-o", out, "--base", tiny_model_dir, "--shard-index", "0", "--num-shards", "2")
    assert result.exit_code == 2 and "No such option: --shard-index" in result.stderr
    with pytest.raises(InputError, match="reads all its input in one run"):  # the Python API says why
        run_stage(stage("train"), [str(LABELED)], out, stage("train").settings(), num_shards=2)
    result = prmtool("train", LABELED, "-o", out, "--steps", "thinking", *FAST)
    assert result.exit_code == 2 and "thinking_steps" in result.stderr
    assert not out.exists()


def test_rows_that_all_rest_on_no_right_rollout_are_refused_naming_the_input(prmtool, tmp_path, tiny_model_dir):
    labelled = pl.read_parquet(LABELED / "*.parquet").with_columns(
        correct=pl.lit(False), label_right_rollouts=pl.lit(0, dtype=pl.Int32)
    )
    unsolved = write_shards(tmp_path / "unsolved", labelled, [labelled.height])
    out = tmp_path / "prm"
    result = prmtool("train", unsolved, "-o", out, "--base", tiny_model_dir, *FAST)
    assert result.exit_code == 2 and not out.exists()
    [line] = result.stderr.strip().splitlines()
    assert str(unsolved) in line and "--keep-unsolved" in line
    kept = prmtool("train", unsolved, "-o", out, "--base", tiny_model_dir, "--keep-unsolved", "--max-steps", "1", *FAST)
    assert kept.exit_code == 0, kept.stderr


def test_an_output_folder_of_other_files_is_never_replaced(prmtool, tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = prmtool("train", LABELED, "-o", out, "--base", tiny_model_dir, "--overwrite", *FAST)
    assert result.exit_code == 2 and "did not write" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_only_the_files_the_earlier_train_wrote(prmtool, tmp_path, tiny_model_dir):
    """Beside the model: a user's notes, another run's output, a link to a folder elsewhere.
    --overwrite replaces the model and leaves every one of them as it was."""
    model_dir = tmp_path / "prm"
    args = ("train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--max-steps", "1", *FAST)
    assert prmtool(*args).exit_code == 0
    assert {entry["file"] for entry in manifest(model_dir)["also"]} >= {"config.json", "model.safetensors"}
    (model_dir / "notes.txt").write_text("keep me")
    assert prmtool("verify", SAMPLES / "labeled", "-o", model_dir / "verified", "--workers", "1", "-q").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("mine")
    (model_dir / "linkdir").symlink_to(elsewhere)
    result = prmtool(*args, "--seed", "1", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert manifest(model_dir)["arguments"]["seed"] == 1
    assert (model_dir / "notes.txt").read_text() == "keep me" and (elsewhere / "data.txt").read_text() == "mine"
    assert (model_dir / "linkdir").is_symlink()
    assert prmtool("stats", model_dir / "verified").exit_code == 0
    assert "notes.txt" not in {entry["file"] for entry in manifest(model_dir)["also"]}


def test_a_recipe_trains_scores_and_evaluates_and_a_rerun_skips_every_stage(prmtool, tmp_path, tiny_model_dir):
    """train in `prmtool run`, as recipes/train-prm.yaml uses it: the folder it writes is the
    next stage's --prm."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""workdir: {tmp_path / "work"}
input: {LABELED}
stages:
  - stage: train
    base: {tiny_model_dir}
    max-steps: 2
    device: cpu
    max-length: 256
    batch-tokens: 512
  - stage: score
    input: {LABELED}
    scorer: token-classification
    prm: "{{workdir}}/01-train"
  - stage: eval
    truth: first_error
    pred-from: step_rewards
    sweep: true
"""
    )
    result = prmtool("run", recipe, "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "work/03-eval/eval.json").read_text())
    again = prmtool("run", recipe, "-q")
    assert again.exit_code == 0 and again.stderr.count("skip") == 3
