"""`label --method judge`: an LLM critic names the first wrong step; parsing, majority and the
labels it implies, with a scripted engine, and end to end with the embedded model."""

import polars as pl
import pytest

from prmtool.engines import Completion
from prmtool.methods.judging import judge_prompt, judge_rows, majority, parse_verdict
from tests.conftest import ROOT


class ScriptedCritic:
    """Replies with the given texts in turn, one per sample; counts its calls."""

    def __init__(self, replies):
        self.replies, self.calls, self.prompts = list(replies), 0, []

    def chat_prompt_ids(self, message, system_prompt=None, prompt_template=None):
        self.prompts.append(message)
        return [1, 2, 3]

    def sample(self, requests, on_progress=None):
        self.calls += 1
        return [[Completion(self.replies.pop(0), [7], 1, "stop") for _ in range(r.n)] for r in requests]


@pytest.mark.parametrize(
    "reply, n_steps, verdict",
    [
        ("Step 1 adds wrongly. \\boxed{1}", 3, 1),
        ("All steps hold. \\boxed{-1}", 3, -1),
        ("\\boxed{ 0 }", 2, 0),
        ("\\boxed{\\text{2}}", 3, 2),
        ("\\boxed{3}", 3, None),  # not a step of the response
        ("the second step", 3, None),  # no box
        ("\\boxed{1.5}", 3, None),
        (None, 3, None),
    ],
)
def test_a_critique_names_a_step_or_none(reply, n_steps, verdict):
    assert parse_verdict(reply, n_steps) == verdict


def test_the_majority_wins_and_a_tie_goes_to_the_earliest_error():
    assert majority([2, 2, 1]) == 2
    assert majority([2, 1]) == 1
    assert majority([-1, 3]) == 3  # an error found beats "no error" on a tie
    assert majority([-1, -1, 0]) == -1
    assert majority([None, None]) is None


def test_judge_labels_every_row_in_one_engine_call():
    frame = pl.DataFrame(
        {
            "problem_id": ["p", "p", "q", "q"],
            "problem": ["1+1?", "1+1?", "2*3?", "2*3?"],
            "response_id": ["a", "b", "c", "d"],
            "steps": [["1+1=3", "so 3"], ["1+1=2", "so 2"], ["2*3=6"], ["2*3=5", "5"]],
            "correct": [False, True, False, False],
        }
    )
    critic = ScriptedCritic(["\\boxed{0}", "\\boxed{-1}", "no idea"])  # b is trusted: not asked
    labeled = judge_rows(frame, critic)
    assert critic.calls == 1 and len(critic.prompts) == 3
    assert "<step_1>\nso 3\n</step_1>" in critic.prompts[0]
    assert labeled["judge_first_error"].to_list() == [0, None, -1, None]
    assert labeled["first_error"].to_list() == [0, -1, -1, None]  # unparseable stays null
    assert labeled["step_labels"].to_list() == [[0, None], [1, 1], [1], None]
    assert labeled["judge_output"].to_list() == [["\\boxed{0}"], None, ["\\boxed{-1}"], ["no idea"]]


def test_judge_prompt_numbers_the_steps_from_zero():
    prompt = judge_prompt("What is 2+2?", ["2+2=5", "So 5."])
    assert prompt.index("<step_0>") < prompt.index("<step_1>") and "\\boxed{-1}" in prompt


@pytest.mark.slow
def test_label_method_judge_end_to_end_with_the_embedded_model(prmtool, tmp_path):
    sample = ROOT / "data_samples/processbench-gsm8k/gsm8k.jsonl"
    rows = pl.read_ndjson(sample).head(4)
    small = tmp_path / "pb.jsonl"
    rows.write_ndjson(small)
    assert prmtool("import", small, "--preset", "processbench", "-o", tmp_path / "pb", "-q").exit_code == 0
    assert prmtool("verify", tmp_path / "pb", "-o", tmp_path / "verified", "--workers", "1", "-q").exit_code == 0
    result = prmtool(
        "label", tmp_path / "verified", "-o", tmp_path / "judged", "--method", "judge", "--max-tokens", "24",
        "--correct-responses", "estimate", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    judged = pl.read_parquet(tmp_path / "judged/*.parquet")
    assert judged["judge_output"].list.len().to_list() == [1] * 4
    assert "judge unparseable" in result.stderr or judged["judge_first_error"].is_not_null().any()
    evaluated = prmtool("eval", tmp_path / "judged")
    assert evaluated.exit_code == 0 and "F1" in evaluated.stdout


def test_consensus_keeps_the_rows_where_mc_and_the_judge_agree():
    from prmtool.stages.label import consensus

    labeled = pl.DataFrame(
        {
            "response_id": ["a", "b", "c", "d"],
            "correct": [False, False, True, False],
            "first_error": pl.Series([1, 0, -1, 2], dtype=pl.Int32),
            "label_tokens": pl.Series([10, 10, 0, 10], dtype=pl.Int64),
        }
    )
    judged = pl.DataFrame(
        {
            "judge_first_error": pl.Series([1, 2, None, None], dtype=pl.Int32),
            "judge_output": [["\\boxed{1}"], ["\\boxed{2}"], None, ["?"]],
            "label_tokens": pl.Series([5, 5, 0, 5], dtype=pl.Int64),
        }
    )
    result = consensus(labeled, judged, trusted=True)
    assert result["label_reason"].to_list() == [None, "disagree", None, "judge_unparseable"]
    assert result["label_tokens"].to_list() == [15, 15, 0, 15]


@pytest.mark.slow
def test_label_method_consensus_splits_rows_between_output_and_rejects(prmtool, tmp_path):
    rows = pl.read_ndjson(ROOT / "data_samples/processbench-gsm8k/gsm8k.jsonl").head(2)
    rows.write_ndjson(tmp_path / "pb.jsonl")
    assert (
        prmtool("import", tmp_path / "pb.jsonl", "--preset", "processbench", "-o", tmp_path / "pb", "-q").exit_code == 0
    )
    assert prmtool("verify", tmp_path / "pb", "-o", tmp_path / "v", "--workers", "1", "-q").exit_code == 0
    refused = prmtool("label", tmp_path / "v", "-o", tmp_path / "x", "--method", "consensus")
    assert refused.exit_code == 2 and "needs --rejects" in refused.stderr
    result = prmtool(
        "label", tmp_path / "v", "-o", tmp_path / "kept", "--method", "consensus", "--rejects", tmp_path / "rejects",
        "--k", "2", "--max-tokens", "16", "--correct-responses", "estimate", "--device", "cpu", "--workers", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    kept, rejected = pl.read_parquet(tmp_path / "kept/*.parquet"), pl.read_parquet(tmp_path / "rejects/*.parquet")
    assert kept.height + rejected.height == 2
    assert set(rejected["label_reason"]) <= {"disagree", "judge_unparseable"}
    assert (kept["first_error"] == kept["judge_first_error"]).all()
