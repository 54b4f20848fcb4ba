"""Visit every page of the built book in headless Chromium and report what a reader would hit:
images that do not load, links to pages or anchors that do not exist, error output cells."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]


def chromium_available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


@contextlib.contextmanager
def chromium_driver():
    """A headless Chromium with a fresh profile; the browser quits and its profile folder is
    deleted on exit (each profile is a few MB, and CI shares its disk with the venv)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="cmm-chromium-") as profile:
        opts.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        try:
            yield driver
        finally:
            driver.quit()


WAIT_FOR_PAGE = """
return new Promise(resolve => {
  const done = () => (window.MathJax && MathJax.startup && MathJax.startup.promise)
      ? MathJax.startup.promise.then(() => resolve()) : resolve();
  if (document.readyState === 'complete') done(); else window.addEventListener('load', done);
});
"""

PAGE_PROBE = """
const imgs = [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}));
const refresh = document.querySelector('meta[http-equiv="Refresh" i]');
const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))
    .concat(refresh ? [refresh.content.split('url=')[1]] : []);
const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
const errors = [...document.querySelectorAll('.output.traceback, .output.error, .output.stderr')]
    .map(e => e.innerText.slice(0, 200));
const mathjax = document.querySelectorAll('mjx-container').length;
const rawMath = [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container')).length;
// code a reader sees without opening anything: input cells' lines that are laid out on the page
const visibleCodeLines = [...document.querySelectorAll('.cell_input pre')]
    .filter(e => (e.checkVisibility ? e.checkVisibility() : e.getClientRects().length > 0))
    .reduce((n, e) => n + e.innerText.replace(/\\n+$/, "").split("\\n").length, 0);
const figures = document.querySelectorAll('.cell_output img').length;
const tables = document.querySelectorAll('.cell_output table').length;
return {imgs, links, ids, errors, title: document.title, mathjax, rawMath, visibleCodeLines, figures, tables};
"""


MAX_VISIBLE_CODE_LINES = 40  # per chapter page: the reader meets claims, figures and tables, not orchestration


def crawl(html_dir: Path, driver, screenshot_dir: Path | None = None,
          stats: dict | None = None) -> tuple[list[str], list[str]]:
    """Pages visited and problems found, starting at index.html and following internal links.
    ``stats`` (if given) receives per page the visible code lines, figures and tables."""
    html_dir = html_dir.resolve()
    todo, seen, problems, anchors_needed, ids_by_page = [html_dir / "index.html"], set(), [], [], {}
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        driver.get(page.as_uri())
        driver.execute_script(WAIT_FOR_PAGE)
        info = driver.execute_script(PAGE_PROBE)
        landed = Path(unquote(urlparse(driver.current_url).path))
        if landed != page:  # a meta-refresh redirect (index.html -> the root page) was followed
            seen.add(landed)
            page = landed
        rel = page.relative_to(html_dir)
        ids_by_page[page] = set(info["ids"])
        if stats is not None:
            stats[str(rel)] = {k: info[k] for k in ("visibleCodeLines", "figures", "tables")}
        if str(rel).startswith("book/chapters/") and info["visibleCodeLines"] > MAX_VISIBLE_CODE_LINES:
            problems.append(f"{rel}: {info['visibleCodeLines']} lines of visible code (at most "
                            f"{MAX_VISIBLE_CODE_LINES}; tag orchestration cells hide-input)")
        if screenshot_dir is not None:
            screenshot_dir.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot_dir / (str(rel).replace("/", "_") + ".png")))
        for img in info["imgs"]:
            if not img["ok"]:
                problems.append(f"{rel}: image does not load: {img['src']}")
        if info["rawMath"]:
            problems.append(f"{rel}: {info['rawMath']} maths elements not typeset by MathJax")
        for err in info["errors"]:
            problems.append(f"{rel}: error output cell: {err!r}")
        for href in info["links"]:
            parsed = urlparse(href)
            if parsed.scheme in ("http", "https", "mailto", "javascript") or href.startswith("#") and len(href) == 1:
                continue
            target_path, fragment = urldefrag(href)
            target = (page.parent / unquote(target_path)).resolve() if target_path else page
            if not target.exists():
                problems.append(f"{rel}: broken link {href}")
                continue
            if fragment:
                anchors_needed.append((rel, target, fragment))
            if target.suffix == ".html" and html_dir in target.parents and target not in seen:
                if not target.name.startswith(("genindex", "search")):
                    todo.append(target)
    for rel, target, fragment in anchors_needed:
        if target in ids_by_page and fragment not in ids_by_page[target]:
            problems.append(f"{rel}: link to a missing anchor {target.name}#{fragment}")
    return [str(p.relative_to(html_dir)) for p in sorted(seen)], problems


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.browser [_build/html]``: crawl a built book (any profile), print what a reader
    would hit, exit 1 on any problem. ``make browse`` runs it on the last build."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("html_dir", nargs="?", default="_build/html", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None, help="save one PNG per page here")
    args = parser.parse_args(argv)
    if not (args.html_dir / "index.html").exists():
        parser.error(f"no book at {args.html_dir}/index.html: run `make book` first")
    if not chromium_available():
        parser.error("chromium and chromedriver are not installed (`make browser` installs them as root)")
    with chromium_driver() as driver:
        pages, problems = crawl(args.html_dir, driver, screenshot_dir=args.screenshots)
    print(f"{len(pages)} pages visited under {args.html_dir}")
    for p in problems:
        print("PROBLEM", p)
    print("no problems" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
