"""`prmtool view`: a labelled shard set as one HTML page, checked in a real headless Chromium
(Debian's `chromium`; the browser tests are skipped, saying so, where it is not installed)."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from pathlib import Path

import polars as pl
import pytest

from tests.browser import Browser, browser_test, file_url
from tests.conftest import ROOT, write_shards

SCREENSHOT = ROOT / "docs" / "view.png"


def labelled_rows() -> pl.DataFrame:
    """Six labelled responses to two problems: MC values, three label sets that sometimes
    disagree, a long trace whose first 3 steps are thinking, and a response that holds markup."""
    ducks = (
        "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
        "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
        "egg. How much in dollars does she make every day at the farmers' market?"
    )
    robe = "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?"
    rows = [
        # problem, response_id, steps, step_mc, correct, first_error, human, judge, thinking
        (
            ducks,
            "ducks-right",
            ["Janet sells 16 - 3 - 4 = 9 duck eggs a day.", "She makes 9 * 2 = $18 every day.", "The answer is 18."],
            [1.0, 1.0, 1.0],
            True,
            -1,
            -1,
            -1,
            0,
        ),
        (
            ducks,
            "ducks-wrong",
            ["Janet sells 16 - 3 - 4 = 9 duck eggs a day.", "She makes 9 * 2 = $28 every day.", "The answer is 28."],
            [0.875, 0.0, 0.0],
            False,
            1,
            1,
            2,
            0,
        ),
        (
            ducks,
            "ducks-early",
            ["Janet sells 16 - 3 = 13 duck eggs a day.", "She makes 13 * 2 = $26 every day.", "The answer is 26."],
            [0.25, 0.0, 0.0],
            False,
            1,
            0,
            0,
            0,
        ),
        (
            robe,
            "robe-right",
            ["It takes 2/2 = 1 bolt of white fiber.", "So the total is 2 + 1 = 3 bolts.", "The answer is 3."],
            [1.0, 0.75, 1.0],
            True,
            -1,
            -1,
            None,
            0,
        ),
        (
            robe,
            "robe-thinking",
            [
                "<think>Blue is 2 bolts.",
                "White is half of that: 2 / 2 = 2.",
                "So 4 in all.</think>",
                "White fiber: 2 bolts.",
                "Total: 2 + 2 = 4 bolts.",
                "The answer is 4.",
            ],
            [0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
            False,
            1,
            1,
            4,
            3,
        ),
        (
            robe,
            "robe-markup",
            ["A step with </script><script>document.title='owned'</script> in it.", "The answer is <b>3</b>."],
            [0.625, 0.5],
            True,
            -1,
            None,
            -1,
            0,
        ),
    ]
    names = ["problem", "response_id", "steps", "step_mc", "correct", "first_error", "human_first_error"]
    names += ["judge_first_error", "thinking_steps"]
    frame = pl.DataFrame([dict(zip(names, row)) for row in rows])
    return frame.with_columns(
        pl.col("problem")
        .map_elements(lambda text: hashlib.sha256(text.encode()).hexdigest()[:16], pl.String)
        .alias("problem_id"),
        pl.col("steps").list.join("\n\n").alias("response"),
        pl.col("step_mc").list.eval((pl.element() > 0).cast(pl.Int8)).alias("step_labels"),
        pl.col("first_error", "human_first_error", "judge_first_error", "thinking_steps").cast(pl.Int32),
        pl.lit("18").alias("reference_answer"),
        pl.when(pl.col("problem").str.starts_with("Janet"))
        .then(pl.lit("model-a"))
        .otherwise(pl.lit("model-b"))
        .alias("generator"),
    )


@pytest.fixture
def labelled(tmp_path) -> Path:
    """The six rows as two shards, as `label` writes them."""
    return write_shards(tmp_path / "labelled", labelled_rows(), [3, 3])


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_view_writes_one_page_that_needs_no_network(prmtool, labelled, tmp_path):
    before = digests(labelled)
    page = tmp_path / "report" / "labelled.html"
    result = prmtool("view", labelled, "-o", page, "--compare", "first_error,human_first_error")
    assert result.exit_code == 0, result.stderr
    assert f"wrote {page} (6 responses" in result.stderr
    html = page.read_text()
    # nothing fetched: no external script, style, font or image; the plots are data URIs
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html and "url(http" not in html
    assert html.count("data:image/png;base64,") == 3  # MC values, first-error position, accuracy
    # a step's `</script>` stays inside the JSON: the page has exactly its two script elements
    assert html.count("</script>") == 2 and "\\u003c/script>" in html
    assert digests(labelled) == before  # the input untouched


@pytest.mark.parametrize(
    "options, message",
    [
        (["--color", "step_nope"], "--color step_nope: no such column (step columns: step_mc, step_labels)"),
        (["--color", "response_id"], "--color response_id: not a list of numbers, one per step"),
        (["--compare", "first_error,judge"], "--compare judge: no such column (integer columns: first_error,"),
        (["--compare", "first_error,_shard"], "--compare _shard: no such column"),
        (["--compare", "first_error"], "--compare 'first_error': expected two different columns"),
        (["--compare", "first_error,thinking_steps,correct"], "expected two different columns"),
    ],
)
def test_bad_options_are_one_line_errors(prmtool, labelled, tmp_path, options, message):
    result = prmtool("view", labelled, "-o", tmp_path / "page.html", *options)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "page.html").exists()


def test_view_refuses_to_write_over_an_input(prmtool, labelled):
    shard = labelled / "part-00000.parquet"
    before = digests(labelled)
    result = prmtool("view", shard, "-o", shard)
    assert result.exit_code == 2 and "-o is an input of this command" in result.stderr
    result = prmtool("view", labelled, "-o", labelled / "page.html")
    assert result.exit_code == 2 and "-o lies inside the input" in result.stderr
    assert digests(labelled) == before


def test_view_refuses_a_link_a_fifo_or_a_device_where_the_page_goes(prmtool, labelled, tmp_path):
    import os
    import stat

    target = tmp_path / "target.txt"
    target.write_text("mine")
    link, fifo = tmp_path / "link.html", tmp_path / "fifo.html"
    link.symlink_to(target)
    os.mkfifo(fifo)
    for path in (link, fifo):
        result = prmtool("view", labelled, "-o", path)
        assert result.exit_code == 2 and str(path) in result.stderr and "not a regular file" in result.stderr
    assert target.read_text() == "mine" and link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # a link planted at the name the page was once written through first
    (tmp_path / ".out.html.tmp").symlink_to(target)
    assert prmtool("view", labelled, "-o", tmp_path / "out.html", "-q").exit_code == 0
    assert target.read_text() == "mine" and "<html" in (tmp_path / "out.html").read_text()


def open_page(browser: Browser, page: Path) -> None:
    browser.goto(file_url(page))
    browser.wait_until("document.querySelectorAll('article.response').length > 0")


def shown(browser: Browser) -> tuple[int, list[str]]:
    """The filter's count, and the response ids on the page."""
    count = browser.evaluate("Number(document.getElementById('count').dataset.count)")
    ids = browser.evaluate("[...document.querySelectorAll('article.response')].map(a => a.dataset.responseId)")
    return count, ids


def choose(browser: Browser, select_id: str, value: str) -> None:
    browser.evaluate(
        f"(() => {{ const s = document.getElementById('{select_id}'); s.value = '{value}';"
        " s.dispatchEvent(new Event('change')); })()"
    )


@browser_test
def test_page_loads_without_errors_and_filters_rows(prmtool, labelled, tmp_path):
    page = tmp_path / "labelled.html"
    assert prmtool("view", labelled, "-o", page, "--page-size", "4", "-q").exit_code == 0
    with Browser() as browser:
        open_page(browser, page)
        assert browser.console_errors == []
        assert browser.evaluate("document.title").startswith("prmtool view")  # the markup in a step ran nothing
        assert shown(browser) == (6, ["ducks-right", "ducks-wrong", "ducks-early", "robe-right"])  # a page of 4
        browser.click("#pager-top .next")
        assert shown(browser)[1] == ["robe-thinking", "robe-markup"]

        choose(browser, "filter-answer", "wrong")
        assert shown(browser) == (3, ["ducks-wrong", "ducks-early", "robe-thinking"])
        choose(browser, "filter-answer", "all")

        # a label column's value: the judge found no error in 2 responses, and labelled all but one
        choose(browser, "filter-column", "judge_first_error")
        choose(browser, "filter-value", "none")
        assert shown(browser) == (2, ["ducks-right", "robe-markup"])
        choose(browser, "filter-value", "missing")
        assert shown(browser) == (1, ["robe-right"])
        # a column of the user's own, such as the model that wrote the response
        choose(browser, "filter-column", "generator")
        choose(browser, "filter-value", "model-b")
        assert shown(browser) == (3, ["robe-right", "robe-thinking", "robe-markup"])
        choose(browser, "filter-column", "")

        # first_error against human_first_error: they differ on ducks-early only (robe-markup has no human label)
        browser.click("#filter-disagree")
        assert shown(browser) == (1, ["ducks-early"])
        choose(browser, "compare-b", "judge_first_error")
        assert shown(browser) == (3, ["ducks-wrong", "ducks-early", "robe-thinking"])
        browser.click("#filter-disagree")

        browser.evaluate(
            "(() => { const s = document.getElementById('search'); s.value = 'ROBE';"
            " s.dispatchEvent(new Event('input')); })()"
        )
        browser.wait_until("document.getElementById('count').dataset.count === '3'")
        # step MC closest to the threshold (0.5) first: robe-thinking and robe-markup have a 0.5
        choose(browser, "order", "threshold")
        assert shown(browser)[1][:2] == ["robe-thinking", "robe-markup"]
        assert browser.console_errors == []


@browser_test
def test_steps_are_shaded_and_first_errors_marked(prmtool, labelled, tmp_path):
    page = tmp_path / "labelled.html"
    assert prmtool("view", labelled, "-o", page, "--color", "step_mc", "-q").exit_code == 0
    with Browser() as browser:
        open_page(browser, page)
        wrong = "article[data-response-id='ducks-wrong']"
        backgrounds = browser.evaluate(
            f'[...document.querySelectorAll("{wrong} .step")].map(s => getComputedStyle(s).backgroundColor)'
        )
        assert len(set(backgrounds)) == 2  # MC 0.875 and then 0, 0 : two shades, greener first
        red, green = (lambda rgb: (rgb[0], rgb[1]))(re.findall(r"\d+", backgrounds[0])[:2])
        assert int(green) > int(red)
        badges = browser.evaluate(
            f"[...document.querySelectorAll(\"{wrong} .step\")].map(s => [...s.querySelectorAll('.chip')]"
            ".map(c => c.textContent))"
        )
        assert badges == [[], ["first_error", "human_first_error"], ["judge_first_error"]]
        # the thinking steps are folded, and built only when opened
        thinking = "article[data-response-id='robe-thinking']"
        assert browser.evaluate(f'document.querySelector("{thinking} details.thinking summary").textContent') == (
            "thinking: 3 steps (first error inside, at step 1)"
        )
        assert browser.evaluate(f'document.querySelectorAll("{thinking} .step").length') == 3
        browser.click(f"{thinking} details.thinking summary")
        browser.wait_until(f'document.querySelectorAll("{thinking} .step").length === 6')
        browser.click("#tab-summary")
        assert browser.evaluate("document.querySelectorAll('#summary img').length") == 3
        assert browser.evaluate("[...document.querySelectorAll('#summary img')].every(i => i.naturalWidth > 0)")
        assert browser.console_errors == []


@browser_test
def test_screenshot_of_a_labelled_response(prmtool, labelled, tmp_path):
    """The picture in the README (docs/view.png). PRMTOOL_UPDATE_SCREENSHOT=1 writes it anew."""
    page = tmp_path / "labelled.html"
    assert prmtool("view", labelled, "-o", page, "--compare", "first_error,judge_first_error", "-q").exit_code == 0
    with Browser(width=1000, height=1000) as browser:
        open_page(browser, page)
        png = browser.screenshot("article[data-response-id='ducks-wrong']")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and 150 < height < 400
    if os.environ.get("PRMTOOL_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes(png)
    assert SCREENSHOT.exists() and SCREENSHOT.read_bytes()[:8] == png[:8]
