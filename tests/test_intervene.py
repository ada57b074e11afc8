"""`prmtool intervene`: corrective steps at the first error of wrong responses (InT), kept only
when rollouts from them reach the reference answer.

The parsers are tested on the texts models actually write; the control flow on a scripted
engine whose rollouts are right exactly when the intervention says so (and never when the
wrong step is still in the prefix); the command end to end on a tiny random model and on the
embedded SmolLM2.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction

import polars as pl
import pytest

from prmtool.engines import Completion, Engine
from prmtool.methods import interventions as iv
from prmtool.methods.intervention_rounds import InterventionConfig, intervene_rows
from prmtool.methods.interventions import Candidate, Rejection, answer_leak, parse_first_error, parse_intervention
from prmtool.methods.rollouts import RolloutSettings
from tests.conftest import SAMPLES, files_under


def tag(body: str) -> str:
    return f"Some analysis first.\n\n<intervention>{body}</intervention>"


# --- parsing: what a proposal may look like ------------------------------------------------------


def test_a_json_tag_gives_the_content_and_the_0_based_step_it_replaces():
    parsed = parse_intervention(tag('{"content": "I should subtract the 3 eggs first.", "location": 2}'), 3, "18")
    assert parsed == Candidate("I should subtract the 3 eggs first.", 1)


def test_the_last_tag_wins():
    text = (
        tag('{"content": "draft", "location": 1}')
        + "\nSelf-check passed.\n"
        + tag('{"content": "final", "location": 2}')
    )
    assert parse_intervention(text, 3, "18") == Candidate("final", 1)


@pytest.mark.parametrize(
    "body, content",
    [
        ("{'content': 'Python quotes', 'location': 2}", "Python quotes"),
        ("{'content': '''triple \"quoted\"''', 'location': 2}", 'triple "quoted"'),
        ('{"content": "a step", "location": 2,}', "a step"),  # trailing comma: not JSON, a literal
        ('```json\n{"content": "fenced", "location": 2}\n```', "fenced"),
        ('{"content": "line one\nline two", "location": 2}', "line one\nline two"),  # raw newline in JSON
        ('{"content": "He said "wait" here", "location": 2}', 'He said "wait" here'),  # InT's triple-quote repair
        ('{"content": "unicode \\u00e9", "location": 2}', "unicode é"),
        ('{"content": "stray text after it", "location": 2}</intervention}\n```', "stray text after it"),
    ],
    ids=[
        "python-literal",
        "triple-quotes",
        "trailing-comma",
        "code-fence",
        "raw-newline",
        "inner-quotes",
        "unicode-escape",
        "stray-text-after",
    ],
)
def test_json_or_a_python_literal_is_accepted(body, content):
    assert parse_intervention(tag(body), 3, "18") == Candidate(content, 1)


def test_latex_backslashes_written_unescaped_stay_latex():
    # In JSON, \f, \t, \b, \r and \n are escapes: \frac would become a form feed and "rac".
    body = r'{"content": "So $\frac{a}{b} \times \theta \right) \neq 0$, then\nNext I check \boxed{x}", "location": 1}'
    parsed = parse_intervention(tag(body), 3, "18")
    assert parsed == Rejection(iv.STATES_FINAL_ANSWER, "the content states a final answer (x)"), (
        "\\boxed survives as LaTeX"
    )
    body = r'{"content": "So $\frac{a}{b} \times \theta \neq 0$,\nthen \nabla f\nNext", "location": 1}'
    assert parse_intervention(tag(body), 3, "18") == Candidate(
        "So $\\frac{a}{b} \\times \\theta \\neq 0$,\nthen \\nabla f\nNext", 0
    )
    escaped = r'{"content": "properly escaped \\frac{1}{3}", "location": 1}'
    assert parse_intervention(tag(escaped), 3, "18") == Candidate("properly escaped \\frac{1}{3}", 0)


@pytest.mark.parametrize("location", [3, 3.0, "3", "Step 3", "Substep 3", "**Substep 3:**"])
def test_a_location_may_be_written_as_a_number_or_a_step_name(location):
    body = '{"content": "a step", "location": %s}' % (f'"{location}"' if isinstance(location, str) else location)
    assert parse_intervention(tag(body), 4, "18") == Candidate("a step", 2)


@pytest.mark.parametrize(
    "text, detail",
    [
        ("no tag at all", "no complete <intervention>"),
        ('<intervention>{"content": "cut off by max_tokens", "loca', "no complete <intervention>"),
        ('<Intervention>{"content": "x", "location": 1}</Intervention>', "no complete <intervention>"),
        (tag("just prose, no mapping"), "neither JSON nor a Python literal"),
        (tag('["content", "location"]'), "holds a list"),
        (tag('"a string"'), "holds a str"),
        (tag('{"location": 1}'), "no non-empty string 'content'"),
        (tag('{"content": "   ", "location": 1}'), "no non-empty string 'content'"),
        (tag('{"content": "...", "location": 1}'), "the format's placeholder"),
        (tag('{"content": 42, "location": 1}'), "no non-empty string 'content'"),
        (tag('{"content": "a step"}'), "no 'location'"),
        (tag('{"content": "a step", "location": "the second one"}'), "is not a step number"),
        (tag('{"content": "a step", "location": true}'), "is not a step number"),
        (tag('{"content": "a step", "location": 1.5}'), "is not a step number"),
        (tag("__import__('os').system('touch /tmp/pwned')"), "neither JSON nor a Python literal"),
        (tag("{'content': open('/etc/passwd').read(), 'location': 1}"), "neither JSON nor a Python literal"),
    ],
    ids=[
        "no-tag",
        "unclosed",
        "wrong-case",
        "prose",
        "list",
        "string",
        "no-content",
        "blank-content",
        "number-content",
        "placeholder",
        "no-location",
        "word-location",
        "bool-location",
        "fractional-location",
        "code",
        "call-in-dict",
    ],
)
def test_malformed_proposals_are_unparseable_with_the_reason(text, detail):
    parsed = parse_intervention(text, 3, "18")
    assert isinstance(parsed, Rejection) and parsed.reason == iv.UNPARSEABLE
    assert detail in parsed.detail


def test_code_in_a_tag_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    parse_intervention(tag(f"__import__('pathlib').Path({str(marker)!r}).touch()"), 3, "18")
    assert not marker.exists()


@pytest.mark.parametrize(
    "location, latest, detail",
    [
        (0, None, "location 0 is not a step of the response (1..3)"),
        (-1, None, "location -1 is not a step of the response (1..3)"),
        (4, None, "location 4 is not a step of the response (1..3)"),
        (3, 1, "location 3 comes after the first error (substep 2)"),
    ],
)
def test_locations_outside_the_response_or_after_the_first_error_are_out_of_range(location, latest, detail):
    parsed = parse_intervention(tag('{"content": "a step", "location": %d}' % location), 3, "18", latest=latest)
    assert parsed == Rejection(iv.LOCATION_OUT_OF_RANGE, detail)


def test_an_intervention_may_replace_the_first_error_or_an_earlier_step():
    for location in (1, 2):
        assert parse_intervention(
            tag('{"content": "a step", "location": %d}' % location), 3, "18", latest=1
        ) == Candidate("a step", location - 1)


# --- the answer-leak rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, reference",
    [
        ("So she makes 9 * 2 = 18 dollars.", "18"),
        ("That gives $18.00 a day.", "18"),
        ("The total is 1234 eggs.", "1,234"),
        ("The total is 1,234 eggs.", "1234"),
        ("Half of it, 0.5, is left.", "\\frac{1}{2}"),
        ("So $x = \\frac{3}{4}$ of the tank.", "0.75"),
        ("Then 3/4 of the tank is full.", "\\frac{3}{4}"),
        ("A loss of -5 degrees.", "-5"),
        ("Then $x^2+1$ factors.", "x^2 + 1"),
    ],
)
def test_a_number_or_expression_equal_to_the_reference_answer_leaks(content, reference):
    assert answer_leak(content, reference) is not None
    parsed = parse_intervention(tag(json.dumps({"content": content, "location": 1})), 3, reference)
    assert isinstance(parsed, Rejection) and parsed.reason == iv.LEAKS_ANSWER


@pytest.mark.parametrize(
    "content, reference, problem",
    [
        ("She makes 180 cents, I mean, let me recompute.", "18", ""),  # 180 is not 18
        ("Subtract: 16-3 leaves 13.", "-3", ""),  # subtraction, not the number -3
        (
            "She has 3 bolts of blue fiber to start with.",
            "3",
            "A robe takes 3 bolts of blue fiber.",
        ),  # given in the problem
        ("Let me count the eggs she sells.", "18", ""),
        ("Next I expand (x+1)^2.", "x^2 + 1", ""),
        ("I will check option B again.", "A", ""),  # a letter answer matches whole words only
    ],
)
def test_other_numbers_and_quantities_given_in_the_problem_do_not_leak(content, reference, problem):
    assert answer_leak(content, reference, problem) is None


def test_a_stated_final_answer_is_rejected_even_when_wrong():
    right = parse_intervention(tag('{"content": "So the answer is \\\\boxed{18}.", "location": 1}'), 3, "18")
    assert right == Rejection(iv.LEAKS_ANSWER, "the content states the reference answer 18")
    wrong = parse_intervention(tag('{"content": "The answer is 25.", "location": 1}'), 3, "18")
    assert wrong == Rejection(iv.STATES_FINAL_ANSWER, "the content states a final answer (25)")


def test_numbers_are_read_exactly():
    assert iv.as_number("1,234.50") == Fraction(246900, 200)
    assert iv.as_number("$\\frac{-3}{4}$") == Fraction(-3, 4)
    assert iv.as_number("12 apples") is None and iv.as_number("x") is None and iv.as_number("3/0") is None
    assert iv.numbers_in("16-3=13, (2)-1 and -4") == {16, 3, 13, 2, 1, -4}


# --- parsing: a first error named by the model --------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The slip is here. <first_error>2</first_error>", 1),
        ("<first_error>Substep 3</first_error>", 2),
        ('<first_error>{"location": 1}</first_error>', 0),
        ("<first_error>1</first_error> on reflection <first_error>2</first_error>", 1),
        ("<first_error>0</first_error>", -1),
        ("<first_error>none</first_error>", -1),
    ],
)
def test_the_first_error_answer_is_read_like_a_location(text, expected):
    assert parse_first_error(text, 3) == expected


@pytest.mark.parametrize(
    "text", ["Substep 2 is wrong.", "<first_error>the second</first_error>", "<first_error>7</first_error>"]
)
def test_an_unreadable_or_out_of_range_first_error_is_rejected(text):
    parsed = parse_first_error(text, 3)
    assert isinstance(parsed, Rejection) and parsed.reason == iv.FIRST_ERROR_UNPARSEABLE


def test_prompts_number_the_steps_from_one_and_name_the_error():
    prompt = iv.proposer_prompt("What is 2+3?", ["Add.", "2+3=6", "So 6."], 1, "5", "2+3=5")
    assert "**Substep 1:** Add.\n\n**Substep 2:** 2+3=6\n\n**Substep 3:** So 6." in prompt
    assert "first critical error is in Substep 2" in prompt and "# Reference Solution #\n2+3=5" in prompt
    assert '<intervention>{"content": "...", "location": 2}</intervention>' in prompt
    assert "<first_error>N</first_error>" in iv.locator_prompt("What is 2+3?", ["Add."], "5")


# --- control flow on a scripted engine -----------------------------------------------------------


class ScriptedInterventionEngine(Engine):
    """A model that reads its prompt as text.

    - A first-error question is answered by `locate(problem)`.
    - The i-th proposal request for one prompt in a call is candidate i, answered by
      `propose(problem, i)`.
    - A rollout is right when its prefix holds an intervention `GOOD` (every sample) or `GOODk`
      (the first k samples), and never when the prefix still holds the wrong step (`WRONG`).
    """

    def __init__(self, answers: dict[str, str], propose=None, locate=None):
        self.tokenizer = None
        self.answers = answers
        self.propose = propose or (lambda problem, candidate: tag('{"content": "GOOD: redo it.", "location": 2}'))
        self.locate = locate or (lambda problem: "<first_error>2</first_error>")
        self.calls: list[tuple[str, list]] = []

    def chat_prompt_ids(self, problem, system_prompt=None, prompt_template=None):
        text = (prompt_template or "{problem}").replace("{problem}", problem)
        return [ord(c) for c in text] + [0]

    def continuation_ids(self, prompt_ids, partial_answer):
        return list(prompt_ids) + [ord(c) for c in partial_answer]

    def _problem(self, prompt: str) -> str:
        return next(p for p in self.answers if p in prompt)

    def sample(self, requests, on_progress=None):
        kinds = []
        asked = Counter()
        results = []
        for request in requests:
            end = request.prompt_ids.index(0)
            prompt, prefix = (
                "".join(map(chr, request.prompt_ids[:end])),
                "".join(map(chr, request.prompt_ids[end + 1 :])),
            )
            problem = self._problem(prompt)
            if "<first_error>" in prompt:
                kinds.append("locate")
                texts = [self.locate(problem)]
            elif "<intervention>" in prompt:
                kinds.append("propose")
                texts = [self.propose(problem, asked[prompt])]
                asked[prompt] += 1
            else:
                kinds.append("rollout")
                good = re.search(r"GOOD(\d*)", prefix)
                right = 0 if "WRONG" in prefix or not good else int(good.group(1) or request.n)
                gold = int(self.answers[problem])
                texts = [f"So the result is \\boxed{{{gold if i < right else gold + 1}}}." for i in range(request.n)]
            results.append([Completion(t, [1, 2], 2, "stop") for t in texts])
        self.calls.append((kinds[0] if len(set(kinds)) == 1 else "mixed", requests))
        return results

    def score(self, requests):
        raise NotImplementedError("intervene never scores")


def wrong_responses(count: int = 6) -> pl.DataFrame:
    """Wrong responses whose step 1 (0-based) is the error, labeled so, plus one correct one."""
    rows = []
    for index in range(count):
        steps = [f"Problem {index}: start.", "Then WRONG.", "So the answer is wrong."]
        rows.append(
            {
                "problem_id": f"p{index}",
                "problem": f"Problem {index}?",
                "reference_answer": str(10 + index),
                "response_id": f"r{index}",
                "steps": steps,
                "correct": False,
                "first_error": 1,
            }
        )
    rows.append(
        {
            "problem_id": "p0",
            "problem": "Problem 0?",
            "reference_answer": "10",
            "response_id": "right",
            "steps": ["Fine.", "\\boxed{10}"],
            "correct": True,
            "first_error": -1,
        }
    )
    return pl.DataFrame(rows, schema_overrides={"first_error": pl.Int32})


def answers_of(frame: pl.DataFrame) -> dict[str, str]:
    return dict(zip(frame["problem"], frame["reference_answer"]))


def settings(**options) -> InterventionConfig:
    return InterventionConfig(
        **{"candidates": 2, "verify_rollouts": 4, "rollouts": RolloutSettings(workers=1), **options}
    )


def test_kept_interventions_replace_the_first_error_and_drop_the_failed_suffix():
    frame = wrong_responses(3)
    kept, rejects = intervene_rows(frame, ScriptedInterventionEngine(answers_of(frame)), settings(candidates=1))
    assert kept.height == 3
    assert kept.columns[: len(frame.columns)] == frame.columns, "every input column, unchanged"
    for row in kept.iter_rows(named=True):
        assert row["intervention"] == "GOOD: redo it." and row["intervention_step"] == 1
        assert row["guided_response"] == row["steps"][0] + "\n\n" + "GOOD: redo it."
        assert row["intervention_success_rate"] == 1.0
        assert (row["intervene_candidate"], row["intervene_first_error"], row["intervene_first_error_source"]) == (
            0,
            1,
            "labels",
        )
    assert rejects.select("response_id", "intervene_reason").rows() == [("right", "not_wrong")]


def test_rollouts_continue_the_guided_prefix_not_the_wrong_step():
    frame = wrong_responses(1).head(1)
    engine = ScriptedInterventionEngine(answers_of(frame))
    intervene_rows(frame, engine, settings(candidates=1))
    kind, requests = engine.calls[-1]
    assert kind == "rollout" and len(requests) == 1 and requests[0].n == 4
    continued = "".join(map(chr, requests[0].prompt_ids[requests[0].prompt_ids.index(0) + 1 :]))
    assert continued == "Problem 0: start.\n\nGOOD: redo it.\n\n"


@pytest.mark.parametrize("min_success, kept", [(1, 2), (2, 2), (3, 1), (4, 0)])
def test_a_candidate_is_kept_when_at_least_min_success_rollouts_are_right(min_success, kept):
    frame = wrong_responses(1).head(1)
    proposals = ['{"content": "GOOD2 half of them", "location": 2}', '{"content": "GOOD3 most of them", "location": 2}']
    engine = ScriptedInterventionEngine(answers_of(frame), propose=lambda problem, c: tag(proposals[c]))
    out, rejects = intervene_rows(frame, engine, settings(min_success=min_success))
    assert out.height == kept
    measured = pl.concat([out, rejects.drop(c for c in rejects.columns if c not in out.columns)])
    assert sorted(measured.select("intervene_candidate", "intervention_success_rate").rows()) == [
        (0, 0.5),
        (1, 0.75),
    ], "the success rate is measured whether kept or not"
    assert set(rejects["intervene_reason"]) <= {"not_verified"}
    for detail in rejects["intervene_detail"]:
        assert f"of 4 rollouts reached the answer; --min-success is {min_success}" in detail


def test_every_rejected_candidate_is_in_the_rejects_with_its_reason():
    frame = wrong_responses(1).head(1)
    proposals = [
        "I am not sure what to do.",  # no tag
        tag('{"content": "Then 9 * 2 = 10 eggs.", "location": 2}'),  # the reference answer (10)
        tag('{"content": "GOOD fix", "location": 3}'),  # after the first error
        tag('{"content": "GOOD fix", "location": 2}'),  # kept
        tag('{"content": "GOOD fix", "location": 2}'),  # the same again
        tag('{"content": "BAD fix", "location": 1}'),  # no rollout is right
    ]
    engine = ScriptedInterventionEngine(answers_of(frame), propose=lambda problem, c: proposals[c])
    kept, rejects = intervene_rows(frame, engine, settings(candidates=len(proposals)))
    assert kept["intervene_candidate"].to_list() == [3]
    assert rejects.select("intervene_candidate", "intervene_reason").rows() == [
        (0, "unparseable"),
        (1, "leaks_answer"),
        (2, "location_out_of_range"),
        (4, "duplicate"),
        (5, "not_verified"),
    ]
    assert rejects["intervene_output"].to_list() == [proposals[i] for i in (0, 1, 2, 4, 5)], (
        "the raw answer, for auditing"
    )
    assert rejects["intervention"].to_list() == [None, "Then 9 * 2 = 10 eggs.", "GOOD fix", "GOOD fix", "BAD fix"]
    assert rejects["intervention_step"].to_list() == [None, 1, 2, 1, 0]
    assert rejects["intervention_success_rate"].to_list() == [None, None, None, None, 0.0]


def test_all_rows_advance_together_one_call_for_proposals_one_for_rollouts():
    frame = wrong_responses(6)
    engine = ScriptedInterventionEngine(answers_of(frame))
    kept, _ = intervene_rows(frame, engine, settings(candidates=3))
    assert [(kind, len(requests)) for kind, requests in engine.calls] == [("propose", 18), ("rollout", 6)]
    assert kept.height == 6, "three identical proposals per row: one kept, two duplicates"


def test_first_errors_come_from_the_labels_when_present_and_the_model_otherwise():
    frame = wrong_responses(4).with_columns(
        first_error=pl.Series([1, None, -1, 7, -1], dtype=pl.Int32)  # a label, then three rows it names no step of
    )
    engine = ScriptedInterventionEngine(answers_of(frame))
    kept, rejects = intervene_rows(frame, engine, settings(candidates=1))  # auto
    assert [kind for kind, _ in engine.calls] == ["locate", "propose", "rollout"]
    assert len(engine.calls[0][1]) == 3 and engine.calls[0][1][0].temperature == 0.0, (
        "one greedy question per unlabeled row"
    )
    assert kept.select("response_id", "intervene_first_error_source").rows() == [
        ("r0", "labels"),
        ("r1", "model"),
        ("r2", "model"),
        ("r3", "model"),
    ]

    labels_only = ScriptedInterventionEngine(answers_of(frame))
    kept, rejects = intervene_rows(frame, labels_only, settings(candidates=1, first_error="from-labels"))
    assert [kind for kind, _ in labels_only.calls] == ["propose", "rollout"], "from-labels never asks the model"
    assert kept["response_id"].to_list() == ["r0"]
    assert rejects.select("response_id", "intervene_reason", "intervene_detail").rows() == [
        ("r1", "no_first_error", "first_error is null"),
        ("r2", "no_first_error", "first_error is -1, not a step of the response"),
        ("r3", "no_first_error", "first_error is 7, not a step of the response"),
        ("right", "not_wrong", "the response is correct"),
    ]


def test_model_mode_asks_the_model_even_where_labels_exist_and_uses_its_answer():
    frame = wrong_responses(3)
    located = {
        "Problem 0?": "<first_error>Substep 2</first_error>",
        "Problem 1?": "<first_error>0</first_error>",
        "Problem 2?": "I cannot tell.",
    }
    engine = ScriptedInterventionEngine(answers_of(frame), locate=located.get)
    kept, rejects = intervene_rows(frame, engine, settings(candidates=1, first_error="model"))
    assert kept.select("response_id", "intervene_first_error", "intervene_first_error_source").rows() == [
        ("r0", 1, "model")
    ]
    assert rejects.select("response_id", "intervene_reason").rows() == [
        ("r1", "no_first_error"),
        ("r2", "first_error_unparseable"),
        ("right", "not_wrong"),
    ]
    assert rejects["intervene_output"][1] == "I cannot tell."


def test_a_proposal_after_the_model_located_error_is_out_of_range():
    frame = wrong_responses(1).head(1)
    engine = ScriptedInterventionEngine(answers_of(frame), locate=lambda p: "<first_error>1</first_error>")
    kept, rejects = intervene_rows(frame, engine, settings(candidates=1, first_error="model"))
    assert kept.height == 0
    assert rejects["intervene_reason"].to_list() == ["location_out_of_range"]


def test_proposals_have_a_seed_per_row_and_candidate_independent_of_the_batch():
    frame = wrong_responses(4)

    def proposal_seeds(part: pl.DataFrame, candidates: int) -> dict[tuple[str, int], int]:
        engine = ScriptedInterventionEngine(answers_of(frame))
        intervene_rows(part, engine, settings(candidates=candidates))
        _, requests = engine.calls[0]
        ids = [rid for rid in part.filter(~pl.col("correct"))["response_id"] for _ in range(candidates)]
        return {(rid, i % candidates): r.seed for i, (rid, r) in enumerate(zip(ids, requests))}

    together = proposal_seeds(frame, 3)
    assert proposal_seeds(frame.slice(2, 1), 2) == {k: v for k, v in together.items() if k[0] == "r2" and k[1] < 2}
    assert len(set(together.values())) == len(together)


def test_output_is_reproducible():
    frame = wrong_responses(4)
    first = intervene_rows(frame, ScriptedInterventionEngine(answers_of(frame)), settings())
    again = intervene_rows(frame, ScriptedInterventionEngine(answers_of(frame)), settings())
    assert first[0].equals(again[0]) and first[1].equals(again[1])


def test_prefill_starts_the_answer_inside_the_tag_and_stops_at_its_end():
    frame = wrong_responses(1).head(1)
    engine = ScriptedInterventionEngine(answers_of(frame), propose=lambda p, c: 'GOOD fix", "location": 2}')
    kept, _ = intervene_rows(frame, engine, settings(candidates=1, prefill_tag=True))
    request = engine.calls[0][1][0]
    assert "".join(map(chr, request.prompt_ids)).endswith('<intervention>{"content": "')
    assert request.stop == ("</intervention>",)
    assert kept["intervention"].to_list() == ["GOOD fix"]


def test_no_wrong_response_means_no_engine_call_and_no_rows():
    frame = wrong_responses(2).filter(pl.col("correct"))
    engine = ScriptedInterventionEngine(answers_of(frame))
    kept, rejects = intervene_rows(frame, engine, settings())
    assert kept.height == 0 and kept.columns[: len(frame.columns)] == frame.columns
    assert rejects["intervene_reason"].to_list() == ["not_wrong"] and not engine.calls


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture
def verified_labeled(prmtool, tmp_path):
    """The labeled GSM8K sample (12 correct, 12 wrong responses with known first errors), verified."""
    target = tmp_path / "verified"
    assert prmtool("verify", SAMPLES / "labeled", "-o", target, "--workers", "1", "-q").exit_code == 0
    return target


def summary_count(stderr: str, label: str) -> int:
    match = re.search(rf"{label}\s*│\s*([\d,]+)", stderr)
    assert match, f"no '{label}' in the summary:\n{stderr}"
    return int(match.group(1).replace(",", ""))


def test_intervene_command_on_a_model_folder_writes_rejects_and_the_funnel(
    prmtool, verified_labeled, tiny_model_dir, tmp_path
):
    args = [
        "intervene",
        verified_labeled,
        "-o",
        tmp_path / "out",
        "--rejects",
        tmp_path / "rejects",
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--candidates",
        "2",
        "--verify-rollouts",
        "2",
        "--max-tokens",
        "8",
        "--proposer-max-tokens",
        "12",
        "--workers",
        "1",
    ]
    result = prmtool(*args)
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "out") == ["_SUCCESS", "part-00000.parquet"]
    assert files_under(tmp_path / "rejects") == ["_SUCCESS", "part-00000.parquet"]
    kept = pl.read_parquet(tmp_path / "out" / "part-00000.parquet")
    rejects = pl.read_parquet(tmp_path / "rejects" / "part-00000.parquet")
    # A random-weight model writes no tag: every candidate is rejected, and nothing is lost.
    assert kept.height + rejects.filter(pl.col("intervene_candidate").is_not_null()).height == 12 * 2
    assert rejects.filter(pl.col("intervene_reason") == "not_wrong").height == 12
    assert summary_count(result.stderr, "wrong responses") == 12
    assert summary_count(result.stderr, "candidates proposed") == 24
    assert summary_count(result.stderr, "candidates parsed") <= 24
    assert summary_count(result.stderr, "candidates kept") == kept.height == summary_count(result.stderr, "rows out")
    assert summary_count(result.stderr, "first error from labels") == 12

    again = prmtool(*args)
    assert again.exit_code == 0 and summary_count(again.stderr, "shards skipped") == 1
    assert summary_count(again.stderr, "rows out") == kept.height, "a resumed shard counts its own rows"


def test_intervene_refuses_unverified_input(prmtool, tmp_path):
    result = prmtool("intervene", SAMPLES / "labeled", "-o", tmp_path / "out", "--model", tmp_path / "unused")
    assert result.exit_code == 2
    assert "missing required column 'correct'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_from_labels_needs_labels(prmtool, tmp_path):
    assert prmtool("verify", SAMPLES / "responses", "-o", tmp_path / "verified", "--workers", "1", "-q").exit_code == 0
    result = prmtool("intervene", tmp_path / "verified", "-o", tmp_path / "out", "--first-error", "from-labels")
    assert result.exit_code == 2 and "first_error" in result.stderr and "prmtool label" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--first-error", "guess"], "--first-error 'guess'"),
        (["--min-success", "5", "--verify-rollouts", "4"], "--min-success 5 is more than --verify-rollouts 4"),
    ],
)
def test_bad_options_are_refused_before_any_work(prmtool, tmp_path, options, message):
    result = prmtool("intervene", SAMPLES / "labeled", "-o", tmp_path / "out", *options)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_intervene_with_the_embedded_model_then_export_sft(prmtool, verified_labeled, tmp_path):
    """End to end on SmolLM2-135M-Instruct: two wrong responses, two proposals each."""
    few = tmp_path / "few"
    few.mkdir()
    rows = pl.read_parquet(verified_labeled / "part-00000.parquet")
    pl.concat([rows.filter(~pl.col("correct")).head(2), rows.filter(pl.col("correct")).head(1)]).write_parquet(
        few / "part-00000.parquet"
    )
    result = prmtool(
        "intervene",
        few,
        "-o",
        tmp_path / "out",
        "--rejects",
        tmp_path / "rejects",
        "--candidates",
        "2",
        "--verify-rollouts",
        "2",
        "--max-tokens",
        "24",
        "--proposer-max-tokens",
        "32",
        "--prefill-tag",
        "--device",
        "cpu",
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    kept = pl.read_parquet(tmp_path / "out" / "part-00000.parquet")
    rejects = pl.read_parquet(tmp_path / "rejects" / "part-00000.parquet")
    assert summary_count(result.stderr, "candidates proposed") == 4
    assert kept.height + rejects["intervene_candidate"].is_not_null().sum() == 4
    assert rejects.filter(pl.col("intervene_candidate").is_null())["intervene_reason"].to_list() == ["not_wrong"]
    reasons = {
        iv.UNPARSEABLE,
        iv.LOCATION_OUT_OF_RANGE,
        iv.LEAKS_ANSWER,
        iv.STATES_FINAL_ANSWER,
        iv.DUPLICATE,
        iv.NOT_VERIFIED,
    }
    assert set(rejects["intervene_reason"].drop_nulls()) - {"not_wrong"} <= reasons
    assert rejects["intervene_output"].drop_nulls().str.starts_with('<intervention>{"content": "').all()
    for row in kept.iter_rows(named=True):
        assert row["guided_response"] == "\n\n".join(row["steps"][: row["intervention_step"]] + [row["intervention"]])
        assert row["intervention_step"] <= row["first_error"] and row["intervention_success_rate"] >= 0.5

    exported = prmtool("export", tmp_path / "out", "-o", tmp_path / "sft", "-f", "sft-messages", "--open-turn")
    assert exported.exit_code == 0, exported.stderr
    if kept.height:
        sft = pl.read_parquet(tmp_path / "sft" / "train" / "part-00000.parquet")
        assert sft["messages"][0][-1]["content"] == kept["guided_response"][0]
