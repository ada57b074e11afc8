"""Reading a solution's final answer, and the forms of an answer a grader accepts as the same.

Extraction is a cascade (docs/algorithms.md, "Outcome verification"); each step runs only when
the earlier ones found nothing, and the step that found the answer is its `answer_source`:

1. `boxed`: the last `\\boxed{...}` or `\\fbox{...}` whose braces close;
2. `phrase`: whichever explicit answer marker comes last: "the (final) answer is X",
   "Final answer: X", "Answer: X" (bold or not), "#### X", a GSM8K `A: X` line;
3. `final_math`: in the last sentence, its last math (`$...$`, `\\(...\\)`, `\\[...\\]`, `$$...$$`)
   or bold (`**...**`) span; of an equation, the right-hand side of its last `=`;
4. `final_sentence`: for a reference that is not a plain number, Math-Verify's own extraction
   over the last sentence;
5. `last_number`: for a numeric reference, the number the last sentence states: its first
   number, not the qualifiers that trail it ("spends $225 over 5 weeks");
6. `math_verify` (in `prmtool.methods.verification`, which holds the reference): when all of the
   above found nothing, Math-Verify's own extraction over the whole text, taken only when
   Math-Verify finds it equal to the reference: verify never grades wrong what Math-Verify
   alone grades right, and a cut-off response is not given a wrong answer it never stated.

Steps 3 to 5 read only a concluding last sentence: it ends with . ! ? or closing math, and
either opens with a conclusion word (therefore, thus, so, hence, finally, in total, ...) or
states a single number and no equation. A response cut off mid-computation ("He sprints
3*3=9 times") has no answer. `strict` extraction stops after step 2.

`equivalent_forms` gives the rewritings under which two answers are compared again when their
plain forms differ: units, currency, percent and degree signs dropped, thousands separators
and LaTeX noise (`\\15`, `\\text{5}`, `\\dfrac`) removed, `x = 5` read as `5`, and a double
inequality read as its interval. None of them turns one number into another: `1` is never
`10`, nor `2` `2.5`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

SOURCES = ("boxed", "phrase", "final_math", "final_sentence", "last_number", "math_verify")
EXTRACT_MODES = ("cascade", "strict")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_PHRASES = [
    re.compile(r"(?i)\bthe (?:final )?answer is\s*:?\s*([^\n]+)"),
    re.compile(r"(?i)\bfinal answer\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*([^\n]+)"),
    re.compile(r"(?i)(?:^|[\s*])answer\s*:\s*(?:\*\*)?\s*([^\n]+)"),
    re.compile(r"####\s*([^\n]+)"),
    re.compile(r"(?m)^[ \t]*A:[ \t]*([^\n]+)"),  # not \s*: across blank lines it is quadratic
]
_NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"\s*-?\d[\d,]*(?:\.\d+)?\s*")
_CUE = re.compile(
    r"(?i)^\W*(?:therefore|thus|so|hence|finally|in total|in all|altogether|overall|in conclusion|"
    r"as a result|this means|that means|in the end)\b"
)
# `$...$` as pandoc reads it: no space just inside the dollars, so "$55 = $330" is money, not math
_MATH_SPAN = re.compile(
    r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|\$(?!\s)([^$]+?)(?<!\s)\$(?!\d)|\*\*(.+?)\*\*", re.S
)
# a sentence ends at . ! or ? followed by a space or the end, outside math
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*\\$(])")


class Answer(NamedTuple):
    text: str | None  # as written in the response (None: no answer found)
    source: str | None  # which step of the cascade found it, one of SOURCES


def find_answer(text: str | None, reference: str | None = None, mode: str = "cascade") -> Answer:
    """The final answer of a solution and where it was found; `reference` only decides whether
    the numeric step applies (a reference that is a plain number)."""
    if not text or not text.strip():
        return Answer(None, None)
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return Answer(boxed.strip(), "boxed")
    phrase = _last_phrase(text)
    if phrase is not None:
        return Answer(phrase, "phrase")
    if mode == "strict":
        return Answer(None, None)
    sentence = _concluding_sentence(text)
    if sentence is None:
        return Answer(None, None)
    math = _last_math(sentence)
    if math is not None:
        return Answer(math, "final_math")
    numeric = reference is not None and _PLAIN_NUMBER.fullmatch(str(reference).replace("$", "")) is not None
    if not numeric and reference is not None:
        found = _math_verify_extraction(sentence)
        if found is not None:
            return Answer(found, "final_sentence")
    if not numeric and reference is not None:
        return Answer(None, None)
    # of a computation, its result; else the first number, before any trailing qualifier
    number = _NUMBER.search(sentence.rsplit("=", 1)[-1])
    if number is not None:
        return Answer(number.group(0).rstrip(","), "last_number")
    return Answer(None, None)


def extract_answer(text: str | None) -> str | None:
    """The final answer as the cascade finds it, without a reference (rollouts, `label`)."""
    return find_answer(text).text


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces close, nested braces balanced.

    One pass pairs every brace of the text (a stack), so the time is linear in the text: a
    response of 20,000 unclosed boxes costs one pass, not one scan to the end per box."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if not starts:
        return None
    closing: dict[int, int] = {}  # position just after an opening brace -> its closing brace
    open_braces: list[int] = []
    for brace in _BRACE.finditer(text):
        if brace.group() == "{":
            open_braces.append(brace.end())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    for start in reversed(starts):
        if start in closing:
            return text[start : closing[start]]
    return None


def _last_phrase(text: str) -> str | None:
    candidates = [m for pattern in _PHRASES for m in pattern.finditer(text)]
    if not candidates:
        return None
    last = max(candidates, key=lambda m: m.start(1))
    return _clean_phrase(last.group(1))


def _clean_phrase(answer: str) -> str | None:
    """`$1,234.50 dollars.` -> `1,234.50`, `Verna received $7.00 in change.` -> `7.00`: text
    answers carry words, units and punctuation that Math-Verify would read as symbols."""
    answer = answer.strip().strip("*").strip().rstrip(".").strip()
    if answer.startswith("\\boxed"):
        return last_boxed(answer)
    math = _last_math(answer)
    if math is not None and re.search(r"[A-Za-z]{3,}", _MATH_SPAN.sub("", answer)):
        return math  # a sentence with math in it: the math
    if "\\" not in answer and re.search(r"[A-Za-z$%]", answer):
        number = _NUMBER.search(answer)
        if number:
            return number.group(0).rstrip(",")
    return answer or None


def _concluding_sentence(text: str) -> str | None:
    """The response's last sentence, when it states a conclusion (see the module docstring)."""
    paragraph = text.strip().split("\n\n")[-1].strip()
    sentence = _SENTENCE_END.split(paragraph)[-1].strip()
    if not re.search(r"(?:[.!?]|\$|\\\]|\\\))[*\s]*$", sentence):
        return None  # cut off, or not a sentence
    if _CUE.search(sentence):
        return sentence
    outside_math = _MATH_SPAN.sub(" ", sentence)
    if "=" not in sentence and len(_NUMBER.findall(outside_math)) + len(_MATH_SPAN.findall(sentence)) == 1:
        return sentence
    return None


def _last_math(sentence: str) -> str | None:
    """The sentence's last math span; spans joined only by "and", "or" or commas ("$x=1$ and
    $x=2$") are one answer, listed."""
    matches = [m for m in _MATH_SPAN.finditer(sentence) if re.search(r"\d|\\frac|\\sqrt|\\pi|[a-z]", _span(m))]
    if not matches:
        return None
    last = [matches[-1]]
    for before in reversed(matches[:-1]):
        if not re.fullmatch(r"\s*(?:,|and|or|, and|, or)\s*", sentence[before.end() : last[0].start()]):
            break
        last.insert(0, before)
    if len(last) > 1:
        return ", ".join(_span(m) for m in last)
    return _right_hand_side(_span(last[0])) or None


def _span(match: re.Match) -> str:
    return next(g for g in match.groups() if g is not None).strip()


def _right_hand_side(math: str) -> str:
    """`20 \\times 2 = 40` -> `40`; an inequality or a lone expression stays whole."""
    if re.search(r"\\[lg]eq?\b|[<>]", math):
        return math
    return math.rsplit("=", 1)[-1].strip() if "=" in math else math


def _math_verify_extraction(sentence: str) -> str | None:
    from math_verify import parse

    try:
        parsed = parse(sentence, parsing_timeout=2)
    except Exception:
        return None
    return parsed[1] if len(parsed) > 1 and parsed[1].strip() else None


# --- comparison ------------------------------------------------------------------------------

# a unit after a number: `\text{ cm}`, or a word of two letters or more after a space (`5x` stays 5x)
_UNIT_WORDS = re.compile(
    r"(?<=\d)\s*(?:\\text\{[^{}]*\}|\\mbox\{[^{}]*\}|\\mathrm\{[^{}]*\}|\s[A-Za-z]{2,}[A-Za-z ]*)$"
)
# `x =`, `f(y) =`, `\\theta =`: a left-hand side that only names the answer
_LEFT_SIDE = re.compile(r"^\s*(?:[A-Za-z]\w*(?:\([^()=]*\))?|\\[A-Za-z]+)\s*=\s*(?=\S)")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:(?:\{,\}|,)\d{3})+)(?![\d])")


def equivalent_forms(answer: str) -> str:
    """The answer rewritten as a grader reads it (see the module docstring); the same text
    when there is nothing to rewrite."""
    text = answer.strip().strip("$").strip()
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\(?:left|right)(?=[()[\]|.\\])|\\[!,;: ]", "", text)
    text = re.sub(r"\\text\{\s*([-\d.,]+)\s*\}", r"\1", text)  # \text{5}
    whole = re.fullmatch(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", text)
    if whole and re.match(r"\s*-?\d", whole.group(1)):
        text = whole.group(1).strip()  # \text{3 days}
    text = re.sub(r"\\(?=\d)", "", text)  # \15: a stray backslash before a number
    text = re.sub(r"\\?\$|\\%|%|\^\s*\{?\\circ\}?|°|\\degree", "", text).strip()
    text = _THOUSANDS.sub(lambda m: m.group(1) + re.sub(r"\{,\}|,", "", m.group(2)), text)
    items = split_top_level(text) if "," in text and "=" in text else [text]
    if len(items) > 1:  # x = 1, x = 2
        text = ", ".join(_LEFT_SIDE.sub("", item) for item in items)
    else:
        text = _LEFT_SIDE.sub("", text)
    text = _interval(text)
    unit = _UNIT_WORDS.search(text)
    if unit and _NUMBER.fullmatch(text[: unit.start()].strip()):
        text = text[: unit.start()].strip()
    return text.strip().rstrip(".").strip() or answer


_LESS = r"(\\leq?|\\le|<|≤)"
_MORE = r"(\\geq?|\\ge|>|≥)"


def _interval(text: str) -> str:
    """`a \\leq x \\leq b` -> `[a, b]`, `x > a` -> `(a, \\infty)`: strict signs give open ends."""
    match = re.fullmatch(rf"(.+?)\s*{_LESS}\s*[a-z]\s*{_LESS}\s*(.+)", text)
    if match:
        low, left, right, high = match.groups()
        return f"{'(' if left == '<' else '['}{low.strip()}, {high.strip()}{')' if right == '<' else ']'}"
    match = re.fullmatch(rf"[a-z]\s*{_LESS}\s*(.+)", text)
    if match:
        sign, high = match.groups()
        return f"(-\\infty, {high.strip()}{')' if sign == '<' else ']'}"
    match = re.fullmatch(rf"[a-z]\s*{_MORE}\s*(.+)", text)
    if match:
        sign, low = match.groups()
        return f"{'(' if sign == '>' else '['}{low.strip()}, \\infty)"
    return text


def answer_list(reference: str) -> list[str] | None:
    """A reference that lists several answers (a JSON or Python list of them, as OlympiadBench's
    `final_answer` is): its items; None for a single answer."""
    text = reference.strip()
    if not (text.startswith("[") and text.endswith("]") and ("'" in text or '"' in text)):
        return None
    import ast

    try:
        items = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(items, list) and len(items) > 1 and all(isinstance(i, (str, int, float)) for i in items):
        return [str(i) for i in items]
    return None


def split_top_level(answer: str) -> list[str]:
    """`\\{1, 2\\}`, `(1, 2)`, `1, 2` and `1 and 2` -> ['1', '2'] (commas inside braces stay)."""
    text = re.sub(r"^\\\{|\\\}$", "", answer.strip().strip("$").strip())
    if text[:1] in "([" and text[-1:] in ")]":
        text = text[1:-1]
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "({["
        depth -= char in ")}]"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    if len(items) == 1:
        items = re.split(r"\s+(?:and|or)\s+|\\text\{\s*(?:and|or)\s*\}", text)
    return [item.strip() for item in items if item.strip()]
