"""`prmtool generate`: problems in, N sampled responses per problem out."""

import random

import polars as pl
import pytest

from prmtool.engines import Completion, Engine
from prmtool.stages.generate import generate_rows, request_seed
from tests.conftest import SAMPLES


class ScriptedEngine(Engine):
    """Answers each request from its seed alone, so tests know what every response must be."""

    def __init__(self):
        self.tokenizer = None
        self.calls = []

    def chat_prompt_ids(self, problem, system_prompt=None, prompt_template=None):
        text = (prompt_template or "{problem}").replace("{problem}", problem)
        return [ord(c) % 256 for c in text]

    def sample(self, requests, on_progress=None):
        self.calls.append(requests)
        results = []
        for done, request in enumerate(requests, start=1):
            rng = random.Random(request.seed)
            samples = []
            for _ in range(request.n):
                answer = rng.randint(0, 9)
                samples.append(Completion(f"Think.\n\nThe answer is \\boxed{{{answer}}}.", [answer], 5, "stop"))
            results.append(samples)
            if on_progress:
                on_progress(done, 5 * request.n)
        return results

    def score(self, requests):
        raise NotImplementedError("generate never scores")


@pytest.fixture
def problems() -> pl.DataFrame:
    return pl.read_parquet(SAMPLES / "problems" / "part-00000.parquet").head(5)


def test_each_problem_gets_n_responses_with_every_problem_column(problems):
    engine = ScriptedEngine()
    result = generate_rows(problems, engine, n=3)
    assert result.height == 15
    assert result.columns == problems.columns + ["response_id", "response", "steps", "response_tokens", "finish_reason"]
    assert result["problem_id"].to_list() == [pid for pid in problems["problem_id"] for _ in range(3)]
    assert result["steps"][0].to_list() == ["Think.", result["response"][0].split("\n\n")[1]]
    assert result["response_id"].n_unique() == 15
    assert len(engine.calls) == 1, "all problems of a shard go to the engine in one call"


def test_same_seed_gives_same_ids_and_texts_and_another_seed_differs(problems):
    first = generate_rows(problems, ScriptedEngine(), n=4, seed=1)
    again = generate_rows(problems, ScriptedEngine(), n=4, seed=1)
    other = generate_rows(problems, ScriptedEngine(), n=4, seed=2)
    assert first.equals(again)
    assert set(first["response_id"]).isdisjoint(other["response_id"])


def test_a_problems_samples_do_not_depend_on_its_batch(problems):
    alone = generate_rows(problems.slice(2, 1), ScriptedEngine(), n=4, seed=7)
    together = generate_rows(problems, ScriptedEngine(), n=4, seed=7).filter(
        pl.col("problem_id") == problems["problem_id"][2]
    )
    assert alone.equals(together)
    assert request_seed(7, "a") != request_seed(7, "b")


def test_prompt_template_reaches_the_engine(problems):
    engine = ScriptedEngine()
    generate_rows(problems.head(1), engine, n=1, prompt_template="Q: {problem}\nA:")
    expected = "Q: " + problems["problem"][0] + "\nA:"
    assert engine.calls[0][0].prompt_ids == [ord(c) % 256 for c in expected]


def test_generate_command_on_a_model_folder(prmtool, tiny_model_dir, tmp_path):
    """The whole command on a real (tiny, random-weight) transformers model folder."""
    problems = tmp_path / "problems"
    problems.mkdir()
    pl.read_parquet(SAMPLES / "problems" / "part-00000.parquet").head(3).write_parquet(problems / "part-00000.parquet")
    args = [
        "generate",
        problems,
        "-o",
        tmp_path / "out",
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--n",
        "2",
        "--max-tokens",
        "12",
        "--seed",
        "3",
    ]
    result = prmtool(*args)
    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "part-00000.parquet")
    assert out.height == 6
    assert set(out["finish_reason"]) <= {"stop", "length"}
    assert (out["response_tokens"] <= 12).all() and (out["response_tokens"] >= 1).all()
    assert "tokens generated" in result.stderr
    # Same seed, fresh output directory: the same ids and texts.
    again = prmtool(*args[:3], tmp_path / "again", *args[4:])
    assert again.exit_code == 0, again.stderr
    assert pl.read_parquet(tmp_path / "again" / "part-00000.parquet").equals(out)


def test_generate_refuses_rows_that_already_have_responses(prmtool, responses_dir, tmp_path):
    result = prmtool("generate", responses_dir, "-o", tmp_path / "out", "--model", tmp_path)
    assert result.exit_code == 2
    assert "already has column 'response_id'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_model_is_a_clear_input_error(prmtool, tmp_path):
    problems = tmp_path / "problems"
    problems.mkdir()
    pl.read_parquet(SAMPLES / "problems" / "part-00000.parquet").head(2).write_parquet(problems / "part-00000.parquet")
    result = prmtool("generate", problems, "-o", tmp_path / "out", "--model", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "not found" in result.stderr and "nowhere" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_generate_with_the_embedded_default_model_then_verify(prmtool, tmp_path):
    """End to end on SmolLM2-135M-Instruct, the model a fresh install runs with."""
    problems = tmp_path / "problems"
    problems.mkdir()
    pl.read_parquet(SAMPLES / "problems" / "part-00000.parquet").head(2).write_parquet(problems / "part-00000.parquet")
    result = prmtool(
        "generate", problems, "-o", tmp_path / "out", "--n", "2", "--max-tokens", "48", "--verify", "--device", "cpu"
    )
    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "part-00000.parquet")
    assert out.height == 4
    assert out["response"].str.len_chars().min() > 0, "a real model writes text"
    assert set(out["verify_status"]) <= {"ok", "no_answer", "timeout", "error"}
    assert out["correct"].dtype == pl.Boolean
