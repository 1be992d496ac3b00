"""What ``hubprune serve`` runs: typed, validated settings from the command line or a YAML file.

A ``serve.yaml`` (unknown keys are rejected)::

    engine: auto                 # auto | transformers | vllm
    port: 8000
    models:
      - name: smollm2            # the request's "model" field
        path: HuggingFaceTB/SmolLM2-135M-Instruct
      - name: smollm2-24l
        path: out/smollm2-24l
        max_model_len: 2048
        vllm_args: ["--swap-space", "0"]

The API key is never read from YAML: pass ``--api-key`` or set ``HUBPRUNE_API_KEY``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from hubprune.config import DTYPES, reject_unknown  # one list and one key check for the library and the server

ENGINES = ("auto", "transformers", "vllm")
BNB_QUANTIZATION = ("8bit", "4bit")  # bitsandbytes, transformers engine
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")
_SIZE = re.compile(r"^\s*([0-9.]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass
class ModelSpec:
    """One served model. Example: ``ModelSpec(path="out/smollm2-24l", max_model_len=2048)``.

    ``path`` is a Hub id, a local transformers folder or a .gguf file; ``url`` instead routes
    to an OpenAI server that is already running (nothing is started or stopped for it).
    """

    path: str | None = None
    name: str = ""  # default: default_name(path)
    url: str | None = None
    url_api_key_env: str | None = None  # env var holding the key of the server at ``url``
    revision: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on a GPU
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 8  # sequences decoded at once (vLLM) and counted in the KV-cache plan
    max_queue: int = 64  # requests in flight for this model before the router answers 429
    quantization: str | None = None  # 8bit / 4bit (bitsandbytes) or a vLLM method (awq, gptq, fp8, ...)
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    vllm_args: list[str] = field(default_factory=list)  # passed to vLLM's server unchanged

    def __post_init__(self) -> None:
        if (self.path is None) == (self.url is None):
            raise ValueError(
                f"model {self.name or '?'}: give exactly one of path (a model to load) or url "
                f"(a running OpenAI server), got path={self.path!r}, url={self.url!r}"
            )
        if not self.name:
            self.name = default_name(self.path) if self.path else ""
        if not self.name or not _NAME.match(self.name):
            raise ValueError(
                f"model name {self.name!r} must be 1-128 characters of letters, digits and ._/:- "
                "(it is the request's 'model' field)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"model {self.name}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for key in ("max_num_seqs", "max_queue", "tensor_parallel_size"):
            _positive_int(f"model {self.name}: {key}", getattr(self, key))
        if self.max_model_len is not None:
            _positive_int(f"model {self.name}: max_model_len", self.max_model_len)
        if not isinstance(self.vllm_args, list) or not all(isinstance(a, str) for a in self.vllm_args):
            raise TypeError(f"model {self.name}: vllm_args must be a list of strings such as ['--swap-space', '0']")


@dataclass
class ServeConfig:
    """Everything one ``hubprune serve`` run needs. Example: ``ServeConfig.load("serve.yaml")``."""

    models: list[ModelSpec]
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "auto"
    device: str = "auto"  # transformers engine: auto, cpu, cuda, cuda:N
    api_key: str | None = field(default=None, repr=False)  # never printed
    vllm_python: str | None = None  # default: $HUBPRUNE_VLLM_PYTHON, else .venv-vllm/bin/python of the repo
    gpu_memory_utilization: float = 0.9  # share of the GPU all vLLM processes together may take
    memory_budget: str | int | None = None  # cap on the memory the plan may use, e.g. "12GiB"
    max_body_bytes: int = 4 * 2**20
    startup_timeout: float = 600.0  # seconds to wait for each vLLM process to answer /health
    shutdown_grace: float = 10.0  # seconds requests in flight get after SIGTERM/SIGINT; then they end with a 503
    log_dir: str | None = None  # vLLM process logs (default: a fresh temporary folder)

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelSpec) else _spec(m) for m in self.models]
        if not self.models:
            raise ValueError("no models to serve: give at least one MODEL, or a models: list in the config")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"model names must be unique, {duplicates} appear more than once; "
                "set name: for each (or NAME=PATH on the command line)"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in 0-65535, got {self.port!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _positive_int("max_body_bytes", self.max_body_bytes)
        if (
            isinstance(self.shutdown_grace, bool)
            or not isinstance(self.shutdown_grace, (int, float))
            or not 0 <= self.shutdown_grace <= 3600
        ):
            raise ValueError(f"shutdown_grace must be a number of seconds in [0, 3600], got {self.shutdown_grace!r}")
        if self.memory_budget is not None:
            self.memory_budget = parse_size(self.memory_budget)
        if self.api_key is None:
            self.api_key = os.environ.get("HUBPRUNE_API_KEY") or None

    @classmethod
    def load(cls, path: str | Path, **overrides) -> ServeConfig:
        """Read a serve YAML; keyword overrides (from the command line) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"serve config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping with a models: list, got {type(data).__name__}")
        if "api_key" in data:
            raise ValueError(f"{path}: api_key is not read from files; pass --api-key or set HUBPRUNE_API_KEY")
        reject_unknown(data, {f.name for f in fields(cls)} - {"api_key"}, str(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def vllm_interpreter(self) -> Path:
        """The Python that runs vLLM: --vllm-python, $HUBPRUNE_VLLM_PYTHON, or the repo's .venv-vllm."""
        chosen = self.vllm_python or os.environ.get("HUBPRUNE_VLLM_PYTHON")
        if chosen:
            return Path(chosen).expanduser()
        return Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def default_name(path: str) -> str:
    """The served name of a model given by path: a folder's or file's name, or the Hub id itself.

    Example: ``default_name("out/smollm2-24l") == "smollm2-24l"``
    """
    p = Path(path).expanduser()
    if p.exists():
        return p.stem if p.suffix == ".gguf" else p.resolve().name
    return path


def parse_model_arg(text: str) -> ModelSpec:
    """``PATH`` or ``NAME=PATH`` from the command line. Example: ``parse_model_arg("small=out/smollm2-24l")``."""
    name, sep, path = text.partition("=")
    return ModelSpec(path=path, name=name) if sep and name and "/" not in name else ModelSpec(path=text)


def parse_size(value: str | int | float) -> int:
    """``"12GiB"`` / ``"500MB"`` / ``1024`` -> bytes. Example: ``parse_size("1GiB") == 2**30``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"memory size {value!r} is not understood; write e.g. 12GiB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def _spec(data) -> ModelSpec:
    if isinstance(data, str):
        return parse_model_arg(data)
    if not isinstance(data, dict):
        raise TypeError(f"each models: entry is a mapping (name, path, ...) or a path string, got {data!r}")
    reject_unknown(data, {f.name for f in fields(ModelSpec)}, f"model {data.get('name') or data.get('path')}")
    return ModelSpec(**data)


def _positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


_MODEL_FLAGS = (
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_queue",
    "quantization",
    "tensor_parallel_size",
    "trust_remote_code",
)


def add_arguments(parser) -> None:
    """The ``hubprune serve`` flags (an argparse parser); ``ServeConfig.from_args`` reads them back."""
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help="Hub id, folder or .gguf file; NAME=PATH chooses the served name"
    )
    parser.add_argument("--config", help="a serve YAML with models: and options (flags override it)")
    parser.add_argument("--engine", choices=ENGINES, help="default auto: vLLM when its Python imports vllm")
    parser.add_argument("--host", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, help="default 8000")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $HUBPRUNE_API_KEY)")
    parser.add_argument("--vllm-python", help="Python of the vLLM venv (default: $HUBPRUNE_VLLM_PYTHON or .venv-vllm)")
    parser.add_argument("--device", help="transformers engine: auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, help="default auto: float32 on CPU, the checkpoint's on GPU")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, help="sequences decoded at once by vLLM (default 8)")
    parser.add_argument("--max-queue", type=int, help="requests in flight per model before 429 (default 64)")
    parser.add_argument("--quantization", help="8bit or 4bit (bitsandbytes, CUDA), or a vLLM method")
    parser.add_argument("--tensor-parallel-size", type=int, help="GPUs per model (vLLM)")
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="run the model repo's code")
    parser.add_argument(
        "--vllm-arg",
        action="append",
        dest="vllm_args",
        metavar="ARG",
        help="one more vLLM option, repeatable: --vllm-arg=--swap-space --vllm-arg=0",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, help="share of the GPU for all vLLM processes (0.9)")
    parser.add_argument("--memory-budget", help="cap the memory plan, e.g. 12GiB")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (default 4 MiB)")
    parser.add_argument("--startup-timeout", type=float, help="seconds to wait for each vLLM process (default 600)")
    parser.add_argument("--log-dir", help="folder for vLLM process logs (default: a temporary folder)")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        help="seconds the requests in flight get after SIGTERM or Ctrl-C (default 10); then streams "
        "end with an error event and waiting requests get a 503",
    )


def from_args(args) -> ServeConfig:
    """A ServeConfig from ``hubprune serve`` flags (see ``add_arguments``)."""
    options = {
        k: getattr(args, k)
        for k in (
            "engine",
            "host",
            "port",
            "api_key",
            "vllm_python",
            "device",
            "gpu_memory_utilization",
            "memory_budget",
            "max_body_bytes",
            "startup_timeout",
            "log_dir",
            "shutdown_grace",
        )
    }
    per_model = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    if args.vllm_args:
        per_model["vllm_args"] = args.vllm_args
    if args.config:
        if args.models:
            raise ValueError("give models either on the command line or in --config, not both")
        config = ServeConfig.load(args.config, **options)
        for spec in config.models:
            for key, value in per_model.items():
                setattr(spec, key, value)
            spec.__post_init__()
        return config
    if not args.models:
        raise ValueError("nothing to serve: give one or more MODEL (Hub id, folder, .gguf) or --config serve.yaml")
    models = [ModelSpec(**{**vars(parse_model_arg(m)), **per_model}) for m in args.models]
    return ServeConfig(models=models, **{k: v for k, v in options.items() if v is not None})
