"""The documentation lives in the repository and is checked like code: the CLI reference is
generated from `--help`, every example's sample path exists, every pointer into
docs/algorithms.md names a section it has, and ruff passes."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
import typer

from prmtool.cli.commands import app
from prmtool.cli.reference import reference
from tests.conftest import ROOT


def test_the_cli_reference_is_generated_from_the_current_help():
    assert (ROOT / "docs" / "cli.md").read_text() == reference(), (
        "docs/cli.md is stale: run `python -m prmtool.cli.reference > docs/cli.md`"
    )


def help_examples() -> list[list[str]]:
    group = typer.main.get_command(app)
    lines = [line.strip() for command in group.commands.values() for line in (command.epilog or "").splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("prmtool ")]


def test_every_sample_path_in_a_help_example_exists():
    examples = help_examples()
    assert len(examples) > 30
    for words in examples:
        for word in words:
            if word.startswith(("data_samples/", "recipes/")):
                assert (ROOT / word).exists(), f"{' '.join(words)}: {word} does not exist"
            assert not word.startswith("../"), f"{' '.join(words)}: points outside the repository"


def test_every_recipe_example_in_help_plans_with_its_sets_from_and_until(tmp_path, monkeypatch):
    """`prmtool run` examples: the --set stages and options exist and parse, and --from and
    --until name stages of the recipe (a --model folder need not exist: it is the user's)."""
    from prmtool.cli.recipe import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    examples = [words for words in help_examples() if words[1] == "run"]
    assert examples
    for words in examples:
        options = dict(zip(words[3::2], words[4::2]))
        sets = [value for flag, value in zip(words[3::2], words[4::2]) if flag == "--set"]
        recipe = load_recipe(ROOT / words[2], sets, tmp_path / "work", options.get("--model"), options.get("--engine"))
        if "--model" not in options:
            check_recipe(recipe)
        for flag in ("--from", "--until"):
            if flag in options:
                recipe.find(options[flag], flag)


def test_every_pointer_into_the_algorithms_page_names_one_of_its_sections():
    sections = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "algorithms.md").read_text(), flags=re.M))
    sources = [*(ROOT / "prmtool").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    pointers = [
        (path, name) for path in sources for name in re.findall(r'docs/algorithms\.md, "([^"]+)"', path.read_text())
    ]
    assert pointers
    for path, name in pointers:
        assert name in sections, f"{path.relative_to(ROOT)} points to a section {name!r} that docs/algorithms.md lacks"


def test_no_module_points_to_files_users_do_not_have():
    shipped = [*(ROOT / "prmtool").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "recipes").iterdir()]
    for path in [*shipped, ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "ALGORITHMS.md" not in path.read_text() and "../shared" not in path.read_text(), path


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra: pip install -e '.[test]'")
def test_ruff_finds_nothing():
    result = subprocess.run(["ruff", "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["ruff", "format", "--check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, "not formatted (run `ruff format`):\n" + result.stdout + result.stderr
