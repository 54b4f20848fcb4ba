"""The book builds from the smoke notebooks and reads well in a real headless browser."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cmm_utils import runner

from .browser import chromium_available, chromium_driver, crawl

pytestmark = [pytest.mark.book, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def built_book() -> Path:
    executed = runner.runs_dir("smoke") / "notebooks"
    expected = {p.stem for p in runner.notebooks()}
    if not expected <= {p.stem for p in executed.glob("*.ipynb")}:
        runner.execute("smoke")  # `make test` has already done this; plain `pytest` does it here
    return runner.build_book("smoke")


def test_book_has_every_chapter_and_the_run_log(built_book):
    html = built_book.parent
    assert built_book.exists()
    for nb in runner.notebooks():
        assert (html / "book" / "chapters" / f"{nb.stem}.html").exists(), nb.stem
    log = (html / "book" / "run_log.html").read_text()
    assert "smoke" in log and "git_commit" in log.replace(" ", "_")


def test_mathjax_is_vendored_not_from_a_cdn(built_book):
    intro = (built_book.parent / "book" / "intro.html").read_text()  # the front page has maths
    assert "cdn.jsdelivr" not in intro and "_static/mathjax/tex-chtml.js" in intro
    assert (built_book.parent / "_static" / "mathjax" / "tex-chtml.js").exists()


def test_every_page_renders_in_a_headless_browser(built_book, tmp_path):
    if not chromium_available():
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are required in CI (make browser installs them)")
        pytest.skip("chromium/chromedriver not installed (make browser installs them)")
    stats = {}
    with chromium_driver() as driver:
        pages, problems = crawl(built_book.parent, driver, screenshot_dir=tmp_path / "shots", stats=stats)
    chapters = [p for p in pages if p.startswith("book/chapters/")]
    assert len(chapters) == len(runner.notebooks()), pages
    assert not problems, "\n".join(problems)
    print({p: s for p, s in stats.items() if p in chapters})
    for name in ("magmax", "cmm", "dynammo", "medmerge", "leaderboard"):
        page = stats[f"book/chapters/{name}.html"]
        assert page["visibleCodeLines"] <= 40, (name, page)
        assert page["figures"] >= 1 and page["tables"] >= 1, (name, page)  # hidden code, figures still there


def test_the_browser_check_catches_what_a_reader_would_hit(tmp_path):
    if not chromium_available():
        pytest.skip("chromium/chromedriver not installed")
    (tmp_path / "index.html").write_text(
        '<html><body><a href="page.html">ok</a><a href="gone.html">broken</a>'
        '<img src="missing.png"><a href="page.html#nowhere">anchor</a></body></html>')
    (tmp_path / "page.html").write_text(
        '<html><body><div id="here"></div><div class="output traceback">ZeroDivisionError</div>'
        '<div class="cell_input"><pre>shown = 1\nalso = 2</pre></div>'
        '<details><div class="cell_input"><pre>hidden = 3</pre></div></details></body></html>')
    stats = {}
    with chromium_driver() as driver:
        pages, problems = crawl(tmp_path, driver, stats=stats)
    text = "\n".join(problems)
    assert stats["page.html"]["visibleCodeLines"] == 2  # the collapsed cell is not counted
    assert sorted(pages) == ["index.html", "page.html"]
    for expected in ("broken link gone.html", "image does not load", "missing anchor page.html#nowhere",
                     "error output cell"):
        assert expected in text, text
