"""The ``from_pretrained``-style objects that wire load -> scan -> surgery -> save together."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from hubprune.calibration import TokenWindows, calibration_windows
from hubprune.config import CalibrationConfig, PruneConfig, Recipe
from hubprune.families import decoder_layers
from hubprune.io import atomic_output
from hubprune.loading import DEFAULT_MODEL, ModelOrigin, load_model, locate, num_layers_of, resolve_device, resolve_dtype
from hubprune.record import PLOT_FILE, RECIPE_FILE, SCAN_FILE, PruneRecord
from hubprune.scan import ScanResult, loss_scan, scan_model
from hubprune.surgery import check_layers, drop_layers

logger = logging.getLogger(__name__)


class LayerPruner:
    """Holds a loaded model; scans its layers and returns pruned copies.

    Example::

        pruner = LayerPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        scan = pruner.scan()                      # default offline corpus
        pruned = pruner.prune(n_layers=6)         # or fraction=0.2, or layers=[...]
        pruned.save_pretrained("out/smollm2-24l")
    """

    def __init__(self, model, tokenizer, origin: ModelOrigin, load_options: dict[str, Any] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.origin = origin
        self.load_options = load_options or {}
        self.scan_result: ScanResult | None = None
        self.calibration: CalibrationConfig | None = None
        self._windows: TokenWindows | None = None

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
    ) -> LayerPruner:
        """Load a causal LM from a Hub id, a local folder or a ``.gguf`` file."""
        options = {"revision": revision, "gguf_file": gguf_file, "dtype": dtype, "device": device,
                   "trust_remote_code": trust_remote_code}
        model, tokenizer, origin = load_model(source, **options)
        return cls(model, tokenizer, origin, options)

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def scan(
        self,
        calibration: Any = None,
        *,
        n_samples: int = 32,
        seq_len: int = 256,
        batch_size: int = 4,
        loss_block_sizes: tuple[int, ...] | list[int] = (),
        progress: bool = True,
    ) -> ScanResult:
        """Score every block of layers on calibration text (one pass; plus one per block for loss sizes).

        ``calibration``: a list of strings, text file path(s), a ``datasets.Dataset``, a
        ``CalibrationConfig``, or None for the offline default corpus.
        """
        if isinstance(calibration, CalibrationConfig):
            config = calibration
        else:
            config = CalibrationConfig(n_samples=n_samples, seq_len=seq_len, batch_size=batch_size)
        windows = calibration_windows(self.tokenizer, calibration, config)
        result = scan_model(self.model, windows, batch_size=config.batch_size, progress=progress, name=self.origin.base_model)
        for n in loss_block_sizes:
            result.perplexity[n] = loss_scan(self.model, windows, n, batch_size=config.batch_size, progress=progress)
        self.scan_result, self._windows = result, windows
        self.calibration = _replayable(calibration, config, windows)
        return result

    def prune(
        self,
        n_layers: int | None = None,
        *,
        fraction: float | None = None,
        layers: list[int] | None = None,
        metric: str = "angular_last",
        progress: bool = True,
    ) -> PrunedModel:
        """A pruned copy of the model (the pruner's own model is left as it is).

        Give one of ``n_layers``, ``fraction`` or ``layers`` (0-based). Without a previous
        ``scan``, one is run on the default corpus.
        """
        config = PruneConfig(n_layers=n_layers, fraction=fraction, layers=layers, metric=metric)
        n = config.count(self.num_layers)
        if layers is not None:
            removed = check_layers(layers, self.num_layers)
        else:
            if self.scan_result is None:
                logger.info("no scan yet: scanning on the default calibration corpus")
                self.scan(progress=progress)
            if metric == "perplexity" and n not in self.scan_result.perplexity:
                self.scan_result.perplexity[n] = loss_scan(
                    self.model, self._windows, n, batch_size=self.calibration.batch_size, progress=progress
                )
            removed = self.scan_result.choose(n, metric)
        pruned = drop_layers(self.model, removed)
        record = self._record(pruned, removed, "explicit" if layers is not None else metric)
        recipe = Recipe(model=self.origin.base_model, prune=config, calibration=self.calibration or CalibrationConfig(),
                        **{k: v for k, v in self.load_options.items() if k != "gguf_file" or self.origin.kind != "gguf"})
        return PrunedModel(pruned, self.tokenizer, record, recipe, self.scan_result)

    def _record(self, pruned, removed: list[int], metric: str) -> PruneRecord:
        from hubprune import __version__

        scores: dict[str, Any] = {}
        if self.scan_result is not None and metric != "explicit":
            n = len(removed)
            values = self.scan_result.scores(metric, n)
            scores = {"block_size": n, "values": values, "chosen": [values[i] for i in removed] if metric == "block_influence" else values[removed[0]]}
        config_updates = sorted(k for k, v in pruned.config.to_dict().items() if v != self.model.config.to_dict().get(k))
        return PruneRecord(
            base_model=self.origin.base_model,
            base_revision=self.origin.revision,
            base_num_layers=self.num_layers,
            removed_layers=list(removed),
            kept_layers=[i for i in range(self.num_layers) if i not in removed],
            metric=metric,
            scores=scores,
            calibration=dict(self.scan_result.calibration) if self.scan_result else {},
            parameters_before=count_parameters(self.model),
            parameters_after=count_parameters(pruned),
            config_updates=config_updates,
            origin=self.origin.to_dict(),
            hubprune_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )


class PrunedModel:
    """A pruned model with its tokenizer, record and recipe; saves as a plain transformers folder."""

    def __init__(self, model, tokenizer, record: PruneRecord, recipe: Recipe, scan: ScanResult | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.record = record
        self.recipe = recipe
        self.scan = scan

    def save_pretrained(self, out: str | os.PathLike, *, overwrite: bool = False, plot: bool = True) -> Path:
        """Write weights (safetensors), config, tokenizer, record, recipe and scan to ``out``, atomically."""
        protect = (self.record.origin.get("path", ""),)
        with atomic_output(out, overwrite=overwrite, protect=protect) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            self.record.save(tmp)
            replace(self.recipe, output=str(out)).save(tmp / RECIPE_FILE)
            if self.scan is not None:
                self.scan.save(tmp / SCAN_FILE)
                if plot:
                    self.scan.plot(tmp / PLOT_FILE)
        logger.info("saved the pruned model to %s", out)
        return Path(out)

    def __repr__(self) -> str:
        r = self.record
        return (f"PrunedModel({r.base_model}: {r.base_num_layers} -> {r.num_layers} layers, "
                f"removed {r.removed_layers}, {r.parameters_before / 1e6:.1f}M -> {r.parameters_after / 1e6:.1f}M parameters)")


def run_recipe(recipe: Recipe, *, progress: bool = True) -> tuple[PrunedModel, Path | None]:
    """Carry out a recipe: load, scan, prune and (if it names an output) save.

    Example: ``run_recipe(Recipe.load("recipes/smollm2-24l.yaml"))``
    """
    from hubprune.io import check_output

    # Everything that can be checked before the slow part is.
    if recipe.output:
        check_output(recipe.output, overwrite=recipe.overwrite)
    p = recipe.prune
    load_options = {"revision": recipe.revision, "gguf_file": recipe.gguf_file, "dtype": recipe.dtype,
                    "device": recipe.device, "trust_remote_code": recipe.trust_remote_code}
    resolve_dtype(recipe.dtype), resolve_device(recipe.device)
    folder, _ = locate(recipe.model, revision=recipe.revision, gguf_file=recipe.gguf_file,
                       trust_remote_code=recipe.trust_remote_code)
    num_layers = num_layers_of(folder, revision=recipe.revision, trust_remote_code=recipe.trust_remote_code)
    p.count(num_layers)
    if p.layers is not None:
        check_layers(p.layers, num_layers)
    pruner = LayerPruner.from_pretrained(recipe.model, **load_options)
    if p.layers is None:
        loss_sizes = [p.count(pruner.num_layers)] if p.metric == "perplexity" else []
        pruner.scan(recipe.calibration, loss_block_sizes=loss_sizes, progress=progress)
    pruned = pruner.prune(p.n_layers, fraction=p.fraction, layers=p.layers, metric=p.metric, progress=progress)
    pruned.recipe = replace(recipe, output=None, overwrite=False)
    if recipe.output is None:
        return pruned, None
    return pruned, pruned.save_pretrained(recipe.output, overwrite=recipe.overwrite)


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings once)."""
    return sum(p.numel() for p in model.parameters())


def _replayable(source: Any, config: CalibrationConfig, windows: TokenWindows) -> CalibrationConfig:
    # The calibration as a recipe can replay it: in-memory text is kept (only the documents used).
    if source is None or isinstance(source, CalibrationConfig):
        return config
    if isinstance(source, (str, Path)) or (isinstance(source, (list, tuple)) and source and isinstance(source[0], Path)):
        files = [str(source)] if isinstance(source, (str, Path)) else [str(p) for p in source]
        return replace(config, files=files)
    return replace(config, texts=list(windows.texts))
