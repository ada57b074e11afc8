"""README.md documents the row contract and the export formats once; keep it true."""

import re
import subprocess

from prmtool.core.schema import markdown_table
from prmtool.methods.formats import FORMATS
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _between(marker: str) -> str:
    return re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", README, re.S).group(1)


def test_readme_row_contract_matches_schema():
    assert _between("contract") == markdown_table()


def test_readme_formats_match_the_export_formats():
    rows = [f"| `{f.name}` | {f.columns} |" for f in FORMATS.values()]
    assert _between("formats") == "\n".join(["| `--format` | columns |", "| --- | --- |", *rows])


def test_ci_runs_the_readme_test_command():
    printed = subprocess.run(
        [
            "bash",
            "-c",
            "sed -n '/^Install the test dependencies/,/^```$/p' README.md | sed -n '/^```bash$/,/^```$/p' | sed "
            "'1d;$d'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert printed.endswith("python -m pytest -q")
    assert "sed -n '/^Install the test dependencies/" in (ROOT / ".ci" / "run").read_text()


def test_readme_example_rows_are_what_export_writes():
    import polars as pl

    from prmtool.stages.export import example_rows_markdown
    from tests.conftest import SAMPLES

    assert _between("format-examples") == example_rows_markdown(pl.read_parquet(SAMPLES / "labeled" / "*.parquet"))
