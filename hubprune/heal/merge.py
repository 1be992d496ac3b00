"""Merge a LoRA adapter into a safetensors checkpoint at file level, one tensor at a time.

For every LoRA target weight ``W`` (as stored, e.g. bf16) the output holds
``W + (alpha / r) * B @ A`` (``alpha / sqrt(r)`` with rsLoRA; transposed for GPT-2's
``Conv1D``), computed in float32 a block of rows at a time and cast back to ``W``'s dtype.
Each merged tensor keeps its dtype and shape, so every shard keeps its header and layout:
all other bytes (header, other tensors) are copied as they are, in the kernel where it
can. Index, config, tokenizer and other files are carried; the hubprune record gets the
healing report and the card is rewritten. A sparse checkpoint (``hubprune.json`` records
``sparsity``) keeps its mask: every weight stored as zero stays zero after the merge. Peak
memory: the adapter plus one block of rows (at most 64 MB in float32), whatever the model's
size. The source folder is never written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hubprune.architecture.filesurgery import copy_range, read_header, shard_files
from hubprune.card import write_card
from hubprune.io import atomic_output
from hubprune.record import RECORD_FILE, PruneRecord

logger = logging.getLogger(__name__)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_PEFT_PREFIX = "base_model.model."
_REGENERATED = {"README.md", RECORD_FILE}  # written anew in the output, not copied
_BLOCK_BYTES = 64 << 20  # float32 bytes of one block of rows merged at a time


def merge_adapter_into_checkpoint(
    folder: str | os.PathLike,
    adapter: str | os.PathLike | Mapping[str, torch.Tensor],
    out: str | os.PathLike,
    *,
    lora_config: Any = None,
    healing: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``folder`` with a LoRA adapter merged into its weights to ``out`` (atomically); returns ``out``.

    ``adapter``: a folder saved by peft (``adapter_config.json`` + ``adapter_model.safetensors``),
    or peft's state dict (``get_peft_model_state_dict``) with ``lora_config`` (a peft
    ``LoraConfig`` or its dict). ``healing``: the heal report stored in ``hubprune.json``.
    ``finish(tmp_folder)``, if given, writes more files (recipe, adapter) before the card.

    Example: ``merge_adapter_into_checkpoint("llama-70b-44l", "adapter", "llama-70b-44l-healed")``
    """
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a transformers checkpoint folder (no config.json); "
            "give the folder the adapter was trained on"
        )
    state, config = _load_adapter(adapter, lora_config)
    plan = _plan(folder, state, config)  # shard -> {tensor name: (B, A) factors}, every target checked
    # A sparse checkpoint (hubprune.methods.sparsity) keeps its zeros: the dense delta is masked by them.
    keep_zeros = (folder / RECORD_FILE).is_file() and bool(PruneRecord.load(folder).sparsity)
    sizes = {shard: (folder / shard).stat().st_size for shard in plan}

    with atomic_output(out, overwrite=overwrite, protect=(str(folder),)) as tmp:
        bar = tqdm(total=sum(sizes.values()), desc="merge", unit="B", unit_scale=True, disable=not progress)
        for shard, targets in plan.items():
            _merge_shard(folder / shard, tmp / shard, targets, bar.update, keep_zeros)
        bar.close()
        for path in folder.iterdir():  # config, index, tokenizer, recipe, scan ... as they are
            if path.is_file() and path.name not in _REGENERATED and path.name not in plan:
                shutil.copy2(path, tmp / path.name)
        if finish is not None:
            finish(tmp)
        if (folder / RECORD_FILE).is_file():
            from dataclasses import replace

            record = PruneRecord.load(folder)
            replace(record, healing=healing if healing is not None else record.healing).save(tmp)
            write_card(tmp, repo_id=Path(out).name)
        elif (folder / "README.md").is_file():
            shutil.copy2(folder / "README.md", tmp / "README.md")
    merged = sum(len(t) for t in plan.values())
    logger.info("merged the adapter into %d weights of %s; wrote %s", merged, folder, out)
    return Path(out)


def _load_adapter(adapter, lora_config) -> tuple[dict[str, torch.Tensor], dict]:
    # -> (peft state dict, LoRA settings as a dict), refusing what this merge cannot do.
    if isinstance(adapter, Mapping):
        if lora_config is None:
            raise ValueError(
                "an adapter state dict needs lora_config= (the peft LoraConfig it was trained with); "
                "or pass the adapter folder peft saved"
            )
        state = dict(adapter)
        config = lora_config.to_dict() if hasattr(lora_config, "to_dict") else dict(lora_config)
    else:
        path = Path(adapter)
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{path} has no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; give a folder written "
                "by peft's save_pretrained (or the adapter's state dict with lora_config=)"
            )
        from safetensors.torch import load_file

        state, config = load_file(path / ADAPTER_WEIGHTS), json.loads((path / ADAPTER_CONFIG).read_text())
    peft_type = str(config.get("peft_type", "LORA")).rsplit(".", 1)[-1]
    if peft_type != "LORA":
        raise ValueError(f"the adapter is of type {peft_type}; only LoRA adapters can be merged at file level")
    for key, wrong in (
        ("use_dora", True),
        ("lora_bias", True),
        ("rank_pattern", None),
        ("alpha_pattern", None),
        ("modules_to_save", None),
        ("layer_replication", None),
    ):
        if config.get(key) and (wrong is None or config[key] == wrong):
            raise ValueError(
                f"the adapter uses {key}={config[key]!r}, which the file-level merge does not "
                "support; merge it in memory (peft's merge_and_unload), or train without it"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"the adapter trains biases (bias={config['bias']!r}); the file-level merge needs "
            "bias='none'; merge it in memory with peft's merge_and_unload instead"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ValueError(f"lora_config.{key} must be a positive number, got {config.get(key)!r}")
    return state, config


def _plan(folder: Path, state: dict[str, torch.Tensor], config: dict) -> dict[str, dict[str, tuple]]:
    # Pair each lora_A with its lora_B and the checkpoint tensor they change; check names and shapes.
    unknown = sorted(k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if unknown:
        raise ValueError(
            f"the adapter holds tensors other than LoRA A/B matrices ({unknown[0]}, ...); "
            "only plain LoRA on linear layers can be merged at file level"
        )
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factors = {}
    for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        b = state.get(module + ".lora_B.weight")
        if b is None:
            raise ValueError(f"the adapter has {key} but no matching lora_B; the adapter file is incomplete")
        name = (module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module) + ".weight"
        factors[name] = (b, state[key])
    if not factors:
        raise ValueError("the adapter holds no LoRA weights (no *.lora_A.weight tensors)")

    headers = {shard: read_header(folder / shard)[0] for shard in shard_files(folder)}
    where = {name: shard for shard, header in headers.items() for name in header if name != "__metadata__"}
    plan: dict[str, dict[str, tuple]] = {shard: {} for shard in headers}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for name, (b, a) in factors.items():
        if name not in where:
            raise ValueError(
                f"the adapter changes {name}, which the checkpoint in {folder} does not hold: the adapter "
                "was made for another model (or targets a tied weight stored under another name)"
            )
        info = headers[where[name]][name]
        expected = [a.shape[1], b.shape[0]] if fan_in_fan_out else [b.shape[0], a.shape[1]]
        if info["dtype"] not in _DTYPES or info["shape"] != expected or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"the adapter does not fit {name}: the checkpoint stores {info['dtype']} "
                f"{info['shape']}, the adapter's B @ A is {expected} (rank {a.shape[0]}); the adapter "
                f"was made for another model (only {', '.join(_DTYPES)} weights can be merged)"
            )
        left, right = (a.t(), b.t()) if fan_in_fan_out else (b, a)  # delta = left @ right, rows of W
        plan[where[name]][name] = (left.float(), right.float(), scaling, info)
    return plan


def _merge_shard(
    src: Path, dst: Path, targets: dict[str, tuple], progress: Callable[[int], None], keep_zeros: bool = False
) -> None:
    # Bytes between merged tensors (the header included) are copied as they are.
    _, start = read_header(src)
    spans = sorted(
        (start + info["data_offsets"][0], start + info["data_offsets"][1], name)
        for name, (*_, info) in targets.items()
    )
    with src.open("rb") as f_in, dst.open("wb", buffering=0) as f_out:  # unbuffered: copy_file_range shares the fd
        position = 0
        for begin, end, name in spans:
            copy_range(f_in, f_out, position, begin - position, progress)
            _write_merged(f_in, f_out, begin, targets[name], keep_zeros)
            progress(end - begin)
            position = end
        copy_range(f_in, f_out, position, src.stat().st_size - position, progress)


def _write_merged(f_in, f_out, offset: int, target: tuple, keep_zeros: bool = False) -> None:
    # W[i:j] (as stored) -> dtype(float32(W[i:j]) + scaling * left[i:j] @ right), a block of rows at a time;
    # with keep_zeros, weights stored as zero stay zero (a sparse model's mask).
    left, right, scaling, info = target  # left [rows, r], right [r, cols] in float32
    dtype = _DTYPES[info["dtype"]]
    rows, cols = info["shape"]
    row_bytes = cols * torch.finfo(dtype).bits // 8
    block = max(1, _BLOCK_BYTES // (cols * 4))
    for i in range(0, rows, block):
        j = min(rows, i + block)
        f_in.seek(offset + i * row_bytes)
        raw = f_in.read((j - i) * row_bytes)
        if len(raw) != (j - i) * row_bytes:
            raise ValueError(f"{f_in.name} ended early: the safetensors file is truncated")
        w = torch.frombuffer(bytearray(raw), dtype=dtype).view(j - i, cols).float()
        zero = w == 0 if keep_zeros else None
        w.addmm_(left[i:j], right, alpha=scaling)
        if zero is not None:
            w.masked_fill_(zero, 0.0)
        data = w.to(dtype).view(torch.uint8).numpy().data.cast("B")
        while data:  # a raw write may be partial
            data = data[f_out.write(data) :]
