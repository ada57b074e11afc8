"""Reasoning-model traces: a thinking block, then a written solution (prmtool/methods/thinking.py).

`--split think` cuts the thinking at blank lines and merges its paragraphs into steps of at least
--min-step-tokens; `thinking_steps` says how many leading steps are thinking and `finished`
whether the thinking closed and a solution followed. verify reads the answer from the solution
alone; label's rollouts from a thinking step continue the thinking, still open.
"""

from __future__ import annotations

import json
import random
import statistics

import polars as pl
import pytest

from prmtool.engines import Completion
from prmtool.methods.intervention_rounds import intervene_rows
from prmtool.methods.labeling import label_rows
from prmtool.methods.rollouts import RolloutSettings
from prmtool.methods.thinking import (
    ThinkSplit,
    count_tokens,
    find_thinking,
    parse_think_tags,
    solution_text,
    split_trace,
)
from prmtool.methods.verification import verify_responses
from tests.conftest import ROOT
from tests.test_label import ScriptedRolloutEngine

LONG_COT = ROOT / "data_samples" / "long-cot" / "sky-t1-amc23.jsonl"
DELTABENCH = ROOT / "data_samples" / "deltabench" / "sample.jsonl"


def paragraph(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["so", "the", "sum", "is", "wait", "check", "x", "=", "3"]) for _ in range(words)) + "."


def trace(paragraphs: int = 30, words: int = 40, solution: str = "So the answer is $\\boxed{6}$.") -> str:
    thinking = "\n\n".join(paragraph(words, seed) for seed in range(paragraphs))
    return f"<think>\n{thinking}\n</think>\n\n{solution}"


# --- the splitter -----------------------------------------------------------------------------


def test_a_trace_splits_losslessly_into_merged_thinking_steps_then_the_solution_steps():
    text = trace(paragraphs=30, words=40, solution="We add the parts.\n\nSo the answer is $\\boxed{6}$.")
    split = split_trace(text, ThinkSplit(min_step_tokens=100))
    assert "\n\n".join(split.steps) == text and all(step.strip() for step in split.steps)
    # 30 paragraphs of about 41 tokens: steps of three paragraphs (the first also holds the tag)
    assert split.thinking_steps == 10
    assert split.steps[0].startswith("<think>") and split.steps[split.thinking_steps - 1].endswith("</think>")
    assert split.steps[split.thinking_steps :] == ["We add the parts.", "So the answer is $\\boxed{6}$."]
    assert split.finished is True
    assert all(count_tokens(step) >= 100 for step in split.steps[: split.thinking_steps])


def test_a_trace_cut_off_while_thinking_is_all_thinking_and_not_finished():
    text = trace().split("</think>")[0]
    split = split_trace(text, ThinkSplit(min_step_tokens=100))
    assert "\n\n".join(split.steps) == text
    assert (split.thinking_steps, split.finished) == (len(split.steps), False)
    assert solution_text(text) is None


def test_the_opening_tag_may_be_in_the_prompt_instead_of_the_response():
    text = trace().removeprefix("<think>\n")
    split = split_trace(text, ThinkSplit(min_step_tokens=100))
    assert split.finished is True and split.steps[split.thinking_steps - 1].endswith("</think>")
    # without any tag, only --thinking-opened says that a cut-off response was thinking
    cut = text.split("</think>")[0]
    assert split_trace(cut).finished is None and split_trace(cut).thinking_steps == 0
    opened = split_trace(cut, ThinkSplit(min_step_tokens=100, opened=True))
    assert (opened.thinking_steps, opened.finished) == (len(opened.steps), False)


def test_sky_t1_traces_read_their_solution_between_its_own_tags():
    text = (
        "<|begin_of_thought|>\n\nLet me think. 2 + 4 = 6.\n\n<|end_of_thought|>\n\n"
        "<|begin_of_solution|>\n\nThe sum is 6.\n\n\\[\\boxed{6}\\]\n\n<|end_of_solution|>"
    )
    assert solution_text(text) == "The sum is 6.\n\n\\[\\boxed{6}\\]"
    assert split_trace(text).finished is True
    unfinished = text.removesuffix("<|end_of_solution|>")  # the solution itself was cut off
    assert split_trace(unfinished).finished is False and solution_text(unfinished) is None


def test_other_tags_with_think_tags():
    tags = parse_think_tags("<seed:think>,</seed:think>")
    text = "<seed:think>\nhmm, 2 + 2 = 4\n</seed:think>\n\nThe answer is 4."
    assert find_thinking(text, tags).finished and solution_text(text, tags) == "The answer is 4."
    assert find_thinking(text) is None  # the default tags do not know these
    with pytest.raises(Exception, match="--think-tags 'nothing': expected OPEN,CLOSE"):
        parse_think_tags("nothing")


def test_no_step_ends_inside_a_latex_display_or_a_code_block():
    inside = [
        "$$\na + b\n\n= c\n$$",
        "\\[\nx = 1\n\n\\]",
        "\\begin{align}\nx &= 1\n\n\\\\[4pt]\ny &= 2\n\\end{align}",
        "```python\nx = 1\n\n\ny = 2\n```",
    ]
    for block in inside:
        text = "<think>\nFirst.\n\n" + block + "\n\nLast.\n</think>\n\nDone: 3."
        steps = split_trace(text, ThinkSplit(min_step_tokens=1)).steps
        assert "\n\n".join(steps) == text
        assert any(block in step for step in steps), block  # the block is whole in one step


def test_max_steps_caps_the_trace_by_merging_the_shortest_neighbours():
    text = trace(paragraphs=60, words=40)
    split = split_trace(text, ThinkSplit(min_step_tokens=1, max_steps=12))
    assert len(split.steps) == 12 and "\n\n".join(split.steps) == text
    sizes = [count_tokens(step) for step in split.steps[: split.thinking_steps]]
    assert max(sizes) <= 2 * min(sizes) + 45  # merged evenly, not all into one step


def test_max_steps_caps_a_trace_whose_solution_alone_has_more_steps():
    rows = [json.loads(line) for line in LONG_COT.open()]
    for cap in (5, 2):
        splits = [split_trace(row["response"], ThinkSplit(max_steps=cap)) for row in rows]
        assert {len(split.steps) for split in splits} == {cap}
        assert all("\n\n".join(split.steps) == row["response"] for split, row in zip(splits, rows))
        assert min(split.thinking_steps for split in splits) == 1


def test_split_think_is_a_splitter_like_the_others(prmtool, write_jsonl, tmp_path):
    rows = [{"problem": "p", "reference_answer": "6", "response": trace(40)}]
    result = prmtool("import", write_jsonl(rows), "--split", "think", "--min-step-tokens", "150", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    frame = pl.read_parquet(tmp_path / "o" / "part-00000.parquet")
    assert frame["steps"].list.join("\n\n").to_list() == [rows[0]["response"]]
    assert frame["thinking_steps"].to_list() == [len(frame["steps"][0]) - 1] and frame["finished"].to_list() == [True]


def test_import_refuses_a_finished_column_that_contradicts_the_tags(prmtool, write_jsonl, tmp_path):
    rows = [{"problem": "p", "response": trace(), "finished": False}]
    result = prmtool("import", write_jsonl(rows), "--split", "think", "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert "row 0: column 'finished' is false but the trace's tags say true" in result.stderr.lower()
    assert not (tmp_path / "o").exists()


# --- the development set: 80 Sky-T1 traces on AMC 2023 --------------------------------------


def test_on_80_sky_t1_traces_the_split_the_columns_and_verify_hold(prmtool, tmp_path):
    """The figures of docs/algorithms.md, "Reasoning traces". Traces of 900 to 39,000 tokens
    split into a median of 28 steps (15 of them thinking), 76 of 80 into 10 to 40, no step a
    solution tag alone; every split
    is lossless; the 34 traces cut off while thinking have no answer, although one of them had
    boxed the right one while thinking; the 46 that finished agree with the grade Qwen's
    grader gave them exactly as often as Math-Verify reading their solution does (all 46)."""
    rows = [json.loads(line) for line in LONG_COT.open()]
    assert prmtool("import", LONG_COT, "--split", "think", "-o", tmp_path / "traces").exit_code == 0
    assert prmtool("verify", tmp_path / "traces", "-o", tmp_path / "verified", "--workers", "2").exit_code == 0
    frame = pl.read_parquet(tmp_path / "verified" / "part-00000.parquet")
    counts = frame["steps"].list.len().to_list()
    assert statistics.median(counts) == 28 and min(counts) == 8 and max(counts) == 40
    assert sum(10 <= count <= 40 for count in counts) == 76
    tags_alone = frame["steps"].explode().str.strip_chars().is_in(["<|begin_of_solution|>", "<|end_of_solution|>"])
    assert not tags_alone.any()
    assert statistics.median(frame["thinking_steps"].to_list()) == 15
    assert (frame["steps"].list.join("\n\n") == frame["response"]).all()
    assert frame["steps"].list.eval(pl.element().str.strip_chars().str.len_chars().min()).explode().min() > 0
    assert frame["finished"].to_list() == [row["finished"] for row in rows]
    from prmtool.cli.stats import shard_set_stats

    figures = shard_set_stats(frame.lazy())
    assert figures["finished"] == {"yes": 46, "no": 34, "unknown": 0} and figures["thinking_steps"]["median"] == 15

    unfinished = frame.filter(~pl.col("finished"))
    assert unfinished.height == 34 and set(unfinished["verify_status"]) == {"no_answer"}
    assert unfinished["answer_source"].null_count() == 34 and unfinished["grader_correct"].sum() == 1

    finished = frame.filter(pl.col("finished"))
    ours = int((finished["correct"] == finished["grader_correct"]).sum())
    math_verify = [
        math_verify_alone(gold, solution_text(text))
        for gold, text in finished.select("reference_answer", "response").iter_rows()
    ]
    theirs = sum(mv == grade for mv, grade in zip(math_verify, finished["grader_correct"]))
    assert ours >= theirs and (ours, theirs, finished.height) == (46, 46, 46)


def math_verify_alone(gold: str, text: str) -> bool:
    from math_verify import parse, verify

    return bool(verify(parse(f"${gold}$"), parse(text)))


# --- verify -----------------------------------------------------------------------------------


def test_verify_reads_the_solution_only_and_nothing_from_an_unfinished_trace(prmtool, write_jsonl, tmp_path):
    boxed_while_thinking = "<think>\nMaybe it is \\boxed{6}? Let me check again"
    finished = "<think>\nMaybe \\boxed{7}.\n</think>\n\nThe sum is 6, so the answer is $\\boxed{6}$."
    rows = [
        {"problem": "p", "reference_answer": "6", "response": boxed_while_thinking},
        {"problem": "q", "reference_answer": "6", "response": finished},
    ]
    assert prmtool("import", write_jsonl(rows), "--split", "think", "-o", tmp_path / "t").exit_code == 0
    assert prmtool("verify", tmp_path / "t", "-o", tmp_path / "v", "--workers", "1").exit_code == 0
    frame = pl.read_parquet(tmp_path / "v" / "part-00000.parquet")
    assert frame["verify_status"].to_list() == ["no_answer", "ok"]
    assert frame["answer_source"].to_list() == [None, "boxed"] and frame["correct"].to_list() == [False, True]


def test_verify_warns_when_the_think_tags_given_occur_in_no_response(prmtool, write_jsonl, tmp_path):
    rows = [{"problem": "q", "reference_answer": "6", "response": "<think>\nMaybe 7.\n</think>\n\n$\\boxed{6}$"}]
    assert prmtool("import", write_jsonl(rows), "--split", "think", "-o", tmp_path / "t").exit_code == 0
    wrong = prmtool(
        "verify", tmp_path / "t", "-o", tmp_path / "v1", "--workers", "1", "--think-tags", "<seed:think>,</seed:think>"
    )
    assert wrong.exit_code == 0 and "neither tag occurs in any of the 1 responses" in wrong.stderr
    right = prmtool(
        "verify", tmp_path / "t", "-o", tmp_path / "v2", "--workers", "1", "--think-tags", "<think>,</think>"
    )
    assert right.exit_code == 0 and "neither tag" not in right.stderr


def test_where_the_cascade_reads_nothing_math_verifys_reading_of_the_whole_text_counts_if_right():
    responses = [
        "We add 2 + 4 = 6 and then compare it with $x = 6$ in the end.",  # no conclusion the cascade reads
        "We add 2 + 4 = 6 and then compare it with $x = 5$ in the end.",  # Math-Verify reads 5: still no answer
        "He sprints 3*3=9 times",  # cut off mid-computation: never an answer
    ]
    answers, verdicts = verify_responses(responses, ["6", "6", "9"], workers=1)
    assert [(a.source, v.status, v.correct) for a, v in zip(answers, verdicts)] == [
        ("math_verify", "ok", True),
        (None, "no_answer", False),
        (None, "no_answer", False),
    ]


# --- label ------------------------------------------------------------------------------------


class ThinkingRolloutEngine(ScriptedRolloutEngine):
    """The scripted engine of tests/test_label.py, as a reasoning model: a rollout from inside
    the thinking first closes it. Every prompt it is given is kept, to check the prefixes."""

    def __init__(self, answers, p=1.0, closes=True, template_opens=False):
        super().__init__(answers, p)
        self.closes, self.prefixes = closes, []
        if template_opens:
            self.tokenizer = PromptTail()

    def sample(self, requests, on_progress=None):
        results = super().sample(requests, on_progress)
        for request, samples in zip(requests, results):
            prefix = "".join(map(chr, request.prompt_ids[request.prompt_ids.index(0) + 1 :]))
            self.prefixes.append(prefix)
            thinking = isinstance(self.tokenizer, PromptTail) or "<think>" in prefix
            if thinking and "</think>" not in prefix:
                closing = "\n</think>\n\n" if self.closes else "\n\nStill thinking: "
                for index, sample in enumerate(samples):
                    samples[index] = Completion(closing + sample.text, sample.token_ids, sample.num_tokens, "stop")
        return results


class PromptTail:
    """A tokenizer whose decoded chat prompt ends with an opened thinking tag (Qwen3's template)."""

    def decode(self, ids):
        return "<|im_start|>assistant\n<think>\n"


def wrong_trace_row(wrong_at: int, n_thinking: int = 12, opened_by_prompt: bool = False) -> dict:
    paragraphs = [f"Thought {i}: fine, " + "and so on " * 30 for i in range(n_thinking)]
    paragraphs[wrong_at] = f"Thought {wrong_at}: WRONG, " + "and so on " * 30
    text = "<think>\n" + "\n\n".join(paragraphs) + "\n</think>\n\nSo the answer is \\boxed{99}."
    if opened_by_prompt:
        text = text.removeprefix("<think>\n")
    split = split_trace(text, ThinkSplit(min_step_tokens=50, opened=opened_by_prompt))
    assert split.thinking_steps == n_thinking
    return {
        "problem_id": "p",
        "problem": "Problem?",
        "reference_answer": "10",
        "response_id": f"r{wrong_at}",
        "response": text,
        "steps": split.steps,
        "thinking_steps": split.thinking_steps,
        "finished": split.finished,
        "correct": False,
    }


def test_binary_search_on_a_trace_finds_a_thinking_error_from_prefixes_that_end_inside_the_thinking():
    frame = pl.DataFrame([wrong_trace_row(wrong_at) for wrong_at in (0, 4, 11)])
    engine = ThinkingRolloutEngine({"Problem?": "10"})
    labeled = label_rows(frame, engine, "binary", k=4, settings=RolloutSettings(workers=1))
    assert labeled["first_error"].to_list() == [0, 4, 11]
    thinking_prefixes = [p for p in engine.prefixes if "Thought" in p and "</think>" not in p]
    assert thinking_prefixes and all(p.startswith("<think>\n") for p in thinking_prefixes)


def test_a_rollout_that_never_closes_its_thinking_has_no_answer():
    frame = pl.DataFrame([wrong_trace_row(11)])
    engine = ThinkingRolloutEngine({"Problem?": "10"}, closes=False)
    labeled = label_rows(frame, engine, "mc", k=2, settings=RolloutSettings(workers=1))
    assert labeled["step_mc"][0].to_list()[:11] == [0.0] * 11  # every boxed 10 was still thinking


def test_the_opening_tag_is_written_once_when_the_chat_template_opens_the_thinking():
    for opened_by_prompt in (False, True):
        frame = pl.DataFrame([wrong_trace_row(5, opened_by_prompt=opened_by_prompt)])
        engine = ThinkingRolloutEngine({"Problem?": "10"}, template_opens=True)
        labeled = label_rows(frame, engine, "binary", k=4, settings=RolloutSettings(workers=1))
        assert labeled["first_error"].to_list() == [5]
        assert engine.prefixes and not any("<think>" in p for p in engine.prefixes)  # the template wrote it


def test_steps_picks_the_thinking_or_the_solution_to_label():
    row = wrong_trace_row(4)
    row["steps"] = row["steps"][:-1] + ["First part.", "WRONG part.", "So the answer is \\boxed{99}."]
    frame = pl.DataFrame([row])
    n = len(row["steps"])
    thinking = label_rows(frame, ThinkingRolloutEngine({"Problem?": "10"}), "binary", k=4,
                          settings=RolloutSettings(workers=1), which_steps="thinking")  # fmt: skip
    assert thinking["first_error"].to_list() == [4]
    assert thinking["step_labels"][0].to_list() == [1, 1, 1, 1, 0] + [None] * (n - 5)

    # the solution alone: the thinking is taken as given, and its own error is not looked for
    row["steps"] = [s.replace("WRONG", "fine") if i < 12 else s for i, s in enumerate(row["steps"])]
    engine = ThinkingRolloutEngine({"Problem?": "10"})
    solution = label_rows(pl.DataFrame([row]), engine, "binary", k=4, settings=RolloutSettings(workers=1),
                          which_steps="solution")  # fmt: skip
    assert solution["first_error"].to_list() == [13]
    assert solution["step_labels"][0].to_list() == [None] * 12 + [1, 0, None]
    assert all("</think>" in p for p in engine.prefixes)  # no probe inside the thinking


def test_sections_without_tags_are_rolled_out_and_read_as_plain_responses():
    """DeltaBench's sections are thinking with no tags to continue (finished is null)."""
    row = wrong_trace_row(4)
    row["steps"] = [step.replace("<think>\n", "").replace("\n</think>", "") for step in row["steps"]]
    row["finished"] = None
    engine = ThinkingRolloutEngine({"Problem?": "10"})
    labeled = label_rows(pl.DataFrame([row]), engine, "binary", k=4, settings=RolloutSettings(workers=1))
    assert labeled["first_error"].to_list() == [4]
    assert engine.prefixes and not any("think>" in prefix for prefix in engine.prefixes)


def test_label_command_takes_steps(prmtool, tmp_path):
    result = prmtool("label", tmp_path, "-o", tmp_path / "o", "--steps", "middle")
    assert result.exit_code == 2 and "--steps 'middle': expected one of all, thinking, solution" in result.stderr


# --- DeltaBench --------------------------------------------------------------------------------


def test_deltabench_sections_become_steps_and_their_first_wrong_section_the_human_first_error(prmtool, tmp_path):
    result = prmtool("import", DELTABENCH, "--preset", "deltabench", "-o", tmp_path / "db")
    assert result.exit_code == 0, result.stderr
    frame = pl.read_parquet(tmp_path / "db" / "part-00000.parquet")
    assert frame["response_id"].to_list() == ["db-sample-1", "db-sample-2", "db-sample-3"]
    assert frame["human_first_error"].to_list() == [2, -1, 1]  # sections [3, 4], none, "[2]"
    assert frame["steps"].list.len().to_list() == [4, 3, 3] and frame["thinking_steps"].to_list() == [4, 3, 3]
    assert frame["steps"][2].to_list()[1] == "The area is side times side, 5 * 4 = 20."
    assert (frame["steps"].list.join("\n\n") == frame["response"]).all()

    # eval scores labels on them as on ProcessBench's: here a labeler that found the same errors
    labeled = frame.with_columns(first_error=pl.Series([2, -1, 2], dtype=pl.Int32))
    labeled.write_parquet(tmp_path / "labeled.parquet")
    result = prmtool("eval", tmp_path / "labeled.parquet", "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.stderr
    (scores,) = json.loads((tmp_path / "eval.json").read_text())["results"]
    # one of the two wrong traces located exactly, the right one called right
    assert (scores["error_accuracy"], scores["correct_accuracy"], round(scores["f1"], 3)) == (0.5, 1.0, 0.667)


def test_deltabench_rejects_a_section_number_outside_the_trace(prmtool, write_jsonl, tmp_path):
    row = {"question": "q", "sections": [{"content": "a"}], "reason_error_section_numbers": [2]}
    result = prmtool("import", write_jsonl([row]), "--preset", "deltabench", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "row 0: reason_error_section_numbers [2] outside the sections" in result.stderr


# --- intervene, score, filter, export ------------------------------------------------------------


def trace_responses() -> pl.DataFrame:
    """Wrong traces whose error is step 1, the last thinking step (labeled so)."""
    steps = ["<think>\nProblem 0: start.", "Then WRONG.\n</think>", "So the answer is wrong."]
    row = {"problem_id": "p0", "problem": "Problem 0?", "reference_answer": "10", "response_id": "r0"}
    row |= {"steps": steps, "thinking_steps": 2, "finished": True, "correct": False, "first_error": 1}
    return pl.DataFrame([row], schema_overrides={"first_error": pl.Int32, "thinking_steps": pl.Int32})


def test_intervene_in_the_thinking_continues_it_open_and_steps_keeps_to_the_chosen_part():
    from tests.test_intervene import ScriptedInterventionEngine, settings

    class ThinkingInterventionEngine(ScriptedInterventionEngine):
        def sample(self, requests, on_progress=None):
            results = super().sample(requests, on_progress)
            if self.calls[-1][0] == "rollout":  # a reasoning model closes its thinking, then answers
                results = [[Completion("\n</think>\n\n" + s.text, s.token_ids, 2, "stop") for s in r] for r in results]
            return results

    frame = trace_responses()
    engine = ThinkingInterventionEngine({"Problem 0?": "10"})
    kept, _ = intervene_rows(frame, engine, settings(candidates=1, steps="thinking"))
    assert kept["intervention_step"].to_list() == [1] and kept["intervention_success_rate"].to_list() == [1.0]
    _, requests = engine.calls[-1]
    continued = "".join(map(chr, requests[0].prompt_ids[requests[0].prompt_ids.index(0) + 1 :]))
    assert continued == "<think>\nProblem 0: start.\n\nGOOD: redo it.\n\n"  # inside the thinking, still open

    kept, rejects = intervene_rows(frame, ThinkingInterventionEngine({"Problem 0?": "10"}), settings(steps="solution"))
    assert kept.height == 0 and rejects["intervene_reason"].to_list() == ["no_first_error"]
    assert "not among the --steps solution steps" in rejects["intervene_detail"][0]


def test_exports_mark_the_thinking_steps_and_an_intervention_inside_the_thinking_stays_an_open_turn():
    from prmtool.methods.formats import to_math_shepherd, to_sft_messages, to_trl_stepwise

    labeled = trace_responses().with_columns(step_labels=pl.Series([[1, 0, None]], dtype=pl.List(pl.Int8)))
    trl, _ = to_trl_stepwise(labeled)
    assert trl.row(0, named=True) | {"prompt": None} == {
        "prompt": None,
        "completions": ["<think>\nProblem 0: start.", "Then WRONG.\n</think>"],
        "labels": [True, False],
        "thinking": [True, True],
    }
    shepherd, _ = to_math_shepherd(labeled)
    assert shepherd["thinking"].to_list() == [[True, True]]

    guided = labeled.with_columns(
        response=pl.lit("<think>\nProblem 0: start.\n\nThen WRONG.\n</think>\n\nSo the answer is wrong."),
        guided_response=pl.lit("<think>\nProblem 0: start.\n\nGOOD: redo it."),
        intervention_step=pl.lit(1, dtype=pl.Int32),
    )
    sft, _ = to_sft_messages(guided)
    assert sft["messages"][0][-1]["content"] == "<think>\nProblem 0: start.\n\nGOOD: redo it."
    assert sft["continue_final_message"].to_list() == [True]  # the thinking it opened is not closed by an end-of-turn
    plain, _ = to_sft_messages(guided.with_columns(intervention_step=pl.lit(2, dtype=pl.Int32)))
    assert "continue_final_message" not in plain.columns


def test_score_and_filter_steps_read_the_chosen_part_of_a_trace():
    from prmtool.methods.filtering import FilterConfig, row_features
    from prmtool.stages.score import ScoreSettings, within_steps

    scored = pl.DataFrame(
        {
            "thinking_steps": [2],
            "step_rewards": [[0.5, -1.0, 2.0]],
            "step_values": [[0.5, -0.5, 1.5]],
            "prm_score": [-1.0],
        }
    )
    thinking = within_steps(scored, ScoreSettings(no_ref=True, agg="min", steps="thinking"))
    assert thinking["step_rewards"].to_list() == [[0.5, -1.0, None]] and thinking["prm_score"].to_list() == [-1.0]
    solution = within_steps(scored, ScoreSettings(no_ref=True, agg="min", steps="solution"))
    assert solution["step_values"].to_list() == [[None, None, 1.5]] and solution["prm_score"].to_list() == [2.0]

    rows = scored.with_columns(
        problem_id=pl.lit("p"), response_id=pl.lit("r"), correct=pl.lit(True), steps=pl.lit(["a", "b", "c"])
    )
    for steps, mean in (("all", 0.5), ("thinking", -0.25), ("solution", 2.0)):
        assert row_features(rows, FilterConfig(steps=steps))["_value"].to_list() == [mean]


@pytest.mark.slow
def test_label_binary_on_long_traces_with_the_embedded_model(prmtool, write_jsonl, tmp_path, monkeypatch):
    """End to end on CPU: the shortest wrong trace of the development set (3,457 characters),
    imported with --split think --min-step-tokens 40 (26 steps, 17 of them thinking, so that the
    search's first probe, after step 13, is inside the thinking), verified, and labeled by
    binary search with SmolLM2-135M-Instruct, one rollout a probe (each prefix is up to 1,500
    tokens to read on a CPU: a minute or two in all). Every rollout prefix of a thinking step is
    the thinking so far, opened and not closed."""
    from prmtool.engines.hf import HFEngine

    shortest = {"Sky-T1-math-correct-5K-14B-amc23-25"}
    rows = [row for row in map(json.loads, LONG_COT.open()) if row["response_id"] in shortest]
    prefixes: list[str] = []
    encode = HFEngine.continuation_ids_batch

    def recording(self, prompt_ids, partial_answers):
        prefixes.extend(partial_answers)
        return encode(self, prompt_ids, partial_answers)

    monkeypatch.setattr(HFEngine, "continuation_ids_batch", recording)
    imported = prmtool("import", write_jsonl(rows), "--split", "think", "--min-step-tokens", "40", "-o", tmp_path / "t")
    assert imported.exit_code == 0
    assert prmtool("verify", tmp_path / "t", "-o", tmp_path / "verified", "--workers", "1").exit_code == 0
    result = prmtool("label", tmp_path / "verified", "-o", tmp_path / "labeled", "--method", "binary", "--k", "1",
                     "--max-tokens", "16", "--device", "cpu", "--workers", "1", "--split", "think")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    labeled = pl.read_parquet(tmp_path / "labeled" / "part-00000.parquet")
    assert labeled["correct"].to_list() == [False] and labeled["thinking_steps"].to_list() == [17]
    for steps, thinking, first_error, labels in labeled.select(
        "steps", "thinking_steps", "first_error", "step_labels"
    ).iter_rows():
        assert 0 <= first_error < len(steps) and labels[first_error] == 0
    inside = [p for p in prefixes if "<|end_of_thought|>" not in p]
    assert inside and all(p.startswith("<|begin_of_thought|>") for p in inside)
    assert labeled["label_tokens"].sum() > 0


def test_generate_with_a_thinking_chat_template_writes_traces_that_start_inside_the_thinking():
    from prmtool.engines import Engine
    from prmtool.stages.generate import generate_rows

    class ThinkingModel(Engine):
        """Its chat template opens the thinking; it writes the rest of a trace."""

        tokenizer = PromptTail()

        def chat_prompt_ids(self, problem, system_prompt=None, prompt_template=None):
            return [1, 2, 3]

        def sample(self, requests, on_progress=None):
            thought = "\n\n".join(paragraph(60, seed) for seed in range(8))
            return [
                [
                    Completion(f"{thought}\n</think>\n\nSo the answer is $\\boxed{{4}}$.", [1], 900, "stop"),
                    Completion(thought, [1], 1024, "length"),  # cut off while thinking
                ]
                for _ in requests
            ]

        def score(self, requests):
            raise NotImplementedError

    problems = pl.DataFrame({"problem_id": ["p"], "problem": ["2 + 2?"], "reference_answer": ["4"]})
    generated = generate_rows(problems, ThinkingModel(), n=2, split="think", think=ThinkSplit(min_step_tokens=100))
    assert generated["finished"].to_list() == [True, False]
    assert generated["thinking_steps"].to_list() == [4, 4]  # 8 paragraphs of 61 tokens, two a step
    assert (generated["steps"].list.join("\n\n") == generated["response"]).all()
    from prmtool.methods.verification import verify_rows

    verified = verify_rows(generated, workers=1)
    assert verified["verify_status"].to_list() == ["ok", "no_answer"] and verified["correct"].to_list() == [True, False]


def test_steps_without_thinking_steps_is_an_error_before_any_model_loads(prmtool, responses_dir, tmp_path):
    assert prmtool("verify", responses_dir, "-o", tmp_path / "v", "--workers", "1").exit_code == 0
    result = prmtool("label", tmp_path / "v", "-o", tmp_path / "l", "--steps", "thinking")
    assert result.exit_code == 2 and "missing required column 'thinking_steps'" in result.stderr
    assert "loading model" not in result.stderr and not (tmp_path / "l" / "part-00000.parquet").exists()
