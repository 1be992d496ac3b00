"""QLoRA healing of a pruned folder that never holds the model in full precision.

The pruned checkpoint is loaded straight into 4-bit NF4 (bf16 compute, double
quantization) on one device, LoRA adapters are trained on it as in ``lora.heal_model``,
and the adapter is merged into the folder's full-precision safetensors shards at file
level (``merge.merge_adapter_into_checkpoint``), one tensor at a time. Memory: the 4-bit
model, the adapter and the activations on the device; the merge needs one block of rows
in RAM. With ``distill`` > 0 the teacher (the unpruned original) is loaded in 4-bit too,
on the same device: it needs room beside the student (about 36 GB more for a 70B model).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hubprune.config import HealConfig, Recipe, replayable
from hubprune.heal.fourbit import load_4bit, require_qlora
from hubprune.heal.lora import HealReport, heal_model
from hubprune.heal.merge import merge_adapter_into_checkpoint
from hubprune.io import check_output
from hubprune.loading import locate, resolve_device
from hubprune.record import RECIPE_FILE, RECORD_FILE, PruneRecord

logger = logging.getLogger(__name__)


def heal_checkpoint(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    config: HealConfig,
    *,
    teacher: nn.Module | None = None,
    data: Any = None,
    eval_texts: list[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, HealReport]:
    """Heal the pruned ``folder`` with QLoRA and write the merged full-precision result to ``out``.

    The model is loaded in 4-bit from the shards (never in full precision); the adapter is
    merged at file level. With ``config.distill`` > 0 and no ``teacher``, the original named
    in ``hubprune.json`` is loaded in 4-bit as the teacher. Under ``accelerate launch`` each
    process trains on its own GPU and the main process writes ``out``.

    Example: ``heal_checkpoint("llama-70b-44l", "llama-70b-44l-healed", HealConfig(method="qlora", steps=300))``
    """
    from accelerate import PartialState
    from transformers import AutoTokenizer

    folder = Path(folder)
    if config.method != "qlora":
        raise ValueError(
            f"heal_checkpoint trains QLoRA on a 4-bit load; got heal.method {config.method!r}: set "
            "method='qlora', or load the folder with PrunedModel.from_pretrained and call .heal()"
        )
    if not (folder / RECORD_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {RECORD_FILE}: give a folder written by hubprune prune")
    check_output(out, overwrite=overwrite, protect=(str(folder),))
    torch_device = resolve_device(device)
    require_qlora(torch_device)
    record = PruneRecord.load(folder)
    if config.distill > 0 and teacher is None:
        teacher = _load_teacher(record, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    student = load_4bit(folder, torch_device)
    with tempfile.TemporaryDirectory(prefix="hubprune-qlora-adapter-") as adapter:
        _, report = heal_model(
            student,
            tokenizer,
            config,
            teacher=teacher,
            data=data,
            eval_texts=eval_texts,
            checkpoint_dir=checkpoint_dir,
            adapter_dir=adapter,
            progress=progress,
        )
        del student, teacher  # free the device before the merge (which runs on the CPU)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not PartialState().is_main_process:
            return Path(out), report

        def finish(tmp: Path) -> None:
            if (folder / RECIPE_FILE).is_file():
                recipe = Recipe.load(folder / RECIPE_FILE)
                heal = replace(config, data=replayable(data, config.data, None))
                replace(recipe, heal=heal, output=str(out), overwrite=False).save(tmp / RECIPE_FILE)
            if config.keep_adapter:
                shutil.copytree(adapter, tmp / "adapter")

        merge_adapter_into_checkpoint(
            folder, adapter, out, healing=report.to_dict(), overwrite=overwrite, progress=progress, finish=finish
        )
    return Path(out), report


def _load_teacher(record: PruneRecord, device: torch.device) -> nn.Module:
    revision = record.original_revision
    found, _ = locate(record.base_model, revision=revision)
    logger.info("loading the original model %s in 4-bit as the distillation teacher", record.base_model)
    return load_4bit(found, device, revision=revision).eval().requires_grad_(False)
