"""Scan a model larger than memory, one decoder layer at a time, from its safetensors shards.

The model is built with empty (meta) weights; only the embeddings and the final norm are
loaded. All calibration windows go through the stack as ONE batch, and a hook loads each
decoder layer's weights from the shards just before it runs and frees them right after,
so each layer is read once and peak memory is about one layer plus the activations plus
the embeddings. The residual state entering each layer is normalised and written to a
temporary file; a last pass reads them back a window at a time and accumulates the same
statistics as the in-memory scan (``hubprune.methods.scan.PairStats``), so the scores agree.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hubprune.architecture.families import decoder_layers, family_of, final_hidden_hook
from hubprune.architecture.filesurgery import read_header, shard_files
from hubprune.calibration import TokenWindows
from hubprune.methods.scan import PairStats, ScanResult

logger = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the weights of a safetensors checkpoint (a proxy for the memory a full load needs)."""
    folder = Path(folder)
    return sum((folder / shard).stat().st_size for shard in shard_files(folder))


def fits_in_memory(
    folder: str | Path, dtype: torch.dtype | str = "auto", device: torch.device | None = None, headroom: float = 0.6
) -> bool:
    """Whether loading the checkpoint at ``dtype`` (plus working room) fits in free RAM or GPU memory."""
    size = checkpoint_bytes(folder)
    if isinstance(dtype, torch.dtype):
        size = size * dtype.itemsize // _stored_bytes(Path(folder))
    if device is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    return size < headroom * free


@torch.no_grad()
def streamed_scan(
    folder: str | Path,
    windows: TokenWindows,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    name: str = "",
) -> ScanResult:
    """The scan of ``hubprune.methods.scan.scan_model``, computed layer by layer from the shards.

    Example: ``streamed_scan("Llama-2-70b-hf", calibration_windows(tokenizer)).choose(40)``
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, device = Path(folder), torch.device(device)
    config = AutoConfig.from_pretrained(folder)
    family = family_of(config)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (RoPE) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    tensors = _TensorIndex(folder, model.base_model_prefix)
    layers_prefix = family.layers + "."
    for pname, _ in list(model.named_parameters()):
        if not pname.startswith(layers_prefix) and pname in tensors:  # embeddings, final norm, positions
            _set(model, pname, tensors.load(pname), device, dtype)
    for module in model.modules():  # buffers (RoPE frequencies, ...) were built on the CPU
        for bname, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[bname] = buffer.to(device)

    layers = decoder_layers(model)
    L = len(layers)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hubprune-stream-") as tmp:
        paths = [Path(tmp) / f"state-{i}.f32" for i in range(L + 1)]
        bar = tqdm(total=L, desc="streamed scan", unit="layer", disable=not progress)

        def before(index):
            def hook(module, args, kwargs):
                _save_state(paths[index], args[0] if args else kwargs["hidden_states"])
                for pname, _ in module.named_parameters():
                    full = f"{family.layers}.{index}.{pname}"
                    _set(model, full, tensors.load(full), device, dtype)

            return hook

        def after(index):
            def hook(module, args, output):
                for pname, _ in list(module.named_parameters()):
                    _set(model, f"{family.layers}.{index}.{pname}", None, "meta", dtype)
                _release_freed_memory()
                bar.update(1)

            return hook

        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(after(i)))
        handles.append(final_hidden_hook(model, lambda hidden: _save_state(paths[L], hidden)))
        try:
            model.base_model(input_ids=windows.ids.to(device), use_cache=False)  # every window, one batch
        finally:
            for handle in handles:
                handle.remove()
            bar.close()

        stats = PairStats(L)
        N, T = windows.ids.shape
        D = config.hidden_size
        for w in tqdm(range(N), desc="pair statistics", unit="window", disable=not progress):
            window = np.stack([_read_window(path, w, T, D) for path in paths], axis=1)  # [T, L+1, D]
            stats.add(torch.from_numpy(window), ends_window=True)
    return stats.result(name, windows, time.perf_counter() - started)


class _TensorIndex:
    """Find and read single tensors from a checkpoint's shards by parameter name."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.where = folder, prefix, {}
        self.headers: dict[Path, tuple[dict, int]] = {}  # shard -> (header, data start)
        for shard in shard_files(folder):
            header, _ = read_header(folder / shard)
            self.where.update({name: shard for name in header if name != "__metadata__"})

    def _key(self, name: str) -> str | None:
        if name in self.where:
            return name
        short = name.removeprefix(self.prefix + ".")  # checkpoints saved without the base prefix
        return short if short in self.where else None

    def __contains__(self, name: str) -> bool:
        return self._key(name) is not None

    def load(self, name: str) -> torch.Tensor:
        # Plain reads of the tensor's bytes (no mmap of the whole shard: RSS holds only this tensor).
        key = self._key(name)
        if key is None:
            raise KeyError(f"{name} is not in the checkpoint in {self.folder}")
        path = self.folder / self.where[key]
        header, start = self.headers.setdefault(path, read_header(path))
        info = header[key]
        begin, end = info["data_offsets"]
        with path.open("rb") as f:
            f.seek(start + begin)
            data = bytearray(f.read(end - begin))
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        return (
            torch.frombuffer(data, dtype=dtype).reshape(info["shape"])
            if data
            else torch.empty(info["shape"], dtype=dtype)
        )


def _set(model, name: str, value, device, dtype) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value, dtype=dtype if value is not None else None)


def _release_freed_memory() -> None:
    # glibc keeps freed blocks in its arenas; hand them back so that the next layer reuses the room.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _save_state(path: Path, hidden: torch.Tensor) -> None:
    # Raw float32 [N, T, D]; read back a window at a time with plain reads (no mmap: RSS stays flat).
    F.normalize(hidden.float(), dim=-1).cpu().numpy().tofile(path)


def _read_window(path: Path, window: int, tokens: int, hidden: int) -> np.ndarray:
    size = tokens * hidden * 4
    with path.open("rb") as f:
        f.seek(window * size)
        return np.frombuffer(f.read(size), dtype=np.float32).reshape(tokens, hidden)


def _stored_bytes(folder: Path) -> int:
    header, _ = read_header(folder / shard_files(folder)[0])
    dtypes = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
    return {"F32": 4, "BF16": 2, "F16": 2}.get(max(set(dtypes), key=dtypes.count), 2)
