"""The user message every model stage wraps a problem in, unless given another."""

# Asks for what the default step split and verify read: blank lines between steps, \boxed{}.
DEFAULT_PROMPT_TEMPLATE = (
    "{problem}\n\nSolve the problem step by step. Separate the steps with a blank line, "
    "and put the final answer in \\boxed{}."
)
