"""Free-form final answers, read as a careful grader reads them: the extraction cascade and the
forms of an answer that compare equal. Each case is a failure class seen in real solutions."""

import pytest

from prmtool.methods.answers import find_answer
from prmtool.methods.verification import Verdict, compare, verify_answers, verify_responses


@pytest.mark.parametrize(
    "response, reference, answer, source",
    [
        ("So x = 2.\n\nThe answer is \\boxed{\\frac{1}{2}}.", "1/2", "\\frac{1}{2}", "boxed"),
        ("Thus \\fbox{7}.", "7", "7", "boxed"),
        (
            "Therefore, Verna received $7.00 in change. **Answer:** Verna received $7.00 in change.",
            "7",
            "7.00",
            "phrase",
        ),
        ("Final Answer: 42", "42", "42", "phrase"),
        ("Natalia sold 48 clips.\n#### 72", "72", "72", "phrase"),
        ("Q: How many?\nA: 18", "18", "18", "phrase"),
        ("Therefore, $\\cos \\angle RPS = -\\frac{24}{25}$.", "-\\frac{24}{25}", "-\\frac{24}{25}", "final_math"),
        ("Thus, Charlie will make a total of \\(\\$440\\) for the day.", "440", "\\$440", "final_math"),
        ("Therefore, Freda used **12 tomatoes** to make her batch of tomato sauce.", "12", "12 tomatoes", "final_math"),
        (
            "Therefore, Timothy's locker is: \\[ \\text{Volume} = 20 \\times 2 = 40 \\text{ cubic inches} \\]",
            "40",
            "40 \\text{ cubic inches}",
            "final_math",
        ),
        ("Therefore, the restaurant's tables have a total of 310 legs.", "310", "310", "last_number"),
        ("So, after all his transactions, Raymond has $8 left.", "8", "8", "last_number"),
        # the number the sentence states, not the qualifier trailing it
        ("So, Charisma spends a total of 34 hours on yoga in 4 weeks.", "34", "34", "last_number"),
        ("Elvis is 54 miles east of his house after completing his journey.", "54", "54", "last_number"),
        ("So he runs 9*60=540 meters.", "540", "540", "last_number"),  # a computation: its result
        ("Thus, the solutions are $x=1$ and $x=2$.", "['1', '2']", "x=1, x=2", "final_math"),
        ("Therefore, the perimeter is twelve.", "12", None, None),
        # not a plain-number reference: Math-Verify's reading of the sentence, not last_number
        ("Therefore, the set has 12 elements.", "\\{1, 2\\}", "12", "final_sentence"),
        ("Therefore, the set is $\\{1, 2\\}$ here.", "\\{1, 2\\}", "\\{1, 2\\}", "final_math"),
        # an answer phrase in words is what the response says; it compares unequal, not as missing
        (
            "Therefore, the answer is the interval from one half to eight.",
            "[1/2, 8]",
            "the interval from one half to eight",
            "phrase",
        ),
    ],
)
def test_the_cascade_finds_the_answer_and_says_where(response, reference, answer, source):
    assert find_answer(response, reference) == (answer, source)


@pytest.mark.parametrize(
    "response",
    [
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",  # a computation, not a conclusion
        "He sprints 3*3=9 times",  # cut off: no sentence end
        "So the new value of the house is 120,000+80,000=$200,000",  # cut off mid-sentence
        "I am not sure.",
        "",
    ],
)
def test_a_response_without_a_stated_answer_has_none(response):
    assert find_answer(response, "18") == (None, None)


def test_strict_extraction_reads_only_boxes_and_answer_phrases():
    assert find_answer("Therefore, the total is 310 legs.", "310", "strict") == (None, None)
    assert find_answer("The answer is 310.", "310", "strict") == ("310", "phrase")


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("15", "\\15"),  # a stray backslash before the number
        ("17.5%", "17.5"),
        ("17.5", "17.5\\%"),
        ("48", "48^\\circ"),
        ("7", "\\$7.00"),
        ("10000", "10{,}000"),
        ("1000", "1,000"),
        ("5", "\\text{5}"),
        ("40", "40 \\text{ cubic inches}"),
        ("\\frac{1}{2}", "\\dfrac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("[\\frac{1}{2}, 8]", "\\frac{1}{2} \\leq x \\leq 8"),
        ("(2, 5)", "2 < x < 5"),
        ("(-\\infty, 3]", "x \\leq 3"),
        ("(3, \\infty)", "x > 3"),
        ("3", "\\text{3 days}"),
        ("['1', '2']", "x=1, x=2"),
        ("f(x)=1", "f(y) = 1"),
        ("5", "x = 5"),
        ("['1', '2']", "\\{2, 1\\}"),  # a reference listing several answers, in any order
        ("['1', '2']", "(2, 1)"),
    ],
)
def test_forms_a_grader_accepts_compare_equal(gold, pred):
    assert compare(gold, pred) == Verdict(True, "ok")


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("1", "10"),
        ("10", "1"),
        ("2", "2.5"),
        ("2", "20"),
        ("24", "-24"),
        ("(1,2)", "(2,1)"),  # a point is ordered
        ("['1', '2']", "1"),
        ("['1', '3']", "\\{2, 1\\}"),
        ("17.5", "175"),
    ],
)
def test_real_distinctions_stay(gold, pred):
    assert compare(gold, pred) == Verdict(False, "ok")


def test_answers_are_read_and_compared_in_the_workers():
    responses = [
        "Therefore, the restaurant's tables have a total of 310 legs.",
        "The final answer is: \\boxed{\\15}",
        "He sprints 3*3=9 times",
    ]
    answers, verdicts = verify_responses(responses, ["310", "15", "9"], workers=1)
    assert [(a.text, a.source) for a in answers] == [("310", "last_number"), ("\\15", "boxed"), (None, None)]
    assert verdicts == [Verdict(True, "ok"), Verdict(True, "ok"), Verdict(False, "no_answer")]
    # the gold/pred path is unchanged: comma numbers and 1 vs 10
    assert verify_answers([("1000", "1,000"), ("1", "10")], workers=1) == [Verdict(True, "ok"), Verdict(False, "ok")]


def test_on_processbench_gsm8k_verify_agrees_with_the_human_labels():
    """400 solutions by 12 models, many stating the answer in a sentence. The three rows that
    still disagree: two labelled wrong whose boxed answer equals the reference, and one that
    boxes "4 blue shoe boxes and 6 red shoe boxes" for a reference of 10."""
    import json

    from tests.conftest import ROOT

    rows = [json.loads(line) for line in (ROOT / "data_samples/processbench-gsm8k/gsm8k.jsonl").open()]
    responses = ["\n\n".join(row["steps"]) for row in rows]
    _, verdicts = verify_responses(responses, [row["reference_answer"] for row in rows], workers=2)
    disagree = {row["id"] for row, v in zip(rows, verdicts) if v.correct != row["final_answer_correct"]}
    assert disagree <= {"gsm8k-70", "gsm8k-74", "gsm8k-319"}
    assert 1 - len(disagree) / len(rows) >= 0.99
