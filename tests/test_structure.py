"""The rooms' boundaries: ``core`` and ``merging`` import no paper, a paper imports no other paper,
``merging`` imports nothing of ``core`` (pure kernels), and no module grows past what one person
can hold in mind. Read statically from the source (every ``import`` and ``from`` statement,
function-level ones included), so a lazy import cannot hide a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cmm_utils"
PAPERS = sorted(p.name for p in (PKG / "papers").iterdir() if (p / "__init__.py").exists())
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.startswith("cmm_utils")}


def files_under(room: str) -> list[Path]:
    return sorted((PKG / room).rglob("*.py"))


def test_rooms_exist_and_papers_are_the_four():
    assert PAPERS == ["cmm", "dynammo", "magmax", "medmerge"]
    assert files_under("core") and files_under("merging")


def test_imported_modules_resolves_relative_and_function_level_imports(tmp_path, monkeypatch):
    fake = PKG / "core" / "_probe_structure.py"
    try:
        fake.write_text("def f():\n    from ..papers.magmax import method\n")
        assert "cmm_utils.papers.magmax.method" in imported_modules(fake)
    finally:
        fake.unlink(missing_ok=True)


@pytest.mark.parametrize("room", ["core", "merging"])
def test_core_and_merging_import_no_paper(room):
    offenders = {module_name(f): sorted(m for m in imported_modules(f) if m.startswith("cmm_utils.papers"))
                 for f in files_under(room)}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_merging_is_pure():
    offenders = {module_name(f): sorted(m for m in imported_modules(f)
                                        if m.startswith("cmm_utils.") and not m.startswith("cmm_utils.merging"))
                 for f in files_under("merging")}
    assert not {k: v for k, v in offenders.items() if v}, offenders


@pytest.mark.parametrize("paper", PAPERS)
def test_a_paper_imports_no_other_paper(paper):
    others = [f"cmm_utils.papers.{p}" for p in PAPERS if p != paper]
    offenders = {module_name(f): sorted(m for m in imported_modules(f) if any(m == o or m.startswith(o + ".")
                                                                              for o in others))
                 for f in files_under(f"papers/{paper}")}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_no_module_past_one_readers_reach():
    long = {module_name(f): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


HIDDEN = {"hide-input", "remove-input", "remove-cell"}
MAX_VISIBLE_CODE_LINES = 40


@pytest.mark.parametrize("notebook", ["magmax", "cmm", "dynammo", "medmerge", "leaderboard"])
def test_chapters_show_little_code(notebook):
    """The rendered chapter shows the claim, setup, figures, tables and verdict; orchestration
    cells are collapsed (``hide-input``). The browser test counts the same on the built page."""
    import json

    nb = json.loads((PKG.parent / "notebooks" / f"{notebook}.ipynb").read_text())
    visible = sum(len("".join(c["source"]).rstrip("\n").splitlines()) for c in nb["cells"]
                  if c["cell_type"] == "code" and not HIDDEN & set(c.get("metadata", {}).get("tags", [])))
    assert visible <= MAX_VISIBLE_CODE_LINES, f"{notebook}: {visible} visible code lines"
