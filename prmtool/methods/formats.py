"""The training formats `prmtool export` writes, each documented once with its columns.

Every converter is a pure function: a frame of contract rows in, a frame of the format out,
plus the count of rows it could not convert (and why).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import polars as pl

from prmtool.core.errors import InputError

MATH_SHEPHERD_TAG = "ки"
# Qwen2.5-Math-PRM reads a step's reward at the `<extra_0>` token that ends it, in a chat whose
# system turn is this one (its model card's usage).
QWEN_PRM_SEPARATOR = "<extra_0>"
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Declared, not inferred: a frame of no rows (everything filtered out) keeps its column types.
MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
VERL_SCHEMA = {
    "data_source": pl.String,
    "prompt": MESSAGES,
    "ability": pl.String,
    "reward_model": pl.Struct({"style": pl.String, "ground_truth": pl.String}),
    "extra_info": pl.Struct({"split": pl.String, "index": pl.Int64, "problem_id": pl.String}),
}


@dataclass(frozen=True)
class Format:
    name: str
    columns: str  # the documented output columns
    required: tuple[str, ...]
    convert: Callable[..., tuple[pl.DataFrame, dict[str, int]]]
    per_problem: bool = False  # one row per problem rather than per response
    step_tag: bool = False  # takes --step-tag
    open_turn: bool = False  # takes --open-turn (an assistant turn left open, no end-of-turn)
    system_turn: bool = False  # has a place for --system-prompt


def check_values(
    frame: pl.DataFrame, required: tuple[str, ...], where: str = "frame", rows: pl.Series | None = None
) -> None:
    """Refuse rows a format would write wrongly, naming `where` (a file), the row (`rows`: each
    row's number in it) and column: a null problem or response (it would read `None`), a null
    step among `steps`, a step label that is not 1 (good), 0 (bad) or null (unlabeled)."""
    for column in ("problem", "response"):
        if column not in required or column not in frame.columns:
            continue
        values = frame[column]
        if column == "response" and "guided_response" in frame.columns:  # the assistant turn is either
            values = frame.select(pl.coalesce("guided_response", "response"))["guided_response"]
        _refuse(values.is_null(), where, rows, f"column '{column}' is null")
    if "steps" in required and "steps" in frame.columns:
        null_step = frame["steps"].list.eval(pl.element().is_null()).list.any()
        _refuse(null_step, where, rows, "column 'steps' holds a null step")
    if "step_labels" in required and "step_labels" in frame.columns:
        wrong = frame["step_labels"].list.eval(pl.element().is_not_null() & ~pl.element().is_in([0, 1])).list.any()
        _refuse(wrong, where, rows, "column 'step_labels' holds a value other than 1 (good), 0 (bad) or null")


def _refuse(bad: pl.Series, where: str, rows: pl.Series | None, message: str) -> None:
    bad = bad.fill_null(False)
    if bad.any():
        first = int(bad.arg_true()[0])
        raise InputError(f"{where}: row {first if rows is None else rows[first]}: {message}")


def labeled_prefix(steps: list[str] | None, labels: list[int | None] | None) -> tuple[list[str], list[bool]]:
    """Steps up to the first unlabeled one, with their labels as bools. Steps after a first
    error are unlabeled (binary search leaves them so); training on them would invent labels."""
    if not steps or labels is None:
        return [], []
    kept_steps, kept_labels = [], []
    for step, label in zip(steps, labels):
        if label is None:
            break
        kept_steps.append(step)
        kept_labels.append(bool(label))
    return kept_steps, kept_labels


_BLANK_LINES_AT_START = re.compile(r"^(?:[ \t]*\r?\n)+")
_BLANK_LINES_AT_END = re.compile(r"(?:\r?\n[ \t]*)+$")


def training_step(step: str) -> str:
    """A step as training text: without the blank lines a lossless split leaves at its start
    or end (the separator of a blank piece glued to it, steps.py). Trainers join steps with
    their own separator (TRL's step_separator), where those would become empty lines; the
    exported row's input keeps them in `steps`."""
    return _BLANK_LINES_AT_END.sub("", _BLANK_LINES_AT_START.sub("", step))


def _labeled(frame: pl.DataFrame) -> tuple[list[tuple[list[str], list[bool]]], list[int], dict[str, int]]:
    pairs, keep = [], []
    counts = {"skipped_unlabeled": 0, "truncated_at_unlabeled_step": 0}
    for index, (steps, labels) in enumerate(zip(frame["steps"].to_list(), frame["step_labels"].to_list())):
        if steps is not None and labels is not None and len(steps) != len(labels):
            raise InputError(
                f"response_id {frame['response_id'][index] if 'response_id' in frame.columns else index!r}: "
                f"{len(labels)} step_labels for {len(steps)} steps"
            )
        kept_steps, kept_labels = labeled_prefix(steps, labels)
        if not kept_steps:
            counts["skipped_unlabeled"] += 1
            continue
        if len(kept_steps) < len(steps):
            counts["truncated_at_unlabeled_step"] += 1
        pairs.append(([training_step(step) for step in kept_steps], kept_labels))
        keep.append(index)
    return pairs, keep, counts


def _thinking_marks(frame: pl.DataFrame, keep: list[int], pairs: list) -> pl.Series | None:
    """Reasoning traces (a `thinking_steps` column): which of each row's exported steps are
    thinking, True for the leading thinking steps; None for rows of plain responses."""
    if "thinking_steps" not in frame.columns:
        return None
    thinking = frame["thinking_steps"].gather(keep).to_list()
    marks = [[i < (count or 0) for i in range(len(steps))] for (steps, _), count in zip(pairs, thinking)]
    return pl.Series("thinking", marks, dtype=pl.List(pl.Boolean))


def to_trl_stepwise(
    frame: pl.DataFrame, prompt_template: str = "{problem}", **_
) -> tuple[pl.DataFrame, dict[str, int]]:
    pairs, keep, counts = _labeled(frame)
    out = pl.DataFrame(
        {
            "prompt": _user_prompt(frame, prompt_template).gather(keep),
            "completions": pl.Series([s for s, _ in pairs], dtype=pl.List(pl.String)),
            "labels": pl.Series([lab for _, lab in pairs], dtype=pl.List(pl.Boolean)),
        }
    )
    thinking = _thinking_marks(frame, keep, pairs)
    return (out if thinking is None else out.with_columns(thinking)), counts


def to_math_shepherd(
    frame: pl.DataFrame, prompt_template: str = "{problem}", step_tag: str = MATH_SHEPHERD_TAG, **_
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Math-Shepherd's layout: `input` has the step tag after every step, `label` has `+` or `-`
    in its place, `task` names the source (a `task` column of the input; null without one).
    `value` lists the same `+`/`-` per step: OpenRLHF's PRM trainer reads `--input_key input
    --label_key value --placeholder_token TAG --reward_tokens + -`, and wants the tag to be one
    token of its tokenizer (pick it with `--step-tag`; ` ки` is two tokens for SmolLM2)."""
    pairs, keep, counts = _labeled(frame)
    inputs, labels, values = [], [], []
    for problem, (steps, step_labels) in zip(_user_prompt(frame, prompt_template).gather(keep), pairs):
        signs = ["+" if good else "-" for good in step_labels]
        inputs.append(f"{problem} " + "\n".join(f"{step} {step_tag}" for step in steps))
        labels.append(f"{problem} " + "\n".join(f"{step} {sign}" for step, sign in zip(steps, signs)))
        values.append(signs)
    task = frame["task"].cast(pl.String).gather(keep) if "task" in frame.columns else [None] * len(inputs)
    out = pl.DataFrame(
        {"input": inputs, "label": labels, "value": values, "task": task},
        schema={"input": pl.String, "label": pl.String, "value": pl.List(pl.String), "task": pl.String},
    )
    thinking = _thinking_marks(frame, keep, pairs)
    return (out if thinking is None else out.with_columns(thinking)), counts


def _soft_labeled(frame: pl.DataFrame) -> tuple[list[tuple[list[str], list[float]]], list[int], dict[str, int]]:
    """Steps up to the first one without a Monte Carlo value, with their values."""
    pairs, keep = [], []
    counts = {"skipped_unlabeled": 0, "truncated_at_unlabeled_step": 0}
    for index, (steps, values) in enumerate(zip(frame["steps"].to_list(), frame["step_mc"].to_list())):
        if steps is not None and values is not None and len(steps) != len(values):
            raise InputError(
                f"response_id {frame['response_id'][index] if 'response_id' in frame.columns else index!r}: "
                f"{len(values)} step_mc for {len(steps)} steps"
            )
        kept_steps, kept_values = [], []
        for step, value in zip(steps or [], values or []):
            if value is None:
                break
            kept_steps.append(step)
            kept_values.append(float(value))
        if not kept_steps:
            counts["skipped_unlabeled"] += 1
            continue
        if len(kept_steps) < len(steps):
            counts["truncated_at_unlabeled_step"] += 1
        pairs.append((kept_steps, kept_values))
        keep.append(index)
    return pairs, keep, counts


def to_math_shepherd_soft(
    frame: pl.DataFrame, prompt_template: str = "{problem}", step_tag: str = MATH_SHEPHERD_TAG, **_
) -> tuple[pl.DataFrame, dict[str, int]]:
    """`math-shepherd`'s layout with soft labels: `value` holds each step's `step_mc`, the
    probability that the step leads to the right answer, which OpenRLHF's PRM trainer reads in
    its soft-label mode (`--label_key value` with float values, `--reward_tokens + -`); `label`
    keeps Math-Shepherd's hard reading of it (`+` where step_mc > 0)."""
    pairs, keep, counts = _soft_labeled(frame)
    inputs, labels, values = [], [], []
    for problem, (steps, step_values) in zip(_user_prompt(frame, prompt_template).gather(keep), pairs):
        signs = ["+" if value > 0 else "-" for value in step_values]
        inputs.append(f"{problem} " + "\n".join(f"{step} {step_tag}" for step in steps))
        labels.append(f"{problem} " + "\n".join(f"{step} {sign}" for step, sign in zip(steps, signs)))
        values.append(step_values)
    task = frame["task"].cast(pl.String).gather(keep) if "task" in frame.columns else [None] * len(inputs)
    out = pl.DataFrame(
        {"input": inputs, "label": labels, "value": values, "task": task},
        schema={"input": pl.String, "label": pl.String, "value": pl.List(pl.Float64), "task": pl.String},
    )
    return out, counts


def to_qwen_prm(
    frame: pl.DataFrame, prompt_template: str = "{problem}", system_prompt: str | None = None, **_
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Qwen2.5-Math-PRM's input: a chat whose assistant turn is the steps each followed by
    `<extra_0>`, where the model reads (and a trainer puts) each step's label."""
    pairs, keep, counts = _labeled(frame)
    system = QWEN_PRM_SYSTEM if system_prompt is None else system_prompt
    messages = [
        _messages(prompt, system, "".join(step + QWEN_PRM_SEPARATOR for step in steps))
        for prompt, (steps, _) in zip(_user_prompt(frame, prompt_template).gather(keep), pairs)
    ]
    out = pl.DataFrame(
        {"messages": messages, "labels": [labels for _, labels in pairs]},
        schema={"messages": MESSAGES, "labels": pl.List(pl.Boolean)},
    )
    return out, counts


def _user_prompt(frame: pl.DataFrame, prompt_template: str) -> pl.Series:
    return frame["problem"].map_elements(lambda p: prompt_template.replace("{problem}", p), return_dtype=pl.String)


def _messages(prompt: str, system_prompt: str | None, answer: str | None = None) -> list[dict]:
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns.append({"role": "user", "content": prompt})
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def _assistant_turn(frame: pl.DataFrame) -> tuple[pl.Series, dict[str, int]]:
    """The response, or the guided response where intervene wrote one (InT's SFT target: the
    steps before the first error plus the intervention)."""
    if "guided_response" not in frame.columns:
        return frame["response"], {}
    guided = frame["guided_response"].is_not_null().sum()
    return frame.select(pl.coalesce("guided_response", "response"))["guided_response"], {
        "assistant_turn_from_guided_response": guided
    }


def _open_turn(out: pl.DataFrame, open_turn: bool, frame: pl.DataFrame | None = None) -> pl.DataFrame:
    """--open-turn: the assistant turn has no end-of-turn. TRL's SFTTrainer reads a row's
    `chat_template_kwargs` and passes them to the chat template; `continue_final_message` is the
    same flag for `tokenizer.apply_chat_template(messages, continue_final_message=True)`.
    Without --open-turn, the turns of reasoning traces whose intervention falls inside the
    thinking are open all the same: their guided response ends in an unclosed thinking block,
    which an end-of-turn would teach the model to close by stopping."""
    opened = [True] * out.height if open_turn else _inside_thinking(frame)
    if not any(opened):
        return out
    kwargs = pl.Series("chat_template_kwargs", [{"continue_final_message": o} for o in opened])
    return out.with_columns(continue_final_message=pl.Series(opened, dtype=pl.Boolean), chat_template_kwargs=kwargs)


def _inside_thinking(frame: pl.DataFrame | None) -> list[bool]:
    """Rows whose assistant turn is a guided response that stops inside the trace's thinking."""
    if frame is None or not {"thinking_steps", "intervention_step", "guided_response"} <= set(frame.columns):
        return [False] * (0 if frame is None else frame.height)
    return [
        guided is not None and step is not None and step < (thinking or 0)
        for guided, step, thinking in frame.select("guided_response", "intervention_step", "thinking_steps").iter_rows()
    ]


def to_sft_messages(
    frame: pl.DataFrame,
    prompt_template: str = "{problem}",
    system_prompt: str | None = None,
    open_turn: bool = False,
    **_,
):
    prompts = _user_prompt(frame, prompt_template)
    answers, counts = _assistant_turn(frame)
    messages = [_messages(p, system_prompt, r) for p, r in zip(prompts, answers)]
    return _open_turn(pl.DataFrame({"messages": messages}, schema={"messages": MESSAGES}), open_turn, frame), counts


def to_sft_prompt_completion(frame: pl.DataFrame, prompt_template: str = "{problem}", open_turn: bool = False, **_):
    """Plain text: TRL concatenates prompt and completion, so the prompt ends with a blank line
    (`...market?\n\nJanet sells...`, not `...market?Janet sells...`)."""
    answers, counts = _assistant_turn(frame)
    prompts = _user_prompt(frame, prompt_template).map_elements(
        lambda p: p if p.endswith((" ", "\n")) else p + "\n\n", return_dtype=pl.String
    )
    return _open_turn(pl.DataFrame({"prompt": prompts, "completion": answers}), open_turn, frame), counts


def to_sft_prompt_completion_chat(
    frame: pl.DataFrame,
    prompt_template: str = "{problem}",
    system_prompt: str | None = None,
    open_turn: bool = False,
    **_,
):
    """TRL's conversational prompt-completion: the chat template renders the prompt turns, and
    the loss is on the completion turn only."""
    answers, counts = _assistant_turn(frame)
    prompts = [_messages(p, system_prompt) for p in _user_prompt(frame, prompt_template)]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    out = pl.DataFrame(
        {"prompt": prompts, "completion": completions}, schema={"prompt": MESSAGES, "completion": MESSAGES}
    )
    return _open_turn(out, open_turn, frame), counts


def _ground_truths(frame: pl.DataFrame) -> list[str]:
    answers = frame["reference_answer"].cast(pl.String)
    if answers.null_count():  # a reward function cannot score against nothing
        row = int(answers.is_null().arg_true()[0])
        raise InputError(
            f"problem_id {frame['problem_id'][row]!r}: verl needs a reference_answer (reward_model.ground_truth) and "
            f"it is null"
        )
    return answers.to_list()


def to_verl(
    frame: pl.DataFrame,
    prompt_template: str = "{problem}",
    system_prompt: str | None = None,
    data_source: str = "lighteval/MATH",
    split_name: str = "train",
    start_index: int = 0,
    **_,
):
    prompts = _user_prompt(frame, prompt_template)
    out = pl.DataFrame(
        {
            "data_source": [data_source] * frame.height,
            "prompt": [_messages(p, system_prompt) for p in prompts],
            "ability": ["math"] * frame.height,
            "reward_model": [{"style": "rule", "ground_truth": a} for a in _ground_truths(frame)],
            "extra_info": [
                {"split": split_name, "index": start_index + i, "problem_id": pid}
                for i, pid in enumerate(frame["problem_id"])
            ],
        },
        schema=VERL_SCHEMA,
    )
    return out, {}


def to_jsonl(frame: pl.DataFrame, **_) -> tuple[pl.DataFrame, dict[str, int]]:
    """The rows as they are, every column: for `-o -` and shell pipelines (`jq`, `head`)."""
    return frame, {}


FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format(
            "trl-stepwise",
            "prompt: str, completions: list[str] (steps), labels: list[bool]; thinking: list[bool] (which "
            "steps are a reasoning trace's thinking) for traces",
            ("problem", "steps", "step_labels"),
            to_trl_stepwise,
        ),
        Format(
            "math-shepherd",
            f"input: str (problem, then each step followed by ' {MATH_SHEPHERD_TAG}'), label: str (the same with '+' "
            f"or '-'), value: list[str] (the '+'/'-' per step), task: str (the input's task column, else null); "
            f"thinking: list[bool] (which steps are a reasoning trace's thinking) for traces",
            ("problem", "steps", "step_labels"),
            to_math_shepherd,
            step_tag=True,
        ),
        Format(
            "math-shepherd-soft",
            "input: str (as math-shepherd's), label: str ('+' where step_mc > 0, else '-'), value: list[float] "
            "(each step's step_mc: OpenRLHF's soft labels), task: str",
            ("problem", "steps", "step_mc"),
            to_math_shepherd_soft,
            step_tag=True,
        ),
        Format(
            "qwen-prm",
            f"messages: list[{{role, content}}] (system, by default Qwen2.5-Math-PRM's; user problem; assistant: "
            f"each step followed by '{QWEN_PRM_SEPARATOR}'), labels: list[bool] (one per '{QWEN_PRM_SEPARATOR}')",
            ("problem", "steps", "step_labels"),
            to_qwen_prm,
            system_turn=True,
        ),
        Format(
            "sft-messages",
            "messages: list[{role, content}] (optional system, user problem, assistant guided_response or response); "
            "continue_final_message: bool and chat_template_kwargs: {continue_final_message} with --open-turn",
            ("problem", "response"),
            to_sft_messages,
            open_turn=True,
            system_turn=True,
        ),
        Format(
            "sft-prompt-completion",
            "prompt: str (ends with a blank line), completion: str (guided_response or response); "
            "continue_final_message: bool and "
            "chat_template_kwargs: {continue_final_message} with --open-turn",
            ("problem", "response"),
            to_sft_prompt_completion,
            open_turn=True,
        ),
        Format(
            "sft-prompt-completion-chat",
            "prompt: list[{role, content}] (optional system, user problem), completion: list[{role: assistant, "
            "content}] (guided_response or response); chat_template_kwargs with --open-turn",
            ("problem", "response"),
            to_sft_prompt_completion_chat,
            open_turn=True,
            system_turn=True,
        ),
        Format(
            "verl",
            "data_source: str, prompt: list[{role, content}], ability: str, reward_model: "
            "{style: 'rule', ground_truth}, extra_info: {split, index, problem_id}",
            ("problem_id", "problem", "reference_answer"),
            to_verl,
            per_problem=True,
            system_turn=True,
        ),
        Format("jsonl", "every column of the input rows, as they are", (), to_jsonl),
    ]
}
