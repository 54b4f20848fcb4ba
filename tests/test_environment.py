"""pyproject.toml and environment.yml pin the same versions; the pins are installed."""
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;]+)\s*", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        deps += extra
    return _pins(deps)


def conda_pins():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return _pins(pip)


def test_every_dependency_is_pinned_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert "==" in dep, f"{dep} is not pinned"


def test_pyproject_and_environment_yml_agree():
    a, b = pyproject_pins(), conda_pins()
    assert a == b, {"only in pyproject": a.keys() - b.keys(), "only in environment.yml": b.keys() - a.keys(),
                    "differ": {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]}}


def test_the_key_pins_are_what_runs():
    pins = pyproject_pins()
    for name in ("torch", "torchvision", "timm", "jupyter-book", "papermill", "nbval"):
        assert version(name).split("+")[0] == pins[name], name
    assert pins["jupyter-book"].startswith("1."), "jupyter-book 2.x fetches its theme online"
