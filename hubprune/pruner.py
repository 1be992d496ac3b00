"""The ``from_pretrained``-style objects that wire load -> scan -> surgery -> save together."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hubprune._version import __version__
from hubprune.architecture.families import decoder_layers, skeleton
from hubprune.architecture.filesurgery import count_checkpoint_parameters, cut_checkpoint
from hubprune.architecture.surgery import check_layers, copy_sharing_weights, drop_layers
from hubprune.calibration import TokenWindows, calibration_windows
from hubprune.card import write_card
from hubprune.config import CalibrationConfig, HealConfig, PruneConfig, Recipe, replayable
from hubprune.eval.perplexity import heldout_texts
from hubprune.heal.lora import heal_model
from hubprune.hub import push_folder
from hubprune.io import atomic_output, check_output
from hubprune.loading import (
    DEFAULT_MODEL,
    ModelOrigin,
    load_located,
    load_model,
    local_folder,
    locate,
    num_layers_of,
    resolve_device,
    resolve_dtype,
)
from hubprune.methods.scan import ScanResult, loss_scan, scan_model
from hubprune.methods.sparsity import masks_from_zeros, sparsify
from hubprune.methods.streamscan import fits_in_memory, streamed_scan
from hubprune.methods.sweep import largest_drop_within
from hubprune.methods.width import check_narrowable, narrow_mlp
from hubprune.record import PLOT_FILE, RECIPE_FILE, RECORD_FILE, SCAN_FILE, PruneRecord

logger = logging.getLogger(__name__)


class LayerPruner:
    """Holds a loaded model; scans its layers and returns pruned copies.

    Example::

        pruner = LayerPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        scan = pruner.scan()                      # default offline corpus
        pruned = pruner.prune(n_layers=6)         # or fraction=0.2, or layers=[...]
        pruned.save_pretrained("out/smollm2-24l")
    """

    def __init__(
        self,
        model,
        tokenizer,
        origin: ModelOrigin,
        load_options: dict[str, Any] | None = None,
        folder: Path | None = None,
    ):
        self.model = model  # None when streaming: the weights stay in their shards
        self.tokenizer = tokenizer
        self.origin = origin
        self.load_options = load_options or {}
        self.folder = folder
        self.scan_result: ScanResult | None = None
        self.calibration: CalibrationConfig | None = None
        self._windows: TokenWindows | None = None

    @property
    def _folder(self) -> Path:
        """The local checkpoint folder that a streaming pruner reads."""
        if self.folder is None:
            raise ValueError("this pruner holds its model in memory and reads no checkpoint folder")
        return self.folder

    @property
    def streaming(self) -> bool:
        """True when the model is not in memory: scans stream layers, pruning cuts files."""
        return self.model is None

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
        streaming: bool | str = "auto",
    ) -> LayerPruner:
        """Load a causal LM from a Hub id, a local folder or a ``.gguf`` file.

        ``streaming``: True keeps the weights in their safetensors shards (scans run layer by
        layer, pruning cuts files; for models larger than memory); "auto" does so only when
        the model would not fit in free memory.
        """
        from transformers import AutoTokenizer

        if streaming not in (True, False, "auto"):
            raise ValueError(f"streaming must be True, False or 'auto', got {streaming!r}")
        options = {
            "revision": revision,
            "gguf_file": gguf_file,
            "dtype": dtype,
            "device": device,
            "trust_remote_code": trust_remote_code,
        }
        torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
        found, origin = locate(source, revision=revision, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        folder = local_folder(found, origin) if streaming is not False else None
        if streaming == "auto" and folder is not None:
            streaming = not fits_in_memory(folder, torch_dtype, torch_device)
            if streaming:
                logger.info("%s would not fit in free memory: scanning layer by layer from its shards", source)
        if streaming:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            return cls(None, tokenizer, origin, options, folder=folder)
        model, tokenizer = load_located(found, origin, torch_dtype, trust_remote_code)
        return cls(model.to(torch_device).eval(), tokenizer, origin, options, folder=folder)

    @property
    def num_layers(self) -> int:
        if self.streaming:
            return num_layers_of(self._folder)
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
        if self.streaming:
            if loss_block_sizes:
                raise ValueError(
                    "the perplexity criterion needs the model in memory; use streaming=False, "
                    "or an angular or block_influence metric"
                )

            dtype = resolve_dtype(self.load_options.get("dtype", "float32"))
            result = streamed_scan(
                self._folder,
                windows,
                dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
                device=resolve_device(self.load_options.get("device", "auto")),
                progress=progress,
                name=self.origin.base_model,
            )
        else:
            result = scan_model(
                self.model, windows, batch_size=config.batch_size, progress=progress, name=self.origin.base_model
            )
        for n in loss_block_sizes:
            result.perplexity[n] = loss_scan(self.model, windows, n, batch_size=config.batch_size, progress=progress)
        self.scan_result, self._windows = result, windows
        self.calibration = replayable(calibration, config, windows)
        return result

    def calibrate(self, calibration: Any = None) -> TokenWindows:
        """The calibration windows: the last scan's, else cut from ``calibration`` (as ``scan`` takes it)
        or the default corpus. Width and Wanda sparsity measure activations on them."""
        if self._windows is None or calibration is not None:
            config = calibration if isinstance(calibration, CalibrationConfig) else self.calibration
            config = config or CalibrationConfig()
            self._windows = calibration_windows(self.tokenizer, calibration, config)
            self.calibration = replayable(calibration, config, self._windows)
        return self._windows

    def prune(
        self,
        n_layers: int | None = None,
        *,
        fraction: float | None = None,
        layers: list[int] | None = None,
        metric: str = "angular_last",
        mlp_width: float | None = None,
        sparsity: float | str | None = None,
        sparsity_method: str = "wanda",
        progress: bool = True,
    ) -> PrunedModel:
        """A pruned copy of the model (the pruner's own model is left as it is).

        Give one of ``n_layers``, ``fraction`` or ``layers`` (0-based) to drop layers; without
        a previous ``scan``, one is run on the default corpus. ``mlp_width`` (in (0, 1)) then
        keeps that share of every MLP's neurons; ``sparsity`` (0.5, or "2:4") zeroes weights of
        the kept layers' projections by ``sparsity_method`` (wanda or magnitude).
        Example: ``pruner.prune(4, mlp_width=0.9)``, ``pruner.prune(sparsity="2:4")``
        """
        config = PruneConfig(
            n_layers=n_layers,
            fraction=fraction,
            layers=layers,
            metric=metric,
            mlp_width=mlp_width,
            sparsity=sparsity,
            sparsity_method=sparsity_method,
        )
        reshapes = config.mlp_width is not None or config.sparsity is not None
        if reshapes and self.streaming:
            raise ValueError("mlp_width and sparsity need the model in memory; load it with streaming=False")
        if config.mlp_width is not None:
            check_narrowable(self.model)  # before any scan
        n = config.count(self.num_layers)
        removed: list[int] = []
        if layers is not None:
            removed = check_layers(layers, self.num_layers)
        elif n:
            scan = self.scan_result
            if scan is None:
                logger.info("no scan yet: scanning on the default calibration corpus")
                scan = self.scan(progress=progress)
            if metric == "perplexity" and n not in scan.perplexity:
                if self._windows is None or self.calibration is None:  # scan() sets both with scan_result
                    raise ValueError("the perplexity criterion needs the scan's calibration windows; scan again")
                scan.perplexity[n] = loss_scan(
                    self.model, self._windows, n, batch_size=self.calibration.batch_size, progress=progress
                )
            removed = scan.choose(n, metric)
        if self.streaming:
            pruned = None
        else:
            pruned = drop_layers(self.model, removed) if removed else copy_sharing_weights(self.model)
        width: dict = {}
        sparse: dict = {}
        batch = (self.calibration or CalibrationConfig()).batch_size
        if config.mlp_width is not None:
            assert pruned is not None  # streaming was refused above
            report = narrow_mlp(pruned, config.mlp_width, self.calibrate(), batch_size=batch, progress=progress)
            width = report.to_dict()
        if config.sparsity is not None:
            assert pruned is not None  # streaming was refused above
            windows = self.calibrate() if config.sparsity_method == "wanda" else None
            sparse = sparsify(
                pruned, config.sparsity, config.sparsity_method, windows, batch_size=batch, progress=progress
            )
        how = "explicit" if layers is not None else metric if removed else "none"
        record = replace(self._record(pruned, removed, how), width=width, sparsity=sparse)
        recipe = Recipe(
            model=self.origin.base_model,
            prune=config,
            calibration=self.calibration or CalibrationConfig(),
            streaming=self.streaming or "auto",
            **{k: v for k, v in self.load_options.items() if k != "gguf_file" or self.origin.kind != "gguf"},
        )
        return PrunedModel(
            pruned,
            self.tokenizer,
            record,
            recipe,
            self.scan_result if removed else None,
            base=self.model,
            source_folder=self.folder if self.streaming else None,
        )

    def _record(self, pruned, removed: list[int], metric: str) -> PruneRecord:
        scores: dict[str, Any] = {}
        if self.scan_result is not None and metric not in ("explicit", "none"):
            n = len(removed)
            values = self.scan_result.scores(metric, n)
            scores = {
                "block_size": n,
                "values": values,
                "chosen": [values[i] for i in removed] if metric == "block_influence" else values[removed[0]],
            }
        if self.streaming:
            before, after = count_checkpoint_parameters(self._folder, removed)
            config_updates = ["num_hidden_layers"]
        else:
            before, after = count_parameters(self.model), count_parameters(pruned)
            config_updates = sorted(
                k for k, v in pruned.config.to_dict().items() if v != self.model.config.to_dict().get(k)
            )
        return PruneRecord(
            base_model=self.origin.base_model,
            base_revision=self.origin.revision,
            base_num_layers=self.num_layers,
            removed_layers=list(removed),
            kept_layers=[i for i in range(self.num_layers) if i not in removed],
            metric=metric,
            scores=scores,
            calibration=dict(self.scan_result.calibration) if self.scan_result else _windows_info(self._windows),
            parameters_before=before,
            parameters_after=after,
            config_updates=config_updates,
            origin=self.origin.to_dict(),
            hubprune_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )


class PrunedModel:
    """A pruned model with its tokenizer, record and recipe; saves as a plain transformers folder.

    ``base`` is the unpruned original when it is in memory (the teacher for distillation).
    """

    def __init__(
        self,
        model,
        tokenizer,
        record: PruneRecord,
        recipe: Recipe | None,
        scan: ScanResult | None = None,
        base=None,
        adapter_dir: str | None = None,
        source_folder: Path | None = None,
    ):
        self.model = model  # None for a streamed pruner's result: saving cuts the source shards
        self.source_folder = source_folder
        self.tokenizer = tokenizer
        self.record = record
        self.recipe = recipe
        self.scan = scan
        self.base = base
        self._adapter = tempfile.TemporaryDirectory(prefix="hubprune-adapter-") if adapter_dir is None else None
        self.adapter_dir = adapter_dir

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, dtype: str = "float32", device: str = "auto"
    ) -> PrunedModel:
        """Load a folder written by ``save_pretrained`` (model, tokenizer, record, recipe, scan)."""
        folder = Path(folder)
        if not (folder / RECORD_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {RECORD_FILE}: give a folder written by hubprune prune")
        model, tokenizer, _ = load_model(folder, dtype=dtype, device=device)
        record = PruneRecord.load(folder)
        recipe = Recipe.load(folder / RECIPE_FILE) if (folder / RECIPE_FILE).is_file() else None
        scan = ScanResult.load(folder / SCAN_FILE) if (folder / SCAN_FILE).is_file() else None
        adapter = folder / "adapter"
        return cls(model, tokenizer, record, recipe, scan, adapter_dir=str(adapter) if adapter.is_dir() else None)

    def heal(
        self,
        config: HealConfig | None = None,
        *,
        data: Any = None,
        eval_texts: list[str] | None = None,
        teacher=None,
        checkpoint_dir: str | os.PathLike | None = None,
        progress: bool = True,
        **options: Any,
    ) -> PrunedModel:
        """A healed copy: LoRA on the kept layers (plus distillation from the original if ``distill`` > 0).

        ``options`` override fields of ``config`` (``steps=300, distill=0.5``, ...). This
        object is left unhealed. Example: ``healed = pruned.heal(steps=300, distill=0.5)``
        """
        if self.model is None:
            raise ValueError(
                "this model was pruned at file level and is not in memory: save it, then heal the "
                "saved folder (hubprune heal OUT --out HEALED, with --method qlora for big models)"
            )
        config = replace(config or HealConfig(), **options)
        teacher = teacher if teacher is not None else self.base
        masks = None
        if self.record.sparsity:  # the zero weights stay zero: re-applied after the LoRA merge
            masks = masks_from_zeros(self.model)
        student = copy_sharing_weights(self.model)  # the weights LoRA merges into are copied at the merge
        healed = PrunedModel(student, self.tokenizer, self.record, self.recipe, self.scan, base=self.base)
        adapter_dir = healed._adapter.name if config.keep_adapter and healed._adapter is not None else None
        model, report = heal_model(
            student,
            self.tokenizer,
            config,
            teacher=teacher,
            data=data,
            eval_texts=eval_texts,
            checkpoint_dir=checkpoint_dir,
            adapter_dir=adapter_dir,
            removed=self.record.removed_layers,
            masks=masks,
            progress=progress,
        )
        healed.model, healed.adapter_dir = model, adapter_dir
        healed.record = replace(self.record, healing=report.to_dict(), parameters_after=count_parameters(model))
        if self.recipe is not None:
            healed.recipe = replace(self.recipe, heal=replace(config, data=replayable(data, config.data, None)))
        return healed

    def save_pretrained(self, out: str | os.PathLike, *, overwrite: bool = False, plot: bool = True) -> Path:
        """Write weights (safetensors), config, tokenizer, record, recipe and scan to ``out``, atomically."""

        def extras(tmp: Path) -> None:
            self.record.save(tmp)
            if self.recipe is not None:
                replace(self.recipe, output=str(out), overwrite=False).save(tmp / RECIPE_FILE)
            if self.scan is not None:
                self.scan.save(tmp / SCAN_FILE)
                if plot:
                    self.scan.plot(tmp / PLOT_FILE)
            if self.adapter_dir:
                shutil.copytree(self.adapter_dir, tmp / "adapter")
            write_card(tmp, repo_id=Path(out).name)

        if self.model is None:
            if self.source_folder is None:
                raise ValueError("a model pruned at file level is saved from its source folder, and none was given")
            cut_checkpoint(self.source_folder, out, self.record.removed_layers, overwrite=overwrite, finish=extras)
        else:
            protect = (self.record.origin.get("path", ""),)
            with atomic_output(out, overwrite=overwrite, protect=protect) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                extras(tmp)
        logger.info("saved the pruned model to %s", out)
        return Path(out)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
    ):
        """Save to a temporary folder and publish it to ``repo_id`` in one commit (see ``hubprune.hub``).

        Example: ``pruned.push_to_hub("me/smollm2-24l", private=True)``
        """
        with tempfile.TemporaryDirectory(prefix="hubprune-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.rsplit("/", 1)[-1])
            return push_folder(
                folder, repo_id, private=private, token=token, create_pr=create_pr, commit_message=commit_message
            )

    def __repr__(self) -> str:
        r = self.record
        healed = f", healed ({r.healing['method']}, {r.healing['steps']} steps)" if r.healing else ""
        return f"PrunedModel({r.base_model}: {r.summary()}{healed})"


def run_recipe(recipe: Recipe, *, progress: bool = True) -> tuple[PrunedModel, Path | None]:
    """Carry out a recipe: load, scan, prune and (if it names an output) save.

    Example: ``run_recipe(Recipe.load("recipes/smollm2-24l.yaml"))``
    """
    # Everything that can be checked before the slow part is.
    if recipe.output:
        local = recipe.model if Path(recipe.model).expanduser().exists() else ""
        check_output(recipe.output, overwrite=recipe.overwrite, protect=(local,))
    p = recipe.prune
    load_options: dict[str, Any] = {
        "revision": recipe.revision,
        "gguf_file": recipe.gguf_file,
        "dtype": recipe.dtype,
        "device": recipe.device,
        "trust_remote_code": recipe.trust_remote_code,
    }
    resolve_dtype(recipe.dtype), resolve_device(recipe.device)
    folder, _ = locate(
        recipe.model, revision=recipe.revision, gguf_file=recipe.gguf_file, trust_remote_code=recipe.trust_remote_code
    )
    num_layers = num_layers_of(folder, revision=recipe.revision, trust_remote_code=recipe.trust_remote_code)
    if p.max_quality_loss is None:
        p.count(num_layers)
    if p.layers is not None:
        check_layers(p.layers, num_layers)
    reshapes = p.mlp_width is not None or p.sparsity is not None
    if p.mlp_width is not None:  # from the config alone (a meta-device skeleton): refused before loading
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            folder, revision=recipe.revision, trust_remote_code=recipe.trust_remote_code
        )
        check_narrowable(skeleton(config))
    streaming = False if reshapes else recipe.streaming  # width and sparsity need the weights in memory
    pruner = LayerPruner.from_pretrained(recipe.model, streaming=streaming, **load_options)
    budget = None
    if p.layers is None and p.drops_layers:
        loss_sizes = [p.count(pruner.num_layers)] if p.metric == "perplexity" and p.max_quality_loss is None else []
        pruner.scan(recipe.calibration, loss_block_sizes=loss_sizes, progress=progress)
    elif reshapes:
        pruner.calibrate(recipe.calibration)
    if p.max_quality_loss is not None:
        n, points = largest_drop_within(pruner, p.max_quality_loss, p.metric, quality=p.quality, progress=progress)
        budget = {
            "max_quality_loss": p.max_quality_loss,
            "quality": p.quality,
            "chosen": n,
            "measured": [{"n_layers": q.n_layers, "quality": q.quality, "perplexity": q.perplexity} for q in points],
        }
        pruned = pruner.prune(n, metric=p.metric, progress=progress)
        pruned.record.scores["budget"] = budget
    else:
        pruned = pruner.prune(
            p.n_layers,
            fraction=p.fraction,
            layers=p.layers,
            metric=p.metric,
            mlp_width=p.mlp_width,
            sparsity=p.sparsity,
            sparsity_method=p.sparsity_method,
            progress=progress,
        )
    pruned.recipe = replace(recipe, output=None, overwrite=False)
    if recipe.heal is not None:
        pruned = pruned.heal(
            recipe.heal,
            checkpoint_dir=checkpoint_dir_for(recipe.output),
            eval_texts=heldout_texts(),
            progress=progress,
        )
    if recipe.output is None:
        return pruned, None
    out = pruned.save_pretrained(recipe.output, overwrite=recipe.overwrite)
    checkpoints = checkpoint_dir_for(recipe.output)
    if recipe.heal is not None and checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return pruned, out


def checkpoint_dir_for(output: str | None) -> Path | None:
    # Healing checkpoints live beside the output folder (which is only written at the end).
    if output is None:
        return None
    out = Path(output).expanduser()
    return out.parent / f".{out.name}.heal-checkpoints"


def _windows_info(windows: TokenWindows | None) -> dict:
    if windows is None:
        return {}
    return {
        "source": windows.source,
        "windows": len(windows.ids),
        "seq_len": windows.ids.size(1),
        "tokens": windows.num_tokens,
        "fingerprint": windows.fingerprint(),
    }


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings once)."""
    return sum(p.numel() for p in model.parameters())
