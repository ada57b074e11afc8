"""`prmtool score`: implicit-PRM step rewards, and scoring with a trained token-classification PRM.

The tiny random-weight models stand in for a policy and a reference; every figure is checked
against a naive float64 computation that shares none of the stage's code: one full forward pass
per response, a full log-softmax, and step ends found by decoding token prefixes.
"""

import math

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prmtool.methods.prompts import DEFAULT_PROMPT_TEMPLATE
from prmtool.methods.step_rewards import step_char_ends, step_end_tokens, token_starts, tokenize_responses
from prmtool.methods.steps import make_splitter, split_steps
from tests.conftest import SAMPLES
from tests.engine_fixtures import build_tokenizer, tiny_config

BETA = 0.5  # large, so the rewards are far from zero and a wrong boundary shows

RESPONSES = [
    "Step 1: Add 2 and 3 to get 5.\n\nStep 2: Multiply 5 by 4 to get 20.\n\nThe answer is \\boxed{20}.",
    "Let x be the number of apples. Then 3x + 2 = 11, so x = 3.\n\n#### 3",
    "We compute the sum 1 + 2 + ... + 10 = 55.",
    # unicode, an emoji split over byte tokens, whitespace runs, a blank piece glued to a step
    "Étape 1: café × 4 = 12 😀  \n\n   \n\nÉtape 2:\t\t12 ÷ 3 = 4  \n\n\n\nSo \\boxed{4}",
]


def rows() -> pl.DataFrame:
    splitter = make_splitter("blank-line")
    return pl.DataFrame(
        {
            "problem_id": [f"p{i % 2}" for i in range(len(RESPONSES))],
            "problem": [f"Problem {i % 2}: what is the total?" for i in range(len(RESPONSES))],
            "response_id": [f"r{i}" for i in range(len(RESPONSES))],
            "response": RESPONSES,
            "steps": [split_steps(r, splitter) for r in RESPONSES],
        }
    )


@pytest.fixture
def responses_parquet(tmp_path):
    folder = tmp_path / "responses"
    folder.mkdir()
    rows().write_parquet(folder / "part-0.parquet")
    return folder


def naive_step_values(policy_dir, ref_dir, frame: pl.DataFrame, beta: float) -> list[list[float]]:
    """q at each step's end: full float64 forward and log-softmax per response; a step ends at
    the first token whose decoded prefix reaches the start of the next step."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval() for d in (policy_dir, ref_dir)]
    values = []
    for problem, response, steps in zip(frame["problem"], frame["response"], frame["steps"]):
        messages = [{"role": "user", "content": DEFAULT_PROMPT_TEMPLATE.replace("{problem}", problem)}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
        ids = torch.tensor([prompt_ids + response_ids])
        log_ps = []
        with torch.no_grad():
            for model in models:
                log_softmax = torch.log_softmax(model(ids).logits[0], dim=-1)
                positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
                log_ps.append([log_softmax[t, ids[0, t + 1]].item() for t in positions])
        token_rewards = [beta * (p - r) for p, r in zip(*log_ps)]
        row_values = []
        for i in range(len(steps)):
            region_end = len("".join(steps[: i + 1])) + 2 * i + (2 if i + 1 < len(steps) else 0)  # "\n\n" joins
            count = next(
                n for n in range(1, len(response_ids) + 1) if len(tokenizer.decode(response_ids[:n])) >= region_end
            )
            row_values.append(sum(token_rewards[:count]))
        values.append(row_values)
    return values


def test_implicit_scores_equal_a_naive_float64_computation(
    prmtool, responses_parquet, tmp_path, tiny_model_dir, tiny_ref_model_dir
):
    result = prmtool(
        "score",
        str(responses_parquet),
        "-o",
        str(tmp_path / "scored"),
        "--policy",
        str(tiny_model_dir),
        "--ref",
        str(tiny_ref_model_dir),
        "--beta",
        str(BETA),
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    scored = pl.read_parquet(tmp_path / "scored" / "part-0.parquet")
    expected = naive_step_values(tiny_model_dir, tiny_ref_model_dir, rows(), BETA)
    for values, rewards, want in zip(scored["step_values"], scored["step_rewards"], expected):
        assert len(values) == len(want)
        assert values.to_list() == pytest.approx(want, abs=1e-4)
        # single rewards are the differences of the cumulative values, so they sum to the last one
        assert sum(rewards) == pytest.approx(values[-1], abs=1e-9)
        assert rewards.to_list() == pytest.approx([b - a for a, b in zip([0.0] + want, want)], abs=1e-4)
    assert max(abs(v) for row in expected for v in row) > 0.1  # the check is not vacuous


def test_batch_size_does_not_change_scores(prmtool, responses_parquet, tmp_path, tiny_model_dir, tiny_ref_model_dir):
    outputs = []
    for budget in ("64", "100000"):  # one response per forward pass, then all in one
        out = tmp_path / f"scored-{budget}"
        result = prmtool(
            "score",
            str(responses_parquet),
            "-o",
            str(out),
            "--policy",
            str(tiny_model_dir),
            "--ref",
            str(tiny_ref_model_dir),
            "--max-batch-tokens",
            budget,
            "--device",
            "cpu",
            "--token-rewards",
        )
        assert result.exit_code == 0, result.stderr
        outputs.append(pl.read_parquet(out / "*.parquet"))
    for small, large in zip(outputs[0]["token_rewards"], outputs[1]["token_rewards"]):
        assert small.to_list() == pytest.approx(large.to_list(), abs=1e-6)


def test_no_ref_scores_with_the_policy_log_probability_alone(
    prmtool, responses_parquet, tmp_path, tiny_model_dir, tiny_engine
):
    result = prmtool(
        "score",
        str(responses_parquet),
        "-o",
        str(tmp_path / "scored"),
        "--policy",
        str(tiny_model_dir),
        "--no-ref",
        "--beta",
        "1",
        "--token-rewards",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    scored = pl.read_parquet(tmp_path / "scored" / "*.parquet")
    from prmtool.engines import ScoringRequest

    for problem, response, values, tokens in zip(
        scored["problem"], scored["response"], scored["step_values"], scored["token_rewards"]
    ):
        prompt = tiny_engine.chat_prompt_ids(problem, None, DEFAULT_PROMPT_TEMPLATE)
        [log_probs] = tiny_engine.score(
            [ScoringRequest(prompt, tiny_engine.tokenizer.encode(response, add_special_tokens=False))]
        )
        assert tokens.to_list() == pytest.approx(log_probs, abs=1e-5)  # float32, batched differently
        assert values[-1] == pytest.approx(sum(log_probs), abs=1e-4)  # the whole response's log p
        assert all(t <= 0 for t in tokens)


@pytest.mark.parametrize(
    "reward,agg",
    [
        ("single", "min"),
        ("single", "sum"),
        ("single", "mean"),
        ("single", "last"),
        ("cumulative", "min"),
        ("cumulative", "last"),
    ],
)
def test_prm_score_aggregates_the_chosen_reward(
    prmtool, responses_parquet, tmp_path, tiny_model_dir, tiny_ref_model_dir, reward, agg
):
    result = prmtool(
        "score",
        str(responses_parquet),
        "-o",
        str(tmp_path / "scored"),
        "--policy",
        str(tiny_model_dir),
        "--ref",
        str(tiny_ref_model_dir),
        "--reward",
        reward,
        "--agg",
        agg,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    scored = pl.read_parquet(tmp_path / "scored" / "*.parquet")
    aggregations = {"min": min, "sum": sum, "mean": lambda v: sum(v) / len(v), "last": lambda v: v[-1]}
    for rewards, values, score in zip(scored["step_rewards"], scored["step_values"], scored["prm_score"]):
        chosen = (rewards if reward == "single" else values).to_list()
        assert score == pytest.approx(aggregations[agg](chosen), abs=1e-12)


def test_step_boundaries_follow_offsets_through_unicode_and_whitespace_runs():
    tokenizer = build_tokenizer()
    response = RESPONSES[3]
    steps = split_steps(response, make_splitter("blank-line"))
    assert steps[1].startswith("   \n\n")  # the blank piece is glued to the next step
    [ids], [encoding] = tokenize_responses(tokenizer, [response])
    starts = token_starts(encoding)
    char_ends = step_char_ends(response, steps)
    assert char_ends[-1] == len(response)
    assert [response[:end] for end in char_ends[:-1]] == [
        "\n\n".join(steps[: i + 1]) + "\n\n" for i in range(len(steps) - 1)
    ]
    ends = step_end_tokens(starts, char_ends)
    assert ends[-1] == len(ids) - 1 and ends == sorted(ends)
    for end, char_end in zip(ends, char_ends):
        # the step's last token starts before the step's region ends, the next one at or after it
        assert len(tokenizer.decode(ids[:end])) < char_end <= len(tokenizer.decode(ids[: end + 1]))


def test_responses_are_tokenized_as_the_tokenizer_itself_does():
    # score reads the Rust encodings directly (their offsets later, per row); ids and offsets
    # must equal what tokenizer(...) gives, even after a call that padded and truncated
    tokenizer = build_tokenizer()
    tokenizer(["a b", "a"], padding=True, truncation=True, max_length=1)
    responses = RESPONSES + ["", " x", "é\u0301 😀  \n\n\t∑"]
    expected = tokenizer(responses, add_special_tokens=False, return_offsets_mapping=True)
    ids, encodings = tokenize_responses(tokenizer, responses)
    assert ids == expected["input_ids"]
    assert [token_starts(e) for e in encodings] == [[s for s, _ in o] for o in expected["offset_mapping"]]


def test_step_char_ends_refuses_steps_that_are_not_the_response():
    assert step_char_ends("a\n\nb", ["a", "b"]) == [3, 4]
    assert step_char_ends("", []) == []
    for steps in (["a", "c"], ["b", "a"], ["a"]):
        with pytest.raises(ValueError):
            step_char_ends("a\n\nb", steps)


def test_steps_that_do_not_match_the_response_are_refused_before_loading_a_model(prmtool, tmp_path):
    frame = rows().with_columns(
        pl.when(pl.col("response_id") == "r2")
        .then(pl.lit(["something else"]))
        .otherwise(pl.col("steps"))
        .alias("steps")
    )
    frame.write_parquet(tmp_path / "bad.parquet")
    result = prmtool("score", str(tmp_path / "bad.parquet"), "-o", str(tmp_path / "out"), "--no-ref")
    assert result.exit_code == 2
    assert "bad.parquet: row 2: steps" in result.stderr
    assert "loading" not in result.stderr  # refused before any model loads
    assert not list(tmp_path.glob("out/*.parquet"))


def test_a_reference_model_is_required_unless_no_ref(prmtool, responses_parquet, tmp_path):
    result = prmtool("score", str(responses_parquet), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "--ref MODEL is required" in result.stderr


def test_policy_and_reference_must_share_a_tokenizer(prmtool, responses_parquet, tmp_path, tiny_model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(
        ["a different corpus entirely"] * 4,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    other = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    from transformers import LlamaForCausalLM

    ref_dir = tmp_path / "other-ref"
    LlamaForCausalLM(tiny_config(len(other), other.eos_token_id)).save_pretrained(ref_dir)
    other.save_pretrained(ref_dir)
    result = prmtool(
        "score",
        str(responses_parquet),
        "-o",
        str(tmp_path / "out"),
        "--policy",
        str(tiny_model_dir),
        "--ref",
        str(ref_dir),
        "--device",
        "cpu",
    )
    assert result.exit_code == 2
    assert "policy and reference tokenizers differ" in result.stderr
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.fixture(scope="module")
def tiny_prm_dir(tmp_path_factory):
    """A token-classification PRM as TRL's PRMTrainer leaves it: 2 labels, the tokenizer beside it."""
    from transformers import LlamaForTokenClassification

    folder = tmp_path_factory.mktemp("tiny-prm")
    tokenizer = build_tokenizer()
    torch.manual_seed(2)
    model = LlamaForTokenClassification(tiny_config(len(tokenizer), tokenizer.eos_token_id, num_labels=2))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # confident, varied predictions
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_token_classification_prm_reads_each_step_label_where_prm_trainer_put_it(
    prmtool, responses_parquet, tmp_path, tiny_prm_dir
):
    from transformers import AutoModelForTokenClassification

    result = prmtool(
        "score",
        str(responses_parquet),
        "-o",
        str(tmp_path / "scored"),
        "--scorer",
        "token-classification",
        "--prm",
        str(tiny_prm_dir),
        "--agg",
        "min",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    scored = pl.read_parquet(tmp_path / "scored" / "*.parquet")
    tokenizer = AutoTokenizer.from_pretrained(tiny_prm_dir)
    model = AutoModelForTokenClassification.from_pretrained(tiny_prm_dir, dtype=torch.float64).eval()
    seen = []
    for problem, steps, rewards, values, score in zip(
        scored["problem"], scored["steps"], scored["step_rewards"], scored["step_values"], scored["prm_score"]
    ):
        # TRL PRMTrainer.tokenize_row: prompt ids, then each step's ids followed by the separator's;
        # the label sits on the last token of each step + separator
        ids, label_positions = tokenizer(problem, add_special_tokens=False)["input_ids"], []
        for step in steps:
            ids += (
                tokenizer(step, add_special_tokens=False)["input_ids"]
                + tokenizer("\n", add_special_tokens=False)["input_ids"]
            )
            label_positions.append(len(ids) - 1)
        with torch.no_grad():
            probabilities = torch.softmax(model(torch.tensor([ids])).logits[0], dim=-1)[:, 1]
        want = [probabilities[p].item() for p in label_positions]
        assert rewards.to_list() == pytest.approx(want, abs=1e-5)
        assert values.to_list() == rewards.to_list()
        assert score == pytest.approx(min(want), abs=1e-5)
        seen += want
    assert all(0 < p < 1 for p in seen) and not all(math.isclose(p, seen[0]) for p in seen)


def test_embedded_model_scores_the_data_samples(prmtool, tmp_path):
    """The README's command on a few data_samples responses with the embedded SmolLM2 model."""
    sample = pl.read_parquet(SAMPLES / "responses" / "*.parquet").head(3)
    sample.write_parquet(tmp_path / "few.parquet")
    result = prmtool(
        "score", str(tmp_path / "few.parquet"), "-o", str(tmp_path / "scored"), "--no-ref", "--agg", "mean"
    )
    assert result.exit_code == 0, result.stderr
    scored = pl.read_parquet(tmp_path / "scored" / "*.parquet")
    assert scored.columns[: len(sample.columns)] == sample.columns and scored.height == 3
    assert (scored["step_rewards"].list.len() == scored["steps"].list.len()).all()
    assert all(v < 0 for row in scored["step_values"] for v in row)  # beta * log p of real text
    assert scored["prm_score"].to_list() == pytest.approx([sum(r) / len(r) for r in scored["step_rewards"]])
