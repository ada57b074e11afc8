"""Step splitting is lossless: joining the steps with the separator gives the response back."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prmtool.core.errors import InputError
from prmtool.methods.steps import make_splitter, split_steps

SPLITS = ["blank-line", "line", "step-k", r"regex:\d+\.", "regex:(?m)^#"]

# Texts made of the characters splitters care about, so boundaries and blank runs are common.
texty = st.lists(st.sampled_from(list("ab1. \t\n#:é😀") + ["Step 1:", "Step 2:", "\n\n"]), max_size=40).map("".join)


@pytest.mark.parametrize("split", SPLITS)
@settings(max_examples=300, deadline=None)
@given(text=texty)
def test_joining_the_steps_gives_back_the_response(split, text):
    splitter = make_splitter(split)
    steps = split_steps(text, splitter)
    assert splitter.separator.join(steps) == text
    if text.strip():
        assert all(step.strip() for step in steps), "no empty or whitespace-only step"
    else:
        assert steps == ([text] if text else [])


def test_blank_line_is_the_default_paragraph_split():
    steps = split_steps("First, 2+2=4.\n\nThen 4*3=12.\n\nThe answer is \\boxed{12}.", make_splitter("blank-line"))
    assert steps == ["First, 2+2=4.", "Then 4*3=12.", "The answer is \\boxed{12}."]


def test_extra_blank_lines_stay_attached_to_the_next_step():
    steps = split_steps("a\n\n\n\nb", make_splitter("blank-line"))
    assert steps == ["a", "\n\nb"]


def test_line_split_for_gsm8k_style_solutions():
    assert split_steps("She has 3.\nShe buys 2.\n#### 5", make_splitter("line")) == [
        "She has 3.",
        "She buys 2.",
        "#### 5",
    ]


def test_step_k_split_for_math_shepherd_style_solutions():
    text = "Step 1: 2+2=4\nso far so good\nStep 2: 4*3=12\nStep 3: The answer is: 12"
    assert split_steps(text, make_splitter("step-k")) == [
        "Step 1: 2+2=4\nso far so good",
        "Step 2: 4*3=12",
        "Step 3: The answer is: 12",
    ]


def test_regex_split_starts_a_step_at_each_match():
    assert split_steps("1. add 2. multiply 3. done", make_splitter(r"regex:\d+\.")) == [
        "1. add ",
        "2. multiply ",
        "3. done",
    ]


def test_unknown_split_and_bad_regex_are_input_errors():
    with pytest.raises(InputError, match="expected blank-line"):
        make_splitter("sentences")
    with pytest.raises(InputError, match="invalid regular expression"):
        make_splitter("regex:(")
