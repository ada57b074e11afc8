"""Rebuild the files in data_samples/ from GSM8K (MIT; see data_samples/gsm8k/LICENSE).

    python data_samples/make_samples.py ../shared/data/gsm8k/test.jsonl

- gsm8k/test_sample.jsonl: the first 40 GSM8K test problems, as GSM8K ships them.
- gsm8k/quickstart.jsonl: the first 8 of them, for recipes/quickstart.yaml.
- gsm8k/responses.jsonl: 4 responses to each of the first 12 of them, written from the gold
  solution so that their correctness is known: a correct one with \\boxed{}, a correct one
  ending in GSM8K's `#### X` with a thousands separator, a wrong one whose step k has a
  corrupted number (so its first error is step k), and one cut off before its answer.
- gsm8k/labeled.jsonl: the \boxed{} and wrong responses with the step labels their construction implies
  (every step good for a correct response; good up to the corrupted step, which is bad, the
  rest unlabeled, for a wrong one), so the step-level exports can be tried before `label`.
- gsm8k/problems/, gsm8k/responses/, gsm8k/labeled/: the three as Parquet shard sets in the
  row contract, made with `prmtool import`.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent / "gsm8k"
CALCULATOR = re.compile(r"<<[^>]*>>")


def solution_steps(answer: str) -> tuple[list[str], str]:
    body, final = answer.split("####")
    return [CALCULATOR.sub("", line).strip() for line in body.strip().split("\n") if line.strip()], final.strip()


def corrupt(step: str, rng: random.Random) -> str | None:
    """Change the last number of a step: a plausible arithmetic slip."""
    numbers = list(re.finditer(r"\d+", step))
    if not numbers:
        return None
    last = numbers[-1]
    wrong = int(last.group()) + rng.choice([-3, -2, -1, 1, 2, 5, 10])
    return step[: last.start()] + str(max(wrong, 0) if wrong != int(last.group()) else wrong + 1) + step[last.end() :]


def main(source: Path) -> None:
    rng = random.Random(0)
    rows = [json.loads(line) for line in source.read_text().splitlines()[:40]]
    (HERE / "test_sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "quickstart.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    responses, labeled = [], []
    for index, row in enumerate(rows[:12]):
        steps, answer = solution_steps(row["answer"])
        base = {"problem": row["question"], "reference_answer": answer}
        correct = steps + [f"The answer is $\\boxed{{{answer}}}$."]
        hashes = steps + [f"#### {int(answer):,}" if answer.isdigit() else f"#### {answer}"]
        corrupt_at = rng.choice([k for k in range(len(steps)) if re.search(r"\d", steps[k])] or [0])
        wrong_steps = steps[:corrupt_at] + [corrupt(steps[corrupt_at], rng) or steps[corrupt_at] + " (miscounted)"]
        wrong_answer = str(int(answer) + 7) if answer.lstrip("-").isdigit() else answer + "1"
        wrong = wrong_steps + steps[corrupt_at + 1 :] + [f"The answer is $\\boxed{{{wrong_answer}}}$."]
        truncated = steps[: max(1, len(steps) - 1)]
        for kind, these, labels in [
            ("boxed", correct, [1] * len(correct)),
            ("hashes", hashes, [1] * len(hashes)),
            ("wrong", wrong, [1] * corrupt_at + [0] + [None] * (len(wrong) - corrupt_at - 1)),
            ("truncated", truncated, None),
        ]:
            separator = "\n" if kind == "hashes" else "\n\n"
            response = {**base, "response_id": f"gsm8k-test-{index}-{kind}", "response": separator.join(these)}
            responses.append(response)
            if labels is not None and separator == "\n\n":
                first_error = labels.index(0) if 0 in labels else -1
                labeled.append({**response, "steps": these, "step_labels": labels, "first_error": first_error})
    (HERE / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    (HERE / "labeled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labeled))


def import_parquet() -> None:
    """The same samples as contract-shaped Parquet shard sets, through `prmtool import`."""
    from prmtool.cli import main as prmtool

    for name, extra in [("test_sample", ["--preset", "gsm8k"]), ("responses", []), ("labeled", [])]:
        target = "problems" if name == "test_sample" else name
        code = prmtool(
            ["import", str(HERE / f"{name}.jsonl"), "-o", str(HERE / target), "--overwrite", "--quiet", *extra]
        )
        assert code == 0, f"import of {name} failed"


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/gsm8k/test.jsonl"))
    import_parquet()
