"""Text sources -> fixed-length token windows for scanning, healing and perplexity.

Sources: a list of strings, text files, a ``datasets`` dataset (object, name, or a
``save_to_disk`` folder), or the offline default corpus. Documents are tokenized in order,
joined with EOS, and cut into windows of ``seq_len`` tokens (each starting with BOS where
the tokenizer adds one), so there is no padding and every token counts.

The default corpora are the real text files that the ``exllamav2`` package ships
(Wikipedia, C4, TinyStories, code, ...). Each is split by document, deterministically and
without overlap: document i goes to "calibration" if i % 10 == 0, "heldout" if i % 10 == 1,
and "train" otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hubprune.config import CalibrationConfig

logger = logging.getLogger(__name__)

CORPORA = ("wiki", "c4", "tiny", "code", "technical", "multilingual")
SPLITS = ("calibration", "heldout", "train")


@dataclass
class TokenWindows:
    """Token windows (``ids``: [n, seq_len]) and the texts they were cut from."""

    ids: torch.Tensor
    texts: list[str]
    source: str
    loss_mask: torch.Tensor | None = None  # [n, seq_len] bool: the tokens healing learns (None: all)
    prompts: list[str] | None = None  # chat healing's questions (for its on-policy steps)

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def fingerprint(self) -> str:
        """sha256 of the token ids, to tell two token sets apart (or prove them equal)."""
        digest = hashlib.sha256(self.ids.numpy().tobytes())
        if self.loss_mask is not None:
            digest.update(self.loss_mask.numpy().tobytes())
        return digest.hexdigest()[:16]


def default_corpus(name: str = "wiki", split: str = "calibration") -> list[str]:
    """The documents of one split of an offline corpus.

    Example: ``texts = default_corpus("wiki", "heldout")``
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline default corpus comes from the exllamav2 package: run "
            "`pip install --no-deps exllamav2==0.3.2`, or give calibration texts, files or a dataset"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "conversion" / "standard_cal_data"
    docs = _split_documents((root / f"{name}.utf8").read_text(encoding="utf-8"))
    index = SPLITS.index(split)
    return [doc for i, doc in enumerate(docs) if min(i % 10, 2) == index]


def load_texts(
    source: Any = None, config: CalibrationConfig | None = None, corpus_split: str = "calibration"
) -> tuple[list[str], str]:
    """Resolve a text source to ``(documents, description)``.

    ``source`` may be None (use ``config``), a list of strings, a path or list of paths to
    text files, a ``datasets.Dataset``, or a ``CalibrationConfig``. ``corpus_split`` is the
    split of the default corpus used when nothing else is given.
    """
    config = config or CalibrationConfig()
    if isinstance(source, CalibrationConfig):
        config, source = source, None
    if source is None:
        if config.texts is not None:
            source = config.texts
        elif config.files is not None:
            source = [Path(f) for f in config.files]
        elif config.dataset is not None:
            return _dataset_texts(config.dataset, config), f"dataset {config.dataset}"
        else:
            return default_corpus(config.corpus, corpus_split), f"{config.corpus} corpus ({corpus_split} split)"
    if isinstance(source, (str, Path)) and Path(source).is_file():
        source = [Path(source)]
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, Path) for s in source):
        return [_read_file(p) for p in source], "files " + ", ".join(str(p) for p in source)
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        return list(source), f"{len(source)} texts"
    if _is_dataset(source):
        return _column(source, config.column), "dataset " + (getattr(source.info, "dataset_name", None) or "object")
    if isinstance(source, str):
        raise FileNotFoundError(f"calibration file {source} does not exist; give a list of texts, files or a dataset")
    raise TypeError(
        f"cannot use a {type(source).__name__} as calibration text; give a list of strings, "
        "text file paths, a datasets.Dataset or a CalibrationConfig"
    )


def token_windows(tokenizer, texts: list[str], n_samples: int, seq_len: int, source: str = "texts") -> TokenWindows:
    """Cut ``texts`` into up to ``n_samples`` windows of ``seq_len`` tokens.

    Only as many documents as needed are tokenized. Raises if the texts hold no tokens.
    """
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    need = n_samples * body
    stream: list[int] = []
    used: list[str] = []
    for text in texts:
        if len(stream) >= need:
            break
        if not text or not text.strip():
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        used.append(text)
    if len(stream) < 2:
        raise ValueError(f"calibration text from {source} is empty: give text with at least {seq_len} tokens")
    count = min(n_samples, len(stream) // body)
    if count == 0:
        logger.warning("only %d calibration tokens from %s; using one short window", len(stream), source)
        count, body = 1, len(stream)
    elif count < n_samples:
        logger.warning(
            "calibration text from %s fills %d of %d windows of %d tokens", source, count, n_samples, seq_len
        )
    rows = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    if bos is not None:
        rows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), rows], dim=1)
    return TokenWindows(rows, used, source)


def calibration_windows(
    tokenizer, source: Any = None, config: CalibrationConfig | None = None, corpus_split: str = "calibration"
) -> TokenWindows:
    """``load_texts`` then ``token_windows`` with the sizes of ``config``."""
    config = config if isinstance(config, CalibrationConfig) else CalibrationConfig()
    if isinstance(source, CalibrationConfig):
        config = source
    texts, description = load_texts(source, config, corpus_split)
    return token_windows(tokenizer, texts, config.n_samples, config.seq_len, description)


def check_disjoint(first: list[str], second: list[str], what: str = "healing and evaluation text") -> None:
    """Refuse two text sets that share a document (compared after whitespace normalisation)."""

    def keys(texts):
        return {hashlib.sha256(" ".join(t.split()).encode()).digest() for t in texts if t.strip()}

    shared = len(keys(first) & keys(second))
    if shared:
        raise ValueError(
            f"{what} overlap in {shared} document(s): evaluation would reward memorisation; "
            "use disjoint sources (the default corpus's train and heldout splits are disjoint)"
        )


def _split_documents(text: str) -> list[str]:
    if "<doc" in text[:1000]:
        docs = re.findall(r"<doc[^>]*>\n?(.*?)</doc>", text, flags=re.S)
    else:
        docs = re.split(r"\n\s*\n", text)
        if len(docs) == 1:  # one document per line, no blank lines between (c4.utf8)
            docs = text.splitlines()
    return [d.strip() for d in docs if d.strip()]


def _read_file(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"calibration file {path} is not UTF-8 text") from None


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def _column(dataset, column: str) -> list[str]:
    if column not in dataset.column_names:
        raise ValueError(f"the dataset has no column {column!r}; its columns are {', '.join(dataset.column_names)}")
    return [t for t in dataset[column] if isinstance(t, str)]


def _dataset_texts(name: str, config: CalibrationConfig) -> list[str]:
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise ValueError(f"dataset {name} has no split {config.split!r}; it has {', '.join(loaded)}")
            loaded = loaded[config.split]
    else:
        loaded = datasets.load_dataset(name, config.dataset_config, split=config.split)
    return _column(loaded, config.column)


def bos_id(tokenizer) -> int | None:
    """The BOS token id when the tokenizer puts one in front of a text, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]
    return bos if probe and probe[0] == bos else None
