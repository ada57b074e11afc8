"""Interventions (InT): the prompts that ask a model for a first error or a corrective step, and
the parsers that read its answers. Pure text in, values out; `prmtool.stages.intervene` runs them.

What a model writes (docs/algorithms.md, "Interventions"):

    <intervention>{"content": "...", "location": N}</intervention>
    <first_error>N</first_error>

Steps are shown to the model numbered from 1 (`**Substep N:**`, as InT does), so N is the
1-based number of the step; the parsers return 0-based step indices, the convention of
`first_error` and `intervention_step`. An intervention at location N replaces step N: the
guided response is `steps[:N-1] + [content]`, the failed suffix dropped.

Parsing takes the last complete tag. Its body is read as JSON, else as a Python literal with
`ast.literal_eval` (never `eval`), else as a JSON object followed by stray text; single
backslashes before letters are LaTeX (`\\frac`, `\\boxed`), not string escapes, so
`"\\frac{1}{2}"` written unescaped by a model keeps its backslash instead of turning into a
form feed. A candidate is rejected, with a reason, when:

- `unparseable`: no complete tag, a body that is neither JSON nor a literal, not a mapping,
  no non-empty `content` (or only the prompt's placeholder `...`), or no integer `location`;
- `location_out_of_range`: the location is not a step of the response, or comes after the
  first error (an intervention replaces the error or a step before it, never a later one);
- `leaks_answer`: the content gives away the reference answer (see `answer_leak`);
- `states_final_answer`: the content states a final answer (a `\\boxed{}`, `The answer is`,
  `#### X`), even a wrong one: an intervention is one step, not a solution.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from fractions import Fraction

from prmtool.methods.answers import find_answer

# Why a candidate or a row produced no kept intervention (the `intervene_reason` column).
UNPARSEABLE = "unparseable"
LOCATION_OUT_OF_RANGE = "location_out_of_range"
LEAKS_ANSWER = "leaks_answer"
STATES_FINAL_ANSWER = "states_final_answer"
DUPLICATE = "duplicate"  # the same step and content as an earlier candidate for the same response
NOT_VERIFIED = "not_verified"  # fewer verification rollouts reached the answer than --min-success
NOT_WRONG = "not_wrong"  # the response is correct: nothing to intervene on
NO_STEPS = "no_steps"
NO_FIRST_ERROR = "no_first_error"  # the labels (or the model) name no wrong step
FIRST_ERROR_UNPARSEABLE = "first_error_unparseable"  # the model's first-error answer could not be read


@dataclass(frozen=True)
class Candidate:
    content: str
    step: int  # 0-based index of the step the intervention replaces


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


# --- prompts ------------------------------------------------------------------------------------


def numbered_steps(steps: list[str]) -> str:
    return "\n\n".join(f"**Substep {number}:** {step}" for number, step in enumerate(steps, start=1))


def _reference(reference_solution: str | None, reference_answer: str) -> str:
    if reference_solution and reference_solution.strip():
        return f"# Reference Solution #\n{reference_solution.strip()}\n\n# Reference Answer #\n{reference_answer}"
    return f"# Reference Answer #\n{reference_answer}"


def locator_prompt(problem: str, steps: list[str], reference_answer: str, reference_solution: str | None = None) -> str:
    """Ask for the first critical error of a wrong attempt."""
    return (
        "You are an expert mathematician grading a student's attempt at a problem. Compare the "
        "attempt with the reference solution and find the FIRST critical error: a factual error "
        "(such as a wrong calculation) or a logical fallacy that breaks the line of reasoning and "
        "is not recovered from later.\n\n"
        f"# Problem #\n{problem}\n\n{_reference(reference_solution, reference_answer)}\n\n"
        f"# Student Attempt #\n{numbered_steps(steps)}\n\n"
        "End your answer with the number of the substep that holds the first critical error "
        "(0 if there is none), in this format:\n<first_error>N</first_error>"
    )


def proposer_prompt(
    problem: str, steps: list[str], first_error: int, reference_answer: str, reference_solution: str | None = None
) -> str:
    """Ask for one corrective step that replaces the first error (0-based `first_error`)."""
    location = first_error + 1
    return (
        "You are an expert mathematician teaching a class. A student solved the problem below "
        f"incorrectly; the first critical error is in Substep {location}. Using the reference "
        "solution, write ONE intervention step that replaces that substep and steers the student "
        "toward the correct solution.\n"
        "- Write it from the student's perspective, so that the student can continue from it "
        "without feeling that someone else wrote it.\n"
        f'- Do NOT give away the final answer ("{reference_answer}") and do not finish the '
        "solution: one step only.\n"
        f"- The location is the number of the substep it replaces: {location}, or an earlier one.\n\n"
        f"# Problem #\n{problem}\n\n{_reference(reference_solution, reference_answer)}\n\n"
        f"# Student Attempt #\n{numbered_steps(steps)}\n\n"
        "End your answer with the intervention step in this format (JSON), the step in place of ...:\n"
        f'<intervention>{{"content": "...", "location": {location}}}</intervention>'
    )


# Prefilled answers (--prefill-tag): the reply starts inside the tag, so that small models keep
# the format; generation stops at the closing tag.
INTERVENTION_PREFILL = '<intervention>{"content": "'
INTERVENTION_STOP = "</intervention>"
FIRST_ERROR_PREFILL = "<first_error>"
FIRST_ERROR_STOP = "</first_error>"


# --- reading a tag's body -----------------------------------------------------------------------


def last_tag(text: str | None, tag: str) -> str | None:
    """The body of the last complete `<tag>...</tag>`, or None."""
    if not text:
        return None
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return matches[-1] if matches else None


_FENCE = re.compile(r"^\s*```[A-Za-z]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
# LaTeX commands that begin like the escape \n (a newline otherwise).
_LATEX_N = re.compile(
    r"n(?:eq|e|abla|ot|otin|u|eg|mid|i|leq|geq|exists|ewline|parallel|subseteq|supseteq|cong|sim|less|gtr|earrow|warrow)(?![A-Za-z])"
)


def latex_safe_escapes(body: str) -> str:
    """Double every backslash that starts a LaTeX command rather than a string escape.

    `\\\\`, `\\"`, `\\'` and `\\/` are kept; `\\uXXXX` is a unicode escape; `\\n` is a newline
    unless it starts a LaTeX command (`\\neq`, `\\nabla`, `\\not`, ...); any other backslash
    before a letter (`\\frac`, `\\times`, `\\boxed`, `\\right`) is LaTeX and is doubled, so a
    string that a model wrote without escaping its LaTeX decodes to the text it meant."""
    out, i = [], 0
    while i < len(body):
        char = body[i]
        if char != "\\" or i + 1 == len(body):
            out.append(char)
            i += 1
            continue
        following = body[i + 1]
        if following in "\\\"'/":
            out.append(body[i : i + 2])
            i += 2
            continue
        if following == "u" and _HEX4.fullmatch(body[i + 2 : i + 6]):
            out.append(body[i : i + 6])
            i += 6
            continue
        latex = following.isalpha() and (following != "n" or _LATEX_N.match(body, i + 1) is not None)
        out.append("\\\\" if latex else "\\")
        i += 1
    return "".join(out)


def _triple_quote_content(body: str) -> str:
    """InT's repair for a content string with unescaped double quotes inside: quote it with
    triple quotes, which a Python literal allows."""
    return re.sub(
        r'("content"\s*:\s*)"(.*)"(\s*,\s*"location")',
        lambda m: f'{m.group(1)}"""{m.group(2)}"""{m.group(3)}',
        body,
        flags=re.DOTALL,
    )


def read_literal(body: str) -> object:
    """A tag's body as JSON, else as a Python literal, else a JSON object that stray text follows.
    Raises ValueError when it is none of these."""
    fenced = _FENCE.match(body)
    body = (fenced.group(1) if fenced else body).strip()
    repaired = latex_safe_escapes(body)
    for attempt in (repaired, _triple_quote_content(repaired)):
        try:
            return json.loads(attempt, strict=False)  # strict=False: raw newlines in strings
        except ValueError:
            pass
        try:
            return ast.literal_eval(attempt)  # literals only: never runs code
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    try:  # a JSON object with stray text after it (`{...}</intervention}`, a closing fence)
        value, _ = json.JSONDecoder(strict=False).raw_decode(repaired)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    raise ValueError("neither JSON nor a Python literal")


def location_number(value: object) -> int | None:
    """A location as an integer: 3, 3.0, "3", "Step 3", "Substep 3"; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:\*\*)?(?:(?:sub)?step\s*)?(-?\d+)\s*:?(?:\*\*)?\s*", value, flags=re.IGNORECASE)
        if match:
            return int(match.group(1))
    return None


# --- the answer-leak rule -----------------------------------------------------------------------

_LATEX_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")
_NUMBER_TOKEN = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|\\[dt]?frac\{-?\d+\}\{\d+\}")


def as_number(text: str | None) -> Fraction | None:
    """An exact number from an answer or a number in a text: `18`, `1,234`, `-3.50`, `$18`,
    `3/4`, `\\frac{3}{4}`; None for anything else."""
    if text is None:
        return None
    cleaned = re.sub(r"\s+|\\[!,;: ]|\\%|%|\\?\$", "", str(text)).replace("−", "-").rstrip(".,")
    cleaned = re.sub(r"^\\(?:text|mathrm)\{(.*)\}$", r"\1", cleaned)
    latex = _LATEX_FRACTION.match(cleaned)
    if latex:
        sign, numerator, denominator = latex.groups()
        cleaned = f"{sign}{numerator}/{denominator}"
    if not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+", cleaned):
        return None
    try:
        return Fraction(cleaned.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def numbers_in(text: str) -> set[Fraction]:
    """Every number written in `text`, as exact values. A minus sign counts only where it
    cannot be subtraction (`16-3` holds 16 and 3, not -3)."""
    values = set()
    for match in _NUMBER_TOKEN.finditer(text.replace("−", "-")):
        token = match.group(0)
        if (
            token.startswith("-")
            and match.start() > 0
            and (text[match.start() - 1].isalnum() or text[match.start() - 1] in ")}")
        ):
            token = token[1:]
        parts = [token] if as_number(token) is not None else token.split(",")  # "1,2,3" is a list
        values.update(v for v in map(as_number, parts) if v is not None)
    return values


def _normalized(text: str) -> str:
    return re.sub(r"\s+|\$", "", text)


def answer_leak(content: str, reference_answer: str, problem: str = "") -> str | None:
    """Why `content` gives away `reference_answer`, or None.

    - A numeric reference answer (`18`, `1,234.5`, `3/4`, `\\frac{3}{4}`) leaks when a number in
      the content equals it exactly (`$18.00`, `18`), unless the problem statement itself holds
      that number (restating a given quantity gives nothing away). `18` does not match `180`.
    - Any other reference answer leaks when its text occurs in the content, whatever the spacing
      and `$` signs, and not inside a longer word or number (InT's substring rule, made
      boundary-aware).
    """
    reference = str(reference_answer).strip()
    if not reference:
        return None
    value = as_number(reference)
    if value is not None:
        if value in numbers_in(content) and value not in numbers_in(problem):
            return f"the content holds the reference answer {reference}"
        return None
    needle = _normalized(reference)
    spaced = r"\s*".join(re.escape(char) for char in needle)  # any spacing: `x^2 + 1` is `x^2+1`
    if needle and re.search(rf"(?<![A-Za-z0-9]){spaced}(?![A-Za-z0-9])", content.replace("$", "")):
        return f"the content holds the reference answer {reference}"
    return None


def _states_answer(content: str, reference_answer: str) -> Rejection | None:
    stated = find_answer(content, mode="strict").text  # an answer it states outright
    if stated is None:
        return None
    if answer_leak(stated, reference_answer) is not None:
        return Rejection(LEAKS_ANSWER, f"the content states the reference answer {stated}")
    return Rejection(STATES_FINAL_ANSWER, f"the content states a final answer ({stated})")


# --- the parsers --------------------------------------------------------------------------------


def parse_intervention(
    text: str | None, n_steps: int, reference_answer: str, *, problem: str = "", latest: int | None = None
) -> Candidate | Rejection:
    """A model's proposal as a Candidate (0-based step), or a Rejection saying why not.

    `n_steps`: the response's number of steps (a location is 1..n_steps); `latest`: the 0-based
    first error, when known: the intervention may replace it or an earlier step, not a later one."""
    body = last_tag(text, "intervention")
    if body is None:
        return Rejection(UNPARSEABLE, "no complete <intervention>...</intervention> tag")
    try:
        value = read_literal(body)
    except ValueError as exc:
        return Rejection(UNPARSEABLE, f"the tag's body is {exc}")
    if not isinstance(value, dict):
        return Rejection(
            UNPARSEABLE, f"the tag holds a {type(value).__name__}, not a mapping with content and location"
        )
    content = value.get("content")
    if not isinstance(content, str) or not content.strip():
        return Rejection(UNPARSEABLE, "no non-empty string 'content'")
    if not content.strip(" .\u2026\n\t"):
        return Rejection(UNPARSEABLE, "the content is the format's placeholder '...'")
    if "location" not in value:
        return Rejection(UNPARSEABLE, "no 'location'")
    location = location_number(value["location"])
    if location is None:
        return Rejection(UNPARSEABLE, f"location {value['location']!r} is not a step number")
    if not 1 <= location <= n_steps:
        return Rejection(LOCATION_OUT_OF_RANGE, f"location {location} is not a step of the response (1..{n_steps})")
    if latest is not None and location > latest + 1:
        return Rejection(
            LOCATION_OUT_OF_RANGE, f"location {location} comes after the first error (substep {latest + 1})"
        )
    content = content.strip()
    stated = _states_answer(content, reference_answer)
    if stated is not None:
        return stated
    leak = answer_leak(content, reference_answer, problem)
    if leak is not None:
        return Rejection(LEAKS_ANSWER, leak)
    return Candidate(content, location - 1)


def parse_first_error(text: str | None, n_steps: int) -> int | Rejection:
    """A model's first-error answer as a 0-based step index, -1 for "no error" (0 or none), or a
    Rejection. The tag may hold a number, `Substep N`, or a mapping with a `location`."""
    body = last_tag(text, "first_error")
    if body is None:
        return Rejection(FIRST_ERROR_UNPARSEABLE, "no complete <first_error>...</first_error> tag")
    if body.strip().lower() in ("none", "null", "-1", "0", ""):
        return -1
    location = location_number(body)
    if location is None:
        try:
            value = read_literal(body)
        except ValueError:
            value = None
        if isinstance(value, dict):
            value = value.get("location")
        location = location_number(value)
    if location is None:
        return Rejection(FIRST_ERROR_UNPARSEABLE, f"{body.strip()[:80]!r} is not a step number")
    if location <= 0:
        return -1
    if location > n_steps:
        return Rejection(FIRST_ERROR_UNPARSEABLE, f"substep {location} is not a step of the response (1..{n_steps})")
    return location - 1
