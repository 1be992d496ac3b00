"""ruff, with pyproject.toml's settings (lint: pycodestyle, pyflakes, isort; format at 119 columns), is clean
on the package: hubprune/, server/, space/ and cards/; and so is mypy (pyproject's [tool.mypy]) on the
package as it installs: hubprune/ with server/ as hubprune.server and space/ as hubprune.space."""

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
        if path.suffix == ".py" or path.name == "py.typed":
            (package / path.name).symlink_to(path)
    for folder in ("server", "space", "cards"):
        (package / folder).symlink_to(ROOT / folder, target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "hubprune"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
