"""ruff, with pyproject.toml's settings (lint: pycodestyle, pyflakes, isort; format at 119 columns), is clean
on the package: hubprune/ (its subpackages too), server/, space/ and cards/; and so is mypy (pyproject's
[tool.mypy]) on the package as it installs: hubprune/ with server/ as hubprune.server and space/ as hubprune.space."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["hubprune", "server", "space", "cards"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run([sys.executable, "-m", "ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean(tmp_path):
    """mypy sees the installed layout through a tree of links (an editable install maps server/ and space/
    into the package with an import hook, which mypy does not follow)."""
    package = tmp_path / "hubprune"
    package.mkdir()
    for path in (ROOT / "hubprune").iterdir():
        if path.suffix == ".py" or path.name == "py.typed" or (path / "__init__.py").is_file():  # modules, subpackages
            (package / path.name).symlink_to(path, target_is_directory=path.is_dir())
    for folder in ("server", "space", "cards"):
        (package / folder).symlink_to(ROOT / folder, target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "hubprune"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists the packages by hand (server/, space/ and cards/ are mapped into hubprune), so a new
    folder under hubprune/ must be listed there too, or an editable install works and the wheel lacks it."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    package = ROOT / "hubprune"
    found = {".".join(("hubprune", *p.parent.relative_to(package).parts)) for p in package.glob("**/__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
