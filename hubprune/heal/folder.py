"""Heal a pruned folder into a new folder: what ``hubprune heal`` runs.

``method: lora`` loads the folder and its original (the teacher, for distillation and the refit)
and heals in memory (``PrunedModel.heal``); ``method: qlora`` loads both straight into 4-bit and
merges the adapter into the shards at file level (``qlora.heal_checkpoint``). Healing never reads
the held-out text that ``hubprune eval`` measures; checkpoints sit beside ``out`` until it is written.
"""

from __future__ import annotations

import logging
import os
import shutil

from torch import nn

from hubprune.config import HealConfig
from hubprune.eval.perplexity import heldout_texts
from hubprune.heal.qlora import heal_checkpoint
from hubprune.io import check_output
from hubprune.loading import load_model
from hubprune.pruner import PrunedModel, checkpoint_dir_for
from hubprune.record import PruneRecord

logger = logging.getLogger(__name__)


def heal_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    config: HealConfig,
    *,
    dtype: str = "float32",
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict | None:
    """Heal the pruned ``folder`` by ``config`` and write the result to ``out``.

    Returns the healing report as ``hubprune.json`` records it, or None on the processes that do not
    write (under ``accelerate launch`` the main one does). ``dtype`` applies to ``method: lora``
    (QLoRA computes in bfloat16; merged weights keep their stored dtype).

    Example: ``heal_folder("out/smollm2-24l", "out/smollm2-24l-healed", HealConfig(steps=200, distill=0.5))``
    """
    from accelerate import PartialState

    check_output(out, overwrite=overwrite, protect=(str(folder),))
    checkpoints = checkpoint_dir_for(str(out))
    heldout = heldout_texts()
    if config.method == "qlora":  # loaded straight into 4-bit (teacher too); the adapter is merged at file level
        _, report = heal_checkpoint(
            folder,
            out,
            config,
            checkpoint_dir=checkpoints,
            eval_texts=heldout,
            device=device,
            overwrite=overwrite,
            progress=progress,
        )
        if not PartialState().is_main_process:
            return None
        healing = report.to_dict()
    else:
        pruned = PrunedModel.from_pretrained(folder, dtype=dtype, device=device)
        teacher = None
        if config.distill > 0 or config.refit:  # both read the original
            teacher = load_teacher(pruned.record, dtype=dtype, device=device, required=config.distill > 0)
        healed = pruned.heal(
            config, teacher=teacher, checkpoint_dir=checkpoints, eval_texts=heldout, progress=progress
        )
        if not PartialState().is_main_process:  # under accelerate launch, one process writes
            return None
        healed.save_pretrained(out, overwrite=overwrite)
        healing = healed.record.healing
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return healing


def load_teacher(record: PruneRecord, *, dtype: str, device: str, required: bool) -> nn.Module | None:
    """The original the record names, at the revision it was pruned from; where it cannot be loaded,
    None (healing then skips the refit) unless ``required`` (distillation cannot do without it)."""
    logger.info("loading the original model %s as the teacher", record.base_model)
    try:
        teacher, _, _ = load_model(record.base_model, revision=record.original_revision, dtype=dtype, device=device)
    except (OSError, ValueError) as err:
        if required:
            raise
        logger.warning("the original %s could not be loaded (%s); healing without refit", record.base_model, err)
        return None
    return teacher
