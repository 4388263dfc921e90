"""The declared dependency ranges leave out releases known to be malicious."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
ROOT = Path(__file__).resolve().parents[1]
# lightning 2.6.2 and 2.6.3 were published compromised: a credential stealer ran on `import lightning`
# (GHSA-w37p-236h-pfx3, Lightning issue #21691).
COMPROMISED = {"lightning": ("2.6.2", "2.6.3")}


def _declared() -> list[tuple[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [("pyproject.toml", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        found += [(f"pyproject.toml [{extra}]", Requirement(r)) for r in reqs]
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found.append(("requirements.txt", Requirement(line)))
    return found


@pytest.mark.parametrize("package", sorted(COMPROMISED))
def test_compromised_releases_are_excluded(package: str) -> None:
    declared = [(where, req) for where, req in _declared() if req.name == package]
    assert {where for where, _ in declared} >= {"pyproject.toml", "requirements.txt"}
    for where, req in declared:
        admitted = [v for v in COMPROMISED[package] if req.specifier.contains(v)]
        assert not admitted, f"{where}: {req} admits {admitted}"
        assert req.specifier.contains(version(package)), f"{where}: {req} excludes the installed release"
    assert version(package) not in COMPROMISED[package], f"a compromised {package} {version(package)} is installed"
