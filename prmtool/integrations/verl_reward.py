"""prmtool's verification as verl's reward function, for `prmtool export --format verl` data.

verl reads a custom reward from a file and a function name:

    reward.custom_reward_function.path=$(python -c "import prmtool.integrations.verl_reward as m; print(m.__file__)")
    reward.custom_reward_function.name=compute_score

and calls it once per response with keywords: `compute_score(data_source=..., solution_str=...,
ground_truth=..., extra_info=...)`. The score is 1.0 when the response's final answer (read as
`prmtool verify` reads it: boxed, answer phrase, final sentence) equals `ground_truth`
mathematically, else 0.0, whatever the data_source. verl may call it outside the main thread,
where Math-Verify's alarm-based timeouts cannot run; there each comparison runs without one.
"""

from __future__ import annotations

import logging
import threading


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 if `solution_str`'s final answer equals `ground_truth`, else 0.0."""
    from prmtool.methods.answers import find_answer
    from prmtool.methods.verification import compare

    if solution_str is None or ground_truth is None:
        return 0.0
    gold = ground_truth if isinstance(ground_truth, str) else repr([str(g) for g in ground_truth])
    answer = find_answer(str(solution_str), gold).text
    if answer is None:
        return 0.0
    timeout = 5 if threading.current_thread() is threading.main_thread() else 0  # 0: no alarm
    if not timeout:  # Math-Verify warns on every call without one
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    return 1.0 if compare(gold, answer, timeout).correct else 0.0
