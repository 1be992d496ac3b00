"""Cut layers out of a safetensors checkpoint without instantiating the model.

Kept tensors are copied byte for byte, in chunks, from the source shards into new shards
with renumbered layer indices; ``model.safetensors.index.json`` and ``config.json`` are
rewritten (the same config slicing as in-memory surgery), tokenizer and other files are
carried over. Peak memory is one copy buffer, whatever the model's size. The output
equals in-memory surgery followed by ``save_pretrained``, tensor for tensor.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from hubprune._version import __version__
from hubprune.architecture.families import NOT_TEXT, family_of, layer_count
from hubprune.architecture.perlayer import blocks_shape, copy_blocks, per_layer_dim, per_layer_width
from hubprune.architecture.surgery import (
    check_kept_layers,
    check_layers,
    refuse_index_dependent_layers,
    slice_config,
    slice_copy,
)
from hubprune.card import write_card
from hubprune.config import PruneConfig, Recipe
from hubprune.io import atomic_output
from hubprune.record import RECIPE_FILE, PruneRecord

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_CHUNK = 64 << 20  # bytes per read/write while copying a tensor
_NOT_CARRIED = {
    "config.json",
    INDEX_FILE,
    "README.md",
    "hubprune.json",
    "hubprune_recipe.yaml",
    "hubprune_scan.json",
    "hubprune_scan.png",
}


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (struct.error, ValueError, MemoryError, OverflowError) as err:
        raise ValueError(f"cannot load the model weights: {path} is not a valid safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"cannot load the model weights: {path} is not a valid safetensors file")
    return header, 8 + size


def shard_files(folder: Path) -> list[str]:
    """The safetensors files of a checkpoint, in index order (or the single model.safetensors)."""
    index = folder / INDEX_FILE
    if index.is_file():
        return list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{folder} has no model.safetensors or {INDEX_FILE}; give a safetensors checkpoint folder")


def cut_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    layers: Sequence[int],
    *,
    overwrite: bool = False,
    progress: bool = True,
    finish=None,
) -> Path:
    """Write ``source`` without the given 0-based layers to ``out`` (atomically); returns ``out``.

    ``finish(tmp_folder)``, if given, writes the record, recipe and card instead of the
    defaults (an explicit-layers record).

    Example: ``cut_checkpoint("Llama-2-70b-hf", "llama-70b-40l", range(40, 80))``
    """
    from transformers import AutoConfig

    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json; give a transformers checkpoint folder")
    config = AutoConfig.from_pretrained(source)
    family = family_of(config)
    num_layers = layer_count(config)
    removed = check_layers(list(layers), num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]
    refuse_index_dependent_layers(config, kept)
    check_kept_layers(config, slice_copy(config, kept, num_layers), kept)
    new_index = {old: new for new, old in enumerate(kept)}
    shards = shard_files(source)
    headers = {shard: read_header(source / shard)[0] for shard in shards}
    pattern = layer_key_pattern([k for h in headers.values() for k in h if k != "__metadata__"], num_layers, family)

    width = per_layer_width(config)
    plan = []  # (source shard, [(old name, new name, info)])
    for shard in shards:
        header = headers[shard]
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            match = pattern.match(name)
            if match and int(match.group(2)) in new_index:
                entries.append((name, f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}", info))
            elif not match:
                dim = per_layer_dim(name, info["shape"], num_layers, width)
                if dim is not None:  # one block per layer outside the layers (Gemma 4 per-layer embeddings)
                    shape = blocks_shape(info["shape"], dim, num_layers, kept)
                    info = {**info, "shape": shape, "blocks": (dim, num_layers, kept, info["shape"])}
                entries.append((name, name, info))
        plan.append((shard, entries, header.get("__metadata__")))
    plan = [p for p in plan if p[1]]
    total = sum(_length(info) for _, entries, _ in plan for *_, info in entries)

    with atomic_output(out, overwrite=overwrite, protect=(str(source),)) as tmp:
        bar = tqdm(total=total, desc="cut", unit="B", unit_scale=True, disable=not progress)
        weight_map, names = {}, []
        for number, (shard, entries, metadata) in enumerate(plan, start=1):
            name = "model.safetensors" if len(plan) == 1 else f"model-{number:05d}-of-{len(plan):05d}.safetensors"
            _copy_tensors(source / shard, tmp / name, entries, metadata, bar)
            weight_map.update({new: name for _, new, _ in entries})
            names.append(name)
        bar.close()
        if len(plan) > 1:
            (tmp / INDEX_FILE).write_text(
                json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
                )
            )
        slice_config(config, kept, num_layers)
        config.save_pretrained(tmp)
        for path in source.iterdir():
            if path.is_file() and path.name not in _NOT_CARRIED and not path.name.endswith(".safetensors"):
                shutil.copy2(path, tmp / path.name)
        if finish is not None:
            finish(tmp)
        else:
            _write_record(tmp, source, removed, kept, num_layers)
            Recipe(model=str(source.resolve()), prune=PruneConfig(layers=removed)).save(tmp / RECIPE_FILE)
            write_card(tmp, repo_id=Path(out).name)  # not the temporary folder's name
    logger.info("cut layers %s from %s into %s (%d shards)", removed, source, out, len(plan))
    return Path(out)


def _copy_tensors(src: Path, dst: Path, entries: list, metadata: dict | None, bar) -> None:
    # Header first (new names, packed offsets), then each tensor's bytes in source order.
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for _, new, info in entries:
        length = _length(info)
        header[new] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + length]}
        offset += length
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to a multiple of 8 bytes
    _, start = read_header(src)
    with src.open("rb") as f_in, dst.open("wb") as f_out:
        f_out.write(struct.pack("<Q", len(blob)) + blob)
        f_out.flush()
        for _, _, info in entries:
            begin, end = info["data_offsets"]
            if "blocks" in info:
                dim, num_layers, kept, shape = info["blocks"]
                f_out.seek(0, os.SEEK_END)
                bar.update(copy_blocks(f_in, f_out, start + begin, {**info, "shape": shape}, dim, num_layers, kept))
                f_out.flush()  # before the next copy_file_range writes at the file's position
            else:
                copy_range(f_in, f_out, start + begin, end - begin, bar.update)


def _length(info: dict) -> int:
    """Bytes a planned tensor takes in the output (less than in the source for a per-layer tensor cut)."""
    length = info["data_offsets"][1] - info["data_offsets"][0]
    if "blocks" in info:
        dim, num_layers, kept, _ = info["blocks"]
        length = length // num_layers * len(kept)
    return length


def copy_range(f_in, f_out, offset: int, length: int, progress=lambda n: None) -> None:
    """Append ``length`` bytes of ``f_in`` from ``offset`` to ``f_out``, in the kernel where it can."""
    while length:
        step = min(_CHUNK, length)
        try:  # Linux: no copy through user space
            done = os.copy_file_range(f_in.fileno(), f_out.fileno(), step, offset)
        except (AttributeError, OSError):
            f_in.seek(offset)
            done = f_out.write(f_in.read(step))
        if done == 0:
            raise ValueError(f"{f_in.name} ended early: the safetensors file is truncated")
        offset, length = offset + done, length - done
        progress(done)


def count_checkpoint_parameters(folder: str | Path, removed: Sequence[int]) -> tuple[int, int]:
    """Parameters of a checkpoint before and after removing ``removed`` layers, from its headers."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    headers = [read_header(folder / shard)[0] for shard in shard_files(folder)]
    pattern = layer_key_pattern(
        [k for h in headers for k in h if k != "__metadata__"],
        layer_count(config),
        family_of(config),
    )
    before = after = 0
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = math.prod(info["shape"])
            before += size
            match = pattern.match(name)
            after += 0 if match and int(match.group(2)) in set(removed) else size
    return before, after


def _write_record(folder: Path, source: Path, removed: list[int], kept: list[int], num_layers: int) -> None:
    before, after = count_checkpoint_parameters(source, removed)
    PruneRecord(
        base_model=str(source.resolve()),
        base_revision=None,
        base_num_layers=num_layers,
        removed_layers=removed,
        kept_layers=kept,
        metric="explicit",
        parameters_before=before,
        parameters_after=after,
        origin={"kind": "local", "path": str(source.resolve()), "note": "cut at file level (hubprune cut)"},
        hubprune_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    ).save(folder)


def layer_key_pattern(keys: list[str], num_layers: int, family) -> re.Pattern:
    """The regex (prefix, layer number, rest) of a checkpoint's decoder-layer tensor names.

    Found from the names themselves, since a checkpoint may name them unlike the modules
    (``transformer.h.3.attn`` for ``model.layers.3.self_attn``): the prefix followed by exactly
    the layer numbers 0..num_layers-1, outside any vision or audio tower."""
    numbers: dict[str, set[int]] = {}
    for key in keys:
        for match in re.finditer(r"\.(\d+)\.", "." + key):
            prefix = key[: match.start() - 1] if match.start() else ""
            numbers.setdefault(prefix, set()).add(int(match.group(1)))
    found = [p for p, n in numbers.items() if n == set(range(num_layers)) and not NOT_TEXT.search(p)]
    if len(found) > 1:
        last = family.layers.rsplit(".", 1)[-1]
        found = [p for p in found if p.rsplit(".", 1)[-1] == last] or found
    if len(found) != 1:
        raise ValueError(
            f"cannot tell which tensors of the checkpoint belong to its {num_layers} decoder layers "
            f"(candidates: {', '.join(found) or 'none'}); prune it in memory instead (hubprune prune)"
        )
    return re.compile(rf"^({re.escape(found[0])}\.)(\d+)(\..*)$" if found[0] else r"^()(\d+)(\..*)$")
