"""Each command's `--help` examples run one after another in a fresh folder, as a user copies
them: every path an example reads was written by an earlier example of the same command, or is
the user's own data or an earlier stage's output, which a stand-in plays (STAND_INS).

Models: the tiny test model plays every model folder an example names (./Qwen2.5-Math-7B-Instruct
is a link to it) and the embedded default; every token it samples ends its sample, so sampling is
quick. `--engine vllm` runs on the hf engine where vLLM is not installed (a CPU machine).
`prmtool run` examples only plan (`--dry-run`): a recipe runs for minutes to hours.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import polars as pl
import pytest
import typer

from prmtool.cli import main
from prmtool.cli.commands import app
from prmtool.engines.choice import vllm_installed
from tests.conftest import ROOT
from tests.engine_fixtures import build_tokenizer, tiny_config

COMMANDS = ["import", "generate", "verify", "label", "score", "filter", "intervene", "export", "stats", "eval", "run"]
MODEL_OPTIONS = ("--model", "-m", "--policy", "--ref", "--judge-model", "--prm")


def examples_of(command: str) -> list[list[str]]:
    """The command lines under `prmtool COMMAND --help`, each as its words (after `prmtool`)."""
    epilog = typer.main.get_command(app).commands[command].epilog or ""
    return [shlex.split(line.strip())[1:] for line in epilog.splitlines() if line.strip().startswith("prmtool ")]


def paths_of(words: list[str]) -> tuple[list[str], list[str]]:
    """What an example reads (its inputs) and writes (every other path option, and `> FILE`),
    as its own command parses it."""
    words, redirect = (words[: words.index(">")], [words[words.index(">") + 1]]) if ">" in words else (words, [])
    command = typer.main.get_command(app).commands[words[0]]
    params = command.make_context(words[0], list(words[1:])).params
    if words[0] == "run":  # a recipe reads its input beside it, under data_samples/
        return [str(params["recipe_path"]), "data_samples"], []
    reads = [str(path) for path in params.get("inputs") or []]
    writes = [str(value) for name, value in params.items() if isinstance(value, Path) and name != "inputs"]
    return reads, writes + redirect


def within(path: str, folder: str) -> bool:
    path, folder = Path(path.split("*")[0].rstrip("/") or "."), Path(folder)
    return path == folder or folder in path.parents


# ------------------------------------------------------------------------------- stand-ins


def write_data_samples(base: Path) -> None:
    """data_samples/, as in the repository, with a few rows of each file."""
    for name, rows in [
        ("gsm8k/test_sample.jsonl", 3),
        ("gsm8k/responses.jsonl", 8),
        ("processbench-gsm8k/gsm8k.jsonl", 3),
        ("long-cot/sky-t1-amc23.jsonl", 2),
        ("deltabench/sample.jsonl", 3),
    ]:
        target = base / "data_samples" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join((ROOT / "data_samples" / name).read_text().splitlines(keepends=True)[:rows]))
    (base / "data_samples" / "quickstart").symlink_to(ROOT / "data_samples" / "quickstart")  # the recipes' input
    gsm8k = base / "data_samples" / "gsm8k"
    run("import", gsm8k / "test_sample.jsonl", "--preset", "gsm8k", "-o", gsm8k / "problems")
    run("import", gsm8k / "responses.jsonl", "-o", gsm8k / "responses")


def write_user_files(base: Path) -> None:
    """The user's own data the import and verify examples read."""
    pl.DataFrame(
        {"question": ["What is 2 + 3?", "What is 4 * 5?"], "gold": ["5", "20"], "output": ["2 + 3 = 5", "It is 21"]}
    ).write_csv(base / "outputs.csv")
    from datasets import Dataset, DatasetDict

    math = Dataset.from_dict({"problem": ["Compute $1+1$."], "solution": ["$1+1=\\boxed{2}$"]})
    DatasetDict({"test": math}).save_to_disk(str(base / "my_hf_dataset"))
    # A reasoning model's traces, short enough for the tiny model's context.
    traces = [
        {
            "problem": "What is 2 + 3?",
            "reference_answer": "5",
            "response": "Add them.\n\n2 + 3 = 5.\n</think>\n\n\\boxed{5}",
        },
        {
            "problem": "What is 4 * 5?",
            "reference_answer": "20",
            "response": "Multiply.\n\n4 * 5 = 21.\n</think>\n\n\\boxed{21}",
        },
    ]
    (base / "r1_outputs.jsonl").write_text("".join(json.dumps(trace) + "\n" for trace in traces))
    (base / "shards").mkdir()
    shutil.copy(base / "data_samples/gsm8k/responses/part-00000.parquet", base / "shards/part-00000.parquet")


# Earlier stages' outputs, each made by the command a user would have run before.
PIPELINE = [
    ["import", "data_samples/gsm8k/test_sample.jsonl", "--preset", "gsm8k", "-o", "work/problems"],
    ["import", "data_samples/gsm8k/responses.jsonl", "-o", "work/responses"],
    ["verify", "work/responses", "-o", "work/verified", "--workers", "1"],
    ["import", "r1_outputs.jsonl", "--split", "think", "--thinking-opened", "-o", "work/traces"],
    ["verify", "work/traces", "-o", "work/traces-verified", "--workers", "1"],
    ["label", "work/verified", "-o", "work/labeled", "--k", "2", "--workers", "1"],
    ["score", "work/labeled", "-o", "work/scored", "--no-ref"],
    ["filter", "work/scored", "-o", "work/prof", "--rejects", "work/prof_rejects"],
    [
        "intervene",
        "work/labeled",
        "-o",
        "work/interventions",
        "--candidates",
        "1",
        "--verify-rollouts",
        "1",
        "--workers",
        "1",
    ],
]
STAND_INS = ["data_samples", "recipes", "outputs.csv", "my_hf_dataset", "shards", "r1_outputs.jsonl"] + [
    path for words in PIPELINE for path in paths_of(words)[1]
]


def run(*words) -> None:
    code = main([str(word) for word in words] + ["--quiet"] * (words[0] not in ("stats", "eval")))
    assert code == 0, f"stand-in: prmtool {' '.join(map(str, words))} failed"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The tiny model with every token an end of sample, and a tiny token-classification PRM."""
    import torch
    from transformers import LlamaForTokenClassification

    policy = tmp_path_factory.mktemp("models") / "policy"
    shutil.copytree(tiny_model_dir, policy)
    tokenizer = build_tokenizer()
    (policy / "generation_config.json").write_text(json.dumps({"eos_token_id": list(range(len(tokenizer)))}))
    prm = policy.parent / "prm"
    torch.manual_seed(2)
    LlamaForTokenClassification(tiny_config(len(tokenizer), tokenizer.eos_token_id, num_labels=2)).save_pretrained(prm)
    tokenizer.save_pretrained(prm)
    return {"policy": policy, "prm": prm}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, models) -> Path:
    """Every stand-in, made once in one folder."""
    base = tmp_path_factory.mktemp("stand-ins")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        patch.setenv("PRMTOOL_CACHE_DIR", str(base / ".cache"))  # measured rates: never the user's cache
        patch.setattr("prmtool.engines.model_files.default_model_path", lambda: str(models["policy"]))
        write_data_samples(base)
        write_user_files(base)
        (base / "recipes").symlink_to(ROOT / "recipes")
        for words in PIPELINE:
            run(*words)
    return base


@pytest.mark.parametrize("command", COMMANDS)
def test_the_help_examples_run_one_after_another(prmtool, tmp_path, monkeypatch, stand_ins, models, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("prmtool.engines.model_files.default_model_path", lambda: str(models["policy"]))
    examples = examples_of(command)
    assert examples
    written: list[str] = []
    for words in examples:
        if words[0] == "run":
            words = [*words, "--dry-run"]
        if "--engine" in words and words[words.index("--engine") + 1] == "vllm" and not vllm_installed():
            words[words.index("--engine") + 1] = "hf"
        for option, value in zip(words, words[1:]):
            if option in MODEL_OPTIONS and value.startswith("./") and not Path(value).exists():
                Path(value).symlink_to(models["prm" if option == "--prm" else "policy"])
        reads, writes = paths_of(words)
        for path in reads:
            if any(within(path, earlier) for earlier in written) or Path(path).exists():
                continue
            stand_in = next((s for s in STAND_INS if within(path, s)), None)
            assert stand_in is not None, f"prmtool {shlex.join(words)}: reads {path}, which no earlier example makes"
            (tmp_path / stand_in).parent.mkdir(parents=True, exist_ok=True)
            if (stand_ins / stand_in).is_dir() and not (stand_ins / stand_in).is_symlink():
                shutil.copytree(stand_ins / stand_in, tmp_path / stand_in, symlinks=True)
            elif (stand_ins / stand_in).is_symlink():
                (tmp_path / stand_in).symlink_to((stand_ins / stand_in).readlink())
            else:
                shutil.copy(stand_ins / stand_in, tmp_path / stand_in)
        arguments = words[: words.index(">")] if ">" in words else words
        result = prmtool(*arguments)
        assert result.exit_code == 0, f"prmtool {shlex.join(words)}:\n{result.stderr}"
        if ">" in words:
            Path(words[words.index(">") + 1]).write_text(result.stdout)
        written += writes
