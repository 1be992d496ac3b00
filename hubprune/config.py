"""The recipe: the single, typed source of a pruning run (YAML in and out).

A recipe looks like this (every key but ``model`` and one of ``prune``'s is optional)::

    model: HuggingFaceTB/SmolLM2-135M-Instruct
    dtype: float32
    calibration:
      corpus: wiki          # or texts: [...], files: [...], dataset: NAME
      n_samples: 32
      seq_len: 256
    prune:
      n_layers: 6           # or fraction: 0.2, or layers: [12, 13, 14]
      metric: angular_last
      mlp_width: 0.8        # optional: keep 80 % of every MLP's neurons (hubprune.methods.width)
      sparsity: "2:4"       # optional: or 0.5; zeroed by sparsity_method (hubprune.methods.sparsity)
    output: out/smollm2-24l

Unknown keys are refused with the list of known ones; values are checked on construction.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS = ("angular_last", "angular_all", "block_influence", "perplexity")
"""Layer-choice metrics. ``angular_*``: Gromov et al. 2024 (last token / every token);
``block_influence``: ShortGPT; ``perplexity``: calibration perplexity with the block removed
(SLEB / Shortened LLaMA; costs one extra pass per candidate block)."""

DTYPES = ("auto", "float32", "bfloat16", "float16")


# The sparsity target of PruneConfig, parsed here so that the config checks itself (the weights are
# zeroed by hubprune.methods.sparsity).
SPARSITY_METHODS = ("magnitude", "wanda")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Sparsity:
    """A target: ``fraction`` of the weights zeroed; ``n``/``m`` set for an N:M pattern (N kept of M)."""

    fraction: float
    n: int | None = None
    m: int | None = None

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"

    def __str__(self) -> str:
        return self.pattern if self.m else f"{self.fraction:g}"


def parse_sparsity(value) -> Sparsity:
    """``0.5`` or ``"0.5"`` (a fraction in (0, 1)) or ``"2:4"`` (N kept of every M, N < M); ValueError otherwise.

    Example: ``parse_sparsity("2:4").fraction == 0.5``
    """
    if isinstance(value, str):
        match = _NM.match(value)
        if match:
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise ValueError(
                    f"sparsity {value!r}: N:M keeps N of every M weights, so 0 < N < M is needed, such as 2:4"
                )
            return Sparsity(1 - n / m, n, m)
        try:
            number = float(value)
        except ValueError:
            raise ValueError(
                f"sparsity must be a fraction in (0, 1) such as 0.5, or N:M such as 2:4, got {value!r}"
            ) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"sparsity must be a fraction such as 0.5 or a string N:M such as '2:4', got {value!r}")
    if not 0 < number < 1:
        hint = " (in YAML, quote an N:M pattern: '2:4')" if isinstance(value, int) and value > 1 else ""
        raise ValueError(f"sparsity must lie strictly between 0 and 1, got {value!r}{hint}")
    return Sparsity(number)


@dataclass
class CalibrationConfig:
    """Where calibration text comes from and how much of it to use.

    Give at most one of ``texts``, ``files`` and ``dataset``; with none, the offline default
    corpus named by ``corpus`` is used (its calibration split, disjoint from held-out text).

    Example: ``CalibrationConfig(files=["notes.txt"], n_samples=16, seq_len=512)``
    """

    texts: list[str] | None = None
    files: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    column: str = "text"
    corpus: str = "wiki"
    n_samples: int = 32
    seq_len: int = 256
    batch_size: int = 4

    def __post_init__(self) -> None:
        given = [name for name in ("texts", "files", "dataset") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"calibration: give only one of texts, files or dataset, not {' and '.join(given)}")
        if isinstance(self.texts, str) or isinstance(self.files, str):
            raise TypeError("calibration: texts and files must be lists of strings, not a single string")
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"calibration.{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"calibration.seq_len must be at least 2 tokens, got {self.seq_len}")


@dataclass
class PruneConfig:
    """How many layers to drop, and how to choose them; how much to narrow and sparsify what is kept.

    Give at most one of ``n_layers``, ``fraction`` (of the model's layers, in (0, 1)),
    ``layers`` (explicit 0-based indices; ``metric`` is then only recorded) and
    ``max_quality_loss`` (drop as many layers as keep ``quality`` -- held-out perplexity,
    zero-shot tasks, or chat top-1 agreement with the original's answers -- within that
    fraction of the original's, found by measuring).

    ``mlp_width`` (in (0, 1)) keeps that share of every MLP's neurons (``hubprune.methods.width``);
    ``sparsity`` (a fraction in (0, 1), or ``"N:M"`` such as ``"2:4"``) zeroes weights of the
    decoder projections, scored by ``sparsity_method`` (``hubprune.methods.sparsity``). Both apply
    after layers are dropped; with either, no layer option is needed.

    Example: ``PruneConfig(n_layers=6, metric="angular_last")``, ``PruneConfig(sparsity="2:4")``
    """

    n_layers: int | None = None
    fraction: float | None = None
    layers: list[int] | None = None
    max_quality_loss: float | None = None
    quality: str = "perplexity"
    metric: str = "angular_last"
    mlp_width: float | None = None
    sparsity: float | str | None = None
    sparsity_method: str = "wanda"

    def __post_init__(self) -> None:
        given = [
            name for name in ("n_layers", "fraction", "layers", "max_quality_loss") if getattr(self, name) is not None
        ]
        if len(given) > 1 or not (given or self.mlp_width is not None or self.sparsity is not None):
            detail = "none was" if not given else f"{' and '.join(given)} were"
            raise ValueError(
                "prune: give exactly one of n_layers, fraction, layers or max_quality_loss, or mlp_width "
                f"or sparsity ({detail} given)"
            )
        self._check_width_and_sparsity()
        if self.max_quality_loss is not None and not 0 < self.max_quality_loss < 1:
            raise ValueError(
                f"prune.max_quality_loss is a fraction in (0, 1) such as 0.05, got {self.max_quality_loss}"
            )
        if self.quality not in ("perplexity", "tasks", "chat"):
            raise ValueError(f"prune.quality must be perplexity, tasks or chat, got {self.quality!r}")
        if self.n_layers is not None and (
            not isinstance(self.n_layers, int) or isinstance(self.n_layers, bool) or self.n_layers < 1
        ):
            raise ValueError(f"prune.n_layers must be a positive integer, got {self.n_layers!r}")
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
                raise TypeError(f"prune.fraction must be a number in (0, 1), got {self.fraction!r}")
            if not 0 < self.fraction < 1:
                raise ValueError(f"prune.fraction must lie strictly between 0 and 1, got {self.fraction}")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("prune.layers is empty: list at least one 0-based layer index to drop")
            for index in self.layers:
                if not isinstance(index, int) or isinstance(index, bool):
                    raise TypeError(f"prune.layers must hold integer layer indices, got {index!r}")
            seen = [i for i in set(self.layers) if self.layers.count(i) > 1]
            if seen:
                raise ValueError(f"prune.layers lists layer {sorted(seen)[0]} more than once; list each layer once")
            if min(self.layers) < 0:
                raise ValueError(f"prune.layers must be 0-based and non-negative, got {min(self.layers)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")

    def _check_width_and_sparsity(self) -> None:
        if self.mlp_width is not None:
            if isinstance(self.mlp_width, bool) or not isinstance(self.mlp_width, (int, float)):
                raise TypeError(f"prune.mlp_width must be a fraction in (0, 1) such as 0.8, got {self.mlp_width!r}")
            if not 0 < self.mlp_width < 1:
                raise ValueError(
                    f"prune.mlp_width is the share of MLP neurons kept, strictly between 0 and 1 (such as 0.8), "
                    f"got {self.mlp_width}"
                )
        if self.sparsity is not None:
            try:
                target = parse_sparsity(self.sparsity)
            except (ValueError, TypeError) as err:
                raise type(err)(f"prune.{err}") from None
            self.sparsity = str(target) if target.m else target.fraction  # "2:4" or 0.5, as YAML keeps it
        if self.sparsity_method not in SPARSITY_METHODS:
            raise ValueError(
                f"prune.sparsity_method {self.sparsity_method!r} is unknown; "
                f"choose one of {', '.join(SPARSITY_METHODS)}"
            )
        if self.max_quality_loss is not None and (self.mlp_width is not None or self.sparsity is not None):
            raise ValueError(
                "prune.max_quality_loss searches layer counts only; it cannot be combined with mlp_width or sparsity"
            )

    @property
    def drops_layers(self) -> bool:
        """Whether this config removes whole layers (else it only narrows or sparsifies)."""
        return any(getattr(self, k) is not None for k in ("n_layers", "fraction", "layers", "max_quality_loss"))

    def count(self, num_layers: int) -> int:
        """The number of layers this config drops from a model with ``num_layers`` layers."""
        if self.max_quality_loss is not None:
            raise ValueError("a quality budget has no fixed layer count: it is found by measuring (run_recipe)")
        if not self.drops_layers:
            return 0
        if self.layers is not None:
            n = len(self.layers)
        elif self.n_layers is not None:
            n = self.n_layers
        else:
            if self.fraction is None:  # __post_init__ asks for one of the four
                raise ValueError("no layers, n_layers, fraction or max_quality_loss: nothing says how many to drop")
            n = round(self.fraction * num_layers)
            if n < 1:
                raise ValueError(
                    f"fraction {self.fraction} of {num_layers} layers rounds to 0 layers; "
                    f"use at least {1 / num_layers:.3f}"
                )
        if n >= num_layers:
            raise ValueError(f"cannot drop {n} of {num_layers} layers: keep at least one; drop 1 to {num_layers - 1}")
        return n


HEAL_METHODS = ("lora", "qlora")
HEAL_TEXTS = ("auto", "chat", "prose")
HEAL_DIVERGENCES = ("forward", "reverse", "jsd")
HEAL_PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class ChatDataConfig:
    """Conversations the original writes itself, for chat-aware healing (self-data distillation).

    ``prompts``: ``magpie`` (the original writes the questions, given only its template's
    user-turn prefix, sampled at ``question_temperature``) or a UTF-8 file with one prompt a line
    (refused if it shares a prompt with the held-out chat evaluation prompts). The answers are
    sampled from the original through its chat template at ``temperature`` / ``top_p``, up to
    ``max_new_tokens``. ``conversations`` is how many are written (healing reads them again when
    its steps need more text). ``student_answers``: that many of the same questions are also
    answered greedily by the pruned model itself before healing (never cached), and healing
    learns the original's distribution on those answers too: the states the pruned model
    really reaches, loops included (on-policy distillation, Agarwal et al. 2024's GKD, from one
    snapshot). ``batch_size`` is the generation batch.

    Example (YAML)::

        heal:
          text: chat
          chat: {conversations: 384, max_new_tokens: 192}
    """

    prompts: str = "magpie"
    conversations: int = 384
    max_new_tokens: int = 192
    temperature: float = 0.7
    top_p: float = 0.9
    question_temperature: float = 1.0
    max_question_tokens: int = 64
    student_answers: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("conversations", "max_new_tokens", "max_question_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"heal.chat.{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.student_answers, int)
            or isinstance(self.student_answers, bool)
            or not (0 <= self.student_answers <= self.conversations)
        ):
            raise ValueError(
                f"heal.chat.student_answers must be an integer in [0, conversations], got {self.student_answers!r}"
            )
        for name in ("temperature", "question_temperature"):
            if not 0 < getattr(self, name) <= 2:
                raise ValueError(f"heal.chat.{name} must lie in (0, 2] (sampling), got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"heal.chat.top_p must lie in (0, 1], got {self.top_p}")
        if not isinstance(self.prompts, str) or not self.prompts.strip():
            raise ValueError("heal.chat.prompts must be 'magpie' or the path of a file with one prompt a line")


@dataclass
class HealConfig:
    """How to heal a pruned model: LoRA (or 4-bit QLoRA) on the kept layers, optionally distilled.

    ``distill`` is the weight of the KL term between the original model's and the pruned
    model's token distributions (0: language-modelling loss only; 1: distillation only).
    ``divergence`` picks that term: ``forward`` KL(original || pruned), the default; ``reverse``
    KL(pruned || original), mode-seeking; ``jsd``, Jensen-Shannon (``hubprune.heal.lora.divergence``).
    ``data`` names the healing text; with no texts, files or dataset it is the default
    corpus's *train* split, which never overlaps its calibration or held-out splits (its
    ``seq_len`` and ``n_samples`` are not used: ``steps`` decides how much text is read).
    The adapter is merged into a plain checkpoint; ``keep_adapter`` also saves it.

    ``text`` says what healing reads. ``chat``: conversations the original writes itself
    (``chat``, a ``ChatDataConfig``), learning only the answer tokens; ``mix`` is the share of
    prose windows (``data``) mixed in. ``prose``: the text of ``data``. ``auto`` (the default):
    chat for a model whose tokenizer has a chat template, when the original is at hand and no
    healing text was given; prose otherwise.

    ``on_policy`` (chat healing only) is the share of steps whose answers the pruned model writes
    itself at that step, sampled as the original's were, up to ``on_policy_tokens`` (the first
    tokens, where it drifts; decoding is the cost); healing learns the original's
    distribution along them (``hubprune.heal.onpolicy``; Agarwal et al. 2024's GKD). The other
    steps read the original's conversations.

    ``refit`` (on by default) first repairs each gap in closed form (``hubprune.heal.refit``):
    the MLP output projection of the last kept layer before the gap is refit by ridge least
    squares, on ``refit_tokens`` tokens of the healing text, so that the layer's output
    approximates the original's residual stream after the removed block. It needs the
    original model (as for ``distill``) and is skipped for QLoRA and for families that
    normalise their MLP output (Gemma 2/3, OLMo 2).

    ``precision`` is the arithmetic of the training passes. ``bfloat16`` runs them under
    autocast (the LoRA weights and the optimizer stay float32); ``auto`` (the default) does so
    where the hardware computes bfloat16 natively (a CUDA GPU that supports it, a CPU with
    AVX512-BF16 or AMX) and stays in ``float32`` elsewhere, where bfloat16 would be slower.

    Example (YAML)::

        heal:
          steps: 300
          distill: 0.5
          lora_r: 16
    """

    method: str = "lora"
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    distill: float = 0.0
    divergence: str = "forward"
    temperature: float = 1.0
    data: CalibrationConfig = field(default_factory=CalibrationConfig)
    text: str = "auto"
    mix: float = 0.0
    on_policy: float = 0.0
    on_policy_tokens: int = 64
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)
    refit: bool = True
    refit_tokens: int = 32768
    refit_ridge: float = 1e-3
    checkpoint_every: int = 50
    keep_adapter: bool = False
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in HEAL_METHODS:
            raise ValueError(f"heal.method {self.method!r} is unknown; choose one of {', '.join(HEAL_METHODS)}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "lora_r",
            "lora_alpha",
            "checkpoint_every",
            "refit_tokens",
            "on_policy_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"heal.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"heal.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"heal.learning_rate must lie in (0, 1), got {self.learning_rate}")
        if not 0 <= self.distill <= 1:
            raise ValueError(f"heal.distill is a loss weight in [0, 1], got {self.distill}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"heal.lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.temperature <= 0:
            raise ValueError(f"heal.temperature must be positive, got {self.temperature}")
        if self.divergence not in HEAL_DIVERGENCES:
            raise ValueError(
                f"heal.divergence {self.divergence!r} is unknown; choose one of {', '.join(HEAL_DIVERGENCES)}"
            )
        if self.precision not in HEAL_PRECISIONS:
            raise ValueError(
                f"heal.precision {self.precision!r} is unknown; choose one of {', '.join(HEAL_PRECISIONS)}"
            )
        if self.text not in HEAL_TEXTS:
            raise ValueError(f"heal.text {self.text!r} is unknown; choose one of {', '.join(HEAL_TEXTS)}")
        if isinstance(self.mix, bool) or not isinstance(self.mix, (int, float)) or not 0 <= self.mix < 1:
            raise ValueError(f"heal.mix is the share of prose mixed into chat healing, in [0, 1), got {self.mix!r}")
        share = self.on_policy
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"heal.on_policy is a share of the steps, in [0, 1], got {share!r}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"heal.refit must be true or false, got {self.refit!r}")
        if not self.refit_ridge > 0:
            raise ValueError(
                f"heal.refit_ridge must be positive (it keeps the refit near the original weights), "
                f"got {self.refit_ridge}"
            )


@dataclass
class Recipe:
    """One pruning run: the model, its calibration, what to drop, and where to write it.

    Example: ``Recipe.load("recipes/smollm2-24l.yaml")``
    """

    model: str
    prune: PruneConfig
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    streaming: bool | str = "auto"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    heal: HealConfig | None = None
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("recipe: model must name a Hub id, a local folder or a .gguf file")
        if self.dtype not in DTYPES:
            raise ValueError(f"recipe: unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.streaming not in (True, False, "auto"):
            raise ValueError(f"recipe: streaming must be true, false or auto, got {self.streaming!r}")
        if self.streaming is True and (self.prune.mlp_width is not None or self.prune.sparsity is not None):
            raise ValueError("recipe: mlp_width and sparsity need the model in memory; set streaming to false or auto")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Build a recipe from plain data, refusing unknown keys."""
        return _build(cls, data, "recipe")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe YAML file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"recipe file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe file {path} must hold a mapping of keys (model, prune, ...)")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return _prune_none(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def reject_unknown(data: dict, known: set[str], where: str) -> None:
    """Refuse a key of ``data`` outside ``known`` (a YAML typo), naming it and the known keys.
    The one check for recipes and the server's serve.yaml."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known keys are {', '.join(sorted(known))}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    reject_unknown(data, {f.name for f in dataclasses.fields(cls)}, where)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        nested = _dataclass_in(hint)
        kwargs[name] = _build(nested, value, f"{where}.{name}") if nested and value is not None else value
    try:
        return cls(**kwargs)
    except TypeError as err:
        if "missing" in str(err):
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _required(f)]
            raise ValueError(f"{where}: missing required key {missing[0]!r}") from None
        raise


def _dataclass_in(hint: Any) -> type | None:
    candidates = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _prune_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune_none(v) for k, v in value.items() if v is not None}
    return value


def replayable(source: Any, config: CalibrationConfig, windows=None) -> CalibrationConfig:
    """The text source of a scan or heal as a recipe can replay it: files by path, in-memory text
    kept (only the documents ``windows`` used, when given)."""
    if source is None or isinstance(source, CalibrationConfig):
        return source or config
    if isinstance(source, (str, Path)) or (
        isinstance(source, (list, tuple)) and source and isinstance(source[0], Path)
    ):
        files = [str(source)] if isinstance(source, (str, Path)) else [str(p) for p in source]
        return dataclasses.replace(config, files=files)
    return dataclasses.replace(config, texts=list(windows.texts) if windows is not None else list(source))
